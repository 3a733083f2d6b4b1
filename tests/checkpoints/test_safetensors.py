import errno
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from jaxmerge import checkpoints
from jaxmerge.checkpoints import CheckpointError, SafetensorsReader, parse_size
from tests.checkpoints.hf import llama_tensors, write_model


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shards", [1, 3])
def test_reads_what_the_safetensors_library_writes(tmp_path, dtype, shards):
    tensors = llama_tensors(0, dtype=dtype)
    write_model(tmp_path / "m", tensors, shards=shards)
    reader = SafetensorsReader(tmp_path / "m")
    assert reader.names == sorted(tensors)
    for name, value in tensors.items():
        got = reader.read(name)
        assert got.dtype == np.dtype(value.dtype) and got.shape == value.shape
        np.testing.assert_array_equal(got.view(np.uint8), np.asarray(value).view(np.uint8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_and_the_library_reads_our_shards(tmp_path, dtype):
    tensors = llama_tensors(1, dtype=dtype)
    total = sum(v.nbytes for v in tensors.values())
    checkpoints.save(tmp_path / "out", tensors, format="safetensors", max_shard_size=total // 3)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)  # every tensor exactly once
    assert index["metadata"]["total_size"] == total
    assert len(set(index["weight_map"].values())) >= 3
    seen = []
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / "out" / file), framework="flax") as f:
            for name in f.keys():
                seen.append(name)
                assert index["weight_map"][name] == file
                np.testing.assert_array_equal(np.asarray(f.get_tensor(name)).view(np.uint8),
                                              np.asarray(tensors[name]).view(np.uint8))
    assert sorted(seen) == sorted(tensors)
    loaded = checkpoints.load(tmp_path / "out")
    for name, value in tensors.items():  # bit-identical
        np.testing.assert_array_equal(np.asarray(loaded[name]).view(np.uint8), np.asarray(value).view(np.uint8))


def test_one_shard_is_model_safetensors(tmp_path):
    checkpoints.save(tmp_path / "out", llama_tensors(2), format="safetensors")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("500MB") == 500 * 10 ** 6
    assert parse_size("2GiB") == 2 * 2 ** 30 and parse_size(123) == 123 and parse_size("1.5kB") == 1500
    with pytest.raises(ValueError, match="max_shard_size must be bytes or like '5GB'"):
        parse_size("lots")


def _file(tmp_path, header_bytes: bytes, data: bytes = b""):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(header_bytes + data)
    return path


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    good = tmp_path / "good"
    write_model(good, llama_tensors(3))
    raw = (good / "model.safetensors").read_bytes()
    cases = {
        "short": raw[:5],
        "truncated header": raw[:8] + raw[8:20],
        "truncated data": raw[:-10],
        "not json": struct.pack("<Q", 4) + b"{{{{",
        "bad dtype": struct.pack("<Q", 48) + json.dumps({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}})
        .encode().ljust(48) + b"\0" * 4,
    }
    for label, content in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"^{path}: truncated or corrupt safetensors file: "):
            SafetensorsReader(path)


def test_a_failed_write_names_its_tensor_even_when_a_later_call_reports_it(tmp_path, monkeypatch):
    """Writes reach the disk after ``write`` returns: the error names the tensor it held."""
    from jaxmerge.checkpoints import _direct
    from jaxmerge.checkpoints._direct import BLOCK

    monkeypatch.setattr(_direct, "DIRECT_MIN_BYTES", 2 * BLOCK)
    monkeypatch.setattr(_direct, "STAGING_BYTES", 2 * BLOCK)
    a, b = (np.arange(4 * BLOCK + 1, dtype=np.uint8)[1:].view(np.float32) for _ in range(2))  # unaligned: staged
    writer = checkpoints.SafetensorsWriter(tmp_path, [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)])
    _, a_offset, _ = writer.plan["a"]
    pwrite = os.pwrite

    def fail_a(fd, data, offset):
        if a_offset <= offset < a_offset + a.nbytes:
            raise OSError(errno.EIO, "Input/output error")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fail_a)
    with pytest.raises(CheckpointError, match=r"model.safetensors: cannot write tensor 'a' \(Input/output error\)"):
        writer.write("a", a)
        writer.write("b", b)
        writer.close()
    writer.abort()
