"""The conformance suite every registered merge method passes, driven by the registry.

For each method of ``jaxmerge.methods()`` (``CASES`` must name them all): eager equals jitted,
bfloat16 in gives bfloat16 out computed in float32, non-float leaves come from the reference
model, the streamed merge (``stream_merge``) and the ``jaxmerge merge`` command give the
in-memory result, sharded inputs give the unsharded result sharded like the inputs, and every
checked hyperparameter, given a bad value at one leaf, is refused with its name and that
leaf's path. Each method's numbers are checked against NumPy references in its own module.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge._hyper import REQUIRED
from jaxmerge.cli.main import main

SEED = 5
KEY = jax.random.key(SEED)  # what `jaxmerge merge --random-seed 5` uses
CASES = {
    "linear": dict(weights=[0.2, 0.5, 0.3]),
    "lerp": dict(t=0.3),
    "slerp": dict(t=0.3),
    "task_arithmetic": dict(weights=[1.0, 0.5, -0.3], lambda_=0.8),
    "ties": dict(weights=[1.0, 0.6, 0.8], density=0.4),
    "dare_linear": dict(density=0.5, key=KEY),
    "dare_ties": dict(density=0.5, key=KEY),
    "breadcrumbs": dict(density=0.5, gamma=0.1),
    "breadcrumbs_ties": dict(density=0.5, gamma=0.1),
    "della": dict(density=0.5, epsilon=0.1, key=KEY),
    "della_linear": dict(density=0.5, epsilon=0.1, key=KEY),
    "model_stock": dict(),
    "magmax": dict(lambda_=0.9),
    "sce": dict(select_topk=0.5),
    "karcher": dict(),
    "fisher": dict(weights=[1.0, 2.0, 0.5]),
    "regmean": dict(alpha=0.8),
    "nuslerp": dict(weights=[1.0, 0.5]),
    "multislerp": dict(weights=[1.0, 0.5, 0.8]),
    "nearswap": dict(t=0.05),
    "arcee_fusion": dict(),
    "ram": dict(epsilon=0.05),
    "ramplus_tl": dict(r=0.3, epsilon=0.05),
    "passthrough": dict(scale=0.5),
}
METHODS = jaxmerge.methods()
SPECS = {"layer/kernel": P("data", "model"), "layer/bias": P("model"), "head/0": P(None, "model"), "step": P()}


def test_cases_cover_the_registry():
    assert sorted(CASES) == sorted(METHODS)


def _tree(seed, dtype=jnp.float32, around=None, step=0):
    """A nested tree (a tuple node included) of float leaves, the bias bfloat16 when ``dtype`` is
    float32, and an int step counter; with ``around``, that tree's values plus small noise."""
    rng = np.random.default_rng(seed)
    start = _flat(around) if around is not None else {}

    def leaf(path, shape, leaf_dtype):
        noise = rng.standard_normal(shape) * (1.0 if around is None else 0.1)
        return jnp.asarray(noise + np.asarray(start.get(path, 0.0), np.float64), leaf_dtype)

    return {"layer": {"kernel": leaf("layer/kernel", (8, 4), dtype),
                      "bias": leaf("layer/bias", (4,), jnp.bfloat16 if dtype == jnp.float32 else dtype)},
            "head": (leaf("head/0", (4, 4), dtype),), "step": jnp.asarray(step, jnp.int32)}


def _statistics(method, models):
    if method.statistics == "fishers":
        return [jax.tree.map(lambda x: jnp.abs(x).astype(jnp.float32), {"layer": m["layer"], "head": m["head"]})
                for m in models]
    if method.statistics == "grams":
        rng = np.random.default_rng(9)
        gram = lambda d: jnp.asarray((x := rng.standard_normal((3 * d, d))).T @ x, jnp.float32)  # noqa: E731
        return [{"layer": {"kernel": {"gram": gram(8)}}, "head": ({"gram": gram(4)},)} for _ in models]
    return None


def _count(method) -> int:
    """How many models the suite merges with ``method``: 3, or as many as it takes."""
    return 2 if method.base == "pair" else min(3, method.max_models or 3)


def _inputs(name, dtype=jnp.float32):
    """``(base, models, statistics)`` for method ``name``: steps differ, so pass-through is visible."""
    method = METHODS[name]
    base = _tree(0, dtype, step=7)
    count = _count(method)
    models = [_tree(i + 1, dtype, around=base, step=i + 1) for i in range(count)]
    return base, models, _statistics(method, models)


