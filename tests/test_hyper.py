import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge
from jaxmerge import _hyper
from jaxmerge._hyper import Levels, Range, Resolver
from jaxmerge._tree import flatten_models
from tests.helpers import random_tree


def _spec(tree, n=1):
    return flatten_models([tree] * n)[0]


def _by_path(spec, values):
    return {p: v for p, v in zip(spec.paths, values) if v is not None}


def test_scalar_callable_and_pytree_forms():
    spec = _spec(random_tree(0))
    assert set(_by_path(spec, _hyper.resolve(0.5, "t", spec)).values()) == {0.5}
    values = _by_path(spec, _hyper.resolve(lambda path, leaf: leaf.ndim + ("bias" in path), "t", spec))
    assert values["params/Dense_0/kernel"] == 2 and values["params/Dense_0/bias"] == 2
    assert values["extra/1"] == 0
    tree_value = {"params": {"Dense_0": 0.1, "Dense_1": {"kernel": 0.2, "bias": 0.3}}, "extra": 0.4}
    values = _by_path(spec, _hyper.resolve(tree_value, "t", spec))
    assert values == {"params/Dense_0/kernel": 0.1, "params/Dense_0/bias": 0.1,
                      "params/Dense_1/kernel": 0.2, "params/Dense_1/bias": 0.3,
                      "extra/0": 0.4, "extra/1": 0.4}
    assert "step" not in values  # the int leaf needs no value


def test_pytree_form_errors_name_the_path():
    spec = _spec(random_tree(0))
    with pytest.raises(ValueError, match="t at 'extra/0' is required: no setting gives it a value"):
        _hyper.resolve({"params": 1.0}, "t", spec)
    with pytest.raises(ValueError, match="t has an entry 'params/Dense_9' that matches no leaf"):
        _hyper.resolve({"params": {"Dense_9": 1.0}, "extra": 1.0}, "t", spec)


def test_plain_dict_hyperparameter_for_an_nnx_state():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.encoder = nnx.Linear(2, 2, rngs=rngs)
            self.decoder = nnx.Linear(2, 2, rngs=rngs)

    a, b = (nnx.state(Model(nnx.Rngs(i)), nnx.Param) for i in range(2))
    out = jaxmerge.lerp(a, b, {"encoder": 0.0, "decoder": 1.0})
    np.testing.assert_array_equal(out["encoder"]["kernel"][...], a["encoder"]["kernel"][...])
    np.testing.assert_array_equal(out["decoder"]["kernel"][...], b["decoder"]["kernel"][...])


def test_invalid_scalars():
    spec = _spec(random_tree(0))
    for bad in (float("nan"), float("inf"), np.float32(-np.inf)):
        with pytest.raises(ValueError, match=r"^t must be a finite number"):
            _hyper.resolve(bad, "t", spec)
    for bad in ("0.5", True, 1j, jnp.ones(2)):
        with pytest.raises(TypeError, match="^t must be a real number"):
            _hyper.resolve(bad, "t", spec)
    with pytest.raises(ValueError, match="^t is required but not given"):
        _hyper.resolve(None, "t", spec)


def _llama_names(num_layers):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"]
    return {n: jnp.zeros(2) for n in names}


def test_layer_positions_follow_mergekit():
    tree = _llama_names(5)
    spec = _spec(tree)
    t = dict(zip(spec.paths, jaxmerge.layer_positions(spec.keys)))
    assert t["model.embed_tokens.weight"] == 0.0
    assert t["model.norm.weight"] == 0.0 and t["lm_head.weight"] == 0.0  # mergekit 0.1.5: pre and post weights at 0
    for i in range(5):
        assert t[f"model.layers.{i}.mlp.up_proj.weight"] == i / 4


def test_layer_positions_for_flax_naming():
    linen = {"params": {"Embed_0": {"embedding": 0}, "Block_0": {"Dense_0": {"kernel": 0}, "Dense_1": {"kernel": 0}},
                        "Block_1": {"Dense_0": {"kernel": 0}}, "Block_2": {"Dense_0": {"kernel": 0}},
                        "LayerNorm_0": {"scale": 0}}}
    keys = [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(linen)]
    t = dict(zip(["/".join(k) for k in keys], jaxmerge.layer_positions(keys)))
    assert t["params/Block_0/Dense_1/kernel"] == 0.0 and t["params/Block_1/Dense_0/kernel"] == 0.5
    assert t["params/Block_2/Dense_0/kernel"] == 1.0
    assert t["params/Embed_0/embedding"] == 0.0 and t["params/LayerNorm_0/scale"] == 0.0
    nnx_keys = [("layers", str(i), "kernel", "value") for i in range(3)]
    assert jaxmerge.layer_positions(nnx_keys) == [0.0, 0.5, 1.0]


