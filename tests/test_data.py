import gzip
import struct

import numpy as np
import pytest

from conftest import MNIST_DIR, text_rows, write_csv
from specialists.config import load_config
from specialists.data import DataError, load_dataset, read_idx


def data_cfg(*overrides):
    return load_config(None, list(overrides)).data


def test_banking77_is_embedded():
    ds = load_dataset(data_cfg(), seed=0)
    assert ds.n_classes == 77 and ds.input_kind == "text"
    assert len(ds.train) + len(ds.val) == 10_003 and len(ds.test) == 3_080
    assert set(np.unique(ds.val.labels)) == set(range(77))  # stratified: every class validated


def test_validation_split_is_seeded_and_disjoint():
    a = load_dataset(data_cfg("data.kind=synthetic", "data.synthetic.n_classes=20", "data.synthetic.n_groups=4"), 1)
    b = load_dataset(data_cfg("data.kind=synthetic", "data.synthetic.n_classes=20", "data.synthetic.n_groups=4"), 1)
    c = load_dataset(data_cfg("data.kind=synthetic", "data.synthetic.n_classes=20", "data.synthetic.n_groups=4"), 2)
    assert np.array_equal(a.val.inputs, b.val.inputs) and not np.array_equal(a.val.inputs, c.val.inputs)
    rows = {r.tobytes() for r in a.train.inputs}
    assert not any(r.tobytes() in rows for r in a.val.inputs)


def test_synthetic_plants_groups():
    ds = load_dataset(data_cfg("data.kind=synthetic", "data.synthetic.n_classes=60", "data.synthetic.n_groups=6"), 0)
    groups = ds.planted_groups
    assert sorted(c for g in groups for c in g) == list(range(60)) and len(groups) == 6
    centres = np.stack([ds.train.inputs[ds.train.labels == c].mean(0) for c in range(60)])
    group_of = np.empty(60, int)
    for g, members in enumerate(groups):
        group_of[members] = g
    d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    same = group_of[:, None] == group_of[None]
    off = ~np.eye(60, dtype=bool)
    assert d[same & off].mean() < 0.5 * d[~same].mean()  # classes of a group are close: confusable


def test_csv_with_custom_columns(csv_pair):
    train, test = csv_pair
    ds = load_dataset(data_cfg("data.kind=csv_text", f"data.train={train}", f"data.test={test}",
                               "data.label_column=intent"), 0)
    assert ds.classes == ["card_lost", "exchange", "top_up"] and len(ds.test) == 30


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "test_only_label", "ragged_row", "empty_label"])
def test_bad_csv(tmp_path, case):
    rows = text_rows(10)
    train = write_csv(tmp_path / "train.csv", rows)
    test_rows = text_rows(3, seed=1)
    expect = {"missing_file": "does not exist", "missing_column": "no column 'intent'",
              "test_only_label": "appear in test but never in train", "ragged_row": "line 3 has 3 fields",
              "empty_label": "empty 'intent'"}[case]
    if case == "missing_file":
        test = tmp_path / "nope.csv"
    elif case == "missing_column":
        test = write_csv(tmp_path / "test.csv", test_rows, header=("text", "label"))
    elif case == "test_only_label":
        test = write_csv(tmp_path / "test.csv", test_rows + [["hello", "brand_new_intent"]])
    elif case == "ragged_row":
        test = tmp_path / "test.csv"
        test.write_text("text,intent\nfine,top_up\nbad,row,top_up\n")
    else:
        test = write_csv(tmp_path / "test.csv", test_rows + [["no label", ""]])
    with pytest.raises(DataError, match=expect):
        load_dataset(data_cfg("data.kind=csv_text", f"data.train={train}", f"data.test={test}",
                              "data.label_column=intent"), 0)


def npz(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = dict(X_train=rng.normal(size=(40, 3)), y_train=np.arange(40) % 4,
                X_test=rng.normal(size=(8, 3)), y_test=np.arange(8) % 4)
    base.update(arrays)
    path = tmp_path / "d.npz"
    np.savez(path, **base)
    return path


def test_npz_loads(tmp_path):
    ds = load_dataset(data_cfg("data.kind=npz", f"data.path={npz(tmp_path)}"), 0)
    assert ds.n_classes == 4 and ds.input_shape == (3,) and ds.train.inputs.dtype == np.float32


@pytest.mark.parametrize("arrays, expect", [
    (dict(X_train=np.full((40, 3), np.nan)), "NaN/inf"),
    (dict(X_test=np.array([[np.inf, 0, 0]] * 8)), "X_test: 8 NaN/inf"),
    (dict(y_train=np.arange(40) % 4 * 2), "class 1 has no training examples"),
    (dict(y_test=np.array([0, 1, 2, 9, 0, 1, 2, 3])), "appear in test but never in train"),
    (dict(y_train=np.arange(39) % 4), "expected shape (40,)"),
    (dict(X_test=np.zeros((8, 5))), "feature shape"),
])
def test_bad_npz(tmp_path, arrays, expect):
    with pytest.raises(DataError) as err:
        load_dataset(data_cfg("data.kind=npz", f"data.path={npz(tmp_path, **arrays)}"), 0)
    assert expect in str(err.value)


def test_npz_missing_array(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X_train=np.zeros((4, 2)))
    with pytest.raises(DataError, match="lacks arrays"):
        load_dataset(data_cfg("data.kind=npz", f"data.path={path}"), 0)


def write_idx(path, array, gz):
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    images = rng.integers(0, 256, size=(50, 28, 28))
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(50) % 10, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images[:20], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(20) % 10, gz)
    ds = load_dataset(data_cfg("data.kind=mnist", f"data.path={tmp_path}", "data.val_fraction=0.2"), 0)
    assert ds.input_shape == (28, 28) and len(ds.test) == 20
    assert np.array_equal(ds.test.inputs, images[:20].astype(np.uint8))


def test_truncated_idx_is_rejected(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(DataError, match="header says 10 bytes"):
        read_idx(path)


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST IDX files not found at {MNIST_DIR}")
def test_real_mnist():
    ds = load_dataset(data_cfg("data.kind=mnist", f"data.path={MNIST_DIR}"), 0)
    assert len(ds.train) + len(ds.val) == 60_000
    assert np.bincount(ds.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
