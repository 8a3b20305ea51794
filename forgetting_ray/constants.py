"""Values every layer agrees on; this module imports nothing."""

# The label of a position that carries no loss (prompt, padding): PyTorch's cross-entropy ignore_index,
# which transformers' collators use too.
IGNORE_INDEX = -100

# Ray Data's repartition tasks (scoring and evaluation) each take a whole CPU, on one node: an actor pool
# must leave that much free on at least one node, or the stage waits forever (STACK_NOTES Exp 3, §7).
# A Tune trial budgets it too (search.py), which must not import the Ray glue.
RAY_DATA_TASK_CPUS = 1.0
