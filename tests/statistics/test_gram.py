import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxmerge


def _gram(x):
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return x.T @ x, x.shape[0]


def _check(stats, expected):
    for (gram, rows), got in zip(expected, stats):
        np.testing.assert_allclose(got["gram"], gram, rtol=2e-5, atol=1e-4)
        assert float(got["count"]) == rows


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 7, rngs=rngs)
        self.l2 = nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _x(n=20, d=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, d)), jnp.float32)


def test_nnx_mlp_inputs_recomputed_by_hand():
    model = MLP(nnx.Rngs(0))
    x = _x()
    stats = jaxmerge.input_grams(model, [(x[:12], None), (x[12:], None)])
    hidden = jax.nn.relu(model.l1(x))
    _check([stats["l1"]["kernel"]["value"], stats["l2"]["kernel"]["value"]], [_gram(x), _gram(hidden)])
    assert set(stats) == {"l1", "l2"} and set(stats["l1"]) == {"kernel"}


def test_linen_mlp_and_num_examples():
    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(7, name="fc1")(x))
            return nn.Dense(3, name="fc2")(h)

    module = LinenMLP()
    x = _x()
    variables = module.init(jax.random.key(0), x)
    stats = jaxmerge.input_grams(lambda v, batch: module.apply(v, batch[0]), [(x[:8],), (x[8:],)],
                                 params=variables, num_examples=15)
    w1, b1 = variables["params"]["fc1"]["kernel"], variables["params"]["fc1"]["bias"]
    hidden = jax.nn.relu(x[:15] @ w1 + b1[None])
    _check([stats["params"]["fc1"]["kernel"], stats["params"]["fc2"]["kernel"]], [_gram(x[:15]), _gram(hidden)])


class Block(nnx.Module):
    """A pre-norm transformer block: LinearGeneral q/k/v, Einsum output projection, MLP."""

    def __init__(self, d=8, heads=2, rngs=None):
        self.heads, self.head_dim = heads, d // heads
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.LinearGeneral(d, (3, heads, d // heads), rngs=rngs)
        self.out = nnx.Einsum("btnh,nhd->btd", (heads, d // heads, d), rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = nnx.Linear(d, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, d, rngs=rngs)

    def attention(self, h):
        q, k, v = jnp.moveaxis(self.qkv(h), 2, 0)
        weights = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(self.head_dim), axis=-1)
        return jnp.einsum("bnts,bsnh->btnh", weights, v)

    def __call__(self, x):
        x = x + self.out(self.attention(self.norm1(x)))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


def test_transformer_block_inputs_recomputed_by_hand():
    block = Block(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 8)), jnp.float32)
    stats = jaxmerge.input_grams(block, [(x,)])
    attended = block.attention(block.norm1(x))
    residual = x + block.out(attended)
    mlp_in = block.norm2(residual)
    expected = {
        "qkv": _gram(block.norm1(x)),
        "out": _gram(np.asarray(attended).reshape(12, 8)),  # the (heads, head_dim) axes flattened
        "fc1": _gram(mlp_in),
        "fc2": _gram(jax.nn.gelu(block.fc1(mlp_in))),
    }
    for name, reference in expected.items():
        _check([stats[name]["kernel"]["value"]], [reference])
    assert stats["out"]["kernel"]["value"]["gram"].shape == (8, 8)


def test_sharded_batch_gives_the_same_grams():
    model = MLP(nnx.Rngs(0))
    x = _x(n=32)
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
        sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        stats = jaxmerge.input_grams(model, [(sharded,)])
        _check([stats["l1"]["kernel"]["value"]], [_gram(x)])


def test_grams_save_and_load_with_orbax(tmp_path):
    from orbax.checkpoint import v1 as ocp

    stats = jaxmerge.input_grams(MLP(nnx.Rngs(0)), [(_x(),)])
    ocp.save(tmp_path / "grams", stats)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), stats)
    jax.tree.map(np.testing.assert_array_equal, ocp.load(tmp_path / "grams", abstract), stats)


def test_errors():
    with pytest.raises(ValueError, match="found no linear layer"):
        jaxmerge.input_grams(lambda p, batch: batch[0] * p["scale"][None], [(_x(),)], params={"scale": jnp.ones(5)})
    with pytest.raises(ValueError, match="data yielded no examples"):
        jaxmerge.input_grams(MLP(nnx.Rngs(0)), [])


def test_wide_inputs_use_the_blocked_symmetric_product():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((40, 640)), jnp.float32)
    params = {"w": jnp.ones((640, 3)), "v": jnp.ones((640, 2))}
    stats = jaxmerge.input_grams(lambda p, batch: (batch[0] @ p["w"], batch[0] @ p["v"]), [(x,)], params=params)
    for name in ("w", "v"):  # two kernels sharing one input
        _check([stats[name]], [_gram(x)])
