import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxmerge


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (16, 12):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(3)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for channels in (6, 8):
            x = nn.Conv(channels, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        x = nn.relu(nn.Dense(10)(x))
        return nn.Dense(4)(x)


class Block(nnx.Module):
    def __init__(self, d=8, heads=4, rngs=None):
        self.head_dim = d // heads
        self.query = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.key = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.value = nnx.LinearGeneral(d, (heads, d // heads), rngs=rngs)
        self.out = nnx.LinearGeneral((heads, d // heads), d, axis=(-2, -1), rngs=rngs)
        self.fc1 = nnx.Linear(d, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, d, rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(self.head_dim), axis=-1)
        x = x + self.out(jnp.einsum("bnts,bsnh->btnh", weights, v))
        return x + self.fc2(jax.nn.relu(self.fc1(x)))


class Transformer(nnx.Module):
    """Embedding, two pre-norm blocks and a head: the residual stream moves as one permutation."""

    def __init__(self, d=8, rngs=None):
        self.embed = nnx.Linear(3, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs=rngs) for _ in range(2)])
        self.norms = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(2)])
        self.final_norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block, norm in zip(self.blocks, self.norms):
            x = block(norm(x))
        return self.head(self.final_norm(x))


def _mlp():
    module = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)
    variables = module.init(jax.random.key(0), x)
    return variables, jaxmerge.mlp_permutation_spec(variables), lambda v: module.apply(v, x)


def _cnn():
    module = CNN()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 3)), jnp.float32)
    variables = module.init(jax.random.key(1), x)
    rng = np.random.default_rng(2)  # non-trivial running statistics
    variables = dict(variables, batch_stats=jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype), variables["batch_stats"]))
    spec = jaxmerge.cnn_permutation_spec(variables, convs=["params/Conv_0", "params/Conv_1"],
                                         dense=["params/Dense_0", "params/Dense_1"],
                                         norms=["BatchNorm_0", "BatchNorm_1"])
    return variables, spec, lambda v: module.apply(v, x)


def _block():
    block = Block(rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(block)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 8)), jnp.float32)
    spec = jaxmerge.transformer_block_permutation_spec(state, query="query", key="key", value="value", out="out",
                                                       fc1="fc1", fc2="fc2")
    return state, spec, lambda s: nnx.merge(graphdef, s)(x)


def _transformer():
    model = Transformer(rngs=nnx.Rngs(5))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(6)  # norm scales and biases other than ones and zeros
    state = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(0.0, 0.3, v.shape), v.dtype), state)
    spec = jaxmerge.PermutationSpec({"embed/kernel": (None, "residual"), "embed/bias": ("residual",),
                                     "final_norm/scale": ("residual",), "final_norm/bias": ("residual",),
                                     "head/kernel": ("residual", None)})
    for i in range(2):
        spec = spec | jaxmerge.transformer_block_permutation_spec(
            state, **{p: f"blocks/{i}/{p}" for p in ("query", "key", "value", "out", "fc1", "fc2")},
            prefix=f"block{i}", residual="residual", norms=[f"norms/{i}"])
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5, 3)), jnp.float32)
    return state, spec, lambda s: nnx.merge(graphdef, s)(x)


NETWORKS = {"mlp": _mlp, "cnn": _cnn, "transformer_block": _block, "transformer": _transformer}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_permuting_leaves_the_function_unchanged(name):
    params, spec, run = NETWORKS[name]()
    perm = jaxmerge.random_permutation(spec, params, seed=5)
    assert all(not np.array_equal(p, np.arange(len(p))) for p in perm.values())
    permuted = jaxmerge.apply_permutation(spec, perm, params)
    for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(permuted), jax.tree.leaves(params)):
        key = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        spec_key = key[:-1] if key[-1] == "value" else key
        if spec_key not in spec.axes:
            np.testing.assert_array_equal(new, old)  # leaves the spec does not name stay put
        elif spec_key[-1] == "kernel":
            assert not np.array_equal(new, old)
    np.testing.assert_allclose(run(permuted), run(params), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_weight_matching_undoes_a_random_permutation_exactly(name):
    params, spec, _ = NETWORKS[name]()
    scrambled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, params, seed=6), params)
    aligned = jaxmerge.align(spec, params, scrambled)
    jax.tree.map(np.testing.assert_array_equal, aligned, params)


