import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import checkpoints
from jaxmerge.checkpoints import CheckpointError, OrbaxReader, OrbaxWriter


def _tree(dtype):
    rng = np.random.default_rng(0)
    return {"params": {"dense": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), dtype),
                                 "bias": jnp.asarray(rng.standard_normal(3), dtype)},
                       "embed": jnp.asarray(rng.standard_normal((5, 4)), dtype)},
            "step": jnp.asarray(7, jnp.int32)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    tree = _tree(dtype)
    checkpoints.save(tmp_path / "ckpt", tree)
    loaded = checkpoints.load(tmp_path / "ckpt")
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8),
                                                            np.asarray(b).reshape(-1).view(np.uint8)),
                 loaded, tree)


def test_reads_one_leaf_at_a_time_and_into_a_sharding(tmp_path):
    tree = _tree(jnp.float32)
    checkpoints.save(tmp_path / "ckpt", tree)
    reader = OrbaxReader(tmp_path / "ckpt")
    assert reader.names == ["params/dense/bias", "params/dense/kernel", "params/embed", "step"]
    assert reader.shape_dtype("params/embed") == ((5, 4), np.dtype(np.float32))
    mesh = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    kernel = reader.read("params/dense/kernel", sharding)
    np.testing.assert_array_equal(kernel, tree["params"]["dense"]["kernel"])
    assert kernel.sharding == sharding


def test_leaf_by_leaf_writer(tmp_path):
    tree = _tree(jnp.bfloat16)
    reader_tree = checkpoints.save(tmp_path / "src", tree)
    reader = OrbaxReader(reader_tree)
    writer = OrbaxWriter(tmp_path / "copy", reader.treedef, reader.names, batch_bytes=1)  # one leaf per save
    for name in reader.names:
        writer.write(name, reader.read(name))
    writer.close()
    jax.tree.map(np.testing.assert_array_equal, checkpoints.load(tmp_path / "copy"), tree)


def test_refuses_to_overwrite_and_replaces_with_force(tmp_path):
    checkpoints.save(tmp_path / "ckpt", _tree(jnp.float32))
    with pytest.raises(CheckpointError, match="exists and is not empty; replace it with --force"):
        checkpoints.save(tmp_path / "ckpt", _tree(jnp.float16))
    checkpoints.save(tmp_path / "ckpt", _tree(jnp.float16), force=True)
    assert checkpoints.load(tmp_path / "ckpt")["params"]["embed"].dtype == jnp.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copies left


def test_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoints.save("ckpt", _tree(jnp.float32))
    loaded = checkpoints.load("ckpt")
    np.testing.assert_array_equal(loaded["params"]["embed"], _tree(jnp.float32)["params"]["embed"])
