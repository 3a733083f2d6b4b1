"""The ``jaxmerge`` console script: a stopping signal that arrives while the command is still
being imported ends it with one line instead of a traceback."""

import gc
import signal
import sys

from jaxmerge._signals import SIGNALS, stop_at_start


def run() -> None:
    for signum in SIGNALS:
        signal.signal(signum, stop_at_start)
    from jaxmerge.cli.main import main

    finish(main())


def finish(status: int) -> None:
    """Exit with ``status``, first moving every object into the collector's permanent
    generation (``gc.freeze``): the interpreter's shutdown then skips the cyclic collection of
    the hundreds of thousands of objects that importing JAX creates, 0.25-0.3 s of every run
    here. Everything the command wrote is closed and durable by then, and objects are still
    freed by reference counting."""
    gc.freeze()
    sys.exit(status)
