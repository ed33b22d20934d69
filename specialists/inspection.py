"""`specialists inspect`: the clustering report from any model's outputs, no run directory.

    import specialists
    specialists.inspect(logits="val_logits.npy", labels="val_labels.npy", classes="classes.txt",
                        out="inspect/", classes_per_cluster=10)

or `specialists inspect --logits val_logits.npy --labels val_labels.npy --classes classes.txt
--out inspect/ cluster.classes_per_cluster=10`. One streamed pass over the file checks each
batch (finite values; probability rows >= 0 and summing to 1), turns it into probabilities
(softmax(z / T) for logits, p^(1/T) renormalised for probabilities, T = cluster.temperature),
adds it to the (C, C) covariance (`covariance.CovarianceAccumulator`, float32 products) and,
with labels, records the rows whose arg-max is wrong. Memory is O(C^2 + batch x C) whatever
N is (plus 8 bytes a row for labels); see `arrays.py` for how each file format is read.
The clusters are `ConfusionClusterer`'s on that covariance, with the `cluster` settings of
`specialists run`.

Nothing is written until the whole input has been read and checked; the report is then
written into a temporary folder beside `out` and renamed into place. `out` may be a new
or empty folder, or one holding an earlier inspect report (replaced whole).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .arrays import ArrayFileError, Rows, open_rows
from .cluster import InvalidParameterError, clusters_to_json
from .config import ClusterConfig, ConfigError, RunConfig, load_config
from .covariance import CovarianceAccumulator, correlation_from_covariance

__all__ = ["InspectError", "Inspection", "inspect", "inspect_config", "INSPECT_FILES"]

# What an inspect folder holds: a folder of only these may be replaced by a new report.
INSPECT_FILES = ("index.html", "summary.md", "heatmap.png", "cluster_sizes.png", "clusters.json")
# Cluster settings that choose rows or signals of a run's generalist: no meaning for a file of outputs.
NOT_FOR_INSPECT = ("enabled", "split", "signal", "folds")
TOP_LEVEL_KEYS = ("seed", "device", "threads")
# How far a probability row may sum from 1: float16 files round each entry to 2^-11 relative.
SUM_TOL = {2: 5e-3}
DEFAULT_SUM_TOL = 1e-3

Log = Callable[[str], None]


class InspectError(ValueError):
    """An input of `inspect` is missing or not what was expected; the message names the file."""


@dataclass(frozen=True)
class Inspection:
    """What `inspect` wrote: the folder, its files ({"html", "markdown", "heatmap",
    "cluster_sizes", "clusters"} -> path), clusters.json as a dict, and the terminal summary."""

    out: Path
    paths: dict
    clusters: dict
    summary: str


def inspect_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The settings of an inspection from `cluster.key=value` (and `seed=`, `device=`, `threads=`) overrides."""
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in TOP_LEVEL_KEYS:
            continue
        if not key.startswith("cluster."):
            raise ConfigError(f"specialists inspect takes cluster.key=value overrides (and {', '.join(TOP_LEVEL_KEYS)})"
                              f", got {text!r}")
        if key[len("cluster."):] in NOT_FOR_INSPECT:
            raise ConfigError(f"{key} does not apply to inspect: it reads the outputs it is given "
                              f"(use cluster.temperature to soften them)")
    return load_config(None, list(overrides))


def inspect(probs: Any = None, logits: Any = None, labels: Any = None, classes: Any = None,
            out: str | Path | None = None, *, log: Log | None = None, **settings) -> Inspection:
    """Cluster the classes of any model from its outputs and write the report.

    probs / logits (exactly one): a .npy, .npz or .csv file, or an array, of shape (N, C).
    labels: (N,) true classes, optional: a file (.npy, .npz, .csv or .txt: one per line) or
        an array, of indices in [0, C) or of class names (then `classes` is needed). With
        them the report adds the share of errors inside one cluster and the confused pairs.
    classes: C class names: a .json list, a .txt file (one per line) or a list; default the
        header of a CSV of outputs, else "0".."C-1".
    out: the folder to write (index.html, summary.md, heatmap.png, cluster_sizes.png,
        clusters.json); default runs/inspect-<time>.
    settings: the `cluster` config keys (n_clusters, classes_per_cluster, normalize,
        temperature, batch_size, ...) and seed, device, threads.

    Raises InspectError for a bad input (naming the file), ConfigError for a bad setting;
    in both cases before anything is written.
    """
    overrides = [f"{k}={json.dumps(v)}" if k in TOP_LEVEL_KEYS else f"cluster.{k}={json.dumps(v)}"
                 for k, v in settings.items()]
    return run_inspect(inspect_config(overrides), probs=probs, logits=logits, labels=labels, classes=classes,
                       out=out, log=log or (lambda _: None))


