"""The `gradwatch` command line (also `python -m gradwatch`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gradwatch.errors import InputError


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


def _probe_every(value: str) -> int | None:
    return None if value.lower() == "none" else int(value)


def _module_args_last(argv: list[str]) -> list[str]:
    """`run [options] -m MODULE ARGS...`: everything after MODULE is the module's own (as after
    `python -m MODULE`), so a `--` goes after it. A `-m` after the script is the script's."""
    if not argv or argv[0] != "run":
        return argv
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "-m" and i + 1 < len(argv):
            return [*argv[: i + 2], "--", *argv[i + 2 :]]
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2  # options take a value
    return argv


def _run(args: argparse.Namespace) -> int:
    """Run a script (or, with -m, a module) watched. Errors in gradwatch's options exit 2 before
    it starts; its own exceptions propagate (a traceback and exit 1, as with python SCRIPT)."""
    from gradwatch.launch import WatchOptions, default_run_dir, run_script

    if args.module:
        target, target_args = args.module, [a for a in (args.script,) if a] + args.args
    elif args.script is None:
        print("gradwatch run: name a SCRIPT, or a module with -m MODULE", file=sys.stderr)
        return 2
    elif not Path(args.script).is_file():
        print(f"gradwatch run: no script at {args.script!r}", file=sys.stderr)
        return 2
    else:
        target, target_args = args.script, args.args
    try:
        options = WatchOptions(
            run_dir=Path(args.run_dir)
            if args.run_dir
            else default_run_dir(target, module=bool(args.module)),
            every=args.every,
            probe_every=args.probe_every,
            flush_every=args.flush_every,
            guards=list(args.guard),
        )
    except ValueError as exc:
        print(f"gradwatch run: {exc}", file=sys.stderr)
        return 2
    return run_script(target, target_args, options, module=bool(args.module))


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
    _add_run_command(commands)
    return parser


def _add_run_command(commands: argparse._SubParsersAction) -> None:
    """`gradwatch run`: watch an unmodified training script."""
    run = commands.add_parser(
        "run",
        help="run an unmodified training script and watch what its optimizers train",
        description="Run SCRIPT as `python SCRIPT ARGS` would and watch the model each optimizer "
        "trains (found at its first step). One run store per optimizer: RUN_DIR, then "
        "RUN_DIR-optimizer1, ... At the end the findings and the reports' paths are printed.",
    )
    run.add_argument("--run-dir", help="where the run store goes (default runs/<script>-<time>)")
    run.add_argument("--every", type=int, default=1, help="record every N-th step (default 1)")
    run.add_argument(
        "--probe-every", type=_probe_every, default=10, help="probe step period, or none"
    )
    run.add_argument("--flush-every", type=int, default=50, help="steps per stored block")
    run.add_argument(
        "--guard",
        action="append",
        default=[],
        help="a guard, repeatable: zclip, autoclip, agc, skip-nonfinite, rollback, "
        "clip-norm=MAX, clip-value=MAX",
    )
    run.add_argument(
        "-m",
        dest="module",
        metavar="MODULE",
        help="run a module as `python -m MODULE ARGS` would, instead of SCRIPT",
    )
    run.add_argument("script", nargs="?", help="the training script")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(handler=_run)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(
        _module_args_last(list(sys.argv[1:] if argv is None else argv))
    )
    if args.command == "run":  # the script owns logging, and its exceptions are its own
        return args.handler(args)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    try:
        return args.handler(args)
    # A bad path, a missing extra, bad input: one line. Anything else is a bug: its traceback.
    except (FileNotFoundError, ImportError, InputError) as exc:
        print(f"gradwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
