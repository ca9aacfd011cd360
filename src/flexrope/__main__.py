"""Command line: ``python -m flexrope`` runs the self-check."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexrope", description=__doc__)
    parser.add_argument("command", nargs="?", default="check", choices=["check"], help="what to run (default: check)")
    args = parser.parse_args(argv)
    if args.command == "check":
        from ._selfcheck import run

        return 0 if run() else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
