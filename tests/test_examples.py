import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import COMPILING_XLA_FLAGS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


RUNNER = """
import gc, runpy, sys
for spec in sys.argv[1:]:
    name, *argv = spec.split("::")
    print(f"<<< {name}", flush=True)
    sys.argv = [name, *argv]
    runpy.run_path(name, run_name="__main__")
gc.freeze()  # no collection at exit (half a second), as the jaxmerge command does
"""


def run_examples(*specs: str) -> dict[str, str]:
    """Run example scripts (``name`` or ``name::argument``) one after the other in one Python
    process, each as ``__main__`` with its own globals, so that they share its start-up (the
    imports of JAX, Flax and scikit-learn); their outputs by name."""
    environment = {**os.environ, "XLA_FLAGS": COMPILING_XLA_FLAGS}  # one device, as a user runs them
    result = subprocess.run([sys.executable, "-c", RUNNER, *specs], cwd=EXAMPLES, capture_output=True, text=True,
                            check=False, timeout=900, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = {}
    for part in result.stdout.split("<<< ")[1:]:
        name, _, out = part.partition("\n")
        outputs[name] = out
    assert sorted(outputs) == sorted(spec.split("::")[0] for spec in specs), result.stdout[-2000:]
    return outputs


def _quickstart_average_is_accurate(out):
    scores = dict(re.findall(r"^(model \d|average)\s+([0-9.]+)$", out, re.M))
    assert set(scores) == {"model 0", "model 1", "model 2", "average"}
    assert float(scores["average"]) > 0.9
    assert float(scores["average"]) >= min(float(scores[f"model {i}"]) for i in range(3)) - 0.02


def _table(out: str) -> dict:
    rows = {}
    for line in out.splitlines()[1:]:
        *label, a, b, mean = line.split()
        rows[" ".join(label)] = (float(a), float(b), float(mean))
    return rows


def _task_merging_merges_both_tasks(out):
    rows = _table(out)
    best_single = max(rows["fine-tune A: 0-4"][2], rows["fine-tune B: 5-9"][2])
    for merge in ("task_arithmetic lambda=1", "ties density=0.2"):
        assert rows[merge][2] > best_single, (merge, rows)


def _fisher_merge_beats_averaging_under_shift(out):
    shift = out.split("setting: shift")[1]
    means = {label.strip(): float(mean) for label, mean in
             re.findall(r"^(\w[\w\- ()]+?)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)$", shift, re.M)}
    assert means["fisher_merge (model Fisher)"] > means["average"]


def _regmean_ranks_the_merges_like_the_papers(out):
    for setting in out.split("setting: ")[1:]:
        means = {label.strip(): float(mean) for label, mean in
                 re.findall(r"^(\w[\w\-=. ()]+?)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)$", setting, re.M)}
        assert means["regmean alpha=0.9"] > means["average"]
        assert means["regmean_plus_plus alpha=0.9"] >= means["regmean alpha=0.9"] - 0.005


def _averaging_lowers_the_loss_of_the_last_iterate(out):
    losses = {label.strip(): float(loss) for label, loss in
              re.findall(r"^(\w[\w=. ]+?)\s+([0-9.]+)\s+[0-9.]+$", out, re.M)}
    averages = [v for k, v in losses.items() if k != "last iterate"]
    assert len(averages) == 4 and max(averages) < losses["last iterate"]


def _alignment_tables(out: str) -> dict:
    """``{network: {method: (barrier or None, loss at 0.5, accuracy at 0.5)}}``."""
    tables = {}
    for block in re.split(r"^(?=MLP |CNN )", out, flags=re.M)[1:]:
        rows = re.findall(r"^(\w[\w +()=,.-]*?)\s+(-|[0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", block, re.M)
        tables[block.split()[0]] = {label: (None if b == "-" else float(b), float(loss), float(acc))
                                    for label, b, loss, acc in rows}
    return tables


def _alignment_removes_most_of_the_barrier(out, curve):
    tables = _alignment_tables(out)
    mlp, cnn = tables["MLP"], tables["CNN"]
    for method in ("weight matching", "activation matching", "straight-through estimator"):
        assert mlp[method][0] < mlp["naive"][0] / 5, (method, mlp)
    for method in ("OT fusion (weights, exact)", "OT fusion (activations, exact)"):
        assert mlp[method][0] < mlp["naive"][0] / 2, (method, mlp)
    for method in ("weight matching + REPAIR", "PLeaS (width 512)", "PLeaS (width 640, partial)",
                   "OT fusion of 512 + 256 wide"):
        assert mlp[method][2] > mlp["naive"][2] + 0.01, (method, mlp)
    for method in ("weight matching", "activation matching", "OT fusion (weights, exact)"):
        assert cnn[method][0] < cnn["naive"][0] / 3, (method, cnn)
    assert cnn["weight matching + REPAIR"][2] > cnn["weight matching"][2], cnn
    assert curve.exists() and "computes the same function: True" in out


def _soups_greedy_is_at_least_the_best_single_on_validation(out):
    rows = re.findall(r"^(best single|uniform soup|greedy soup).*?\s([0-9.]+)\s+([0-9.]+)$", out, re.M)
    val = {label: float(v) for label, v, _ in rows}
    assert val["greedy soup"] >= val["best single"]


def _federated_trains_every_server_and_fedau_corrects_skewed_participation(out):
    tables = {}
    for block in out.split("setting: ")[1:]:
        lines = block.strip().splitlines()
        tables[lines[0]] = {line[:32].strip(): [float(v) for v in line[32:].split()] for line in lines[2:]}
    assert set(tables) == {"IID, uniform", "non-IID, uniform", "non-IID, skewed"}
    for rows in tables.values():
        assert set(rows) == {"FedAvg", "FedAvgM", "FedAdam", "FedAU (unknown participation)", "centralised SGD"}
        assert all(len(r) == 3 and r[-1] > 0.85 for r in rows.values()), rows  # 10 classes: chance is 0.1
    skewed = tables["non-IID, skewed"]
    assert skewed["FedAU (unknown participation)"][-1] >= skewed["FedAvg"][-1], skewed  # after 40 rounds


def _learned_merging_tunes_learns_and_searches_better_coefficients(out):
    merges, run = out.split("training run")
    rows = {line[:36].strip(): [float(v) for v in line[36:].split()] for line in merges.strip().splitlines()[1:]}
    tuned = next(v for k, v in rows.items() if k.startswith("task arithmetic, tuned"))
    assert tuned[-1] >= rows["task arithmetic, lambda 1"][-1]
    assert rows["AdaMerging, layer-wise"][-1] > rows["task arithmetic, lambda 1"][-1]
    assert all(0.8 < v[-1] <= 1 for v in rows.values()), rows
    losses = {line[:36].strip(): float(line[36:].split()[0]) for line in run.strip().splitlines()[1:]}
    assert losses["LCSC"] < losses["last checkpoint"], losses


@pytest.mark.slow
def test_merging_examples_report_what_the_readme_says():
    out = run_examples("quickstart.py", "task_merging.py", "fisher_merge.py", "regmean.py", "soups.py")
    _quickstart_average_is_accurate(out["quickstart.py"])
    _task_merging_merges_both_tasks(out["task_merging.py"])
    _fisher_merge_beats_averaging_under_shift(out["fisher_merge.py"])
    _regmean_ranks_the_merges_like_the_papers(out["regmean.py"])
    _soups_greedy_is_at_least_the_best_single_on_validation(out["soups.py"])


@pytest.mark.slow
def test_training_and_alignment_examples_report_what_the_readme_says(tmp_path):
    out = run_examples("averaging.py", f"alignment.py::{tmp_path / 'curve.png'}", "federated.py", "learned_merging.py")
    _averaging_lowers_the_loss_of_the_last_iterate(out["averaging.py"])
    _alignment_removes_most_of_the_barrier(out["alignment.py"], tmp_path / "curve.png")
    _federated_trains_every_server_and_fedau_corrects_skewed_participation(out["federated.py"])
    _learned_merging_tunes_learns_and_searches_better_coefficients(out["learned_merging.py"])
