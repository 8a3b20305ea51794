"""Values every layer agrees on; this module imports nothing."""

# The label of a position that carries no loss (prompt, padding): PyTorch's cross-entropy ignore_index,
# which transformers' collators use too.
IGNORE_INDEX = -100

# Ray Data's repartition tasks (scoring and evaluation) each take a whole CPU, on one node: an actor pool
# must leave that much free on at least one node, or the stage waits forever (STACK_NOTES Exp 3, §7).
# A Tune trial budgets it too (search.py), which must not import the Ray glue.
RAY_DATA_TASK_CPUS = 1.0

# The per-token NLL (scoring.token_nll) runs the output head over this many bytes of rows at a time (fp32
# logits plus cross_entropy's log-softmax copy), so its memory stays bounded at any vocabulary; plan.py
# counts the same chunk.
CHUNK_BYTES = 256 * 2**20


def logit_chunk_rows(vocab_size: int) -> int:
    """Rows of the head's logits computed at once by default (at least 16)."""
    return max(16, CHUNK_BYTES // (8 * vocab_size))
