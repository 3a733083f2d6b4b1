import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge
from jaxmerge.merging.task_vectors import leaf_key
from tests.helpers import assert_trees_match, random_tree, tree_reference
from tests.merging import reference


def _models(n, seed=0, rounded=False):
    """A base and n fine-tunes whose task vectors have many equal magnitudes when rounded."""
    base = random_tree(100 + seed)

    def tune(i):
        delta = random_tree(seed + i, scale=0.1)
        if rounded:
            delta = jax.tree.map(lambda x: jnp.round(x * 20) / 20 if x.dtype != jnp.int32 else x, delta)
        return jax.tree.map(lambda b, d: b + d.astype(b.dtype) if b.dtype != jnp.int32 else d, base, delta)

    return base, [tune(i) for i in range(n)]


def _reference(base, models, sparsify, *, weights, consensus, normalize, lambda_=1.0):
    def leaf(xs):
        b = xs[0]
        deltas = [sparsify(x - b) for x in xs[1:]]
        return reference.combine(b, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
    return tree_reference(leaf, base, *models)


# bf16 task vectors are computed exactly in float32 from the bf16 inputs, in the reference too.
DETERMINISTIC = {
    "ties_tiny_density": (jaxmerge.ties, dict(density=0.01), lambda d: np.where(reference.magnitude(d, 0.01), d, 0),
                          "sum", True),
    "breadcrumbs_gamma_over": (jaxmerge.breadcrumbs, dict(density=0.9, gamma=0.3),
                               lambda d: np.where(reference.breadcrumbs(d, 0.9, 0.3), d, 0), None, False),
    "ties": (jaxmerge.ties, dict(density=0.4), lambda d: np.where(reference.magnitude(d, 0.4), d, 0), "sum", True),
    "ties_count": (jaxmerge.ties, dict(density=0.6, majority_sign="count"),
                   lambda d: np.where(reference.magnitude(d, 0.6), d, 0), "count", True),
    "ties_l1": (jaxmerge.ties, dict(density=0.5, rescale=True),
                lambda d: reference.rescaled(d, reference.magnitude(d, 0.5), "l1"), "sum", True),
    "breadcrumbs": (jaxmerge.breadcrumbs, dict(density=0.5, gamma=0.2),
                    lambda d: np.where(reference.breadcrumbs(d, 0.5, 0.2), d, 0), None, False),
    "breadcrumbs_ties": (jaxmerge.breadcrumbs_ties, dict(density=0.5, gamma=0.2),
                         lambda d: np.where(reference.breadcrumbs(d, 0.5, 0.2), d, 0), "sum", False),
    "task_arithmetic": (jaxmerge.task_arithmetic, {}, lambda d: d, None, False),
}


@pytest.mark.parametrize("rounded", [False, True], ids=["distinct", "tied-magnitudes"])
@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_deterministic_methods_match_numpy(name, rounded):
    fn, kwargs, sparsify, consensus, normalize = DETERMINISTIC[name]
    base, models = _models(3, rounded=rounded)
    weights = [1.0, 0.6, -0.4]
    out = jax.jit(lambda b, ms: fn(b, ms, weights, lambda_=0.9, **kwargs))(base, models)
    expected = _reference(base, models, sparsify, weights=weights, consensus=consensus, normalize=normalize,
                          lambda_=0.9)
    assert_trees_match(out, expected)


def _draws(key, path, j, shape):
    """The documented random contract: fold the leaf path's key with the model index."""
    return jax.random.fold_in(leaf_key(key, path), j)


def _random_reference(base, models, key, weights, mask_fn, rescale, consensus, normalize):
    """Reference that regenerates the documented masks, then combines in NumPy."""
    paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
             jax.tree_util.tree_leaves_with_path(base)]
    leaves = []
    for i, (path, b) in enumerate(zip(paths, jax.tree.leaves(base))):
        if b.dtype == jnp.int32:
            leaves.append(b)
            continue
        b64 = np.asarray(b, np.float64)
        deltas = []
        for j, m in enumerate(models):
            d = np.asarray(jax.tree.leaves(m)[i], np.float64) - b64
            mask, keep = mask_fn(_draws(key, path, j, d.shape), d)
            deltas.append(reference.rescaled(d, mask, rescale, keep))
        merged = reference.combine(b64, deltas, weights, consensus=consensus, normalize=normalize, lambda_=1.0)
        leaves.append(jnp.asarray(merged, b.dtype))
    return jax.tree.unflatten(jax.tree.structure(base), leaves)


