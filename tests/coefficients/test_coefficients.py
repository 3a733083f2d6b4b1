"""Learned and searched merge coefficients: gradients against finite differences and closed
forms, AdaMerging's objective against a hand-written one, the search strategies against known
optima, and MAP's surrogates against exact quadratics."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmerge
from jaxmerge import coefficients
from jaxmerge.coefficients import (
    Quadratic,
    adamerging,
    combine,
    fit_quadratic,
    init_coefficients,
    lcsc,
    pareto_front,
    prediction_entropy,
    quadratic_surrogates,
    search,
    task_vectors,
)
from jaxmerge.errors import JaxmergeError

RNG = np.random.default_rng(0)
BASE = {"dense": {"kernel": jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32), "bias": jnp.zeros(3)},
        "step": jnp.asarray(7, jnp.int32)}
MODELS = [jax.tree.map(lambda x, i=i: x + jnp.asarray(RNG.standard_normal(x.shape), x.dtype) if x.dtype == jnp.float32
                       else x, BASE) for i in range(3)]


def _finite_difference(f, x, eps=1e-3):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in range(x.size):
        step = np.zeros_like(x)
        step.flat[i] = eps
        grad.flat[i] = (f(jnp.asarray(x + step, jnp.float32)) - f(jnp.asarray(x - step, jnp.float32))) / (2 * eps)
    return grad


def _loss(params):
    return jnp.sum(jnp.tanh(params["dense"]["kernel"]) ** 2) + jnp.sum(params["dense"]["bias"] ** 3)


def test_combine_is_task_arithmetic_and_its_gradient_is_closed_form():
    tv = task_vectors(BASE, MODELS)
    c = jnp.asarray([0.2, 0.5, -0.3])
    expected = jaxmerge.task_arithmetic(BASE, MODELS, list(np.asarray(c)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), combine(tv, c), expected)
    assert int(combine(tv, c)["step"]) == 7
    linear = jax.grad(lambda c: combine(tv, c)["dense"]["kernel"].sum())(c)
    np.testing.assert_allclose(linear, [float((m["dense"]["kernel"] - BASE["dense"]["kernel"]).sum()) for m in MODELS],
                               rtol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda c: _loss(combine(tv, c)))(c),
                               _finite_difference(lambda c: float(_loss(combine(tv, c))), c), rtol=2e-3, atol=2e-3)


def test_per_tensor_coefficients_scale_each_tensor_on_its_own():
    tv = task_vectors(BASE, MODELS)
    c = init_coefficients(tv, "tensor", 0.0)
    c["dense"]["bias"] = jnp.asarray([1.0, 0.0, 0.0])
    merged = combine(tv, c)
    np.testing.assert_array_equal(merged["dense"]["kernel"], BASE["dense"]["kernel"])
    np.testing.assert_allclose(merged["dense"]["bias"], MODELS[0]["dense"]["bias"], rtol=1e-6)
    grads = jax.grad(lambda c: _loss(combine(tv, c)))(init_coefficients(tv, "tensor", 0.4))
    assert grads["dense"]["kernel"].shape == (3,) and grads["step"] is None


def test_ties_masked_task_vectors_give_ties_at_equal_coefficients():
    tv = task_vectors(BASE, MODELS, density=0.4, elect_sign=True)
    merged = combine(tv, jnp.full(3, 0.7))
    expected = jaxmerge.ties(BASE, MODELS, density=0.4, lambda_=0.7, normalize=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged, expected)
    kept = [(np.asarray(v["dense"]["kernel"]) != 0).sum() for v in tv.vectors]
    assert all(k <= 4 for k in kept)  # at most int(0.4 * 12) entries each, fewer after the sign election


@pytest.mark.parametrize("merge,x", [
    (lambda t: jaxmerge.slerp(MODELS[0], MODELS[1], t), jnp.float32(0.3)),
    (lambda w: jaxmerge.average(MODELS, w), jnp.asarray([0.2, 0.5, 0.3])),
    (lambda w: jaxmerge.fisher_merge(MODELS, [jax.tree.map(jnp.abs, m) for m in MODELS], w), jnp.asarray([1.0, 2.0, 0.5])),
], ids=["slerp t", "average weights", "fisher weights"])
def test_merges_are_differentiable_in_their_coefficients(merge, x):
    loss = lambda x: _loss(merge(x))
    np.testing.assert_allclose(jax.grad(loss)(x), _finite_difference(lambda v: float(loss(v)), x), rtol=3e-3, atol=3e-3)


def test_prediction_entropy_is_the_mean_shannon_entropy():
    logits = RNG.standard_normal((5, 4))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -(p * np.log(p)).sum(1).mean()
    np.testing.assert_allclose(prediction_entropy(jnp.asarray(logits)), expected, rtol=1e-6)
    np.testing.assert_allclose(prediction_entropy([jnp.asarray(logits)] * 2), 2 * expected, rtol=1e-6)


def test_adamerging_lowers_the_entropy_and_keeps_coefficients_in_bounds(standard_promotion):  # optax.adam
    x = jnp.asarray(RNG.standard_normal((16, 4)), jnp.float32)
    apply = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"][None]
    for vectors in (task_vectors(BASE, MODELS), task_vectors(BASE, MODELS, density=0.5, elect_sign=True)):
        result = adamerging(apply, vectors, [x] * 40, optimizer=optax.adam(0.05))
        assert float(result.losses[-1]) < float(result.losses[0])
        leaves = jax.tree.leaves(result.coefficients)
        assert all(float(c.min()) >= 0 and float(c.max()) <= 1 for c in leaves)
        jax.tree.map(np.testing.assert_array_equal, result.params, combine(vectors, result.coefficients))
    with pytest.raises(JaxmergeError, match="at least one batch"):
        adamerging(apply, task_vectors(BASE, MODELS), [])


def _bowl(params):
    return -((params["a"] - 0.3) ** 2 + (params["b"] + 1.5) ** 2)


@pytest.mark.parametrize("strategy,budget,tolerance", [("grid", 121, 0.1 + 1e-6), ("random", 256, 0.25), ("cmaes", 192, 1e-2)])
def test_search_strategies_find_the_optimum_of_a_known_function(strategy, budget, tolerance):
    result = search(lambda a, b: {"a": a, "b": b}, _bowl, {"a": (-1.0, 1.0), "b": (-2.0, 0.0)}, strategy=strategy,
                    budget=budget, key=jax.random.key(1))
    assert abs(result.best["a"] - 0.3) <= tolerance and abs(result.best["b"] + 1.5) <= tolerance
    assert result.candidates.shape[1] == 2 and len(result.scores) == len(result.candidates)
    assert result.best_score == pytest.approx(float(_bowl(result.best)), abs=1e-6)


def test_cmaes_compiles_its_steps_once_per_search():
    """The first state is typed as the later ones: a second compilation of each step took
    0.3-0.6 s, more than a small search's evaluations."""
    from evosax.algorithms import CMA_ES

    before = CMA_ES.ask._cache_size(), CMA_ES.tell._cache_size()
    search(lambda a, b, c: a + b + c, lambda v: -v ** 2, {n: (-1.0, 1.0) for n in "abc"}, strategy="cmaes",
           budget=35, population=7, key=jax.random.key(0))  # a shape no other test compiles
    assert (CMA_ES.ask._cache_size(), CMA_ES.tell._cache_size()) == (before[0] + 1, before[1] + 1)