def test_spec_errors_name_the_leaf_axis_and_sizes():
    params, spec, _ = _mlp()
    with pytest.raises(ValueError, match="the permutation spec names the leaf 'params/Dense_9/kernel'"):
        jaxmerge.PermutationSpec({"params/Dense_9/kernel": (None, "h")}).bind(params)
    with pytest.raises(ValueError, match=r"gives 3 axes for 'params/Dense_0/kernel' of shape \(7, 16\)"):
        jaxmerge.PermutationSpec({"params/Dense_0/kernel": (None, "h", None)}).bind(params)
    with pytest.raises(ValueError, match=r"permutation 'h' joins axes of different sizes: 'params/Dense_1/kernel' "
                                         r"axis 1 has 12, 'params/Dense_0/kernel' axis 1 has 16"):
        jaxmerge.PermutationSpec({"params/Dense_0/kernel": (None, "h"), "params/Dense_1/kernel": (None, "h")}).bind(params)
    with pytest.raises(ValueError, match=r"perm\['hidden_0'\] is not a permutation of 16 units"):
        jaxmerge.apply_permutation(spec, {"hidden_0": np.zeros(16, int), "hidden_1": np.arange(12)}, params)
    with pytest.raises(ValueError, match="both specs name the leaf"):
        spec | spec
    with pytest.raises(ValueError, match=r"axis 1 of 'params/Dense_0/kernel' has 16 entries, not a whole number of "
                                         r"blocks of 5 \(permutation 'h'\)"):
        jaxmerge.PermutationSpec({"params/Dense_0/kernel": (None, ("h", 5))}).bind(params)


def test_natural_layer_order_and_specs_combine():
    params = {f"Dense_{i}": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)} for i in (0, 2, 10)}
    spec = jaxmerge.mlp_permutation_spec(params)
    assert spec.axes[("Dense_10", "kernel")] == ("hidden_1", None)
    assert spec.axes[("Dense_2", "kernel")] == ("hidden_0", "hidden_1")


def _scrambled_mlp(rows: int, count: int):
    """``(module, variables, spec, a shuffled copy, batches)`` of the Linen MLP."""
    module = MLP()
    batches = [jnp.asarray(np.random.default_rng(i).standard_normal((rows, 7)), jnp.float32) for i in range(count)]
    variables = module.init(jax.random.key(0), batches[0])
    spec = jaxmerge.mlp_permutation_spec(variables)
    scrambled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, variables, seed=6), variables)
    return module, variables, spec, scrambled, batches


def test_activation_matching_undoes_a_random_permutation_and_names_what_it_cannot_see():
    module, variables, spec, scrambled, batches = _scrambled_mlp(64, 2)
    perm = jaxmerge.activation_matching(spec, module.apply, variables, scrambled, batches)
    jax.tree.map(np.testing.assert_array_equal, jaxmerge.apply_permutation(spec, perm, scrambled), variables)
    params, cnn_spec, _ = _cnn()  # convolutions: channels counted at every position
    cnn_scrambled = jaxmerge.apply_permutation(cnn_spec, jaxmerge.random_permutation(cnn_spec, params, seed=6), params)
    images = [jnp.asarray(np.random.default_rng(i).standard_normal((64, 6, 6, 3)), jnp.float32) for i in range(4)]
    perm = jaxmerge.activation_matching(cnn_spec, CNN().apply, params, cnn_scrambled, images)
    jax.tree.map(np.testing.assert_array_equal, jaxmerge.apply_permutation(cnn_spec, perm, cnn_scrambled), params)
    state, block_spec, _ = _block()  # whole heads are no kernel's input units
    graphdef = nnx.graphdef(Block(rngs=nnx.Rngs(3)))
    with pytest.raises(jaxmerge.JaxmergeError, match="no activations of the units of permutation 'block_heads'"):
        jaxmerge.activation_matching(block_spec, lambda s, x: nnx.merge(graphdef, s)(x), state, state,
                                     [jnp.ones((2, 5, 8))])


