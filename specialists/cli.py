"""`specialists` command line: wiring only; the work lives in stages.py, distill_run.py and their modules.

Each command imports what it needs when it runs: ray only with `run` (parallel.py,
for the specialists), so `report`, `distill`, `inspect`, `predict` and `export` start without it.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

from .choices import TEACHER_SOURCES
from .config import load_config
from .rundir import WRITES_REFUSED


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can act on: printed as one line, exit status 2, no traceback."""
    from .config import ConfigError
    from .data import DataError
    from .distill import DistillError
    from .export import ExportError
    from .inspection import InspectError
    from .models import CheckpointError
    from .rundir import RunDirError
    from .specialist import SpecialistTrainingError
    from .train import TrainingError

    return (SpecialistTrainingError, ConfigError, DataError, RunDirError, CheckpointError, DistillError,
            TrainingError, InspectError, ExportError)


def _run(args: argparse.Namespace) -> None:
    from .report import summary_table
    from .stages import run_pipeline

    if args.resume:  # overrides apply to the run's own config.yaml (or to --config, compared with it)
        cfg = load_config(args.config, args.overrides) if args.config else None
        run = run_pipeline(cfg, args.resume, resume=True, progress=not args.quiet,
                           overrides=[] if args.config else args.overrides)
    else:
        run = run_pipeline(load_config(args.config, args.overrides), args.out, progress=not args.quiet)
    print(f"\nrun directory: {run.root}\n{summary_table(run.read_metrics())}")


def _cluster(args: argparse.Namespace) -> None:
    from .stages import recluster

    recluster(args.run_dir, args.overrides)


def _evaluate(args: argparse.Namespace) -> None:
    from .report import summary_table
    from .stages import evaluate_command

    run = evaluate_command(args.run_dir)
    print(summary_table(run.read_metrics()))


def _report(args: argparse.Namespace) -> None:
    from .stages import report_run

    report_run(args.run_dir, out=args.out)


def _distill(args: argparse.Namespace) -> None:
    import json

    from .distill_config import load_distill_config
    from .distill_run import run_distill, summary
    from .rundir import RunDir

    # --teacher RUN_DIR (repeatable) is teacher.runs; later key=value overrides still win
    teachers = [f"teacher.runs={json.dumps(args.teacher)}"] if args.teacher else []
    if args.teacher_members:  # --teacher-members X is teacher.source=X
        teachers.append(f"teacher.source={args.teacher_members}")
    cfg = load_distill_config(args.config, [*teachers, *args.overrides])
    out = run_distill(cfg, args.out, progress=not args.quiet)
    print(f"\ndistil directory: {out.root}\n{summary(RunDir(out.root))}")


def _inspect(args: argparse.Namespace) -> None:
    from .inspection import inspect_config, run_inspect

    run_inspect(inspect_config(args.overrides), probs=args.probs, logits=args.logits, labels=args.labels,
                classes=args.classes, out=args.out)


