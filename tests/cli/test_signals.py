"""Stopping signals: one whose KeyboardInterrupt Python swallows (raised inside a ``__del__`` or a
garbage-collection callback) still stops the merge before it writes; one received during an
import is kept for later; one before the command starts ends it with one line."""

import signal
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jaxmerge
from jaxmerge import _signals, checkpoints
from jaxmerge.checkpoints import StreamOptions


class _InterruptedWhileCollected:
    def __del__(self):
        _signals._receive(signal.SIGINT, sys._getframe())  # Ctrl-C handled here: its KeyboardInterrupt is lost


@pytest.fixture
def handled():
    handlers = _signals.install()
    yield
    _signals.restore(handlers)


def test_a_swallowed_interrupt_still_stops_the_merge(tmp_path, handled, monkeypatch):
    models = [checkpoints.save(tmp_path / f"m{i}", {"w": jnp.full(4, float(i))}, format="safetensors")
              for i in range(2)]
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    _InterruptedWhileCollected()  # deleted at once: the exception is reported as unraisable, not raised
    with pytest.raises(KeyboardInterrupt):
        checkpoints.stream_merge(jaxmerge.plan("linear"), models, tmp_path / "out",
                                 options=StreamOptions(progress=False))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*jaxmerge-tmp*"))


def test_a_signal_during_an_import_is_raised_after_it(handled):
    importing = compile("receive(signal.SIGTERM, sys._getframe())", "<frozen importlib._bootstrap>", "exec")
    exec(importing, {"receive": _signals._receive, "signal": signal, "sys": sys})  # noqa: S102 (remembered, not raised)
    with pytest.raises(_signals.Terminated):
        _signals.raise_if_received()


def test_a_signal_before_the_command_starts_ends_it_with_one_line():
    code = ("import os, signal, time; from jaxmerge._signals import stop_at_start; "
            "signal.signal(signal.SIGTERM, stop_at_start); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM
    assert result.stderr == "jaxmerge: interrupted before starting; nothing was written\n"