def test_ste_matching_undoes_a_random_permutation():
    module, variables, spec, scrambled, batches = _scrambled_mlp(32, 3)

    def loss(params, x):  # zero exactly where the interpolation computes the reference's function
        return jnp.mean((module.apply(params, x) - module.apply(variables, x)) ** 2)

    perm = jaxmerge.ste_matching(spec, loss, variables, scrambled, batches, epochs=2)
    jax.tree.map(np.testing.assert_array_equal, jaxmerge.apply_permutation(spec, perm, scrambled), variables)
    with pytest.raises(jaxmerge.JaxmergeError, match="at least one batch"):
        jaxmerge.ste_matching(spec, loss, variables, scrambled, [])


def test_repair_gives_each_layer_the_endpoints_interpolated_statistics():
    rng = np.random.default_rng(0)

    def init(seed):
        r = np.random.default_rng(seed)
        return {f"l{i}": {"kernel": jnp.asarray(r.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                          "bias": jnp.asarray(0.1 * r.standard_normal(b), jnp.float32)}
                for i, (a, b) in enumerate([(5, 16), (16, 12), (12, 3)])}

    def pre_activations(p, x):
        out = []
        for i in range(3):
            x = np.asarray(x) @ np.asarray(p[f"l{i}"]["kernel"]) + np.asarray(p[f"l{i}"]["bias"])
            out.append(x)
            x = np.maximum(x, 0)
        return out

    def apply(p, x):
        for i in range(3):
            x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"][None]
            x = jax.nn.relu(x) if i < 2 else x
        return x

    a, b = init(1), init(2)
    batches = [jnp.asarray(rng.standard_normal((128, 5)), jnp.float32) for _ in range(2)]
    x = np.concatenate([np.asarray(v) for v in batches])
    merged = jaxmerge.lerp(a, b, 0.3)
    repaired = jaxmerge.repair(apply, merged, [a, b], [0.7, 0.3], batches)
    ends = [pre_activations(p, x) for p in (a, b)]
    got, before = pre_activations(repaired, x), pre_activations(merged, x)
    for layer in (0, 1):  # every layer but the output
        target_std = 0.7 * ends[0][layer].std(0) + 0.3 * ends[1][layer].std(0)
        target_mean = 0.7 * ends[0][layer].mean(0) + 0.3 * ends[1][layer].mean(0)
        np.testing.assert_allclose(got[layer].std(0), target_std, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got[layer].mean(0), target_mean, rtol=1e-3, atol=1e-4)
        assert np.mean(before[layer].std(0)) < np.mean(target_std)  # the variance had collapsed
    np.testing.assert_array_equal(repaired["l2"]["kernel"], merged["l2"]["kernel"])


@pytest.mark.parametrize("name", ["mlp", "transformer_block"])
def test_matched_average_of_shuffled_copies_is_the_model(name):
    params, spec, run = NETWORKS[name]()
    copies = [params] + [jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, params, seed=s), params)
                         for s in (7, 8, 9)]
    average, aligned = jaxmerge.matched_average(spec, copies, weights=[1.0, 2.0, 0.5, 1.0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), average, params)
    for copy, lined_up in zip(copies, aligned):
        np.testing.assert_allclose(run(lined_up), run(copy), rtol=1e-5, atol=1e-5)
    with pytest.raises(jaxmerge.JaxmergeError, match="one entry per model"):
        jaxmerge.matched_average(spec, copies, weights=[1.0])


def _dict_mlp(widths, seed):
    rng = np.random.default_rng(seed)
    return {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                      "bias": jnp.asarray(0.1 * rng.standard_normal(b), jnp.float32)}
            for i, (a, b) in enumerate(itertools.pairwise(widths))}


def _dict_apply(p, x):
    for i in range(len(p)):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"][None]
        x = jax.nn.relu(x) if i < len(p) - 1 else x
    return x


