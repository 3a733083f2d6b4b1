"""PEFT's adapter format, applying adapters to a base, extracting them, and the commands."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxmerge import checkpoints, lora
from jaxmerge.cli.main import main
from jaxmerge.errors import CheckpointError, JaxmergeError
from tests.lora.helpers import SHAPES, random_adapter


def _base(seed=9, dtype=np.float32):
    rng = np.random.default_rng(seed)
    tensors = {f"{m}.weight": rng.normal(size=shape).astype(dtype) for m, shape in SHAPES.items()}
    tensors["model.embed_tokens.weight"] = rng.normal(size=(20, 10)).astype(dtype)
    tensors["model.norm.weight"] = np.ones(10, dtype)
    return tensors


def test_save_and_load_round_trip_with_patterns_embeddings_and_extras(tmp_path):
    adapter = random_adapter(0, r=4, alpha=8, rank_pattern={"v_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                             dtype=jnp.bfloat16)
    rng = np.random.default_rng(1)
    embedding = lora.LoraLayer(jnp.asarray(rng.normal(size=(4, 20)), jnp.bfloat16),
                               jnp.asarray(rng.normal(size=(10, 4)), jnp.bfloat16))
    adapter = lora.Adapter({**adapter.layers, "model.embed_tokens": embedding}, adapter.config,
                           frozenset({"model.embed_tokens"}), {"base_model.model.model.norm.weight": jnp.ones(10)})
    path = lora.save_adapter(tmp_path / "a", adapter)
    loaded = lora.load_adapter(path)
    names = checkpoints.SafetensorsReader(path / "adapter_model.safetensors").names
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in names
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in names
    assert loaded.config == adapter.config and loaded.embeddings == adapter.embeddings
    jax.tree.map(np.testing.assert_array_equal, loaded, adapter)
    assert loaded.scaling("model.layers.1.self_attn.q_proj") == 0.75
    assert loaded.scaling("model.layers.0.self_attn.q_proj") == 2.0
    a, b = (np.asarray(x, np.float32) for x in embedding)
    np.testing.assert_allclose(np.asarray(loaded.delta("model.embed_tokens")), 2 * (b @ a).T, rtol=1e-5)
    assert lora.Adapter(adapter.layers, {**adapter.config, "use_rslora": True}).scaling("model.x") == 4.0


def test_adapter_is_a_pytree_under_jit():
    adapter = random_adapter(0)
    doubled = jax.jit(lambda a: jax.tree.map(lambda x: 2 * x, a))(adapter)
    assert isinstance(doubled, lora.Adapter) and doubled.config == adapter.config
    np.testing.assert_array_equal(doubled.layers["model.layers.0.self_attn.v_proj"].a,
                                  2 * adapter.layers["model.layers.0.self_attn.v_proj"].a)


def test_bad_adapter_directories_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        lora.load_adapter(tmp_path)
    path = lora.save_adapter(tmp_path / "a", random_adapter(0))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(CheckpointError, match="gives it rank 3"):
        lora.load_adapter(path)
    (path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        lora.load_adapter(path)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        lora.save_adapter(path, random_adapter(0))


def test_merge_adapter_adds_the_scaled_update_and_removes_it_again():
    base, adapter = _base(), random_adapter(0, alpha=2)
    merged = lora.merge_adapter(base, adapter, weight=0.5)
    for module in SHAPES:
        layer = adapter.layers[module]
        expected = base[f"{module}.weight"] + 0.5 * 0.5 * (np.asarray(layer.b) @ np.asarray(layer.a))
        np.testing.assert_allclose(np.asarray(merged[f"{module}.weight"]), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged["model.norm.weight"]), base["model.norm.weight"])
    restored = lora.merge_adapter(merged, adapter, weight=-0.5)
    for name in base:
        np.testing.assert_allclose(np.asarray(restored[name]), base[name], atol=1e-5)
    with pytest.raises(JaxmergeError, match="no tensor 'model.layers.0.self_attn.q_proj.weight'"):
        lora.merge_adapter({"model.norm.weight": base["model.norm.weight"]}, adapter)


def _fused_in_order(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``b @ a`` in float32 summed over the rank in order, each step a fused multiply-add (the
    product of two float32 numbers is exact in float64; the sum is then rounded to float32)."""
    total = np.zeros((b.shape[0], a.shape[1]), np.float32)
    for k in range(a.shape[0]):
        total = (total + np.outer(b[:, k].astype(np.float64), a[k].astype(np.float64))).astype(np.float32)
    return total


