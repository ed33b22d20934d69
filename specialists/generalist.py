"""A generalist: the configured model over every class, trained on the whole training split.

Shared by the generalist stage and the equal-compute peer ensemble (`peer.py`),
whose members are generalists with other seeds.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import RunConfig
from .data import Dataset
from .models import create_model, model_kwargs
from .train import TrainResult, seed_everything, train_model


def build_model(cfg: RunConfig, dataset: Dataset) -> torch.nn.Module:
    kwargs = model_kwargs(cfg.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model = create_model(cfg.model.name, **kwargs)
    if hasattr(model, "fit_normalizer"):
        model.fit_normalizer(dataset.train.inputs)
    return model


def fit_generalist(cfg: RunConfig, dataset: Dataset, device: torch.device, *, seed: int, epochs: int = 0,
                   desc: str = "generalist", progress: bool = True) -> tuple[torch.nn.Module, TrainResult]:
    """Train a new generalist (seed: initial weights and batch order; epochs: 0 = cfg.train.epochs).

    Returns the model at its best validation epoch and the training record.
    """
    seed_everything(seed)  # the initial weights too
    model = build_model(cfg, dataset)
    schedule = dataclasses.replace(cfg.train, epochs=epochs) if epochs else cfg.train
    result = train_model(model, model.encode(dataset.train.inputs), dataset.train.labels,
                         model.encode(dataset.val.inputs), dataset.val.labels, schedule,
                         seed=seed, device=device, desc=desc, progress=progress)
    return model, result
