"""Hugging Face safetensors checkpoints, read lazily and written in planned shards.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor's
name to its dtype, shape and byte range, and the raw data. jaxmerge reads and writes it
directly (bfloat16 included, which the ``safetensors`` NumPy API does not support):

- a reader reads one tensor's bytes at a time, on demand, so resident memory stays at
  about one tensor per open model;
- a writer knows every output tensor's shape and dtype in advance, assigns them to shards
  of at most ``max_shard_size`` bytes, writes each shard's header first and then streams
  the data in, so a merge never holds a whole shard in memory. Several shards are named
  ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``; one shard is
  ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from jaxmerge._host import aligned_empty
from jaxmerge.checkpoints._direct import RangeWriter
from jaxmerge.errors import CheckpointError, JaxmergeError, JaxmergeWarning

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``'5GB'``, ``'500MB'``, ``'2GiB'`` (decimal or binary).

    Parses a shard size limit such as :func:`save`'s and :class:`SafetensorsWriter`'s
    ``max_shard_size``. A string is a number (possibly fractional) and an optional unit,
    case-insensitive: ``B``; ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB`` are
    powers of 1000; ``KiB``, ``MiB``, ``GiB``, ``TiB`` are powers of 1024. A fractional
    byte count is rounded down.

    Args:
      size: a number of bytes, or a string like ``'5GB'``.

    Returns:
      The number of bytes, a positive int.

    Raises:
      JaxmergeError: a string of another form, or a size under one byte.

    Examples:
      >>> from jaxmerge.checkpoints import parse_size
      >>> parse_size("5GB"), parse_size("2GiB"), parse_size("1.5kb"), parse_size(512)
      (5000000000, 2147483648, 1500, 512)
    """
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise JaxmergeError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
        unit = match[2].upper().rstrip("B")
        base = 1024 if unit.endswith("I") else 1000
        value = int(float(match[1]) * base ** ("KMGT".index(unit[0]) + 1 if unit else 0))
    if value < 1:
        raise JaxmergeError(f"max_shard_size must be positive, got {size!r}")
    return value


class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte offset."""

    __slots__ = ("file", "dtype", "shape", "offset", "nbytes")

    def __init__(self, file: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, nbytes: int):
        self.file, self.dtype, self.shape, self.offset, self.nbytes = file, dtype, shape, offset, nbytes


MAX_HEADER_BYTES = 100_000_000  # as the safetensors library: a longer header is refused unread


def regular_file(file: Path) -> os.stat_result:
    """``file``'s status, refusing anything but a regular file (a FIFO or a device would block reads).

    Raises:
      CheckpointError: ``file`` does not exist or is not a regular file.
    """
    try:
        status = os.stat(file)
    except OSError as error:
        raise CheckpointError(f"{file}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        raise CheckpointError(f"{file}: not a regular file")
    return status


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the name {next(k for k in keys if keys.count(k) > 1)!r} is given twice")
    return dict(pairs)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors file's header, as strictly as the format's reference library.

    The header must be at most 100 MB and fit in the file; be a JSON object without repeated
    names; give each tensor a known dtype, a shape of non-negative integers and integer
    ``data_offsets`` of the right size; and the tensors' byte ranges must tile the data
    section exactly (no overlap, no gap, nothing after). ``__metadata__``, if present, maps
    strings to strings.

    Raises:
      CheckpointError: a file that is not regular, too short, or breaks one of these rules,
        naming the file and the tensor.
    """
    size = regular_file(file).st_size

    def corrupt(why):
        return CheckpointError(f"{file}: truncated or corrupt safetensors file: {why}")

    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise corrupt(f"the header claims {length} bytes, more than the file's {size} or the limit "
                          f"{MAX_HEADER_BYTES}")
        try:
            header = json.loads(f.read(length), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise corrupt(f"the header is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("__metadata__ must map strings to strings")
    data_start, data_size = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if ok else None
        if not (ok and all(map(_is_count, entry["shape"])) and isinstance(offsets, list) and len(offsets) == 2
                and all(map(_is_count, offsets))):
            raise corrupt(f"tensor {_printable(name)} has an invalid entry {_printable(str(entry)[:200])}")
        dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), offsets
        if not begin <= end <= data_size:
            raise corrupt(f"tensor {_printable(name)} lies at bytes {begin}..{end} of a {data_size}-byte data section")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise corrupt(f"tensor {_printable(name)} of shape {shape} and dtype {entry['dtype']} spans "
                          f"{end - begin} bytes")
        tensors[name] = TensorInfo(file, dtype, shape, data_start + begin, end - begin)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if info.offset - data_start != position:
            raise corrupt(f"tensor {_printable(name)} starts at byte {info.offset - data_start}, not {position} "
                          "(tensors must tile the data section: no overlap, no gap)")
        position += info.nbytes
    if position != data_size:
        raise corrupt(f"{data_size - position} bytes after the last tensor")
    return tensors


def _printable(text: str) -> str:
    """``text`` quoted, with control characters (terminal escapes) escaped."""
    return repr(text) if text.isprintable() else ascii(text)


def _index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of a directory's index: tensor name -> a shard file inside the directory.

    Raises:
      CheckpointError: not JSON, no ``weight_map`` object of strings, or a shard path that is
        absolute or leaves the directory (refused before anything is opened).
    """
    index = path / INDEX_NAME
    try:
        regular_file(index)
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid safetensors index ({str(error)[:200]})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    for file in set(weight_map.values()):
        if Path(file).is_absolute() or ".." in Path(file).parts or file in ("", "."):
            raise CheckpointError(f"{index} names the shard {_printable(file)}, outside {path}")
    return weight_map


def _files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint, and its index's weight map (None without one)."""
    if not path.is_dir():
        regular_file(path)
        return [path], None
    if (path / INDEX_NAME).exists():
        weight_map = _index(path)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX_NAME} lists the missing file {_printable(missing[0])}")
        return [path / n for n in names], weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    return files, None


