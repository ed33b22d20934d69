"""A generalist: the configured model over every class, trained on the whole training split.

Shared by the generalist stage, the equal-compute peer ensemble (`peer.py`),
whose members are generalists with other seeds, and `specialists distill`
(`distill_run.py`): a teacher trained there is a generalist of `teacher.model`,
and its students are built by `build_model`.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .config import RunConfig
from .distill_config import StudentConfig, TeacherConfig
from .data import Dataset
from .models import create_model, model_kwargs
from .train import TrainResult, accuracy, seed_everything, train_model


# any config with `model` and `train` sections (a StudentConfig's are filled in by distill_config.resolve_student)
ModelAndTrain = RunConfig | TeacherConfig | StudentConfig


def build_model(cfg: ModelAndTrain, dataset: Dataset) -> torch.nn.Module:
    """A new model of `cfg.model` for `dataset`, its input normaliser (if any) fitted on the training split;
    a model the user brings (adapters.py) holds their weights, `cfg.model.weights`, if they gave any."""
    kwargs = model_kwargs(cfg.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model = create_model(cfg.model.name, **kwargs)
    if hasattr(model, "fit_normalizer"):
        model.fit_normalizer(dataset.train.inputs)
    if getattr(cfg.model, "weights", ""):
        model.load_weights(cfg.model.weights, dataset.classes)
    return model


def is_loaded(model_cfg) -> bool:
    """Whether the generalist is the user's weights as they are (model.weights without model.fine_tune): the
    generalist stage measures it and trains nothing."""
    return bool(getattr(model_cfg, "weights", "")) and not model_cfg.fine_tune


def load_generalist(cfg: ModelAndTrain, dataset: Dataset, device: torch.device) -> tuple[torch.nn.Module, TrainResult]:
    """The user's generalist as given (`is_loaded`), with the record of a training that processed no example."""
    started = time.perf_counter()
    model = build_model(cfg, dataset).to(device).eval()
    val_accuracy = accuracy(model, model.encode(dataset.val.inputs), dataset.val.labels, cfg.train.eval_batch_size,
                            device)
    return model, TrainResult(best_epoch=0, best_val_accuracy=val_accuracy, epochs_run=0, examples_seen=0,
                              seconds=time.perf_counter() - started, history=[])


def fit_generalist(cfg: ModelAndTrain, dataset: Dataset, device: torch.device, *, seed: int, epochs: int = 0,
                   desc: str = "generalist", progress: bool = True) -> tuple[torch.nn.Module, TrainResult]:
    """Train a new generalist (seed: initial weights and batch order; epochs: 0 = cfg.train.epochs).

    A model the user brings with weights starts from them (fine-tuning); so do
    the peer members of such a run (`peer.py`): the same compute spent on more
    copies of the user's model. Returns the model at its best validation epoch
    and the training record.
    """
    seed_everything(seed)  # the initial weights too
    model = build_model(cfg, dataset)
    schedule = dataclasses.replace(cfg.train, epochs=epochs) if epochs else cfg.train
    result = train_model(model, model.encode(dataset.train.inputs), dataset.train.labels,
                         model.encode(dataset.val.inputs), dataset.val.labels, schedule,
                         seed=seed, device=device, desc=desc, progress=progress)
    return model, result