def test_gradient_interpolates_anchors_over_layers():
    tree = _llama_names(9)
    spec = _spec(tree)
    anchors = [0.0, 0.5, 0.3, 1.0]
    values = _by_path(spec, _hyper.resolve(anchors, "t", spec))
    for i in range(9):
        expected = np.interp(i / 8, np.linspace(0, 1, len(anchors)), anchors)
        assert values[f"model.layers.{i}.self_attn.q_proj.weight"] == pytest.approx(expected, abs=1e-12)
    assert values["model.embed_tokens.weight"] == 0.0 and values["lm_head.weight"] == 0.0


def test_filters_first_match_wins_and_fall_through_to_the_default():
    spec = _spec(_llama_names(3))
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.25}, {"value": 0.75}]
    values = _by_path(spec, _hyper.resolve(setting, "t", spec))
    assert values["model.layers.1.self_attn.q_proj.weight"] == 0.5
    assert values["model.layers.2.self_attn.q_proj.weight"] == 1.0
    assert values["model.layers.0.mlp.up_proj.weight"] == 0.25
    assert values["model.norm.weight"] == 0.75
    with pytest.raises(ValueError, match="t at 'lm_head.weight' is required: no setting gives it a value"):
        _hyper.resolve(setting[:2], "t", spec)
    values = _by_path(spec, Resolver(spec).leafwise(setting[:2], "t", default=0.125))
    assert values["lm_head.weight"] == 0.125 and values["model.layers.0.mlp.up_proj.weight"] == 0.25


def test_levels_fall_through_as_in_mergekit():
    """A model's own setting, then the merge-wide one, then the default; a level that gives no
    value for a tensor (no filter matches, the pytree does not reach it) passes it on."""
    spec = _spec(_llama_names(2), n=2)
    levels = Levels(shared=([{"filter": "mlp", "value": 0.5}],),
                    per_model=(([{"filter": "self_attn", "value": 0.25}],), ()))
    rows = _by_path(spec, Resolver(spec).per_model(levels, "density", ["a", "b"], default=1.0, check=Range(0, 1)))
    np.testing.assert_array_equal(rows["model.layers.0.self_attn.q_proj.weight"], [0.25, 1.0])
    np.testing.assert_array_equal(rows["model.layers.1.mlp.up_proj.weight"], [0.5, 0.5])
    np.testing.assert_array_equal(rows["lm_head.weight"], [1.0, 1.0])
    with pytest.raises(ValueError, match="density of a at 'lm_head.weight' is required"):
        Resolver(spec).per_model(levels, "density", ["a", "b"])
    shared = _by_path(spec, Resolver(spec).leafwise((None, [{"filter": "mlp", "value": 0.5}]), "t", default=0.0))
    assert shared["model.layers.1.mlp.up_proj.weight"] == 0.5 and shared["lm_head.weight"] == 0.0  # None: not given
    with pytest.raises(ValueError, match=r"density of a at 'model.layers.0.self_attn.q_proj.weight' must be in "
                                         r"\[0, 1\], got 2.0"):
        Resolver(spec).per_model(Levels(per_model=(([{"filter": "self_attn", "value": 2.0}],), ())), "density",
                                 ["a", "b"], default=1.0, check=Range(0, 1))


def _weights(value, spec):
    names = [f"models[{j}]" for j in range(spec.num_models)]
    return Resolver(spec).per_model(_hyper.python_levels(value, sequence=True), "weights", names, default=1.0)


def test_per_model_lengths_and_types():
    spec = _spec(random_tree(0), n=3)
    with pytest.raises(ValueError, match="weights has 2 entries but there are 3 models"):
        _weights([1.0, 2.0], spec)
    with pytest.raises(TypeError, match="must be a sequence with one entry per model"):
        _weights(1.0, spec)
    by_path = _by_path(spec, _weights([1.0, {"params": 2.0}, lambda p, x: 4.0], spec))
    np.testing.assert_array_equal(by_path["params/Dense_0/kernel"], [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(by_path["extra/0"], [1.0, 1.0, 4.0])  # the pytree does not reach it: default
    with pytest.raises(ValueError, match=r"weights of models\[1\] at 'params/Dense_0/bias' must be a finite number"):
        _weights([1.0, lambda p, x: float("nan") if "bias" in p else 1.0, 1.0], spec)
    with pytest.raises(ValueError, match=r"^weights of models\[2\] must be a finite number"):
        _weights([1.0, 1.0, float("inf")], spec)


def test_traced_values_are_accepted_under_jit():
    spec = _spec(random_tree(0), n=2)
    f = jax.jit(lambda w: _weights(w, spec)[0])
    np.testing.assert_array_equal(f(jnp.asarray([1.0, 2.0])), [1.0, 2.0])
