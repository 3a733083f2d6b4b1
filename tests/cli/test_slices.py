"""mergekit's ``slices`` configs: layers of several models stacked, renumbered and merged per slice,
checked against the in-memory functions on the same layers."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from tests.checkpoints.hf import llama_tensors, write_model

LAYERS = 4


@pytest.fixture
def family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = llama_tensors(0, layers=LAYERS)
    tunes = [llama_tensors(40 + i, layers=LAYERS, scale=0.05, around=base) for i in range(3)]
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS, "torch_dtype": "float32"}
    for name, tensors in [("base", base), *((f"m{i}", t) for i, t in enumerate(tunes))]:
        write_model(tmp_path / name, tensors, config=config)
    return {"base": base, **{f"m{i}": t for i, t in enumerate(tunes)}}


def _merge(tmp_path, **config) -> int:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["merge", str(path), str(tmp_path / "out"), "--no-progress"])


def _layers(tensors: dict, start: int, end: int, offset: int = 0) -> dict:
    """Layers ``[start, end)`` of ``tensors`` renumbered from ``offset``, with the tensors outside the stack."""
    out = {}
    for name, value in tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match is None:
            out[name] = value
        elif start <= int(match[1]) < end:
            out[f"model.layers.{int(match[1]) - start + offset}.{match[2]}"] = value
    return out


def test_a_passthrough_frankenmerge_stacks_and_renumbers_layers(tmp_path, family):
    slices = [{"sources": [{"model": "m0", "layer_range": [0, 3]}]},
              {"sources": [{"model": "m1", "layer_range": [1, 4]}]},
              {"sources": [{"model": "m2", "layer_range": [2, 3], "parameters": {"scale": 0.5}}]}]
    assert _merge(tmp_path, merge_method="passthrough", slices=slices, out_dtype="bfloat16") == 0
    out = checkpoints.load(tmp_path / "out")
    expected = {**_layers(family["m0"], 0, 3), **_layers(family["m1"], 1, 4, offset=3),
                **{n: v * 0.5 for n, v in _layers(family["m2"], 2, 3, offset=6).items()}}  # scaled, with what follows
    expected["model.embed_tokens.weight"] = family["m0"]["model.embed_tokens.weight"]  # before: the first slice's
    assert sorted(out) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(out[name], value.astype(jnp.bfloat16), err_msg=name)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_hidden_layers"] == 7 and written["torch_dtype"] == "bfloat16"


def test_the_base_model_gives_the_output_its_config_wherever_it_is_listed(tmp_path, family):
    config = json.loads((tmp_path / "m1" / "config.json").read_text())
    (tmp_path / "m1" / "config.json").write_text(json.dumps({**config, "marker": "m1"}))
    sources = [{"model": name, "layer_range": [0, LAYERS]} for name in ("m0", "m1")]
    assert _merge(tmp_path, merge_method="slerp", base_model="m1", parameters={"t": 0.0},
                  slices=[{"sources": sources}]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["marker"] == "m1"
    out = checkpoints.load(tmp_path / "out")
    for name, value in family["m1"].items():  # t = 0: the base itself
        np.testing.assert_allclose(out[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_gradients_run_over_each_slice(tmp_path, family):
    t = [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": [1, 0.2]}]
    slices = [{"sources": [{"model": "m0", "layer_range": [1, 3]}, {"model": "m1", "layer_range": [2, 4]}]},
              {"sources": [{"model": "m0", "layer_range": [0, 3]}, {"model": "m1", "layer_range": [0, 3]}],
               "parameters": {"t": 0.25}}]
    assert _merge(tmp_path, merge_method="slerp", base_model="m0", slices=slices, parameters={"t": t}) == 0
    out = checkpoints.load(tmp_path / "out")
    first = jaxmerge.slerp(_layers(family["m0"], 1, 3), _layers(family["m1"], 2, 4), t)
    second = jaxmerge.slerp(_layers(family["m0"], 0, 3, offset=2), _layers(family["m1"], 0, 3, offset=2), 0.25)
    assert len([n for n in out if n.startswith("model.layers.")]) == 5 * 9
    for name, value in out.items():
        expected = first[name] if name in first and ("layers.0." in name or "layers.1." in name or "layers" not in name)\
            else second[name]
        if name in ("model.norm.weight", "lm_head.weight"):
            expected = second[name]  # after the stack: the last slice, with its parameters
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_per_slice_base_models_and_parameters(tmp_path, family):
    slices = [{"sources": [{"model": "base", "layer_range": [0, 2]},
                           {"model": "m0", "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": "m1", "layer_range": [0, 2], "parameters": {"weight": 0.5}}],
               "parameters": {"lambda": 0.8}},
              {"sources": [{"model": "m2", "layer_range": [2, 4], "parameters": {"weight": 1.0}},
                           {"model": "m1", "layer_range": [2, 4], "parameters": {"weight": 1.0}}],
               "base_model": "m1"}]
    assert _merge(tmp_path, merge_method="ties", base_model="base", slices=slices,
                  parameters={"density": 0.7}) == 0
    out = checkpoints.load(tmp_path / "out")
    first = jaxmerge.ties(_layers(family["base"], 0, 2), [_layers(family["m0"], 0, 2), _layers(family["m1"], 0, 2)],
                          [1.0, 0.5], density=jaxmerge.per_model(0.5, 0.7), lambda_=0.8)
    second = jaxmerge.ties(_layers(family["m1"], 2, 4, offset=2), [_layers(family["m2"], 2, 4, offset=2)],
                           density=0.7)
    for name, value in out.items():
        index = re.match(r"model\.layers\.(\d+)\.", name)
        expected = (first if index is not None and int(index[1]) < 2 or "embed" in name else second)[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_models_filters_match_the_names_of_the_layers_it_is_read_from(tmp_path, family):
    """As mergekit resolves a model's parameters: its filters, set at any level, see the input
    tensor's name (``layers.2.`` for output layer 0 here); a merge-wide parameter sees the
    output's."""
    weight = [{"filter": "layers.2.", "value": 2.0}, {"filter": "layers.0.", "value": -1.0}, {"value": 0.5}]
    sources = [{"model": "base", "layer_range": [2, 4]}, {"model": "m0", "layer_range": [2, 4]}]
    assert _merge(tmp_path, merge_method="task_arithmetic", base_model="base", slices=[{"sources": sources}],
                  parameters={"weight": weight, "lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 1.0}]}) == 0
    out = checkpoints.load(tmp_path / "out")
    base, tune = _layers(family["base"], 2, 4), _layers(family["m0"], 2, 4)
    for name, value in out.items():
        read = name.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3.")
        w = next(v["value"] for v in weight if v.get("filter") is None or v["filter"] in read)
        lambda_ = 0.5 if "layers.0." in name else 1.0
        expected = np.asarray(base[name]) + lambda_ * w * (np.asarray(tune[name]) - np.asarray(base[name]))
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_tied_first_source_still_gives_the_slices_a_head(tmp_path, family):
    tied = {k: v for k, v in family["m0"].items() if k != "lm_head.weight"}
    write_model(tmp_path / "tied", tied, config={"num_hidden_layers": LAYERS, "tie_word_embeddings": True})
    sources = [{"model": m, "layer_range": [0, LAYERS], "parameters": {"weight": 1.0}} for m in ("tied", "m1")]
    assert _merge(tmp_path, merge_method="linear", slices=[{"sources": sources}]) == 0
    head = checkpoints.load(tmp_path / "out")["lm_head.weight"]
    expected = (np.asarray(tied["model.embed_tokens.weight"]) + np.asarray(family["m1"]["lm_head.weight"])) / 2
    np.testing.assert_allclose(head, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config,message", [
    (dict(merge_method="slerp", base_model="base", parameters={"t": 0.5},
          slices=[{"sources": [{"model": "m0", "layer_range": [0, 4]}, {"model": "m1", "layer_range": [0, 4]}]}]),
     "slices[0]: the base_model base is not one of its sources"),
    (dict(merge_method="passthrough", slices=[{"sources": [{"model": "m0", "layer_range": [2, 6]}]}]),
     "slices[0].sources[0] (m0): layer_range [2, 6] goes beyond its 4 layers"),
    (dict(merge_method="linear", slices=[{"sources": [{"model": "m0", "layer_range": [0, 2]},
                                                      {"model": "m1", "layer_range": [0, 3]}]}]),
     "the sources of slices[0] must hold the same number of layers, got 2, 3"),
    (dict(merge_method="passthrough", slices=[{"sources": [{"model": "m0", "layer_range": [0]}]}]),
     "slices[0].sources[0].layer_range must be [start, end]"),
    (dict(merge_method="passthrough", models=["m0"], slices=[]), "give exactly one of 'models' and 'slices'"),
    (dict(merge_method="slerp", base_model="m0", parameters={"t": 0.5},
          slices=[{"sources": [{"model": name, "layer_range": [0, 4]} for name in ("m0", "m1", "m2")]}]),
     "slices[0]: slerp merges exactly 2 models, got 3"),
    (dict(merge_method="fisher", slices=[{"sources": [{"model": "m0", "layer_range": [0, 4],
                                                       "parameters": {"statistics": "m0"}}]}]),
     "fisher merges whole models by their statistics; use 'models', not 'slices'"),
])
def test_bad_slices_are_refused(tmp_path, family, capsys, config, message):
    assert _merge(tmp_path, **config) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out").exists()


def test_model_ids_are_found_in_the_hugging_face_cache(tmp_path, family, monkeypatch):
    cache = tmp_path / "hub"
    for name, commit in (("m0", "a1b2"), ("m1", "c3d4")):
        snapshot = cache / f"models--org--{name}" / "snapshots" / commit
        write_model(snapshot, family[name])
        (cache / f"models--org--{name}" / "refs").mkdir()
        (cache / f"models--org--{name}" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert _merge(tmp_path, merge_method="linear", models=[{"model": "org/m0", "parameters": {"weight": 1.0}},
                                                           {"model": "org/m1@c3d4", "parameters": {"weight": 3.0}}]) == 0
    out = checkpoints.load(tmp_path / "out")
    np.testing.assert_allclose(out["lm_head.weight"], (family["m0"]["lm_head.weight"]
                                                       + 3 * family["m1"]["lm_head.weight"]) / 4, rtol=1e-6)
    for absent in ("org/absent", "org/m0@..", "org/m0@../../m1/snapshots/c3d4"):  # a revision names a snapshot only
        assert _merge(tmp_path, merge_method="linear", models=[{"model": absent, "parameters": {"weight": 1.0}}]) == 2


def test_a_local_path_with_a_revision_names_the_path(tmp_path, family):
    """As mergekit reads local models: ``m0@main`` is the directory ``m0``, the revision unused."""
    assert _merge(tmp_path, merge_method="linear", models=[{"model": "m0@main", "parameters": {"weight": 1.0}}]) == 0
    np.testing.assert_array_equal(checkpoints.load(tmp_path / "out")["lm_head.weight"], family["m0"]["lm_head.weight"])
