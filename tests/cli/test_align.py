import json

import jax
import jax.numpy as jnp
import numpy as np
import yaml

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from jaxmerge.moe.transformer import logits, random_params
from tests.checkpoints.hf import write_model

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 11,
          "rms_norm_eps": 1e-6}


def _model(seed):
    params = random_params(CONFIG, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype) if "norm" in k else v for k, v in params.items()}


def test_align_command_undoes_a_permutation_and_its_output_merges(tmp_path):
    reference = _model(0)
    spec = jaxmerge.llama_permutation_spec(reference, CONFIG)
    perm = jaxmerge.random_permutation(spec, reference, seed=1)
    write_model(tmp_path / "reference", reference, config=CONFIG)
    write_model(tmp_path / "shuffled", jaxmerge.apply_permutation(spec, perm, reference), config=CONFIG)
    assert main(["align", str(tmp_path / "reference"), str(tmp_path / "shuffled"), str(tmp_path / "aligned"),
                 "--no-progress"]) == 0
    loaded = checkpoints.load(tmp_path / "aligned")
    assert sorted(loaded) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    record = json.loads((tmp_path / "aligned" / "jaxmerge_permutation.json").read_text())
    assert record["residual"] == np.argsort(perm["residual"]).tolist()  # the inverse of the shuffle
    assert json.loads((tmp_path / "aligned" / "config.json").read_text()) == CONFIG

    other = _model(2)  # a different model: aligned, it computes what it did, and the pair merges
    write_model(tmp_path / "other", other, config=CONFIG)
    assert main(["align", str(tmp_path / "reference"), str(tmp_path / "other"), str(tmp_path / "other_aligned"),
                 "--no-progress", "--no-heads"]) == 0
    aligned = checkpoints.load(tmp_path / "other_aligned")
    ids = jnp.asarray([[1, 4, 7, 2]])
    np.testing.assert_allclose(logits(aligned, CONFIG, ids), logits(other, CONFIG, ids), rtol=1e-4, atol=1e-5)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "reference"), "parameters": {"weight": 0.5}},
        {"model": str(tmp_path / "other_aligned"), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "merged"), "--no-progress"]) == 0
    merged = checkpoints.load(tmp_path / "merged")
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_allclose(merged[name], (reference[name] + aligned[name]) / 2, rtol=1e-6)


def test_align_command_refuses_other_architectures(tmp_path, capsys):
    write_model(tmp_path / "a", _model(0), config={**CONFIG, "model_type": "gpt2"})
    write_model(tmp_path / "b", _model(1), config=CONFIG)
    assert main(["align", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    assert "is a 'gpt2' model; align reads the Llama family" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
