"""Confusability signals (cluster.signal): tempered covariance, head cosine, soft confusion,
out-of-fold predictions, and which rows are held out for an honest score."""

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import tiny_config
from specialists.config import ConfigError, load_config
from specialists.data import Dataset, Split, load_dataset
from specialists.generalist import fit_generalist
from specialists.models import load_checkpoint, save_checkpoint
from specialists.report import error_share_inside, random_share
from specialists.rundir import RunDir, read_json
from specialists.signals import (
    cluster_rows,
    confusability,
    confusion_similarity,
    fold_of_rows,
    head_similarity,
    heldout_split,
    iter_out_of_fold_logits,
    model_logits,
    tempered_covariance,
)
from specialists.stages import recluster, run_pipeline
from specialists.train import predict_logits


@pytest.fixture(scope="module")
def tiny():
    """A real generalist on 40 classes in 4 planted groups, its data and its checkpoint folder."""
    cfg = tiny_config()
    dataset = load_dataset(cfg.data, cfg.seed)
    model, _ = fit_generalist(cfg, dataset, torch.device("cpu"), seed=0, progress=False)
    return cfg, dataset, model


def softmax64(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def with_signal(cfg, **cluster):
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


# ---------------------------------------------------------------------------
# tempered covariance and soft confusion


def test_tempered_covariance_at_t1_is_the_probability_covariance(tiny):
    cfg, dataset, model = tiny
    z = predict_logits(model, model.encode(dataset.val.inputs))  # (N, C)
    direct = np.cov(softmax64(z), rowvar=False, bias=True)  # today's signal, in float64
    probs, _ = confusability(with_signal(cfg, signal="probs"), model, "cpu",
                             logits=model_logits(model, dataset.val.inputs, 37))
    tempered, record = confusability(with_signal(cfg, signal="tempered", temperature=1.0), model, "cpu",
                                     logits=model_logits(model, dataset.val.inputs, 37))
    np.testing.assert_array_equal(tempered, probs)  # the same stream, the same arithmetic
    assert np.abs(probs - direct).max() <= 1e-5 * np.abs(direct).max()
    assert record == {**record, "signal": "tempered", "temperature": 1.0, "rows": len(dataset.val)}


def test_tempered_covariance_softens_by_t(tiny):
    _, dataset, model = tiny
    z = predict_logits(model, model.encode(dataset.val.inputs))
    for t in (0.5, 4.0):
        direct = np.cov(softmax64(z, t), rowvar=False, bias=True)
        streamed = tempered_covariance(torch.from_numpy(z).split(50), z.shape[1], t)
        assert np.abs(streamed - direct).max() <= 1e-5 * np.abs(direct).max()
    # probs ignores the temperature: it is the paper's T = 1 signal
    cfg = with_signal(tiny_config(), signal="probs", temperature=8.0)
    m, record = confusability(cfg, model, "cpu", logits=torch.from_numpy(z).split(64))
    assert record["temperature"] == 1.0
    np.testing.assert_allclose(m, tempered_covariance(torch.from_numpy(z).split(64), z.shape[1], 1.0))


def test_confusion_similarity_hand_computed():
    # 3 classes; rows labelled 0, 0, 1 and 2 (class 2 has one row, class 1 one, class 0 two)
    z = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0 + 1e-30], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    labels = np.array([0, 0, 1, 2])
    m = np.array([[0.6, 0.35, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])  # mean row per label
    expected = (m + m.T) / 2
    got = confusion_similarity([z[:3], z[3:]], labels, 3, 1.0)  # two batches
    np.testing.assert_allclose(got, expected, atol=1e-7)
    with pytest.raises(ValueError, match="more rows of logits than the 3 labels"):
        confusion_similarity([z[:3], z[3:]], labels[:3], 3)
    with pytest.raises(ValueError, match="4 labels for 3 rows"):
        confusion_similarity([z[:3]], labels, 3)


# ---------------------------------------------------------------------------
# head: the checkpoint alone


def test_head_uses_only_the_checkpoint(tiny, tmp_path):
    cfg, _, model = tiny
    save_checkpoint(model, tmp_path / "generalist")
    loaded = load_checkpoint(tmp_path / "generalist")
    # no data of any kind: no logits, no labels, no dataset
    sim, record = confusability(with_signal(cfg, signal="head"), loaded, "cpu")
    assert record["rows"] == 0 and record["signal"] == "head"
    w = load_file(str(tmp_path / "generalist" / "model.safetensors"))["head.weight"].astype(np.float64)  # (C, d)
    w -= w.mean(0)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(sim, w @ w.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(sim), 1.0)


class HeadOnly(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head


def test_head_of_a_class_with_the_mean_weights_is_similar_only_to_itself():
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]]))  # row 1 is the mean row
    sim = head_similarity(HeadOnly(head))
    assert sim[1, 1] == 1.0 and sim[1, 0] == sim[1, 2] == 0.0 and sim[0, 2] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------