def _dare(density):
    return lambda key, d: (reference.keep_draws(key, density, d.shape), density)


def _della(density, epsilon):
    def draw(key, d):
        p = reference.della_probabilities(d.astype(np.float32), density, epsilon).astype(np.float32)
        return reference.della_keep(key, d, density, epsilon), p
    return draw


RANDOM = {
    "dare_linear": (jaxmerge.dare_linear, dict(density=0.5), _dare(0.5), "l1", None, False),
    "dare_linear_density": (jaxmerge.dare_linear, dict(density=0.3, rescale="density"), _dare(0.3), "density",
                            None, False),
    "dare_ties": (jaxmerge.dare_ties, dict(density=0.5), _dare(0.5), "l1", "sum", False),
    "della": (jaxmerge.della, dict(density=0.5, epsilon=0.2), _della(0.5, 0.2), "l1", "sum", True),
    "della_linear": (jaxmerge.della_linear, dict(density=0.6, epsilon=0.1, rescale="density"),
                     _della(0.6, 0.1), "density", None, False),
}


@pytest.mark.parametrize("name", list(RANDOM))
def test_random_methods_match_numpy_with_the_documented_draws(name):
    fn, kwargs, mask_fn, rescale, consensus, normalize = RANDOM[name]
    base, models = _models(3, seed=3)
    key = jax.random.key(42)
    weights = [0.5, 1.0, 0.7]
    out = fn(base, models, weights, key=key, **kwargs)
    expected = _random_reference(base, models, key, weights, mask_fn, rescale, consensus, normalize)
    assert_trees_match(out, expected, f32_tol=2e-5)


@pytest.mark.parametrize("fn", [jaxmerge.dare_ties, jaxmerge.della])
def test_same_key_same_output_whatever_the_leaf_order(fn):
    base, models = _models(2, seed=5)
    key = jax.random.key(7)
    full = fn(base, models, density=0.5, key=key)
    assert_trees_match(fn(base, models, density=0.5, key=key), full, f32_tol=0)
    # a tree holding only some of the leaves, in another container order, draws the same
    sub = lambda t: {"z": t["params"]["Dense_1"], "a": t["extra"]}  # noqa: E731
    partial = fn(sub(base), [sub(m) for m in models], density=0.5, key=key)
    with pytest.raises(AssertionError):
        assert_trees_match(fn(base, models, density=0.5, key=jax.random.key(8)), full, f32_tol=0)
    # different paths give different draws, so compare by path-equivalent leaves only
    relabel = lambda t: {"params": {"Dense_1": t["z"]}, "extra": t["a"]}  # noqa: E731
    relabeled = fn(relabel(sub(base)), [relabel(sub(m)) for m in models], density=0.5, key=key)
    assert_trees_match(relabeled["params"]["Dense_1"], full["params"]["Dense_1"], f32_tol=0)
    assert_trees_match(relabeled["extra"], full["extra"], f32_tol=0)
    assert jax.tree.structure(partial) == jax.tree.structure(sub(base))


def test_ties_with_density_one_and_one_model_is_task_arithmetic():
    base, models = _models(1, seed=9)
    assert_trees_match(jaxmerge.ties(base, models, [0.7], density=1.0),
                       jaxmerge.task_arithmetic(base, models, [1.0]), f32_tol=1e-6)
    assert_trees_match(jaxmerge.ties(base, models, density=1.0),
                       jaxmerge.task_arithmetic(base, models), f32_tol=1e-6)


