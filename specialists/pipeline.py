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

from .config import RunConfig, dump_config, load_config
from .data import Dataset, load_dataset
from .models import create_model, model_kwargs, resolve_device, save_checkpoint
from .rundir import RunDir, RunDirError, write_json, write_text
from .train import accuracy, seed_everything, train_model

Log = Callable[[str], None]


def default_run_dir(cfg: RunConfig) -> Path:
    name = cfg.data.kind if cfg.data.kind != "csv_text" else Path(cfg.data.train.split(":")[-1]).parent.name or "csv"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def setup_torch(cfg: RunConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return resolve_device(cfg.device)


def build_model(cfg: RunConfig, dataset: Dataset) -> torch.nn.Module:
    kwargs = model_kwargs(cfg.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model = create_model(cfg.model.name, **kwargs)
    if hasattr(model, "fit_normalizer"):
        model.fit_normalizer(dataset.train.inputs)
    return model


def train_generalist(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                     progress: bool = True) -> dict:
    """Train the generalist on all classes; checkpoint and metrics into the run directory."""
    seed_everything(cfg.seed)  # the initial weights too
    model = build_model(cfg, dataset)
    train_x = model.encode(dataset.train.inputs)
    val_x = model.encode(dataset.val.inputs)
    test_x = model.encode(dataset.test.inputs)
    result = train_model(model, train_x, dataset.train.labels, val_x, dataset.val.labels, cfg.train,
                         seed=cfg.seed, device=device, desc="generalist", progress=progress)
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

    run.update_metrics({"timings": {"total": round(time.perf_counter() - started, 3)}})
    return run


def summary_table(run: RunDir) -> str:
    """A plain-text table of the run's headline metrics."""
    metrics = run.read_metrics()
    rows = []
    for section, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, float):
                value = f"{value:.4f}"
            if isinstance(value, (int, str)) or isinstance(value, float):
                rows.append((f"{section}.{key}", str(value)))
    width = max((len(k) for k, _ in rows), default=10)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


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

