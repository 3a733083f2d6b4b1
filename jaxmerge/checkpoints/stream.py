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
import gc
import glob
import math
import os
import shutil
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxmerge import _libc
from jaxmerge._driver import run
from jaxmerge._signals import raise_if_received
from jaxmerge._tree import TreeSpec, flatten_models, is_float, leaf_spec
from jaxmerge.checkpoints.orbax import OrbaxReader, OrbaxWriter
from jaxmerge.checkpoints.safetensors import SafetensorsReader, SafetensorsWriter
from jaxmerge.errors import CheckpointError, JaxmergeError, JaxmergeWarning
from jaxmerge.merging.method import MergePlan

FORMATS = ("safetensors", "orbax")
READERS = 2  # threads reading one tensor's inputs from the models at once
COLLECT_BYTES = 64 << 20  # after a tensor this large, its buffers are freed at once (_release_memory)
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


def _abstract(reader, name: str, dtype=None) -> jax.ShapeDtypeStruct:
    """The shape and dtype of tensor ``name``, a float one in ``dtype`` when given.

    Raises:
      CheckpointError: the checkpoint has no tensor ``name``.
    """
    try:
        shape, stored = reader.shape_dtype(name)
    except KeyError:
        raise CheckpointError(f"{reader.path} has no tensor {name!r}") from None
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype) if dtype is not None and is_float(stored) else stored)


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_destination(output: Path, inputs: Sequence[Path], force: bool, read: Sequence[Path] = ()) -> None:
    """Refuse an output that overlaps an input directory or holds a file the merge reads
    (``read``: resolved, so a link into the output counts), or exists unless ``force``."""
    resolved = output.resolve()
    for source in inputs:
        if _inside(resolved, source.resolve()) or _inside(source.resolve(), resolved):
            raise CheckpointError(f"the output {output} would overlap the input {source}; choose another directory")
    for file in read:
        if _inside(file, resolved):
            raise CheckpointError(f"the output {output} holds {file}, which this merge reads (replacing the output "
                                  "would destroy it); choose another directory")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise CheckpointError(f"the output {output} exists and is not empty; replace it with --force (force=True)")


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
    """A fresh sibling of ``output`` to build it in, named after this process (no leading dot:
    Orbax's partial saves do not finalise into hidden directories). Staging directories of
    ``output`` left by processes that no longer run (a ``kill -9``) are removed first, each
    named in a :class:`~jaxmerge.errors.JaxmergeWarning`. Across processes every one must use
    the same path, so it is then fixed, and process 0 clears what a killed run may have left."""
    if jax.process_count() == 1:
        for stale in output.parent.glob(f"{glob.escape(output.name)}.jaxmerge-tmp-*"):
            pid = stale.name.rsplit(".jaxmerge-tmp-", 1)[1].split("-")[0]
            if stale.is_dir() and not stale.is_symlink() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
                warnings.warn(f"removed {stale}, left by an interrupted merge (process {pid})", JaxmergeWarning,
                              stacklevel=3)
        return output.with_name(f"{output.name}.jaxmerge-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging = output.with_name(f"{output.name}.jaxmerge-tmp")
    if jax.process_index() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    _barrier("jaxmerge-staging")
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


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
        raise_if_received()
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
    """The models' (and the base's) tensors read from checkpoints one at a time, the next ones
    read in a background thread while the current one is merged (unless large); in one
    process the models' copies of a tensor are read by ``READERS`` threads at once (reads from
    the page cache scale with cores: 17-19% off a linear or Model Stock merge of 0.63 GiB
    models on 2 cores).

    ``inputs[j][name]`` is the tensor of model ``j`` read for the output tensor ``name``
    (``base_inputs`` the base's); by default the same name.
    """

    def __init__(self, spec: TreeSpec, readers: list, base_reader, options: StreamOptions, inputs: Sequence[dict],
                 base_inputs: dict, vocabulary=None):
        self.spec, self.options, self.vocabulary = spec, options, vocabulary
        self.names = [key[0] for key in spec.keys]
        self.models = list(zip(readers, inputs))
        self.base = None if base_reader is None else (base_reader, base_inputs)

    def _load(self, source, name: str):
        reader, renamed = source
        return _load(reader, renamed.get(name, name), self.options.dtype, self.options.sharding)

    def _read(self, i: int):
        name = self.names[i]
        base = None if self.base is None else self._load(self.base, name)
        if not self.spec.is_float(i):
            return base, ([] if base is not None else [self._load(self.models[0], name)])
        models = list(self._readers.map(lambda source: self._load(source, name), self.models))
        if self.vocabulary is not None and name in self.vocabulary.names:
            models, base = self.vocabulary(models, base)
        return base, models

    def leaves(self):
        sizes = [self.spec.size(i) * leaf_spec(leaf).dtype.itemsize for i, leaf in enumerate(self.spec.leaves)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
                concurrent.futures.ThreadPoolExecutor(max_workers=_reader_threads()) as self._readers:
            upcoming = pool.submit(self._read, 0) if self.names else None
            _start_compiler()
            for i in range(len(self.names)):
                current = upcoming.result() if upcoming is not None else self._read(i)
                ahead = i + 1 < len(self.names) and sizes[i + 1] <= PREFETCH_BYTES  # bounds memory
                upcoming = pool.submit(self._read, i + 1) if ahead else None
                large = sizes[i] >= COLLECT_BYTES
                if large:
                    _TRIM_AFTER_COMPILING.set()
                try:
                    yield current
                finally:
                    _TRIM_AFTER_COMPILING.clear()
                del current
                if large:
                    _release_memory()


@jax.jit
def _successor(x):
    return x + 1


def _start_compiler() -> None:
    """Run a trivial kernel. A process's first kernel starts XLA's client and MLIR (0.04-0.1 s
    before any compilation), which then happens while the first tensor is read instead of
    after (linear merges of 0.63 GiB models: medians 1.91 -> 1.83 s, 12 alternating runs)."""
    jax.block_until_ready(_successor(np.float32(0)))


def _release_memory() -> None:
    """Free the last tensor's buffers now: JAX lets go of host buffers it wrapped when Python
    collects garbage, which a generation-0 collection does in well under a millisecond (a
    full one took 45 ms). Then trim the heap (:func:`_trim_heap`): XLA's compiler frees tens
    of MB of working memory that would otherwise stay resident while the next large tensor is
    merged."""
    gc.collect(0)
    _trim_heap()


def _trim_heap() -> None:
    """Give the memory glibc's allocator keeps after frees back to the system (``malloc_trim``)."""
    if _libc.MALLOC_TRIM is not None:
        _libc.MALLOC_TRIM(0)


_TRIM_AFTER_COMPILING = threading.Event()  # set while a large tensor is merged
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _trim_after_compiling(event: str, duration: float, **_) -> None:
    """While a large tensor is merged, give the working memory XLA's compiler has just freed
    back to the system before the new kernel runs on the tensor's inputs (:func:`_trim_heap`).
    Only then: a trim hands back every free page of the heap, which the next allocations must
    fault in again."""
    if event == _COMPILE_EVENT and _TRIM_AFTER_COMPILING.is_set():
        _trim_heap()


jax.monitoring.register_event_duration_secs_listener(_trim_after_compiling)


def _reader_threads() -> int:
    """Threads reading a tensor's copies at once: one across processes, where every process
    must start Orbax's collective reads in the same order."""
    return READERS if jax.process_count() == 1 else 1


class WriterSink:
    """Writes the merged tensors of one group, each cast to its output dtype, advancing the
    merge's shared progress bar and logging a line per tensor."""

    def __init__(self, writer, names: list[str], out_types: dict, bar: tqdm, log: Callable[[str], None] | None):
        self.writer, self.names, self.out_types, self.bar, self.log = writer, names, out_types, bar, log

    def write(self, i: int, merged) -> None:
        raise_if_received()
        name = self.names[i]
        if merged.dtype != self.out_types[name]:
            merged = _narrowed(merged, self.out_types[name], name)
        self.writer.write(name, merged)
        self.bar.update(merged.size * merged.dtype.itemsize)
        if self.log is not None and jax.process_index() == 0:
            self.log(f"merged {name} {tuple(merged.shape)} {merged.dtype}")

    def close(self) -> None:
        """Nothing to finish: the writer is closed once every group is written."""


def _narrowed(array, dtype: np.dtype, name: str):
    """``array`` cast to ``dtype``, refusing a cast that turns finite values into infinities
    (float16's range ends at 65504)."""
    cast = array.astype(dtype)
    if np.issubdtype(dtype, np.floating) and is_float(array.dtype) and not bool(jax.numpy.isfinite(cast).all()):
        if bool(jax.numpy.isfinite(array).all()):
            largest = float(jax.numpy.abs(array).max())
            raise CheckpointError(f"tensor {name!r} holds {largest:.6g}, beyond the range of {dtype} "
                                  f"(largest {float(ml_dtypes.finfo(dtype).max):.6g}); write float32 or bfloat16")
    return cast


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
    group = Group(plan, tuple(models), base=base, statistics=None if statistics is None else tuple(statistics),
                  model_names=None if model_names is None else tuple(model_names))
    return stream_groups([group], output, options=options, extra_files=extra_files)


@dataclasses.dataclass(frozen=True)
class Group:
    """Output tensors that one plan merges from the same checkpoints (see :func:`stream_groups`).

    Attributes:
      plan: the method and its hyperparameters.
      models: the checkpoints merged.
      base: the base checkpoint, for methods that take one.
      outputs: the output tensors' names (default: every tensor of the base, else of the
        first model).
      inputs: per model, ``{output name: the name of the tensor read for it}`` (default: the
        same name), e.g. to renumber layers.
      base_inputs: the same for the base.
      positions: ``{output name: t}``, each tensor's position for layer gradients (default:
        read from the names).
      statistics: one statistics checkpoint per model (``fisher``, ``regmean``).
      model_names: the models' names in error messages (default: their paths).
      vocabulary: rewrites the rows (axis 0) of the tensors it names before they are merged,
        jointly over the models (e.g. onto a merged tokenizer's vocabulary): an object with
        ``names`` (tensor names), ``rows`` (their rows afterwards) and ``__call__(models,
        base) -> (models, base)`` over the tensors read.
    """

    plan: MergePlan
    models: tuple
    base: Any = None
    outputs: tuple | None = None
    inputs: tuple | None = None
    base_inputs: dict | None = None
    positions: dict | None = None
    statistics: tuple | None = None
    model_names: tuple | None = None
    vocabulary: Any = None


class _Planned:
    """A group bound to its open readers: the spec of its output tensors and its leaf function."""

    def __init__(self, group: Group, open_reader: Callable, options: StreamOptions):
        readers = [open_reader(m) for m in group.models]
        base_reader = None if group.base is None else open_reader(group.base)
        names = list(group.model_names) if group.model_names is not None else [str(m) for m in group.models]
        wanted = set(group.outputs) if group.outputs is not None else set().union(
            *(r.names for r in [*readers, base_reader] if r is not None))
        inputs = [_untied(r, wanted, renamed) for r, renamed in zip(readers, group.inputs or [{}] * len(readers))]
        base_inputs = None if base_reader is None else _untied(base_reader, wanted, group.base_inputs or {})

        def shapes(reader, renamed: dict) -> dict:
            """The reader's tensors under the output names (all of them, when the group names none:
            then a tensor that one model lacks or has extra is an error naming it)."""
            outputs = [*reader.names, *(n for n in renamed if n not in reader.names)] if group.outputs is None \
                else group.outputs
            return {out: _rows(_abstract(reader, renamed.get(out, out), options.dtype), out, group.vocabulary)
                    for out in outputs}

        self.spec, _, _ = flatten_models([shapes(r, inputs[j]) for j, r in enumerate(readers)],
                                         None if base_reader is None else shapes(base_reader, base_inputs),
                                         names=names)
        self.names = [key[0] for key in self.spec.keys]
        reference = base_reader or readers[0]
        stores = None if group.statistics is None else [_StatisticsStore(open_reader(s), options.sharding)
                                                         for s in group.statistics]
        positions = None if group.positions is None else [group.positions[n] for n in self.names]
        renames = {} if group.inputs is None else {  # a plan of a group without renames may not take them
            "input_paths": [[renamed.get(n, n) for n in self.names] for renamed in group.inputs]}
        self.leaf_fn = group.plan.leaf_fn(self.spec, stores, names, positions, **renames)
        self.source = CheckpointSource(self.spec, readers, base_reader, options, inputs, base_inputs or {},
                                       group.vocabulary)
        renamed = base_inputs if base_reader is not None else inputs[0]
        self.stored = {n: reference.shape_dtype(renamed.get(n, n))[1] for n in self.names}  # not narrowed by JAX
        self.reference = reference


# Where a checkpoint whose embeddings are tied keeps the output embedding it leaves out: the
# tied names of mergekit's architecture definitions.
TIED_EMBEDDINGS = {
    "lm_head.weight": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight",
                       "wte.weight", "backbone.embeddings.weight", "shared.weight"),
    "output.weight": ("model.tok_embeddings.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight",),
}


def _untied(reader, wanted: set, renamed: dict) -> dict:
    """``renamed`` (output name -> the reader's tensor), plus the reader's input embedding for
    an output embedding that another model has and this one leaves out because its embeddings
    are tied, as mergekit reads it."""
    present = set(reader.names)
    tied = {}
    for out in wanted - present - set(renamed):
        stand_in = next((t for t in TIED_EMBEDDINGS.get(out, ()) if t in present), None)
        if stand_in is not None:
            tied[out] = stand_in
    return {**tied, **renamed}


def _rows(abstract: jax.ShapeDtypeStruct, name: str, vocabulary) -> jax.ShapeDtypeStruct:
    """A tensor's shape after ``vocabulary`` rewrites its rows (unchanged if it does not)."""
    if vocabulary is None or name not in vocabulary.names or not abstract.shape:
        return abstract
    return jax.ShapeDtypeStruct((vocabulary.rows, *abstract.shape[1:]), abstract.dtype)


def stream_groups(groups: Sequence[Group], output: str | os.PathLike, *, options: StreamOptions = StreamOptions(),
                  extra_files: dict[str, str | None] | None = None, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Merge groups of tensors of checkpoints on disk into one output checkpoint, tensor by tensor.

    Each :class:`Group` is merged as :func:`stream_merge` merges its models, under its own
    output names: a merge config's slices (layers of other models, or stacked and repeated
    layers) are groups. Every group is checked before the output is created; the first
    group's reference (base, else first model) gives the output format and the non-weight
    files copied into it.

    Args:
      groups: the groups, whose output names must not repeat.
      output: the directory to create.
      options: how to read and write (:class:`StreamOptions`).
      extra_files: ``{file name: text}`` to write into the output too, replacing a copied file
        (None: leave that file out).
      inputs: other files the merge reads (e.g. its config), which the output must not hold.

    Returns:
      The output path.

    Raises:
      CheckpointError, JaxmergeError: as :func:`stream_merge`, or an output name given by two
        groups.
    """
    output = Path(output).absolute()
    opened: dict[Path, Any] = {}

    def open_reader(path):
        if Path(path) not in opened:
            opened[Path(path)] = open_checkpoint(path)
        return opened[Path(path)]

    if not groups:
        raise JaxmergeError("nothing to merge: no group of tensors")
    planned = [_Planned(group, open_reader, options) for group in groups]
    names = [n for p in planned for n in p.names]
    if not names:
        raise JaxmergeError("nothing to merge: the models hold no tensors")
    if len(set(names)) != len(names):
        raise JaxmergeError(f"the output tensor {next(n for n in names if names.count(n) > 1)!r} comes from two slices")
    reference = planned[0].reference
    output_format = options.output_format or reference.format
    if output_format not in FORMATS:
        raise JaxmergeError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if jax.process_count() > 1 and output_format != "orbax":
        raise JaxmergeError("a merge across several processes writes an Orbax checkpoint: pass output_format='orbax'")
    read = [f for reader in opened.values() for f in reader.files()] + [Path(f).resolve() for f in inputs]
    _check_destination(output, list(opened), options.force, read)
    out_types = {n: _out_type(p.stored[n], options) for p in planned for n in p.names}
    shapes = {n: leaf_spec(leaf).shape for p in planned for n, leaf in zip(p.names, p.spec.leaves)}

    treedef = reference.treedef if names == reference.names else None
    with _written(output, [(n, shapes[n], out_types[n]) for n in names], output_format, reference, extra_files,
                  options.max_shard_size, treedef) as writer:
        total = sum(math.prod(shapes[n]) * out_types[n].itemsize for n in names)
        with tqdm(total=total, unit="B", unit_scale=True, desc="merging", file=sys.stderr,
                  disable=not options.progress or jax.process_index() != 0) as bar:
            for p in planned:
                run(p.spec, p.leaf_fn, p.source, WriterSink(writer, p.names, out_types, bar, options.log))
    return output


@contextlib.contextmanager
def _written(output: Path, tensors: Sequence[tuple[str, tuple, np.dtype]], output_format: str, reference,
             extra_files: dict[str, str | None] | None, max_shard_size: int | str, treedef=None) -> Iterator[Any]:
    """A writer of ``tensors`` (name, shape, dtype) into a staging directory of ``output``;
    when the block ends, the reference's non-weight files and ``extra_files`` are added and
    the directory is committed (removed instead if the block raises)."""
    names = [name for name, _, _ in tensors]
    with staged(output) as staging:
        if output_format == "safetensors":
            staging.path.mkdir(parents=True)
            staging.writer = SafetensorsWriter(staging.path, tensors, max_shard_size)
        else:
            staging.path.parent.mkdir(parents=True, exist_ok=True)
            staging.writer = OrbaxWriter(staging.path, treedef or jax.tree.structure(dict.fromkeys(names, 0)), names)
        yield staging.writer
        staging.writer.close()
        if jax.process_index() == 0:
            for extra in reference.extra_files():
                if not (staging.path / extra.name).exists() and extra.name not in (extra_files or {}):
                    shutil.copy2(extra, staging.path / extra.name)
            for file_name, text in (extra_files or {}).items():
                if text is not None:
                    (staging.path / file_name).write_text(text, encoding="utf-8")


def stream_tensors(tensors: Sequence[tuple[str, tuple, Any]], compute: Callable[[str], Any],
                   output: str | os.PathLike, *, readers: Sequence,
                   options: StreamOptions = StreamOptions(), extra_files: dict[str, str | None] | None = None,
                   inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write tensors computed one at a time into a new checkpoint, with a merge's safety rules.

    For outputs that are not leafwise merges (e.g. experts stacked into one tensor): the
    output is built in a staging directory and renamed into place when complete, refused if
    it would overlap a file read, and gets the first checkpoint's non-weight files.

    Args:
      tensors: ``(name, shape, dtype)`` of every output tensor, in the order written.
      compute: ``compute(name)`` returns that tensor (cast to its dtype if it is not).
      output: the directory to create.
      readers: the open checkpoints ``compute`` reads (:func:`open_checkpoint`); the first
        is the reference whose format and non-weight files the output takes.
      options: ``force``, ``max_shard_size``, ``output_format``, ``progress`` and ``log`` are used.
      extra_files: ``{file name: text}`` written into the output, replacing a copied file.
      inputs: other files read (e.g. a config).

    Returns:
      The output path.
    """
    output = Path(output).absolute()
    reference = readers[0]
    read = [f for reader in readers for f in reader.files()] + [Path(f).resolve() for f in inputs]
    _check_destination(output, [reader.path for reader in readers], options.force, read)
    tensors = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in tensors]
    with _written(output, tensors, options.output_format or reference.format, reference, extra_files,
                  options.max_shard_size) as writer:
        for name, shape, dtype in tqdm(tensors, desc="writing", unit="tensor", file=sys.stderr,
                                       disable=not options.progress):
            raise_if_received()
            value = compute(name)
            if tuple(value.shape) != shape:
                raise JaxmergeError(f"{name!r} was computed as {tuple(value.shape)}, planned as {shape}")
            writer.write(name, value if value.dtype == dtype else _narrowed(value, dtype, name))
            if options.log is not None:
                options.log(f"wrote {name} {shape} {dtype}")
    return output


def _out_type(stored: np.dtype, options: StreamOptions) -> np.dtype:
    """A tensor's written dtype: a float tensor in ``out_dtype``, else ``dtype``, else as stored."""
    return np.dtype(options.out_dtype or options.dtype or stored) if is_float(stored) else stored
