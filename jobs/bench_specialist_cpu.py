"""A run's specialists trained again in this process on one thread: examples per CPU-second, and where they go.

    python -m jobs.bench_specialist_cpu RUN_DIR [--repeat 2] [--profile]

The specialists stage's tasks without Ray around them: the same data (cut
from the run's generalist as the stage cuts it), budget shares, seeds and
weights, trained one after another on one torch thread, as a Ray worker with
`ray.cpus_per_task=1` trains them. The first pass warms the process (imports,
the allocator, the hashing caches a worker fills on its first task) and is not
counted; each later pass prints every specialist's examples and CPU-seconds,
and the pass's examples per CPU-second. `--profile`: torch.profiler's table of
the last pass, self CPU time by operator. Compare the rate with the peer
member's in `jobs.bench_stages` (which trains on two threads).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from specialists.cli import exit_status
from specialists.models import load_checkpoint
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run, set_malloc_thresholds
from specialists.specialist import (model_from_arrays, model_to_arrays, read_groups, reads_generalist_weights,
                                    train_specialist)
from specialists.specialist_data import (ShardStore, cut_generalist_outputs, plan_specialist, run_budget,
                                         specialist_data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run with specialists (e.g. `specialists run --out DIR`)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes after the warm-up pass (default 2)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of the last pass")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat} must be at least 1")

    torch.set_num_threads(1)
    set_malloc_thresholds()  # as a worker does
    run = RunDir(Path(args.run_dir))
    cfg, dataset = dataset_for_run(run)
    run.require(run.generalist, what="generalist")
    generalist = load_checkpoint(run.generalist, "cpu")
    groups = read_groups(run, dataset.classes, generalist.head.out_features)
    trainable = [m for m, group in enumerate(groups) if len(group) < dataset.n_classes]  # as the stage skips
    _, shares = run_budget(cfg, run.read_metrics()["generalist"]["examples_seen"], groups, trainable,
                           dataset.train.labels)
    # a worker's copy of the generalist, as the stage ships it
    sent = model_from_arrays(*model_to_arrays(generalist, parameters=reads_generalist_weights(cfg.specialists)))

    def one_pass(timed: bool) -> None:
        with tempfile.TemporaryDirectory() as folder:
            plans = [plan_specialist(m, groups[m], dataset, cfg, shares.get(m, 0)) for m in trainable]
            store = ShardStore(Path(folder))
            val_top1 = cut_generalist_outputs(generalist, dataset, plans, store, cfg.train.eval_batch_size, "cpu")
            data = [specialist_data(plan, dataset, store, val_top1) for plan in plans]
        examples = cpu = 0.0
        for d in data:
            started = time.process_time()
            result = train_specialist(sent, d, dataset.val, cfg, device=torch.device("cpu"), desc="bench")
            seconds = time.process_time() - started
            examples, cpu = examples + result.metrics["examples_seen"], cpu + seconds
            if timed:
                print(f"  specialist {d.plan.m}: {result.metrics['examples_seen']:,} examples, {seconds:.2f} CPU-s")
        if timed:
            print(f"  all: {examples:,.0f} examples, {cpu:.2f} CPU-s, {examples / cpu:,.0f} examples per CPU-second")

    one_pass(timed=False)
    for k in range(1, args.repeat + 1):
        print(f"pass {k} of {args.repeat} ({len(trainable)} specialists, one thread):")
        last = args.profile and k == args.repeat
        with profile(activities=[ProfilerActivity.CPU]) if last else contextlib.nullcontext() as prof:
            one_pass(timed=True)
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    sys.exit(exit_status(main))
