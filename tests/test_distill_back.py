"""Issue 13: a distilled student is a run; transfer sets the teacher has not memorised; out-of-fold targets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import csv_overrides, tiny_config, write_csv
import specialists
from specialists.cli import main
from specialists.config import ConfigError, load_config
from specialists.data import DataError
from specialists.distill import DistillError, kept_gain
from specialists.distill_config import TransferConfig, load_distill_config
from specialists.distill_run import run_distill
from specialists.report import format_results
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run
from specialists.stages import run_pipeline
from specialists.transfer import MASK_TOKEN, augment_inputs, make_transfer_set

QUIET = dict(log=lambda s: None, progress=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A tiny finished run with specialists and 2 peer members."""
    out = tmp_path_factory.mktemp("runs") / "full"
    run_pipeline(tiny_config("peer.max_members=3"), out, **QUIET)
    return out


@pytest.fixture(scope="module")
def generalist_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "alone"
    run_pipeline(tiny_config("cluster.enabled=false", "specialists.enabled=false", "peer.enabled=false"), out, **QUIET)
    return out


# ---------------------------------------------------------------------------
# the student is a run


def test_student_directory_is_served_by_load(full_run, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["distill", "--quiet", "--teacher", str(full_run), "--out", str(out), "student.temperatures=[1, 4]",
                 "transfer.augment=[noise]"]) == 0
    model = specialists.load(out)
    _, ds = dataset_for_run(RunDir(full_run))
    raw = ds.test.inputs[:50]  # raw inputs, as a user passes them
    proba = model.predict_proba(raw)
    assert proba.shape == (50, len(ds.classes)) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert list(model.predict(raw)) == [ds.classes[i] for i in proba.argmax(1)]
    why = model.explain(raw[0])
    assert why["single_model"] and why["mode"].startswith("single model") and why["active_specialists"] == []
    assert why["top"][0][0] == model.predict(raw[:1])[0]

    m = json.loads((out / "metrics.json").read_text())
    k = m["kept_gain"]
    assert "(student - baseline) / (teacher - baseline)" in k["definition"] and k["baseline"] == "generalist"
    assert k["teacher_test_accuracy"] == m["teacher"]["test_accuracy"]
    assert m["student"]["temperature"] in (1, 4) and len(m["student"]["grid"]) == 2
    chosen = max(m["student"]["grid"], key=lambda g: g["val_accuracy"])  # chosen on validation, not test
    assert chosen["temperature"] == m["student"]["temperature"]
    assert m["student"]["init"] == "generalist"
    # the teacher run's Table 3 and the student's report both show the student as one more row
    table = format_results(json.loads((full_run / "metrics.json").read_text()))
    assert "one model distilled from generalist + specialists" in table
    assert "one model distilled from generalist + specialists" in (out / "report" / "summary.md").read_text()