def _predict(args: argparse.Namespace) -> None:
    from .serve import predict_file

    rows = predict_file(args.run_dir, args.input, args.output, top_k=args.top_k, batch_size=args.batch_size,
                        column=args.column, device=args.device)
    print(f"predictions for {rows} rows: {args.output}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_run

    export_run(args.run_dir, args.out, args.format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialists", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run every stage on the configured data (default: embedded Banking77)")
    run.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/synthetic.yaml)")
    run.add_argument("--out", help="run directory to create (default: runs/<data>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run, skipping completed stages; "
                                                         "overrides may change ray.*, device and threads only")
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
    report.add_argument("--out", help="the report's folder (default: RUN_DIR/report); the run is only read, so a "
                                      "run you cannot write to, such as one on a read-only share, gets its report")
    report.set_defaults(handler=_report)

    distill = commands.add_parser("distill", help="distil a teacher (trained here, or runs' models) into a student")
    distill.add_argument("--config", help="YAML file overriding the defaults (e.g. configs/distill_mnist.yaml)")
    distill.add_argument("--out", help="directory to create (default: runs/distill-<time>)")
    distill.add_argument("--teacher", action="append", metavar="RUN_DIR",
                         help="a run whose combined generalist+specialists distribution teaches (repeat for an "
                              "ensemble); the student gets the generalist's size")
    distill.add_argument("--teacher-members", choices=TEACHER_SOURCES, metavar="MEMBERS",
                         help="which of the run's models teach (teacher.source): combined (generalist + specialists, "
                              "the default), generalist, peers (the generalist and its peers/<k>/: section 4) or "
                              "hybrid (all full models + specialists)")
    distill.add_argument("--quiet", action="store_true", help="no progress bars")
    distill.add_argument("overrides", nargs="*", metavar="key.sub=value", help="e.g. student.temperature=20")
    distill.set_defaults(handler=_distill)

    inspect = commands.add_parser("inspect", help="the clustering report from any model's outputs on a labelled "
                                                  "or unlabeled set (no run directory, no training)")
    given = inspect.add_mutually_exclusive_group(required=True)
    given.add_argument("--probs", metavar="FILE", help="(N, C) probabilities, rows summing to 1: .npy, .npz or .csv")
    given.add_argument("--logits", metavar="FILE", help="(N, C) logits (unnormalised scores): .npy, .npz or .csv")
    inspect.add_argument("--labels", metavar="FILE", help="(N,) true classes (indices or names): .npy, .npz, .csv "
                                                         "or .txt; adds the errors specialists can fix")
    inspect.add_argument("--classes", metavar="FILE", help="the C class names: .json list or .txt, one per line")
    inspect.add_argument("--out", help="folder to write (default: runs/inspect-<time>)")
    inspect.add_argument("overrides", nargs="*", metavar="cluster.key=value",
                         help="e.g. cluster.classes_per_cluster=10 cluster.temperature=2")
    inspect.set_defaults(handler=_inspect)

    predict = commands.add_parser("predict", help="a run's predictions for a file of inputs, streamed into a CSV")
    predict.add_argument("run_dir")
    predict.add_argument("--input", required=True, metavar="FILE",
                         help="texts: a .csv (its --column) or .txt (one a line); arrays: .npy, .npz or .csv")
    predict.add_argument("--output", required=True, metavar="FILE.csv",
                         help="columns row, label, score (+ label_i, score_i for i <= --top-k when > 1)")
    predict.add_argument("--top-k", type=int, default=1, help="how many classes per row, best first (default 1)")
    predict.add_argument("--column", help="the text column of a CSV (default: the run's data.text_column)")
    predict.add_argument("--batch-size", type=int, default=1024, help="rows read and predicted at a time")
    predict.add_argument("--device", default="auto", help="auto, cpu or cuda")
    predict.set_defaults(handler=_predict)

    export = commands.add_parser("export", help="the generalist and specialists as ONNX or TorchScript files, "
                                                "plus a numpy combiner")
    export.add_argument("run_dir")
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument("--out", help="folder to write (default: RUN_DIR/export-<format>)")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", None) and getattr(args, "out", None):
        print("error: pass --out or --resume, not both", file=sys.stderr)
        return 2
    return exit_status(lambda: args.handler(args))


def exit_status(call: Callable[[], object]) -> int:
    """Run `call` for a command (the CLI's, a job's main): 0, or 2 after a user's error printed as one line, or
    130 after Ctrl-C. Any other error is raised, with its traceback."""
    try:
        call()
    except KeyboardInterrupt as err:  # Ctrl-C: the shell's convention, 128 + SIGINT
        print(f"\ninterrupted{_notes(err)}", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, OSError) and err.errno in USER_OS_ERRORS:
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}{err.strerror or err}{_notes(err)}", file=sys.stderr)
            return 2
        if not isinstance(err, user_errors()):
            raise
        print(f"error: {err}{_notes(err)}", file=sys.stderr)
        return 2
    return 0


# The file system's refusals a user fixes (permissions, a full disk, a read-only mount): a message, not a traceback.
USER_OS_ERRORS = (*WRITES_REFUSED, errno.ENOSPC, errno.EDQUOT)


def _notes(err: BaseException) -> str:
    """What a stage added to the error (e.g. how to resume), one line each."""
    return "".join(f"\n{note}" for note in getattr(err, "__notes__", []))


if __name__ == "__main__":
    sys.exit(main())
