"""`specialists` command line: wiring only; the work lives in the pipeline and its modules."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .data import DataError
from .models import CheckpointError
from .rundir import RunDirError

USER_ERRORS = (ConfigError, DataError, RunDirError, CheckpointError)


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


def _report(args: argparse.Namespace) -> None:
    from .pipeline import report_run

    report_run(args.run_dir)


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

    report = commands.add_parser("report", help="write RUN_DIR/report/index.html and summary.md")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)
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
