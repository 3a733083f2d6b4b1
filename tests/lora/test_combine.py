"""add_weighted_adapter against NumPy written from PEFT's merge_utils and add_weighted_adapter."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge import lora
from jaxmerge.errors import JaxmergeError
from tests.lora.helpers import SHAPES, random_adapter

WEIGHTS = [0.7, -0.4, 1.3]


def _prune(x, density):
    """PEFT's magnitude pruning: the int(density n) largest magnitudes (ties: lower index)."""
    if density >= 1:
        return x
    keep = np.argsort(-np.abs(x).reshape(-1), kind="stable")[:int(density * x.size)]
    mask = np.zeros(x.size, bool)
    mask[keep] = True
    return np.where(mask.reshape(x.shape), x, 0)


def _reference(tensors, weights, kind, density=1.0, method="total"):
    tensors = [np.asarray(t, np.float32) for t in tensors]
    if kind in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density) for t in tensors]
    stacked = np.stack(tensors)
    weighted = stacked * np.asarray(weights, np.float32).reshape(-1, *[1] * tensors[0].ndim)
    if kind != "ties":
        return weighted.sum(0)
    magnitude = stacked.sum(0) if method == "total" else np.sign(stacked).sum(0)
    agree = np.sign(stacked) == np.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1).astype(np.float32)


@pytest.fixture(scope="module")
def adapters():
    return [random_adapter(0, alpha=8), random_adapter(1, alpha=2), random_adapter(2, alpha=4, use_rslora=True)]


@pytest.mark.parametrize("kind,density,method", [("linear", None, "total"), ("ties", 0.5, "total"),
                                                 ("ties", 0.3, "frequency"), ("magnitude_prune", 0.6, "total"),
                                                 ("ties", 1.0, "total")])
def test_factor_level_types_match_peft_formulas(adapters, kind, density, method):
    merged = lora.add_weighted_adapter(adapters, WEIGHTS, kind, density=density, majority_sign_method=method)
    assert merged.config["r"] == merged.config["lora_alpha"] == 4
    for module in SHAPES:
        scaled = [w * a.scaling(module) for a, w in zip(adapters, WEIGHTS)]
        weights_a = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]
        weights_b = [math.sqrt(abs(x)) for x in scaled]
        for side, weights in (("a", weights_a), ("b", weights_b)):
            expected = _reference([getattr(a.layers[module], side) for a in adapters], weights, kind, density or 1,
                                  method)
            np.testing.assert_array_equal(np.asarray(getattr(merged.layers[module], side)), expected)


def test_cat_is_exactly_the_weighted_sum_of_updates(adapters):
    merged = lora.add_weighted_adapter(adapters, WEIGHTS, "cat")
    assert merged.config["r"] == 12 and merged.scaling("model.layers.0.self_attn.q_proj") == 1
    for module in SHAPES:
        expected = sum(w * np.asarray(a.delta(module)) for a, w in zip(adapters, WEIGHTS))
        np.testing.assert_allclose(np.asarray(merged.delta(module)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,density", [("svd", None), ("ties_svd", 0.5), ("magnitude_prune_svd", 0.4)])
@pytest.mark.parametrize("rank", [None, 2])
def test_svd_types_are_the_best_low_rank_approximation(adapters, kind, density, rank):
    merged = lora.add_weighted_adapter(adapters, WEIGHTS, kind, svd_rank=rank, density=density)
    rank = rank or 4
    assert merged.config["r"] == rank
    for module in SHAPES:
        deltas = [np.asarray(a.delta(module)) for a in adapters]
        dense = _reference(deltas, WEIGHTS, kind.removesuffix("_svd").replace("svd", "linear"), density or 1)
        u, s, vh = np.linalg.svd(dense)
        np.testing.assert_allclose(np.asarray(merged.delta(module)), (u[:, :rank] * s[:rank]) @ vh[:rank],
                                   rtol=1e-4, atol=1e-4)
        b = np.asarray(merged.layers[module].b)
        assert (b[np.abs(b).argmax(0), range(rank)] > 0).all()  # the sign convention


def test_svd_clamp_clips_both_factors_at_the_quantile(adapters):
    plain = lora.add_weighted_adapter(adapters, WEIGHTS, "svd")
    clamped = lora.add_weighted_adapter(adapters, WEIGHTS, "svd", svd_clamp=0.8)
    for module in SHAPES:
        a, b = np.asarray(plain.layers[module].a), np.asarray(plain.layers[module].b)
        high = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.8)
        np.testing.assert_allclose(np.asarray(clamped.layers[module].a), np.clip(a, -high, high), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(clamped.layers[module].b), np.clip(b, -high, high), rtol=1e-6)


def test_svd_rank_beyond_the_matrix_pads_with_zeros():
    small = {"model.q_proj": (3, 2)}
    merged = lora.add_weighted_adapter([random_adapter(i, r=2, modules=small) for i in range(2)], [1, 1], "svd",
                                       svd_rank=5)
    assert merged.layers["model.q_proj"].a.shape == (5, 2) and not merged.layers["model.q_proj"].a[2:].any()


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_and_is_unbiased(kind):
    big = {"model.q_proj": (200, 100)}
    adapters = [random_adapter(i, r=50, modules=big) for i in range(2)]
    merged = lora.add_weighted_adapter(adapters, [1.0, 1.0], kind, density=0.3, key=jax.random.key(0))
    a = [np.asarray(x.layers["model.q_proj"].a) for x in adapters]
    out = np.asarray(merged.layers["model.q_proj"].a)
    if kind == "dare_linear":  # each entry: sum of kept / 0.3 scaled by sqrt(2): mean over entries unchanged
        np.testing.assert_allclose(out.mean(), math.sqrt(2) * (a[0] + a[1]).mean(), atol=0.05)
        assert abs((out == 0).mean() - 0.7 ** 2) < 0.02
    same = lora.add_weighted_adapter(adapters, [1.0, 1.0], kind, density=0.3, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(same.layers["model.q_proj"].a), out)


def test_one_adapter_is_merged_linearly_and_dtypes_kept():
    adapter = random_adapter(0, dtype=jnp.bfloat16)
    merged = lora.add_weighted_adapter([adapter], [2.0], "ties")  # no density needed: PEFT falls back to linear
    layer = merged.layers["model.layers.0.self_attn.q_proj"]
    assert layer.a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(merged.delta("model.layers.0.self_attn.q_proj")),
                               2 * np.asarray(adapter.delta("model.layers.0.self_attn.q_proj")), rtol=2e-2, atol=2e-2)


