"""Compare confusability signals (cluster.signal, cluster.temperature) on a trained generalist.

    python -m jobs.bench_signals RUN_DIR [--n-clusters K] [--seeds 0 1 2] [--oof] [--json OUT]
    python -m jobs.bench_signals RUN_DIR --ensemble OUT_DIR --variant "cluster.signal=tempered cluster.temperature=4" ...

The second form is the end figure: for each variant, a fork of RUN_DIR (its generalist kept,
`stages.fork_run`) with the variant's overrides and peer.enabled=false is finished (new clusters,
specialists, evaluation), and this prints the ensemble's validation errors (the choice figure)
beside its test errors (reported only) and the cluster stage's shares. The variant "" is RUN_DIR's
own settings, re-evaluated without training when RUN_DIR has specialists.

RUN_DIR is any run directory with a generalist (e.g. `specialists run ... specialists.enabled=false`).
For each signal and T, the run's clusterer settings cut clusters (K-means seeds --seeds) and this prints
the fixable-error share (errors whose true and predicted class share a cluster):

    val     the choice figure. Signals that read validation rows are scored by 5-fold cross-validation
            over those rows (clusters from 4/5, errors of the other 1/5), so no error is scored by
            clusters that saw its row; other signals on every validation error.
    test    held out for every signal: reported, never used to choose.
    random  the expected share for random clusters of the same sizes.
    ari     against the planted groups (synthetic data).
    seconds the signal's cost as the cluster stage pays it (encoding and forward passes included;
            out_of_fold: its K trainings), fastest of 3.

`--oracle-sizes 20 29 40` adds a reference no signal can be expected to pass: K clusters of at most
that many classes cut from the test errors themselves, by a local search (moves and swaps of classes,
from --oracle-starts random starts) that maximises the share of those errors inside a cluster. It reads
the test errors, so it chooses nothing: it bounds what any signal read elsewhere could hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
import torch

from jobs.arguments import at_least
from specialists.cli import exit_status
from specialists.cluster import ConfusionClusterer
from specialists.covariance import correlation_from_covariance
from specialists.config import load_config
from specialists.data import load_dataset
from specialists.models import load_checkpoint
from specialists.report import error_share_inside, random_share
from specialists.rundir import RunDir
from specialists.signals import (confusability, confusion_similarity, fold_of_rows, head_similarity,
                                 iter_out_of_fold_logits, model_logits, tempered_covariance)
from specialists.train import predict_logits

TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
VAL_OR_TRAIN_SIGNALS = ("probs", "tempered", "train_tempered", "confusion", "head")  # out_of_fold has --oof


def clusterer(cfg, k, seed):
    c = cfg.cluster
    return ConfusionClusterer(n_clusters=k or c.n_clusters or None,
                              classes_per_cluster=None if (k or c.n_clusters) else c.classes_per_cluster,
                              max_cluster_size=c.max_cluster_size or None, min_cluster_size=c.min_cluster_size,
                              overlap=c.overlap, overlap_ratio=c.overlap_ratio, normalize=c.normalize,
                              niter=c.niter, nredo=c.nredo, seed=seed)


def pairs_of(logits, labels, rows=None):
    pred = logits.argmax(1)
    rows = np.arange(len(labels)) if rows is None else rows
    wrong = rows[pred[rows] != labels[rows]]
    return np.stack([labels[wrong], pred[wrong]], 1)


def oracle_partition(error_pairs: np.ndarray, n_classes: int, k: int, max_size: int, *, starts: int = 20,
                     seed: int = 0) -> np.ndarray:
    """Cluster of each class: the best of `starts` local searches for k clusters of at most `max_size` classes
    holding as many of `error_pairs` ((E, 2) true, predicted) inside one cluster as they can.

    From a random balanced start, each step makes the best move of one class to another cluster (one with
    room, leaving none empty) or swap of two classes, until none gains. A heuristic: the best partition it
    finds, not a proven optimum.
    """
    if not 1 <= k <= n_classes or max_size * k < n_classes:
        raise ValueError(f"{k} clusters of at most {max_size} classes cannot hold {n_classes} classes")
    weights = np.zeros((n_classes, n_classes))
    np.add.at(weights, (error_pairs[:, 0], error_pairs[:, 1]), 1.0)
    weights += weights.T
    np.fill_diagonal(weights, 0.0)
    rng = np.random.default_rng(seed)
    best, best_inside = None, -1.0
    for _ in range(starts):
        cluster = rng.permutation(np.arange(n_classes) % k)
        while True:
            to = weights @ np.eye(k)[cluster]  # (C, k): each class's errors shared with each cluster
            own = to[np.arange(n_classes), cluster]
            sizes = np.bincount(cluster, minlength=k)
            allowed = (sizes < max_size)[None, :] & (sizes[cluster] > 1)[:, None]  # room there; none left empty
            moves = np.where(allowed & (np.arange(k)[None, :] != cluster[:, None]), to - own[:, None], -np.inf)
            toward = to[:, cluster] - own[:, None]  # [c, d]: class c's gain from joining d's cluster
            swaps = np.where(cluster[:, None] != cluster[None, :], toward + toward.T - 2 * weights, -np.inf)
            move, swap = np.unravel_index(moves.argmax(), moves.shape), np.unravel_index(swaps.argmax(), swaps.shape)
            if max(moves[move], swaps[swap]) <= 1e-9:
                break
            if moves[move] >= swaps[swap]:
                cluster[move[0]] = move[1]
            else:
                cluster[[swap[0], swap[1]]] = cluster[[swap[1], swap[0]]]
        inside = weights[cluster[:, None] == cluster[None, :]].sum()
        if inside > best_inside:
            best, best_inside = cluster.copy(), inside
    return best


def matrix_of(signal, t, logits, labels, model, n_classes):
    if "+" in signal:  # a mix: the mean of the parts' correlation matrices
        return sum(correlation_from_covariance(matrix_of(part, t, logits, labels, model, n_classes))
                   for part in signal.split("+")) / len(signal.split("+"))
    if signal == "head":
        return head_similarity(model)
    batches = torch.from_numpy(logits).split(4096)
    if signal == "confusion":
        return confusion_similarity(batches, labels, n_classes, t)
    return tempered_covariance(batches, n_classes, t)


def ensemble(base: str, out_dir: str, variants: list[str], json_out: str = "") -> None:
    """The ensemble's validation and test errors for each variant of `base`'s settings."""
    from pathlib import Path

    from specialists.ensemble import SpecialistsModel
    from specialists.stages import fork_run, run_pipeline

    rows = []
    for i, variant in enumerate(variants):
        overrides = variant.split()
        if overrides and "ensemble" in RunDir(Path(out_dir) / f"v{i}").read_metrics():  # done before: reused
            run = RunDir(Path(out_dir) / f"v{i}")
        elif overrides:
            run = fork_run(base, Path(out_dir) / f"v{i}", [*overrides, "peer.enabled=false"])
            run_pipeline(None, run.root, resume=True, log=lambda line: None, progress=False)
        else:
            run = RunDir(base)
        cfg = load_config(run.config)
        dataset = load_dataset(cfg.data, cfg.seed)
        model = SpecialistsModel(run.root, "cpu")
        errors = {s: int((model.predict_proba(getattr(dataset, s).inputs).argmax(1) != getattr(dataset, s).labels).sum())
                  for s in ("val", "test")}
        metrics = run.read_metrics()
        c = metrics["cluster"]
        row = {"variant": variant or "(base)", "val_errors": errors["val"], "test_errors": errors["test"],
               "generalist_val_errors": round((1 - metrics["generalist"]["val_accuracy"]) * len(dataset.val)),
               "generalist_test_errors": metrics["generalist"]["test_errors"],
               "val_share": c.get("val_errors_inside_clusters"), "heldout_share": c.get("heldout_errors_inside_clusters"),
               "random_share": c.get("random_errors_inside_clusters"), "ari": c.get("planted_adjusted_rand"),
               "cluster_seconds": metrics["timings"]["cluster"], "groups": c["groups"]}
        rows.append(row)
        held = "-" if row["heldout_share"] is None else f"{row['heldout_share']:.1%}"
        print(f"{row['variant']:<60} val errors {row['val_errors']:>5} (generalist {row['generalist_val_errors']}) "
              f"test errors {row['test_errors']:>5} (generalist {row['generalist_test_errors']}) "
              f"shares val {row['val_share']:.1%} held-out {held} | cluster {row['cluster_seconds']:.2f}s", flush=True)
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(rows, handle, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--n-clusters", type=at_least(0), default=0, help="0: the run's cluster settings")
    parser.add_argument("--seeds", type=at_least(0), nargs="+", default=[0, 1, 2])
    parser.add_argument("--signals", nargs="+", choices=VAL_OR_TRAIN_SIGNALS, default=list(VAL_OR_TRAIN_SIGNALS),
                        help="out_of_fold: --oof")
    parser.add_argument("--temperatures", type=at_least(0.0, float, strict=True), nargs="+",
                        default=list(TEMPERATURES))
    parser.add_argument("--oof", action="store_true", help="also out_of_fold (trains cluster.folds generalists)")
    parser.add_argument("--json", default="")
    parser.add_argument("--ensemble", default="", help="fork RUN_DIR per --variant into this folder")
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides")
    parser.add_argument("--oracle-sizes", type=at_least(1), nargs="*", default=[],
                        help="also cut clusters of at most these many classes from the test errors themselves")
    parser.add_argument("--oracle-starts", type=at_least(1), default=20, help="random starts of each oracle search")
    args = parser.parse_args(argv)
    if args.ensemble:
        ensemble(args.run_dir, args.ensemble, args.variant, args.json)
        return

    run = RunDir(args.run_dir)
    cfg = load_config(run.config)
    dataset = load_dataset(cfg.data, cfg.seed)
    device = torch.device("cpu")
    model = load_checkpoint(run.generalist, device)
    C = dataset.n_classes
    logits = {s: predict_logits(model, model.encode(getattr(dataset, s).inputs), 4096, device)
              for s in ("train", "val", "test")}
    labels = {s: getattr(dataset, s).labels for s in ("train", "val", "test")}
    val_pairs, test_pairs = pairs_of(logits["val"], labels["val"]), pairs_of(logits["test"], labels["test"])
    val_fold = fold_of_rows(labels["val"], 5, seed=0)
    planted = None
    if dataset.planted_groups is not None:
        from sklearn.metrics import adjusted_rand_score

        planted = np.empty(C, np.int64)
        for g, members in enumerate(dataset.planted_groups):
            planted[members] = g
    print(f"{run.root}: {dataset.name}, C={C}, val errors {len(val_pairs)}, test errors {len(test_pairs)}, "
          f"k={args.n_clusters or 'from config'}, seeds {args.seeds}", flush=True)

    oof_logits = None
    if args.oof:
        started = time.perf_counter()
        oof_logits = np.empty_like(logits["train"])
        for rows, z, _ in iter_out_of_fold_logits(cfg, dataset, device, cfg.cluster.folds, seed=cfg.seed):
            oof_logits[rows] = z.numpy()
        oof_seconds = time.perf_counter() - started
        print(f"out_of_fold: {cfg.cluster.folds} fold models in {oof_seconds:.1f}s", flush=True)

    def cost(signal, t):
        if signal in ("out_of_fold", "oof_confusion"):
            return oof_seconds
        if "+" in signal:
            return float("nan")
        c = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, signal=signal, temperature=t))
        rows = "train" if signal == "train_tempered" else "val"
        best = np.inf
        for _ in range(3):
            started = time.perf_counter()
            confusability(c, model, device, logits=model_logits(model, getattr(dataset, rows).inputs, 4096, device),
                          labels=labels[rows])
            best = min(best, time.perf_counter() - started)
        return best

    candidates = []
    for signal in args.signals + (["out_of_fold", "oof_confusion"] if args.oof else []):
        temps = [1.0] if signal in ("probs", "head") else args.temperatures
        candidates += [(signal, t) for t in temps]

    results = []
    print(f"{'signal':<15}{'T':>5} {'val':>7} {'test':>7} {'random':>7} {'ari':>6} {'sizes':>9} {'seconds':>8}")
    for signal, t in candidates:
        src = {"train_tempered": "train", "out_of_fold": "train", "oof_confusion": "train"}.get(signal, "val")
        z = oof_logits if signal in ("out_of_fold", "oof_confusion") else logits[src]
        kind = "confusion" if signal == "oof_confusion" else signal
        val_inside = test_inside = 0
        aris, randoms, sizes = [], [], []
        for seed in args.seeds:
            if src == "val" and signal != "head":  # cross-validated over validation rows
                for f in range(5):
                    fit = np.flatnonzero(val_fold != f)
                    m = matrix_of(kind, t, z[fit], labels["val"][fit], model, C)
                    groups = clusterer(cfg, args.n_clusters, seed).fit(m).groups_
                    val_inside += error_share_inside(pairs_of(z, labels["val"], np.flatnonzero(val_fold == f)),
                                                     groups)[0]
            full = clusterer(cfg, args.n_clusters, seed).fit(matrix_of(kind, t, z, labels[src], model, C))
            if not (src == "val" and signal != "head"):
                val_inside += error_share_inside(val_pairs, full.groups_)[0]
            test_inside += error_share_inside(test_pairs, full.groups_)[0]
            randoms.append(random_share(full.groups_, C))
            sizes += [len(g) for g in full.groups_]
            if planted is not None:
                aris.append(adjusted_rand_score(planted, full.assignment_))
        n = len(args.seeds)
        row = {"signal": signal, "T": t, "val_share": val_inside / (n * len(val_pairs)),
               "test_share": test_inside / (n * len(test_pairs)), "random_share": float(np.mean(randoms)),
               "ari": float(np.mean(aris)) if aris else None, "min_size": min(sizes), "max_size": max(sizes),
               "seconds": cost(signal, t)}
        results.append(row)
        ari = f"{row['ari']:.3f}" if aris else "-"
        print(f"{signal:<15}{t:>5g} {row['val_share']:>7.1%} {row['test_share']:>7.1%} {row['random_share']:>7.1%} "
              f"{ari:>6} {row['min_size']:>4}-{row['max_size']:<4} {row['seconds']:>8.3f}", flush=True)
    oracles = []
    if args.oracle_sizes:
        k = args.n_clusters or len(clusterer(cfg, 0, args.seeds[0]).fit(
            matrix_of("probs", 1.0, logits["val"], labels["val"], model, C)).groups_)
        print(f"oracle: {k} clusters cut from the {len(test_pairs)} test errors themselves "
              f"({args.oracle_starts} starts)")
        for size in args.oracle_sizes:
            try:
                cluster = oracle_partition(test_pairs, C, k, size, starts=args.oracle_starts, seed=args.seeds[0])
            except ValueError as err:
                parser.error(f"--oracle-sizes {size}: {err}")
            groups = [np.flatnonzero(cluster == g).tolist() for g in range(k)]
            row = {"max_size": size, "test_share": error_share_inside(test_pairs, groups)[2],
                   "random_share": random_share(groups, C), "sizes": sorted(len(g) for g in groups)}
            oracles.append(row)
            print(f"  at most {size} classes a cluster: {row['test_share']:.1%} of the test errors inside "
                  f"(random {row['random_share']:.1%}), sizes {row['sizes']}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"run": str(run.root), "val_errors": len(val_pairs), "test_errors": len(test_pairs),
                       "results": results, "oracle": oracles}, handle, indent=1)


if __name__ == "__main__":
    sys.exit(exit_status(main))