class SafetensorsReader:
    """A Hugging Face safetensors checkpoint, opened lazily: only headers are read until a tensor is asked for.

    The checkpoint is a ``.safetensors`` file, or a directory with a
    ``model.safetensors.index.json`` and the shards it lists, or else with every
    ``*.safetensors`` file in it. Opening it reads and checks every file's header (and the
    index); :meth:`read` then reads one tensor's bytes at a time, so resident memory stays
    at about one tensor. Tensors are known by their names, in sorted order.

    Args:
      path: a safetensors file, or a directory of them.

    Attributes:
      format: ``'safetensors'``.
      path: the checkpoint's path (a ``Path``).
      tensors: ``{name: TensorInfo}``: each tensor's file, dtype, shape and byte offset.

    Raises:
      CheckpointError: ``path`` holds no ``.safetensors`` file (or does not exist); an index
        that is not valid JSON with a ``weight_map``, lists a missing file, or places a
        tensor in a file that does not hold it; a truncated or corrupt file (a bad header,
        an unknown dtype, a byte range outside the data or of the wrong size); or a tensor
        in two files.

    Examples:
      >>> import tempfile, pathlib, jax.numpy as jnp, jaxmerge
      >>> from jaxmerge.checkpoints import SafetensorsReader
      >>> tmp = pathlib.Path(tempfile.mkdtemp())
      >>> tree = {"kernel": jnp.ones((2, 3)), "bias": jnp.arange(3.0)}
      >>> reader = SafetensorsReader(jaxmerge.checkpoints.save(tmp / "model", tree, format="safetensors"))
      >>> reader.names, reader.shape_dtype("kernel")
      (['bias', 'kernel'], ((2, 3), dtype('float32')))
      >>> reader.read("bias").tolist()
      [0.0, 1.0, 2.0]
    """

    format = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        files, weight_map = _files(self.path)
        for file in files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {_printable(name)} is in both "
                                          f"{self.tensors[name].file.name} and {file.name}")
                self.tensors[name] = info
        index = self.path / INDEX_NAME
        for name, file in (weight_map or {}).items():
            if name not in self.tensors or self.tensors[name].file != self.path / file:
                raise CheckpointError(f"{index} places {_printable(name)} in {file}, which does not hold it")
        if weight_map is not None and (unlisted := sorted(set(self.tensors) - set(weight_map))):
            raise CheckpointError(f"{index} does not list the tensor {_printable(unlisted[0])} of "
                                  f"{self.tensors[unlisted[0]].file.name}")

    @property
    def names(self) -> list[str]:
        """The tensors' names, sorted."""
        return sorted(self.tensors)

    @property
    def treedef(self):
        """The structure of ``{name: tensor}`` (names in sorted order, as ``names``)."""
        return jax.tree.structure({name: 0 for name in self.tensors})

    def tree_of(self, values: dict) -> dict:
        """``{name: value}`` with the names in sorted order, from ``values`` holding every name."""
        return {name: values[name] for name in self.names}

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype of tensor ``name``, as stored (from the header, nothing read)."""
        info = self.tensors[name]
        return info.shape, info.dtype

    def read(self, name: str, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
        """One tensor, read into a buffer of its own (placed with ``sharding`` if given; a
        64-bit tensor stays a NumPy array unless JAX runs with x64).

        A positioned read into an aligned buffer, not a memory map: mapping the file would
        count its pages in this process's resident memory while they are copied, doubling
        the transient footprint of a large tensor; on CPU the returned array wraps the
        buffer itself, so each tensor is in memory once.

        Raises:
          CheckpointError: the file ends before the tensor's last byte.
        """
        info = self.tensors[name]
        raw = aligned_empty((info.nbytes,), np.uint8)
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            if f.readinto(memoryview(raw)) != info.nbytes:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        host = raw.view(info.dtype).reshape(info.shape)
        if info.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            return host  # JAX would narrow a 64-bit tensor: it stays a NumPy array
        if sharding is not None and not sharding.is_fully_addressable:  # a mesh across processes
            return jax.make_array_from_callback(info.shape, sharding, lambda index: host[index])
        return jax.device_put(host, sharding)

    def extra_files(self) -> list[Path]:
        """Files of the model directory that are not weights (config, tokenizer, ...): regular
        files, and links that resolve to regular files inside the directory; a link leading
        out of it is skipped with a :class:`~jaxmerge.errors.JaxmergeWarning`."""
        if not self.path.is_dir():
            return []
        weights = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
        folder, files = self.path.resolve(), []
        for f in sorted(self.path.iterdir()):
            if f.name == INDEX_NAME or f.name.endswith(weights) or not f.is_file():
                continue
            if f.is_symlink() and folder not in f.resolve().parents:
                warnings.warn(f"{f} links outside {self.path}: not copied", JaxmergeWarning, stacklevel=2)
                continue
            files.append(f)
        return files

    def files(self) -> list[Path]:
        """Every file this checkpoint reads, resolved (links followed)."""
        index = [self.path / INDEX_NAME] if self.path.is_dir() and (self.path / INDEX_NAME).exists() else []
        return sorted({f.resolve() for f in [*(i.file for i in self.tensors.values()), *index, *self.extra_files()]})


class SafetensorsWriter:
    """Writes planned tensors into safetensors shards, each header first, then data as it comes.

    Every tensor's name, shape and dtype is given up front. In that order, tensors are put
    into shards of at most ``max_shard_size`` bytes (a new shard starts when the next
    tensor would overflow the current one; a tensor larger than the limit gets a shard of
    its own). Creating the writer creates every shard file with its header, at its full
    size, but with a header length of zero, so that no reader takes a partial shard for a
    whole one; :meth:`write` then puts each tensor's bytes in its place, in any order, and
    :meth:`close` flushes the files, writes their header lengths and, for several shards, writes
    ``model.safetensors.index.json``. One shard is named ``model.safetensors``, several
    ``model-0000i-of-0000n.safetensors``. The data goes around the page cache where the file
    system allows it (:class:`~jaxmerge.checkpoints._direct.RangeWriter`).

    Args:
      directory: an existing directory to write the shards into.
      tensors: ``(name, shape, dtype)`` of every tensor to write, in the order to store them.
      max_shard_size: the largest shard in bytes, an int or a string like ``'5GB'`` (see
        :func:`parse_size`).

    Attributes:
      directory: the output directory.
      file_names: the shards' file names.
      total_size: the bytes of tensor data in all shards (headers excluded).
      plan: ``{name: (shard index, byte offset in its file, bytes)}``.

    Raises:
      JaxmergeError: a bad ``max_shard_size``.
      CheckpointError: a dtype that safetensors cannot hold.

    Examples:
      >>> import tempfile, numpy as np
      >>> from jaxmerge.checkpoints import SafetensorsReader, SafetensorsWriter
      >>> directory = tempfile.mkdtemp()
      >>> writer = SafetensorsWriter(directory, [("a", (3,), np.float32), ("b", (2,), np.float32)],
      ...                            max_shard_size=16)  # 12 + 8 bytes: two shards
      >>> writer.file_names
      ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
      >>> writer.write("b", np.asarray([3.0, 4.0], np.float32))
      >>> writer.write("a", np.zeros(3, np.float32))
      >>> writer.close()
      >>> SafetensorsReader(directory).read("b").tolist()
      [3.0, 4.0]
    """

    def __init__(self, directory: str | os.PathLike, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                 max_shard_size: int | str = "5GB"):
        self.directory = Path(directory)
        limit = parse_size(max_shard_size)
        tensors = list(tensors)
        for name, _, dtype in tensors:
            if np.dtype(dtype) not in CODES:
                raise CheckpointError(f"tensor {name!r} has dtype {np.dtype(dtype)}, which safetensors cannot hold")
        shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        sizes = [0]
        for name, shape, dtype in tensors:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if shards[-1] and sizes[-1] + nbytes > limit:
                shards.append([])
                sizes.append(0)
            shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            sizes[-1] += nbytes
        count = len(shards)
        self.file_names = [SINGLE_NAME] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.total_size = sum(sizes)
        self.plan: dict[str, tuple[int, int, int]] = {}  # name -> (shard, absolute offset, nbytes)
        self._handles, self._header_lengths = [], []
        try:
            self._open(shards)
        except BaseException:
            self.abort()
            raise

    def _open(self, shards) -> None:
        """Create every shard file, header first, at its full size."""
        for shard, (entries, file_name) in enumerate(zip(shards, self.file_names)):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in entries:
                nbytes = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            start = 8 + len(encoded)
            with open(self.directory / file_name, "wb") as handle:
                handle.write(struct.pack("<Q", 0) + encoded)  # a zero length until close: unloadable while partial
                handle.truncate(start + offset)
            self._header_lengths.append(len(encoded))
            for name, _, _ in entries:
                begin, end = header[name]["data_offsets"]
                self.plan[name] = (shard, start + begin, end - begin)
            self._handles.append(RangeWriter(self.directory / file_name))

    def write(self, name: str, array) -> None:
        """Write one planned tensor (a NumPy array, or a JAX array brought to the host).

        Raises:
          JaxmergeError: ``array`` has another number of bytes than planned for ``name``.
        """
        shard, offset, nbytes = self.plan[name]
        data = np.ascontiguousarray(jax.device_get(array))
        if data.nbytes != nbytes:
            raise JaxmergeError(f"tensor {name!r} has {data.nbytes} bytes, planned {nbytes}")
        try:
            self._handles[shard].write(memoryview(data.reshape(-1).view(np.uint8)), offset)
        except OSError as error:
            raise self._write_error(shard, error) from None

    def _write_error(self, shard: int, error: OSError) -> CheckpointError:
        """A failed write, naming the tensor whose bytes it held (writes reach the disk after
        :meth:`write` returns, so the failure may be an earlier tensor's)."""
        offset = getattr(error, "offset", None)
        names = [name for name, (s, begin, nbytes) in self.plan.items()
                 if s == shard and offset is not None and begin <= offset < begin + nbytes]
        what = f"write tensor {names[0]!r}" if names else "write the header" if offset is not None else "finish the file"
        return CheckpointError(f"{self.directory / self.file_names[shard]}: cannot {what} ({error.strerror or error})")

    def abort(self) -> None:
        """Close the files without finishing them (the caller removes the directory)."""
        for handle in self._handles:
            handle.abort()

    def close(self) -> None:
        """Flush and close the shards, and write the index when there are several."""
        for shard, (handle, length) in enumerate(zip(self._handles, self._header_lengths)):
            try:
                handle.write(struct.pack("<Q", length), 0)  # last: a process killed before it leaves no loadable shard
                handle.close()  # on disk (fsync) before the directory is renamed into place
            except OSError as error:
                raise self._write_error(shard, error) from None
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[shard] for name, (shard, _, _) in self.plan.items()}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def read_config(model: str | os.PathLike) -> dict:
    """A Hugging Face model directory's ``config.json``."""
    path = Path(model) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def set_config_dtype(values: dict, dtype: str) -> None:
    """Name ``dtype`` as the model's in its ``config.json`` values: ``torch_dtype``, and
    ``dtype`` where the config holds it (transformers 5's name)."""
    values["torch_dtype"] = dtype
    if "dtype" in values:
        values["dtype"] = dtype