@pytest.mark.parametrize("rank, blocks", [(192, [192]), (193, [96, 96, 1]), (256, [128, 128]), (577, [192, 192, 192, 1])])
def test_long_updates_are_summed_in_torchs_blocks(rank, blocks):
    """torch's CPU matrix multiply sums more than 192 rank terms in blocks (two halves up to 384,
    blocks of 192 beyond), each from zero, and adds the blocks' sums in order."""
    rng = np.random.default_rng(rank)
    a, b = rng.normal(size=(rank, 12)).astype(np.float32), rng.normal(size=(10, rank)).astype(np.float32)
    starts = np.cumsum([0, *blocks])
    parts = [_fused_in_order(b[:, s:e], a[s:e]) for s, e in itertools.pairwise(starts)]
    expected = parts[0]
    for part in parts[1:]:
        expected = expected + part
    np.testing.assert_array_equal(np.asarray(lora.delta_weight(lora.LoraLayer(jnp.asarray(a), jnp.asarray(b)), 1.0)),
                                  expected)


def test_updates_have_peft_arithmetic_and_an_embedding_update_is_rounded_before_it_is_added():
    """PEFT on CPU: torch's float32 ``B @ A`` (a fused multiply-add per rank term, in order) times
    the scaling; a linear layer adds the float32 update to its bfloat16 weight (one rounding), an
    embedding adds it rounded to bfloat16 first (two)."""
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(24, 4)).astype(np.float32)
    layer = lora.LoraLayer(jnp.asarray(a), jnp.asarray(b))
    update = (_fused_in_order(b, a) * np.float32(0.75)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(lora.delta_weight(layer, 0.75)), update)
    base = {name: rng.normal(size=(24, 16)).astype(ml_dtypes.bfloat16) for name in ("q.weight", "embed.weight")}
    transposed = lora.LoraLayer(jnp.asarray(b.T), jnp.asarray(a.T))  # an embedding's factors: A (r, rows)
    adapter = lora.Adapter({"q": layer, "embed": transposed}, lora.lora_config(4, 3, ["q", "embed"]),
                           frozenset({"embed"}))
    merged = lora.merge_adapter(base, adapter)
    once = (base["q.weight"].astype(np.float32) + update).astype(ml_dtypes.bfloat16)
    twice = (base["embed.weight"].astype(np.float32)
             + update.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(merged["q.weight"]), once)
    np.testing.assert_array_equal(np.asarray(merged["embed.weight"]), twice)
    assert (twice != (base["embed.weight"].astype(np.float32) + update).astype(ml_dtypes.bfloat16)).any()


