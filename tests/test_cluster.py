"""Covariance streaming and confusion clustering on planted structure (real faiss)."""

import json
import math

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from jobs.bench_cluster import make_confusable_probabilities  # the benchmark's planted input
from specialists import covariance
from specialists.cluster import ConfusionClusterer, InvalidParameterError, clusters_to_json
from specialists.covariance import CovarianceAccumulator, correlation_from_covariance, streamed_covariance
from specialists.report import within_between

N_CLASSES = 200
# 20 planted groups of 4 to 16 classes (sum 200).
SIZES = [10, 10, 13, 16, 4, 5, 14, 16, 7, 8, 15, 9, 7, 14, 7, 9, 12, 11, 5, 8]


def labels_of(groups, n_classes):
    """(C,) group index per class for a partition."""
    out = np.full(n_classes, -1)
    for g, members in enumerate(groups):
        out[members] = g
    return out


@pytest.fixture(scope="module")
def planted():
    # Zipf 1.5 over groups and within groups: the rarest groups are ~100x rarer
    # than the most frequent, which is what makes raw covariance collapse.
    probs, y, groups = make_confusable_probabilities(20_000, SIZES, zipf=1.5, seed=0)
    cov = np.cov(probs.astype(np.float64), rowvar=False, bias=True)
    return probs, y, groups, cov


@pytest.fixture(scope="module")
def fitted(planted):
    return ConfusionClusterer(n_clusters=len(SIZES), normalize="correlation", seed=0).fit(planted[3])


# ---------------------------------------------------------------- covariance


@pytest.mark.parametrize("batch_size", [1, 7, 256, 999])
def test_streamed_covariance_equals_numpy(planted, batch_size):
    probs = planted[0][: max(300, 20 * batch_size - 1)]  # the last batch is partial
    direct = np.cov(probs.astype(np.float64), rowvar=False, bias=True)
    batches = (probs[i : i + batch_size] for i in range(0, len(probs), batch_size))
    cov, mean, count = streamed_covariance(batches, N_CLASSES)
    assert count == len(probs)
    assert np.abs(cov - direct).max() <= 1e-5 * np.abs(direct).max()
    np.testing.assert_allclose(mean, probs.mean(axis=0, dtype=np.float64), rtol=1e-5)
    np.testing.assert_array_equal(cov, cov.T)


def test_streamed_covariance_torch_input_and_sorted_batches(planted):
    probs, y, _, direct = planted
    # Batches sorted by class have very different means: Chan's merge must cope.
    order = np.argsort(y, kind="stable")
    acc = CovarianceAccumulator(N_CLASSES)
    for i in range(0, len(order), 1_000):
        acc.update(torch.from_numpy(probs[order[i : i + 1_000]]))
    assert np.abs(acc.covariance() - direct).max() <= 1e-5 * np.abs(direct).max()


def test_streamed_covariance_survives_near_constant_class():
    # Class 0 sits at 0.99 +- 1e-4: E[pp^T] - E[p]E[p]^T in float32 loses every
    # digit (the variance, 1e-8, is below float32's rounding of E[p^2] ~ 0.98,
    # so it can even come out negative); centred batches do not.
    rng = np.random.default_rng(0)
    p0 = 0.99 + 1e-4 * rng.standard_normal(5_000)
    p1 = (1 - p0) * rng.uniform(0, 1, 5_000)
    probs = np.stack([p0, p1, 1 - p0 - p1], axis=1).astype(np.float32)
    direct = np.cov(probs.astype(np.float64), rowvar=False, bias=True)
    cov, _, _ = streamed_covariance(np.array_split(probs, 10), 3)
    np.testing.assert_allclose(cov, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())
    assert cov[0, 0] > 0


