"""Time the specialists stage on 1 worker and on N: wall time and speedup.

    python -m jobs.bench_parallel [--workers 1 2] [--epochs 120] [--hidden 256] [--repeat 2] [--out DIR]

One run directory (a generalist and 8 groups of confusable classes on the
synthetic set) is prepared once; then, for each worker count W, a local Ray
instance with W CPUs trains the same 8 specialists (1 CPU and 1 torch thread
each, every specialist the same number of epochs: patience 0) through the
real stage, `parallel.train_specialists`. Wall time is the stage's, from the
generalist's logits and `ray.put` to the last specialist saved, with Ray
already started (its start-up is printed separately); it includes the
workers' own start (importing torch) on their first task.

The goal is speedup >= 0.85 x W. The fixed costs (worker start-up, the
generalist's logits, the last straggler; about a second in all) are what keep
it below W, and weigh less the longer each specialist trains: the default 120
epochs take about 5 s per specialist (Banking77's take 10-20 s), 40 epochs
about 1.7 s. Two busy processes also run each about 5-10% slower than one
alone on this machine (shared caches), and so does
anything else running on the machine, hence, after each measurement, the
load average and how many CPUs W plain busy processes get at that moment (W
on an idle machine), and `--repeat` (worker counts interleaved, best time kept).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from jobs.arguments import at_least
from specialists.cli import exit_status
from specialists.config import load_config
from specialists.parallel import ray_session, train_specialists
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run
from specialists.stages import run_pipeline


def bench_config(epochs: int, hidden: int, workers: int = 1, specialists: bool = True):
    return load_config(None, [
        "data.kind=synthetic", "data.synthetic.n_classes=160", "data.synthetic.n_groups=8",
        "data.synthetic.n_features=64", "data.synthetic.subspace_dim=8", "data.synthetic.train_per_class=100",
        "data.synthetic.test_per_class=10", "model.name=mlp", f"model.hidden=[{hidden}]", "model.dropout=0.0",
        "train.epochs=10", "train.batch_size=128", "train.lr=0.003", "threads=1", "cluster.n_clusters=8",
        f"specialists.enabled={str(specialists).lower()}", f"specialists.epochs={epochs}", "specialists.patience=0",
        f"ray.num_cpus={workers}", "ray.cpus_per_task=1",
    ])


def _burn(n: int) -> float:
    started, total = time.perf_counter(), 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - started


def machine_parallelism(workers: int, n: int = 5_000_000) -> float:
    """How many processes' worth of CPU `workers` busy processes get at once (= workers on an idle machine)."""
    one = _burn(n)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(_burn, [1000] * workers)  # start the processes before timing
        started = time.perf_counter()
        pool.map(_burn, [n] * workers)
        return workers * one / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2],
                        help="worker counts; the first is the baseline")
    parser.add_argument("--epochs", type=at_least(1), default=120, help="epochs per specialist (all of them run)")
    parser.add_argument("--hidden", type=at_least(1), default=256,
                        help="hidden width of the generalist and specialists")
    parser.add_argument("--repeat", type=at_least(1), default=2,
                        help="measure each worker count this often, keep the best")
    parser.add_argument("--out", help="where to keep the run directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    run = RunDir(root / "run")
    if not run.clusters.is_file():  # the generalist and its clusters, once
        run_pipeline(bench_config(args.epochs, args.hidden, specialists=False), run.root, log=lambda s: None,
                     progress=False)
    _, dataset = dataset_for_run(run)
    groups = run.read_metrics()["cluster"]
    print(f"8 specialists: synthetic {dataset.n_classes} classes, {len(dataset.train)} training examples, "
          f"{groups['groups']} groups of {groups['min_size']}-{groups['max_size']} classes; "
          f"mlp [{args.hidden}] per specialist, {args.epochs} epochs each, 1 CPU / 1 torch thread per task")

    best: dict[int, float] = {}
    for _ in range(args.repeat):
        for workers in args.workers:
            shutil.rmtree(run.specialists, ignore_errors=True)
            cfg = bench_config(args.epochs, args.hidden, workers)
            started = time.perf_counter()
            with ray_session(cfg.ray, log=lambda s: None):
                ready = time.perf_counter()
                section = train_specialists(cfg, dataset, run, torch.device("cpu"), log=lambda s: None, progress=False)
                wall = time.perf_counter() - ready
            assert section["count"] == 8, section["count"]
            best[workers] = min(best.get(workers, wall), wall)
            print(f"  {workers} worker(s): {wall:.1f}s wall; tasks summed: {section['seconds']:.1f}s wall, "
                  f"{section['cpu_seconds']:.1f}s CPU; ray.init {ready - started:.1f}s; "
                  f"load average {os.getloadavg()[0]:.1f}; {workers} busy processes get "
                  f"{machine_parallelism(workers):.2f} CPUs", flush=True)

    base = best[args.workers[0]] * args.workers[0]  # the baseline's time as if on 1 worker
    print(f"\n{'workers':>7}  {'wall (s)':>8}  {'speedup':>7}  {'x workers':>9}")
    for workers, wall in best.items():
        speedup = base / wall
        print(f"{workers:>7}  {wall:>8.1f}  {speedup:>7.2f}  {speedup / workers:>9.2f}")
    worst = min(base / wall / workers for workers, wall in best.items())
    print(f"goal speedup >= 0.85 x workers: {'met' if worst >= 0.85 else 'NOT met'} (worst {worst:.2f})")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(exit_status(main))
