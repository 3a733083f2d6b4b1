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