def test_blocked_promotion_and_release_equal_numpy(planted, monkeypatch):
    # Large C promotes and symmetrises M2 a few rows at a time; force blocks of 3 rows (and a short last one).
    probs, _, _, direct = planted
    monkeypatch.setattr(covariance, "BLOCK_ELEMENTS", 3 * N_CLASSES)
    assert N_CLASSES % 3
    cov, _, _ = streamed_covariance(np.array_split(probs, 7), N_CLASSES)
    assert np.abs(cov - direct).max() <= 1e-5 * np.abs(direct).max()
    np.testing.assert_array_equal(cov, cov.T)
    # release=True: the same matrix, made in the accumulator's own memory, which is then empty.
    acc = CovarianceAccumulator(N_CLASSES)
    for batch in np.array_split(probs, 7):
        acc.update(batch)
    np.testing.assert_array_equal(acc.covariance(release=True), cov)
    assert acc.count == 0
    with pytest.raises(ValueError, match="no rows"):
        acc.covariance()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_covariance_cuda_matches_cpu(planted):
    probs, _, _, direct = planted
    cov, _, _ = streamed_covariance(np.array_split(probs, 8), N_CLASSES, device="cuda")
    assert np.abs(cov - direct).max() <= 1e-4 * np.abs(direct).max()  # TF32 may be on


@pytest.mark.parametrize(
    "value, match",
    [
        (np.nan, r"batch 1, row 3 \(global row 8\), class 2: non-finite probability nan"),
        (np.inf, r"batch 1, row 3 \(global row 8\), class 2: non-finite probability inf"),
        (-0.25, r"batch 1, row 3 \(global row 8\), class 2: negative probability -0.25"),
        (0.75, r"batch 1, row 3 \(global row 8\): probabilities sum to 1.5"),
    ],
)
def test_bad_batch_is_rejected_with_its_position(value, match):
    good = np.full((5, 4), 0.25, dtype=np.float32)
    bad = good.copy()
    bad[3, 2] = value
    acc = CovarianceAccumulator(4).update(good)
    with pytest.raises(ValueError, match=match):
        acc.update(bad)


def test_batch_of_wrong_width_or_no_rows_is_rejected():
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError, match=r"batch 0 has shape \(5, 3\), expected \(B, 4\)"):
        acc.update(np.full((5, 3), 1 / 3))
    with pytest.raises(ValueError, match="no rows"):
        acc.covariance()


def test_correlation_from_covariance(planted):
    probs, _, _, cov = planted
    np.testing.assert_allclose(correlation_from_covariance(cov), np.corrcoef(probs.T.astype(np.float64)), atol=1e-10)
    # A class with constant probability correlates with nothing.
    corr = correlation_from_covariance(np.diag([1.0, 0.0, 4.0]))
    np.testing.assert_array_equal(corr, np.eye(3))
    # overwrite=True: the same matrix, written over the covariance it was given (no second (C, C) matrix).
    mine = cov.copy()
    corr = correlation_from_covariance(mine, overwrite=True)
    np.testing.assert_array_equal(corr, correlation_from_covariance(cov))
    assert np.shares_memory(corr, mine)


# ---------------------------------------------------------------- clustering


def test_recovers_planted_groups(planted, fitted):
    _, _, groups, _ = planted
    ari = adjusted_rand_score(labels_of(groups, N_CLASSES), fitted.assignment_)
    assert ari > 0.9
    assert fitted.uncovered_ == []
    assert sorted(c for g in fitted.groups_ for c in g) == list(range(N_CLASSES))
    assert all(g == sorted(g) for g in fitted.groups_)
    assert fitted.centroids_.shape[0] == len(fitted.groups_)


def test_classes_per_cluster_sets_k(planted):
    clusterer = ConfusionClusterer(classes_per_cluster=15, normalize="correlation", seed=0).fit(planted[3])
    assert clusterer.n_clusters_ == math.ceil(N_CLASSES / 15) == 14
    assert len(clusterer.groups_) <= 14


