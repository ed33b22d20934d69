"""Soft targets as a regulariser (Hinton, Vinyals & Dean, 2015, section 6, table 5), on MNIST or Banking77.

    python -m jobs.soft_targets_regularizer [--data mnist|banking77] [--fraction 0.03] [--out DIR]

A teacher is trained on the whole training set; then the same architecture is
trained on a seeded per-class 3% of it twice, from the same initial weights and
for the same epochs: once on the hard labels, once on the teacher's soft targets
(`student.soft_weight`, default 0.9, on the soft term). The paper (speech, 3% of
the frames): hard targets 67.3% train / 44.5% test, soft targets 65.4% / 57.0%,
the full-data baseline 63.4% / 58.9%. "train" is accuracy on the examples a
model trained on; we also print it on the whole training set.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from specialists.cli import exit_status
from specialists.distill_config import load_distill_config
from specialists.distill_run import run_distill

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

DATA = {
    "mnist": [
        "data.kind=mnist", "teacher.model.name=mlp", "teacher.model.hidden=[800, 800]", "teacher.model.dropout=0.2",
        "teacher.train.epochs=6", "teacher.train.batch_size=256", "teacher.train.lr=0.001", "teacher.train.patience=0",
    ],
    "banking77": [  # the embedded data set and the default fastText-style model
        "data.kind=csv_text", "teacher.train.epochs=15",
    ],
}

PAPER = {"hard": (0.673, 0.445), "soft": (0.654, 0.570), "full": (0.634, 0.589)}


def run(data: str, fraction: float, out: Path, mnist: Path, temperature: float, soft_weight: float, epochs: int,
        threads: int, device: str, seed: int) -> dict:
    overrides = [*DATA[data], f"seed={seed}", f"threads={threads}", f"device={device}",
                 f"transfer.fraction={fraction}", "student.baseline=true", f"student.temperature={temperature}",
                 f"student.soft_weight={soft_weight}", f"student.train.epochs={epochs}", "student.train.patience=0"]
    if data == "mnist":
        overrides.append(f"data.path={mnist}")
    return run_distill(load_distill_config(None, overrides), out, progress=False).read_metrics()


def table(m: dict, data: str, fraction: float, seconds: float) -> str:
    t, b, s = m["teacher"], m["baseline"], m["student"]
    n = m["transfer"]["examples"]
    rows = [
        ("system", "train (its examples)", "train (all)", "test", "paper (speech) train / test"),
        ("100% of train, hard labels (teacher)", f"{t['transfer_accuracy']:.1%}*", "", f"{t['test_accuracy']:.1%}",
         f"{PAPER['full'][0]:.1%} / {PAPER['full'][1]:.1%}"),
        (f"{fraction:.0%} ({n:,}), hard labels", f"{b['transfer_accuracy']:.1%}", f"{b['train_accuracy']:.1%}",
         f"{b['test_accuracy']:.1%}", f"{PAPER['hard'][0]:.1%} / {PAPER['hard'][1]:.1%}"),
        (f"{fraction:.0%} ({n:,}), soft targets", f"{s['transfer_accuracy']:.1%}", f"{s['train_accuracy']:.1%}",
         f"{s['test_accuracy']:.1%}", f"{PAPER['soft'][0]:.1%} / {PAPER['soft'][1]:.1%}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"Soft targets as a regulariser on {data} (section 6): {m['data']['train']:,} training examples, "
             f"{m['data']['test']:,} test"]
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, width)).rstrip() for r in rows]
    lines.append(f"* the teacher's accuracy on the {fraction:.0%} subset, which it also trained on")
    lines.append(f"kept {m['kept_gain']['kept_gain']:.0%} of the teacher's test gain over hard labels"
                 if m["kept_gain"]["kept_gain"] is not None else m["kept_gain"]["reason"])
    lines.append(f"wall time {seconds / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="mnist")
    parser.add_argument("--fraction", type=float, default=0.03, help="share of the training set the students see")
    parser.add_argument("--mnist", type=Path, default=MNIST, help=f"MNIST IDX folder (default {MNIST})")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--soft-weight", type=float, default=0.9, help="weight of the soft term; hard gets 1 - this")
    parser.add_argument("--epochs", type=int, default=60, help="student epochs (the best validation epoch is kept)")
    parser.add_argument("--out", type=Path, help="output directory (default runs/soft-targets-<data>-<time>)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"soft-targets-{args.data}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    metrics = run(args.data, args.fraction, out, args.mnist, args.temperature, args.soft_weight, args.epochs,
                  args.threads, args.device, args.seed)
    print()
    print(table(metrics, args.data, args.fraction, time.perf_counter() - started))
    print(f"run: {out}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
