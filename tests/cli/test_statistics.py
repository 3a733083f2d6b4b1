"""Fisher and RegMean merges from the command line: each model's statistics checkpoint named by
its ``statistics`` parameter, the output equal to the in-memory function's."""

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from tests.checkpoints.hf import llama_tensors, write_model


def _fisher(tensors, seed):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.exponential(size=x.shape), jnp.float32) for name, x in tensors.items()}


def _grams(tensors, seed):
    """A Gram ``X^T X`` of random inputs for every 2-d (out, in) weight, keyed as input_grams keys them."""
    rng = np.random.default_rng(seed)
    grams = {}
    for name, x in tensors.items():
        if x.ndim == 2:
            inputs = rng.standard_normal((3 * x.shape[1], x.shape[1]))
            grams[name] = {"gram": jnp.asarray(inputs.T @ inputs, jnp.float32), "count": jnp.float32(len(inputs))}
    return grams


@pytest.fixture
def family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs name models by relative paths
    base = llama_tensors(0)
    tunes = [llama_tensors(30 + i, scale=0.05, around=base) for i in range(2)]
    for i, t in enumerate(tunes):
        write_model(tmp_path / f"tune{i}", t)
    return tunes


def _merge(tmp_path, **config) -> int:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["merge", str(path), str(tmp_path / "out"), "--no-progress"])


def _loaded(path) -> dict:
    return {k: np.asarray(v) for k, v in checkpoints.load(path).items()}


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_fisher_config_equals_fisher_merge(tmp_path, family, fmt):
    fishers = [_fisher(t, 40 + i) for i, t in enumerate(family)]
    for i, f in enumerate(fishers):
        checkpoints.save(tmp_path / f"fisher{i}", f, format=fmt)
    assert _merge(tmp_path, merge_method="fisher", parameters={"normalize_fishers": "l2", "epsilon": 1.0e-6},
                  models=[{"model": f"tune{i}", "parameters": {"weight": w, "statistics": f"fisher{i}"}}
                          for i, w in enumerate([1.0, 0.5])]) == 0
    expected = jaxmerge.fisher_merge(family, fishers, [1.0, 0.5], normalize_fishers="l2", epsilon=1e-6)
    out = _loaded(tmp_path / "out")
    assert sorted(out) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(out[name], value, err_msg=name)


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_regmean_config_equals_regmean(tmp_path, family, fmt):
    grams = [_grams(t, 50 + i) for i, t in enumerate(family)]
    for i, g in enumerate(grams):
        checkpoints.save(tmp_path / f"grams{i}", g, format=fmt)
    assert _merge(tmp_path, merge_method="regmean", parameters={"alpha": 0.7, "layout": "out_in"},
                  models=[{"model": f"tune{i}", "parameters": {"statistics": f"grams{i}"}} for i in range(2)]) == 0
    expected = jaxmerge.regmean(family, grams, alpha=0.7, layout="out_in")
    out = _loaded(tmp_path / "out")
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # the kernels are RegMean's, not averages: they differ from the mean of the models
    name = "model.layers.0.mlp.down_proj.weight"
    assert not np.allclose(out[name], (family[0][name] + family[1][name]) / 2, atol=1e-4)


def test_statistics_errors_name_the_model_and_tensor(tmp_path, family, capsys):
    fishers = [_fisher(t, 40 + i) for i, t in enumerate(family)]
    checkpoints.save(tmp_path / "fisher0", fishers[0], format="safetensors")
    checkpoints.save(tmp_path / "fisher1", dict(fishers[1], extra=jnp.ones(3)), format="safetensors")
    short = dict(fishers[1])
    del short["lm_head.weight"]
    checkpoints.save(tmp_path / "short", short, format="safetensors")
    checkpoints.save(tmp_path / "grams", {"lm_head.weight": {"gram": jnp.eye(16)}, "elsewhere": {"gram": jnp.eye(2)}},
                     format="safetensors")

    def run(method, stats, **parameters):
        code = _merge(tmp_path, merge_method=method, parameters=parameters,
                      models=[{"model": f"tune{i}", "parameters": {"statistics": s}} for i, s in enumerate(stats)])
        return code, capsys.readouterr().err

    code, err = run("fisher", ["fisher0", "fisher1"])
    assert code == 2 and "fishers[1] has a Fisher for 'extra', which is not a leaf of the models" in err
    code, err = run("fisher", ["fisher0", "short"])
    assert code == 2 and "fishers[1] has no Fisher for 'lm_head.weight'" in err
    code, err = run("regmean", ["grams", "grams"], layout="out_in")
    assert code == 2 and "grams[0] has statistics for 'elsewhere', which is not a leaf of the models" in err
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "fisher", "models": ["tune0", "tune1"]}))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "models[0] needs a 'statistics' parameter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