def run_inspect(cfg: RunConfig, *, probs: Any = None, logits: Any = None, labels: Any = None,
                classes: Any = None, out: str | Path | None = None, log: Log = print) -> Inspection:
    """`inspect` with its settings already resolved (the CLI's entry)."""
    from .runtime import default_out_dir, setup_torch

    if (probs is None) == (logits is None):
        raise InspectError("give exactly one of probs (rows summing to 1) or logits (unnormalised scores), "
                           f"got {'both' if probs is not None else 'neither'}")
    kind = "logits" if logits is not None else "probs"
    what = "logits (N, C)" if kind == "logits" else "probabilities (N, C), rows summing to 1"
    rows = _open(logits if kind == "logits" else probs, what, kind)
    n_classes = rows.shape[1]
    names = _class_names(classes, rows, n_classes)
    y = _labels(labels, names, rows.n_rows, n_classes, classes is not None) if labels is not None else None
    out = Path(out) if out is not None else default_out_dir("inspect")
    _check_out(out)
    device = setup_torch(cfg)
    clusterer = _clusterer(cfg)

    started = time.perf_counter()
    cov, n_rows, pairs, correct = _stream(rows, kind, cfg.cluster, y, _name(labels), device)
    seconds = time.perf_counter() - started
    try:
        clusterer.fit(cov)
    except InvalidParameterError as err:  # a setting that fails against this C, e.g. n_clusters > C
        raise ConfigError(f"cluster.{err}") from None

    clusters = clusters_to_json(clusterer, names)
    clusters.update({"input": rows.name, "signal": kind, "temperature": cfg.cluster.temperature,
                     "examples": n_rows})
    section = {"input": rows.name, "signal": kind, "rows": n_rows, "classes": n_classes,
               "temperature": cfg.cluster.temperature, "covariance_seconds": round(seconds, 3)}
    if pairs is not None:
        from .report import error_share_inside

        section.update({"labels": _name(labels), "accuracy": correct / n_rows if n_rows else float("nan"),
                        "errors": len(pairs), "errors_inside_clusters": error_share_inside(pairs, clusterer.groups_)[2]})
        clusters["errors_inside_clusters"] = section["errors_inside_clusters"]
    paths, summary = _write(out, cfg, names, cov, clusterer, clusters, pairs, section)
    log(summary)
    log(f"report: {paths['html']}")
    return Inspection(out=out, paths=paths, clusters=clusters, summary=summary)


# --------------------------------------------------------------------------- inputs


def _name(source: Any) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"the {type(source).__name__} given"


def _open(source: Any, what: str, kind: str) -> Rows:
    try:
        rows = open_rows(source, what=what, default_key=kind)
    except ArrayFileError as err:
        raise InspectError(str(err)) from None
    if len(rows.shape) != 2 or rows.shape[1] < 2:
        raise InspectError(f"{rows.name} has shape {rows.shape}; expected {what} with C >= 2 classes")
    if rows.n_rows == 0:
        raise InspectError(f"{rows.name} has no rows; expected {what}")
    return rows


