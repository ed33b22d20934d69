"""Hostile and malformed inputs (issue 16): each is refused with the documented error naming the
offender, or works, and no user file or run directory is changed by the attempt.

Everything here is real: files in tmp_path, torch models (untrained where the weights do not matter),
numpy archives written byte by byte where numpy itself would refuse to write them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import specialists
from conftest import REPO, write_csv
from specialists.cli import user_errors
from specialists.config import ConfigError, TrainConfig, dump_config, load_config
from specialists.data import DataError, check_run_fits_data, load_dataset
from specialists.models import (CheckpointError, checkpoint_bytes, create_model, load_checkpoint, model_kwargs,
                                resolve_device, save_checkpoint, save_checkpoint_bytes, with_dustbin_head)
from specialists.rundir import write_json, write_text
from specialists.specialist import file_sha256, save_specialist
from specialists.train import TrainingError, train_model


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (temporary files included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(labels: list[str], per_class: int) -> list[list[str]]:
    return [[f"{label} words number {i}", label] for label in labels for i in range(per_class)]


def csv_config(train: Path, test: Path, *overrides: str):
    return load_config(None, ["data.kind=csv_text", f"data.train={train}", f"data.test={test}",
                              "data.label_column=intent", *overrides])


# ---------------------------------------------------------------------------
# CSV files (bug 3; bug 1: one class)


def _csv_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """(the bad train file, what the error must name besides the file)."""
    path = tmp_path / "train.csv"
    if case == "not_utf8":
        path.write_bytes(b"text,intent\nfine,a\ncaf\xe9 latte,b\n")  # Latin-1 e-acute on line 3
        return path, "line 3, byte offset 22"
    if case == "duplicate_header":
        path.write_text("text,intent,text\nhello,a,x\nworld,b,y\n")
        return path, "2 columns named 'text'"
    if case == "one_class":
        write_csv(path, rows(["only"], 20))
        return path, "only 1 class"
    if case == "field_over_limit":
        path.write_text('text,intent\n"' + "x" * 20_000_000 + '",a\n')  # 20 M characters: a missing quote's worth
        return path, "up to 16777216 characters"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["not_utf8", "duplicate_header", "one_class", "field_over_limit"])
def test_bad_csv_is_refused_naming_file_and_place(tmp_path, case):
    train, expect = _csv_case(tmp_path, case)
    test = write_csv(tmp_path / "test.csv", rows(["only"] if case == "one_class" else ["a", "b"], 3))
    before = snapshot(tmp_path)
    limit = csv.field_size_limit()
    with pytest.raises(DataError) as err:
        load_dataset(csv_config(train, test).data, 0)
    assert str(train) in str(err.value) and expect in str(err.value)
    assert snapshot(tmp_path) == before  # the user's files are untouched, nothing written next to them
    assert csv.field_size_limit() == limit  # the process-wide csv limit is restored


def test_csv_with_bom_and_long_field_loads(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters, over the csv module's default field limit
    body = "text,intent\n" + "".join(f"{t},{lab}\n" for t, lab in rows(["a", "b"], 10)) + f'"{long_text}",a\n'
    train = tmp_path / "train.csv"
    train.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # UTF-8 byte-order mark, as Excel writes it
    test = write_csv(tmp_path / "test.csv", rows(["a", "b"], 3))
    ds = load_dataset(csv_config(train, test, "data.val_fraction=0.2").data, 0)
    assert ds.classes == ["a", "b"]
    assert long_text in ds.train.inputs + ds.val.inputs


# ---------------------------------------------------------------------------
# NPZ files


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _good_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return dict(X_train=rng.normal(size=(40, 3)), y_train=np.arange(40) % 4,
                X_test=rng.normal(size=(8, 3)), y_test=np.arange(8) % 4)


def _npz_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    members = {f"{k}.npy": _npy_bytes(v) for k, v in _good_arrays().items()}
    if case == "object_array":
        members["X_train.npy"] = _npy_bytes(np.array([{"x": 1}] * 40, dtype=object))
        expect = "array 'X_train' holds Python objects"
    elif case == "pickle_member":
        members["classes.npy"] = pickle.dumps(["w", "x", "y", "z"])  # a pickle disguised as an array
        expect = "array 'classes' is not a NumPy array"
    elif case == "huge_labels":
        members["y_train.npy"] = _npy_bytes(np.arange(40, dtype=np.int64) % 4 * 2**38)  # up to 3 * 2**38
        expect = "y_train: label 824633720832 is too large"
    elif case == "duplicate_class_names":
        members["classes.npy"] = _npy_bytes(np.array(["cat", "dog", "cat", "emu"]))
        expect = "class name 'cat' appears twice"
    elif case == "header_larger_than_data":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12, 3)})
        members["X_train.npy"] = header.getvalue()  # declares 24 TB, holds nothing
        expect = "array 'X_train': its header declares shape (1000000000000, 3)"
    elif case == "one_class":
        members["y_train.npy"] = _npy_bytes(np.zeros(40, dtype=np.int64))
        members["y_test.npy"] = _npy_bytes(np.zeros(8, dtype=np.int64))
        expect = "only 1 class"
    else:
        raise AssertionError(case)
    return _write_npz(tmp_path / "data.npz", members), expect


@pytest.mark.parametrize("case", ["object_array", "pickle_member", "huge_labels", "duplicate_class_names",
                                  "header_larger_than_data", "one_class"])
def test_bad_npz_is_refused_naming_file_and_key(tmp_path, case):
    path, expect = _npz_case(tmp_path, case)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(load_config(None, ["data.kind=npz", f"data.path={path}"]).data, 0)
    assert str(path) in str(err.value) and expect in str(err.value)
    assert snapshot(tmp_path) == before


def test_plain_npy_given_as_npz_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 2)))
    with pytest.raises(DataError, match="single .npy array"):
        load_dataset(load_config(None, ["data.kind=npz", f"data.path={path}"]).data, 0)


# ---------------------------------------------------------------------------
# settings the data make impossible, refused before training (bug 1)


@pytest.fixture
def two_class_csv(tmp_path):
    return write_csv(tmp_path / "two.csv", rows(["A", "B"], 10), header=("text", "intent"))


@pytest.mark.parametrize("override, error, expect", [
    ([], ConfigError, "combine.top_n=3: the data have 2 classes"),  # the default top_n, issue 16's repro
    (["combine.top_n=2", "cluster.n_clusters=3"], ConfigError, "cluster.n_clusters=3: the data have 2 classes"),
    (["combine.top_n=2", "cluster.min_cluster_size=3"], ConfigError, "cluster.min_cluster_size=3"),
    (["combine.top_n=2", "cluster.n_clusters=1", "cluster.min_cluster_size=1", "cluster.max_cluster_size=1"], ConfigError,
     "cluster.max_cluster_size=1"),
    (["combine.top_n=2", "cluster.split=nowhere.csv"], DataError, "cluster.split='nowhere.csv'"),
])
def test_run_that_cannot_fit_the_data_is_refused_before_training(two_class_csv, override, error, expect):
    cfg = csv_config(two_class_csv, two_class_csv, *override)
    dataset = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(error) as err:
        check_run_fits_data(cfg, dataset)
    assert expect in str(err.value)


def test_run_that_fits_the_data_passes(two_class_csv, tmp_path):
    unlabeled = write_csv(tmp_path / "unlabeled.csv", [["some text"]], header=("text",))
    cfg = csv_config(two_class_csv, two_class_csv, "combine.top_n=2", f"cluster.split={unlabeled}")
    check_run_fits_data(cfg, load_dataset(cfg.data, cfg.seed))  # raises nothing


# ---------------------------------------------------------------------------
# config values (bug 4, config ergonomics)


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("specialists.temperature=-.inf", "specialists.temperature"),
    ("train.lr=inf", "train.lr"),  # the string form, read as a float, is refused too
    ("seed=4294967296", "seed"),
    ("model.hidden=[1000000000000]", "model.hidden"),
    ("model.embed_dim=1000000000", "model.embed_dim"),
    ("model.buckets=1000000000000", "model.buckets"),
    ("model.buckets=50000000", "model.buckets"),  # under the bucket cap, but x embed_dim 128 is too large a table
])
def test_bad_config_value_is_refused_naming_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"{key}=")


def test_model_too_large_for_the_data_is_refused_naming_key():
    cfg = load_config(None, ["model.name=mlp", "model.hidden=[65536, 65536]"])  # each width allowed, not both
    with pytest.raises(ConfigError, match=r"^model.hidden=\[65536, 65536\]: the mlp model on these data"):
        model_kwargs(cfg.model, "image", (28, 28), 10)


def test_yaml11_float_without_dot_is_a_float(tmp_path):
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5e-4\n")
    assert load_config(path).train.lr == 0.0005


def test_config_directory_is_named_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="device='cuda'"):
        resolve_device("cuda")


# ---------------------------------------------------------------------------
# training that diverges (bug 4)


def test_diverging_training_stops_naming_stage_epoch_and_setting():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 3
    model = create_model("mlp", n_classes=3, input_shape=[4], hidden=[8], dropout=0.0)
    model.fit_normalizer(x)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, optimizer="sgd")
    with pytest.raises(TrainingError) as err:
        train_model(model, model.encode(x), y, model.encode(x[:12]), y[:12], cfg, seed=0, desc="generalist",
                    progress=False, lr_key="train.lr")
    assert str(err.value).startswith("generalist: the loss is nan at epoch 1")
    assert "train.lr=1e+30" in str(err.value)
    assert TrainingError in user_errors()  # the command line exits 2 with the message, no traceback


# ---------------------------------------------------------------------------
# images with ink where the training images had almost none


def test_ink_in_a_pixel_blank_in_training_stays_in_range():
    """One mean and std over all pixels: ink that jitter or a test image puts in a pixel blank in nearly all
    training images is as large as ink anywhere else, not hundreds of (that pixel's) standard deviations."""
    rng = np.random.default_rng(0)
    train = np.zeros((1000, 8, 8), np.float32)
    train[:, 2:6, 2:6] = rng.random((1000, 4, 4))
    train[0, 0, 0] = 1.0  # the corner is inked in one training image of 1,000
    model = create_model("mlp", n_classes=2, input_shape=[8, 8], hidden=[4], dropout=0.0).eval()
    model.fit_normalizer(train)
    test = np.zeros((1, 8, 8), np.float32)
    test[0, 0, 0] = test[0, 4, 4] = 1.0
    z = model.normalise(torch.as_tensor(test))[0]
    assert z[0, 0] == pytest.approx(z[4, 4]) and abs(float(z[0, 0])) < 10
    assert z.abs().max() == pytest.approx(z[0, 0].abs())  # the blank pixels sit at the one mean

    blank = create_model("mlp", n_classes=2, input_shape=[8, 8], hidden=[4], dropout=0.0).eval()
    blank.fit_normalizer(np.zeros((10, 8, 8), np.float32))  # no ink at all: std 1, as for a constant feature
    assert float(blank.normalise(torch.as_tensor(test))[0, 0, 0]) == pytest.approx(1.0)

    vectors = create_model("mlp", n_classes=2, input_shape=[3], hidden=[4], dropout=0.0).eval()
    x = rng.normal([0.0, 5.0, -2.0], [1.0, 10.0, 0.1], size=(500, 3)).astype(np.float32)
    vectors.fit_normalizer(x)  # feature vectors keep their own mean and std per feature
    z = vectors.normalise(torch.as_tensor(x)).numpy()
    assert np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0, ddof=1), 1, atol=1e-3)