def _split_units(params, name_index, share):
    """``params`` with every unit of hidden layer ``name_index`` doubled, its outgoing weights split ``share``
    and ``1 - share``: the same function, twice the width."""
    out = jax.tree.map(np.asarray, params)
    layer, after = out[f"l{name_index}"], out[f"l{name_index + 1}"]
    layer["kernel"], layer["bias"] = np.repeat(layer["kernel"], 2, 1), np.repeat(layer["bias"], 2)
    after["kernel"] = np.repeat(after["kernel"], 2, 0) * np.tile([share, 1 - share], len(after["kernel"]))[:, None]
    return jax.tree.map(jnp.asarray, out)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_exact_transport_undoes_a_random_permutation(name):
    params, spec, _ = NETWORKS[name]()
    scrambled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, params, seed=6), params)
    moved = jaxmerge.transport(spec, params, scrambled)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), moved, params)


def test_transport_by_activations_and_sinkhorn_recover_the_model():
    params = _dict_mlp([5, 16, 12, 3], seed=0)
    spec = jaxmerge.mlp_permutation_spec(params)
    scrambled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, params, seed=1), params)
    batches = [jnp.asarray(np.random.default_rng(2).standard_normal((256, 5)), jnp.float32)]
    by_activations = jaxmerge.transport(spec, params, scrambled, cost="activations", apply_fn=_dict_apply, data=batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), by_activations, params)
    fused = jaxmerge.ot_fusion(spec, [params, scrambled], solver="sinkhorn", epsilon=1e-3)  # soft plans, nearly hard
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3), fused, params)


def test_fusing_different_widths_merges_and_splits_units():
    narrow = _dict_mlp([5, 6, 4, 3], seed=3)
    spec = jaxmerge.mlp_permutation_spec(narrow)
    wide = _split_units(_split_units(narrow, 0, 0.3), 1, 0.8)  # widths 12 and 8, the same function
    shuffled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, wide, seed=4), wide)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((32, 5)), jnp.float32)
    np.testing.assert_allclose(_dict_apply(shuffled, x), _dict_apply(narrow, x), rtol=1e-5, atol=1e-5)
    merged = jaxmerge.transport(spec, narrow, shuffled)  # each pair of equal units merged, their outputs added
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), merged, narrow)
    split = jaxmerge.transport(spec, shuffled, narrow)  # each unit split in two, its outputs shared
    assert jax.tree.map(jnp.shape, split) == jax.tree.map(jnp.shape, shuffled)
    np.testing.assert_allclose(_dict_apply(split, x), _dict_apply(narrow, x), rtol=1e-5, atol=1e-5)
    fused = jaxmerge.ot_fusion(spec, [narrow, shuffled], reference=1, weights=[1.0, 3.0])
    np.testing.assert_allclose(_dict_apply(fused, x), _dict_apply(narrow, x), rtol=1e-5, atol=1e-5)


def test_transport_names_what_it_cannot_move():
    params, spec, _ = NETWORKS["transformer_block"]()
    with pytest.raises(jaxmerge.JaxmergeError, match="the spec names axis 0 of 'out/kernel'"):
        jaxmerge.transport(spec, params, params)
    narrow = _dict_mlp([5, 6, 3], seed=0)
    other = _dict_mlp([4, 6, 3], seed=0)
    spec = jaxmerge.mlp_permutation_spec(narrow)
    with pytest.raises(jaxmerge.JaxmergeError, match=r"'l0/kernel' has shape \(4, 6\) in model and \(5, 6\) in "):
        jaxmerge.transport(spec, narrow, other)
    with pytest.raises(jaxmerge.JaxmergeError, match="needs apply_fn and data"):
        jaxmerge.transport(spec, narrow, narrow, cost="activations")


