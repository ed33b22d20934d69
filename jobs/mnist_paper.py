"""The MNIST experiments of Hinton, Vinyals & Dean (2015, section 3), ours beside the paper's.

    python -m jobs.mnist_paper --quick [--out DIR] [--data DIR] [--threads N]   # 5-7 min on 2 CPU cores
    python -m jobs.mnist_paper --full  [--out DIR] [--device cpu|cuda]          # the full schedule (GPU or CPU)
    python -m jobs.mnist_paper --full --out DIR                                 # again: resumes where it stopped

1. the big net (2x1200, dropout 50% / 20% on inputs, 2-pixel jitter): a
   `specialists run` with clustering and specialists off;
2. the small net (2x800, no regularisation) on hard labels alone, and distilled
   from the big net at T = 20 (one `specialists distill`, student.baseline=true);
   then the same distillation with 2 jittered copies of each training image in
   the transfer set (`transfer.augment=[jitter]`; chosen over the plain set on
   validation accuracy): the big net was trained on jittered images, so its soft
   targets there carry more than the labels; and once more with the big net's
   distribution averaged over its input shifted by up to one pixel each way
   (`teacher.shift_pixels=1`, 9 translations); the student with the best
   validation accuracy of the three is the one the table reports as chosen;
3. the same distillation on a transfer set without any 3, before and after the
   bias of the 3 is raised by the shift chosen on validation data;
4. the same on a transfer set of only 7s and 8s (raising every other class's
   bias by s is lowering those of 7 and 8 by s: softmax ignores a shared offset).

`--quick` trains on a seeded stratified 6,000 of the 60,000 training images
(5,400 after the validation split), the big net for 50 epochs and the small
ones for 40, with one torch thread: 5-7 min on the 2-core development
machine. Its error counts are several times the paper's (less data, shorter
training); the test set is always all 10,000 images. `--full` uses all 54,000
training images, the big net for 100 epochs and the small ones for 30, each
with a learning rate decaying linearly to 0 and its best validation epoch
kept (chosen on validation over the 60 constant-rate epochs with early
stopping it had before; the README gives both). `--teacher-epochs`,
`--student-epochs`, `--patience`, `--lr-schedule`, and the big net's
`--teacher-lr` and `--max-norm` override a schedule to compare others. Prints the table and writes OUT/results.json, with the
validation accuracies that schedules are chosen on.

Each model is one step (big net; small net + distilled net; jittered-transfer
student; no-3 student; 7-and-8 student), and a finished step is kept: rerunning with the same
`--out` resumes at the first unfinished one (a step cut short restarts from
its beginning). Between steps the job prints the time spent and an estimate of
the time left (from the seconds per epoch-example-parameter measured so far,
an upper bound when early stopping ends a model sooner); within a step, the
epoch bar of the training loop shows its own progress (`--full` turns it on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

from jobs.arguments import at_least
from specialists.cli import exit_status
from specialists.config import load_config
from specialists.distill import kept_gain
from specialists.distill_config import load_distill_config
from specialists.distill_run import run_distill
from specialists.rundir import RunDir, write_json
from specialists.stages import run_pipeline

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

PAPER = {
    "big": 67, "small": 146, "distilled": 74,
    "no3": 206, "no3_on_3s": 133, "no3_adjusted": 109, "no3_adjusted_on_3s": 14, "no3_shift": 3.5,
    "only78_error": 0.473, "only78_adjusted_error": 0.132, "only78_shift": 7.6,
}

SCHEDULES = {  # max_train 0: all 60,000 training images; lr_schedule: train.schedule of every model
    "quick": {"max_train": 6_000, "teacher_epochs": 50, "student_epochs": 40, "patience": 0, "batch_size": 128,
              "lr_schedule": "constant", "teacher_lr": 0.001, "max_norm": 0.0},
    "full": {"max_train": 0, "teacher_epochs": 100, "student_epochs": 30, "patience": 0, "batch_size": 128,
             "lr_schedule": "linear", "teacher_lr": 0.001, "max_norm": 0.0},
}

SMALL = "student.model={name: mlp, hidden: [800, 800], dropout: 0.0, input_dropout: 0.0, jitter: 0}"


def _schedule(prefix: str, epochs: int, s: dict, lr: float = 0.001) -> list[str]:
    return [f"{prefix}.epochs={epochs}", f"{prefix}.batch_size={s['batch_size']}", f"{prefix}.lr={lr}",
            f"{prefix}.patience={s['patience']}", f"{prefix}.schedule={s['lr_schedule']}"]


class _Clock:
    """Time spent and an estimate of the time left: seconds per (epoch x example x parameter), measured."""

    def __init__(self, steps: dict[str, float], log):
        self.steps, self.log, self.started = steps, log, time.perf_counter()  # step -> its work (epochs x ex x params)
        self.rate, self.done = None, set()

    def finished(self, name: str, seconds: float | None) -> None:
        self.done.add(name)
        if seconds is not None and self.steps[name] > 0:
            rate = seconds / self.steps[name]
            self.rate = rate if self.rate is None else max(self.rate, rate)  # the slowest yet: an upper bound
        left = sum(w for n, w in self.steps.items() if n not in self.done)
        eta = "unknown (no step timed yet)" if self.rate is None else f"at most {left * self.rate / 60:.0f} min"
        what = "resumed (finished before)" if seconds is None else f"done in {seconds / 60:.1f} min"
        self.log(f"[{len(self.done)}/{len(self.steps)}] {name}: {what}; elapsed "
                 f"{(time.perf_counter() - self.started) / 60:.1f} min; time left {eta}")


def _finished(root: Path, section: str) -> bool:
    metrics = root / "metrics.json"
    return metrics.is_file() and section in json.loads(metrics.read_text())


def run(s: dict, out: Path, data: Path, device: str, threads: int, seed: int, log=print,
        progress: bool = False) -> dict:
    """The runs of one schedule `s` (an entry of SCHEDULES, perhaps with overrides) under `out`."""
    common = [f"seed={seed}", f"device={device}", f"threads={threads}"]
    n_train = (s["max_train"] or 60_000) * 0.9  # after the validation split
    big_params, small_params = 784 * 1200 + 1200 * 1200 + 1200 * 10, 784 * 800 + 800 * 800 + 800 * 10
    clock = _Clock({"big": s["teacher_epochs"] * n_train * big_params,
                    "distilled": 2 * s["student_epochs"] * n_train * small_params,  # small net alone + distilled
                    "jittered": 3 * s["student_epochs"] * n_train * small_params,  # 3x the transfer examples
                    "shifted": 3 * s["student_epochs"] * n_train * small_params,
                    "no3": 0.9 * s["student_epochs"] * n_train * small_params,
                    "only78": 0.2 * s["student_epochs"] * n_train * small_params}, log)
    big_cfg = load_config(None, [
        *common, "data.kind=mnist", f"data.path={data}", f"data.max_train={s['max_train']}",
        "model.name=mlp", "model.hidden=[1200, 1200]", "model.dropout=0.5", "model.input_dropout=0.2",
        "model.jitter=2", *_schedule("train", s["teacher_epochs"], s, s["teacher_lr"]), f"train.max_norm={s['max_norm']}",
        "cluster.enabled=false", "specialists.enabled=false",
    ])
    started = time.perf_counter()
    if _finished(out / "big", "generalist") and (out / "big" / "generalist" / "model.json").is_file():
        big = RunDir(out / "big")
        clock.finished("big", None)
    else:  # a run cut short resumes its own stages; a missing one starts
        resume = (out / "big" / "config.yaml").is_file()
        big = run_pipeline(None if resume else big_cfg, out / "big", resume=resume, log=log, progress=progress)
        clock.finished("big", time.perf_counter() - started)

    def distil(name: str, *extra: str) -> dict:
        if _finished(out / name, "student"):
            clock.finished(name, None)
            return RunDir(out / name).read_metrics()
        if (out / name).exists():  # cut short: this step restarts
            log(f"{name}: removing the unfinished {out / name} and starting the step again")
            shutil.rmtree(out / name)
        begun = time.perf_counter()
        cfg = load_distill_config(None, [
            *common, f"teacher.runs={json.dumps([str(big.root)])}", "teacher.source=generalist", SMALL,
            *_schedule("student.train", s["student_epochs"], s), "student.temperature=20", *extra,
        ])
        metrics = run_distill(cfg, out / name, log=log, progress=progress).read_metrics()
        clock.finished(name, time.perf_counter() - begun)
        return metrics

    full = distil("distilled", "student.baseline=true")
    jittered = distil("jittered", "transfer.augment=[jitter]", "transfer.copies=2")
    shifted = distil("shifted", "transfer.augment=[jitter]", "transfer.copies=2", "teacher.shift_pixels=1")
    no3 = distil("no3", "transfer.omit_classes=[3]")
    only78 = distil("only78", "transfer.keep_classes=[7, 8]")
    n_test = full["data"]["test"]
    errors = {"big": big.read_metrics()["generalist"]["test_errors"], "small": full["baseline"]["test_errors"],
              "jittered": jittered["student"]["test_errors"], "shifted": shifted["student"]["test_errors"],
              "shifted_teacher": shifted["teacher"]["test_errors"]}
    accuracy = {name: 1 - e / n_test for name, e in errors.items()}
    students = {"distilled": full, "jittered": jittered, "shifted": shifted}
    chosen = max(students, key=lambda name: students[name]["student"]["val_accuracy"])  # first of equals
    return {
        **errors,
        "distilled": full["student"]["test_errors"],
        "chosen": chosen, "chosen_errors": students[chosen]["student"]["test_errors"],
        "kept_gain": full["kept_gain"]["kept_gain"],  # of the big net's gain over the small one
        # the jittered run has no small-net baseline: kept against the one trained beside the plain student
        "jittered_kept_gain": kept_gain(accuracy["jittered"], accuracy["small"], accuracy["big"], n_test)["kept_gain"],
        # of the shift-averaged big net's gain, the teacher that student learnt from
        "shifted_kept_gain": kept_gain(accuracy["shifted"], accuracy["small"], accuracy["shifted_teacher"],
                                       n_test)["kept_gain"],
        "no3": no3["bias"]["test_errors_before"], "no3_on_3s": no3["bias"]["test_errors_on_absent_before"],
        "no3_adjusted": no3["bias"]["test_errors_after"],
        "no3_adjusted_on_3s": no3["bias"]["test_errors_on_absent_after"], "no3_shift": no3["bias"]["shift"],
        "only78_error": only78["bias"]["test_errors_before"] / n_test,
        "only78_adjusted_error": only78["bias"]["test_errors_after"] / n_test, "only78_shift": only78["bias"]["shift"],
        "train_examples": full["data"]["train"], "test_examples": n_test,
        "val_accuracy": {"big": big.read_metrics()["generalist"]["val_accuracy"],  # what schedules are chosen on
                         "small": full["baseline"]["val_accuracy"], "distilled": full["student"]["val_accuracy"],
                         "jittered": jittered["student"]["val_accuracy"],
                         "shifted": shifted["student"]["val_accuracy"]},
    }


def _share(kept: float | None) -> str:
    return "undefined" if kept is None else f"{kept:.0%}"


def table(ours: dict, schedule: str, seconds: float) -> str:
    paper_kept = (PAPER["small"] - PAPER["distilled"]) / (PAPER["small"] - PAPER["big"])
    rows = [
        ("big net 2x1200, dropout + 2-pixel jitter", f"{PAPER['big']} errors", f"{ours['big']} errors"),
        ("small net 2x800 alone", f"{PAPER['small']} errors", f"{ours['small']} errors"),
        ("small net distilled, T = 20", f"{PAPER['distilled']} errors", f"{ours['distilled']} errors"),
        ("  share of the big net's gain kept", f"{paper_kept:.0%}", _share(ours["kept_gain"])),
        ("  transfer set + 2 jittered copies", "", f"{ours['jittered']} errors"),
        ("  share of the big net's gain kept", "", _share(ours["jittered_kept_gain"])),
        ("  the same, teacher averaged over 1-pixel shifts", "", f"{ours['shifted']} errors (teacher "
         f"{ours['shifted_teacher']})"),
        ("  share of that teacher's gain kept", "", _share(ours["shifted_kept_gain"])),
        ("  distilled student chosen on validation", "", f"{ours['chosen_errors']} errors ({ours['chosen']})"),
        ("transfer set without any 3", f"{PAPER['no3']} errors ({PAPER['no3_on_3s']} on 3s)",
         f"{ours['no3']} errors ({ours['no3_on_3s']} on 3s)"),
        ("  after raising the bias of 3", f"{PAPER['no3_adjusted']} ({PAPER['no3_adjusted_on_3s']} on 3s), "
         f"+{PAPER['no3_shift']}", f"{ours['no3_adjusted']} ({ours['no3_adjusted_on_3s']} on 3s), "
         f"{ours['no3_shift']:+.1f}"),
        ("transfer set of only 7s and 8s", f"{PAPER['only78_error']:.1%} error", f"{ours['only78_error']:.1%} error"),
        ("  after lowering the 7 and 8 biases", f"{PAPER['only78_adjusted_error']:.1%}, -{PAPER['only78_shift']}",
         f"{ours['only78_adjusted_error']:.1%}, {-ours['only78_shift']:+.1f}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    head = (f"MNIST, Hinton et al. 2015 section 3 ({schedule} schedule: {ours['train_examples']:,} training images, "
            f"test errors of {ours['test_examples']:,}; bias shifts chosen on validation, the paper's on test)")
    lines = [head, f"{'':<{width[0]}}  {'paper':<{width[1]}}  ours", *(f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows)]
    lines.append(f"wall time {seconds / 60:.1f} min")
    return "\n".join(lines)


def record_schedule(out: Path, settings: dict) -> None:
    """Record the schedule in OUT/schedule.json; refuse to resume OUT under another one, whose
    finished steps would be mixed into this table."""
    path = out / "schedule.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            changed = ", ".join(f"{k}: {before.get(k)} -> {settings.get(k)}"
                                for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            raise SystemExit(f"{out} holds runs of another schedule ({path}: {changed}); "
                             "resume it with the same options, or choose another --out")
    else:
        write_json(path, settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="a short schedule on 10,000 training images (CPU)")
    mode.add_argument("--full", action="store_true", help="the full schedule on all training images (GPU or CPU; "
                      "resumable: run again with the same --out)")
    parser.add_argument("--out", type=Path, help="directory of the runs (default runs/mnist-paper-<time>)")
    parser.add_argument("--data", type=Path, default=MNIST, help=f"MNIST IDX folder (default {MNIST})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=at_least(0), help="torch CPU threads (default: 1 with --quick, torch's own with "
                        "--full); on a busy 2-core machine two threads wait on each other and run 2-5x slower")
    parser.add_argument("--seed", type=at_least(0), default=0)
    over = parser.add_argument_group("schedule overrides (to compare schedules on validation)")
    over.add_argument("--teacher-epochs", type=at_least(1))
    over.add_argument("--student-epochs", type=at_least(1))
    over.add_argument("--patience", type=at_least(0), help="epochs without validation gain before stopping (0: never)")
    over.add_argument("--lr-schedule", choices=["constant", "linear"])
    over.add_argument("--teacher-lr", type=at_least(0.0, float, strict=True), help="the big net's (Adam) learning rate")
    over.add_argument("--max-norm", type=at_least(0.0, float), help="the big net's max-norm constraint on each unit's incoming "
                      "weights (train.max_norm; 0: off)")
    args = parser.parse_args(argv)
    schedule = "quick" if args.quick else "full"
    settings = {**SCHEDULES[schedule], **{key: value for key, value in (
        ("teacher_epochs", args.teacher_epochs), ("student_epochs", args.student_epochs),
        ("patience", args.patience), ("lr_schedule", args.lr_schedule), ("teacher_lr", args.teacher_lr),
        ("max_norm", args.max_norm)) if value is not None}}
    out = args.out or Path("runs") / f"mnist-paper-{schedule}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    record_schedule(out, {**settings, "seed": args.seed})
    started = time.perf_counter()
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    ours = run(settings, out, args.data, args.device, threads, args.seed, log=lambda m: print(m, flush=True),
               progress=args.full)
    seconds = time.perf_counter() - started
    write_json(out / "results.json", {"schedule": schedule, "settings": {**settings, "threads": threads},
                                      "seconds": round(seconds, 1), "paper": PAPER, "ours": ours})
    print()
    print(table(ours, schedule, seconds))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
