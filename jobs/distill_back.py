"""Distil a run's ensembles back into one model of the generalist's size (issue 13), per seed and teacher.

    python -m jobs.distill_back [--config FILE] --seeds 0 1 2 [--runs DIR] [--out DIR] [--teachers ...]

For each seed: the teacher run `RUNS/<name>_s<seed>` (a `specialists run` of
`--config` with `seed=<seed>`, made when missing), then one `specialists
distill` per teacher: the generalist + specialists (`combined`), the peer
ensemble (`peers`, section 4), and the hybrid (`hybrid`: the generalist, every
finished peer member and the specialists in one section 5.4 combination),
the last two when the run trained peers. Each line
gives the generalist's, the teacher's and the student's test accuracy, the
kept gain (`distill_run.KEPT_GAIN_DEFINITION`) and the extra training cost
(the student's training examples over the generalist's, and seconds). Every
setting of the students (temperature, soft weight, epoch) is chosen on
validation; test accuracy is only reported.

Prints a Markdown table and writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from specialists.cli import exit_status
from specialists.config import load_config
from specialists.distill_config import load_distill_config
from specialists.distill_run import run_distill
from specialists.distill_teachers import finished_peers
from specialists.rundir import RunDir, write_json
from specialists.stages import run_pipeline

# The students' recipe (README, "Distilling back"): augmented copies of the training inputs; the starting point
# (the generalist or fresh weights) and the temperature chosen on validation: four students, the best kept.
TEXT = ["transfer.augment=[token_dropout, span_mask, swap]"]
# Vectors: also a longer schedule whose learning rate decays to 0 (chosen on seed 0's validation accuracy of the
# synthetic set, where the small student was still improving when the default schedule stopped it). The copies stay
# fixed: fresh ones were no better on seed 0's validation, at 2.5x the time.
ARRAYS = ["transfer.augment=[noise, mixup]", "transfer.copies=2", "student.train.epochs=60",
          "student.train.patience=12", "student.train.schedule=linear"]
RECIPE = ["student.temperatures=[1, 2]", "student.soft_weights=[0.9]", "student.init=both"]
# Texts, copies per teacher. With specialists: 4 copies drawn anew in every batch and labelled there (transfer.fresh),
# chosen on validation accuracy (mean of seeds 0-2) over 2 fixed and 2 fresh copies with the character-gram
# specialists' teachers. The peer teacher was measured with 2 fixed copies and keeps them.
TEXT_COPIES = {"combined": ["transfer.copies=4", "transfer.fresh=true"],
               "hybrid": ["transfer.copies=4", "transfer.fresh=true"], "peers": ["transfer.copies=2"]}


def teacher_run(config: str | None, seed: int, root: Path, log=print) -> RunDir:
    name = Path(config).stem if config else "banking77"
    run = RunDir(root / f"{name}_s{seed}")
    if not (run.metrics.is_file() and "ensemble" in run.read_metrics()):
        resume = run.config.is_file()
        log(f"teacher run {run.root}: {'resuming' if resume else 'training'}")
        cfg = None if resume else load_config(config, [f"seed={seed}", "threads=1"])
        run_pipeline(cfg, run.root, resume=resume, log=lambda m: None, progress=False)
    return run


def teachers_of(run: RunDir, wanted: list[str]) -> list[str]:
    have = ["combined"]
    if finished_peers(run):
        have += ["peers", "hybrid"]
    return [t for t in wanted if t in have]


def distil(run: RunDir, source: str, out: Path, extra: list[str], log=print) -> dict:
    if not (out / "metrics.json").is_file() or "kept_gain" not in json.loads((out / "metrics.json").read_text()):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        text = load_config(run.config).data.kind == "csv_text"
        cfg = load_distill_config(None, [f"teacher.runs=[{json.dumps(str(run.root))}]", f"teacher.source={source}",
                                         "threads=1", *(TEXT + TEXT_COPIES[source] if text else ARRAYS),
                                         *RECIPE, *extra])
        run_distill(cfg, out, log=lambda m: None, progress=False)
    m = json.loads((out / "metrics.json").read_text())
    run_m = run.read_metrics()
    k, s = m["kept_gain"], m["student"]
    generalist_examples = run_m["generalist"]["examples_seen"]
    cost_examples = s.get("grid_examples_seen", s["examples_seen"]) + m["teacher"].get("out_of_fold", {}).get(
        "examples_seen", 0)
    row = {"teacher": source, "generalist": k["baseline_test_accuracy"], "teacher_accuracy": k["teacher_test_accuracy"],
           "student": k["student_test_accuracy"], "kept_gain": k["kept_gain"], "reason": k.get("reason"),
           "temperature": s.get("temperature"), "soft_weight": s.get("soft_weight"), "init": s.get("init"),
           "student_examples": cost_examples, "cost_x_generalist": cost_examples / generalist_examples,
           "student_seconds": s.get("grid_seconds", s["train_seconds"]),
           "generalist_seconds": run_m.get("timings", {}).get("generalist"),
           "differing_from_generalist": s.get("test_predictions_differing_from_generalist"), "out": str(out)}
    log(f"  {run.root.name} {source}: generalist {row['generalist']:.4f}, teacher {row['teacher_accuracy']:.4f}, "
        f"student {row['student']:.4f}, kept {_kept(row)}, cost {row['cost_x_generalist']:.1f}x the generalist's "
        f"examples ({row['student_seconds']:.0f}s)")
    return row


def _kept(row: dict) -> str:
    return "null" if row["kept_gain"] is None else f"{row['kept_gain']:.0%}"


def table(rows: list[dict]) -> str:
    lines = ["| data | seed | teacher | generalist | teacher acc. | student | kept gain | start, T, soft weight | "
             "extra training (x generalist examples; s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        init = r.get("init") or json.loads((Path(r["out"]) / "metrics.json").read_text())["student"].get("init")
        lines.append(f"| {r['data']} | {r['seed']} | {r['teacher']} | {r['generalist']:.2%} | "
                     f"{r['teacher_accuracy']:.2%} | {r['student']:.2%} | {_kept(r)} | {init}, {r['temperature']:g}, "
                     f"{r['soft_weight']:g} | {r['cost_x_generalist']:.1f}x; {r['student_seconds']:.0f} s |")
    by = {}
    for r in rows:
        by.setdefault((r["data"], r["teacher"]), []).append(r)
    lines.append("")
    lines.append("| data | teacher | seeds | mean kept gain | student >= generalist on every seed |")
    lines.append("|---|---|---|---|---|")
    for (data, teacher), group in by.items():
        kept = [r["kept_gain"] for r in group if r["kept_gain"] is not None]
        mean = f"{sum(kept) / len(kept):.0%}" if kept else "null"
        never_below = all(r["student"] >= r["generalist"] for r in group)
        lines.append(f"| {data} | {teacher} | {', '.join(str(r['seed']) for r in group)} | {mean} "
                     f"({len(kept)} defined) | {'yes' if never_below else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the teacher runs' config (default: Banking77, the built-in data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/distill-back/teachers"),
                        help="folder of the teacher runs (<name>_s<seed>; made when missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/distill-back"), help="folder of the students")
    parser.add_argument("--teachers", nargs="+", default=["combined", "peers", "hybrid"],
                        choices=["combined", "peers", "hybrid"])
    parser.add_argument("overrides", nargs="*", help="distill settings for every student, e.g. student.cluster_weight=1")
    args = parser.parse_args(argv)
    for seed in args.seeds:  # every setting checked before a teacher trains
        load_config(args.config, [f"seed={seed}", "threads=1"])
    load_distill_config(None, [*RECIPE, *args.overrides])
    name = Path(args.config).stem if args.config else "banking77"
    rows, started = [], time.perf_counter()
    results = args.out / f"{name}_seeds{'-'.join(map(str, args.seeds))}_results.json"
    for seed in args.seeds:
        run = teacher_run(args.config, seed, args.runs)
        for source in teachers_of(run, args.teachers):
            row = distil(run, source, args.out / f"{name}_s{seed}_{source}", args.overrides)
            rows.append({"data": name, "seed": seed, **row})
            write_json(results, {"rows": rows, "overrides": args.overrides})
    print(table(rows))
    print(f"wall time {(time.perf_counter() - started) / 60:.1f} min; results: {results}")


if __name__ == "__main__":
    sys.exit(exit_status(main))