# ---------------------------------------------------------------------------
# run directories: the loaded model's inputs (bug 2) and untrusted files


def make_run(root: Path, kind: str = "text", n_classes: int = 4, groups=((0, 1),), seed: int = 0) -> Path:
    """A run directory of untrained models (seeded), written as the pipeline writes one."""
    names = [f"c{i}" for i in range(n_classes)]
    cfg = load_config(None, ["model.buckets=64", "model.embed_dim=8", "model.hidden=[8]", "model.dropout=0.0",
                             *(["model.name=mlp"] if kind == "features" else [])])
    torch.manual_seed(seed)
    shape = () if kind == "text" else (3,)
    generalist = create_model(cfg.model.name, **model_kwargs(cfg.model, kind, shape, n_classes))
    write_text(root / "config.yaml", dump_config(cfg))
    write_json(root / "classes.json", names)
    save_checkpoint(generalist, root / "generalist")
    sha = file_sha256(root / "generalist" / "model.safetensors")
    for m, group in enumerate(groups):
        info = {"id": m, "classes": list(group), "names": [names[c] for c in group], "dustbin_correction": 0.1,
                "dustbin_correction_active_top1": -0.2, "generalist_sha256": sha}
        specialist = with_dustbin_head(generalist, group)
        save_specialist(root / "specialists" / str(m), specialist.spec, checkpoint_bytes(specialist), info, [])
    return root


