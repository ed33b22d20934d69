"""The stages of `specialists run`, each reading and writing the run directory.

data -> generalist -> (clusters -> specialists -> combination -> report, as
they exist). A stage whose outputs are already complete in the run directory
is skipped on `--resume`; each writes its files atomically and records its
metrics and seconds last, so "metrics say done" means "files are whole".
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

import numpy as np

from .cluster import ConfusionClusterer, CovarianceAccumulator, clusters_to_json, errors_inside_clusters
from .config import ConfigError, RunConfig, dump_config, load_config
from .data import Dataset, DataError, load_dataset, read_text_csv, resolve_path
from .generalist import fit_generalist
from .models import create_model, load_checkpoint, model_kwargs, resolve_device, save_checkpoint
from .parallel import train_specialists
from .peer import train_peers
from .report import format_results, format_summary, write_report
from .rundir import RunDir, RunDirError, atomic_write, read_json, write_json, write_text
from .specialist import specialists_done
from .train import accuracy, iter_logits, predict_logits, predict_proba, seed_everything, train_model

Log = Callable[[str], None]


def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.data.kind if cfg.data.kind != "csv_text" else Path(cfg.data.train.split(":")[-1]).parent.name or "csv"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def setup_torch(cfg: RunConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def train_generalist(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                     progress: bool = True) -> dict:
    """Train the generalist on all classes; checkpoint and metrics into the run directory."""
    model, result = fit_generalist(cfg, dataset, device, seed=cfg.seed, progress=progress)
    test_x = model.encode(dataset.test.inputs)
    test_accuracy = accuracy(model, test_x, dataset.test.labels, cfg.train.eval_batch_size, device)
    save_checkpoint(model, run.generalist)
    write_json(run.generalist / "history.json", result.history)
    metrics = {
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test_accuracy,
        "test_errors": int(round((1 - test_accuracy) * len(dataset.test))),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "examples_seen": result.examples_seen,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    log(f"generalist: val accuracy {metrics['val_accuracy']:.4f}, test accuracy {test_accuracy:.4f} "
        f"({metrics['test_errors']} errors of {len(dataset.test)}), best epoch {result.best_epoch}, "
        f"{result.seconds:.1f}s")
    return metrics


# ---------------------------------------------------------------------------
# clusters of confusable classes (section 5.3)

COVARIANCE_FILE_MAX_CLASSES = 4000  # above this the (C, C) matrix is recomputed for a report, not stored


def transfer_inputs(cfg: RunConfig, dataset: Dataset):
    """The raw inputs the covariance is measured on: a split, or a user's unlabeled file."""
    split = cfg.cluster.split
    if split in ("val", "train", "test"):
        return getattr(dataset, split).inputs
    path = resolve_path(split)
    if not path.is_file():
        raise DataError(f"cluster.split={split!r}: not val/train/test and no such file")
    if dataset.input_kind == "text":
        with open(path, newline="", encoding="utf-8") as handle:
            header = handle.readline()
        column = cfg.data.text_column
        if column not in header:
            raise DataError(f"cluster.split={split!r}: no column {column!r} (data.text_column)")
        # read_text_csv wants a label column; reuse the text column for it (labels are not used)
        texts, _ = read_text_csv(str(path), column, column, "cluster.split")
        return texts
    try:
        inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cluster.split={split!r}: not a readable .npy array: {err}") from None
    if tuple(inputs.shape[1:]) != dataset.input_shape:
        raise DataError(f"cluster.split={split!r}: inputs have shape {inputs.shape}, the model expects "
                        f"(N, {', '.join(map(str, dataset.input_shape))})")
    return inputs


def prediction_covariance(model: torch.nn.Module, inputs, batch_size: int, device: torch.device) -> np.ndarray:
    """(C, C) covariance of the model's probabilities, streamed on `device` in batches."""
    accumulator = CovarianceAccumulator(model.head.out_features, device)
    for logits in iter_logits(model, model.encode(inputs), batch_size, device):
        accumulator.update(torch.softmax(logits, dim=1))
    return accumulator.covariance()


def make_clusterer(cfg: RunConfig) -> ConfusionClusterer:
    c = cfg.cluster
    return ConfusionClusterer(
        n_clusters=c.n_clusters or None,
        classes_per_cluster=None if c.n_clusters else c.classes_per_cluster,
        max_cluster_size=c.max_cluster_size or None, min_cluster_size=c.min_cluster_size,
        overlap=c.overlap, overlap_ratio=c.overlap_ratio, normalize=c.normalize,
        niter=c.niter, nredo=c.nredo, seed=cfg.seed,
    )