def test_peft_files_as_peft_merges_them(tmp_path):
    """Factors named with the ``default`` adapter, a bias saved under its base layer's name,
    and GPT-2 ``Conv1D`` weights (stored ``(in, out)``) beside a ``Linear`` head, whatever
    ``fan_in_fan_out`` the config holds."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    shapes = {"h.0.attn.c_proj": (8, 8), "h.0.attn.c_attn": (8, 24), "score": (3, 8)}  # stored shapes
    base = {f"{m}.weight": rng.normal(size=s).astype(np.float32) for m, s in shapes.items()}
    base["h.0.attn.c_proj.bias"] = np.zeros(8, np.float32)
    factors, expected = {}, dict(base)
    for module, (rows, cols) in shapes.items():
        out, inp = (rows, cols) if module == "score" else (cols, rows)  # Conv1D stores (in, out)
        a, b = rng.normal(size=(2, inp)).astype(np.float32), rng.normal(size=(out, 2)).astype(np.float32)
        factors.update({f"base_model.model.{module}.lora_A.default.weight": a,
                        f"base_model.model.{module}.lora_B.default.weight": b})
        update = 1.5 * b @ a
        expected[f"{module}.weight"] = base[f"{module}.weight"] + (update if module == "score" else update.T)
    bias = rng.normal(size=8).astype(np.float32)
    factors["base_model.model.h.0.attn.c_proj.base_layer.bias"] = expected["h.0.attn.c_proj.bias"] = bias
    (tmp_path / "a").mkdir()
    save_file(factors, str(tmp_path / "a" / "adapter_model.safetensors"))
    config = lora.lora_config(2, 3, list(shapes))
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    merged = lora.merge_adapter(base, lora.load_adapter(tmp_path / "a"))
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(merged[name]), value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_conv1d_layers_of_gpt2_models_are_transposed_whatever_the_config_says(tmp_path):
    """PEFT decides by layer type: a GPT-2 model's square ``c_proj`` is a ``Conv1D`` even when
    the adapter's last layer (a ``Linear`` head) left ``fan_in_fan_out`` false and no other
    layer's shape tells; the base's ``config.json`` (``model_type``) says so."""
    rng = np.random.default_rng(6)
    c_proj = lora.LoraLayer(jnp.asarray(rng.normal(size=(2, 8)), jnp.float32), jnp.asarray(rng.normal(size=(8, 2)), jnp.float32))
    adapter = lora.Adapter({"h.0.attn.c_proj": c_proj}, lora.lora_config(2, 2, ["c_proj"], fan_in_fan_out=False))
    base = {"h.0.attn.c_proj.weight": np.zeros((8, 8), np.float32)}
    expected = np.asarray(lora.delta_weight(c_proj, 1.0)).T
    np.testing.assert_array_equal(lora.merge_adapter(base, adapter, model_type="gpt2")["h.0.attn.c_proj.weight"], expected)
    assert not np.array_equal(lora.merge_adapter(base, adapter)["h.0.attn.c_proj.weight"], expected)  # the config's
    base_dir = checkpoints.save(tmp_path / "base", base, format="safetensors")
    (base_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    applied = lora.apply_adapter(base_dir, adapter, tmp_path / "out", options=checkpoints.StreamOptions(progress=False))
    np.testing.assert_array_equal(checkpoints.load(applied)["h.0.attn.c_proj.weight"], expected)


def test_tied_embeddings_as_peft_merges_them(tmp_path):
    """A base that leaves its head out (tied to the input embedding): a LoRA head's update goes
    to the shared weight, after the embedding's own, and its saved base layer replaces the
    shared weight; an embedding trained in full unties them (the head keeps the base's values,
    and the config says so), unless trained with ``ensure_weight_tying``."""
    rng = np.random.default_rng(8)
    embedding = rng.normal(size=(12, 6)).astype(np.float32)
    head = lora.LoraLayer(jnp.asarray(rng.normal(size=(2, 6)), jnp.float32), jnp.asarray(rng.normal(size=(12, 2)), jnp.float32))
    own = lora.LoraLayer(jnp.asarray(rng.normal(size=(2, 12)), jnp.float32), jnp.asarray(rng.normal(size=(6, 2)), jnp.float32))
    config = lora.lora_config(2, 2, ["lm_head", "embed_tokens"])
    saved = {f"base_model.model.{m}.base_layer.weight": rng.normal(size=(12, 6)).astype(np.float32)
             for m in ("model.embed_tokens", "lm_head")}  # PEFT loads the head's last, into the shared weight
    shared = lora.Adapter({"lm_head": head, "model.embed_tokens": own}, config, frozenset({"model.embed_tokens"}), saved)
    merged = lora.merge_adapter({"model.embed_tokens.weight": embedding}, shared)
    expected = (saved["base_model.model.lm_head.base_layer.weight"] + np.asarray(lora.delta_weight(own, 1.0, transposed=True))
                + np.asarray(lora.delta_weight(head, 1.0)))
    assert sorted(merged) == ["model.embed_tokens.weight"]
    np.testing.assert_array_equal(np.asarray(merged["model.embed_tokens.weight"]), expected)
    trained = rng.normal(size=(12, 6)).astype(np.float32)
    untying = lora.Adapter({"lm_head": head}, config, frozenset(), {"base_model.model.model.embed_tokens.weight": trained})
    base = checkpoints.save(tmp_path / "base", {"model.embed_tokens.weight": embedding}, format="safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    out = checkpoints.load(lora.apply_adapter(base, untying, tmp_path / "out", options=checkpoints.StreamOptions(progress=False)))
    np.testing.assert_array_equal(out["model.embed_tokens.weight"], trained)
    np.testing.assert_array_equal(out["lm_head.weight"], embedding + np.asarray(lora.delta_weight(head, 1.0)))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    kept = lora.Adapter({}, {**config, "ensure_weight_tying": True}, frozenset(),
                        {"base_model.model.model.embed_tokens.weight": trained, "base_model.model.lm_head.weight": trained})
    assert {k: np.asarray(v).tolist() for k, v in lora.merge_adapter({"model.embed_tokens.weight": embedding}, kept).items()} \
        == {"model.embed_tokens.weight": trained.tolist()}  # trained with the weights tied: they stay tied


def test_square_layers_follow_the_layout_their_namesakes_show_and_removal_restores_saved_base_layers():
    rng = np.random.default_rng(4)

    def layer(out, inp):
        return lora.LoraLayer(jnp.asarray(rng.normal(size=(2, inp))), jnp.asarray(rng.normal(size=(out, 2))))
    modules = {"h.0.attn.c_proj": layer(8, 8), "h.0.mlp.c_proj": layer(8, 32)}  # GPTBigCode: Linear layers
    adapter = lora.Adapter(modules, lora.lora_config(2, 2, ["c_proj"]))
    base = {"h.0.attn.c_proj.weight": np.zeros((8, 8), np.float32), "h.0.mlp.c_proj.weight": np.zeros((8, 32), np.float32)}
    merged = lora.merge_adapter(base, adapter)
    for module, value in modules.items():
        np.testing.assert_allclose(merged[f"{module}.weight"], np.asarray(value.b @ value.a), rtol=1e-6, atol=1e-6)
    embedding = lora.LoraLayer(jnp.asarray(rng.normal(size=(2, 5))), jnp.asarray(rng.normal(size=(3, 2))))
    saved = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    adapter = lora.Adapter({"embed": embedding}, lora.lora_config(2, 2, ["embed"]), frozenset({"embed"}),
                           {"base_model.model.embed.base_layer.weight": saved})
    applied = lora.merge_adapter({"embed.weight": jnp.zeros((5, 3))}, adapter)
    np.testing.assert_allclose(applied["embed.weight"], saved + (embedding.b @ embedding.a).T, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(lora.merge_adapter(applied, adapter, weight=-1)["embed.weight"], saved)
    trained = lora.Adapter(adapter.layers, adapter.config, adapter.embeddings,
                           {**adapter.extras, "base_model.model.head.weight": jnp.ones(3)})
    with pytest.raises(JaxmergeError, match="removing it cannot give back the base's values"):
        lora.merge_adapter({"embed.weight": jnp.zeros((5, 3)), "head.weight": jnp.zeros(3)}, trained, weight=-1)


def test_apply_adapter_streams_the_same_result_and_keeps_dtypes(tmp_path):
    base = _base(dtype=ml_dtypes.bfloat16)
    base_dir = checkpoints.save(tmp_path / "base", base, format="safetensors")
    (base_dir / "config.json").write_text("{}")
    adapter = random_adapter(0)
    lora.save_adapter(tmp_path / "adapter", adapter)
    assert main(["apply-adapter", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "out"), "--no-progress"]) == 0
    written = checkpoints.load(tmp_path / "out")
    expected = lora.merge_adapter({k: jnp.asarray(v) for k, v in base.items()}, adapter)
    assert (tmp_path / "out" / "config.json").exists()
    for name in base:
        assert written[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(written[name]), np.asarray(expected[name]))
    assert main(["apply-adapter", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "adapter"), "--force",
                 "--no-progress"]) == 2
    assert lora.load_adapter(tmp_path / "adapter").config == adapter.config  # the input survived


def test_extraction_is_the_best_low_rank_approximation():
    rng = np.random.default_rng(0)
    base = _base()
    tuned = {n: x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for n, x in base.items()}
    adapter, energy = lora.extract_lora(base, tuned, max_rank=3)
    assert sorted(adapter.layers) == sorted(SHAPES) and adapter.config["r"] == adapter.config["lora_alpha"] == 3
    assert adapter.config["modules_to_save"] == ["embed_tokens", "norm"]
    for module in SHAPES:
        delta = tuned[f"{module}.weight"] - base[f"{module}.weight"]
        s = np.linalg.svd(delta, compute_uv=False)
        error = np.linalg.norm(np.asarray(adapter.delta(module)) - delta)
        np.testing.assert_allclose(error, np.sqrt((s[3:] ** 2).sum()), rtol=1e-4)  # Eckart-Young
        np.testing.assert_allclose(energy[module], (s[:3] ** 2).sum() / (s ** 2).sum(), rtol=1e-5)
        layer = adapter.layers[module]
        np.testing.assert_allclose(np.linalg.norm(layer.a, axis=1), np.linalg.norm(layer.b, axis=0), rtol=1e-4)
    applied = lora.merge_adapter(base, adapter)
    np.testing.assert_array_equal(np.asarray(applied["model.norm.weight"]), tuned["model.norm.weight"])


def test_extraction_options_threshold_embeddings_and_filters():
    rng = np.random.default_rng(1)
    base = _base()
    low = rng.normal(size=(12, 2)) @ rng.normal(size=(2, 10))
    tuned = {**base, "model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"]
             + low.astype(np.float32), "model.embed_tokens.weight": base["model.embed_tokens.weight"] + 1}
    adapter, _ = lora.extract_lora(base, tuned, max_rank=8, sv_epsilon=1e-3, embed_lora=True,
                                   exclude=["layers.1"], distribute_scale=False)
    assert sorted(adapter.layers) == ["model.embed_tokens", "model.layers.0.self_attn.q_proj"]
    assert adapter.rank("model.layers.0.self_attn.q_proj") == 2 and adapter.rank("model.embed_tokens") == 1
    assert adapter.embeddings == {"model.embed_tokens"}
    np.testing.assert_allclose(np.asarray(adapter.delta("model.embed_tokens")), np.ones((20, 10)), atol=1e-5)
    b = np.asarray(adapter.layers["model.layers.0.self_attn.q_proj"].b)
    np.testing.assert_allclose(b.T @ b, np.eye(2), atol=1e-5)  # all of S in A
    only_q, _ = lora.extract_lora(base, tuned, include=["q_proj"], exclude=["layers.1"], sv_epsilon=1e-3)
    assert list(only_q.layers) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(JaxmergeError, match="nothing to extract"):
        lora.extract_lora(base, base, sv_epsilon=1e-3)


def test_extract_merge_and_apply_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(2)
    base = _base()
    paths = {"base": checkpoints.save(tmp_path / "base", base, format="safetensors")}
    for i in range(2):
        tuned = {n: x + 0.05 * rng.normal(size=x.shape).astype(np.float32) for n, x in base.items()}
        paths[i] = checkpoints.save(tmp_path / f"ft{i}", tuned, format="safetensors")
        assert main(["extract-lora", "--model", str(paths[i]), "--base-model", str(paths["base"]),
                     "--out-path", str(tmp_path / f"lora{i}"), "--max-rank", "10", "-e", "embed|norm",
                     "--cuda", "--no-embed-lora"]) == 0  # mergekit-extract-lora's options are accepted
    captured = capsys.readouterr()
    assert "retained energy mean 1.0000" in captured.out  # full rank: exact
    assert "--cuda, --no-embed-lora change nothing" in captured.err
    extracted = lora.load_adapter(tmp_path / "lora0")
    tuned = checkpoints.load(paths[0])
    for module in SHAPES:
        np.testing.assert_allclose(np.asarray(lora.merge_adapter(base, extracted)[f"{module}.weight"]),
                                   np.asarray(tuned[f"{module}.weight"]), atol=1e-5)
    assert main(["merge-adapters", str(tmp_path / "merged"), str(tmp_path / "lora0"), str(tmp_path / "lora1"),
                 "--weights", "0.5", "0.5", "--combination-type", "cat"]) == 0
    merged = lora.load_adapter(tmp_path / "merged")
    first = lora.load_adapter(tmp_path / "lora1")
    for module in SHAPES:
        np.testing.assert_allclose(np.asarray(merged.delta(module)),
                                   0.5 * np.asarray(extracted.delta(module) + first.delta(module)), atol=1e-5)
    assert main(["merge-adapters", str(tmp_path / "bad"), str(tmp_path / "lora0"), str(tmp_path / "lora1"),
                 "--combination-type", "ties"]) == 2
    assert "ties needs a density" in capsys.readouterr().err
    assert main(["extract-lora", "--model", str(paths[0]), "--base-model", str(paths["base"]),
                 "--out-path", str(paths[0]), "--force"]) == 2
    assert "overlap" in capsys.readouterr().err