TEXTS = ["lost card", "top up my balance", "exchange rate euro"]
FEATURES = np.random.default_rng(1).normal(size=(3, 3)).astype(np.float32)


@pytest.mark.parametrize("kind, make_inputs", [
    ("text", lambda: (t for t in TEXTS)),  # a generator: read once, not consumed by a type check
    ("text", lambda: iter(TEXTS)),
    ("text", lambda: tuple(TEXTS)),
    ("features", lambda: (row for row in FEATURES)),
])
def test_iterable_inputs_give_the_same_answer_as_a_list(tmp_path, kind, make_inputs):
    model = specialists.load(make_run(tmp_path, kind), device="cpu")
    reference = model.predict_proba(TEXTS if kind == "text" else FEATURES)
    assert reference.shape == (3, 4)
    assert np.array_equal(model.predict_proba(make_inputs()), reference)
    assert list(model.predict(make_inputs())) == list(model.predict(TEXTS if kind == "text" else FEATURES))


def test_read_only_arrays_predict_without_warning_and_stay_untouched(tmp_path):
    """A memory map or np.frombuffer is read-only: it predicts like a copy, quietly, and is not written to."""
    model = specialists.load(make_run(tmp_path, "features"), device="cpu")
    frozen = np.frombuffer(FEATURES.tobytes(), dtype=np.float32).reshape(FEATURES.shape)
    assert not frozen.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" UserWarning would fail here
        probs = model.predict_proba(frozen)
    assert np.array_equal(probs, model.predict_proba(FEATURES.copy()))
    assert np.array_equal(frozen, FEATURES)


