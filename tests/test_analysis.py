import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from tests.helpers import random_tree


def test_interpolation_curve_and_barrier():
    a, b = {"w": jnp.asarray([0.0, 0.0])}, {"w": jnp.asarray([2.0, 0.0])}

    def loss(p):  # a bump in the middle of the path
        x = float(p["w"][0])
        return (x - 1) ** 2 * 0 + np.exp(-((x - 1) ** 2) * 4) + 0.1 * x

    ts, values = jaxmerge.interpolation_curve(a, b, loss, num=5)
    np.testing.assert_allclose(ts, [0, 0.25, 0.5, 0.75, 1])
    expected = [loss({"w": np.asarray([2 * t, 0])}) for t in ts]
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    line = (1 - ts) * values[0] + ts * values[-1]
    assert jaxmerge.barrier(ts, values) == pytest.approx(np.max(values - line))
    assert jaxmerge.barrier(ts, -values, higher_is_better=True) == pytest.approx(np.max(values - line))
    assert jaxmerge.barrier([0, 0.5, 1], [1.0, 0.5, 0.0]) == pytest.approx(0.0)  # linear: no barrier
    with pytest.raises(ValueError, match="evaluate returned inf for t=0"):
        jaxmerge.interpolation_curve(a, b, lambda p: float("inf"))


def test_task_vector_similarity_and_sign_conflicts():
    base = random_tree(0)
    models = [random_tree(i) for i in (1, 2, 3)]
    similarity = jaxmerge.task_vector_similarity(base, models)
    conflicts = jaxmerge.sign_conflict_rate(base, models)

    def vector(m):
        return np.concatenate([np.asarray(x, np.float64).ravel() - np.asarray(y, np.float64).ravel()
                               for x, y in zip(_floats(m), _floats(base))])

    vectors = [vector(m) for m in models]
    for i in range(3):
        for j in range(3):
            cosine = vectors[i] @ vectors[j] / np.linalg.norm(vectors[i]) / np.linalg.norm(vectors[j])
            assert similarity[i, j] == pytest.approx(cosine, abs=1e-5)
            both = (vectors[i] != 0) & (vectors[j] != 0)
            rate = np.mean(np.sign(vectors[i][both]) != np.sign(vectors[j][both])) if i != j else 0.0
            assert conflicts[i, j] == pytest.approx(rate, abs=1e-6)


def _floats(tree):
    import jax
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_plots_are_written(tmp_path):
    jaxmerge.plot_interpolation({"naive": ([0, 0.5, 1], [1, 2, 1]), "aligned": ([0, 0.5, 1], [1, 1.2, 1])},
                                tmp_path / "curve.png")
    jaxmerge.plot_similarity(np.eye(3), ["a", "b", "c"], tmp_path / "similarity.png")
    for name in ("curve.png", "similarity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layerwise_barriers_move_one_layer_at_a_time():
    rng = np.random.default_rng(0)
    a = {name: {"kernel": jnp.asarray(rng.standard_normal((3, 3)), jnp.float32),
                "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)} for name in ("first", "second")}
    b = jax.tree.map(lambda x: -x, a)
    x = rng.standard_normal((16, 3))

    def loss(p):
        h = np.tanh(x @ np.asarray(p["first"]["kernel"]) + np.asarray(p["first"]["bias"]))
        return float(np.mean((h @ np.asarray(p["second"]["kernel"]) + np.asarray(p["second"]["bias"]) - 1) ** 2))

    for cumulative, moved_with in ((False, {"first": {"first"}, "second": {"second"}}),
                                   (True, {"first": {"first"}, "second": {"first", "second"}})):
        got = jaxmerge.layerwise_barriers(a, b, loss, num=5, cumulative=cumulative)
        assert list(got) == ["first", "second"]
        for layer in got:
            ts = np.linspace(0, 1, 5)
            values = [loss({n: {k: (1 - t) * np.asarray(v) + t * np.asarray(b[n][k]) if n in moved_with[layer] else v
                                for k, v in leaves.items()} for n, leaves in a.items()}) for t in ts]
            line = (1 - ts) * values[0] + ts * values[-1]
            assert got[layer] == pytest.approx(max(np.asarray(values) - line), rel=1e-5, abs=1e-6)
