"""Hostile and broken safetensors files, indexes and Orbax checkpoints: refused with one
CheckpointError naming the file, never a crash, a hang or an allocation beyond the file's size;
and what the format allows (checked against the safetensors library) is accepted."""

import json
import os
import shutil
import struct

import hypothesis.strategies as st
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings

import jaxmerge
from jaxmerge.checkpoints import SafetensorsReader, open_checkpoint
from jaxmerge.checkpoints.safetensors import read_header
from jaxmerge.cli.main import main
from jaxmerge.errors import CheckpointError

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}


def _file(path, header, data=b"", length=None):
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a2": {"dtype": "F32", "shape": [1],
      "data_offsets": [4, 8]}}, bytes(8), "no overlap"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     b'"data_offsets": [0, 4]}}', bytes(4), "given twice"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8), "invalid entry"),
    ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), "invalid entry"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "invalid entry"),
    (b'{"a": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}', bytes(4), "invalid entry"),
    (b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', bytes(4), "invalid entry"),
    ({"__metadata__": ["x"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "__metadata__"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "4 bytes after the last tensor"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "not valid JSON"),
])
def test_headers_the_format_forbids_are_refused(tmp_path, header, data, message):
    file = _file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=message) as error:
        open_checkpoint(file)
    assert str(file) in str(error.value)


def test_a_huge_header_length_is_refused_before_reading(tmp_path):
    file = _file(tmp_path / "model.safetensors", b"{}", length=2 ** 31)
    with open(file, "r+b") as f:
        f.truncate(3 * 2 ** 30)  # sparse: the claimed header fits the file's apparent size
    with pytest.raises(CheckpointError, match="more than the file's .* or the limit 100000000"):
        read_header(file)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("weight_map, message", [
    ([], "weight_map must map tensor names"),
    ({"a": "../../etc/passwd"}, "outside"),
    ({"a": "/etc/passwd"}, "outside"),
    ({"a": "model.safetensors", "b": "model.safetensors", "c": "model.safetensors"}, "places 'c' in model.safetensors"),
    ({"a": "model.safetensors"}, "does not list the tensor 'b'"),
])
def test_bad_indexes_are_refused(tmp_path, weight_map, message):
    _file(tmp_path / "model.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path)


def test_an_uncommitted_orbax_checkpoint_is_refused(tmp_path):
    path = jaxmerge.checkpoints.save(tmp_path / "ckpt", {"w": np.ones(3, np.float32)})
    (path / "commit_success.txt").unlink()
    metadata = json.loads((path / "_CHECKPOINT_METADATA").read_text())
    del metadata["commit_timestamp_nsecs"]
    (path / "_CHECKPOINT_METADATA").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="save did not finish"):
        open_checkpoint(path)
    shutil.copytree(path, tmp_path / "other.orbax-checkpoint-tmp-1")
    with pytest.raises(CheckpointError, match="save did not finish"):
        open_checkpoint(tmp_path / "other.orbax-checkpoint-tmp-1")