def test_search_refuses_bad_spaces_and_strategies():
    with pytest.raises(JaxmergeError, match="high > low"):
        search(lambda a: a, lambda p: p, {"a": (1.0, 1.0)})
    with pytest.raises(JaxmergeError, match="strategy must be"):
        search(lambda a: a, lambda p: p, {"a": (0.0, 1.0)}, strategy="annealing")
    with pytest.raises(JaxmergeError, match="needs a key"):
        search(lambda a: a, lambda p: p, {"a": (0.0, 1.0)}, strategy="random")


def test_lcsc_finds_the_combination_of_checkpoints_that_reaches_a_target():
    checkpoints = [{"w": jnp.asarray(RNG.standard_normal(3), jnp.float32)} for _ in range(3)]
    coefficients = np.asarray([0.5, -0.2, 0.9])
    target = sum(c * np.asarray(p["w"]) for c, p in zip(coefficients, checkpoints))
    found = lcsc(checkpoints, lambda p: -jnp.sum((p["w"] - target) ** 2), key=jax.random.key(0), generations=60)
    np.testing.assert_allclose(found.best, coefficients, atol=1e-2)
    with pytest.raises(JaxmergeError, match="one coefficient per checkpoint"):
        lcsc(checkpoints, lambda p: p["w"].sum(), key=jax.random.key(0), init=[1.0])


