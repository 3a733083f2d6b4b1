"""Runs ``jaxmerge`` in this process, pausing for good after the N-th written tensor (with a line
``paused`` on stderr), so that a test can signal the merge at a known point, without a race.

Usage: ``python tests/cli/paused_merge.py N merge CONFIG OUTPUT ...``.
"""

import signal
import sys

from jaxmerge.checkpoints import stream
from jaxmerge.cli.entry import finish
from jaxmerge.cli.main import main


def pause_after(count: int) -> None:
    write = stream.WriterSink.write

    def write_then_pause(self, i, merged):
        write(self, i, merged)
        if i + 1 == count:
            print("paused", file=sys.stderr, flush=True)
            while True:
                signal.pause()  # a handled signal (SIGINT: KeyboardInterrupt) ends the wait

    stream.WriterSink.write = write_then_pause


if __name__ == "__main__":
    pause_after(int(sys.argv[1]))
    finish(main(sys.argv[2:]))
