"""Models named with a LoRA adapter, as mergekit names them: ``model+adapter``, or a mapping
``{model: ..., lora: ...}``.

As in mergekit, the adapter is applied to the model (PEFT's ``merge_and_unload``, by
:func:`jaxmerge.lora.apply_adapter`, tensor by tensor) into a directory of the LoRA merge
cache, named as mergekit names it (``<model>_<crc32>_<adapter>_<crc32>``), and the merge
reads that directory as a model of its own; a directory already there is reused as it is.
The model is read in the dtype transformers loads it in for PEFT: the one asked for
(mergekit's ``--lora-merge-dtype``), else its first float tensor's (see :func:`_loaded_dtype`).
"""

from __future__ import annotations

import binascii
import os
from pathlib import Path

from jaxmerge.cli.hub import resolve_model
from jaxmerge.errors import ConfigError


class AdaptedModels:
    """The models a command names with an adapter, by the directory each is applied in.

    Args:
      cache: the directory the adapted models are written in (None: a model named with an
        adapter is refused, as in a merge of several processes).
      dtype: the dtype to read the models in (default: as transformers loads them for mergekit).
      progress: show each application's progress bar.

    Attributes:
      pending: ``{applied directory: (model, adapter)}``.
      names: ``{applied directory: the reference as the config writes it}``, for messages
        and the model card.
    """

    def __init__(self, cache: Path | None, dtype: str | None = None, progress: bool = True):
        self.cache, self.dtype, self.progress = cache, dtype, progress
        self.pending: dict[Path, tuple[Path, Path]] = {}
        self.names: dict[Path, str] = {}

    def resolve(self, value, config_dir: Path, where: str) -> Path:
        """The directory of the model ``value`` names: its own, or the one its adapter is applied in."""
        model, adapter = split_reference(value, where)
        path = resolve_model(model, config_dir, where)
        if adapter is None:
            return path
        if self.cache is None:
            raise ConfigError(f"{where}: {model!r} is named with the adapter {adapter!r}, which this run does not "
                              "apply (a merge of several processes): apply it first (jaxmerge apply-adapter)")
        applied = self.cache / f"{_unique_id(model)}_{_unique_id(adapter)}"
        self.pending[applied] = (path, resolve_model(adapter, config_dir, f"{where} (its adapter)"))
        self.names[applied] = f"{model}+{adapter}"
        return applied

    def apply(self, output: Path, force: bool) -> None:
        """Apply each adapter whose model is not in the cache yet, once ``output`` is known to be
        writable (it may exist only with ``force``, and not overlap the cache); a cached model
        read in another dtype than the one asked for is reused, with a warning."""
        import warnings

        from jaxmerge.checkpoints.stream import StreamOptions, _check_destination
        from jaxmerge.errors import JaxmergeWarning
        from jaxmerge.lora import apply_adapter

        if self.pending:
            _check_destination(Path(output).absolute(), [self.cache], force)
        for applied, (model, adapter) in self.pending.items():
            if not applied.exists():
                read_as = self.dtype or _loaded_dtype(model)
                apply_adapter(model, adapter, applied, options=StreamOptions(dtype=read_as, out_dtype=read_as,
                                                                             progress=self.progress))
            elif self.dtype is not None and (cached := _loaded_dtype(applied)) != self.dtype:
                warnings.warn(f"{applied} holds {self.names[applied]} read in {cached}, not {self.dtype}: reused as "
                              "it is (delete it to apply the adapter again)", JaxmergeWarning, stacklevel=2)


def split_reference(value, where: str) -> tuple[str, str | None]:
    """``(model, adapter or None)`` of a model reference, as mergekit parses one."""
    if isinstance(value, dict) and "model" in value:
        unknown = sorted(set(value) - {"model", "lora", "override_architecture"})
        if unknown:
            raise ConfigError(f"{where}: a model mapping takes model and lora, not {unknown[0]!r}")
        return _path(value["model"], where), None if value.get("lora") is None else _path(value["lora"], where)
    chunks = str(value).split("+")
    if len(chunks) > 2:
        raise ConfigError(f"{where}: {value!r} is neither a model nor model+adapter (more than one '+')")
    return chunks[0], chunks[1] if len(chunks) == 2 else None


def _path(value, where: str) -> str:
    """A model path as mergekit writes it: ``path`` or ``{path: ..., revision: ...}``."""
    if isinstance(value, dict):
        if "path" not in value:
            raise ConfigError(f"{where}: a model path mapping needs a 'path', got {value!r}")
        return str(value["path"]) + (f"@{value['revision']}" if value.get("revision") else "")
    return str(value)


def _unique_id(path: str) -> str:
    """mergekit's name of a model in its LoRA merge cache: the path's last part and the CRC-32 of the path."""
    return f"{os.path.basename(path.split('@')[0])}_{binascii.crc32(path.encode())}"


def _loaded_dtype(model: Path) -> str | None:
    """The dtype transformers loads ``model`` in for mergekit, which passes ``torch_dtype=None``
    (so that the config's dtype is dropped too): its first float tensor's, by name, in its
    first file; None (each tensor's own) for an Orbax checkpoint."""
    import jax.numpy as jnp

    from jaxmerge.checkpoints.stream import open_checkpoint

    reader = open_checkpoint(model)
    if reader.format != "safetensors":
        return None
    first = min(info.file for info in reader.tensors.values())
    return next((reader.tensors[name].dtype.name for name in reader.names if reader.tensors[name].file == first
                 and jnp.issubdtype(reader.tensors[name].dtype, jnp.floating)), None)
