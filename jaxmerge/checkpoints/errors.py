"""The error of unreadable or unusable checkpoints and configs (one line, naming the file or key)."""


class CheckpointError(ValueError):
    """A checkpoint, model directory or merge config that cannot be used as it is."""
