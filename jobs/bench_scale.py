"""Peak memory and time per stage of a whole `specialists run` as the label set (C) and the data (N) grow.

    python -m jobs.bench_scale [--classes 1000 5000 15000] [--n-scale 1 2] [--per-class 20]
                               [--config configs/synthetic.yaml] [--set key=value ...] [--out DIR] [--plot PNG]
                               [--json FILE] [--merge FILE ...]
    python -m jobs.bench_scale --as-is --config configs/jft_shape.yaml    # one run of a config as it is
    python -m jobs.bench_scale --classes --merge a.json b.json            # print and plot earlier figures

Each size is issue 15's command with C classes: `specialists run` of
`--config` with data.synthetic.n_classes=C, n_groups=C/20 (so specialists of
about 20 classes), train_per_class=per_class x scale, test_per_class=4,
train.epochs=3, specialists.epochs=2, specialists.patience=0,
specialists.budget=0 (no budget: each specialist trains its two epochs, as
when the issue measured it), peer.enabled=false, then `--set` overrides. Each runs in a fresh Python
process, which is the run's driver, so every peak is that run's own. A thread
in it samples every 0.1 s:

    driver   its resident set (the peak is /proc VmHWM; per stage, the samples in the stage's time window)
    workers  every Ray worker it started (processes titled ray::..., its descendants): the largest VmHWM
    store    bytes in Ray's object store (the local node's store stats), while Ray is up

and prints, per size, the seconds and driver peak of each stage, the largest
worker, the store's peak, the evaluation's test examples per second and the
test accuracies; then a PNG of peak memory and time against C (one line per
N scale). Resident sets count shared pages too: a worker's includes the
object-store pages it reads. On a shared machine times move with other load;
memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jobs.procs import ray_processes_under

STAGES = ("data", "generalist", "cluster", "specialists", "peer", "evaluate", "report")
GiB = 2**30


def _status_kib(pid: int | str, field: str) -> int:
    """A `VmHWM:` / `VmRSS:` style line of /proc/<pid>/status in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Monitor(threading.Thread):
    """Samples this process, its Ray workers and the object store until `stop` (Linux /proc)."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (time, driver RSS bytes)
        self.worker_peak, self.worker_pid, self.store_peak = 0, None, 0
        self._stop_event = threading.Event()
        self._store_checked = 0.0

    def _store_bytes(self) -> int:
        import ray

        if not ray.is_initialized():
            return 0
        try:  # Ray's own stats of the local store (what `ray memory --stats-only` prints)
            from ray._private import internal_api

            state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            return int(internal_api.get_memory_info_reply(state).store_stats.object_store_bytes_used)
        except Exception:  # Ray shutting down between the check and the call
            return 0

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            now = time.perf_counter()
            self.samples.append((now, _status_kib("self", "VmRSS") * 1024))
            for pid in ray_processes_under(me):
                peak = _status_kib(pid, "VmHWM") * 1024
                if peak > self.worker_peak:
                    self.worker_peak, self.worker_pid = peak, pid
            if now - self._store_checked > 0.5:
                self._store_checked = now
                self.store_peak = max(self.store_peak, self._store_bytes())
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def size_overrides(classes: int, per_class: int, extra: list[str], as_is: bool = False) -> list[str]:
    if as_is:
        return list(extra)
    return [f"data.synthetic.n_classes={classes}", f"data.synthetic.n_groups={max(1, classes // 20)}",
            f"data.synthetic.train_per_class={per_class}", "data.synthetic.test_per_class=4", "train.epochs=3",
            "specialists.epochs=2", "specialists.patience=0", "specialists.budget=0", "peer.enabled=false",
            *extra]


def run_one(config: str, overrides: list[str], out: Path) -> dict:
    """One run in this process (the driver), measured; returns the figures."""
    from specialists.config import load_config
    from specialists.stages import run_pipeline

    cfg = load_config(config, overrides)
    monitor = Monitor()
    started = time.perf_counter()
    monitor.start()
    run = run_pipeline(cfg, out, log=lambda line: print(line, flush=True), progress=False)
    monitor.stop()
    metrics = run.read_metrics()
    timings = metrics["timings"]
    stages, at = {}, started
    for stage in STAGES:  # the stages ran in this order; each window is its recorded duration
        if stage in timings:
            window = [rss for t, rss in monitor.samples if at <= t <= at + timings[stage]]
            stages[stage] = {"seconds": timings[stage], "driver_peak_bytes": max(window, default=0)}
            at += timings[stage]
    ensemble = metrics.get("ensemble", {})
    return {
        "overrides": overrides,
        "classes": metrics["data"]["classes"], "train": metrics["data"]["train"], "test": metrics["data"]["test"],
        "stages": stages, "total_seconds": timings.get("total"),
        "driver_peak_bytes": _status_kib("self", "VmHWM") * 1024,
        "worker_peak_bytes": monitor.worker_peak, "store_peak_bytes": monitor.store_peak,
        "evaluate_examples_per_s": metrics["data"]["test"] / timings["evaluate"] if timings.get("evaluate") else None,
        "generalist_test_accuracy": metrics.get("generalist", {}).get("test_accuracy"),
        "test_accuracy": ensemble.get("test_accuracy"),
        "specialists": metrics.get("specialists", {}).get("count"),
        "planted_adjusted_rand": metrics.get("cluster", {}).get("planted_adjusted_rand"),
        "load_average": os.getloadavg(),  # of the machine: other jobs slow every stage down
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"C={r['classes']:,}  N: {r['train']:,} train / {r['test']:,} test  "
                     f"({r['specialists']} specialists)  total {r['total_seconds']:.1f}s")
        lines.append(f"  {'stage':<12} {'seconds':>9} {'driver peak':>12}")
        for stage, s in r["stages"].items():
            lines.append(f"  {stage:<12} {s['seconds']:>9.1f} {s['driver_peak_bytes'] / GiB:>10.2f} GiB")
        lines.append(f"  driver peak {r['driver_peak_bytes'] / GiB:.2f} GiB, largest worker "
                     f"{r['worker_peak_bytes'] / GiB:.2f} GiB, object store peak {r['store_peak_bytes'] / GiB:.2f} GiB")
        lines.append(f"  evaluation {_fmt(r['evaluate_examples_per_s'], ',.0f')} test examples/s; test accuracy "
                     f"generalist {_fmt(r['generalist_test_accuracy'], '.4f')}, + specialists "
                     f"{_fmt(r['test_accuracy'], '.4f')}; planted ARI {_fmt(r['planted_adjusted_rand'], '.3f')}; "
                     f"load average at the end {', '.join(f'{x:.1f}' for x in r['load_average'])}")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_scale: dict[int, list[dict]] = {}
    for r in results:
        by_scale.setdefault(r["train"] // r["classes"], []).append(r)
    styles = ["-", "--", ":", "-."]  # one per data size; one colour per quantity
    for (per_class, rows), style in zip(sorted(by_scale.items()), styles):
        rows = sorted(rows, key=lambda r: r["classes"])
        c = [r["classes"] for r in rows]
        label = f"{per_class} train/class"
        for key, name, colour in (("driver_peak_bytes", "driver", "C0"), ("worker_peak_bytes", "largest worker", "C1"),
                                  ("store_peak_bytes", "object store", "C2")):
            mem.plot(c, [r[key] / GiB for r in rows], "o" + style, color=colour, label=f"{name}, {label}")
        for stage, colour in zip(("generalist", "cluster", "specialists", "evaluate"), ("C0", "C1", "C2", "C3")):
            sec.plot(c, [r["stages"].get(stage, {}).get("seconds", 0) for r in rows], "o" + style, color=colour,
                     label=f"{stage}, {label}")
    mem.set(xscale="log", xlabel="classes C", ylabel="peak resident memory (GiB)", title="Memory")
    sec.set(xscale="log", yscale="log", xlabel="classes C", ylabel="seconds", title="Time per stage")
    mem.legend(fontsize=7)
    sec.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="*", default=[1000, 5000, 15000])
    parser.add_argument("--n-scale", type=int, nargs="+", default=[1], help="multiples of --per-class")
    parser.add_argument("--per-class", type=int, default=20, help="training examples per class at scale 1")
    parser.add_argument("--config", default="configs/synthetic.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--plot", type=Path, default=Path("bench_scale.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--as-is", action="store_true", help="run --config as it is: no size overrides, one run")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="figures (--json files) of earlier invocations to print and plot with this one's")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # one run, figures to this file
    args = parser.parse_args()

    if args.child is not None:
        out = args.child.parent / "run"
        result = run_one(args.config, size_overrides(args.classes[0], args.per_class, args.set, args.as_is), out)
        args.child.write_text(json.dumps(result))
        return

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    results = [r for path in args.merge for r in json.loads(path.read_text())]
    if results:
        print(_table(results), flush=True)
    sizes = [(0, 1)] if args.as_is else [(classes, scale) for scale in args.n_scale for classes in args.classes]
    if args.merge and not args.classes:
        sizes = []
    for classes, scale in sizes:
        folder = root / (Path(args.config).stem if args.as_is else f"C{classes}-x{scale}")
        folder.mkdir(parents=True, exist_ok=False)
        figures = folder / "figures.json"
        cmd = [sys.executable, "-m", "jobs.bench_scale", "--child", str(figures), "--classes", str(classes),
               "--per-class", str(args.per_class * scale), "--config", args.config, "--set", *args.set,
               *(["--as-is"] if args.as_is else [])]
        print(f"== {folder.name}: {folder}", flush=True)
        with open(folder / "log.txt", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        if done.returncode:
            print(f"   failed (exit {done.returncode}); see {folder / 'log.txt'}")
            continue
        results.append(json.loads(figures.read_text()))
        print(_table(results[-1:]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if results:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
