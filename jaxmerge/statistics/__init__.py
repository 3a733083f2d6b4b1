"""Statistics that data-aware merges need: diagonal Fisher and input Gram matrices."""