def test_pleas_keeps_the_ensemble_recovers_a_shuffled_copy_and_solves_least_squares():
    a, b = _dict_mlp([5, 16, 12, 3], seed=0), _dict_mlp([5, 16, 12, 3], seed=1)
    spec = jaxmerge.mlp_permutation_spec(a)
    rng = np.random.default_rng(2)
    batches = [jnp.asarray(rng.standard_normal((256, 5)), jnp.float32) for _ in range(2)]
    x = batches[0]
    whole = jaxmerge.pleas(spec, _dict_apply, a, b, batches, widths=2.0)  # nothing merged: the two models side by side
    assert whole["l0"]["kernel"].shape == (5, 32) and whole["l1"]["kernel"].shape == (32, 24)
    np.testing.assert_allclose(_dict_apply(whole, x), (_dict_apply(a, x) + _dict_apply(b, x)) / 2, atol=1e-3)
    shuffled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, a, seed=3), a)
    same = jaxmerge.pleas(spec, _dict_apply, a, shuffled, batches)
    np.testing.assert_allclose(_dict_apply(same, x), _dict_apply(a, x), atol=1e-3)
    partial = jaxmerge.pleas(spec, _dict_apply, a, b, batches, widths={"hidden_0": 20})
    assert partial["l0"]["kernel"].shape == (5, 20) and partial["l1"]["kernel"].shape == (20, 12)
    # layer 0 sees the data itself: its solution is NumPy's least squares against the matched units' mean
    merged = jaxmerge.pleas(spec, _dict_apply, a, b, batches)
    aligned = jaxmerge.apply_permutation(spec, jaxmerge.activation_matching(spec, _dict_apply, a, b, batches), b)
    xs = np.concatenate([np.asarray(v, np.float64) for v in batches])
    target = sum(xs @ np.asarray(p["l0"]["kernel"], np.float64) + np.asarray(p["l0"]["bias"]) for p in (a, aligned)) / 2
    design = np.concatenate([xs, np.ones((len(xs), 1))], 1)
    expected = np.linalg.lstsq(design, target, rcond=None)[0]
    got = np.concatenate([np.asarray(merged["l0"]["kernel"]), np.asarray(merged["l0"]["bias"])[None]])
    by_first_row = lambda w: w[:, np.argsort(w[0])]  # the merged units' order is PLeaS's own
    np.testing.assert_allclose(by_first_row(got), by_first_row(expected), rtol=1e-3, atol=1e-4)
    with pytest.raises(jaxmerge.JaxmergeError, match="must be between 16 and 32 units, got 40"):
        jaxmerge.pleas(spec, _dict_apply, a, b, batches, widths={"hidden_0": 40})