def validation_error_pairs(model: torch.nn.Module, dataset: Dataset, batch_size: int, device) -> np.ndarray:
    """(E, 2) (true, predicted) class pairs of the model's validation errors."""
    predicted = predict_logits(model, model.encode(dataset.val.inputs), batch_size, device).argmax(1)
    wrong = predicted != dataset.val.labels
    return np.stack([dataset.val.labels[wrong], predicted[wrong]], axis=1).astype(np.int64)


def cluster_classes(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log) -> dict:
    """Covariance of the generalist's probabilities -> K-means groups -> clusters.json."""
    run.require(run.generalist / "model.safetensors", what="generalist")
    if cfg.cluster.n_clusters > dataset.n_classes:
        raise ConfigError(f"cluster.n_clusters={cfg.cluster.n_clusters} must be <= the number of classes "
                          f"({dataset.n_classes})")
    model = load_checkpoint(run.generalist, device)
    inputs = transfer_inputs(cfg, dataset)
    started = time.perf_counter()
    cov = prediction_covariance(model, inputs, cfg.cluster.batch_size, device)
    covariance_seconds = time.perf_counter() - started
    try:
        clusterer = make_clusterer(cfg).fit(cov)
    except ValueError as err:  # settings that only fail against this C, e.g. max_cluster_size too small
        raise ConfigError(f"cluster: {err}") from None
    clusters = clusters_to_json(clusterer, dataset.classes)
    clusters["split"] = cfg.cluster.split
    clusters["examples"] = len(inputs)
    if dataset.n_classes <= COVARIANCE_FILE_MAX_CLASSES:
        atomic_write(run.root / "covariance.npy", lambda tmp: np.save(open(tmp, "wb"), cov.astype(np.float32)))
    pairs = validation_error_pairs(model, dataset, cfg.train.eval_batch_size, device)
    share = errors_inside_clusters(pairs[:, 0], pairs[:, 1], clusterer.groups_) if len(pairs) else float("nan")
    write_json(run.clusters, clusters)
    sizes = [len(g) for g in clusterer.groups_]
    log(format_summary(dataset.n_classes, clusterer.groups_, uncovered=clusterer.uncovered_, error_pairs=pairs))
    metrics = {"groups": len(sizes), "min_size": min(sizes, default=0), "max_size": max(sizes, default=0),
               "uncovered": len(clusterer.uncovered_), "val_errors_inside_clusters": share,
               "covariance_seconds": round(covariance_seconds, 3)}
    if dataset.planted_groups is not None:
        from sklearn.metrics import adjusted_rand_score

        planted = np.empty(dataset.n_classes, np.int64)
        for g, members in enumerate(dataset.planted_groups):
            planted[members] = g
        metrics["planted_adjusted_rand"] = float(adjusted_rand_score(planted, np.asarray(clusters["assignment"])))
    return metrics


def write_run_report(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log) -> dict:
    """`report/index.html` and `report/summary.md` from the run directory's files."""
    run.require(run.clusters, what="cluster")
    clusters = read_json(run.clusters)
    covariance_file = run.root / "covariance.npy"
    model = load_checkpoint(run.generalist, device)
    if covariance_file.is_file():
        cov = np.load(covariance_file, allow_pickle=False).astype(np.float64)
    else:
        cov = prediction_covariance(model, transfer_inputs(cfg, dataset), cfg.cluster.batch_size, device)
    kind = "covariance" if cfg.cluster.normalize == "covariance" else "correlation"
    if kind == "correlation":
        from .cluster import correlation_from_covariance

        cov = correlation_from_covariance(cov)
    paths = write_report(
        run.report, dataset.classes, cov, [g["classes"] for g in clusters["groups"]], matrix_kind=kind,
        uncovered=clusters["uncovered"]["classes"],
        error_pairs=validation_error_pairs(model, dataset, cfg.train.eval_batch_size, device),
        metrics=run.read_metrics(), settings=clusters["settings"], title=f"specialists: {dataset.name}",
    )
    log(f"report: {paths['html']}")
    return {"html": str(paths["html"])}


# ---------------------------------------------------------------------------
# evaluation of the combination (section 5.4, the paper's Tables 3-4)


def _conditional_correct(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) whether the argmax over each example's allowed classes (masks, (N, C) bool) is its label."""
    return np.where(masks, probs, -np.inf).argmax(1) == labels