@pytest.mark.parametrize("kind", ["text", "features"])
def test_empty_list_gives_no_rows_for_every_kind_of_run(tmp_path, kind):
    model = specialists.load(make_run(tmp_path, kind), device="cpu")
    assert model.predict_proba([]).shape == (0, 4)
    assert model.predict([]).shape == (0,)


@pytest.mark.parametrize("inputs, name", [({"a": 1, "b": 2}, "dict"), ({"lost card"}, "set"), ("lost card", "str"),
                                          (42, "int")])
def test_inputs_without_row_order_are_refused(tmp_path, inputs, name):
    model = specialists.load(make_run(tmp_path, "text"), device="cpu")
    with pytest.raises(TypeError, match=name):
        model.predict_proba(inputs)
    with pytest.raises(TypeError, match=name):
        model.predict(inputs)


def test_use_specialists_false_says_so(tmp_path):
    model = specialists.load(make_run(tmp_path), device="cpu", use_specialists=False)
    assert "use_specialists=False" in model.mode and not model.specialists
    assert "1 specialists" in specialists.load(tmp_path, device="cpu").mode


def test_run_with_fewer_classes_than_top_n_loads(tmp_path):
    """A 2-class run saved with combine.top_n=3 (the default) loads with top_n clamped to 2."""
    run = make_run(tmp_path, "text", 2, [(0,)])
    assert load_config(run / "config.yaml").combine.top_n == 3
    model = specialists.load(run, device="cpu")
    assert model.top_n == 2
    assert model.predict_proba(TEXTS).shape == (3, 2)
    with pytest.raises(ValueError, match="top_n=3"):  # asked for explicitly, it is still refused
        specialists.load(run, device="cpu", top_n=3)