def test_quadratic_surrogates_recover_quadratic_losses_and_the_front_is_non_dominated():
    quadratic = np.asarray([[2.0, 0.5], [0.5, 1.0]])
    exact = Quadratic(0.7, np.asarray([-1.0, 0.3]), quadratic)
    (fitted,) = quadratic_surrogates([lambda c: exact.constant + c @ exact.linear + c @ quadratic @ c], 2,
                                     key=jax.random.key(0))
    np.testing.assert_allclose(fitted.quadratic, quadratic, atol=1e-4)
    np.testing.assert_allclose(fitted.linear, exact.linear, atol=1e-4)
    other = Quadratic(0.0, np.asarray([0.0, -2.0]), np.eye(2))
    c, losses = pareto_front([exact, other], key=jax.random.key(1), samples=2000)
    np.testing.assert_allclose(losses, np.stack([exact(c), other(c)], 1))
    everything = np.stack([q(np.asarray(jax.random.uniform(jax.random.key(1), (2000, 2)), np.float64))
                           for q in (exact, other)], 1)
    for point in losses:  # nothing sampled is better in both tasks
        assert not np.any(np.all(everything < point - 1e-12, axis=1))
    with pytest.raises(JaxmergeError, match="needs at least 6 points"):
        fit_quadratic(np.zeros((3, 2)), np.zeros(3))


def test_combine_on_a_mesh_keeps_the_sharding_and_the_numbers():
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    place = lambda tree: jax.tree.map(lambda a: jax.device_put(a, sharding) if a.ndim == 2 else a, tree)
    tv, placed = task_vectors(BASE, MODELS), task_vectors(place(BASE), [place(m) for m in MODELS])
    c = jnp.asarray([0.2, 0.5, -0.3])
    with jax.set_mesh(mesh):
        merged = jax.jit(combine)(placed, c)
        grads = jax.jit(jax.grad(lambda c: _loss(combine(placed, c))))(c)
    assert merged["dense"]["kernel"].sharding.is_equivalent_to(sharding, 2)
    np.testing.assert_allclose(merged["dense"]["kernel"], combine(tv, c)["dense"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(grads, jax.grad(lambda c: _loss(combine(tv, c)))(c), rtol=1e-5)


@pytest.mark.parametrize("strategy", ["random", "cmaes"])
def test_an_interrupted_search_resumes_where_it_was_saved(tmp_path, monkeypatch, strategy):
    module = importlib.import_module("jaxmerge.coefficients.search")  # the name search is the function

    run = lambda **kw: search(lambda a, b: {"a": a, "b": b}, _bowl, {"a": (-1.0, 1.0), "b": (-2.0, 0.0)},
                              strategy=strategy, budget=24, population=8, key=jax.random.key(4), **kw)
    whole = run()
    save, saved = module._save, []

    def save_then_stop(directory, round_, record):
        save(directory, round_, record)
        saved.append(round_)
        if round_ == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(module, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint=tmp_path / "search")
    monkeypatch.setattr(module, "_save", save)
    resumed = run(checkpoint=tmp_path / "search")
    assert saved == [1, 2] and [p.name for p in tmp_path.joinpath("search").iterdir()] == ["round_000003"]
    np.testing.assert_array_equal(resumed.candidates, whole.candidates)
    np.testing.assert_array_equal(resumed.scores, whole.scores)
    assert resumed.best == whole.best


def test_dare_masks_are_drawn_once_and_rescale_the_kept_entries():
    big = {"w": jnp.zeros(4000)}
    models = [{"w": jnp.asarray(RNG.standard_normal(4000), jnp.float32)} for _ in range(2)]
    tv = task_vectors(big, models, density=0.3, drop="random", key=jax.random.key(1))
    again = task_vectors(big, models, density=0.3, drop="random", key=jax.random.key(1))
    for v, w, m in zip(tv.vectors, again.vectors, models):
        kept = np.asarray(v["w"]) != 0
        assert 0.27 < kept.mean() < 0.33
        np.testing.assert_allclose(np.asarray(v["w"])[kept], np.asarray(m["w"])[kept] / 0.3, rtol=1e-6)
        np.testing.assert_array_equal(v["w"], w["w"])
    assert not np.array_equal(np.asarray(tv.vectors[0]["w"]) != 0, np.asarray(tv.vectors[1]["w"]) != 0)
    with pytest.raises(JaxmergeError, match="drop must be"):
        task_vectors(big, models, density=0.3, drop="random")


def test_learned_per_tensor_coefficients_apply_to_checkpoints_streamed(tmp_path):
    from jaxmerge import checkpoints

    base = {"a": jnp.asarray(RNG.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(4)}
    models = [jax.tree.map(lambda x, i=i: x + i + 1.0, base) for i in range(2)]
    c = {"a": jnp.asarray([0.2, 0.7]), "b": jnp.asarray([1.0, -0.5])}
    paths = [checkpoints.save(tmp_path / name, tree, format="safetensors")
             for name, tree in [("base", base), ("m0", models[0]), ("m1", models[1])]]
    plan = jaxmerge.plan("task_arithmetic", weights=coefficients.as_weights(c))
    out = checkpoints.stream_merge(plan, paths[1:], tmp_path / "out", base=paths[0],
                                   options=checkpoints.StreamOptions(progress=False))
    expected = combine(task_vectors(base, models), c)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), checkpoints.load(out), expected)