def evaluate_run(run: RunDir, dataset: Dataset, device: torch.device, log: Log) -> dict:
    """Test accuracy of generalist + specialists against the generalist alone, like Tables 3-4."""
    from .ensemble import SpecialistsModel

    model = SpecialistsModel(run.root, device)
    labels = dataset.test.labels
    general_probs = predict_proba(model.generalist, model.generalist.encode(dataset.test.inputs), 1024, device)
    general_correct = general_probs.argmax(1) == labels
    if not model.specialists:
        log("evaluate: no finished specialists; the model is the generalist alone")
        return {"mode": model.mode, "test_accuracy": float(general_correct.mean()),
                "generalist_test_accuracy": float(general_correct.mean())}
    combined = model.predict_proba(dataset.test.inputs)
    correct = combined.argmax(1) == labels

    # which specialists cover each class; Table 3 restricts the argmax to their classes
    member = np.zeros((len(model.specialists), dataset.n_classes), dtype=bool)
    for m, (_, info) in enumerate(model.specialists):
        member[m, info["classes"]] = True
    covering = member[:, labels]  # (M, N)
    covered = covering.any(0)
    # (N_covered, C): the classes of every specialist that covers the example's true class
    allowed = (covering[:, covered].T.astype(np.float32) @ member.astype(np.float32)) > 0
    cond_general = _conditional_correct(general_probs[covered], labels[covered], allowed)
    cond_combined = _conditional_correct(combined[covered], labels[covered], allowed)

    by_covering = []
    counts = covering.sum(0)
    for k in range(int(counts.max()) + 1):
        rows = counts == k
        if rows.any():
            delta = int(correct[rows].sum()) - int(general_correct[rows].sum())
            base = int(general_correct[rows].sum())
            by_covering.append({"specialists_covering": k, "examples": int(rows.sum()), "generalist_correct": base,
                                "change_in_correct": delta,
                                "relative_gain": delta / base if base else float("nan")})
    general_errors, errors = int((~general_correct).sum()), int((~correct).sum())
    metrics = {
        "mode": model.mode,
        "test_accuracy": float(correct.mean()),
        "generalist_test_accuracy": float(general_correct.mean()),
        "test_errors": errors,
        "generalist_test_errors": general_errors,
        "error_reduction": (general_errors - errors) / general_errors if general_errors else 0.0,
        "relative_accuracy_gain": float(correct.mean() / general_correct.mean() - 1),
        "conditional_accuracy": float(cond_combined.mean()) if covered.any() else float("nan"),
        "generalist_conditional_accuracy": float(cond_general.mean()) if covered.any() else float("nan"),
        "covered_test_examples": int(covered.sum()),
        "by_covering": by_covering,
    }
    log(f"ensemble: test accuracy {metrics['test_accuracy']:.4f} vs generalist {metrics['generalist_test_accuracy']:.4f} "
        f"({errors} vs {general_errors} errors, {100 * metrics['error_reduction']:+.1f}% fewer); conditional "
        f"{metrics['conditional_accuracy']:.4f} vs {metrics['generalist_conditional_accuracy']:.4f}")
    return metrics


def evaluate_command(run_dir: str | Path, log: Log = print) -> RunDir:
    """`specialists evaluate RUN_DIR`."""
    run = RunDir(run_dir)
    run.require(run.generalist / "model.safetensors", what="generalist")
    cfg, dataset = dataset_for_run(run)
    _timed(run, "evaluate", lambda: evaluate_run(run, dataset, setup_torch(cfg), log), "ensemble")
    return run


def _stage_done(run: RunDir, section: str, key: str) -> bool:
    return key in run.read_metrics().get(section, {})


def _timed(run: RunDir, stage: str, fn: Callable[[], dict | None], section: str | None = None) -> None:
    """Run a stage; record its metrics section and its seconds in one atomic write."""
    started = time.perf_counter()
    metrics = fn()
    updates = {"timings": {stage: round(time.perf_counter() - started, 3)}}
    if section and metrics is not None:
        updates[section] = metrics
    run.update_metrics(updates)


def prepare_run(cfg: RunConfig | None, out: str | Path | None, resume: bool) -> tuple[RunConfig, RunDir]:
    """The config and run directory: a fresh one, or the saved config of a run to resume."""
    if resume:
        run = RunDir(out)
        run.require(run.config, what="first")
        saved = load_config(run.config)
        if cfg is not None and dump_config(cfg) != dump_config(saved):
            raise RunDirError(f"--resume {run.root}: the given config differs from the run's config.yaml; "
                              "resume with the run's own config (no --config or overrides)")
        return saved, run
    return cfg, RunDir(out or default_run_dir(cfg))


