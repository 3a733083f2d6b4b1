"""Two processes on localhost (jax.distributed, CPU collectives) merging sharded checkpoints
and computing data-parallel statistics; see multiprocess_worker.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxmerge
from jaxmerge import checkpoints
from tests.multiprocess_worker import apply, batch, model

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_and_compute_statistics(tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(WORKER.parents[1]))
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=300)[0])
    finally:
        for worker in workers:  # never leave a hung worker behind
            if worker.poll() is None:
                worker.kill()
    for i, (worker, text) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"process {i} failed:\n{text[-3000:]}"
        assert f"process {i} done" in text

    trees = [jax.tree.map(np.asarray, model(i)) for i in range(4)]
    ties = checkpoints.load(tmp_path / "ties")
    expected = jaxmerge.ties(trees[0], trees[1:], density=0.5)
    jax.tree.map(np.testing.assert_array_equal, ties, expected)
    average = checkpoints.load(tmp_path / "average")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), average, jaxmerge.average(trees[1:]))

    stats = np.load(tmp_path / "statistics.npz")
    x = batch()
    params = jax.tree.map(np.asarray, model(0))
    grams = jaxmerge.input_grams(apply, [(x,)], params=params)
    np.testing.assert_allclose(stats["gram"], grams["layer"]["w"]["gram"], rtol=1e-5, atol=1e-4)
    assert float(stats["count"]) == 64
    fisher = jaxmerge.diagonal_fisher(apply, [(x, np.arange(64) % 4)], params=params, microbatch=16)
    np.testing.assert_allclose(stats["fisher"], fisher["layer"]["w"], rtol=1e-4, atol=1e-7)
