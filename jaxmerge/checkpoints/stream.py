"""The streaming merge driver: any leafwise merge over checkpoints on disk, tensor by tensor.

For each tensor name it reads that tensor from the base and every model, runs the merge's
leaf function (the same one the in-memory functions use, through the same driver,
:func:`jaxmerge._driver.run`), and writes the result straight into its planned place in the
output; the next tensors are read in a background thread meanwhile. Peak memory is
therefore a few tensors per model, not whole models.

The output is built in a temporary directory next to the destination and renamed into
place only when complete, so an error, a kill or Ctrl-C leaves no partial output; an
existing non-empty destination is replaced only with ``force``; a destination inside an
input (or containing one) is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from tqdm import tqdm

from jaxmerge._driver import run
from jaxmerge._tree import TreeSpec, flatten_models, is_float, leaf_spec
from jaxmerge.checkpoints.orbax import OrbaxReader, OrbaxWriter
from jaxmerge.checkpoints.safetensors import SafetensorsReader, SafetensorsWriter
from jaxmerge.errors import CheckpointError, JaxmergeError
from jaxmerge.merging.method import MergePlan

FORMATS = ("safetensors", "orbax")
PREFETCH_BYTES = 64 * 2 ** 20  # read the next tensor during the current merge when it is at most this big


def open_checkpoint(path: str | os.PathLike):
    """A lazy reader for an Orbax checkpoint directory or a safetensors file or directory.

    A directory with ``_CHECKPOINT_METADATA`` is opened as Orbax (:class:`OrbaxReader`),
    anything else as safetensors (:class:`SafetensorsReader`). Only metadata and headers are
    read; the reader then gives each tensor's names, shape and dtype, and reads one tensor
    at a time.

    Args:
      path: an Orbax checkpoint directory, or a safetensors file or directory.

    Returns:
      An :class:`OrbaxReader` or a :class:`SafetensorsReader`, with ``format``, ``names``,
      ``shape_dtype(name)``, ``read(name, sharding)`` and ``tree_of(values)``.

    Raises:
      CheckpointError: ``path`` does not exist, or is not a readable checkpoint of either
        format (naming the file and what is wrong).

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> tree = {"layer": {"kernel": jnp.ones((2, 2))}}
      >>> for fmt in ("orbax", "safetensors"):
      ...     reader = jaxmerge.checkpoints.open_checkpoint(jaxmerge.checkpoints.save(tmp / fmt, tree, format=fmt))
      ...     print(reader.format, reader.names, reader.read("layer/kernel").sum().item())
      orbax ['layer/kernel'] 4.0
      safetensors ['layer/kernel'] 4.0
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "_CHECKPOINT_METADATA").exists():
        return OrbaxReader(path)
    return SafetensorsReader(path)


