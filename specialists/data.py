"""Data sources (`csv_text`, `npz`, `mnist`, `synthetic`), splits and sampling views.

Everything a user hands us is checked here, at the boundary: a missing file or
column, a CSV row with the wrong number of fields, a test label never seen in
training, a class with no training examples, NaN or inf features. Each problem
raises `DataError` naming the file, column, row or class.
"""

from __future__ import annotations

import csv
import gzip
import math
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .config import ConfigError, DataConfig, RunConfig, SyntheticConfig


class DataError(ValueError):
    """User data is missing, malformed or inconsistent."""


@dataclass
class Split:
    """One split: raw inputs and integer labels.

    inputs: list[str] for texts, (N, ...) float32/uint8 array for features and images.
    labels: (N,) int64 class indices.
    """

    inputs: list[str] | np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Split":
        return Split(take_inputs(self.inputs, index), self.labels[index])


def take_inputs(inputs: list[str] | np.ndarray, index: np.ndarray) -> list[str] | np.ndarray:
    """Rows `index` of raw inputs: texts (a list) or an (N, ...) array."""
    return [inputs[i] for i in index] if isinstance(inputs, list) else inputs[index]


@dataclass
class Dataset:
    """Train / validation / test splits over one class list.

    input_kind: "text" (raw strings), "features" (N, D) or "image" (N, H, W).
    planted_groups: the synthetic generator's groups of confusable classes, else None.
    """

    name: str
    input_kind: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    planted_groups: list[list[int]] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.input_kind == "text":
            return ()
        return tuple(self.train.inputs.shape[1:])


# ---------------------------------------------------------------------------
# paths


def resolve_path(path: str) -> Path:
    """`builtin:banking77/train.csv` -> the copy shipped inside the package."""
    if path.startswith("builtin:"):
        return Path(str(resources.files("specialists") / "datasets" / path[len("builtin:"):]))
    return Path(path).expanduser()


def _existing_file(path: str, key: str) -> Path:
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise DataError(f"{key}: file {path!r} does not exist")
    return resolved


# ---------------------------------------------------------------------------
# csv_text


# The csv module's default field limit (131,072 characters) is below a long document; this bound still
# refuses a file whose missing closing quote would swallow the rest of it into one field.
CSV_FIELD_LIMIT = 1 << 24  # characters


def _first_bad_utf8(file: Path) -> tuple[int, int, bytes]:
    """(line, byte offset in the file, the bad bytes) of the first invalid UTF-8 sequence."""
    offset = 0
    with open(file, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return line_no, offset + err.start, raw[err.start:err.end]
            offset += len(raw)
    return 0, offset, b""  # the decoder failed on something a line-by-line decode accepts


def read_text_csv(path: str, text_column: str, label_column: str, key: str) -> tuple[list[str], list[str]]:
    """(texts, label names) from a UTF-8 CSV (a byte-order mark is allowed) with a header row."""
    file = _existing_file(path, key)
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide: restored below
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{key}: {path!r} is empty") from None
            for column in (text_column, label_column):
                if column not in header:
                    raise DataError(f"{key}: {path!r} has no column {column!r}; its columns are {header}")
                if header.count(column) > 1:
                    raise DataError(f"{key}: {path!r} has {header.count(column)} columns named {column!r} "
                                    f"(positions {[i for i, h in enumerate(header) if h == column]}); rename all "
                                    "but one")
            text_at, label_at = header.index(text_column), header.index(label_column)
            texts, labels = [], []
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{key}: {path!r} line {line} has {len(row)} fields, the header has {len(header)}"
                    )
                label = row[label_at].strip()
                if not label:
                    raise DataError(f"{key}: {path!r} line {line} has an empty {label_column!r}")
                texts.append(row[text_at])
                labels.append(label)
    except UnicodeDecodeError:
        line, offset, bad = _first_bad_utf8(file)
        raise DataError(f"{key}: {path!r} is not UTF-8: line {line}, byte offset {offset} holds {bad!r}; re-save it "
                        "as UTF-8") from None
    except csv.Error as err:
        limit = f" (a field may hold up to {CSV_FIELD_LIMIT} characters)" if "field limit" in str(err) else ""
        raise DataError(f"{key}: {path!r} is not a readable CSV near line {reader.line_num}: {err}{limit}") from None
    finally:
        csv.field_size_limit(previous_limit)
    if not texts:
        raise DataError(f"{key}: {path!r} has a header but no rows")
    return texts, labels


