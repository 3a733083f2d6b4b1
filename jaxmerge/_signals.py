"""The signals that stop the ``jaxmerge`` command (SIGINT, SIGTERM, SIGHUP), remembered as well
as raised: Python swallows an exception raised while a garbage-collection callback or a
``__del__`` runs, and one raised inside an import can break an extension module, so a signal
received during an import is only remembered; writers ask :func:`raise_if_received` before
each tensor and before committing an output, and the command before it starts its work."""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that the output is cleaned up as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _importing(frame) -> bool:
    """Whether ``frame`` runs inside an import (an exception there can break an extension
    module's initialisation, or crash it)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _receive(signum, frame) -> None:
    _received.append(signum)
    if not _importing(frame):  # else raised at the next check, after the import
        _raise(signum)


def raise_if_received() -> None:
    """Raise for the first stopping signal received since :func:`install`, if any."""
    if _received:
        _raise(_received[0])


def install() -> dict:
    """Handle the stopping signals (main thread only); the previous handlers, to restore."""
    _received.clear()
    return {signum: signal.signal(signum, _receive) for signum in SIGNALS}


def restore(handlers: dict) -> None:
    """Put back the handlers :func:`install` replaced and forget the signals received."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    _received.clear()


def stop_at_start(signum, frame) -> None:
    """Before the command has begun (while Python imports it), a signal ends it at once, quietly."""
    print("jaxmerge: interrupted before starting; nothing was written", file=sys.stderr)
    os._exit(128 + signum)
