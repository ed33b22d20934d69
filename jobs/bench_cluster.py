"""Time the streamed covariance and the clustering against a matmul floor.

    python -m jobs.bench_cluster [--classes 1000 5000 15000] [--n 50000] [--device cpu|cuda]
                                 [--signal probs|tempered --temperature T]

For each C: synthetic probabilities with planted groups of about sqrt(C)
classes (``make_confusable_probabilities``), then, on the same (N, C) float32
data and device:

    floor      one torch.matmul(P.T, P): the least any covariance can cost
    covariance the cluster stage's signal (``signals.tempered_covariance``, T = 1 for
               ``probs``) fed their logits log P in --batch-size rows: softmax(z / T)
               per batch into a validated CovarianceAccumulator
    clustering ConfusionClusterer(n_clusters=#planted groups).fit(cov)

and prints wall and CPU seconds per stage (fastest of --repeat runs, stages
interleaved), (covariance + clustering) / floor, the extra
peak memory of each stage (CPU: resident set sampled every 5 ms above the
stage's start; CUDA: torch.cuda.max_memory_allocated), and the adjusted Rand
index of the recovered groups as a sanity check. On a shared machine the wall
times move with other processes' load (the floor's GFLOP/s shows how much);
the CPU-time ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from specialists.cluster import ConfusionClusterer
from specialists.signals import tempered_covariance


class PeakRSS:
    """Peak resident memory above the level at entry, sampled in a thread (Linux)."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.extra = self.peak - self.start


def cpu_seconds():
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stage(device, fn):
    """(wall seconds, CPU seconds, result, extra peak bytes) of fn() on device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t, math.nan, out, torch.cuda.max_memory_allocated(device) - base
    with PeakRSS() as mem:
        t, c = time.perf_counter(), cpu_seconds()
        out = fn()
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    return wall, cpu, out, mem.extra


def make_confusable_probabilities(
    n_samples: int,
    group_sizes: Sequence[int],
    *,
    zipf: float = 1.0,
    confusion: float = 3.0,
    margin: float = 2.0,
    noise: float = 1.0,
    seed: int = 0,
    batch_size: int = 8192,
) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Synthetic generalist outputs that confuse classes within planted groups (also the tests' input).

    Classes are shuffled into groups of the given sizes. Group frequencies
    follow Zipf's law with exponent ``zipf`` (rank r gets weight r^-zipf), and
    so do class frequencies within a group, so some groups are rare. A row for
    true class y is softmax(noise * N(0, 1) + confusion * [class in y's group]
    + margin * [class == y]).

    Returns ``(probs, labels, groups)``: (N, C) float32 rows summing to 1,
    (N,) int64 true classes, the planted groups as sorted lists of classes.
    """
    sizes = [int(s) for s in group_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"group_sizes={list(group_sizes)!r} must be non-empty and positive")
    rng = np.random.default_rng(seed)
    n_classes = sum(sizes)
    perm = rng.permutation(n_classes)
    groups, group_of = [], np.empty(n_classes, dtype=np.int64)
    start = 0
    for g, s in enumerate(sizes):
        members = perm[start : start + s]
        groups.append(sorted(members.tolist()))
        group_of[members] = g
        start += s
    group_w = rng.permutation(np.arange(1, len(sizes) + 1, dtype=np.float64) ** -zipf)
    freq = np.empty(n_classes)
    for g, members in enumerate(groups):
        w = rng.permutation(np.arange(1, len(members) + 1, dtype=np.float64) ** -zipf)
        freq[members] = group_w[g] * w / w.sum()
    freq /= freq.sum()
    labels = rng.choice(n_classes, size=n_samples, p=freq)

    probs = np.empty((n_samples, n_classes), dtype=np.float32)
    for lo in range(0, n_samples, batch_size):
        y = labels[lo : lo + batch_size]
        z = rng.standard_normal((len(y), n_classes), dtype=np.float32)
        z *= noise
        z += np.float32(confusion) * (group_of[None, :] == group_of[y][:, None])  # stays float32
        z[np.arange(len(y)), y] += margin
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        probs[lo : lo + len(y)] = z
    return probs, labels, groups