def test_peer_ensemble_is_distilled_into_the_generalists_size(full_run, tmp_path):
    out = tmp_path / "peers"
    assert main(["distill", "--quiet", "--teacher", str(full_run), "--teacher-members", "peers", "--out",
                 str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    run_m = json.loads((full_run / "metrics.json").read_text())
    members = run_m["peer_ensemble"]["members"]
    assert m["teacher"]["source"] == "peers" and f"{members} full models" in m["teacher"]["mode"]
    assert m["teacher"]["test_accuracy"] == pytest.approx(run_m["peer_ensemble"]["test_accuracy"], abs=1e-6)
    generalist = specialists.load(full_run, use_specialists=False).generalist
    assert m["student"]["parameters"] == sum(p.numel() for p in generalist.parameters())
    assert "distilled_peers" in run_m and "one model distilled from the peer ensemble" in format_results(run_m)


def test_generalist_only_run_is_refused_as_such(generalist_only, tmp_path):
    for members in ("combined", "peers"):
        cfg = load_distill_config(None, [f"teacher.runs=[{generalist_only}]", f"teacher.source={members}"])
        with pytest.raises(DistillError, match="generalist-only run|no finished peer members"):
            run_distill(cfg, tmp_path / members, **QUIET)
        assert not (tmp_path / members).exists()


def test_kept_gain_is_null_under_five_test_examples():
    assert kept_gain(0.83, 0.800, 0.804, 1000)["kept_gain"] is None  # 4 examples
    assert "under 5 examples" in kept_gain(0.83, 0.800, 0.804, 1000)["reason"]
    assert kept_gain(0.802, 0.800, 0.805, 1000)["kept_gain"] == pytest.approx(0.4)  # 5 examples


# ---------------------------------------------------------------------------
# augmented copies


def test_text_augmentations_are_seeded_and_deterministic():
    texts = [f"w{i} a b c d e f g h i j" for i in range(40)]
    for method in ("token_dropout", "span_mask", "swap"):
        a, source = augment_inputs(texts, "text", [method], 2, 0.3, seed=5)
        b, _ = augment_inputs(texts, "text", [method], 2, 0.3, seed=5)
        c, _ = augment_inputs(texts, "text", [method], 2, 0.3, seed=6)
        assert a == b and a != c and len(a) == 80 and list(source) == list(range(40)) * 2
        assert sum(x != texts[i] for x, i in zip(a, source)) > 40  # most copies changed
        for x, i in zip(a, source):
            original = texts[i].split()
            if method == "token_dropout":
                assert 1 <= len(x.split()) <= len(original) and set(x.split()) <= set(original)
            elif method == "span_mask":
                assert len(x.split()) == len(original) and x.split().count(MASK_TOKEN) == 3
            else:
                assert sorted(x.split()) == sorted(original)


def test_array_augmentations_are_seeded_and_deterministic():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    images = rng.integers(0, 256, size=(30, 6, 6)).astype(np.uint8)
    for x, kind in ((vectors, "features"), (images, "image")):
        for method in ("noise", "jitter", "mixup"):
            a, source = augment_inputs(x, kind, [method], 3, 0.2, seed=1)
            b, _ = augment_inputs(x, kind, [method], 3, 0.2, seed=1)
            c, _ = augment_inputs(x, kind, [method], 3, 0.2, seed=2)
            assert a.shape == (90, *x.shape[1:]) and a.dtype == x.dtype
            assert np.array_equal(a, b) and not np.array_equal(a, c)
            assert not np.array_equal(a, x[source])
    with pytest.raises(ConfigError, match="transfer.augment.*'noise' is not one of them"):
        augment_inputs(["a b"], "text", ["noise"], 1, 0.1, seed=0)


def test_augmented_transfer_set_keeps_labels_and_origin(full_run):
    _, ds = dataset_for_run(RunDir(full_run))
    t = make_transfer_set(TransferConfig(augment=["noise", "mixup"], copies=2), ds, seed=3)
    n = len(ds.train)
    assert len(t) == 3 * n and t.augmented.sum() == 2 * n and t.labelled
    assert np.array_equal(t.labels[n:], np.tile(ds.train.labels, 2)) and np.array_equal(t.origin[n:], np.tile(
        np.arange(n), 2))


def test_fresh_copies_are_drawn_anew_and_labelled_on_what_the_student_sees(full_run):
    import torch

    from specialists.distill_student import FreshCopies
    from specialists.distill_teachers import module_teacher
    from specialists.transfer import Augmenter

    _, ds = dataset_for_run(RunDir(full_run))
    n = len(ds.train)
    transfer = make_transfer_set(TransferConfig(augment=["noise", "mixup"], copies=2), ds, seed=3)
    teacher = module_teacher(specialists.load(full_run, use_specialists=False).generalist, ds.classes, "g", "cpu")
    labelled = []

    def probs(inputs):
        labelled.append(len(inputs))
        return torch.softmax(teacher.scores(inputs) / 2.0, 1)

    def fresh(seed=0):
        return FreshCopies(transfer, Augmenter(transfer.inputs[:n], ds.input_kind, ["noise", "mixup"], 0.15),
                           np.tile(np.arange(n), 3), probs, lambda x: specialists.models.encode_arrays(
                               x, ds.input_shape), seed)

    soft = torch.softmax(teacher.scores(transfer.inputs) / 2.0, 1)
    index = np.array([0, n + 1, 5, 2 * n + 7, n + 5])  # plain, copy of 1, plain, copy of 7, copy of 5
    copies = fresh()
    (x,) = copies.batch(index, "cpu")
    targets = copies.targets(index, soft)
    plain, augmented = np.array([0, 2]), np.array([1, 3, 4])
    assert torch.equal(x[plain], torch.as_tensor(transfer.inputs[[0, 5]]).float())
    assert torch.equal(targets[plain], soft[[0, 5]])  # plain rows keep their cached targets
    # the fresh rows: the teacher's targets on exactly what the student was given, neither the source nor the
    # fixed copy
    assert torch.allclose(targets[augmented], probs(x[augmented].numpy()), atol=1e-6)
    assert not torch.equal(x[augmented], torch.as_tensor(transfer.inputs[index[augmented]]).float())
    assert not torch.equal(x[augmented], torch.as_tensor(transfer.inputs[[1, 7, 5]]).float())
    assert copies.drawn == 3 and labelled[0] == 3
    (again,) = copies.batch(index, "cpu")  # a later epoch: the same plain rows, new copies
    assert torch.equal(again[plain], x[plain]) and not torch.equal(again[augmented], x[augmented])
    (same,) = fresh().batch(index, "cpu")  # seeded: the same draws from the same seed
    assert torch.equal(same, x)
    with pytest.raises(DistillError, match="another batch"):
        copies.targets(index[:2], soft)


def test_a_fresh_student_trains_and_reports_the_teacher_passes(full_run, tmp_path):
    out = tmp_path / "fresh"
    assert main(["distill", "--quiet", "--teacher", str(full_run), "--out", str(out), "transfer.augment=[noise]",
                 "transfer.copies=2", "transfer.fresh=true", "student.train.epochs=3", "student.train.patience=0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    (point,) = m["student"]["grid"]
    n_train = m["transfer"]["examples"] // 3
    assert point["epochs_run"] == 3 and point["fresh_teacher_examples"] == 3 * 2 * n_train  # each copy, each epoch
    proba = specialists.load(out).predict_proba(dataset_for_run(RunDir(full_run))[1].test.inputs[:20])
    assert np.allclose(proba.sum(1), 1, atol=1e-5)


def test_fresh_copies_are_refused_without_augment_with_folds_or_with_cluster_targets(full_run):
    with pytest.raises(ConfigError, match="transfer.fresh=True: draws the augmented copies afresh"):
        load_distill_config(None, ["transfer.fresh=true"])
    with pytest.raises(ConfigError, match="transfer.fresh=True: out-of-fold targets"):
        load_distill_config(None, ["transfer.fresh=true", "transfer.augment=[noise]", "transfer.folds=2"])
    with pytest.raises(ConfigError, match="student.cluster_weight=1.0 caches"):
        load_distill_config(None, [f"teacher.runs=[{full_run}]", "transfer.fresh=true", "transfer.augment=[noise]",
                                   "student.cluster_weight=1"])


# ---------------------------------------------------------------------------
# out-of-fold targets


def test_out_of_fold_targets_never_come_from_a_model_that_saw_the_row(tmp_path):
    """A planted marker row: the fold run that labels it never trained on it, the other one did."""
    words = {"card_lost": "lost card stolen", "top_up": "top up balance", "exchange": "exchange rate euro"}
    rows = [[f"{text} n{i}", label] for label, text in words.items() for i in range(30)]  # every row unique
    markers = ["zzmarker qqmarker", "zzmarker wwmarker"]  # a class of two: one stays in the training split
    train = write_csv(tmp_path / "train.csv", rows + [[m, "marker"] for m in markers])
    test = write_csv(tmp_path / "test.csv", rows[::3] + [[markers[0], "marker"]])
    overrides = csv_overrides(train, test) + ["data.val_fraction=0.2", "cluster.enabled=false",
                                              "specialists.enabled=false", "peer.enabled=false"]
    base = tmp_path / "base"
    run_pipeline(load_config(None, overrides), base, **QUIET)
    _, ds = dataset_for_run(RunDir(base))
    marker = next(m for m in markers if m in ds.train.inputs)  # the marker: a training row of the teacher
    cfg = load_distill_config(None, [f"teacher.runs=[{base}]", "teacher.source=generalist", "transfer.folds=2"])
    out = tmp_path / "oof"
    m = run_distill(cfg, out, **QUIET).read_metrics()
    fold_of_row = np.load(out / "folds" / "fold_of_transfer_rows.npy")
    transfer = make_transfer_set(cfg.transfer, ds, cfg.seed)
    (where,) = np.flatnonzero(np.array(transfer.inputs) == marker)
    for k in range(2):
        _, fold_ds = dataset_for_run(RunDir(out / "folds" / str(k)))
        seen = set(fold_ds.train.inputs)
        labelled_here = {transfer.inputs[i] for i in np.flatnonzero(fold_of_row == k)}
        assert not (seen & labelled_here)  # no row is labelled by a model that trained on it
        assert (marker in seen) == (fold_of_row[where] != k)  # the marker: seen by one fold run, labelled by the other
    cost = m["teacher"]["out_of_fold"]
    assert cost["folds"] == 2 and cost["seconds"] > 0 and cost["examples_seen"] > 0
    assert sum(r["rows"] for r in cost["runs"]) == len(transfer)


# ---------------------------------------------------------------------------
# transfer.split files


def test_transfer_split_bad_files_name_the_key_and_the_file(full_run, tmp_path, csv_pair):
    _, ds = dataset_for_run(RunDir(full_run))
    missing = tmp_path / "missing.npy"
    with pytest.raises(DataError, match=rf"transfer.split='{missing}'.*no such file"):
        make_transfer_set(TransferConfig(split=str(missing)), ds, seed=0)
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 17), np.float32))
    with pytest.raises(DataError, match=rf"transfer.split='{wide}': inputs have shape \(4, 17\)"):
        make_transfer_set(TransferConfig(split=str(wide)), ds, seed=0)
    # a text run: a CSV without the text column
    text_run = tmp_path / "text"
    run_pipeline(load_config(None, [*csv_overrides(*csv_pair), "cluster.enabled=false", "specialists.enabled=false",
                                    "peer.enabled=false"]), text_run, **QUIET)
    _, text_ds = dataset_for_run(RunDir(text_run))
    wrong = write_csv(tmp_path / "wrong.csv", [["hello there"]], header=("message",))
    with pytest.raises(DataError, match=rf"transfer.split='{wrong}': no column 'text'"):
        make_transfer_set(TransferConfig(split=str(wrong)), text_ds, seed=0)
    assert main(["distill", "--quiet", "--teacher", str(text_run), "--out", str(tmp_path / "never"),
                 f"transfer.split={wrong}", "teacher.source=generalist"]) == 2
    assert not (tmp_path / "never").exists()


def test_augment_and_folds_need_the_training_split():
    with pytest.raises(ConfigError, match="transfer.split"):
        load_distill_config(None, ["transfer.split=x.npy", "transfer.augment=[noise]"])
    with pytest.raises(ConfigError, match="transfer.folds"):
        load_distill_config(None, ["transfer.folds=1"])


def test_cluster_target_term_is_the_tempered_cross_entropy_inside_the_cluster():
    """Row 0: a specialist over classes (1, 3); row 1: no specialist covers it (no term)."""
    import torch

    from specialists.distill_student import ClusterTargets

    p = torch.tensor([0.8, 0.2])
    targets = ClusterTargets(torch.tensor([[1, 3], [0, 0]]), torch.log(torch.stack([p, torch.ones(2)])),
                             torch.tensor([[True, True], [False, False]]))
    logits = torch.tensor([[0.0, 1.0, 5.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    t = 2.0
    q = torch.softmax(torch.tensor([1.0, -1.0]) / t, 0)
    target = torch.softmax(torch.log(p) / t, 0)
    expected = -(target * torch.log(q)).sum() * t * t
    assert torch.allclose(targets.loss(logits, torch.tensor([0, 1]), t), expected, atol=1e-6)
    assert targets.loss(logits, torch.tensor([1]), t) == 0


def test_mnist_job_refuses_to_resume_under_another_schedule(tmp_path):
    """Its steps are kept by name: resuming OUT with other epochs would mix two schedules in one table."""
    from jobs.mnist_paper import SCHEDULES, main, record_schedule

    full = {**SCHEDULES["full"], "seed": 0}
    record_schedule(tmp_path, full)
    assert json.loads((tmp_path / "schedule.json").read_text()) == full
    record_schedule(tmp_path, dict(full))  # the same schedule resumes
    with pytest.raises(SystemExit, match=r"schedule\.json: teacher_epochs: 100 -> 60"):
        record_schedule(tmp_path, {**full, "teacher_epochs": 60})
    assert json.loads((tmp_path / "schedule.json").read_text()) == full  # the record is kept
    for bad in (["--teacher-epochs", "0"], ["--patience", "-1"], ["--student-epochs", "x"], ["--teacher-lr", "0"],
                ["--max-norm", "-1"], ["--max-norm", "nan"]):
        with pytest.raises(SystemExit):  # argparse names the option; nothing is recorded or trained
            main(["--full", "--out", str(tmp_path / "bad"), *bad])
        assert not (tmp_path / "bad").exists()