def _class_names(classes: Any, rows: Rows, n_classes: int) -> list[str]:
    if classes is None:
        return list(rows.header) if rows.header is not None else [str(i) for i in range(n_classes)]
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if not path.is_file():
            raise InspectError(f"{path}: no such file (expected the C={n_classes} class names, .json or .txt)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InspectError(f"{path}: cannot be read as UTF-8 text ({err})") from None
        if path.suffix.lower() == ".json":
            try:
                names = json.loads(text)
            except json.JSONDecodeError as err:
                raise InspectError(f"{path} is not valid JSON ({err}); expected a list of {n_classes} "
                                   "class names") from None
            if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
                raise InspectError(f"{path}: expected a JSON list of {n_classes} class names")
        else:  # .txt: one name a line; a trailing newline is not a class
            names = text.split("\n")
            if names and names[-1] == "":
                names.pop()
            names = [n.rstrip("\r") for n in names]
    else:
        names = list(classes)
    names = [str(n) for n in names]
    if len(names) != n_classes:
        raise InspectError(f"{_name(classes)} lists {len(names)} class names but {rows.name} has "
                           f"{n_classes} columns; expected one name per column")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InspectError(f"{_name(classes)}: class name {dup!r} appears twice; expected {n_classes} distinct names")
    return names


def _labels(source: Any, names: list[str], n_rows: int | None, n_classes: int, named: bool) -> np.ndarray:
    """(N,) int64 class indices; names are looked up in `names` (only when classes were given)."""
    label = _name(source)
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() in (".csv", ".txt"):
        values = _text_labels(Path(source), names if named else None)
    else:
        try:
            rows = open_rows(source, what="(N,) labels", default_key="labels") if isinstance(source, (str, Path)) \
                else None
        except ArrayFileError as err:
            raise InspectError(str(err)) from None
        if rows is not None:
            values = np.concatenate([b for _, b in rows.batches(1 << 20)]) if rows.n_rows else np.zeros(0, np.int64)
        else:
            values = np.asarray(source.detach().cpu().numpy() if hasattr(source, "detach") else source)
        if values.dtype.kind in "USO":
            values = _names_to_indices([str(v) for v in values.reshape(-1)], names if named else None, label)
    values = np.asarray(values)
    if values.ndim != 1:
        raise InspectError(f"{label} has shape {values.shape}; expected (N,) labels, one per row")
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            bad = int(np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))[0])
            raise InspectError(f"{label}, row {bad}: {values[bad]} is not a class index; expected integers in "
                               f"[0, {n_classes})")
    elif values.dtype.kind not in "iub":
        raise InspectError(f"{label}: dtype {values.dtype}; expected integer class indices or class names")
    values = values.astype(np.int64)
    bad = np.flatnonzero((values < 0) | (values >= n_classes))
    if len(bad):
        raise InspectError(f"{label}, row {int(bad[0])}: class {int(values[bad[0]])} is outside [0, {n_classes}) "
                           f"(the outputs have {n_classes} columns)")
    if n_rows is not None and len(values) != n_rows:
        raise InspectError(f"{label} has {len(values)} labels but the outputs have {n_rows} rows; expected one "
                           "label per row")
    return values


def _text_labels(path: Path, names: list[str] | None) -> np.ndarray:
    """One label per line: integers, or class names; a first line that is neither is a header."""
    if not path.is_file():
        raise InspectError(f"{path}: no such file (expected (N,) labels, one per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InspectError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    fields = [ln.strip().strip('"') for ln in lines]
    while fields and fields[-1] == "":
        fields.pop()

    def is_int(s: str) -> bool:
        return s.lstrip("-").isdigit()

    if fields and not is_int(fields[0]) and (names is None or fields[0] not in names):
        fields = fields[1:]  # a header ("label")
    if all(is_int(f) for f in fields):
        return np.array([int(f) for f in fields], dtype=np.int64)
    return _names_to_indices(fields, names, str(path))


def _names_to_indices(values: list[str], names: list[str] | None, label: str) -> np.ndarray:
    if names is None:
        raise InspectError(f"{label} holds class names ({values[0]!r}, ...); pass the classes file too, so that "
                           "each name can be matched to its column")
    index = {n: i for i, n in enumerate(names)}
    for row, v in enumerate(values):
        if v not in index:
            raise InspectError(f"{label}, row {row}: {v!r} is not one of the {len(names)} class names")
    return np.array([index[v] for v in values], dtype=np.int64)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in INSPECT_FILES)
        if others:
            raise InspectError(f"--out {out} holds files that are not an inspect report ({', '.join(others[:3])}); "
                               "pick a new or empty folder")


def _clusterer(cfg: RunConfig):
    from .stages import make_clusterer

    return make_clusterer(cfg)


# --------------------------------------------------------------------------- the pass over the outputs


