import hashlib
import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import jaxmerge
from jaxmerge import checkpoints
from jaxmerge.cli.main import main
from jaxmerge.errors import CheckpointError
from tests.checkpoints.hf import llama_tensors, write_model

cli_main = importlib.import_module("jaxmerge.cli.main")  # the module (jaxmerge.cli.main.main is the function)


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs name models by relative paths
    base = llama_tensors(0)
    tunes = [llama_tensors(20 + i, scale=0.05, around=base) for i in range(2)]
    write_model(tmp_path / "base", base)
    for i, t in enumerate(tunes):
        write_model(tmp_path / f"tune{i}", t, shards=2)
    return base, tunes


def _config(tmp_path, **content) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _run(*args) -> int:
    return main([str(a) for a in args])


def _check_output(out: Path, expected: dict, dtype=None):
    loaded = checkpoints.load(out)
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value.astype(dtype or value.dtype), err_msg=name)


def test_linear_config(tmp_path, models, capsys):
    base, tunes = models
    config = _config(tmp_path, merge_method="linear", dtype="float32",
                     models=[{"model": "tune0", "parameters": {"weight": 0.3}},
                             {"model": "tune1", "parameters": {"weight": 0.7}}])
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    _check_output(tmp_path / "out", jaxmerge.average(tunes, [0.3, 0.7]))
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "jaxmerge_config.yml",
                     "model.safetensors", "tokenizer.json"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "jaxmerge's `linear` method" in card and "- `tune0`" in card and "weight: 0.3" in card
    assert "wrote" in capsys.readouterr().out


