"""`specialists predict`: a run's predictions for a file of inputs, streamed into a CSV.

    specialists predict RUN_DIR --input new.csv --output predictions.csv [--top-k 3]

Inputs are read `batch_size` rows at a time, never whole:
- text runs: the text column of a CSV (`column`, default the run's data.text_column),
  or a .txt file with one text per line;
- feature and image runs: (N, *input_shape) rows of a .npy, .npz or .csv (`arrays.py`;
  a CSV row holds the flattened example).

Output columns: row (0-based index of the input), label, score (its combined
probability); with top_k > 1 also label_1, score_1, ..., label_k, score_k, best first
(label_1 is label). The rows are those of `load(run).predict` and `predict_proba`. The
file appears whole or not at all: it is written to a temporary file, then renamed.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .arrays import ArrayFileError, open_rows
from .data import CSV_FIELD_LIMIT, DataError
from .rundir import atomic_write

__all__ = ["predict_file", "output_header"]

TEXT_FORMATS = (".csv", ".txt")


def output_header(top_k: int) -> list[str]:
    ranked = [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("label", "score")] if top_k > 1 else []
    return ["row", "label", "score", *ranked]


def predict_file(run_dir: str | Path, input: str | Path, output: str | Path, *, top_k: int = 1,
                 batch_size: int = 1024, column: str | None = None, device: str = "auto", **options) -> int:
    """Predict every row of `input` with the run's model and write the CSV `output`; returns the row count.

    options: those of `specialists.load` (top_n, dustbin, specialist_weight, use_specialists).
    """
    from .ensemble import SpecialistsModel, top_classes

    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size} must be >= 1")
    model = SpecialistsModel(run_dir, device, **options)
    n_classes = len(model.classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_classes:
        raise DataError(f"--top-k {top_k} must be between 1 and the number of classes ({n_classes})")
    path = Path(input)
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    if model.input_kind == "text":
        batches = _text_batches(path, column or _text_column(model), batch_size)
    else:
        batches = _array_batches(path, tuple(model.generalist.input_shape), batch_size)
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(output_header(top_k))
            for inputs in batches:
                index, scores = top_classes(model.predict_proba(inputs, batch_size), top_k)
                for i, s in zip(index.tolist(), scores.tolist()):
                    ranked = [v for c, p in zip(i, s) for v in (model.classes[c], f"{p:.9g}")] if top_k > 1 else []
                    writer.writerow([count, model.classes[i[0]], f"{s[0]:.9g}", *ranked])
                    count += 1

    atomic_write(output, write)
    return count


def _text_column(model) -> str:
    from .config import load_config

    return load_config(model.run.config).data.text_column if model.run.config.is_file() else "text"


def _text_batches(path: Path, column: str, rows: int) -> Iterator[list[str]]:
    """Lists of up to `rows` texts: a CSV's `column`, or the lines of a .txt file."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_FORMATS:
        raise DataError(f"--input {path}: a text run reads {' or '.join(TEXT_FORMATS)} files (texts in the "
                        f"column {column!r} of a CSV, or one text a line), not {suffix or 'a file with no suffix'}")
    # checked before the first batch, so that a wrong column fails before any output is written
    header = _csv_header(path) if suffix == ".csv" else None
    if header is not None and header.count(column) != 1:
        raise DataError(f"--input {path} has {header.count(column) or 'no'} column{'s' * (header.count(column) > 1)}"
                        f" named {column!r}; its columns are {header} (choose one with --column)")

    def lines() -> Iterator[list[str]]:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            while chunk := [line.rstrip("\r\n") for line in itertools.islice(handle, rows)]:
                yield chunk

    def records() -> Iterator[list[str]]:
        at = header.index(column)
        previous = csv.field_size_limit(CSV_FIELD_LIMIT)  # process-wide: restored below
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle)
                next(reader)
                while True:
                    chunk = []
                    for row in itertools.islice(reader, rows):
                        if not row:
                            continue
                        if len(row) != len(header):
                            raise DataError(f"--input {path} line {reader.line_num} has {len(row)} fields, the "
                                            f"header has {len(header)}")
                        chunk.append(row[at])
                    if not chunk:
                        return
                    yield chunk
        except csv.Error as err:
            raise DataError(f"--input {path} is not a readable CSV: {err}") from None
        finally:
            csv.field_size_limit(previous)

    def decoded(chunks: Iterator[list[str]]) -> Iterator[list[str]]:
        try:
            yield from chunks
        except UnicodeDecodeError as err:
            raise DataError(f"--input {path} is not UTF-8 text ({err})") from None

    return decoded(records() if header is not None else lines())


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"--input {path}: cannot read its header as UTF-8 CSV ({err})") from None


def _array_batches(path: Path, input_shape: tuple[int, ...], rows: int) -> Iterator[np.ndarray]:
    expected = f"examples of shape (N, {', '.join(map(str, input_shape))})"
    try:
        source = open_rows(path, what=expected)
    except ArrayFileError as err:
        raise DataError(f"--input {err}") from None
    width = int(np.prod(input_shape))
    flat = source.shape[1:] == (width,) and len(input_shape) > 1  # a CSV row, or a flattened array
    if tuple(source.shape[1:]) != input_shape and not flat:
        raise DataError(f"--input {source.name} has rows of shape {tuple(source.shape[1:])}; the run's model reads "
                        f"{expected}")

    def batches() -> Iterator[np.ndarray]:
        try:
            for _, batch in source.batches(rows):
                yield batch.reshape(len(batch), *input_shape) if flat else batch
        except ArrayFileError as err:
            raise DataError(f"--input {err}") from None

    return batches()