def test_raw_covariance_collapses_where_correlation_does_not(planted, fitted):
    # Rare classes have near-zero covariance columns, so raw K-means lumps them.
    # Measured over 24 planted datasets: 126-178 of 200 classes in one cluster.
    _, _, groups, cov = planted
    raw = ConfusionClusterer(n_clusters=len(SIZES), normalize="covariance", seed=0).fit(cov)
    truth = labels_of(groups, N_CLASSES)
    assert max(map(len, raw.groups_)) >= 100
    assert adjusted_rand_score(truth, raw.assignment_) < 0.3
    assert max(map(len, fitted.groups_)) <= max(SIZES) + 4


def test_l2_normalisation_recovers_planted_groups(planted):
    _, _, groups, cov = planted
    clusterer = ConfusionClusterer(n_clusters=len(SIZES), normalize="l2", seed=0).fit(cov)
    assert adjusted_rand_score(labels_of(groups, N_CLASSES), clusterer.assignment_) > 0.9


def test_same_seed_same_groups(planted, fitted):
    again = ConfusionClusterer(n_clusters=len(SIZES), normalize="correlation", seed=0).fit(planted[3])
    assert again.groups_ == fitted.groups_
    np.testing.assert_array_equal(again.assignment_, fitted.assignment_)
    np.testing.assert_array_equal(again.centroids_, fitted.centroids_)


def test_max_cluster_size_is_respected(planted):
    cov = planted[3]
    free = ConfusionClusterer(n_clusters=30, min_cluster_size=1, normalize="correlation", seed=0).fit(cov)
    assert max(map(len, free.groups_)) > 8  # planted groups of up to 16: the cap has work to do
    capped = ConfusionClusterer(n_clusters=30, max_cluster_size=8, min_cluster_size=1, normalize="correlation", seed=0).fit(cov)
    assert max(map(len, capped.groups_)) <= 8
    assert sorted(c for g in capped.groups_ for c in g) == list(range(N_CLASSES))  # still a partition


def test_overlap_only_within_ratio(planted, fitted):
    cov = planted[3]
    # Planted groups are far apart: the second-nearest centroid is 2.7x to 140x
    # farther than the nearest (5th percentile 7.7x), so only a wide ratio overlaps.
    ratio = 5.0
    clusterer = ConfusionClusterer(n_clusters=len(SIZES), overlap=2, overlap_ratio=ratio, normalize="correlation", seed=0).fit(cov)
    memberships = np.zeros(N_CLASSES, dtype=int)
    for group, dists in zip(clusterer.groups_, clusterer.member_distances_):
        memberships[group] += 1
        # Every membership is within ratio x the class's distance to its nearest centroid.
        assert np.all(dists <= ratio * clusterer.distances_[group] + 1e-6)
    assert memberships.max() == 2  # overlap=2: some class in two groups, none in three
    assert memberships.min() == 1
    np.testing.assert_array_equal(clusterer.assignment_, fitted.assignment_)  # primaries unchanged
    assert sum(map(len, fitted.groups_)) == N_CLASSES  # overlap=1: disjoint


def test_overlap_never_exceeds_max_cluster_size(planted):
    clusterer = ConfusionClusterer(
        n_clusters=30, overlap=3, overlap_ratio=10.0, max_cluster_size=9, min_cluster_size=1, normalize="correlation", seed=0
    ).fit(planted[3])
    assert max(map(len, clusterer.groups_)) <= 9
    assert sum(map(len, clusterer.groups_)) > N_CLASSES  # overlap happened


def test_isolated_class_is_uncovered_unless_singletons_allowed():
    # Planted group of one: a class the generalist confuses with nothing.
    probs, _, groups = make_confusable_probabilities(10_000, [6, 5, 1, 7, 4], zipf=1.0, seed=1)
    cov = np.cov(probs.astype(np.float64), rowvar=False, bias=True)
    (alone,) = next(g for g in groups if len(g) == 1)
    clusterer = ConfusionClusterer(n_clusters=5, normalize="correlation", seed=0).fit(cov)
    assert clusterer.uncovered_ == [alone]
    assert clusterer.assignment_[alone] == -1
    assert np.isnan(clusterer.distances_[alone])
    assert sorted(clusterer.groups_) == sorted(g for g in groups if len(g) > 1)
    kept = ConfusionClusterer(n_clusters=5, min_cluster_size=1, normalize="correlation", seed=0).fit(cov)
    assert kept.uncovered_ == [] and [alone] in kept.groups_


