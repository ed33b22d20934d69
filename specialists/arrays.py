"""Rows of numbers streamed from a file (.npy, .npz, .csv) or an array, in bounded memory.

    rows = open_rows("logits.npy")          # Rows: shape (N, C), dtype, header
    for start, batch in rows.batches(4096): # (B, C) numpy arrays in the file's dtype
        ...

How each format is read, so that memory holds one batch, never the file:

- .npy in C order: plain sequential reads from after the header into a fresh
  (B, ...) array per batch. Not memory-mapped: the mapped pages of a file read
  through count in the process's resident memory until the kernel reclaims
  them, while a read holds one batch. A Fortran-order .npy is memory-mapped
  (np.load(mmap_mode="r")) and its rows sliced from the map.
- .npz: the member named `key`, else the only member. A member is streamed the
  same way as a .npy, decompressed on the fly when the file was written by
  np.savez_compressed, so no member is loaded whole (a Fortran-order member is:
  the zip format cannot seek into it).
- .csv: numbers separated by commas, one row per line, parsed `rows` lines at a
  time; a first line that is not all numbers is a header (`Rows.header`). The
  number of rows is known only once the file has been read (`shape[0]` None).

Every problem is an ArrayFileError that names the file and what was expected.
"""

from __future__ import annotations

import csv
import itertools
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["ArrayFileError", "Rows", "open_rows", "FORMATS"]

FORMATS = (".npy", ".npz", ".csv")


class ArrayFileError(ValueError):
    """An array file is missing, unreadable or not the rows of numbers expected; the message names the file."""


