"""Command line: ``python -m flexrope`` runs the self-check; ``plot`` draws the scaling recipes, or with
``--axes`` how each multi-axis preset assigns channels to axes."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexrope", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("check", help="every layout and pairing against a float64 reference (the default)")
    plot = commands.add_parser("plot", help="PNG of the wavelength per channel pair for each scaling recipe")
    plot.add_argument("--config", help="a Hugging Face config.json: its own recipe is drawn too")
    plot.add_argument("--head-dim", type=int, default=128)
    plot.add_argument("--theta", type=float, default=500_000.0)
    plot.add_argument("--factor", type=float, default=8.0)
    plot.add_argument("--original", type=int, default=8192, help="original_max_position_embeddings")
    plot.add_argument("--axes", action="store_true",
                      help="instead: which axis every channel turns with, for each multi-axis preset")
    plot.add_argument("--out", default=None, help="the PNG (default rope_scaling.png, or rope_axes.png)")
    args = parser.parse_args(argv)
    from ._errors import FlexRopeError

    if args.command == "plot":
        from ._plot import plot as draw
        from ._plot import plot_axes

        try:
            if args.axes:
                path = plot_axes(args.out or "rope_axes.png", head_dim=args.head_dim)
            else:
                path = draw(args.out or "rope_scaling.png", head_dim=args.head_dim, theta=args.theta,
                            factor=args.factor, original=args.original, config=args.config)
        except FlexRopeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    from ._dispatch import requested_backend
    from ._selfcheck import run

    try:
        requested_backend()  # FLEXROPE_BACKEND naming a backend that does not exist: said before the table
        return 0 if run() else 1
    except FlexRopeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