def planted_sizes(n_classes, seed):
    """About sqrt(C) groups of 0.5x to 1.5x sqrt(C) classes, summing to C."""
    rng = np.random.default_rng(seed)
    n_groups = max(1, round(math.sqrt(n_classes)))
    raw = rng.uniform(0.5, 1.5, n_groups)
    sizes = np.maximum(2, np.floor(raw / raw.sum() * n_classes)).astype(int)
    sizes[np.argmax(sizes)] += n_classes - sizes.sum()
    return sizes.tolist()


def run(n_classes, n_rows, device, batch_size, seed, repeat, temperature=1.0):
    gib = 2.0**30
    t = time.perf_counter()
    sizes = planted_sizes(n_classes, seed)
    probs, _, groups = make_confusable_probabilities(n_rows, sizes, seed=seed)
    gen_s = time.perf_counter() - t
    p = torch.from_numpy(probs).to(device)  # (N, C) float32
    z = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))  # (N, C) logits of these probabilities
    del probs
    torch.matmul(p[:256].T, p[:256])  # warm up BLAS / cuBLAS

    def covariance():
        return tempered_covariance(z.split(batch_size), n_classes, temperature, device)

    use_gpu = "auto" if device.type == "cuda" else False
    clusterer = ConfusionClusterer(len(sizes), seed=seed, use_gpu=use_gpu)
    # Repeats alternate the stages and keep each one's fastest run, so a burst
    # of load from other processes does not land on one stage only.
    best = {name: [math.inf, math.inf, 0] for name in ("floor", "covariance", "clustering")}

    def keep(name, wall, cpu, mem):
        b = best[name]
        b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), max(b[2], mem)

    for _ in range(repeat):
        wall, cpu, prod, mem = stage(device, lambda: torch.matmul(p.T, p))  # (C, C)
        keep("floor", wall, cpu, mem)
        del prod
        wall, cpu, cov, mem = stage(device, covariance)
        keep("covariance", wall, cpu, mem)
        wall, cpu, _, mem = stage(device, lambda: clusterer.fit(cov))
        keep("clustering", wall, cpu, mem)
        cov = None  # free it before the next repeat's product

    truth = np.empty(n_classes, dtype=np.int64)
    for g, members in enumerate(groups):
        truth[members] = g
    ari = adjusted_rand_score(truth, clusterer.assignment_)
    (floor_s, floor_cpu, _), (cov_s, cov_cpu, _), (clu_s, clu_cpu, _) = best.values()
    gflops = 2.0 * n_rows * n_classes**2 / floor_s / 1e9
    print(f"C={n_classes} N={n_rows} k={len(sizes)}: generated in {gen_s:.1f}s; floor ran at {gflops:.0f} GFLOP/s")
    for name, (wall, cpu, mem) in best.items():
        print(f"  {name:<11} {wall:8.2f}s wall {cpu:8.2f}s cpu  +{mem / gib:5.2f} GiB peak")
    print(
        f"  (covariance + clustering) / floor: {(cov_s + clu_s) / floor_s:.2f} wall, "
        f"{(cov_cpu + clu_cpu) / floor_cpu:.2f} cpu | ARI {ari:.3f} vs planted, "
        f"{len(clusterer.groups_)} groups, {len(clusterer.uncovered_)} uncovered",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 5000, 15000])
    parser.add_argument("--n", type=int, nargs="+", default=[50000],
                        help="rows; one value for all C, or one per C")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage; the fastest is reported")
    parser.add_argument("--signal", default="probs", choices=["probs", "tempered"], help="cluster.signal")
    parser.add_argument("--temperature", type=float, default=2.0, help="T of the tempered signal")
    args = parser.parse_args(argv)
    if len(args.n) not in (1, len(args.classes)):
        parser.error(f"--n takes 1 or {len(args.classes)} values, got {len(args.n)}")
    rows = args.n * len(args.classes) if len(args.n) == 1 else args.n
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={args.batch_size} repeat={args.repeat} load average={load:.1f} signal={args.signal}"
        + (f" T={args.temperature:g}" if args.signal == "tempered" else "")
    )
    for n_classes, n_rows in zip(args.classes, rows):
        run(n_classes, n_rows, device, args.batch_size, args.seed, args.repeat,
            args.temperature if args.signal == "tempered" else 1.0)


if __name__ == "__main__":
    main()