@dataclass
class Rows:
    """A source of rows: `batches(rows)` yields (start, (B, *shape[1:]) array) in order.

    shape: (N, *row_shape), N None until a CSV has been read through.
    header: the CSV's header fields, else None. name: the file (or "array") for messages.
    """

    name: str
    shape: tuple
    dtype: np.dtype
    header: list[str] | None = None
    _open: Callable[[int], Iterator[np.ndarray]] = field(default=None, repr=False)

    @property
    def n_rows(self) -> int | None:
        return self.shape[0]

    def batches(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        if rows < 1:
            raise ValueError(f"rows={rows} must be >= 1")
        start = 0
        for batch in self._open(rows):
            yield start, batch
            start += len(batch)


def open_rows(source: Any, key: str | None = None, what: str = "rows of numbers", *,
              default_key: str | None = None) -> Rows:
    """Rows of a .npy/.npz/.csv file (path) or of an array-like (numpy array, torch tensor, list).

    key: the .npz member to read; without it the only member, or when there are
    several, the one named `default_key` if there is one. what: what the rows
    should be, for error messages ("probabilities (N, C)").
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ArrayFileError(f"{path}: no such file (expected {what} in {', '.join(FORMATS)})")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _npy_rows(path, what)
        if suffix == ".npz":
            return _npz_rows(path, key, what, default_key)
        if suffix == ".csv":
            return _csv_rows(path, what)
        raise ArrayFileError(f"{path}: unknown format {suffix or '(no suffix)'!r}; expected {what} in "
                             f"{', '.join(FORMATS)}")
    array = source.detach().cpu().numpy() if hasattr(source, "detach") else np.asarray(source)
    _check_dtype(array.dtype, "array", what)
    if array.ndim < 1:
        raise ArrayFileError(f"array: expected {what}, got a scalar")
    return Rows("array", array.shape, array.dtype, _open=_slicer(array))


def _slicer(array) -> Callable[[int], Iterator[np.ndarray]]:
    """Batches of rows, each a copy, of an array in memory or memory-mapped."""
    return lambda rows: (np.array(array[s:s + rows]) for s in range(0, len(array), rows))


def _check_dtype(dtype: np.dtype, name: str, what: str) -> None:
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ArrayFileError(f"{name}: dtype {dtype} is not a real number type; expected {what}")


def _read_full(stream, buffer: memoryview) -> int:
    """Fill `buffer` from `stream` (reads may return less than asked); the bytes read."""
    done = 0
    while done < len(buffer):
        n = stream.readinto(buffer[done:])
        if not n:
            break
        done += n
    return done


def _stream_rows(name: str, opener: Callable[[], Any], shape: tuple, dtype: np.dtype,
                 rows: int) -> Iterator[np.ndarray]:
    """C-order rows from a stream positioned at the first data byte; a fresh array per batch."""
    n = shape[0]
    row_shape = shape[1:]
    with opener() as stream:
        for start in range(0, n, rows):
            batch = np.empty((min(rows, n - start), *row_shape), dtype=dtype)
            view = memoryview(batch.reshape(-1).view(np.uint8))
            if _read_full(stream, view) != len(view):
                raise ArrayFileError(f"{name}: the file ends inside row {start} to {start + len(batch)}; its header "
                                     f"promises shape {shape} (a truncated copy?)")
            yield batch


def _npy_rows(path: Path, what: str) -> Rows:
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header; touches no data page
    except (ValueError, OSError, EOFError) as err:
        raise ArrayFileError(f"{path}: not a readable .npy file ({err}); expected {what}") from None
    _check_dtype(mapped.dtype, str(path), what)
    if mapped.ndim < 1:
        raise ArrayFileError(f"{path}: holds a scalar; expected {what}")
    shape, dtype = mapped.shape, mapped.dtype
    if mapped.ndim > 1 and not mapped.flags.c_contiguous:  # Fortran order: rows are strided, slice the map
        return Rows(str(path), shape, dtype, _open=_slicer(mapped))
    offset = mapped.offset

    def opener():
        handle = open(path, "rb")
        handle.seek(offset)
        return handle

    return Rows(str(path), shape, dtype, _open=lambda rows: _stream_rows(str(path), opener, shape, dtype, rows))


def _npz_rows(path: Path, key: str | None, what: str, default_key: str | None) -> Rows:
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as err:
        raise ArrayFileError(f"{path}: not a readable .npz file ({err}); expected {what}") from None
    if key is None and len(members) > 1 and default_key in members:
        key = default_key
    if key is None and len(members) != 1:
        named = f", or one named {default_key!r}" if default_key else ""
        raise ArrayFileError(f"{path} holds {len(members)} arrays {members}; expected one array of {what} "
                             f"(save it alone{named})")
    member = key if key is not None else members[0]
    if member not in members:
        raise ArrayFileError(f"{path} has no array {member!r}; it holds {members}")
    name = f"{path}[{member}]"

    def opener():
        archive = zipfile.ZipFile(path)
        stream = archive.open(f"{member}.npy")
        return _ClosingStream(stream, archive)

    try:
        with opener() as stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
            header_end = stream.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ArrayFileError(f"{name}: not a readable array ({err}); expected {what}") from None
    _check_dtype(dtype, name, what)
    if len(shape) < 1:
        raise ArrayFileError(f"{name}: holds a scalar; expected {what}")
    if fortran and len(shape) > 1:  # rows are strided through the whole member: read it whole
        with np.load(path, allow_pickle=False) as archive:
            array = np.ascontiguousarray(archive[member])
        return Rows(name, shape, dtype, _open=_slicer(array))

    def positioned():
        stream = opener()
        stream.read(header_end)  # deflated members cannot seek: read past the header
        return stream

    return Rows(name, tuple(shape), dtype, _open=lambda rows: _stream_rows(name, positioned, tuple(shape), dtype, rows))


class _ClosingStream:
    """A zip member's stream that closes its archive too."""

    def __init__(self, stream, archive):
        self._stream, self._archive = stream, archive

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()
        self._archive.close()


def _parse_floats(fields: list[str]) -> bool:
    try:
        for f in fields:
            float(f)
    except ValueError:
        return False
    return True


def _csv_rows(path: Path, what: str) -> Rows:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            first = handle.readline()
    except (OSError, UnicodeDecodeError) as err:
        raise ArrayFileError(f"{path}: cannot be read as UTF-8 text ({err}); expected {what}") from None
    if not first.strip():
        raise ArrayFileError(f"{path} is empty; expected {what}, one row per line")
    fields = next(csv.reader([first]))
    header = None if _parse_floats(fields) else [f.strip() for f in fields]
    width = len(fields)

    def batches(rows: int) -> Iterator[np.ndarray]:
        with open(path, encoding="utf-8", newline="") as handle:
            line_no = 1
            if header is not None:
                handle.readline()
                line_no = 2
            while True:
                read = list(itertools.islice(handle, rows))
                if not read:
                    return
                lines = [ln for ln in read if ln.strip()]
                if lines:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)
                            batch = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2)
                    except ValueError as err:
                        raise ArrayFileError(f"{path}, lines {line_no} to {line_no + len(lines) - 1}: {err}; "
                                             f"expected {what}: {width} numbers a line") from None
                    if batch.shape[1] != width:
                        raise ArrayFileError(f"{path}, lines {line_no} to {line_no + len(lines) - 1}: rows of "
                                             f"{batch.shape[1]} numbers, the first line has {width}")
                    yield batch
                line_no += len(read)

    return Rows(str(path), (None, width), np.dtype(np.float64), header=header, _open=batches)