def test_a_model_with_tied_embeddings_gives_its_input_embedding_as_its_head(tmp_path, models):
    """As mergekit reads it: a model without ``lm_head.weight`` merges its embedding there when
    another model has a head; when no model has one, the output has none either."""
    base, tunes = models
    tied = [{k: v for k, v in t.items() if k != "lm_head.weight"} for t in tunes]
    for i, t in enumerate(tied):
        write_model(tmp_path / f"tied{i}", t, config={"tie_word_embeddings": True})
    as_read = {**tied[0], "lm_head.weight": tied[0]["model.embed_tokens.weight"]}
    config = _config(tmp_path, merge_method="task_arithmetic", base_model="tied0",
                     models=[{"model": "tune1", "parameters": {"weight": 0.6}},
                             {"model": "base", "parameters": {"weight": 1.0}}])
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    loaded = checkpoints.load(tmp_path / "out")
    assert sorted(loaded) == sorted(base)
    for name in base:
        expected = (np.asarray(as_read[name], np.float32) + 0.6 * (np.asarray(tunes[1][name]) - as_read[name])
                    + (np.asarray(base[name]) - as_read[name]))
        np.testing.assert_allclose(loaded[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
    config = _config(tmp_path, merge_method="linear", models=[{"model": f"tied{i}", "parameters": {"weight": 1.0}}
                                                              for i in range(2)])
    assert _run("merge", config, tmp_path / "both", "--no-progress") == 0
    assert sorted(checkpoints.load(tmp_path / "both")) == sorted(tied[0])


def test_ties_config_with_gradients_filters_and_out_dtype(tmp_path, models):
    base, tunes = models
    config = _config(tmp_path, merge_method="ties", base_model=str(tmp_path / "base"), out_dtype="bfloat16",
                     parameters={"normalize": True, "lambda": 0.9},
                     models=[{"model": str(tmp_path / "base")},
                             {"model": str(tmp_path / "tune0"), "parameters": {"weight": [0.2, 1.0], "density": 0.5}},
                             {"model": str(tmp_path / "tune1"),
                              "parameters": {"weight": 0.6,
                                             "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}}])
    assert _run("merge", config, tmp_path / "out", "--no-progress", "--max-shard-size", "5KB") == 0
    expected = jaxmerge.ties(base, tunes, [[0.2, 1.0], 0.6], lambda_=0.9,
                             density=jaxmerge.per_model(0.5, [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]))
    _check_output(tmp_path / "out", expected, dtype=jnp.bfloat16)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_slerp_dare_and_orbax_output(tmp_path, models):
    base, tunes = models
    slerp = _config(tmp_path, merge_method="slerp", base_model=str(tmp_path / "base"),
                    models=[{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "tune0")}],
                    parameters={"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]})
    assert _run("merge", slerp, tmp_path / "slerp", "--no-progress", "--output-format", "orbax") == 0
    expected = jaxmerge.slerp(base, tunes[0], [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}])
    loaded = checkpoints.load(tmp_path / "slerp")
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
    dare = _config(tmp_path, merge_method="dare_ties", base_model=str(tmp_path / "base"),
                   models=[{"model": str(tmp_path / f"tune{i}"), "parameters": {"weight": 1.0, "density": 0.5}}
                           for i in range(2)])
    assert _run("merge", dare, tmp_path / "dare", "--no-progress", "--random-seed", "7") == 0
    _check_output(tmp_path / "dare", jaxmerge.dare_ties(base, tunes, density=0.5, key=jax.random.key(7)))


def test_what_mergekit_ignores_is_reported_then_ignored(tmp_path, models, capsys):
    base, tunes = models
    config = _config(tmp_path, merge_method="linear", modules_of_mine=3,
                     models=[{"model": "tune0", "parameters": {"weight": 1.0, "wieght": 2.0}}, {"model": "tune1"}],
                     parameters={"weight": 1.0, "t": 0.5})
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "jaxmerge: warning: the config key 'modules_of_mine' is not read: ignored" in err
    assert "models[0].parameters has the parameter 'wieght', which merge_method 'linear' does not take" in err
    assert "parameters has the parameter 't'" in err
    _check_output(tmp_path / "out", jaxmerge.average(tunes))


def test_values_read_as_mergekit_validates_them(tmp_path, models):
    """YAML reads 5e-1 as a string and mergekit's validation makes it a number; 'yes' and 1 are
    booleans for a boolean parameter."""
    base, tunes = models
    config = tmp_path / "merge.yaml"
    config.write_text(f"""merge_method: ties
base_model: {tmp_path / "base"}
parameters: {{normalize: 'yes', lambda: '0.9', int8_mask: 1}}
models:
  - model: {tmp_path / "tune0"}
    parameters: {{weight: 1, density: 5e-1}}
  - model: {tmp_path / "tune1"}
    parameters: {{weight: [1e-1, 1], density: [{{filter: mlp, value: 3e-1}}, {{value: 0.7}}]}}
""")
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    density = jaxmerge.per_model(0.5, [{"filter": "mlp", "value": 0.3}, {"value": 0.7}])
    _check_output(tmp_path / "out", jaxmerge.ties(base, tunes, [1.0, [0.1, 1.0]], density=density, lambda_=0.9))


def test_mergekit_yaml_command_lines_run_unchanged(tmp_path, models, capsys):
    config = _config(tmp_path, merge_method="linear", models=[{"model": "tune0", "parameters": {"weight": 1.0}},
                                                              {"model": "tune1", "parameters": {"weight": 1.0}}])
    assert _run("merge", config, tmp_path / "out", "--cuda", "--lazy-unpickle", "--allow-crimes", "-j", "2",
                "--out-shard-size", "1B", "--quiet", "--no-copy-tokenizer", "--no-write-model-card") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "jaxmerge_config.yml", "model.safetensors"]
    err = capsys.readouterr().err
    assert "--cuda, --lazy-unpickle, --allow-crimes, --num-threads 2, --out-shard-size 1B change nothing" in err
    assert "%" not in err  # --quiet: no progress bar


def test_inspect(tmp_path, models, capsys):
    assert _run("inspect", tmp_path / "tune0") == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and "(16, 24)" in out
    params = sum(v.size for v in models[1][0].values())
    assert f"{len(models[1][0])} tensors, {params:,} parameters, {4 * params:,} bytes" in out


@pytest.mark.parametrize("content,message", [
    (dict(merge_method="tiez", models=["tune0"]), "unknown merge method 'tiez'"),
    (dict(merge_method="linear", models=[{"model": "nowhere"}]), "models[0]: path 'nowhere' does not exist"),
    (dict(merge_method="linear", modles=[]), "give exactly one of 'models' and 'slices'"),
    (dict(merge_method="ties", models=["tune0"]), "merge_method 'ties' needs a base_model"),
    (dict(merge_method="linear", models=["tune0", "tune1"]), "weight of models[0] (tune0) is required but not given"),
    (dict(merge_method="ties", base_model="base", models=[{"model": "tune0", "parameters": {"weight": 1, "density": 2}}]),
     "density of models[0] (tune0) must be in (0, 1], got 2"),
    (dict(merge_method="ties", base_model="base", parameters={"normalize": "maybe"},
          models=[{"model": "tune0", "parameters": {"weight": 1}}]), "normalize must be a boolean, got 'maybe'"),
    (dict(merge_method="ties", base_model="base", parameters={"lambda": "much"},
          models=[{"model": "tune0", "parameters": {"weight": 1}}]), "lambda must be a real number, got 'much'"),
    (dict(merge_method="karcher", models=["tune0", "tune1"], parameters={"max_iter": 2.5}),
     "max_iter must be an integer, got 2.5"),
    (dict(merge_method="linear", models=["tune0", "short"], parameters={"weight": 1}),
     "has no leaf 'model.layers.1.mlp.up_proj.weight'"),
    (dict(merge_method="linear", models=["tune0", "odd"], parameters={"weight": 1}),
     "'model.norm.weight': shape (7,) != (16,)"),
    (dict(merge_method="linear", models=["tune0", "corrupt"], parameters={"weight": 1}),
     "truncated or corrupt safetensors file"),
])
def test_bad_configs_and_files_give_one_line_and_exit_2(tmp_path, models, capsys, content, message):
    short = dict(models[1][0])
    del short["model.layers.1.mlp.up_proj.weight"]
    write_model(tmp_path / "short", short)
    odd = dict(models[1][0], **{"model.norm.weight": jnp.zeros(7)})
    write_model(tmp_path / "odd", odd)
    write_model(tmp_path / "corrupt", models[1][0])
    data = (tmp_path / "corrupt" / "model.safetensors").read_bytes()
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert _run("merge", _config(tmp_path, **content), tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxmerge: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("*jaxmerge-tmp*"))


def test_refuses_an_existing_output_unless_forced(tmp_path, models, capsys):
    config = _config(tmp_path, merge_method="linear", parameters={"weight": 1.0},
                     models=[str(tmp_path / "tune0"), str(tmp_path / "tune1")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert _run("merge", config, tmp_path / "out", "--no-progress", "--force") == 0
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


PAUSED_MERGE = Path(__file__).with_name("paused_merge.py")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_killing_the_merge_leaves_no_output_and_inputs_unchanged(tmp_path, models, sig, capsys):
    before = {name: _digest(tmp_path / name) for name in ("base", "tune0", "tune1")}
    config = _config(tmp_path, merge_method="ties", base_model=str(tmp_path / "base"), parameters={"density": 0.5},
                     models=[{"model": str(tmp_path / f"tune{i}"), "parameters": {"weight": 1.0}} for i in (0, 1)])
    env = dict(os.environ, PYTHONPATH=str(PAUSED_MERGE.parents[2]))
    process = subprocess.Popen([sys.executable, str(PAUSED_MERGE), "5", "merge", str(config), str(tmp_path / "out"),
                                "--no-progress"], stderr=subprocess.PIPE, text=True, env=env)
    with process.stderr:
        lines = iter(process.stderr.readline, "")
        assert any(line.strip() == "paused" for line in lines)  # 5 tensors written, the merge held there
        (staging,) = tmp_path.glob("out.jaxmerge-tmp-*")
        with pytest.raises(CheckpointError, match="corrupt"):  # a partial shard does not load
            checkpoints.load(staging)
        process.send_signal(sig)
        process.wait(timeout=60)
        message = process.stderr.read()
    assert process.returncode == (-sig if sig == signal.SIGKILL else 128 + sig)
    assert not (tmp_path / "out").exists()
    assert {name: _digest(tmp_path / name) for name in ("base", "tune0", "tune1")} == before
    if sig != signal.SIGKILL:
        assert "no output was left behind" in message
        assert not list(tmp_path.glob("*jaxmerge-tmp*"))
        return
    assert staging.exists()  # what kill -9 leaves, the next merge of that output removes and names
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    assert f"removed {staging}, left by an interrupted merge (process {process.pid})" in capsys.readouterr().err
    assert not staging.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "jaxmerge.cli.main", "merge", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    for text in ("--force", "--random-seed", "--max-shard-size", "merge_method: ties", "jaxmerge methods"):
        assert text in result.stdout


def test_the_console_script_exits_with_the_commands_status_and_its_objects_frozen(tmp_path):
    """It skips the collection of shutdown (``gc.freeze``, after the command), with the status."""
    script = ("import atexit, gc, sys; from jaxmerge.cli.entry import finish; from jaxmerge.cli.main import main; "
              "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); finish(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "inspect", str(tmp_path / "missing")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 2 and "jaxmerge: error:" in result.stderr
    assert result.stdout.strip() == "frozen True"


@pytest.mark.slow
def test_compiled_kernels_are_kept_for_the_next_run(tmp_path, models):
    config = _config(tmp_path, merge_method="ties", base_model="base", parameters={"density": 0.5},
                     models=[{"model": f"tune{i}", "parameters": {"weight": 1.0}} for i in (0, 1)])
    env = {k: v for k, v in os.environ.items() if k not in ("JAXMERGE_NO_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}

    def merge(out, *flags, **extra):
        command = [sys.executable, "-m", "jaxmerge.cli.main", "merge", str(config), str(tmp_path / out), *flags]
        result = subprocess.run(command, capture_output=True, text=True, env={**env, **extra})
        assert result.returncode == 0, result.stderr
        return checkpoints.load(tmp_path / out)

    first = merge("a", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    kept = sorted(p.name for p in (tmp_path / "xdg" / "jaxmerge" / "xla").iterdir())
    assert any("task_vector" in name for name in kept)
    again = merge("b", XDG_CACHE_HOME=str(tmp_path / "xdg"))  # from the cache: the same kernels, the same tensors
    assert sorted(p.name for p in (tmp_path / "xdg" / "jaxmerge" / "xla").iterdir()) == kept
    jax.tree.map(np.testing.assert_array_equal, again, first)


def test_the_compilation_cache_is_turned_off_by_flag_or_variable_and_a_set_directory_wins(tmp_path, models,
                                                                                          monkeypatch, capsys):
    config = _config(tmp_path, merge_method="linear", models=[{"model": f"tune{i}", "parameters": {"weight": 1.0}}
                                                               for i in (0, 1)])
    calls = []
    monkeypatch.setattr(cli_main, "_compilation_cache", lambda: calls.append(1))
    monkeypatch.delenv("JAXMERGE_NO_COMPILATION_CACHE")
    assert _run("merge", config, tmp_path / "a", "--no-progress", "--no-compilation-cache") == 0 and not calls
    monkeypatch.setenv("JAXMERGE_NO_COMPILATION_CACHE", "1")
    assert _run("merge", config, tmp_path / "b", "--no-progress") == 0 and not calls
    monkeypatch.setenv("JAXMERGE_NO_COMPILATION_CACHE", "0")
    assert _run("merge", config, tmp_path / "c", "--no-progress") == 0 and calls == [1]
    monkeypatch.undo()

    settings = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in settings}
    try:  # a directory the user set wins; nothing is compiled while it is set
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        cli_main._compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "own") and not (tmp_path / "xdg").exists()
        jax.config.update("jax_compilation_cache_dir", None)
        (tmp_path / "file").write_text("")  # a cache home that cannot hold a directory: a warning, nothing set
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
        cli_main._compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
        assert "compiled kernels are not kept: cannot create" in capsys.readouterr().err
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def test_methods_lists_the_registry(capsys):
    assert _run("methods") == 0
    out = capsys.readouterr().out
    for name, record in jaxmerge.methods().items():
        assert f"{name}  (jaxmerge.{record.function.__name__}; base model: {record.base})" in out
    assert "weight=required (per model)" in out and "density=1.0 in (0, 1] (per model)" in out
    assert _run("methods", "della") == 0
    out = capsys.readouterr().out
    assert out.startswith("della  (jaxmerge.della;") and "epsilon=0.15 in [0, 1) (per model)" in out


def test_merge_on_a_mesh(tmp_path, models):
    base, tunes = models
    config = _config(tmp_path, merge_method="ties", base_model=str(tmp_path / "base"), parameters={"density": 0.5},
                     models=[{"model": str(tmp_path / f"tune{i}"), "parameters": {"weight": 1.0}} for i in range(2)])
    assert _run("merge", config, tmp_path / "out", "--no-progress", "--mesh", "data=4,model=2") == 0
    _check_output(tmp_path / "out", jaxmerge.ties(base, tunes, density=0.5))
    assert _run("merge", config, tmp_path / "out2", "--no-progress", "--mesh", "data=3") == 2


def test_64_bit_tensors(tmp_path, models, capsys):
    base, tunes = models
    for i, t in enumerate(tunes):  # an int64 position table passes through; a float64 tensor needs a cast
        write_model(tmp_path / f"wide{i}", dict(t, **{"model.position_ids": np.arange(2 ** 40, 2 ** 40 + 6),
                                                      "model.scale64": np.full(3, 0.1 * (i + 1), np.float64)}))
    config = _config(tmp_path, merge_method="linear", parameters={"weight": 1.0},
                     models=[str(tmp_path / "wide0"), str(tmp_path / "wide1")])
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 2
    assert "'model.scale64' is float64, which JAX holds only with x64" in capsys.readouterr().err
    config = _config(tmp_path, merge_method="linear", parameters={"weight": 1.0}, dtype="float32",
                     models=[str(tmp_path / "wide0"), str(tmp_path / "wide1")])
    assert _run("merge", config, tmp_path / "out", "--no-progress") == 0
    reader = checkpoints.SafetensorsReader(tmp_path / "out")
    np.testing.assert_array_equal(reader.read("model.position_ids"), np.arange(2 ** 40, 2 ** 40 + 6))
    np.testing.assert_allclose(reader.read("model.scale64"), np.full(3, 0.15, np.float32))


def test_outputs_that_alias_inputs_are_refused_and_links_replaced(tmp_path, models, capsys):
    config = _config(tmp_path, merge_method="linear", parameters={"weight": 1.0},
                     models=[str(tmp_path / "tune0"), str(tmp_path / "tune1")])
    before = _digest(tmp_path / "tune1")
    assert _run("merge", config, tmp_path / "base" / ".." / "tune1", "--no-progress", "--force") == 2
    assert "would overlap the input" in capsys.readouterr().err
    assert _digest(tmp_path / "tune1") == before
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert _run("merge", config, tmp_path / "link", "--no-progress", "--force") == 0
    assert (tmp_path / "link" / "model.safetensors").is_file() and not (tmp_path / "link").is_symlink()
    assert (tmp_path / "elsewhere" / "old.txt").exists()  # the link was replaced, not what it pointed to
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_a_failed_merge_removes_the_parents_it_made(tmp_path, models):
    config = _config(tmp_path, merge_method="linear", models=["tune0", "tune1"])  # no weight: fails in the plan
    assert _run("merge", config, tmp_path / "new" / "deeper" / "out", "--no-progress") == 2
    assert not (tmp_path / "new").exists()