def _call(name, base, models, statistics, **hyperparameters):
    """The public function, called with the trees as its signature takes them."""
    method = METHODS[name]
    if method.base == "pair":
        return method.function(models[0], models[1], **hyperparameters)
    trees = ([base] if method.base in ("required", "optional") else []) + [models]
    return method.function(*trees, *([statistics] if method.statistics else []), **hyperparameters)


def _reference(name, base, models):
    return base if METHODS[name].base in ("required", "optional") else models[0]


def _assert_close(out, expected, rtol=1e-6, bf16_ulps=1):
    assert jax.tree.structure(out) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        tol = bf16_ulps * 2 ** -7 if a.dtype == jnp.bfloat16 else rtol
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol * 1e-1,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_equals_eager_and_non_float_leaves_pass_through(name):
    base, models, stats = _inputs(name)
    out = _call(name, base, models, stats, **CASES[name])
    jitted = jax.jit(lambda b, ms, st: _call(name, b, ms, st, **CASES[name]))(base, models, stats)
    _assert_close(jitted, out, rtol=1e-5)
    reference = _reference(name, base, models)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, reference)
    assert int(out["step"]) == int(reference["step"])
    assert not np.allclose(out["layer"]["kernel"], reference["layer"]["kernel"])  # it merged something


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_in_bfloat16_out_computed_in_float32(name):
    base, models, stats = _inputs(name, jnp.bfloat16)
    out = _call(name, base, models, stats, **CASES[name])
    upcast = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, t)  # noqa
    wide = _call(name, upcast(base), [upcast(m) for m in models], stats, **CASES[name])
    assert out["layer"]["kernel"].dtype == jnp.bfloat16
    _assert_close(out, jax.tree.map(lambda x, ref: x.astype(ref.dtype), wide, out))


def _flat(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _saved(tmp_path, name, trees):
    return [checkpoints.save(tmp_path / f"{name}{i}", _flat(t), format="safetensors") for i, t in enumerate(trees)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_equals_in_memory(name, tmp_path):
    method = METHODS[name]
    base, models, stats = _inputs(name)
    expected = _call(name, _flat(base), [_flat(m) for m in models], None if stats is None else [_flat(s) for s in stats],
                     **CASES[name])
    paths, base_path = _saved(tmp_path, "model", models), _saved(tmp_path, "base", [base])[0]
    out = checkpoints.stream_merge(jaxmerge.plan(name, **CASES[name]), paths, tmp_path / "out",
                                   base=base_path if method.base in ("required", "optional") else None,
                                   statistics=None if stats is None else _saved(tmp_path, "stats", stats),
                                   options=checkpoints.StreamOptions(progress=False))
    _assert_close(checkpoints.load(out), expected, rtol=1e-6)


def _config(name, tmp_path) -> dict:
    """A mergekit-style config of ``CASES[name]``, with the models saved under ``tmp_path``."""
    method = METHODS[name]
    base, models, stats = _inputs(name)
    paths = _saved(tmp_path, "model", models)
    entries = [{"model": str(p), "parameters": {}} for p in paths]
    config = {"merge_method": name, "parameters": {}}
    if method.base == "pair":
        config["base_model"], entries = entries[0]["model"], entries[1:]
    elif method.base in ("required", "optional"):
        config["base_model"] = str(_saved(tmp_path, "base", [base])[0])
    for entry, stat in zip(entries, _saved(tmp_path, "stats", stats) if stats else []):
        entry["parameters"]["statistics"] = str(stat)
    for key, value in CASES[name].items():
        param = method.param(key)
        if param.key is None:
            continue  # the random key: --random-seed
        if param.sequence:
            for entry, v in zip(entries, value):
                entry["parameters"][param.key] = v
        else:
            config["parameters"][param.key] = value
    if any(p.config_required and p.key for p in method.params):  # mergekit's weight has no default
        for entry in entries:
            entry["parameters"].setdefault("weight", 1.0)
    config["models"] = entries
    return config


@pytest.mark.parametrize("name", sorted(CASES))
def test_command_equals_in_memory(name, tmp_path):
    base, models, stats = _inputs(name)
    expected = _call(name, _flat(base), [_flat(m) for m in models], None if stats is None else [_flat(s) for s in stats],
                     **CASES[name])
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(name, tmp_path)))
    assert main(["merge", str(config), str(tmp_path / "out"), "--no-progress", "--random-seed", str(SEED)]) == 0
    # the command computes 16-bit leaves as mergekit does, in 16 bits (checked against mergekit's arithmetic in
    # tests/cli/test_mergekit_arithmetic.py): close to the float32 result (Karcher's iterations drift most)
    _assert_close(checkpoints.load(tmp_path / "out"), expected, rtol=1e-6, bf16_ulps=16)