def abstract(reader, dtype=None) -> dict:
    """``{tensor name: jax.ShapeDtypeStruct}``, float tensors in ``dtype`` when given."""
    out = {}
    for name in reader.names:
        shape, stored = reader.shape_dtype(name)
        out[name] = jax.ShapeDtypeStruct(shape, np.dtype(dtype) if dtype is not None and is_float(stored) else stored)
    return out


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_destination(output: Path, inputs: Sequence[Path], force: bool) -> None:
    resolved = output.resolve()
    for source in inputs:
        if _inside(resolved, source.resolve()) or _inside(source.resolve(), resolved):
            raise CheckpointError(f"the output {output} would overlap the input {source}; choose another directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise CheckpointError(f"the output {output} exists and is not empty; pass force=True (--force) to replace it")


def _load(reader, name: str, dtype, sharding) -> jax.Array | np.ndarray:
    """One tensor, placed and (if float and ``dtype`` is given) cast. A 64-bit tensor that
    JAX cannot hold without x64 stays NumPy if it is not a float (it is only passed
    through), is cast on the host if a ``dtype`` is given, and is an error otherwise."""
    if callable(sharding):
        sharding = sharding(name, reader.shape_dtype(name)[0])
    array = reader.read(name, sharding)
    if isinstance(array, np.ndarray) and is_float(array.dtype):
        if dtype is None:
            raise CheckpointError(f"{reader.path}: tensor {name!r} is {array.dtype}, which JAX holds only with x64 "
                                  "enabled; set JAX_ENABLE_X64=1 or cast it (dtype: float32)")
        array = jax.device_put(array.astype(dtype), sharding)
    if dtype is not None and is_float(array.dtype):
        array = array.astype(dtype)
    return array


def staging_path(output: Path) -> Path:
    """A fresh sibling of ``output`` to build it in (no leading dot: Orbax's partial saves
    do not finalise into hidden directories). Across processes every one must use the same
    path, so it is then fixed, and process 0 clears what a killed run may have left."""
    if jax.process_count() == 1:
        return output.with_name(f"{output.name}.jaxmerge-tmp-{uuid.uuid4().hex[:8]}")
    staging = output.with_name(f"{output.name}.jaxmerge-tmp")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier("jaxmerge-staging")
    return staging


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def largest_axes_sharding(mesh: jax.sharding.Mesh) -> Callable[[str, tuple], jax.sharding.NamedSharding]:
    """A per-tensor sharding rule for ``mesh``, sharding each tensor along its largest axes.

    For a tensor of shape ``shape``, each mesh axis, in the mesh's order, shards the largest
    tensor axis not yet sharded whose size it divides; a mesh axis that divides none of
    them leaves the tensor replicated along it. Pass the rule as ``sharding`` to
    :func:`load` or to :class:`StreamOptions` to place every tensor of a checkpoint
    without naming them.

    Args:
      mesh: the device mesh to shard over.

    Returns:
      ``rule(name, shape) -> jax.sharding.NamedSharding`` over ``mesh`` (``name`` is not
      used: the rule depends on the shape only).

    Examples:
      >>> import jax
      >>> from jaxmerge.checkpoints import largest_axes_sharding
      >>> mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))  # sizes only, no devices
      >>> rule = largest_axes_sharding(mesh)
      >>> tuple(rule("w", (8, 12)).spec)  # data (2) takes the 12 axis, model (4) the 8 axis
      ('model', 'data')
      >>> tuple(rule("w", (6, 6)).spec), tuple(rule("b", (3,)).spec)  # model divides neither 6
      (('data', None), (None,))
    """
    def rule(name: str, shape: tuple) -> jax.sharding.NamedSharding:
        spec: list = [None] * len(shape)
        for axis_name, size in mesh.shape.items():
            free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % size == 0 and shape[d] >= size]
            if free:
                spec[max(free, key=lambda d: shape[d])] = axis_name
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return rule


class Staging:
    """A directory to build ``output`` in (:func:`staged`); ``writer`` is aborted on failure."""

    def __init__(self, output: Path):
        self.output, self.path, self.writer = output, staging_path(output), None


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Staging]:
    """Build ``output`` in a staging directory: committed (renamed into place) when the
    block ends normally, removed, with its writer aborted, when it raises (Ctrl-C too)."""
    missing = next((p for p in reversed(output.parents) if not p.exists()), None)  # made here, removed on failure
    staging = Staging(output)
    try:
        yield staging
        _commit(staging.path, output)
    except BaseException:
        if staging.writer is not None:
            staging.writer.abort()
        shutil.rmtree(staging.path, ignore_errors=True)
        if missing is not None:
            shutil.rmtree(missing, ignore_errors=True)
        raise


def _commit(staging: Path, output: Path) -> None:
    """Move the finished ``staging`` directory to ``output``, replacing an old one last
    (by process 0 only, between barriers, when there are several processes)."""
    _barrier("jaxmerge-written")
    if jax.process_index() == 0:
        _replace(staging, output)
    _barrier("jaxmerge-committed")