# out of fold: a planted marker shows whether a model saw the row it predicts


def marked_dataset(seed=0):
    """4 easy classes; 8 rows of each carry a unique one-hot marker and the next class's label.

    A model that trained on a marked row learns its marker and predicts the flipped label;
    a model that did not predicts the row's natural class. Validation is the training split
    itself, so early stopping keeps the epoch that fits (and memorises) the most.
    """
    rng = np.random.default_rng(seed)
    n_classes, per_class, marked_per_class = 4, 40, 8
    natural = np.repeat(np.arange(n_classes), per_class)
    n = len(natural)
    centres = 4.0 * np.eye(n_classes)
    marked = np.concatenate([np.flatnonzero(natural == c)[:marked_per_class] for c in range(n_classes)])
    x = np.zeros((n, n_classes + len(marked)), np.float32)
    x[:, :n_classes] = centres[natural] + rng.normal(0, 0.5, (n, n_classes))
    x[marked, n_classes + np.arange(len(marked))] = 1.0  # the marker: one column of its own
    labels = natural.copy()
    labels[marked] = (natural[marked] + 1) % n_classes
    train = Split(x, labels)
    classes = [f"c{c}" for c in range(n_classes)]
    return Dataset("marked", "features", classes, train, train, train), natural, marked


def test_out_of_fold_never_predicts_a_row_with_a_model_that_saw_it():
    cfg = load_config(None, ["data.kind=synthetic", "model.name=mlp", "model.hidden=[64]", "model.dropout=0.0",
                             "train.epochs=20", "train.batch_size=32", "train.lr=0.01", "train.patience=0",
                             "threads=1", "cluster.folds=4"])
    dataset, natural, marked = marked_dataset()
    rows, predicted = [], []
    for r, z, _ in iter_out_of_fold_logits(cfg, dataset, torch.device("cpu"), cfg.cluster.folds, seed=0):
        rows.append(r)
        predicted.append(z.argmax(1).numpy())
    rows, predicted = np.concatenate(rows), np.concatenate(predicted)
    assert np.array_equal(np.sort(rows), np.arange(len(dataset.train)))  # every row once
    oof = np.empty(len(rows), np.int64)
    oof[rows] = predicted
    # the marker works: a model trained on the marked rows predicts their flipped labels
    seen, _ = fit_generalist(cfg, dataset, torch.device("cpu"), seed=0, progress=False)
    in_sample = predict_logits(seen, seen.encode(dataset.train.inputs[marked])).argmax(1)
    assert (in_sample == dataset.train.labels[marked]).mean() >= 0.9
    # out of fold, no marked row is predicted by a model that learnt its marker
    assert (oof[marked] == natural[marked]).mean() >= 0.9
    assert (oof[marked] == dataset.train.labels[marked]).sum() <= 1


def test_folds_are_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [10, 11, 12, 3, 7])
    fold = fold_of_rows(labels, 3, seed=1)
    assert np.array_equal(fold, fold_of_rows(labels, 3, seed=1))
    for c in range(5):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="folds=1"):
        fold_of_rows(labels, 1, seed=0)