def test_repair_renormalises_convolution_channels():
    def init(seed):
        r = np.random.default_rng(seed)
        return {f"c{i}": {"kernel": jnp.asarray(r.standard_normal((3, 3, a, b)) / np.sqrt(9 * a), jnp.float32),
                          "bias": jnp.asarray(0.1 * r.standard_normal(b), jnp.float32)}
                for i, (a, b) in enumerate([(2, 6), (6, 5)])} | {
            "head": {"kernel": jnp.asarray(r.standard_normal((5, 3)), jnp.float32), "bias": jnp.zeros(3, jnp.float32)}}

    def conv(layer, x):
        out = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + layer["bias"][None, None, None]

    def pre_activations(p, x):
        first = conv(p["c0"], x)
        return [first, conv(p["c1"], jax.nn.relu(first))]

    def apply(p, x):
        return jax.nn.relu(pre_activations(p, x)[1]).mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"][None]

    a, b = init(1), init(2)
    batches = [jnp.asarray(np.random.default_rng(3).standard_normal((32, 5, 5, 2)), jnp.float32)]
    repaired = jaxmerge.repair(apply, jaxmerge.lerp(a, b, 0.5), [a, b], [0.5, 0.5], batches)
    channels = lambda z: np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    ends = [[channels(z) for z in pre_activations(p, batches[0])] for p in (a, b)]
    for got, end_a, end_b in zip(pre_activations(repaired, batches[0]), *ends):
        np.testing.assert_allclose(channels(got).std(0), (end_a.std(0) + end_b.std(0)) / 2, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(channels(got).mean(0), (end_a.mean(0) + end_b.mean(0)) / 2, rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(repaired["head"]["kernel"], jaxmerge.lerp(a, b, 0.5)["head"]["kernel"])


def test_repair_follows_the_order_layers_run_in_not_their_names():
    names = ["Dense_0", "Dense_1", "Dense_2", "Dense_10"]  # 'Dense_10' sorts before 'Dense_2'
    rng = np.random.default_rng(0)
    widths = [4, 6, 5, 3, 2]
    a, b = ({n: {"kernel": jnp.asarray(r.standard_normal((p, q)), jnp.float32), "bias": jnp.zeros(q, jnp.float32)}
             for n, p, q in zip(names, widths[:-1], widths[1:])} for r in (rng, np.random.default_rng(1)))

    def apply(p, x):
        for i, n in enumerate(names):
            x = x @ p[n]["kernel"] + p[n]["bias"][None]
            x = jax.nn.relu(x) if i < len(names) - 1 else x
        return x

    batches = [jnp.asarray(rng.standard_normal((256, 4)), jnp.float32)]
    repaired = jaxmerge.repair(apply, jaxmerge.lerp(a, b, 0.5), [a, b], [0.5, 0.5], batches)
    pre = jaxmerge.statistics.gram.kernel_outputs(repaired, batches[0], apply_fn=apply)
    ends = [jaxmerge.statistics.gram.kernel_outputs(p, batches[0], apply_fn=apply) for p in (a, b)]
    leaf = {n: i for i, n in enumerate(sorted(names))}  # leaf index of each kernel, in flattening order
    for n in names[:-1]:
        k = 2 * leaf[n] + 1  # each layer flattens to (bias, kernel)
        target = 0.5 * np.std(ends[0][k], 0) + 0.5 * np.std(ends[1][k], 0)
        np.testing.assert_allclose(np.std(pre[k], 0), target, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])  # Llama's tensors, plus biases or q/k norms
def test_llama_spec_permutes_heads_residual_and_mlp_without_changing_the_logits(model_type):
    from jaxmerge.moe.transformer import logits, random_params

    config = {"model_type": model_type, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 11, "rms_norm_eps": 1e-6}
    params = random_params(config, jax.random.key(0))
    rng = np.random.default_rng(1)  # norms other than ones, so that the residual permutation is seen
    params = {k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype) if "norm" in k else v for k, v in params.items()}
    spec = jaxmerge.llama_permutation_spec(params, config)
    assert set(spec.names) == {"residual", "layers.0.heads", "layers.0.mlp", "layers.1.heads", "layers.1.mlp"}
    perm = jaxmerge.random_permutation(spec, params, seed=2)
    permuted = jaxmerge.apply_permutation(spec, perm, params)
    q = "model.layers.1.self_attn.q_proj.weight"  # key-value group g's two query heads move as one block
    block = np.asarray(params[q]).reshape(2, 2 * 4, 16)[perm["layers.1.heads"]][:, :, perm["residual"]]
    np.testing.assert_array_equal(permuted[q], block.reshape(16, 16))
    ids = jnp.asarray([[1, 5, 2, 9, 3]])
    np.testing.assert_allclose(logits(permuted, config, ids), logits(params, config, ids), rtol=1e-4, atol=1e-5)
    aligned = jaxmerge.align(spec, params, permuted)
    jax.tree.map(np.testing.assert_array_equal, aligned, params)
    del params["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(jaxmerge.JaxmergeError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        jaxmerge.llama_permutation_spec(params, config)


def test_fusing_into_a_width_of_its_own():
    model = _dict_mlp([5, 6, 4, 3], seed=3)
    spec = jaxmerge.mlp_permutation_spec(model)
    shuffled = jaxmerge.apply_permutation(spec, jaxmerge.random_permutation(spec, model, seed=4), model)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((32, 5)), jnp.float32)
    wide = jaxmerge.ot_fusion(spec, [model, shuffled], widths={"hidden_0": 12, "hidden_1": 8}, rounds=2)
    assert wide["l0"]["kernel"].shape == (5, 12) and wide["l1"]["kernel"].shape == (12, 8)
    np.testing.assert_allclose(_dict_apply(wide, x), _dict_apply(model, x), rtol=1e-5, atol=1e-5)  # units split
    same = jaxmerge.ot_fusion(spec, [model, shuffled], widths={"hidden_0": 6})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), same, model)
    narrow = jaxmerge.ot_fusion(spec, [model, shuffled], widths={"hidden_0": 3}, rounds=3)
    assert narrow["l0"]["kernel"].shape == (5, 3) and np.isfinite(_dict_apply(narrow, x)).all()
    with pytest.raises(jaxmerge.JaxmergeError, match=r"widths\['hidden_0'\] must be at least 1"):
        jaxmerge.ot_fusion(spec, [model], widths={"hidden_0": 0})