def _replace(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        old.unlink() if old.is_symlink() or not old.is_dir() else shutil.rmtree(old)


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How :func:`stream_merge` reads and writes.

    Attributes:
      dtype: cast float inputs to this dtype when reading (mergekit's ``dtype``); the merge
        itself accumulates in float32.
      out_dtype: dtype of the written float tensors (default: ``dtype``, else the
        reference's dtype per tensor).
      output_format: ``'safetensors'`` or ``'orbax'`` (default: the reference's format).
      max_shard_size: safetensors shard size limit, bytes or ``'5GB'``.
      force: replace an existing non-empty output.
      progress: show a tqdm progress bar (bytes and tensors) on stderr.
      sharding: place every tensor with this sharding before merging, or a rule
        ``rule(name, shape) -> Sharding`` such as :func:`largest_axes_sharding` (mesh);
        Orbax inputs are then read shard by shard, each process reading only its own.
        With several processes (``jax.distributed``), every process calls
        :func:`stream_merge` and the output must be Orbax.
      log: called with one line per merged tensor.

    Examples:
      >>> from jaxmerge.checkpoints import StreamOptions
      >>> StreamOptions(dtype="bfloat16", force=True).max_shard_size
      '5GB'
    """

    dtype: Any = None
    out_dtype: Any = None
    output_format: Literal["safetensors", "orbax"] | None = None
    max_shard_size: int | str = "5GB"
    force: bool = False
    progress: bool = True
    sharding: Any = None
    log: Callable[[str], None] | None = None


class CheckpointSource:
    """The models' (and the base's) tensors read from checkpoints one name at a time, the next
    ones read in a background thread while the current one is merged (unless large)."""

    def __init__(self, spec: TreeSpec, readers: list, base_reader, options: StreamOptions):
        self.spec, self.readers, self.base_reader, self.options = spec, readers, base_reader, options
        self.names = [key[0] for key in spec.keys]

    def _read(self, i: int):
        name, options = self.names[i], self.options
        base = None if self.base_reader is None else _load(self.base_reader, name, options.dtype, options.sharding)
        if not self.spec.is_float(i):
            return base, ([] if base is not None else [_load(self.readers[0], name, options.dtype, options.sharding)])
        return base, [_load(r, name, options.dtype, options.sharding) for r in self.readers]

    def leaves(self):
        sizes = [self.spec.size(i) * leaf_spec(leaf).dtype.itemsize for i, leaf in enumerate(self.spec.leaves)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = pool.submit(self._read, 0) if self.names else None
            for i in range(len(self.names)):
                current = upcoming.result() if upcoming is not None else self._read(i)
                ahead = i + 1 < len(self.names) and sizes[i + 1] <= PREFETCH_BYTES  # bounds memory
                upcoming = pool.submit(self._read, i + 1) if ahead else None
                yield current
                del current


class WriterSink:
    """Writes each merged tensor, cast to its output dtype, with a progress bar and a log line."""

    def __init__(self, writer, tensors: list[tuple[str, tuple]], out_types: dict, options: StreamOptions):
        self.writer, self.names, self.out_types, self.log = writer, [n for n, _ in tensors], out_types, options.log
        self.sizes = [math.prod(shape) * out_types[n].itemsize for n, shape in tensors]
        self.bar = tqdm(total=sum(self.sizes), unit="B", unit_scale=True, desc="merging", file=sys.stderr,
                        disable=not options.progress or jax.process_index() != 0)

    def write(self, i: int, merged) -> None:
        name = self.names[i]
        if merged.dtype != self.out_types[name]:
            merged = merged.astype(self.out_types[name])
        self.writer.write(name, merged)
        self.bar.update(self.sizes[i])
        self.bar.set_postfix_str(f"{i + 1}/{len(self.names)} tensors")
        if self.log is not None and jax.process_index() == 0:
            self.log(f"merged {name} {tuple(merged.shape)} {merged.dtype}")

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class _StatisticsStore:
    """A statistics checkpoint as a :class:`~jaxmerge._driver.Store`, tensors placed like the models'."""

    def __init__(self, reader, sharding):
        self.reader, self.sharding, self.names = reader, sharding, reader.names
        self.shape_dtype = reader.shape_dtype

    def read(self, name: str):
        return _load(self.reader, name, None, self.sharding)


def stream_merge(plan: MergePlan, models: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                 base: str | os.PathLike | None = None, statistics: Sequence[str | os.PathLike] | None = None,
                 options: StreamOptions = StreamOptions(), extra_files: dict[str, str] | None = None,
                 model_names: Sequence[str] | None = None) -> Path:
    """Merge checkpoints on disk into ``output``, one tensor at a time.

    The same merge as the in-memory function, read and written tensor by tensor: peak
    memory is a few tensors per model, not whole models. The output is built in a staging
    directory next to ``output`` and renamed into place when complete.

    Args:
      plan: the method and its hyperparameters, from :func:`jaxmerge.plan` (e.g.
        ``jaxmerge.plan('ties', weights=[1.0, 0.5], density=0.5)``); they are checked
        against the tensors' names, shapes and dtypes before anything is written.
      models: checkpoint paths (safetensors files or directories, Orbax directories); for
        a ``'pair'`` method (slerp) the two models, the first one ``t = 0``.
      output: the directory to create.
      base: the base checkpoint, for methods that take one.
      statistics: one statistics checkpoint per model (Fisher or Gram, as written by
        :func:`jaxmerge.checkpoints.save`), for ``fisher`` and ``regmean``.
      options: how to read and write (:class:`StreamOptions`).
      extra_files: ``{file name: text}`` to write into the output too (e.g. the config).
      model_names: the models' names in error messages (default: their paths).

    Returns:
      The output path. The reference (base, else the first model) also gives the non-weight
      files copied into the output (config.json, tokenizer files, ...).

    Raises:
      CheckpointError: unreadable inputs, or a bad destination.
      JaxmergeError: tensors missing or of other shapes in some model (naming the
        checkpoint and the tensor), or the plan's own checks; in every case before the
        output directory is created.

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> paths = [jaxmerge.checkpoints.save(tmp / f"m{i}", {"w": jnp.full(3, float(i))}, format="safetensors")
      ...          for i in range(2)]
      >>> out = jaxmerge.checkpoints.stream_merge(jaxmerge.plan("linear"), paths, tmp / "avg",
      ...                                         options=jaxmerge.checkpoints.StreamOptions(progress=False))
      >>> jaxmerge.checkpoints.load(out)["w"].tolist()
      [0.5, 0.5, 0.5]
    """
    output = Path(output).absolute()
    readers = [open_checkpoint(m) for m in models]
    base_reader = open_checkpoint(base) if base is not None else None
    stat_readers = None if statistics is None else [open_checkpoint(s) for s in statistics]
    reference = base_reader or readers[0]
    output_format = options.output_format or reference.format
    if output_format not in FORMATS:
        raise JaxmergeError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if jax.process_count() > 1 and output_format != "orbax":
        raise JaxmergeError("a merge across several processes writes an Orbax checkpoint: pass output_format='orbax'")
    inputs = [Path(m) for m in models] + [Path(p) for p in [base, *(statistics or [])] if p is not None]
    _check_destination(output, inputs, options.force)
    names = list(model_names) if model_names is not None else [str(m) for m in models]
    source_spec, _, _ = flatten_models([abstract(r, options.dtype) for r in readers],
                                       None if base_reader is None else abstract(base_reader, options.dtype),
                                       names=names)
    stores = None if stat_readers is None else [_StatisticsStore(r, options.sharding) for r in stat_readers]
    leaf_fn = plan.leaf_fn(source_spec, stores, names)
    tensors = [(key[0], leaf_spec(leaf).shape) for key, leaf in zip(source_spec.keys, source_spec.leaves)]
    out_types = _out_types(reference, [name for name, _ in tensors], options)

    with staged(output) as staging:
        if output_format == "safetensors":
            staging.path.mkdir(parents=True)
            staging.writer = SafetensorsWriter(staging.path, [(n, shape, out_types[n]) for n, shape in tensors],
                                               options.max_shard_size)
        else:
            staging.path.parent.mkdir(parents=True, exist_ok=True)
            staging.writer = OrbaxWriter(staging.path, reference.treedef, reference.names)
        run(source_spec, leaf_fn, CheckpointSource(source_spec, readers, base_reader, options),
            WriterSink(staging.writer, tensors, out_types, options))
        if jax.process_index() == 0:
            for extra in reference.extra_files():
                if not (staging.path / extra.name).exists():
                    shutil.copy2(extra, staging.path / extra.name)
            for file_name, text in (extra_files or {}).items():
                (staging.path / file_name).write_text(text)
    return output


def _out_types(reference, names: list[str], options: StreamOptions) -> dict:
    """Each tensor's written dtype: float tensors in ``out_dtype``, else ``dtype``, else as stored."""
    out = {}
    for name in names:
        stored = reference.shape_dtype(name)[1]  # not narrowed by JAX
        out[name] = np.dtype(options.out_dtype or options.dtype or stored) if is_float(stored) else stored
    return out