# ---------------------------------------------------------------------------
# which rows the clusters saw, and the random baseline


@pytest.mark.parametrize("signal, split, rows, held", [
    ("probs", "val", "val", "test"),
    ("tempered", "test", "test", "val"),
    ("confusion", "train", "train", "test"),
    ("train_tempered", "val", "train", "test"),
    ("out_of_fold", "test", "train", "test"),
    ("head", "test", None, "test"),
    ("tempered", "/data/unlabeled.csv", "/data/unlabeled.csv", "test"),
])
def test_the_held_out_split_is_one_the_signal_did_not_read(signal, split, rows, held):
    assert cluster_rows(signal, split) == rows
    assert heldout_split(signal, split) == held != rows


def test_random_share_is_exact():
    # 4 classes in [0, 1] and [2, 3]: of the 12 ordered pairs of distinct classes, 4 share a group
    assert random_share([[0, 1], [2, 3]], 4) == 4 / 12
    assert random_share([[0, 1, 2], [2, 3]], 5) == (6 + 2) / 20  # overlap counts a pair once
    assert random_share([], 5) == 0.0
    # against the definition: every relabelling of 5 classes, errors on every ordered pair
    import itertools

    groups, n = [[0, 1, 2], [3, 4]], 5
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    shares = []
    for perm in itertools.permutations(range(n)):
        together = {(perm[a], perm[b]) for g in groups for a in g for b in g if a != b}
        shares.append(sum((t, p) in together for t, p in pairs[:3]) / 3)  # any fixed errors
    assert np.mean(shares) == pytest.approx(random_share(groups, n))


# ---------------------------------------------------------------------------
# settings


@pytest.mark.parametrize("overrides, key", [
    (["cluster.signal=covariance"], "cluster.signal='covariance'"),
    (["cluster.temperature=0"], "cluster.temperature=0.0"),
    (["cluster.temperature=-2"], "cluster.temperature=-2.0"),
    (["cluster.temperature=.inf"], "cluster.temperature=inf"),
    (["cluster.folds=1"], "cluster.folds=1"),
    (["cluster.signal=confusion", "cluster.split=unlabeled.csv"], "cluster.signal='confusion'"),
    (["cluster.signal=out_of_fold", "cluster.split=unlabeled.csv"], "cluster.split='unlabeled.csv'"),
    (["cluster.signal=train_tempered", "cluster.split=unlabeled.csv"], "cluster.split='unlabeled.csv'"),
])
def test_bad_signal_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value)


def test_signals_that_need_no_labels_accept_an_unlabeled_file():
    for signal in ("probs", "tempered", "head"):
        assert load_config(None, [f"cluster.signal={signal}", "cluster.split=unlabeled.csv"]).cluster.signal == signal


# ---------------------------------------------------------------------------
# the cluster stage: the held-out score, and unlabeled inputs