def _stream(rows: Rows, kind: str, cfg: ClusterConfig, labels: np.ndarray | None, labels_name: str,
            device: torch.device):
    """One pass: check each batch, accumulate the covariance of its probabilities, count errors.

    Returns ((C, C) float64 covariance, N, (E, 2) (true, predicted) pairs or None, correct count).
    """
    n_classes = rows.shape[1]
    accumulator = CovarianceAccumulator(n_classes, device, validate=False)  # checked here, with the file's name
    tol = SUM_TOL.get(rows.dtype.itemsize, DEFAULT_SUM_TOL)
    temperature = cfg.temperature
    # Arg-max per row, filled batch by batch: one allocation up front (the labels' size), where a list of
    # per-batch error arrays would pin freed batch buffers in the heap and let memory creep up with N.
    predicted = np.empty(len(labels), dtype=np.int64) if labels is not None else None
    n = 0
    for start, batch in rows.batches(cfg.batch_size):
        values = np.asarray(batch, dtype=np.float32)  # (B, C); float16 files too
        x = torch.from_numpy(values).to(device)
        _check_batch(x, start, rows.name, kind, tol)
        if kind == "logits":
            p = torch.softmax(x / temperature if temperature != 1 else x, dim=1)
        elif temperature != 1:  # p^(1/T) renormalised = softmax(log p / T); p = 0 stays 0
            p = torch.softmax(torch.log(x) / temperature, dim=1)
        else:
            p = x
        accumulator.update(p)
        if labels is not None:
            if start + len(x) > len(labels):
                raise InspectError(f"{labels_name} has {len(labels)} labels but {rows.name} has more rows")
            # numpy's arg-max is several times cheaper than torch's on CPU
            predicted[start:start + len(x)] = values.argmax(1) if device.type == "cpu" else x.argmax(1).cpu().numpy()
        n += len(x)
    if n == 0:
        raise InspectError(f"{rows.name} has no rows")
    if labels is None:
        return accumulator.covariance(), n, None, 0
    if n != len(labels):  # a CSV's length is known only now
        raise InspectError(f"{labels_name} has {len(labels)} labels but {rows.name} has {n} rows")
    wrong = predicted != labels
    error_pairs = np.stack([labels[wrong], predicted[wrong]], axis=1)
    return accumulator.covariance(), n, error_pairs, int(len(labels) - wrong.sum())


def _check_batch(x: torch.Tensor, start: int, name: str, kind: str, tol: float) -> None:
    # Fast path: one row-sum pass (NaN and inf propagate into it; an isfinite pass costs
    # several times more on CPU); the offending entry is located only when a sum is bad.
    sums = x.sum(1)  # (B,)
    if not bool(torch.isfinite(sums).all()):
        for row in torch.nonzero(~torch.isfinite(sums)).flatten().tolist():
            bad = ~torch.isfinite(x[row])
            if bool(bad.any()):  # else the sum overflowed: huge but finite values
                col = int(torch.nonzero(bad)[0])
                raise InspectError(f"{name}, row {start + row}: column {col} is {float(x[row, col])}; expected "
                                   f"finite {kind}")
    if kind == "logits":
        return
    if float(x.min()) < 0:
        row = int(torch.nonzero((x < 0).any(1))[0])
        raise InspectError(f"{name}, row {start + row}: a negative probability ({float(x[row].min()):.4g}); "
                           "expected probabilities (rows >= 0 summing to 1). If these are logits, pass --logits")
    off = (sums - 1).abs()
    if bool((off > tol).any()):
        row = int(torch.nonzero(off > tol)[0])
        raise InspectError(f"{name}, row {start + row}: probabilities sum to {float(x[row].double().sum()):.6g}, "
                           f"not 1 (tolerance {tol:g}); expected probabilities. If these are logits (unnormalised "
                           "scores), pass --logits instead of --probs")


# --------------------------------------------------------------------------- the report


def _write(out: Path, cfg: RunConfig, names, cov, clusterer, clusters, pairs, section) -> tuple[dict, str]:
    """The report and clusters.json into a temporary folder beside `out`, then renamed onto `out`."""
    from .report import format_summary, write_report
    from .rundir import replace_folder, write_json

    kind = "covariance" if cfg.cluster.normalize == "covariance" else "correlation"
    matrix = cov if kind == "covariance" else correlation_from_covariance(cov)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        paths = write_report(tmp, names, matrix, clusterer.groups_, matrix_kind=kind,
                             uncovered=clusterer.uncovered_, error_pairs=pairs, metrics={"inspect": section},
                             settings=clusters["settings"], title=f"specialists inspect: {Path(section['input']).name}")
        paths["clusters"] = write_json(tmp / "clusters.json", clusters)
        _check_out(out)  # still free, or an earlier report
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = format_summary(len(names), clusterer.groups_, uncovered=clusterer.uncovered_, error_pairs=pairs)
    return {key: out / path.name for key, path in paths.items()}, summary
