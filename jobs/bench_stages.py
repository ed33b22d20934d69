"""Generalist, specialists and peer training side by side in one `specialists run`: wall time and rate.

    python -m jobs.bench_stages [--config FILE] [--out DIR] [--repeat N] [key.sub=value ...]

One full run (default: Banking77 with the code defaults, so the specialists
get `specialists.budget` x the generalist's examples and the peer stage,
matching them, about as many). Printed per stage: training examples
processed, the stage's wall seconds, the training's CPU-seconds (the
generalist's and the peers' from the driver process, the specialists' summed
over their Ray tasks) and the two rates: examples per wall second and
examples per CPU-second (per core); the whole run's wall time and each stage's. Then the specialists stage's parts (Ray
start, cutting the generalist's outputs, training to the last specialist
saved, Ray shut down); each specialist's task CPU, grouped by the Ray worker
that trained it, its first task on top; and issue 11's goal: the specialists stage takes no
more wall time than the peer stage at an equal number of examples (compared
per example, since the peer ensemble's budget rounds to whole epochs).

The load average before and after is printed: on a machine others share, wall
times say more about them than about the stages. `--repeat N` makes N runs,
one after another, each in a process of its own, and judges the goal on the
medians of their stage times: on two cores one run's peer stage can take a
third longer than the next one's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.arguments import at_least
from specialists.cli import exit_status
from specialists.config import load_config
from specialists.report.document import Doc, Para, Table, render_md
from specialists.rundir import read_json
from specialists.specialist import SPECIALIST_FILE, specialist_dir
from specialists.stages import run_pipeline


def rates(name: str, examples: int, wall: float, cpu: float) -> list[str]:
    return [name, f"{examples:,}", f"{wall:.1f}", f"{cpu:.1f}", f"{examples / wall:,.0f}" if wall else "—",
            f"{examples / cpu:,.0f}" if cpu else "—"]


def _per_specialist(run, entries: list[dict]) -> list[list[str]]:
    """A row per specialist, grouped by the worker that trained it, each worker's first (the largest: the stage
    submits the longest first) on top: a worker's first task pays for what its process has not yet cached."""
    pids = {e["id"]: read_json(specialist_dir(run, e["id"]) / SPECIALIST_FILE)["worker"]["pid"] for e in entries}
    ordered = sorted(entries, key=lambda e: (pids[e["id"]], -e["examples_seen"]))
    return [[str(e["id"]), str(pids[e["id"]]), f"{e['examples_seen']:,}", f"{e['cpu_seconds']:.2f}",
             f"{e['examples_seen'] / e['cpu_seconds']:,.0f}" if e["cpu_seconds"] else "—"] for e in ordered]