# Each method runs under one of the two sharding modes, alternating in name order: jit against
# eager is every method's own test above, and the modes' code paths are shared by all methods.
SHARDED_MODES = [(name, *[(AxisType.Explicit, False), (AxisType.Auto, True)][i % 2])
                 for i, name in enumerate(sorted(CASES))]


@pytest.mark.parametrize("name,axis_type,jit", SHARDED_MODES,
                         ids=[f"{n}-{'auto-jit' if jit else 'explicit-eager'}" for n, _, jit in SHARDED_MODES])
def test_sharded_equals_unsharded(name, axis_type, jit):
    base, models, stats = _inputs(name)
    expected = _call(name, base, models, stats, **CASES[name])
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)

    def shard(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.device_put(x, NamedSharding(mesh, SPECS[jax.tree_util.keystr(path, simple=True,
                                                                                            separator="/")])), tree)

    sharded_base, sharded = shard(base), [shard(m) for m in models]
    fn = lambda b, ms: _call(name, b, ms, stats, **CASES[name])  # noqa: E731
    out = (jax.jit(fn) if jit else fn)(sharded_base, sharded)
    _assert_close(out, expected, rtol=2e-5)
    if jit and name == "regmean":
        return  # the Cholesky solve gathers the kernel, and XLA leaves its output replicated under Auto axes
    reference = _reference(name, sharded_base, sharded)
    for a, ref in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
        assert a.sharding.is_equivalent_to(ref.sharding, a.ndim)


def _bad_cases(name):
    """``(hyperparameter, bad setting, expected message)`` for every checked hyperparameter."""
    method = METHODS[name]
    n = _count(method)
    python = inspect.signature(method.function).parameters
    for param in (p for p in method.params if p.name in python):
        if param.scope == "option":
            if param.choices is not None:
                yield param.name, "no-such-choice", f"{param.name} must be one of"
            elif param.kind in (bool, int):
                yield param.name, 2.5, f"{param.name} must be {'a boolean' if param.kind is bool else 'an integer'}"
            elif param.kind is float:
                yield param.name, float("nan"), f"{param.name} must be a finite number"
            continue
        bad = float("nan") if param.check is None else param.check.lo - 1
        good = CASES[name].get(param.name, param.default)
        good = 0.5 if good is REQUIRED else (1.0 if param.sequence else good)
        setting = lambda path, leaf, bad=bad, good=good: bad if path == "layer/bias" else good  # noqa: E731
        problem = "must be a finite number" if param.check is None else f"must be in {param.check}"
        if param.scope == "model":
            value = [setting] + [good] * (n - 1) if param.sequence else setting
            where = f"{param.name} of models[0] at 'layer/bias' {problem}"
        else:
            value, where = setting, f"{param.name} at 'layer/bias' {problem}"
        yield param.name, value, where


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_hyperparameters_are_refused_naming_the_leaf(name):
    base, models, stats = _inputs(name)
    cases = list(_bad_cases(name))
    for param, value, message in cases:
        with pytest.raises((ValueError, TypeError)) as error:
            _call(name, base, models, stats, **{**CASES[name], param: value})
        assert message in str(error.value), (param, str(error.value))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_scalar_leaf_merges_and_unknown_keywords_are_refused(name):
    """A 0-d float leaf (a learned temperature) merges like a one-entry vector; a misspelt
    keyword is a TypeError naming the function, as Python's own."""
    base, models, stats = _inputs(name)
    if METHODS[name].statistics:
        pytest.skip("statistics are per matrix")
    scalar = lambda tree, value: {**tree, "temperature": jnp.float32(value)}  # noqa: E731
    vector = lambda tree, value: {**tree, "temperature": jnp.full((1,), value, jnp.float32)}  # noqa: E731
    values = [0.5 + 0.25 * i for i in range(len(models))]
    hp = CASES[name]
    out = _call(name, scalar(base, 1.0), [scalar(m, v) for m, v in zip(models, values)], stats, **hp)
    expected = _call(name, vector(base, 1.0), [vector(m, v) for m, v in zip(models, values)], stats, **hp)
    assert out["temperature"].shape == ()
    np.testing.assert_allclose(out["temperature"], expected["temperature"][0], rtol=1e-6)
    with pytest.raises(TypeError, match=rf"{METHODS[name].function.__name__}\(\) got an unexpected keyword argument "
                                        r"'densty'"):
        _call(name, base, models, stats, **hp, densty=0.5)
