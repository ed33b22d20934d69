"""What every command needs around its work: torch set up, a run's data reloaded,
default output folders, and stages timed into metrics.json.

Shared by `stages.py` (`specialists run/cluster/evaluate/report`) and
`distill_run.py` (`specialists distill`); imports neither ray nor the stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from .config import RunConfig, load_config
from .data import Dataset, load_dataset
from .models import resolve_device, trust_factory
from .rundir import RunDir, RunDirError

Log = Callable[[str], None]

LARGE_ALLOCATION = 4 << 20  # bytes: larger allocations get their own mapping (set_malloc_thresholds)
KEPT_FREE = 32 << 20  # bytes of freed smaller blocks glibc keeps for reuse (set_malloc_thresholds)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def setup_torch(cfg) -> torch.device:
    """Apply `cfg.threads`, set glibc's thresholds (set_malloc_thresholds), and resolve `cfg.device`
    (any config with those two fields).

    A config that names a user model's factory (model.factory) is the user's
    instruction to run it, so the run's checkpoints may call it too
    (models.trust_factory).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_malloc_thresholds()
    factory = getattr(getattr(cfg, "model", None), "factory", "")
    if factory:
        trust_factory(factory)
    return resolve_device(cfg.device)


def set_malloc_thresholds() -> None:
    """Have glibc map every allocation over LARGE_ALLOCATION on its own, so that freeing one returns
    it to the OS at once, and keep up to KEPT_FREE of freed smaller blocks for reuse.

    By default glibc raises its mapping threshold as large blocks are freed and keeps later ones in its
    heap, so a stage's (B, C) and (C, C) temporaries stay resident into the next stages (README, Scale).
    Setting that threshold fixes the trim threshold too, at 128 KiB unless set: the heap would then give
    a training step's temporaries back and fault them in again every step.
    A no-op where the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION)
        libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE)
    except (OSError, AttributeError):
        pass


def default_out_dir(name: str) -> Path:
    """`runs/<name>-<local time>`."""
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def data_summary(dataset: Dataset, device: torch.device) -> dict:
    """The `data` section of metrics.json."""
    return {"name": dataset.name, "classes": dataset.n_classes, "train": len(dataset.train),
            "val": len(dataset.val), "test": len(dataset.test), "device": str(device)}


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


def timed_stage(run: RunDir, stage: str, fn: Callable[[], dict | None], section: str | None = None) -> dict | None:
    """Run a stage; record its metrics section and its seconds in one atomic write; return its metrics."""
    started = time.perf_counter()
    metrics = fn()
    updates = {"timings": {stage: round(time.perf_counter() - started, 3)}}
    if section and metrics is not None:
        updates[section] = metrics
    run.update_metrics(updates)
    return metrics
