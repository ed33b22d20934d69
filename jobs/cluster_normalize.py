"""Which `normalize` and projection recover planted groups: adjusted Rand index on simulated generalists.

    python -m jobs.cluster_normalize [--seeds 4] [--n 5000 20000] [--zipf 1 1.5 2]

Simulated generalist outputs with planted groups of confusable classes
(`jobs.bench_cluster.make_confusable_probabilities`: C=200 in 20 groups of
4-16 classes, Zipf-skewed group and class frequencies), their covariance, and
ConfusionClusterer(n_clusters=20) with each normalisation, with the default
projection onto the top-k singular directions and without it (n_components=C),
two K-means seeds each. Prints the mean and worst ARI against the planted
groups over every data set and seed, and the largest cluster's size.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from sklearn.metrics import adjusted_rand_score

from jobs.bench_cluster import make_confusable_probabilities
from specialists.choices import NORMALIZATIONS
from specialists.cluster import ConfusionClusterer
from specialists.covariance import streamed_covariance

SIZES = [10, 10, 13, 16, 4, 5, 14, 16, 7, 8, 15, 9, 7, 14, 7, 9, 12, 11, 5, 8]  # 20 groups, C = 200


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4, help="data sets per (zipf, n)")
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 20000], help="rows")
    parser.add_argument("--zipf", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--kmeans-seeds", type=int, default=2)
    args = parser.parse_args(argv)
    n_classes = sum(SIZES)
    variants = {(normalize, projected): [] for normalize in NORMALIZATIONS for projected in (True, False)}
    largest = {key: 0 for key in variants}
    for zipf, n, data_seed in itertools.product(args.zipf, args.n, range(args.seeds)):
        probs, _, groups = make_confusable_probabilities(n, SIZES, zipf=zipf, seed=data_seed)
        truth = np.empty(n_classes, dtype=np.int64)
        for g, members in enumerate(groups):
            truth[members] = g
        cov, _, _ = streamed_covariance([probs], n_classes)
        for (normalize, projected), seed in itertools.product(variants, range(args.kmeans_seeds)):
            clusterer = ConfusionClusterer(len(SIZES), normalize=normalize, seed=seed, use_gpu=False,
                                           n_components=None if projected else n_classes).fit(cov)
            variants[normalize, projected].append(adjusted_rand_score(truth, clusterer.assignment_))
            largest[normalize, projected] = max(largest[normalize, projected], max(map(len, clusterer.groups_)))
    runs = len(args.zipf) * len(args.n) * args.seeds * args.kmeans_seeds
    print(f"C={n_classes} in {len(SIZES)} groups, k={len(SIZES)}, zipf {args.zipf}, n {args.n}, "
          f"{args.seeds} data seeds x {args.kmeans_seeds} k-means seeds = {runs} fits per variant")
    print(f"{'normalize':<12} {'projection':<11} {'mean ARI':>9} {'worst ARI':>10} {'largest cluster':>16}")
    for (normalize, projected), scores in variants.items():
        print(f"{normalize:<12} {'top-k' if projected else 'none':<11} {np.mean(scores):9.3f} {np.min(scores):10.3f} "
              f"{largest[normalize, projected]:16d}")


if __name__ == "__main__":
    main()