# ---------------------------------------------------------------- scikit-learn manners


@pytest.fixture(scope="module")
def isolated():
    """A covariance with planted groups plus one class confused with nothing."""
    probs, _, groups = make_confusable_probabilities(10_000, [6, 5, 1, 7, 4], zipf=1.0, seed=1)
    (alone,) = next(g for g in groups if len(g) == 1)
    return np.cov(probs.astype(np.float64), rowvar=False, bias=True), alone


def test_clone_gives_an_unfitted_estimator_with_equal_params(isolated):
    from sklearn.base import clone

    cov, _ = isolated
    est = ConfusionClusterer(n_clusters=5, overlap=2, overlap_ratio=10.0, normalize="correlation", seed=3).fit(cov)
    copy = clone(est)
    assert copy is not est and type(copy) is ConfusionClusterer
    assert copy.get_params(deep=False) == est.get_params(deep=True) == est.get_params()
    assert not any(hasattr(copy, name) for name in ("groups_", "labels_", "assignment_", "n_classes_"))
    np.testing.assert_array_equal(copy.fit_predict(cov), est.labels_)
    assert copy.groups_ == est.groups_


def test_fit_predict_labels_primary_groups_and_minus_one_for_uncovered(isolated):
    cov, alone = isolated
    settings = dict(n_clusters=5, overlap=2, overlap_ratio=10.0, normalize="correlation", seed=0)
    labels = ConfusionClusterer(**settings).fit_predict(cov)
    est = ConfusionClusterer(**settings).fit(cov)
    np.testing.assert_array_equal(labels, est.labels_)
    assert labels.shape == (est.n_classes_,) and labels[alone] == -1
    memberships = {c: [g for g, group in enumerate(est.groups_) if c in group] for c in range(est.n_classes_)}
    assert any(len(gs) > 1 for gs in memberships.values())  # the overlap case is exercised
    for c, gs in memberships.items():
        if not gs:
            assert labels[c] == -1
            continue
        # A class in several groups is labelled with its nearest (primary) one.
        dist = {g: est.member_distances_[g][est.groups_[g].index(c)] for g in gs}
        assert labels[c] in gs and dist[labels[c]] == min(dist.values())


def test_set_params_returns_self_and_refuses_unknown_keys(isolated):
    cov, _ = isolated
    est = ConfusionClusterer(n_clusters=5, normalize="correlation", seed=0)
    assert est.set_params(n_clusters=2, min_cluster_size=1) is est
    assert est.get_params()["n_clusters"] == 2 and est.get_params()["min_cluster_size"] == 1
    assert len(est.fit(cov).groups_) <= 2
    with pytest.raises(InvalidParameterError, match="'n_cluster'"):
        est.set_params(n_cluster=3)
    assert est.get_params()["n_clusters"] == 2  # nothing changed by a refused call
    with pytest.raises(ValueError, match="n_clusters=0"):
        est.set_params(n_clusters=0).fit(cov)  # values are checked by fit, as in scikit-learn


# ---------------------------------------------------------------- helpers


def test_planted_groups_are_tighter_within_than_between(planted, fitted):
    # the report's analysis of the clusterer's groups (hand-computed cases: test_report.py)
    wb = within_between(correlation_from_covariance(planted[3]), fitted.groups_)
    assert np.all(wb[:, 0] > wb[:, 1] + 0.1)


