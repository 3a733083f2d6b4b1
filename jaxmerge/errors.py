"""jaxmerge's errors: one family, all ``ValueError``s, each message one line naming what is wrong and where."""


class JaxmergeError(ValueError):
    """Input that jaxmerge cannot use as it is: a hyperparameter, a tree, a checkpoint or a config.

    The message names the argument, model, leaf path, file, tensor or config key at fault.
    """


class ConfigError(JaxmergeError):
    """A merge config (YAML) or command-line option that cannot be used as it is."""


class CheckpointError(JaxmergeError):
    """A checkpoint or model directory that cannot be read, or an output that cannot be written."""
