"""The streaming merge driver: any leafwise merge over checkpoints on disk, tensor by tensor.

For each tensor name it reads that tensor from the base and every model, runs the merge's
leaf function (the same one the in-memory functions use), and writes the result straight
into its planned place in the output; the next tensors are read in a background thread
meanwhile. Peak memory is therefore a few tensors per model, not whole models.

The output is built in a temporary directory next to the destination and renamed into
place only when complete, so an error, a kill or Ctrl-C leaves no partial output; an
existing non-empty destination is replaced only with ``force``; a destination inside an
input (or containing one) is refused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmerge._tree import TreeSpec, flatten_models, is_float
from jaxmerge.checkpoints.errors import CheckpointError
from jaxmerge.checkpoints.orbax import OrbaxReader, OrbaxWriter
from jaxmerge.checkpoints.safetensors import SafetensorsReader, SafetensorsWriter

FORMATS = ("safetensors", "orbax")
PREFETCH_BYTES = 64 * 2 ** 20  # read the next tensor during the current merge when it is at most this big


def open_checkpoint(path: str | os.PathLike):
    """A lazy reader for an Orbax checkpoint directory or a safetensors file or directory."""
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
    """A per-tensor sharding rule for ``mesh``: each mesh axis, in order, shards the largest
    tensor axis not yet sharded that it divides; tensors it divides nowhere stay replicated
    along it. ``rule(name, shape) -> NamedSharding``."""
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


def stream_merge(plan: Callable[[TreeSpec], Callable], models: Sequence[str | os.PathLike],
                 output: str | os.PathLike, *, base: str | os.PathLike | None = None, dtype=None, out_dtype=None,
                 output_format: str | None = None, max_shard_size: int | str = "5GB", force: bool = False,
                 progress: bool = True, sharding: jax.sharding.Sharding | None = None,
                 log: Callable[[str], None] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Merge checkpoints on disk into ``output``, one tensor at a time.

    Args:
      plan: ``plan(spec) -> leaf_fn``, e.g. ``lambda spec: jaxmerge.merging.task_vectors.
        task_vector_plan(spec, weights, method='magnitude', consensus='sum', density=0.5,
        normalize=True)``; it validates its hyperparameters against the tensors' names,
        shapes and dtypes before anything is written.
      models: checkpoint paths (safetensors files or directories, Orbax directories).
      output: the directory to create.
      base: the base checkpoint, for methods that need one.
      dtype: cast float inputs to this dtype when reading (mergekit's ``dtype``); the merge
        itself accumulates in float32.
      out_dtype: dtype of the written float tensors (default: ``dtype``, else the
        reference's dtype per tensor).
      output_format: ``'safetensors'`` or ``'orbax'`` (default: the reference's format).
      max_shard_size: safetensors shard size limit, bytes or ``'5GB'``.
      force: replace an existing non-empty ``output``.
      progress: show a tqdm progress bar (bytes and tensors) on stderr.
      sharding: place every tensor with this sharding before merging, or a rule
        ``rule(name, shape) -> Sharding`` such as :func:`largest_axes_sharding` (mesh);
        Orbax inputs are then read shard by shard, each process reading only its own.
        With several processes (``jax.distributed``), every process calls this function
        and the output must be Orbax.
      log: called with one line per merged tensor.
      extra_files: ``{file name: text}`` to write into the output too (e.g. the config).

    Returns:
      The output path. The reference (base, else the first model) also gives the non-weight
      files copied into the output (config.json, tokenizer files, ...).

    Raises:
      CheckpointError, ValueError: unreadable inputs, tensors missing or of other shapes in
        some model (naming the checkpoint and the tensor), a bad destination, or the
        plan's own checks; in every case before the output directory is created.
    """
    output = Path(output).absolute()
    paths = [Path(m) for m in models] + ([Path(base)] if base is not None else [])
    readers = [open_checkpoint(m) for m in models]
    base_reader = open_checkpoint(base) if base is not None else None
    reference = base_reader or readers[0]
    output_format = output_format or reference.format
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if jax.process_count() > 1 and output_format != "orbax":
        raise ValueError("a merge across several processes writes an Orbax checkpoint: pass output_format='orbax'")
    _check_destination(output, paths, force)
    spec, _, _ = flatten_models([abstract(r, dtype) for r in readers],
                                None if base_reader is None else abstract(base_reader, dtype),
                                names=[str(m) for m in models])
    leaf_fn = plan(spec)
    names = [key[0] for key in spec.keys]
    stored = {name: reference.shape_dtype(name)[1] for name in names}  # not narrowed by JAX
    out_types = {name: np.dtype(out_dtype or dtype or stored[name]) if is_float(stored[name]) else stored[name]
                 for name in names}

    with staged(output) as staging:
        if output_format == "safetensors":
            staging.path.mkdir(parents=True)
            staging.writer = SafetensorsWriter(
                staging.path, [(n, spec.leaves[i].shape, out_types[n]) for i, n in enumerate(names)], max_shard_size)
        else:
            staging.path.parent.mkdir(parents=True, exist_ok=True)
            staging.writer = OrbaxWriter(staging.path, reference.treedef, reference.names)
        _merge_all(spec, names, leaf_fn, readers, base_reader, staging.writer, out_types, dtype, sharding, progress,
                   log)
        staging.writer.close()
        if jax.process_index() == 0:
            for extra in reference.extra_files():
                if not (staging.path / extra.name).exists():
                    shutil.copy2(extra, staging.path / extra.name)
            for file_name, text in (extra_files or {}).items():
                (staging.path / file_name).write_text(text)
    return output


def _merge_all(spec, names, leaf_fn, readers, base_reader, writer, out_types, dtype, sharding, progress, log):
    def read(i):
        name = names[i]
        base_leaf = None if base_reader is None else _load(base_reader, name, dtype, sharding)
        if not spec.is_float(i):
            return base_leaf, [base_leaf if base_leaf is not None else _load(readers[0], name, dtype, sharding)]
        return base_leaf, [_load(r, name, dtype, sharding) for r in readers]

    sizes = [int(np.prod(spec.leaves[i].shape)) * out_types[n].itemsize for i, n in enumerate(names)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="merging",
                 disable=not progress or jax.process_index() != 0, file=sys.stderr) as bar:
        upcoming = pool.submit(read, 0) if names else None
        for i, name in enumerate(names):
            base_leaf, leaves = upcoming.result() if upcoming is not None else read(i)
            # read ahead while merging, unless the next tensors are large (bounds memory)
            ahead = i + 1 < len(names) and sizes[i + 1] <= PREFETCH_BYTES
            upcoming = pool.submit(read, i + 1) if ahead else None
            merged = leaf_fn(i, base_leaf, leaves) if spec.is_float(i) else leaves[0]
            if merged.dtype != out_types[name]:
                merged = merged.astype(out_types[name])
            writer.write(name, merged)
            bar.update(sizes[i])
            bar.set_postfix_str(f"{i + 1}/{len(names)} tensors")
            if log is not None and jax.process_index() == 0:
                log(f"merged {name} {tuple(merged.shape)} {merged.dtype}")
            del base_leaf, leaves, merged  # free this tensor before reading the next
