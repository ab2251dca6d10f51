"""``python -m gridboost`` / the ``gridboost`` command. The full CLI arrives later; ``demo`` is here now."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gridboost", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a burst of work with a boost on the embedded default backend")
    demo.add_argument("--backend", default="local", help="backend to run the demo on (default: local)")
    demo.add_argument("--tasks", type=int, default=48, help="how many tasks the burst has")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(backend=args.backend, tasks=args.tasks)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