def test_modules_of_only_some_adapters_and_target_modules_united():
    first = random_adapter(0, modules={"model.q_proj": (4, 3)})
    second = random_adapter(1, modules={"model.q_proj": (4, 3), "model.k_proj": (2, 3)})
    merged = lora.add_weighted_adapter([first, second], [1.0, 0.5], "cat")
    assert merged.config["target_modules"] == ["k_proj", "q_proj"]
    np.testing.assert_allclose(np.asarray(merged.delta("model.k_proj")), 0.5 * np.asarray(second.delta("model.k_proj")),
                               rtol=1e-6)
    regex = [random_adapter(i, modules={"model.q_proj": (4, 3)}) for i in range(2)]
    regex = [lora.Adapter(a.layers, {**a.config, "target_modules": t}) for a, t in zip(regex, ["q_proj", "v"])]
    assert lora.add_weighted_adapter(regex, [1, 1], "svd").config["target_modules"] == "(q_proj)|(v)"


def test_adapters_limited_to_some_layers_merge_into_one_that_names_every_module():
    """PEFT refuses to merge such adapters; the first one's limits would drop the other's layers."""
    layers = [{f"model.layers.{i}.self_attn.q_proj": (4, 3)} for i in range(2)]
    limited = [random_adapter(i, modules=m, layers_to_transform=[i]) for i, m in enumerate(layers)]
    merged = lora.add_weighted_adapter(limited, [1.0, 1.0], "cat")
    assert merged.config["target_modules"] == sorted(layers[0] | layers[1])
    assert merged.config["layers_to_transform"] is None and merged.config["exclude_modules"] is None


def test_rank_patterns_are_merged_and_kept_loadable(tmp_path):
    patterned = [random_adapter(i, r=4, modules={"model.q_proj": (5, 3)}, rank_pattern={"q_proj": 2})
                 for i in range(2)]
    patterned = [lora.Adapter({m: lora.LoraLayer(l.a[:2], l.b[:, :2]) for m, l in a.layers.items()}, a.config)
                 for a in patterned]
    merged = lora.add_weighted_adapter(patterned, [1.0, 1.0], "linear")
    assert merged.rank("model.q_proj") == 2 and merged.scaling("model.q_proj") == 1.0
    assert lora.load_adapter(lora.save_adapter(tmp_path / "m", merged)).rank("model.q_proj") == 2


@pytest.mark.parametrize("call,message", [
    (lambda a: lora.add_weighted_adapter([], [], "linear"), "at least one adapter"),
    (lambda a: lora.add_weighted_adapter(a, [1.0], "linear"), "1 weights for 3 adapters"),
    (lambda a: lora.add_weighted_adapter(a, WEIGHTS, "mean"), "combination_type must be one of"),
    (lambda a: lora.add_weighted_adapter(a, WEIGHTS, "ties"), "ties needs a density"),
    (lambda a: lora.add_weighted_adapter(a, WEIGHTS, "dare_ties", density=0.5), "pass key="),
    (lambda a: lora.add_weighted_adapter(a, WEIGHTS, "svd", svd_clamp=2), "svd_clamp must be"),
    (lambda a: lora.add_weighted_adapter(a, [1, float("nan"), 1], "svd"), "weights must be finite"),
    (lambda a: lora.add_weighted_adapter([a[0], random_adapter(5, r=2)], [1, 1], "linear"), "one rank"),
    (lambda a: lora.add_weighted_adapter([a[0], random_adapter(5, use_dora=True)], [1, 1], "svd"), "DoRA"),
    (lambda a: lora.add_weighted_adapter([a[0], random_adapter(5, trainable_token_indices=[3])], [1, 1], "svd"),
     "trainable_token_indices"),
    (lambda a: lora.add_weighted_adapter([a[0], {}], [1, 1], "svd"), "adapters\\[1\\] is a dict"),
])
def test_bad_arguments_are_refused(adapters, call, message):
    with pytest.raises(JaxmergeError, match=message):
        call(adapters)
