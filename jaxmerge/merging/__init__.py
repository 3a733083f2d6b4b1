"""Post-hoc merges: one method family per module, each a leaf kernel plus tree functions."""
