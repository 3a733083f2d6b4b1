"""Sharding beyond the conformance suite (which runs every merge method on the 8-device simulated
CPU mesh): tie-breaking and random draws independent of the sharding, RegMean's solve, and the
statistics with model-parallel params and sharded batches, under Explicit and Auto mesh axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmerge

AXIS_TYPES = pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
SPECS = {"w": P("data", "model"), "v": P(None, "model"), "b": P("model"), "s": P()}


def _tree(seed, rounded=False):
    rng = np.random.default_rng(seed)
    tree = {"w": rng.standard_normal((128, 64)), "v": rng.standard_normal((8, 16)), "b": rng.standard_normal(32),
            "s": rng.standard_normal(())}
    if rounded:  # many equal magnitudes: exercises the exact top-k's tie-breaking across shards
        tree = {k: np.round(v * 2) / 2 for k, v in tree.items()}
    return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def _mesh(axis_type):
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def _shard(tree, mesh, specs=SPECS):
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}


KEY = jax.random.key(0)
RANDOM = {
    "dare_ties": lambda b, ms: jaxmerge.dare_ties(b, ms, density=0.3, key=KEY),
    "della": lambda b, ms: jaxmerge.della(b, ms, density=0.4, key=KEY),
}
TIES = {  # the exact top-k breaks ties in magnitude by flat index, across shards too
    "ties": lambda b, ms: jaxmerge.ties(b, ms, density=0.3),
    "breadcrumbs_ties": lambda b, ms: jaxmerge.breadcrumbs_ties(b, ms, density=0.4, gamma=0.1),
}


def _check(out, expected, sharded_like, exact):
    for name in expected:
        if exact:
            np.testing.assert_array_equal(out[name], expected[name], err_msg=name)
        else:
            np.testing.assert_allclose(out[name], expected[name], rtol=2e-5, atol=2e-6, err_msg=name)
        assert out[name].sharding.is_equivalent_to(sharded_like[name].sharding, out[name].ndim), name


@pytest.mark.parametrize("axis_type,jit", [(AxisType.Explicit, False), (AxisType.Auto, True)],
                         ids=["explicit-eager", "auto-jit"])
@pytest.mark.parametrize("name", list(TIES))
def test_tied_magnitudes_are_broken_alike_on_any_sharding(name, jit, axis_type):
    """Every method's sharded run is checked in tests/merging/test_conformance.py; here, many equal
    magnitudes, whose tie-breaking by flat index must not depend on the shards (``w`` is larger
    than sparsify.SORT_LIMIT, so its top-k is the radix selection on both kinds of axes)."""
    fn = TIES[name]
    base, models = _tree(0, rounded=True), [_tree(i, rounded=True) for i in (1, 2, 3)]
    expected = fn(base, models)
    mesh = _mesh(axis_type)
    sharded_base, sharded = _shard(base, mesh), [_shard(m, mesh) for m in models]
    out = (jax.jit(fn) if jit else fn)(sharded_base, sharded)
    _check(out, expected, sharded_base, exact=True)


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_random_methods_draw_the_same_whatever_the_sharding(name):
    """Explicit axes, where each shard draws at its own flat indices (under Auto axes the
    unsharded code runs, partitioned by XLA: the conformance suite compares it with no mesh)."""
    fn = RANDOM[name]
    base, models = _tree(0), [_tree(i) for i in (1, 2)]
    mesh = _mesh(AxisType.Explicit)
    other = {"w": P("model", "data"), "v": P("data", None), "b": P("data"), "s": P()}
    a = fn(_shard(base, mesh), [_shard(m, mesh) for m in models])
    b = fn(_shard(base, mesh, other), [_shard(m, mesh, other) for m in models])
    for k in a:  # the same entries are dropped; values agree to rounding
        np.testing.assert_array_equal(np.asarray(a[k]) == np.asarray(base[k]), np.asarray(b[k]) == np.asarray(base[k]))
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6)


@AXIS_TYPES
def test_regmean_keeps_the_kernel_sharding(axis_type):
    rng = np.random.default_rng(0)
    models = [{"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)} for _ in range(2)]
    grams = [{"w": {"gram": jnp.asarray((x := rng.standard_normal((30, 16))).T @ x, jnp.float32)}} for _ in range(2)]
    expected = jaxmerge.regmean(models, grams)
    mesh = _mesh(axis_type)
    sharded = [{"w": jax.device_put(m["w"], NamedSharding(mesh, P(None, "model")))} for m in models]
    _check(jaxmerge.regmean(sharded, grams), expected, sharded[0], exact=False)


def _mlp_params():
    rng = np.random.default_rng(1)
    return {"l1": {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32), "b": jnp.zeros(16)},
            "l2": {"w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32), "b": jnp.zeros(4)}}


def _mlp(params, batch, explicit=False):
    h = jnp.tanh(batch[0] @ params["l1"]["w"] + params["l1"]["b"][None])
    # under explicit axes, a contraction over sharded features must say how to shard its output
    out_sharding = P(*jax.typeof(h).sharding.spec[:-1], None) if explicit else None
    return jnp.einsum("bi,io->bo", h, params["l2"]["w"], out_sharding=out_sharding) + params["l2"]["b"][None]


@AXIS_TYPES
def test_statistics_with_model_parallel_params_and_a_sharded_batch(axis_type):
    params = _mlp_params()
    rng = np.random.default_rng(2)
    x, y = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32), jnp.asarray(rng.integers(0, 4, 32))
    expected_fisher = jaxmerge.diagonal_fisher(_mlp, [(x, y)], params=params, microbatch=8)
    expected_grams = jaxmerge.input_grams(_mlp, [(x, y)], params=params)
    mesh = _mesh(axis_type)
    specs = {"l1": {"w": P(None, "model"), "b": P("model")}, "l2": {"w": P("model", None), "b": P()}}
    apply = (lambda p, batch: _mlp(p, batch, explicit=True)) if axis_type == AxisType.Explicit else _mlp
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs,
                               is_leaf=lambda s: isinstance(s, P))
        batch = [(jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(y, NamedSharding(mesh, P("data"))))]
        fisher = jaxmerge.diagonal_fisher(apply, batch, params=sharded, microbatch=8)
        grams = jaxmerge.input_grams(apply, batch, params=sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), fisher, expected_fisher)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grams, expected_grams)
    for got, param in zip(jax.tree.leaves(fisher), jax.tree.leaves(sharded)):  # Fisher sharded like the params
        assert got.sharding.is_equivalent_to(param.sharding, got.ndim)
