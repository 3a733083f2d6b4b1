"""The ``jaxmerge`` console script: a stopping signal that arrives while the command is still
being imported ends it with one line instead of a traceback."""

import signal
import sys

from jaxmerge._signals import SIGNALS, stop_at_start


def run() -> None:
    for signum in SIGNALS:
        signal.signal(signum, stop_at_start)
    from jaxmerge.cli.main import main

    sys.exit(main())