def error_pairs_of(model, split):
    predicted = predict_logits(model, model.encode(split.inputs)).argmax(1)
    wrong = predicted != split.labels
    return np.stack([split.labels[wrong], predicted[wrong]], 1)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A generalist run without specialists; its clusters are cut again by each test."""
    out = tmp_path_factory.mktemp("runs") / "staged"
    cfg = tiny_config("specialists.enabled=false", "peer.enabled=false")
    run_pipeline(cfg, out, log=lambda s: None, progress=False)
    dataset = load_dataset(cfg.data, cfg.seed)
    return out, dataset, load_checkpoint(out / "generalist")


@pytest.mark.parametrize("overrides, clustered, held", [
    ([], "val", "test"),
    (["cluster.split=test"], "test", "val"),
    (["cluster.signal=train_tempered", "cluster.temperature=4"], "train", "test"),
    (["cluster.signal=confusion", "cluster.split=test", "cluster.temperature=2"], "test", "val"),
])
def test_held_out_share_is_computed_only_on_rows_not_used_to_cluster(staged, tmp_path, overrides, clustered,
                                                                     held):
    base, dataset, model = staged
    run = tmp_path / "run"
    shutil.copytree(base, run)
    recluster(run, overrides, log=lambda s: None)
    metrics = RunDir(run).read_metrics()["cluster"]
    groups = [g["classes"] for g in read_json(run / "clusters.json")["groups"]]
    assert metrics["signal_rows"] == len(getattr(dataset, clustered))
    assert metrics["heldout_split"] == held != clustered
    pairs = error_pairs_of(model, getattr(dataset, held))  # the errors of the split the clusters never saw
    inside, total, share = error_share_inside(pairs, groups)
    assert metrics["heldout_errors"] == total
    assert metrics["heldout_errors_inside_clusters"] == share
    assert metrics["random_errors_inside_clusters"] == random_share(groups, dataset.n_classes)
    assert metrics["val_errors_inside_clusters"] == error_share_inside(error_pairs_of(model, dataset.val), groups)[2]
    summary = (run / "report" / "summary.md").read_text()
    assert f"held out ({held} errors, never used to cluster): {inside} / {total}" in summary


@pytest.mark.parametrize("signal", ["tempered", "head"])
def test_an_unlabeled_file_works_with_signals_that_need_no_labels(staged, tmp_path, signal):
    base, dataset, _ = staged
    run = tmp_path / "run"
    shutil.copytree(base, run)
    unlabeled = tmp_path / "unlabeled.npy"
    np.save(unlabeled, dataset.train.inputs[:300])
    recluster(run, [f"cluster.signal={signal}", "cluster.temperature=3", f"cluster.split={unlabeled}"],
              log=lambda s: None)
    metrics = RunDir(run).read_metrics()["cluster"]
    assert metrics["signal"] == signal and metrics["heldout_split"] == "test"
    assert metrics["signal_rows"] == (300 if signal == "tempered" else 0)
    assert read_json(run / "clusters.json")["signal"] == {"name": signal, "temperature": 3.0 if signal == "tempered"
                                                          else 1.0}
    with pytest.raises(ConfigError, match="cluster.signal='confusion'.*unlabeled file"):
        recluster(run, ["cluster.signal=confusion", f"cluster.split={unlabeled}"], log=lambda s: None)


def test_oracle_partition_finds_planted_groups_within_its_size_limit():
    """jobs.bench_signals' oracle: errors only inside 3 planted groups of 4 classes, dealt across the
    classes so a balanced start splits them, are all held inside once the search ends."""
    from jobs.bench_signals import oracle_partition

    rng = np.random.default_rng(0)
    planted = rng.permutation(np.arange(12) % 3)
    pairs = np.array([(a, b) for a in range(12) for b in range(12) if a != b and planted[a] == planted[b]] * 3)
    cluster = oracle_partition(pairs, 12, 3, 4, starts=3, seed=1)
    groups = [np.flatnonzero(cluster == g).tolist() for g in range(3)]
    assert sorted(len(g) for g in groups) == [4, 4, 4]
    assert error_share_inside(pairs, groups)[2] == 1.0
    with pytest.raises(ValueError, match="cannot hold 12 classes"):
        oracle_partition(pairs, 12, 2, 5)


def test_oracle_partition_respects_its_size_limit_and_leaves_no_cluster_empty():
    from jobs.bench_signals import oracle_partition

    pairs = np.array([(a, b) for a in range(10) for b in range(10) if a != b])  # every class confused with all
    cluster = oracle_partition(pairs, 10, 3, 6, starts=2)
    sizes = np.bincount(cluster, minlength=3)
    assert sizes.max() <= 6 and sizes.min() >= 1  # the best would be one cluster of all 10, which is over the limit
    assert sorted(sizes.tolist()) == [1, 3, 6]  # 15 + 3 pairs inside: the most any 3 clusters of <= 6 hold
