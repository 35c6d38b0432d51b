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


def _report(args: argparse.Namespace) -> int:
    from gradwatch.report.html import report, write_pngs

    if args.png:
        for path in write_pngs(args.run, args.png):
            print(path)
    if args.png is None or args.output is not None:
        print(report(args.run, args.output or Path(args.run) / "report.html"))
    return 0


def _summary(args: argparse.Namespace) -> int:
    from gradwatch.report.summary import print_summary

    print_summary(args.run)
    return 0


def _export(args: argparse.Namespace) -> int:
    from gradwatch.sinks.tensorboard import export_tensorboard

    print(export_tensorboard(args.run, args.tensorboard))
    return 0


def _gradcheck(args: argparse.Namespace) -> int:
    """Build model and inputs with the user's factory, check them, exit 1 on a mismatch."""
    import importlib

    from gradwatch.gradcheck import gradcheck

    module_name, _, factory_name = args.factory.partition(":")
    if not module_name or not factory_name:
        print(
            f"gradwatch gradcheck: expected MODULE:FACTORY (e.g. mymodels:make_net), "
            f"got {args.factory!r}",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        print(f"gradwatch gradcheck: cannot load {args.factory!r}: {exc}", file=sys.stderr)
        return 2
    built = factory()
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        print(
            f"gradwatch gradcheck: {args.factory} must return (model, inputs) or "
            f"(model, inputs, loss_fn), got {type(built).__name__}",
            file=sys.stderr,
        )
        return 2
    report = gradcheck(*built, seed=args.seed)
    try:
        from rich.console import Console

        Console().print(report)
    except ImportError:
        print(report)
    return 0 if report.ok else 1


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
    report = commands.add_parser("report", help="write a run's self-contained HTML report")
    report.add_argument("run", help="a run directory (the run_dir given to gw.watch)")
    report.add_argument("-o", "--output", help="the HTML file (default: RUN/report.html)")
    report.add_argument("--png", metavar="DIR", help="write the charts as PNG files into DIR")
    report.set_defaults(handler=_report)
    summary = commands.add_parser("summary", help="print a run's verdict, findings, worst layers")
    summary.add_argument("run")
    summary.set_defaults(handler=_summary)
    export = commands.add_parser("export", help="export a run to TensorBoard event files")
    export.add_argument("run")
    export.add_argument("--tensorboard", metavar="DIR", required=True)
    export.set_defaults(handler=_export)
    check = commands.add_parser(
        "gradcheck",
        help="check a model's backward against finite differences; exit 1 on a mismatch",
    )
    check.add_argument(
        "factory",
        help="MODULE:FACTORY, a function returning (model, inputs"
        "[, loss_fn]); MODULE is imported from the current folder",
    )
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(handler=_gradcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    try:
        return args.handler(args)
    except (FileNotFoundError, ImportError, ValueError) as exc:  # a bad path or missing extra
        print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
