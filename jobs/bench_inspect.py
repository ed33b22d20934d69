"""`specialists inspect` on a logits file: time against the covariance alone, and peak memory against N.

    python -m jobs.bench_inspect [--n 100000] [--classes 1000] [--small-n 25000] [--dtype float32]

Writes an (N, C) logits .npy (a model that confuses classes within planted groups of
about sqrt(C)) and its labels into a temporary folder, then measures, each in a fresh
process so that one measurement's memory does not leak into the next:

    covariance  the (N, C) softmax probabilities already in memory, fed to
                CovarianceAccumulator in 4096-row batches: the O(N C^2) work any
                inspection must do, with no file, no checks, no report
    inspect     specialists.inspect(logits=FILE, labels=..., out=...): the file read in
                batches, checked, softmaxed, the covariance, the clusters, the report
                (HTML, Markdown, two PNGs) and clusters.json; imports excluded
    peak RSS    the process's peak resident memory (ru_maxrss) for `inspect` at N and at
                --small-n, beside the peak after the imports alone: the batch and the
                (C, C) matrices, not the file, should set it

On a shared machine the wall times move with other processes' load; the CPU seconds
are printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
args = json.loads(sys.argv[1])
import torch, specialists, specialists.inspection, specialists.stages  # every import before the clock starts
import specialists.report
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 1024
out = {"imports_peak_mb": usage()[1]}
cpu0, wall0 = usage()[0], time.perf_counter()
if args["task"] == "covariance":
    from specialists.covariance import CovarianceAccumulator
    z = np.load(args["logits"])
    probs = torch.softmax(torch.from_numpy(z.astype(np.float32)), 1)
    del z
    cpu0, wall0 = usage()[0], time.perf_counter()
    acc = CovarianceAccumulator(probs.shape[1])
    for s in range(0, len(probs), 4096):
        acc.update(probs[s:s + 4096])
    acc.covariance()
elif args["task"] == "inspect":
    result = specialists.inspect(logits=args["logits"], labels=args["labels"], out=args["out"])
    out["groups"] = result.clusters["n_groups"]
    out["errors_inside_clusters"] = result.clusters.get("errors_inside_clusters")
out["wall_s"] = time.perf_counter() - wall0
out["cpu_s"] = usage()[0] - cpu0
out["peak_mb"] = usage()[1]
print(json.dumps(out))
"""


def write_logits(path: Path, labels_path: Path, n: int, n_classes: int, dtype: str, seed: int = 0) -> None:
    """(n, C) logits written in chunks (never whole in memory), and (n,) labels."""
    rng = np.random.default_rng(seed)
    group = max(2, round(math.sqrt(n_classes)))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, n_classes))
    labels = rng.integers(0, n_classes, n)
    for s in range(0, n, 10_000):
        y = labels[s:s + 10_000]
        z = rng.standard_normal((len(y), n_classes), dtype=np.float32)
        start = (y // group) * group
        cols = np.minimum(start[:, None] + np.arange(group), n_classes - 1)
        z[np.arange(len(y))[:, None], cols] += 3.0
        z[np.arange(len(y)), y] += 1.5
        out[s:s + len(y)] = z
    out.flush()
    del out
    np.save(labels_path, labels)


def child(task: str, logits: Path, labels: Path, out: Path) -> dict:
    spec = json.dumps({"task": task, "logits": str(logits), "labels": str(labels), "out": str(out)})
    done = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{task} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--small-n", type=int, default=25_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=("float16", "float32"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for n in (args.n, args.small_n):
            files[n] = (tmp / f"logits_{n}.npy", tmp / f"labels_{n}.npy")
            write_logits(*files[n], n, args.classes, args.dtype)
        size_mb = files[args.n][0].stat().st_size / 2**20
        print(f"logits file: N={args.n}, C={args.classes}, {args.dtype}, {size_mb:.0f} MiB")

        cov = child("covariance", *files[args.n], tmp / "unused")
        full = child("inspect", *files[args.n], tmp / "report")
        small = child("inspect", *files[args.small_n], tmp / "report_small")
        print(f"covariance alone (probabilities in memory): {cov['wall_s']:.2f} s wall, {cov['cpu_s']:.2f} s CPU")
        print(f"specialists inspect (file -> report):       {full['wall_s']:.2f} s wall, {full['cpu_s']:.2f} s CPU; "
              f"{full['groups']} groups, {100 * full['errors_inside_clusters']:.1f}% of errors inside one")
        print(f"inspect / covariance: {full['wall_s'] / cov['wall_s']:.2f}x wall, "
              f"{full['cpu_s'] / cov['cpu_s']:.2f}x CPU (goal: within 2x)")
        print(f"peak RSS: imports alone {full['imports_peak_mb']:.0f} MiB; inspect at N={args.small_n}: "
              f"{small['peak_mb']:.0f} MiB, at N={args.n}: {full['peak_mb']:.0f} MiB "
              f"(the logits file alone is {size_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