def run_pipeline(cfg: RunConfig | None, out: str | Path | None = None, resume: bool = False,
                 log: Log = print, progress: bool = True) -> RunDir:
    """`specialists run`: every stage that exists, in order, into one run directory."""
    cfg, run = prepare_run(cfg, out, resume)
    started = time.perf_counter()
    dataset = load_dataset(cfg.data, cfg.seed)  # validate data and model before anything is written
    model_kwargs(cfg.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    device = setup_torch(cfg)
    run.create(resume=resume)
    write_text(run.config, dump_config(cfg))
    write_json(run.classes, dataset.classes)
    if dataset.planted_groups is not None:
        write_json(run.root / "planted_groups.json", dataset.planted_groups)
    run.update_metrics({"timings": {"data": round(time.perf_counter() - started, 3)},
                        "data": {"name": dataset.name, "classes": dataset.n_classes, "train": len(dataset.train),
                                 "val": len(dataset.val), "test": len(dataset.test), "device": str(device)}})
    log(f"data: {dataset.name}, {dataset.n_classes} classes, {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test; device {device}; run directory {run.root}")

    if resume and _stage_done(run, "generalist", "test_accuracy"):
        log("generalist: already trained, skipped")
    else:
        _timed(run, "generalist", lambda: train_generalist(cfg, dataset, run, device, log, progress), "generalist")

    if not cfg.cluster.enabled:
        log("cluster: disabled (cluster.enabled=false)")
    elif resume and _stage_done(run, "cluster", "groups") and run.clusters.is_file():
        log("cluster: already done, skipped")
    else:
        _timed(run, "cluster", lambda: cluster_classes(cfg, dataset, run, device, log), "cluster")

    if not cfg.specialists.enabled:
        log("specialists: disabled (specialists.enabled=false)")
    elif not run.clusters.is_file():
        log("specialists: no clusters.json (the cluster stage is disabled), skipped")
    elif resume and specialists_done(run):
        log("specialists: already trained, skipped")
    else:
        _timed(run, "specialists", lambda: train_specialists(cfg, dataset, run, device, log, progress), "specialists")

    if not cfg.peer.enabled:
        log("peer ensemble: disabled (peer.enabled=false)")
    elif not specialists_done(run):
        log("peer ensemble: skipped, it matches the specialists' compute and there are none")
    elif resume and _stage_done(run, "peer_ensemble", "test_accuracy"):
        log("peer ensemble: already trained, skipped")
    else:
        _timed(run, "peer", lambda: train_peers(cfg, dataset, run, device, log, progress), "peer_ensemble")

    _timed(run, "evaluate", lambda: evaluate_run(run, dataset, device, log), "ensemble")

    run.update_metrics({"timings": {"total": round(time.perf_counter() - started, 3)}})
    if run.clusters.is_file():
        _timed(run, "report", lambda: write_run_report(cfg, dataset, run, device, log))
    return run


def summary_table(run: RunDir) -> str:
    """The run's metrics as plain text: `section.key value` for each scalar, then the test
    results as tables (report.format_results), which stand in for the `ensemble` and
    `peer_ensemble` sections."""

    metrics = run.read_metrics()
    results = format_results(metrics)
    tabled = {"ensemble", "peer_ensemble"} if results else set()
    rows = []
    for section, values in metrics.items():
        if not isinstance(values, dict) or section in tabled:
            continue
        for key, value in values.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            if isinstance(value, (int, str)):
                rows.append((f"{section}.{key}", str(value)))
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    if results:
        lines += [""] + [f"  {line}".rstrip() for line in results.splitlines()]
    return "\n".join(lines)


def recluster(run_dir: str | Path, overrides: list[str] = (), log: Log = print) -> RunDir:
    """`specialists cluster RUN_DIR [cluster.k=v ...]`: new groups for an existing generalist."""
    run = RunDir(run_dir)
    run.require(run.generalist / "model.safetensors", what="generalist")
    bad = [o for o in overrides if not o.startswith("cluster.")]
    if bad:
        raise ConfigError(f"specialists cluster only takes cluster.* overrides, got {bad}")
    if run.specialists.is_dir() and any(run.specialists.iterdir()):
        raise RunDirError(f"{run.root} already has specialists trained on its clusters; "
                          "re-cluster in a new run (specialists run ... cluster.key=value)")
    cfg, dataset = dataset_for_run(run)
    cfg = load_config(run.config, list(overrides))
    device = setup_torch(cfg)
    _timed(run, "cluster", lambda: cluster_classes(cfg, dataset, run, device, log), "cluster")
    write_text(run.config, dump_config(cfg))  # the config now says how clusters.json was made
    _timed(run, "report", lambda: write_run_report(cfg, dataset, run, device, log))
    return run


def report_run(run_dir: str | Path, log: Log = print) -> RunDir:
    """`specialists report RUN_DIR`: the HTML/Markdown report from a run directory."""
    run = RunDir(run_dir)
    cfg, dataset = dataset_for_run(run)
    write_run_report(cfg, dataset, run, setup_torch(cfg), log)
    return run


def dataset_for_run(run: RunDir) -> tuple[RunConfig, Dataset]:
    """Reload a run's data exactly as the run saw it (same config, same seed)."""
    run.require(run.config, what="run")
    cfg = load_config(run.config)
    dataset = load_dataset(cfg.data, cfg.seed)
    saved = run.read_classes()
    if saved != dataset.classes:
        raise RunDirError(f"{run.classes} does not match the classes of the run's data ({len(saved)} vs "
                          f"{dataset.n_classes}); was the data changed since the run?")
    return cfg, dataset

