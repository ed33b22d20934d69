"""Benchmark the combination solvers: fast exact (`solve_rows`) vs reference (gradient descent).

    python -m jobs.bench_combine [--device cpu|cuda] [--n N] [--ref-n R] [--dtype float64|float32] [--threads T]

Two sizes: C=2,000 with 20 specialists x 100 classes, and C=15,000 (JFT) with
61 specialists x 300 classes (overlapping). Generalist probabilities are
peaked softmaxes, specialists are active for the generalist's top-1 class.
The fast solver runs on N examples; the reference on the first R of them;
the objective gap J(reference) - J(fast) is measured on those R (>= 0: the
reference is no better than the fast solver, so the speedup is a lower bound
on the speedup at equal objective). --ref-n 0 times the fast solver only.
"""

from __future__ import annotations

import argparse
import time

import torch

from specialists.combine import active_specialists, objective, solve_reference, solve_rows

SIZES = [(2_000, 20, 100), (15_000, 61, 300)]  # (C, M, k)


def make_inputs(n, n_classes, n_specialists, k, device, dtype, seed):
    """Random problem: (N, C) generalist, class sets, and each specialist's rows and outputs."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    truth = torch.randint(n_classes, (n,), generator=gen)
    logits = 2 * torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
    logits[torch.arange(n), truth] += 5 + 7 * torch.rand(n, generator=gen, dtype=torch.float64)
    general = torch.softmax(logits, dim=1)
    # clusters: a partition of the classes, each grown to k with random other classes
    chunks = torch.randperm(n_classes, generator=gen).chunk(n_specialists)
    classes = []
    for chunk in chunks:
        others = torch.ones(n_classes, dtype=torch.bool)
        others[chunk] = False
        extra = others.nonzero().squeeze(1)[torch.randperm(int(others.sum()), generator=gen)[: k - len(chunk)]]
        classes.append(torch.cat([chunk, extra])[:k])
    active = active_specialists(general, classes, top_n=1)
    rows, probs = [], []
    for m, c in enumerate(classes):
        r = active[:, m].nonzero().squeeze(1)
        out = 2 * torch.randn(len(r), k + 1, generator=gen, dtype=torch.float64)
        position = torch.full((n_classes,), k, dtype=torch.long)  # the dustbin for other classes
        position[c] = torch.arange(k)
        out[torch.arange(len(r)), position[truth[r]]] += 4
        rows.append(r.to(device))
        probs.append(torch.softmax(out, dim=1).to(device, dtype))
    classes = [c.to(device) for c in classes]
    return general.to(device, dtype), classes, rows, probs, active.to(device)


def dense(rows, probs, classes, n, device, dtype):
    """Rows-format specialist outputs -> (n, k_m + 1) each, first n examples; inactive rows uniform."""
    out = []
    for r, p, c in zip(rows, probs, classes):
        full = torch.full((n, len(c) + 1), 1.0 / (len(c) + 1), device=device, dtype=dtype)
        keep = r < n
        full[r[keep]] = p[keep]
        out.append(full)
    return out


def timed(fn, device, repeat=1):
    """Best wall time of fn() over repeat calls, and its last result."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=2000, help="examples for the fast solver")
    parser.add_argument("--ref-n", type=int, default=2, help="examples for the reference solver")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="0,1", help="which of the two sizes, comma separated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} N={args.n} ref N={args.ref_n}")
    for size in (int(s) for s in args.sizes.split(",")):
        n_classes, n_specialists, k = SIZES[size]
        general, classes, rows, probs, active = make_inputs(
            args.n, n_classes, n_specialists, k, device, dtype, args.seed)
        n_active = active.sum(1)
        print(f"\nC={n_classes} M={n_specialists} k={k}: active specialists per example "
              f"0/1/2/3+: {[int((n_active == j).sum()) for j in range(3)] + [int((n_active >= 3).sum())]}")

        timed(lambda: solve_rows(general[: min(64, args.n)], [p[r < 64] for r, p in zip(rows, probs)],
                                 classes, [r[r < 64] for r in rows]), device)  # warm up
        t_fast, q = timed(lambda: solve_rows(general, probs, classes, rows), device, repeat=3)

        rate_fast = args.n / t_fast
        print(f"  fast      {rate_fast:12.1f} examples/s  ({t_fast:.3f} s for {args.n})")
        print(f"  rows of q sum to 1 within {(q.double().sum(1) - 1).abs().max().item():.1e}")
        n_ref = min(args.ref_n, args.n)
        if n_ref == 0:
            continue
        ref_probs = dense(rows, probs, classes, n_ref, device, dtype)
        ref_args = (general[:n_ref], ref_probs, classes, active[:n_ref])
        t_ref, q_ref = timed(lambda: solve_reference(*ref_args), device)
        gap = objective(q_ref, *ref_args) - objective(q[:n_ref], *ref_args)
        rate_ref = n_ref / t_ref
        print(f"  reference {rate_ref:12.3f} examples/s  ({t_ref:.1f} s for {n_ref})")
        print(f"  J(reference) - J(fast): min {gap.min().item():.2e} max {gap.max().item():.2e}; "
              f"speedup {rate_fast / rate_ref:.0f}x")


if __name__ == "__main__":
    main()
