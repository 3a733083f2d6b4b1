import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge.errors import JaxmergeError
from jaxmerge.merging import draws
from tests.merging.reference import keep_draws


@pytest.mark.parametrize("shape", [(7,), (3, 4, 9), (0, 3)])
def test_blocked_draws_follow_the_documented_stream(shape, monkeypatch):
    monkeypatch.setattr(draws, "DRAW_BLOCK", 8)  # several blocks, the last one overlapping
    key = jax.random.key(3)
    p = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
    for probability in (p, 0.4):
        mask = jax.jit(draws.keep_mask)(key, probability, jnp.zeros(shape))
        np.testing.assert_array_equal(mask, keep_draws(key, probability, shape))


@pytest.mark.parametrize("spec", [P("a", "b"), P(None, "a")])
def test_sharded_draws_equal_the_unsharded_ones(spec):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    key = jax.random.key(5)
    p = jnp.asarray(np.random.default_rng(1).uniform(size=(8, 12)), jnp.float32)
    like = jax.device_put(jnp.zeros((8, 12)), NamedSharding(mesh, spec))
    sharded = draws.keep_mask(key, jax.device_put(p, like.sharding), like)
    np.testing.assert_array_equal(sharded, keep_draws(key, p, (8, 12)))
    np.testing.assert_array_equal(draws.keep_mask(key, 0.5, like), keep_draws(key, 0.5, (8, 12)))


def test_keep_rate_matches_the_probability_and_keys_of_any_kind_work():
    like = jnp.zeros((1000, 1000))
    for key in (jax.random.key(0), jax.random.PRNGKey(0), jax.random.key(0, impl="rbg")):
        rate = float(draws.keep_mask(key, 0.3, like).mean())
        assert abs(rate - 0.3) < 0.003  # 6 standard deviations of a million draws
    assert bool(draws.keep_mask(jax.random.key(0), 1.0, like).all())
    assert not bool(draws.keep_mask(jax.random.key(0), 0.0, like).any())
    other = draws.keep_mask(jax.random.key(1), 0.5, like)
    assert 0.2 < float((other != draws.keep_mask(jax.random.key(0), 0.5, like)).mean()) < 0.8


def test_too_large_arrays_are_refused():
    with pytest.raises(JaxmergeError, match="2\\*\\*32"):
        draws.keep_mask(jax.random.key(0), 0.5, jax.ShapeDtypeStruct((1 << 16, 1 << 16), jnp.float32))


@pytest.mark.parametrize("n", [16, 21, 8])
def test_host_drawn_masks_follow_the_documented_stream(n, monkeypatch):
    monkeypatch.setattr(draws, "DRAW_BLOCK", 8)  # several blocks, the last one overlapping, or one
    key = jax.random.key(3)
    np.testing.assert_array_equal(draws.host_keep_mask(key, 0.4, n), keep_draws(key, 0.4, (n,)))


def test_generator_words_are_jaxs_threefry():
    rng = np.random.default_rng(7)
    keypair = jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint32))
    counters = jnp.asarray(np.concatenate([rng.integers(0, 2**32, 1000, dtype=np.uint32),
                                           np.asarray([0, 1, 2**32 - 1], np.uint32)]))
    first, second = jax.jit(draws._words)(keypair, counters)
    expected = np.asarray(jax.extend.random.threefry_2x32(keypair, jnp.concatenate([jnp.zeros_like(counters), counters])))
    np.testing.assert_array_equal(np.concatenate([first, second]), expected)