@st.composite
def _headers(draw):
    """Headers near the format's rules: valid tilings, with one thing perhaps broken."""
    names = draw(st.lists(st.text("abc.", min_size=1, max_size=3), max_size=4, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        size = int(np.prod(shape, dtype=np.int64)) * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = offset
    flaw = draw(st.sampled_from(["none", "gap", "overlap", "short", "long", "shape", "dtype", "offsets"]))
    if names and flaw != "none":
        entry = header[draw(st.sampled_from(names))]
        if flaw == "gap":
            data += 1
        elif flaw == "overlap":
            entry["data_offsets"] = [max(0, entry["data_offsets"][0] - 1), entry["data_offsets"][1]]
        elif flaw == "short":
            data = max(0, data - 1)
        elif flaw == "long":
            entry["data_offsets"][1] += draw(st.integers(1, 2 ** 70))
        elif flaw == "shape":
            entry["shape"] = draw(st.sampled_from([[-1], ["1"], [1.5], [True], None, [2 ** 70]]))
        elif flaw == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F33", 4, None]))
        else:
            entry["data_offsets"] = draw(st.sampled_from([[0], "0,4", [0, -4], [0.0, 4.0], None]))
    return header, data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_headers())
def test_the_reader_accepts_exactly_what_the_safetensors_library_accepts(tmp_path, case):
    header, data = case
    file = _file(tmp_path / "fuzz.safetensors", header, bytes(data))
    try:
        with safetensors.safe_open(str(file), "numpy"):
            pass
        library_accepts = True
    except Exception:
        library_accepts = False
    try:
        tensors = read_header(file)
        accepted = True
    except CheckpointError:
        accepted = False
    assert accepted == library_accepts, (header, data)
    if accepted:
        assert sum(t.nbytes for t in tensors.values()) <= file.stat().st_size


def test_a_link_out_of_the_model_folder_is_not_copied(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    for name in ("a", "b"):
        jaxmerge.checkpoints.save(tmp_path / name, {"w": np.full(3, 1.0, np.float32)}, format="safetensors")
    (tmp_path / "a" / "tokenizer.json").symlink_to(secret)
    (tmp_path / "a" / "inside.json").write_text("{}")
    (tmp_path / "a" / "alias.json").symlink_to(tmp_path / "a" / "inside.json")
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n - model: {tmp_path / 'a'}\n   parameters: {{weight: 1}}\n"
                      f" - model: {tmp_path / 'b'}\n   parameters: {{weight: 1}}\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "tokenizer.json links outside" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert (tmp_path / "out" / "alias.json").read_text() == "{}"


def test_force_never_destroys_an_input_reached_through_a_link(tmp_path, capsys):
    blobs = tmp_path / "blobs"
    path = jaxmerge.checkpoints.save(blobs / "weights", {"w": np.ones(3, np.float32)}, format="safetensors")
    (blobs / "other.txt").write_text("keep me")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").symlink_to(path / "model.safetensors")
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n - model: {tmp_path / 'a'}\n   parameters: {{weight: 1}}\n"
                      f" - model: {tmp_path / 'b'}\n   parameters: {{weight: 1}}\n")
    for output in (blobs, tmp_path):  # holding the linked weights; holding the config
        assert main(["merge", str(config), str(output), "--no-progress", "--force"]) == 2
        assert "which this merge reads" in capsys.readouterr().err or output == tmp_path
    assert (blobs / "other.txt").read_text() == "keep me" and config.exists()
    assert SafetensorsReader(tmp_path / "a").read("w").tolist() == [1.0, 1.0, 1.0]


def _linear(tmp_path, tensors, extra=""):
    for name in ("a", "b"):
        jaxmerge.checkpoints.save(tmp_path / name, tensors, format="safetensors")
    config = tmp_path / "conf" / "merge.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(f"merge_method: linear\nmodels:\n - model: {tmp_path / 'a'}\n   parameters: {{weight: 1}}\n"
                      f" - model: {tmp_path / 'b'}\n   parameters: {{weight: 1}}\n{extra}")
    return config


def test_the_config_is_an_input_too(tmp_path, capsys):
    config = _linear(tmp_path, {"w": np.ones(3, np.float32)})
    for output in (config.parent, config):
        assert main(["merge", str(config), str(output), "--no-progress", "--force"]) == 2
        assert "which this merge reads" in capsys.readouterr().err
    assert config.is_file()


def test_float16_overflow_is_refused_naming_the_tensor(tmp_path, capsys):
    config = _linear(tmp_path, {"big": np.full(3, 1e5, np.float32)}, "out_dtype: float16\n")
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "tensor 'big' holds 100000, beyond the range of float16" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_models_without_tensors_are_refused(tmp_path, capsys):
    config = _linear(tmp_path, {})
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "the models hold no tensors" in capsys.readouterr().err


def test_inspect_escapes_control_characters_in_names(tmp_path, capsys):
    _file(tmp_path / "model.safetensors", {"\x1b[31mred": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
          bytes(4))
    assert main(["inspect", str(tmp_path / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out