def one_run(cfg, out: Path) -> tuple[Doc, dict]:
    """Run the pipeline into `out`; the report of its stages, and the goal's figures (empty where the run
    had no specialists or no peers)."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run = run_pipeline(cfg, out, log=lambda s: None, progress=False)
    whole = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    m = run.read_metrics()
    timings, gen, spec, peer = m["timings"], m["generalist"], m.get("specialists", {}), m.get("peer_ensemble", {})

    rows = [rates("generalist", gen["examples_seen"], timings["generalist"], gen.get("cpu_seconds", 0.0))]
    if spec:
        rows.append(rates(f"specialists ({spec['count']}, Ray, {cfg.ray.cpus_per_task:g} CPU each)",
                          spec["examples_seen"], timings["specialists"], spec["cpu_seconds"]))
    peer_examples = peer.get("examples_seen", 0) - gen["examples_seen"]
    if peer:
        rows.append(rates(f"peer members ({peer['members'] - 1}, in process)", peer_examples, timings["peer"],
                          peer.get("cpu_seconds", 0.0)))
    doc = Doc(f"Stages of one run: {m['data']['name']}, seed {cfg.seed}")
    doc.add(Table(["training", "examples", "stage wall s", "training CPU-s", "examples / wall s",
                   "examples / CPU-s"], rows))
    doc.add(Para(f"The whole run: {whole:.1f} s wall (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                 + ")."))
    if spec.get("profile"):
        p = spec["profile"]
        doc.add(Para("Specialists stage: " + ", ".join(f"{k.removesuffix('_seconds').replace('_', ' ')} {v:.1f}s"
                                                       for k, v in p.items())
                     + f"; the tasks' own seconds summed: {spec['seconds']:.1f}s"))
    if spec.get("per_specialist"):
        doc.add(Table(["specialist", "Ray worker (pid)", "examples", "task CPU-s", "examples / CPU-s"],
                      _per_specialist(run, spec["per_specialist"])))
    goal = {}
    if spec and peer and peer_examples:
        goal = {"specialists_s": timings["specialists"], "peer_s": timings["peer"],
                "specialists_ms": 1e3 * timings["specialists"] / spec["examples_seen"],
                "peer_ms": 1e3 * timings["peer"] / peer_examples,
                "peer_cpu_s": peer.get("cpu_seconds", 0.0)}
        doc.add(Para(f"Goal (specialists stage no slower than the peer stage at equal examples): "
                     f"{goal['specialists_ms']:.3f} vs {goal['peer_ms']:.3f} wall ms per example, "
                     f"{verdict(goal)}; load average {load_before:.1f} before, {load_after:.1f} after, "
                     f"on {os.cpu_count()} CPUs."))
    return doc, goal


def verdict(goal: dict) -> str:
    return "met" if goal["specialists_ms"] <= goal["peer_ms"] else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (default: the built-in Banking77 defaults)")
    parser.add_argument("--out", help="run directory (default: a temporary one, removed after); with --repeat, "
                                      "one folder 1, 2, ... in it per run")
    parser.add_argument("--repeat", type=at_least(1), default=1,
                        help="runs, each in a process of its own, one after another; the goal is judged on their "
                             "medians (default 1)")
    parser.add_argument("--goal-json", help=argparse.SUPPRESS)  # where a repeated run leaves its goal figures
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)  # a bad config is refused before any run
    if args.repeat > 1:
        repeat(args)
        return
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_stages_")) / "run"
    doc, goal = one_run(cfg, out)
    print(render_md(doc), flush=True)
    if args.goal_json:
        Path(args.goal_json).write_text(json.dumps(goal))
    if not args.out:
        shutil.rmtree(out.parent, ignore_errors=True)


def repeat(args) -> None:
    """`--repeat N`: N runs, each a fresh process as `specialists run` is, then the goal on their medians."""
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_stages_"))
    root.mkdir(parents=True, exist_ok=True)
    goals = []
    try:
        for k in range(1, args.repeat + 1):
            figures = root / f"goal{k}.json"
            command = [sys.executable, "-m", "jobs.bench_stages", "--goal-json", str(figures)]
            command += ["--config", args.config] if args.config else []
            command += ["--out", str(root / str(k))] if args.out else []
            command += args.overrides
            subprocess.run(command, check=True)
            goals.append(json.loads(figures.read_text()))
            figures.unlink()
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    if not all(goals):
        return
    doc = Doc(f"{args.repeat} runs")
    doc.add(Table(["run", "specialists stage s", "peer stage s", "peer CPU-s", "specialists ms / example",
                   "peer ms / example", "goal"],
                  [[str(k), f"{g['specialists_s']:.1f}", f"{g['peer_s']:.1f}", f"{g['peer_cpu_s']:.1f}",
                    f"{g['specialists_ms']:.3f}", f"{g['peer_ms']:.3f}", verdict(g)]
                   for k, g in enumerate(goals, 1)]))
    median = {key: float(np.median([g[key] for g in goals])) for key in goals[0]}
    doc.add(Para(f"Goal on the medians: {median['specialists_ms']:.3f} vs {median['peer_ms']:.3f} wall ms per "
                 f"example ({median['specialists_s']:.1f} s against {median['peer_s']:.1f} s), {verdict(median)}."))
    print(render_md(doc))


if __name__ == "__main__":
    sys.exit(exit_status(main))