def test_zero_task_vectors_give_the_base():
    base, _ = _models(1)
    for fn, kwargs in [(jaxmerge.ties, dict(density=0.5)), (jaxmerge.breadcrumbs_ties, dict(density=0.5)),
                       (jaxmerge.dare_ties, dict(density=0.5, key=jax.random.key(0))),
                       (jaxmerge.della, dict(density=0.5, key=jax.random.key(0)))]:
        assert_trees_match(fn(base, [base, base], **kwargs), base, f32_tol=0)


def test_dare_keeps_density_and_is_unbiased():
    n = 100_000
    base = {"w": jnp.zeros(n)}
    delta = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    model = {"w": jnp.asarray(delta)}
    out = np.asarray(jaxmerge.dare_linear(base, [model], density=0.3, key=jax.random.key(1), rescale="density")["w"])
    kept = np.mean(out != 0)
    assert abs(kept - 0.3) < 5 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_allclose(out[out != 0], delta[out != 0] / np.float32(0.3), rtol=1e-6)
    # E[merged] = delta: average many independent draws of a small vector
    small = {"w": jnp.asarray(delta[:50])}
    draws = np.stack([np.asarray(jaxmerge.dare_linear({"w": jnp.zeros(50)}, [small], density=0.3,
                                                      key=jax.random.key(s), rescale="density")["w"])
                      for s in range(400)])
    sigma = np.abs(delta[:50]) * np.sqrt(0.7 / 0.3) / np.sqrt(400)
    assert np.all(np.abs(draws.mean(0) - delta[:50]) < 5 * sigma + 1e-6)


def test_per_model_density():
    base, models = _models(2, seed=11)
    out = jaxmerge.ties(base, models, density=jaxmerge.per_model(0.2, 0.8))
    expected = tree_reference(
        lambda xs: reference.combine(
            xs[0], [np.where(reference.magnitude(x - xs[0], d), x - xs[0], 0) for x, d in zip(xs[1:], (0.2, 0.8))],
            [1.0, 1.0], consensus="sum", normalize=True, lambda_=1.0),
        base, *models)
    assert_trees_match(out, expected)