def _break_run(run: Path, case: str) -> tuple[Path, str]:
    """Damage a run as a hostile or mixed-up directory would; (the file or folder to name, what else)."""
    folder = run / "specialists" / "0"
    if case == "specialist_of_another_run":  # same classes and shapes, another generalist's weights
        other = make_run(run.parent / "other", seed=1)
        shutil.rmtree(folder)
        shutil.copytree(other / "specialists" / "0", folder)
        return folder, "trained from another generalist"
    if case == "specialist_class_out_of_range":
        info = json.loads((folder / "specialist.json").read_text())
        write_json(folder / "specialist.json", {**info, "classes": [0, 9]})
        return folder / "specialist.json", "holds class 9, but the run has 4 classes"
    if case == "specialist_nan_correction":
        text = (folder / "specialist.json").read_text().replace('"dustbin_correction": 0.1', '"dustbin_correction": NaN')
        write_text(folder / "specialist.json", text)
        return folder / "specialist.json", "'dustbin_correction' must be a finite number"
    spec_path = run / "generalist" / "model.json"
    spec = json.loads(spec_path.read_text())
    if case == "huge_hidden":
        spec["kwargs"]["hidden"] = [10**12]  # 512 TB if allocated
        expect = "does not match the model"
    elif case == "hidden_not_a_list":
        spec["kwargs"]["hidden"] = "wide"
        expect = "cannot build 'fasttext'"
    elif case == "negative_classes":
        spec["kwargs"]["n_classes"] = -3
        expect = "cannot build 'fasttext'"
    elif case == "unknown_kwarg":
        spec["kwargs"]["evil"] = "__import__('os')"
        expect = "cannot build 'fasttext'"
    else:
        raise AssertionError(case)
    write_json(spec_path, spec)
    return run / "generalist", expect


@pytest.mark.parametrize("case", ["specialist_of_another_run", "specialist_class_out_of_range",
                                  "specialist_nan_correction", "huge_hidden", "hidden_not_a_list",
                                  "negative_classes", "unknown_kwarg"])
def test_untrusted_run_directory_is_refused_at_load(tmp_path, case):
    run = make_run(tmp_path / "run", "text")
    offender, expect = _break_run(run, case)
    before = snapshot(run)
    with pytest.raises(CheckpointError) as err:
        specialists.load(run, device="cpu")
    assert str(offender) in str(err.value) and expect in str(err.value)
    assert snapshot(run) == before  # loading writes nothing


def test_a_checkpoint_sent_as_bytes_is_the_file_save_checkpoint_writes(tmp_path):
    torch.manual_seed(0)
    model = create_model("fasttext", n_classes=4, buckets=64, embed_dim=4, hidden=[8], char_ngrams=2)
    save_checkpoint(model, tmp_path / "saved", extra={"note": 1})
    weights = np.frombuffer(checkpoint_bytes(model), dtype=np.uint8)  # as a Ray worker sends them
    save_checkpoint_bytes(tmp_path / "sent", model.spec, weights, extra={"note": 1})
    assert snapshot(tmp_path / "sent") == snapshot(tmp_path / "saved")
    loaded = load_checkpoint(tmp_path / "sent")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_huge_checkpoint_is_refused_before_allocation(tmp_path):
    model = create_model("mlp", n_classes=3, input_shape=[4], hidden=[8])
    folder = save_checkpoint(model, tmp_path / "ckpt")
    spec = json.loads((folder / "model.json").read_text())
    spec["kwargs"]["hidden"] = [10**12, 10**12]  # the building would overflow torch's size arithmetic
    write_json(folder / "model.json", spec)
    with pytest.raises(CheckpointError, match=str(folder)):
        load_checkpoint(folder)


@pytest.mark.parametrize("job, options, overrides, said", [
    ("jobs.frontier", ["--budgets", "0.5", "-1", "--seeds", "0"], [],
     "error: specialists.budget=-1.0: must be >= 0"),
    ("jobs.accuracy", ["--seeds", "0", "--ablation", "--overlap-ratio", "0.5"], [],
     "error: cluster.overlap_ratio=0.5: must be >= 1"),
    ("jobs.distill_back", ["--seeds", "0"], ["student.cluster_weight=abc"],
     "error: student.cluster_weight='abc': expected a number"),
    ("jobs.mnist_paper", ["--quick", "--seed", "-3"], [], "argument --seed: -3 must be at least 0"),
])
def test_a_job_refuses_a_bad_setting_before_it_trains(job, options, overrides, said, tmp_path):
    # Every setting a job will use is checked first: a bad one costs no training and leaves no folder.
    out, runs = tmp_path / "out", tmp_path / "runs"
    places = ["--out", str(out), *(["--runs", str(runs)] if job == "jobs.distill_back" else [])]
    done = subprocess.run([sys.executable, "-m", job, *options, *places, *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not runs.exists()
