"""The `gradwatch` command line (also `python -m gradwatch`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from gradwatch.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="See and guard the gradients of deep-network training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a vanishing, an exploding and a repaired deep MLP, and diagnose them"
    )
    demo.add_argument("--out", default="runs/demo", help="where the run stores go")
    demo.add_argument("--steps", type=int, default=300, help="training steps per scenario")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
