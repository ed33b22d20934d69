"""`specialists` command line: wiring only; the work lives in the pipeline and its modules."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .data import DataError
from .models import CheckpointError
from .parallel import SpecialistTrainingError
from .rundir import RunDirError
from .teach import DistillError

USER_ERRORS = (SpecialistTrainingError, ConfigError, DataError, RunDirError, CheckpointError, DistillError)


def _run(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline, summary_table

    if args.resume:
        cfg = load_config(args.config, args.overrides) if (args.config or args.overrides) else None
        run = run_pipeline(cfg, args.resume, resume=True, progress=not args.quiet)
    else:
        run = run_pipeline(load_config(args.config, args.overrides), args.out, progress=not args.quiet)
    print(f"\nrun directory: {run.root}\n{summary_table(run)}")


def _cluster(args: argparse.Namespace) -> None:
    from .pipeline import recluster

    recluster(args.run_dir, args.overrides)


def _evaluate(args: argparse.Namespace) -> None:
    from .pipeline import evaluate_command, summary_table

    run = evaluate_command(args.run_dir)
    print(summary_table(run))


def _report(args: argparse.Namespace) -> None:
    from .pipeline import report_run

    report_run(args.run_dir)


def _distill(args: argparse.Namespace) -> None:
    import json

    from .rundir import RunDir
    from .teach import load_distill_config, run_distill, summary

    # --teacher RUN_DIR (repeatable) is teacher.runs; later key=value overrides still win
    teachers = [f"teacher.runs={json.dumps(args.teacher)}"] if args.teacher else []
    cfg = load_distill_config(args.config, [*teachers, *args.overrides])
    out = run_distill(cfg, args.out, progress=not args.quiet)
    print(f"\ndistil directory: {out.root}\n{summary(RunDir(out.root))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialists", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage on the configured data (default: embedded Banking77)")
    run.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/synthetic.yaml)")
    run.add_argument("--out", help="run directory to create (default: runs/<data>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run, skipping completed stages")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.epochs=5")
    run.set_defaults(handler=_run)

    cluster = commands.add_parser("cluster", help="(re)cluster the classes of a run's generalist; writes clusters.json")
    cluster.add_argument("run_dir")
    cluster.add_argument("overrides", nargs="*", metavar="cluster.key=value", help="e.g. cluster.n_clusters=12")
    cluster.set_defaults(handler=_cluster)

    evaluate = commands.add_parser("evaluate", help="test accuracy of generalist + specialists vs the generalist")
    evaluate.add_argument("run_dir")
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser("report", help="write RUN_DIR/report/index.html and summary.md")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)

    distill = commands.add_parser("distill", help="distil a teacher (trained here, or runs' models) into a student")
    distill.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/distill_mnist.yaml)")
    distill.add_argument("--out", help="directory to create (default: runs/distill-<time>)")
    distill.add_argument("--teacher", action="append", metavar="RUN_DIR",
                         help="a run whose combined generalist+specialists distribution teaches (repeat for an "
                              "ensemble); the student gets the generalist's size")
    distill.add_argument("--quiet", action="store_true", help="no progress bars")
    distill.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. student.temperature=20")
    distill.set_defaults(handler=_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", None) and getattr(args, "out", None):
        print("error: pass --out or --resume, not both", file=sys.stderr)
        return 2
    try:
        args.handler(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
