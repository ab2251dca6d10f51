"""Run a command while every core is kept busy, as on a loaded CI machine; repeat it until it fails.

    python tools/loaded.py --times 3 -- python -m nox -s tests

Starts one busy loop per core (``--busy N`` to choose), at normal priority, runs the
command (the loops' pids in its environment, ``LOADED_BUSY_PIDS``), and stops the
loops (by their pids, and only those) when it ends, however it ends. With ``--times N``
the command runs up to N times in a row and the first failure stops the run. Each run's
duration and exit status are printed; the exit status is the first failing one (0 when
all passed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def busy(count: int) -> Iterator[list[int]]:
    """``count`` processes spinning on a core each, ended by pid on the way out."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield [loop.pid for loop in loops]
    finally:
        for loop in loops:
            with contextlib.suppress(ProcessLookupError):
                loop.send_signal(signal.SIGKILL)
        for loop in loops:
            loop.wait(timeout=30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=int, default=1, help="run the command up to this many times in a row")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy loops (default: one per core)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.times < 1 or args.busy < 0:
        parser.error("give a command after --, --times >= 1 and --busy >= 0")
    for run in range(1, args.times + 1):
        with busy(args.busy) as pids:
            print(f"loaded.py: run {run}/{args.times} with {len(pids)} busy loop(s) {pids}: {' '.join(command)}")
            sys.stdout.flush()
            started = time.monotonic()
            status = subprocess.call(command, env={**os.environ, "LOADED_BUSY_PIDS": " ".join(map(str, pids))})
        print(f"loaded.py: run {run}/{args.times} exited {status} after {time.monotonic() - started:.0f}s")
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