def test_clusters_to_json(planted, fitted):
    names = [f"class_{i}" for i in range(N_CLASSES)]
    out = json.loads(json.dumps(clusters_to_json(fitted, names)))
    assert out["n_classes"] == N_CLASSES and out["n_groups"] == len(fitted.groups_)
    assert out["settings"]["normalize"] == "correlation" and out["settings"]["n_clusters_used"] == 20
    first = out["groups"][0]
    assert first["classes"] == fitted.groups_[0]
    assert first["names"] == [names[c] for c in fitted.groups_[0]]
    assert first["size"] == len(first["distances"]) == len(first["classes"])
    assert out["uncovered"] == {"classes": [], "names": []}
    assert out["assignment"] == fitted.assignment_.tolist()
    with pytest.raises(ValueError, match="class_names has 3 names for n_classes=200"):
        clusters_to_json(fitted, names[:3])
    with pytest.raises(ValueError, match="not fitted"):
        clusters_to_json(ConfusionClusterer())


# ---------------------------------------------------------------- bad input

COV77 = np.eye(77)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"n_clusters": 90}, r"n_clusters=90 must be <= n_classes=77"),
        ({"n_clusters": 0}, r"n_clusters=0 must be an integer >= 1"),
        ({"n_clusters": 2.5}, r"n_clusters=2.5 must be an integer"),
        ({"classes_per_cluster": 0}, r"classes_per_cluster=0 must be"),
        ({"n_clusters": 5, "classes_per_cluster": 10}, r"n_clusters=5 or classes_per_cluster=10, not both"),
        ({"normalize": "cosine"}, r"normalize='cosine' must be one of"),
        ({"overlap": 0}, r"overlap=0 must be an integer >= 1"),
        ({"overlap_ratio": 0.5}, r"overlap_ratio=0.5 must be a number >= 1"),
        ({"n_clusters": 5, "max_cluster_size": 10}, r"max_cluster_size=10 \* n_clusters=5 < n_classes=77"),
        ({"min_cluster_size": 0}, r"min_cluster_size=0 must be"),
        (
            {"max_cluster_size": 3, "min_cluster_size": 4, "n_clusters": 30},
            r"max_cluster_size=3 must be >= min_cluster_size=4",
        ),
        ({"n_components": 0}, r"n_components=0 must be"),
        ({"niter": 0}, r"niter=0 must be"),
        ({"seed": -1}, r"seed=-1 must be an integer >= 0"),
        ({"use_gpu": "yes"}, r"use_gpu='yes' must be True, False or 'auto'"),
    ],
)
def test_bad_settings_raise_with_value(settings, match):
    # the one documented type for settings, which the cluster stage reports as a ConfigError
    with pytest.raises(InvalidParameterError, match=match):
        ConfusionClusterer(**settings).fit(COV77)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss sees a GPU")
def test_use_gpu_without_gpu_raises():
    with pytest.raises(ValueError, match="use_gpu=True but faiss sees 0 GPUs"):
        ConfusionClusterer(use_gpu=True).fit(COV77)


def _asymmetric():
    cov = np.eye(4)
    cov[0, 2] = 0.5
    return cov


def _nan():
    cov = np.eye(4)
    cov[1, 3] = cov[3, 1] = np.nan
    return cov


@pytest.mark.parametrize(
    "cov, match",
    [
        (np.ones((3, 4)), r"square \(C, C\) matrix, got shape \(3, 4\)"),
        (np.ones(4), r"got shape \(4,\)"),
        (_nan(), r"non-finite entry nan at \(1, 3\)"),
        (_asymmetric(), r"not symmetric: cov\[0, 2\]=0.5 but cov\[2, 0\]=0"),
    ],
)
def test_bad_covariance_raises_with_value(cov, match):
    with pytest.raises(ValueError, match=match) as err:
        ConfusionClusterer(n_clusters=2).fit(cov)
    assert not isinstance(err.value, InvalidParameterError)  # a broken generalist is no settings mistake
    with pytest.raises(ValueError, match=match):
        correlation_from_covariance(cov)


def test_bad_accumulator_settings():
    with pytest.raises(ValueError, match=r"n_classes=0 must be a positive integer"):
        CovarianceAccumulator(0)
    with pytest.raises(ValueError, match=r"matmul_dtype='float16'"):
        CovarianceAccumulator(3, matmul_dtype="float16")
