"""jaxmerge's errors: one family, all ``ValueError``s, each message one line naming what is wrong and where."""


class JaxmergeError(ValueError):
    """Input that jaxmerge cannot use as it is: a hyperparameter, a tree, a checkpoint or a config.

    The message names the argument, model, leaf path, file, tensor or config key at fault.

    Examples:
      >>> import jax.numpy as jnp, jaxmerge
      >>> try:
      ...     jaxmerge.ties(None, [{"w": jnp.ones(2)}])
      ... except jaxmerge.JaxmergeError as error:
      ...     print(error)
      ties needs a base model (base is None)
    """


class ConfigError(JaxmergeError):
    """A merge config (YAML) or command-line option that cannot be used as it is.

    Examples:
      >>> from jaxmerge.cli.config import load_config
      >>> try:
      ...     load_config("no-such-config.yaml")
      ... except ConfigError as error:
      ...     print(error)
      no-such-config.yaml: config file does not exist
    """


class CheckpointError(JaxmergeError):
    """A checkpoint or model directory that cannot be read, or an output that cannot be written.

    Examples:
      >>> import jaxmerge
      >>> try:
      ...     jaxmerge.checkpoints.open_checkpoint("no-such-model")
      ... except jaxmerge.CheckpointError as error:
      ...     print(error)
      no-such-model: no such file or directory
    """


class JaxmergeWarning(UserWarning):
    """Something jaxmerge skipped or changed on the way, said once (the command prints it as
    ``jaxmerge: warning: ...``): a linked file not copied, a stale staging directory removed."""
