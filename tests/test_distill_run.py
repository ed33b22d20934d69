"""Distillation runs (`specialists distill`): real training on tiny data, real run directories."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MNIST_DIR, TINY_SYNTHETIC, can_unshare, tiny_config
from specialists import distill_teachers
from specialists.cli import main
from specialists.config import ConfigError
from specialists.data import DataError, load_dataset
from specialists.distill import DistillError, ensemble_probs
from specialists.distill_config import TransferConfig, load_distill_config
from specialists.distill_run import run_distill
from specialists.distill_student import train_student
from specialists.distill_teachers import module_teacher, teacher_scores
from specialists.models import create_model, load_checkpoint
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run
from specialists.stages import run_pipeline
from specialists.train import predict_logits
from specialists.transfer import make_transfer_set

QUIET = dict(log=lambda s: None, progress=False)

# The tiny synthetic set of conftest, with the model and schedule as the teacher's (trained here).
TEACHER_HERE = [("teacher." + o) if o.startswith(("model.", "train.")) else o for o in TINY_SYNTHETIC]

# Ten classes with enough validation examples per class (20) to measure one class's recall.
TEN_CLASSES = [
    "data.kind=synthetic", "data.synthetic.n_classes=10", "data.synthetic.n_groups=2",
    "data.synthetic.n_features=16", "data.synthetic.subspace_dim=4", "data.synthetic.train_per_class=100",
    "data.synthetic.test_per_class=40", "data.synthetic.class_spread=1.5", "data.val_fraction=0.2",
    "teacher.model.name=mlp", "teacher.model.hidden=[64]", "teacher.model.dropout=0.0", "teacher.train.epochs=15",
    "teacher.train.batch_size=64", "teacher.train.lr=0.01", "threads=1", "student.model.hidden=[32]",
]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished `specialists run` (generalist only): 40 classes."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    run_pipeline(tiny_config("cluster.enabled=false", "specialists.enabled=false"), out, **QUIET)
    return out


def _copy_run(run, tmp_path, name="run"):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------------------
# soft targets carry more than hard labels


def test_soft_targets_beat_hard_labels_on_a_small_budget(tmp_path):
    """Section 6 in miniature: 10% of the training set (3 examples a class), same student, same steps."""
    gains = []
    for seed in range(3):
        cfg = load_distill_config(None, [*TEACHER_HERE, f"seed={seed}", "teacher.model.hidden=[64]",
                                         "transfer.fraction=0.1", "student.temperature=2", "student.baseline=true",
                                         "student.train.epochs=40", "student.train.patience=0"])
        m = run_distill(cfg, tmp_path / f"s{seed}", **QUIET).read_metrics()
        assert m["transfer"]["examples"] == 120 and m["baseline"]["parameters"] == m["student"]["parameters"]
        assert m["teacher"]["test_accuracy"] > m["baseline"]["test_accuracy"]
        gains.append(m["student"]["test_accuracy"] - m["baseline"]["test_accuracy"])
        assert m["kept_gain"]["baseline"] == "baseline" and m["kept_gain"]["kept_gain"] > 0
    # chance is 2.5%: soft targets must add a clear margin on every seed
    assert min(gains) > 0.02 and np.mean(gains) > 0.06, gains


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST IDX files not found at {MNIST_DIR}")
def test_mnist_subset_soft_targets_beat_hard_labels(tmp_path):
    cfg = load_distill_config(None, [
        "data.kind=mnist", f"data.path={MNIST_DIR}", "data.max_train=3000", "threads=1",
        "teacher.model.name=mlp", "teacher.model.hidden=[256]", "teacher.model.dropout=0.2",
        "teacher.train.epochs=8", "teacher.train.batch_size=64", "teacher.train.lr=0.001",
        "student.model.hidden=[128]", "student.model.dropout=0.0", "student.train.epochs=30",
        "student.train.patience=0", "transfer.fraction=0.03", "student.temperature=4", "student.baseline=true"])
    m = run_distill(cfg, tmp_path / "mnist", **QUIET).read_metrics()
    assert m["transfer"]["examples"] == 80  # 3% of 2,700, per class
    assert m["student"]["test_accuracy"] > m["baseline"]["test_accuracy"] + 0.03
    assert m["teacher"]["test_accuracy"] > 0.88


# ---------------------------------------------------------------------------
# the teacher labels the transfer set once


def test_teacher_outputs_are_computed_once(teacher_run, tmp_path, monkeypatch):
    rows = []
    real = distill_teachers.load_checkpoint

    def counting(folder, device="cpu"):
        model = real(folder, device)
        model.register_forward_hook(lambda module, inputs, output: rows.append(output.shape[0]))
        return model

    monkeypatch.setattr(distill_teachers, "load_checkpoint", counting)
    cfg = load_distill_config(None, [f"teacher.runs=[{teacher_run}]", "teacher.source=generalist",
                                     "student.train.epochs=4", "student.train.patience=0", "student.init=scratch"])
    out = run_distill(cfg, tmp_path / "once", **QUIET)
    m = out.read_metrics()
    assert len(json.loads((out.root / "student" / "history.json").read_text())) == 4
    # one pass over the transfer set for the soft targets, one over the test set for the teacher's accuracy
    assert sum(rows) == m["transfer"]["examples"] + m["data"]["test"] == 1080 + 400


# ---------------------------------------------------------------------------
# section 3: classes missing from the transfer set


@pytest.mark.parametrize("seed", [0, 1])
def test_bias_shift_raises_the_omitted_class_recall(tmp_path, seed):
    cfg = load_distill_config(None, [*TEN_CLASSES, f"seed={seed}", "transfer.omit_classes=[c3]",
                                     "student.temperature=2", "student.soft_weight=0.5"])
    out = run_distill(cfg, tmp_path / "no3", **QUIET)
    m = out.read_metrics()
    b = m["bias"]
    assert m["transfer"]["absent_classes"] == ["c3"] and b["classes"] == ["c3"]
    assert b["shift"] > 0
    assert b["val_recall_absent_after"] >= b["val_recall_absent_before"] + 0.2
    assert b["val_accuracy_after"] >= b["val_accuracy_before"]
    assert b["test_errors_on_absent_after"] < b["test_errors_on_absent_before"]
    # the saved student is the shifted one
    dataset = load_dataset(cfg.data, cfg.seed)
    student = load_checkpoint(out.root / "student")
    logits = teacher_scores(module_teacher(student, dataset.classes, "student", "cpu"), dataset.test.inputs)
    assert int((logits.argmax(1).numpy() != dataset.test.labels).sum()) == m["student"]["test_errors"] == \
        b["test_errors_after"]


def test_keeping_only_two_classes_raises_the_others(tmp_path):
    cfg = load_distill_config(None, [*TEN_CLASSES, "transfer.keep_classes=[c7, c8]", "student.temperature=4"])
    m = run_distill(cfg, tmp_path / "only78", **QUIET).read_metrics()
    assert sorted(m["bias"]["classes"]) == sorted(f"c{i}" for i in range(10) if i not in (7, 8))
    assert m["transfer"]["classes"] == 2
    assert m["bias"]["shift"] > 0 and m["bias"]["test_errors_after"] < m["bias"]["test_errors_before"]


# ---------------------------------------------------------------------------
# beyond the paper: distil a run's combined distribution into one model of the generalist's size


def test_generalist_only_teacher_run_is_refused_for_its_combination(teacher_run, tmp_path, capsys):
    """A run without specialists has no combination beyond its generalist: refused, naming the way out."""
    out = tmp_path / "distilled"
    assert main(["distill", "--quiet", "--teacher", str(teacher_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "generalist-only run" in err and "teacher.source=generalist" in err and not out.exists()
    assert "distilled" not in json.loads((teacher_run / "metrics.json").read_text())


def test_teacher_run_with_specialists_uses_the_inference_engines_q(tmp_path):
    """A full tiny run (clusters, specialists on Ray): its q, not its generalist, is the teacher."""
    run = tmp_path / "run"
    run_pipeline(tiny_config(), run, **QUIET)
    out = tmp_path / "distilled"
    assert main(["distill", "--quiet", "--teacher", str(run), "--out", str(out)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    section = metrics["distilled"]
    # the teacher's test accuracy is the engine's own (generalist + specialists), not the generalist's
    assert section["ensemble_test_accuracy"] == pytest.approx(metrics["ensemble"]["test_accuracy"])
    assert section["generalist_test_accuracy"] == pytest.approx(metrics["generalist"]["test_accuracy"])
    k = json.loads((out / "metrics.json").read_text())["kept_gain"]
    if k["kept_gain"] is not None:
        assert k["kept_gain"] == pytest.approx((section["student_test_accuracy"] - section["generalist_test_accuracy"])
                                               / (section["ensemble_test_accuracy"] - section["generalist_test_accuracy"]))
    else:
        assert "~0" in k["reason"]


def test_ensemble_of_runs(teacher_run, tmp_path):
    second = tmp_path / "second"
    run_pipeline(tiny_config("cluster.enabled=false", "specialists.enabled=false", "model.hidden=[48]"), second, **QUIET)
    _, dataset = dataset_for_run(RunDir(teacher_run))
    teachers = [module_teacher(load_checkpoint(r / "generalist"), dataset.classes, str(r), "cpu")
                for r in (teacher_run, second)]
    x = dataset.val.inputs
    z = [teacher_scores(t, x) for t in teachers]  # (N, C) logits each
    t = 3.0
    arithmetic = ensemble_probs(z, mean="arithmetic", temperature=t, inputs="logits")
    geometric = ensemble_probs(z, mean="geometric", temperature=t, inputs="logits")
    p = [torch.softmax(zi / t, dim=1) for zi in z]
    assert torch.allclose(arithmetic, (p[0] + p[1]) / 2, atol=1e-6)
    g = torch.sqrt(p[0] * p[1])
    assert torch.allclose(geometric, g / g.sum(1, keepdim=True), atol=1e-6)
    assert not torch.allclose(arithmetic, geometric, atol=1e-3)

    cfg = load_distill_config(None, [f"teacher.runs=[{teacher_run}, {second}]", "teacher.source=generalist",
                                     "teacher.mean=geometric", "student.train.epochs=10"])
    m = run_distill(cfg, tmp_path / "ens", **QUIET).read_metrics()
    accuracies = [json.loads((r / "metrics.json").read_text())["generalist"]["test_accuracy"]
                  for r in (teacher_run, second)]
    assert m["kept_gain"]["baseline_test_accuracy"] == pytest.approx(np.mean(accuracies))
    assert m["teacher"]["runs"] == [str(teacher_run), str(second)] and m["teacher"]["mean"] == "geometric"
    # source=generalist writes nothing into the teacher runs
    assert "distilled" not in json.loads((second / "metrics.json").read_text())


# ---------------------------------------------------------------------------
# transfer sets and configuration


def test_unlabeled_transfer_file(teacher_run, tmp_path):
    _, dataset = dataset_for_run(RunDir(teacher_run))
    path = tmp_path / "unlabeled.npy"
    np.save(path, dataset.train.inputs)
    cfg = load_distill_config(None, [f"teacher.runs=[{teacher_run}]", f"transfer.split={path}",
                                     "teacher.source=generalist"])
    m = run_distill(cfg, tmp_path / "u", **QUIET).read_metrics()
    assert m["transfer"] == {"split": str(path), "examples": len(dataset.train), "labelled": False, "augmented": 0,
                             "out_of_fold_folds": 0, "classes": 40, "absent_classes": []}
    assert m["student"]["test_accuracy"] > 0.4  # soft targets alone; chance is 0.025
    with pytest.raises(ConfigError, match="student.baseline=true trains on hard labels"):
        run_distill(load_distill_config(None, [f"teacher.runs=[{teacher_run}]", f"transfer.split={path}",
                                               "teacher.source=generalist",
                                               "student.baseline=true"]), tmp_path / "never", **QUIET)
    assert not (tmp_path / "never").exists()


def test_unlabeled_transfer_file_is_checked_and_sampled(teacher_run, tmp_path):
    _, ds = dataset_for_run(RunDir(teacher_run))

    def refused(name: str, match: str) -> None:
        with pytest.raises(DataError, match=match):
            make_transfer_set(TransferConfig(split=str(tmp_path / name)), ds, seed=0)

    refused("none.npy", r"transfer.split='.*none.npy': not 'train' and no such file")
    np.save(tmp_path / "wide.npy", np.zeros((5, 17), np.float32))
    refused("wide.npy", r"transfer.split='.*wide.npy': inputs have shape \(5, 17\), the model expects \(N, 16\)")
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    refused("empty.npy", r"transfer.split='.*empty.npy': .* with N >= 1")
    broken = ds.train.inputs[:4].copy()
    broken[2, 3] = np.inf
    np.save(tmp_path / "broken.npy", broken)
    refused("broken.npy", r"transfer.split='.*broken.npy': row 2 holds NaN or infinity")

    np.save(tmp_path / "ok.npy", ds.train.inputs[:10])
    half = make_transfer_set(TransferConfig(split=str(tmp_path / "ok.npy"), fraction=0.5), ds, seed=0)
    assert len(half) == 5 and not half.labelled and (half.truth == -1).all() and len(half.present) == 40
    rows = {tuple(x) for x in ds.train.inputs[:10]}
    assert all(tuple(x) in rows for x in half.inputs)


def _bordered_images(path, seed=0):
    """An .npz of 8x8 images in 3 classes (a bar at a class-dependent place, noise), their outer pixel 0."""
    rng = np.random.default_rng(seed)

    def draw(n):
        labels = rng.integers(3, size=n)
        images = rng.normal(0, 0.3, (n, 8, 8)).astype(np.float32)
        for i, c in enumerate(labels):
            images[i, 1 + 2 * c:3 + 2 * c, 1:7] += 2.0
        images[:, [0, -1], :] = images[:, :, [0, -1]] = 0.0
        return images, labels

    (x, y), (xt, yt) = draw(300), draw(90)
    np.savez(path, X_train=x, y_train=y, X_test=xt, y_test=yt)
    return path


def test_a_shift_averaged_teacher_is_the_mean_over_moved_images(tmp_path):
    images = tmp_path / "images.npz"
    cfg = load_distill_config(None, [
        "data.kind=npz", f"data.path={_bordered_images(images)}", "threads=1", "teacher.model.name=mlp",
        "teacher.model.hidden=[32]", "teacher.train.epochs=3", "student.model.hidden=[16]",
        "student.train.epochs=2", "teacher.shift_pixels=1"])
    m = run_distill(cfg, tmp_path / "shifted", **QUIET).read_metrics()
    assert m["teacher"]["shift_pixels"] == 1
    # the saved teacher over the 9 one-pixel moves of each test image, here by np.roll (the border is 0)
    teacher = load_checkpoint(tmp_path / "shifted" / "teacher", "cpu")
    with np.load(images) as arrays:
        test, labels = arrays["X_test"], arrays["y_test"]
    probs = np.mean([torch.softmax(torch.from_numpy(predict_logits(
        teacher, teacher.encode(np.roll(test, (dy, dx), axis=(1, 2))), 64, "cpu")), 1).numpy()
        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert m["teacher"]["test_errors"] == int((probs.argmax(1) != labels).sum())
    plain_errors = int((predict_logits(teacher, teacher.encode(test), 64, "cpu").argmax(1) != labels).sum())
    assert plain_errors != m["teacher"]["test_errors"]  # so that the check above tells the two apart
    plain = distill_teachers.module_teacher(teacher, [str(c) for c in range(3)], "t", "cpu")
    same = distill_teachers.shift_averaged(plain, 0, (8, 8))  # no move: the teacher's own distribution
    assert torch.allclose(same.scores(test).exp(), torch.softmax(plain.scores(test), 1), atol=1e-6)
    moved = distill_teachers.shift_averaged(plain, 1, (8, 8)).scores(test).exp().numpy()
    assert np.allclose(moved, probs, atol=1e-5)


@pytest.mark.parametrize("override, expect", [
    ("teacher.shift_pixels=8", "teacher.shift_pixels=8 moves image inputs, and must be smaller than their side"),
    ("teacher.shift_pixels=-1", "teacher.shift_pixels=-1: must be >= 0"),
])
def test_bad_shift_pixels_on_images_is_refused(tmp_path, capsys, override, expect):
    out = tmp_path / "never"
    assert main(["distill", "--quiet", "--out", str(out), "data.kind=npz",
                 f"data.path={_bordered_images(tmp_path / 'images.npz')}", "teacher.model.name=mlp", override]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_transfer_set_variants(teacher_run):
    _, ds = dataset_for_run(RunDir(teacher_run))
    counts = np.bincount(ds.train.labels, minlength=40)

    half = make_transfer_set(TransferConfig(fraction=0.5), ds, seed=0)
    assert np.array_equal(np.bincount(half.labels, minlength=40), np.maximum(1, np.round(counts * 0.5)))
    again = make_transfer_set(TransferConfig(fraction=0.5), ds, seed=0)
    assert np.array_equal(half.inputs, again.inputs)
    other = make_transfer_set(TransferConfig(fraction=0.5), ds, seed=1)
    assert not np.array_equal(half.inputs, other.inputs)

    tiny = make_transfer_set(TransferConfig(fraction=0.001), ds, seed=0)
    assert len(tiny) == 40 and len(tiny.present) == 40  # every class keeps one example

    omit = make_transfer_set(TransferConfig(omit_classes=["c03", "c17"]), ds, seed=0)
    assert len(omit) == len(ds.train) - counts[3] - counts[17] and not np.isin([3, 17], omit.labels).any()
    keep = make_transfer_set(TransferConfig(keep_classes=["c07", "c08"]), ds, seed=0)
    assert list(keep.present) == [7, 8] and len(keep) == counts[7] + counts[8]

    hidden = make_transfer_set(TransferConfig(labels=False), ds, seed=0)
    assert (hidden.labels == -1).all() and np.array_equal(hidden.truth, ds.train.labels)
    assert not hidden.labelled and len(hidden.present) == 40

    with pytest.raises(ConfigError, match=r"'c99' is not a class"):
        make_transfer_set(TransferConfig(omit_classes=["c99"]), ds, seed=0)


def test_student_inherits_the_teacher_run_architecture(teacher_run, tmp_path):
    cfg = load_distill_config(None, [f"teacher.runs=[{teacher_run}]", "student.model.hidden=[8]",
                                     "teacher.source=generalist",
                                     "student.train.epochs=3"])
    run_cfg = tiny_config()
    assert cfg.student.model.name == "mlp" and cfg.student.model.hidden == [8]
    assert cfg.student.model.dropout == run_cfg.model.dropout
    assert cfg.student.train.epochs == 3 and cfg.student.train.lr == run_cfg.train.lr == 0.01
    out = run_distill(cfg, tmp_path / "small", **QUIET)
    # the resolved config round-trips through config.yaml
    assert load_distill_config(out.config) == cfg
    assert load_checkpoint(out.root / "student").spec["kwargs"]["hidden"] == [8]


# ---------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("override, expect", [
    ("student.temperature=0", "student.temperature=0.0: must be a finite number > 0"),
    ("student.temperature=-2", "student.temperature=-2.0"),
    ("student.soft_weight=1.5", "student.soft_weight=1.5: must be in [0, 1]"),
    ("student.soft_weight=-0.1", "student.soft_weight=-0.1"),
    ("transfer.fraction=0", "transfer.fraction=0.0: must be in (0, 1]"),
    ("teacher.mean=median", "teacher.mean='median'"),
    ("transfer.omit_classes=[nope]", "'nope' is not a class"),
    ("teacher.sorce=generalist", "unknown key 'teacher.sorce'"),
    ("teacher.shift_pixels=1", "teacher.shift_pixels=1 moves image inputs"),  # these data are vectors
])
def test_bad_input_is_named_and_writes_nothing(tmp_path, capsys, override, expect):
    out = tmp_path / "never"
    assert main(["distill", "--quiet", "--out", str(out), *TEACHER_HERE, override]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_teachers_with_different_class_sets(teacher_run, tmp_path, capsys):
    other = _copy_run(teacher_run, tmp_path, "other")
    classes = json.loads((other / "classes.json").read_text())
    (other / "classes.json").write_text(json.dumps(classes[:-1]))
    out = tmp_path / "never"
    assert main(["distill", "--quiet", "--teacher", str(teacher_run), "--teacher", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{teacher_run} has 40 classes, {other} has 39" in err and "'c39'" in err
    assert not out.exists()

    (other / "classes.json").write_text(json.dumps(["x00", *classes[1:]]))
    with pytest.raises(DistillError, match=r"class 0 is 'c00' in .* but 'x00' in"):
        run_distill(load_distill_config(None, [f"teacher.runs=[{teacher_run}, {other}]"]), out, **QUIET)


def test_teacher_runs_must_share_their_data(teacher_run, tmp_path):
    other = _copy_run(teacher_run, tmp_path, "other")
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("seed: 0", "seed: 3"))
    with pytest.raises(DistillError, match="synthetic data are drawn from the seed.*seed=0 but .* seed=3"):
        run_distill(load_distill_config(None, [f"teacher.runs=[{teacher_run}, {other}]"]), tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists()


def test_student_output_size_must_match(teacher_run):
    _, ds = dataset_for_run(RunDir(teacher_run))
    transfer = make_transfer_set(TransferConfig(), ds, seed=0)
    student = create_model("mlp", n_classes=5, input_shape=[16], hidden=[8], dropout=0.0)
    soft = torch.full((len(transfer), 40), 1 / 40)
    with pytest.raises(DistillError, match="the student predicts 5 classes but the teacher 40"):
        train_student(student, transfer, soft, ds.val.inputs, ds.val.labels, tiny_config().train,
                      temperature=2, soft_weight=0.5, seed=0, progress=False)
    with pytest.raises(DistillError, match="soft targets have shape"):
        train_student(student, transfer, soft[:10], ds.val.inputs, ds.val.labels, tiny_config().train,
                      temperature=2, soft_weight=0.5, seed=0, progress=False)


@pytest.mark.skipif(not can_unshare("m"), reason="no `unshare -rm` here (user mount namespaces)")
def test_a_read_only_teacher_run_still_gets_its_student(tmp_path):
    # A colleague's run on a read-only share: the student and its report are written; only the teacher run's own
    # metrics cannot list it, which is said, not an error.
    teacher, out = tmp_path / "teacher", tmp_path / "student"
    run_pipeline(tiny_config("peer.enabled=false"), teacher, **QUIET)
    before = (teacher / "metrics.json").read_bytes()
    quoted = shlex.quote(str(teacher))
    distill = shlex.join([sys.executable, "-m", "specialists.cli", "distill", "--teacher", str(teacher), "--out",
                          str(out), "student.train.epochs=2", "threads=1"])
    done = subprocess.run(["unshare", "-rm", "bash", "-c", f"mount --bind {quoted} {quoted} && "
                           f"mount -o remount,ro,bind {quoted} && {distill}"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"teacher run {teacher} cannot be written (Read-only file system)" in done.stdout
    assert (teacher / "metrics.json").read_bytes() == before
    student = json.loads((out / "metrics.json").read_text())["student"]
    summary = (out / "report" / "summary.md").read_text()
    assert "one model distilled from generalist + specialists" in summary and f"{student['test_errors']} |" in summary
