import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_quickstart_average_is_accurate():
    out = run_example("quickstart.py")
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


@pytest.mark.slow
def test_task_merging_example_merges_both_tasks():
    rows = _table(run_example("task_merging.py"))
    best_single = max(rows["fine-tune A: 0-4"][2], rows["fine-tune B: 5-9"][2])
    for merge in ("task_arithmetic lambda=1", "ties density=0.2"):
        assert rows[merge][2] > best_single, (merge, rows)


@pytest.mark.slow
def test_fisher_merge_example_beats_averaging_under_shift():
    out = run_example("fisher_merge.py")
    shift = out.split("setting: shift")[1]
    means = {label.strip(): float(mean) for label, mean in
             re.findall(r"^(\w[\w\- ()]+?)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)$", shift, re.M)}
    assert means["fisher_merge (model Fisher)"] > means["average"]


@pytest.mark.slow
def test_regmean_example_ranks_the_merges_like_the_papers():
    out = run_example("regmean.py")
    for setting in out.split("setting: ")[1:]:
        means = {label.strip(): float(mean) for label, mean in
                 re.findall(r"^(\w[\w\-=. ()]+?)\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)$", setting, re.M)}
        assert means["regmean alpha=0.9"] > means["average"]
        assert means["regmean_plus_plus alpha=0.9"] >= means["regmean alpha=0.9"] - 0.005


@pytest.mark.slow
def test_averaging_example_lowers_the_loss_of_the_last_iterate():
    out = run_example("averaging.py")
    losses = {label.strip(): float(loss) for label, loss in
              re.findall(r"^(\w[\w=. ]+?)\s+([0-9.]+)\s+[0-9.]+$", out, re.M)}
    averages = [v for k, v in losses.items() if k != "last iterate"]
    assert len(averages) == 4 and max(averages) < losses["last iterate"]


@pytest.mark.slow
def test_rebasin_example_removes_most_of_the_barrier(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "rebasin.py"), str(tmp_path / "curve.png")],
                            cwd=EXAMPLES, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    barriers = {label: float(value) for label, value in
                re.findall(r"^(naive|weight matching|activation matching)\s+([0-9.]+)", result.stdout, re.M)}
    assert barriers["weight matching"] < barriers["naive"] / 5
    assert barriers["activation matching"] < barriers["naive"] / 5
    assert (tmp_path / "curve.png").exists() and "computes the same function: True" in result.stdout


@pytest.mark.slow
def test_soups_example_greedy_is_at_least_the_best_single_on_validation():
    rows = re.findall(r"^(best single|uniform soup|greedy soup).*?\s([0-9.]+)\s+([0-9.]+)$", run_example("soups.py"),
                      re.M)
    val = {label: float(v) for label, v, _ in rows}
    assert val["greedy soup"] >= val["best single"]


@pytest.mark.slow
def test_federated_example_trains_every_server_and_fedau_corrects_skewed_participation():
    tables = {}
    for block in run_example("federated.py").split("setting: ")[1:]:
        lines = block.strip().splitlines()
        tables[lines[0]] = {line[:32].strip(): [float(v) for v in line[32:].split()] for line in lines[2:]}
    assert set(tables) == {"IID, uniform", "non-IID, uniform", "non-IID, skewed"}
    for rows in tables.values():
        assert set(rows) == {"FedAvg", "FedAvgM", "FedAdam", "FedAU (unknown participation)", "centralised SGD"}
        assert all(len(r) == 3 and r[-1] > 0.85 for r in rows.values()), rows  # 10 classes: chance is 0.1
    skewed = tables["non-IID, skewed"]
    assert skewed["FedAU (unknown participation)"][-1] >= skewed["FedAvg"][-1], skewed  # after 40 rounds


@pytest.mark.slow
def test_learned_merging_example_tunes_learns_and_searches_better_coefficients():
    merges, run = run_example("learned_merging.py").split("training run")
    rows = {line[:36].strip(): [float(v) for v in line[36:].split()] for line in merges.strip().splitlines()[1:]}
    tuned = next(v for k, v in rows.items() if k.startswith("task arithmetic, tuned"))
    assert tuned[-1] >= rows["task arithmetic, lambda 1"][-1]
    assert rows["AdaMerging, layer-wise"][-1] > rows["task arithmetic, lambda 1"][-1]
    assert all(0.8 < v[-1] <= 1 for v in rows.values()), rows
    losses = {line[:36].strip(): float(line[36:].split()[0]) for line in run.strip().splitlines()[1:]}
    assert losses["LCSC"] < losses["last checkpoint"], losses
