import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.checkpoints import CheckpointError, StreamOptions, stream
from jaxmerge.checkpoints import stream_merge as _stream_merge
from tests.checkpoints.hf import llama_tensors, write_model


def stream_merge(plan, models, output, *, base=None, **options):
    return _stream_merge(plan, models, output, base=base, options=StreamOptions(**options))


@pytest.fixture
def family(tmp_path):
    base = llama_tensors(0)
    tunes = [llama_tensors(10 + i, scale=0.05, around=base) for i in range(3)]
    paths = [write_model(tmp_path / f"tune{i}", t, shards=1 + i) for i, t in enumerate(tunes)]
    return base, tunes, write_model(tmp_path / "base", base), paths


def _assert_same(out_dir, expected, dtype=None):
    loaded = checkpoints.load(out_dir)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == (dtype or value.dtype), name
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_streamed_ties_equals_the_in_memory_function(family, tmp_path):
    base, tunes, base_path, paths = family
    weights = [1.0, 0.5, 0.8]
    plan = jaxmerge.plan("ties", weights=weights, density=0.4)
    out = stream_merge(plan, paths, tmp_path / "merged", base=base_path, progress=False)
    _assert_same(out, jaxmerge.ties(base, tunes, weights, density=0.4))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]


def test_streamed_random_merge_equals_in_memory_with_the_same_key(family, tmp_path):
    base, tunes, base_path, paths = family
    key = jax.random.key(3)
    plan = jaxmerge.plan(jaxmerge.dare_ties, density=0.5, key=key, rescale="l1")
    out = stream_merge(plan, paths, tmp_path / "merged", base=base_path, progress=False)
    _assert_same(out, jaxmerge.dare_ties(base, tunes, density=0.5, key=key))


def test_dtypes_sharded_output_and_slerp(family, tmp_path):
    base, tunes, base_path, paths = family
    out = stream_merge(jaxmerge.plan("slerp", t=[0.0, 1.0]), [base_path, paths[0]], tmp_path / "slerp",
                       dtype="bfloat16", out_dtype="float16", max_shard_size=4000, progress=False)
    as_bf16 = [{k: v.astype(jnp.bfloat16) for k, v in m.items()} for m in (base, tunes[0])]
    expected = {k: v.astype(jnp.float16) for k, v in jaxmerge.slerp(*as_bf16, [0.0, 1.0]).items()}
    _assert_same(out, expected)
    assert (out / "model.safetensors.index.json").exists()


def test_orbax_in_and_out(tmp_path):
    trees = [{"params": {"w": jnp.full((4, 3), float(i)), "b": jnp.arange(3.0) * i}} for i in range(3)]
    paths = [checkpoints.save(tmp_path / f"m{i}", t) for i, t in enumerate(trees)]
    out = stream_merge(jaxmerge.plan("linear", weights=[1.0, 2.0, 3.0]), paths, tmp_path / "avg", progress=False)
    loaded = checkpoints.load(out)
    expected = jaxmerge.average(trees, [1.0, 2.0, 3.0])
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)
    out = stream_merge(jaxmerge.plan("linear"), paths, tmp_path / "as_st", output_format="safetensors",
                       progress=False)
    np.testing.assert_array_equal(checkpoints.load(out)["params/w"], np.full((4, 3), 1.0, np.float32))


def test_errors_leave_no_output(family, tmp_path):
    base, tunes, base_path, paths = family
    plan = jaxmerge.plan("linear")
    odd = dict(tunes[0])
    odd["model.norm.weight"] = jnp.zeros(7)
    bad = write_model(tmp_path / "odd", odd)
    with pytest.raises(ValueError, match=rf"{bad} 'model.norm.weight': shape \(7,\) != \(16,\) of {paths[0]}"):
        stream_merge(plan, [paths[0], bad], tmp_path / "x", progress=False)
    missing = dict(tunes[0])
    del missing["model.norm.weight"]  # (a missing lm_head.weight is a tied one: the embedding stands in)
    short = write_model(tmp_path / "short", missing)
    with pytest.raises(ValueError, match=rf"{short} has no leaf 'model.norm.weight'"):
        stream_merge(plan, [paths[0], short], tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="would overlap the input"):
        stream_merge(plan, paths, paths[0] / "inside", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        stream_merge(plan, paths, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    with pytest.raises(ValueError, match=r"weights has 1 entries but there are 3 models"):
        stream_merge(jaxmerge.plan("linear", weights=[1.0]), paths, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if "jaxmerge-tmp" in p.name]  # no staging directories


def test_a_failure_mid_merge_removes_the_staging_directory(family, tmp_path, monkeypatch):
    base, tunes, base_path, paths = family
    monkeypatch.setattr(stream, "COLLECT_BYTES", 1)  # every tensor counts as large: it fails in one
    calls = []
    plan = jaxmerge.plan("linear")

    class FailingPlan:
        def leaf_fn(self, spec, statistics, names, positions):
            leaf_fn = plan.leaf_fn(spec, statistics, names, positions)

            def fn(i, b, leaves):
                calls.append(i)
                if len(calls) == 5:
                    raise KeyboardInterrupt
                return leaf_fn(i, b, leaves)
            return fn

    with pytest.raises(KeyboardInterrupt):
        stream_merge(FailingPlan(), paths, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tune0", "tune1", "tune2"]
    assert not stream._TRIM_AFTER_COMPILING.is_set()


def test_compiling_while_a_large_tensor_is_merged_trims_the_heap(tmp_path, monkeypatch):
    trims = []
    monkeypatch.setattr(stream._libc, "MALLOC_TRIM", trims.append)
    monkeypatch.setattr(stream, "_release_memory", lambda: None)  # leaves only the trims after compiling

    def merge(columns):  # shapes no other test compiles for
        w = np.arange(3 * columns, dtype=np.float32).reshape(3, columns)
        paths = [write_model(tmp_path / f"{columns}-{i}", {"w": w * (i + 1)}) for i in range(2)]
        stream_merge(jaxmerge.plan("linear"), paths, tmp_path / f"{columns}-merged", progress=False)

    merge(61)
    assert trims == []  # compiled, but for a small tensor
    monkeypatch.setattr(stream, "COLLECT_BYTES", 1)
    merge(67)
    assert trims and set(trims) == {0}
    trims.clear()
    jax.jit(lambda x: x * 3)(jnp.ones((3, 71)))  # compiled outside a stream
    assert trims == [] and not stream._TRIM_AFTER_COMPILING.is_set()