def test_bf16_leaves_stay_bf16():
    base, models = _models(2, seed=12)
    out = jaxmerge.ties(base, models, density=0.5)
    assert out["params"]["Dense_1"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("call,message", [
    (lambda b, ms: jaxmerge.ties(b, ms, density=1.5), r"^density of models\[0\] must be in \(0, 1\], got 1.5"),
    (lambda b, ms: jaxmerge.ties(b, ms, density=0.0), r"^density of models\[0\] must be in \(0, 1\], got 0.0"),
    (lambda b, ms: jaxmerge.ties(b, ms, density={"params": 0.5, "extra": 2.0}),
     r"^density of models\[0\] at 'extra/0' must be in \(0, 1\], got 2.0"),
    (lambda b, ms: jaxmerge.della(b, ms, density=0.9, epsilon=0.2, key=jax.random.key(0)),
     r"epsilon must keep density \+/- epsilon inside \(0, 1\)"),
    (lambda b, ms: jaxmerge.dare_ties(b, ms, density=0.5), r"missing a required argument: 'key'"),
    (lambda b, ms: jaxmerge.dare_ties.method.merge(ms, base=b), r"dare_ties needs key: the jax.random key"),
    (lambda b, ms: jaxmerge.ties(None, ms, density=0.5), r"ties needs a base model"),
    (lambda b, ms: jaxmerge.ties(b, ms, density=0.5, majority_sign="vote"), r"majority_sign must be"),
    (lambda b, ms: jaxmerge.ties(b, ms, density=0.5, rescale="l3"), r"rescale must be one of False, True, 'l1'"),
    (lambda b, ms: jaxmerge.task_arithmetic(b, ms, [1.0, -1.0], normalize=True), r"weights sum to 0"),
])
def test_errors(call, message):
    base, models = _models(2)
    with pytest.raises((ValueError, TypeError), match=message):
        call(base, models)


def test_models_whose_shapes_disagree_with_the_base():
    base, models = _models(2)
    models[1]["params"]["Dense_0"]["kernel"] = jnp.zeros((5, 5))
    with pytest.raises(ValueError, match=r"models\[1\] 'params/Dense_0/kernel': shape \(5, 5\) != \(5, 4\) of base"):
        jaxmerge.ties(base, models, density=0.5)


def test_none_means_the_default():
    base, models = _models(2)
    assert_trees_match(jaxmerge.ties(base, models, density=0.5, majority_sign=None, rescale=None),
                       jaxmerge.ties(base, models, density=0.5))


@pytest.mark.parametrize("name", ["dare_ties", "della_linear"])  # della's own mask: test_host_masks_step_aside...
def test_masks_of_large_matrices_are_drawn_on_the_host_as_in_the_kernel(name, monkeypatch):
    """Outside jax.jit, the masks of matrices of at least DRAW_BLOCK entries (DARE) or whose rows
    the sorting network ranks (DELLA) are drawn by a loop on the host over blocks of one shape
    (small blocks here stand for large ones): the output is the jitted one, bit for bit."""
    from jaxmerge.merging import draws, ranks

    monkeypatch.setattr(ranks, "NETWORK_MIN", 256)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 256)
    monkeypatch.setattr(draws, "DRAW_BLOCK", 256)
    host_loops = []

    def counted(loop):
        def spy(*args):
            host_loops.append(loop.__name__)
            return loop(*args)
        return spy
    for module, loop in ((ranks, "host_row_blocks"), (draws, "host_keep_mask")):
        monkeypatch.setattr(module, loop, counted(getattr(module, loop)))
    rng = np.random.default_rng(8)
    shapes = {"w": ((40, 64), jnp.float32), "v": ((33, 50), jnp.bfloat16), "b": ((64,), jnp.float32)}

    def tree(scale, base=None):
        return {k: jnp.asarray((0 if base is None else np.asarray(base[k], np.float32)) + scale * rng.standard_normal(s),
                               d) for k, (s, d) in shapes.items()}
    base = tree(1.0)
    models = [tree(0.1, base) for _ in range(3)]
    fn, kwargs = RANDOM[name][:2]
    key, weights = jax.random.key(4), [0.5, 1.0, 0.7]
    eager = fn(base, models, weights, key=key, **kwargs)
    assert len(host_loops) == 6  # two matrices of three models
    jitted = jax.jit(lambda b, ms: fn(b, ms, weights, key=key, **kwargs))(base, models)
    assert len(host_loops) == 6
    assert_trees_match(eager, jitted, f32_tol=0)
    expected = _random_reference(base, models, key, weights, *RANDOM[name][2:])
    assert_trees_match(eager, expected, f32_tol=2e-5)


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_host_masks_step_aside_under_a_trace(name, monkeypatch):
    """Inside jax.jit or jax.vmap, even with concrete leaves closed over, a traced key or
    density makes the host loop's kernels return tracers: the kernel draws the masks instead
    (as jaxmerge.coefficients.search calls merges)."""
    from jaxmerge.merging import draws, ranks

    monkeypatch.setattr(ranks, "NETWORK_MIN", 256)
    monkeypatch.setattr(ranks, "RANK_BLOCK", 256)
    monkeypatch.setattr(draws, "DRAW_BLOCK", 256)
    rng = np.random.default_rng(9)
    base = {"w": jnp.asarray(rng.standard_normal((41, 64)), jnp.float32)}
    models = [{"w": base["w"] + jnp.asarray(0.1 * rng.standard_normal((41, 64)), jnp.float32)} for _ in range(2)]
    fn, kwargs = RANDOM[name][:2]
    key = jax.random.key(5)
    eager = fn(base, models, key=key, **kwargs)
    closed = jax.jit(lambda: fn(base, models, key=key, **kwargs))()
    traced_key = jax.jit(lambda k: fn(base, models, key=k, **kwargs))(key)
    density = jnp.full(2, kwargs["density"], jnp.float32)
    mapped = jax.vmap(lambda d: fn(base, models, key=key, **{**kwargs, "density": d}))(density)
    for out in (closed, traced_key, jax.tree.map(lambda x: x[1], mapped)):
        assert_trees_match(out, eager, f32_tol=1e-6)  # the same masks; sums fused otherwise round apart
