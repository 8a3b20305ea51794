"""Values every layer agrees on; this module imports nothing."""

# The label of a position that carries no loss (prompt, padding): PyTorch's cross-entropy ignore_index,
# which transformers' collators use too.
IGNORE_INDEX = -100