def _index_labels(train_names: list[str], test_names: list[str], test_key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    classes = sorted(set(train_names))
    index = {name: i for i, name in enumerate(classes)}
    unseen = sorted(set(test_names) - set(index))
    if unseen:
        raise DataError(f"{test_key}: labels {unseen[:5]} appear in test but never in train")
    y_train = np.array([index[n] for n in train_names], dtype=np.int64)
    y_test = np.array([index[n] for n in test_names], dtype=np.int64)
    return classes, y_train, y_test


def load_csv_text(cfg: DataConfig) -> tuple[str, list[str], Split, Split]:
    train_texts, train_labels = read_text_csv(cfg.train, cfg.text_column, cfg.label_column, "data.train")
    test_texts, test_labels = read_text_csv(cfg.test, cfg.text_column, cfg.label_column, "data.test")
    classes, y_train, y_test = _index_labels(train_labels, test_labels, f"data.test: {cfg.test!r}")
    name = Path(cfg.train[len("builtin:"):]).parent.name if cfg.train.startswith("builtin:") else Path(cfg.train).name
    return name, classes, Split(train_texts, y_train), Split(test_texts, y_test)


# ---------------------------------------------------------------------------
# npz


def _check_features(X: np.ndarray, key: str) -> np.ndarray:
    if X.ndim < 2 or X.shape[0] == 0:
        raise DataError(f"{key}: expected a non-empty (N, D) array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)):
        raise DataError(f"{key}: expected real numbers, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    bad = ~np.isfinite(X)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{key}: {int(bad.sum())} NaN/inf values, the first in row {row}")
    return X


def _check_int_labels(y: np.ndarray, n: int, key: str, n_train: int) -> np.ndarray:
    """(n,) int64 labels; n_train bounds the labels (every class needs a training example)."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{key}: expected shape ({n},) to match the features, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        whole = np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))
        if not whole:
            raise DataError(f"{key}: labels must be integers 0..C-1, got dtype {y.dtype}")
    if y.min() < 0:
        raise DataError(f"{key}: negative label {int(y.min())}")
    # a label of n_train or more leaves some class below it without a training example; checked before
    # the int64 conversion (floats and uint64 overflow) and bincount (memory)
    if y.max() >= n_train:
        raise DataError(f"{key}: label {int(y.max())} is too large: labels are 0..C-1 and each class needs one of "
                        f"the {n_train} training examples")
    return y.astype(np.int64)


def _classes_from_int_labels(y_train: np.ndarray, y_test: np.ndarray, names: list[str] | None,
                             where: str = "") -> list[str]:
    n_classes = int(y_train.max()) + 1 if names is None else len(names)
    if int(y_train.max()) >= n_classes:
        raise DataError(f"{where}y_train: label {int(y_train.max())} is outside the {n_classes} class names")
    counts = np.bincount(y_train, minlength=n_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{where}y_train: class {int(empty[0])} has no training examples "
                        f"(empty classes: {empty[:10].tolist()})")
    unseen = np.setdiff1d(np.unique(y_test), np.arange(n_classes))
    if len(unseen):
        raise DataError(f"{where}y_test: labels {unseen[:5].tolist()} appear in test but never in train")
    return names if names is not None else [str(i) for i in range(n_classes)]


def _npz_array(arrays, key: str, path: str) -> np.ndarray:
    """Array `key` of an open .npz, its .npy header checked before anything is allocated.

    Refuses a member that is not a .npy array (a pickle stored in the zip, say),
    an object array, and a header declaring more data than the member holds.
    """
    where = f"data.path: {path!r}, array {key!r}"
    member = f"{key}.npy" if f"{key}.npy" in arrays.zip.namelist() else key
    try:
        size = arrays.zip.getinfo(member).file_size
        with arrays.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(handle)
    except Exception as err:  # zipfile and numpy raise several types for a bad member
        raise DataError(f"{where} is not a NumPy array: {err}") from None
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects (dtype {dtype}); save numbers, or strings for 'classes'")
    declared = math.prod(shape) * dtype.itemsize
    if declared > size:
        raise DataError(f"{where}: its header declares shape {shape} ({declared} bytes), the file holds {size}")
    try:
        return arrays[key]
    except Exception as err:
        raise DataError(f"{where} cannot be read: {err}") from None


def _class_names(names: np.ndarray, path: str) -> list[str]:
    where = f"data.path: {path!r}, array 'classes'"
    if names.ndim != 1 or not (names.dtype.kind in "US" or np.issubdtype(names.dtype, np.integer)):
        raise DataError(f"{where}: expected a 1-D array of names, got shape {names.shape} dtype {names.dtype}")
    out = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in names.tolist()]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        if name in seen:
            raise DataError(f"{where}: class name {name!r} appears twice (positions {seen[name]} and {i})")
        seen[name] = i
    return out


def load_npz(cfg: DataConfig) -> tuple[str, list[str], Split, Split]:
    file = _existing_file(cfg.path, "data.path")
    try:
        arrays = np.load(file, allow_pickle=False)  # never unpickle user files
    except Exception as err:  # numpy raises several types for a bad archive
        raise DataError(f"data.path: {cfg.path!r} is not a readable .npz file: {err}") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise DataError(f"data.path: {cfg.path!r} is a single .npy array; expected an .npz archive holding "
                        "X_train, y_train, X_test, y_test")
    with arrays:
        missing = [k for k in ("X_train", "y_train", "X_test", "y_test") if k not in arrays.files]
        if missing:
            raise DataError(f"data.path: {cfg.path!r} lacks arrays {missing}; it has {arrays.files}")
        where = f"data.path: {cfg.path!r}, "
        X_train = _check_features(_npz_array(arrays, "X_train", cfg.path), f"{where}X_train")
        X_test = _check_features(_npz_array(arrays, "X_test", cfg.path), f"{where}X_test")
        n = len(X_train)
        y_train = _check_int_labels(_npz_array(arrays, "y_train", cfg.path), n, f"{where}y_train", n)
        y_test = _check_int_labels(_npz_array(arrays, "y_test", cfg.path), len(X_test), f"{where}y_test", n)
        names = _class_names(_npz_array(arrays, "classes", cfg.path), cfg.path) if "classes" in arrays.files else None
    if X_train.shape[1:] != X_test.shape[1:]:
        raise DataError(f"{where}X_test: feature shape {X_test.shape[1:]} differs from X_train's {X_train.shape[1:]}")
    classes = _classes_from_int_labels(y_train, y_test, names, where)
    return Path(cfg.path).stem, classes, Split(X_train, y_train), Split(X_test, y_test)


# ---------------------------------------------------------------------------
# mnist (IDX files, gzipped or not)

_MNIST_FILES = {
    "train_images": "train-images{sep}idx3-ubyte",
    "train_labels": "train-labels{sep}idx1-ubyte",
    "test_images": "t10k-images{sep}idx3-ubyte",
    "test_labels": "t10k-labels{sep}idx1-ubyte",
}


def _find_idx(folder: Path, pattern: str) -> Path:
    for sep in (".", "-"):
        for suffix in ("", ".gz"):
            candidate = folder / (pattern.format(sep=sep) + suffix)
            if candidate.is_file():
                return candidate
            raw = folder / "MNIST" / "raw" / candidate.name  # torchvision's layout
            if raw.is_file():
                return raw
    raise DataError(f"data.path: {str(folder)!r} has no {pattern.format(sep='.')}[.gz]")


def read_idx(path: Path) -> np.ndarray:
    """One IDX array (the MNIST format): magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read IDX file: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape)  # Python ints: a forged header cannot overflow into a matching size
    if len(data) - header != expected:
        raise DataError(f"{path}: header says {expected} bytes of data for shape {shape}, file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(cfg: DataConfig) -> tuple[str, list[str], Split, Split]:
    folder = resolve_path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"data.path: MNIST folder {cfg.path!r} does not exist")
    arrays = {key: read_idx(_find_idx(folder, pattern)) for key, pattern in _MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or len(images) != len(labels):
            raise DataError(f"data.path: MNIST {split} images {images.shape} do not match labels {labels.shape}")
    classes = [str(d) for d in range(10)]
    train = Split(arrays["train_images"], arrays["train_labels"].astype(np.int64))
    test = Split(arrays["test_images"], arrays["test_labels"].astype(np.int64))
    return "mnist", classes, train, test


# ---------------------------------------------------------------------------
# synthetic


SYNTHETIC_CHUNK = 1 << 14  # rows generated at a time


def make_synthetic(cfg: SyntheticConfig, seed: int) -> tuple[list[str], Split, Split, list[list[int]]]:
    """A seeded large label set with planted groups of confusable classes.

    Group centres are far apart (`group_spread`); inside a group, classes
    differ only within the group's own random `subspace_dim`-dimensional
    subspace (`class_spread`), plus isotropic noise. A generalist must encode
    every group's subspace to separate all classes, so a narrow one is
    capacity-limited and confuses classes within groups, exactly what the
    covariance clustering should find.
    """
    rng = np.random.default_rng(seed)
    C, G, D, S = cfg.n_classes, cfg.n_groups, cfg.n_features, cfg.subspace_dim
    group_of = np.sort(np.arange(C) % G)  # contiguous groups, sizes differ by at most one
    group_of = rng.permutation(group_of)  # class ids do not reveal the groups
    group_centres = rng.normal(0.0, cfg.group_spread, size=(G, D))
    bases = np.linalg.qr(rng.normal(size=(G, D, S)))[0]  # (G, D, S) orthonormal columns
    offsets = rng.normal(0.0, cfg.class_spread, size=(C, S))
    centres = group_centres[group_of] + np.einsum("cds,cs->cd", bases[group_of], offsets)

    weights = 1.0 / np.arange(1, C + 1) ** cfg.frequency_skew
    weights = rng.permutation(weights / weights.mean())

    def sample(per_class: int) -> Split:
        counts = np.maximum(2, np.round(per_class * weights)).astype(int)  # >= 2: one may go to validation
        labels = np.repeat(np.arange(C), counts)
        X = np.empty((len(labels), D), dtype=np.float32)
        for start in range(0, len(labels), SYNTHETIC_CHUNK):  # float64 temporaries of one chunk, same draws
            rows = slice(start, start + SYNTHETIC_CHUNK)
            X[rows] = centres[labels[rows]] + rng.normal(0.0, cfg.noise, size=(len(labels[rows]), D))
        order = rng.permutation(len(labels))
        return Split(X[order], labels[order].astype(np.int64))

    train = sample(cfg.train_per_class)
    test = sample(cfg.test_per_class)
    classes = [f"c{c:0{len(str(C - 1))}d}" for c in range(C)]
    groups = [np.flatnonzero(group_of == g).tolist() for g in range(G)]
    return classes, train, test, groups


# ---------------------------------------------------------------------------
# the entry point


def split_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified, seeded (train, val) split; every class keeps a training example."""
    counts = np.bincount(train.labels)
    single = np.flatnonzero(counts == 1)
    if len(single):
        raise DataError(
            f"class {int(single[0])} has one training example; a validation split needs at least 2 per class"
        )
    index = np.arange(len(train))
    n_val = max(int(round(fraction * len(train))), int((counts > 0).sum()))
    if n_val >= len(train) - int((counts > 0).sum()) + 1:
        raise DataError(f"data.val_fraction={fraction}: too few training examples ({len(train)}) to carve a validation split")
    from sklearn.model_selection import train_test_split  # here: a Ray worker need not pay its import

    fit_index, val_index = train_test_split(index, test_size=n_val, random_state=seed, stratify=train.labels)
    return train.take(np.sort(fit_index)), train.take(np.sort(val_index))


def _subsample(split: Split, n: int, seed: int) -> Split:
    if n <= 0 or n >= len(split):
        return split
    from sklearn.model_selection import train_test_split

    index, _ = train_test_split(np.arange(len(split)), train_size=n, random_state=seed, stratify=split.labels)
    return split.take(np.sort(index))


def fold_of_rows(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) fold index in [0, folds) per row, stratified by label and seeded.

    Each class's rows are shuffled and dealt round-robin, starting at a random
    fold, so every fold holds about 1/folds of every class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if folds < 2:
        raise ValueError(f"folds={folds} must be >= 2")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold[rows] = (np.arange(len(rows)) + rng.integers(folds)) % folds
    return fold


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    """Read and validate the configured source, then carve the validation split."""
    planted = None
    if cfg.kind == "csv_text":
        name, classes, train, test = load_csv_text(cfg)
        input_kind = "text"
    elif cfg.kind == "npz":
        name, classes, train, test = load_npz(cfg)
        input_kind = "features" if train.inputs.ndim == 2 else "image"
    elif cfg.kind == "mnist":
        name, classes, train, test = load_mnist(cfg)
        input_kind = "image"
    elif cfg.kind == "synthetic":
        classes, train, test, planted = make_synthetic(cfg.synthetic, seed)
        name, input_kind = "synthetic", "features"
    else:  # config validation already rejects this
        raise DataError(f"data.kind={cfg.kind!r} is not a data source")
    if len(classes) < 2:
        source = f"data.train={cfg.train!r}" if cfg.kind == "csv_text" else f"data.path={cfg.path!r}"
        raise DataError(f"{source}: the training data hold only {len(classes)} class {classes}; a classifier "
                        "needs at least 2")
    train = _subsample(train, cfg.max_train, seed)
    fit, val = split_validation(train, cfg.val_fraction, seed)
    if cfg.holdout_folds:  # a run that must not see one fold of the training split (distillation's out-of-fold targets)
        fit = fit.take(np.flatnonzero(fold_of_rows(fit.labels, cfg.holdout_folds, seed) != cfg.holdout_fold))
    missing = np.flatnonzero(np.bincount(fit.labels, minlength=len(classes)) == 0)
    if len(missing):
        raise DataError(f"class {classes[missing[0]]!r} has no training examples left after the split")
    return Dataset(cfg.name or name, input_kind, classes, fit, val, test, planted)


# ---------------------------------------------------------------------------
# settings that depend on the data, checked before anything trains


def check_run_fits_data(cfg: RunConfig, dataset: Dataset) -> None:
    """Refuse, naming the key, settings the data make impossible, before the generalist trains.

    Raises ConfigError for a setting that needs more classes than the data
    have, DataError for an unreadable `cluster.split` file.
    """
    n = dataset.n_classes
    _require_fit(cfg.combine.top_n <= n, "combine.top_n", cfg.combine.top_n,
                 f"the data have {n} classes; set combine.top_n to at most {n}")
    c = cfg.cluster
    if not c.enabled:
        return
    _require_fit(c.n_clusters <= n, "cluster.n_clusters", c.n_clusters,
                 f"the data have {n} classes; set cluster.n_clusters to at most {n} (0: from classes_per_cluster)")
    _require_fit(c.min_cluster_size <= n, "cluster.min_cluster_size", c.min_cluster_size,
                 f"the data have {n} classes, so no group could be kept")
    k = c.groups(n)
    _require_fit(not c.max_cluster_size or k * c.max_cluster_size >= n, "cluster.max_cluster_size",
                 c.max_cluster_size, f"{k} groups of at most {c.max_cluster_size} cannot hold the data's {n} classes")
    if c.split not in ("val", "train", "test"):
        check_unlabeled_file(c.split, dataset, cfg.data.text_column, "cluster.split")


def _require_fit(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def check_unlabeled_file(path: str, dataset: Dataset, text_column: str, key: str) -> None:
    """Check the head of a file of unlabeled inputs: a CSV with `text_column` for text runs, else a .npy
    array of the data's input shape. Reads the CSV header and the .npy header only."""
    file = resolve_path(path)
    if not file.is_file():
        raise DataError(f"{key}={path!r}: not val/train/test and no such file")
    if dataset.input_kind == "text":
        try:
            with open(file, newline="", encoding="utf-8-sig") as handle:
                header = next(csv.reader(handle), [])
        except (UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{key}={path!r}: the header is not a readable UTF-8 CSV line: {err}") from None
        if text_column not in header:
            raise DataError(f"{key}={path!r}: no column {text_column!r} (data.text_column); its columns are {header}")
        return
    try:
        inputs = np.load(file, mmap_mode="r", allow_pickle=False)  # maps the file; reads the header only
    except Exception as err:  # numpy raises several types for a bad file
        raise DataError(f"{key}={path!r}: not a readable .npy array: {err}") from None
    if not isinstance(inputs, np.ndarray) or tuple(inputs.shape[1:]) != dataset.input_shape:
        shape = getattr(inputs, "shape", type(inputs).__name__)
        raise DataError(f"{key}={path!r}: inputs have shape {shape}, the model expects "
                        f"(N, {', '.join(map(str, dataset.input_shape))})")


def read_unlabeled_inputs(path: str, dataset: Dataset, text_column: str, key: str) -> list[str] | np.ndarray:
    """The inputs of a file of unlabeled examples named by `key` (cluster.split, transfer.split): the
    `text_column` of a CSV for text data, else an (N, ...) .npy array of the data's input shape, N >= 1."""
    check_unlabeled_file(path, dataset, text_column, key)
    file = resolve_path(path)
    if dataset.input_kind == "text":
        texts, _ = read_text_csv(str(file), text_column, text_column, key)  # the text column stands in for labels
        return texts
    inputs = np.load(file, allow_pickle=False)
    if len(inputs) == 0:
        raise DataError(f"{key}={path!r}: inputs have shape {inputs.shape}; the model expects "
                        f"(N, {', '.join(map(str, dataset.input_shape))}) with N >= 1")
    if inputs.dtype.kind in "fc" and not np.isfinite(inputs).all():
        row = int(np.flatnonzero(~np.isfinite(inputs.reshape(len(inputs), -1)).all(1))[0])
        raise DataError(f"{key}={path!r}: row {row} holds NaN or infinity")
    return inputs
