"""The loaded model of a run: `specialists.load(run_dir).predict_proba(inputs)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .models import load_checkpoint, resolve_device
from .rundir import RunDir, RunDirError
from .train import predict_proba


class SpecialistsModel:
    """A run's generalist (and, once trained, its specialists) behind one predictor.

    Inputs are raw texts (a list of strings) for text runs and arrays or tensors
    of shape (N, *input_shape) for feature and image runs.
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto"):
        self.run = RunDir(run_dir)
        self.run.require(self.run.classes, self.run.generalist / "model.json", what="generalist")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.classes = self.run.read_classes()
        self.generalist = load_checkpoint(self.run.generalist, self.device)
        if self.generalist.head.out_features != len(self.classes):
            raise RunDirError(f"{self.run.generalist} predicts {self.generalist.head.out_features} classes but "
                              f"{self.run.classes} lists {len(self.classes)}")

    @property
    def input_kind(self) -> str:
        return self.generalist.input_kind

    def _encode(self, inputs):
        if isinstance(inputs, str):
            raise TypeError("pass a list of texts, not one string: predict_proba([text])")
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "US" and self.input_kind == "text":
            inputs = inputs.tolist()
        return self.generalist.encode(inputs)

    def predict_proba(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N, C) class probabilities, columns in the order of `classes`."""
        return predict_proba(self.generalist, self._encode(inputs), batch_size, self.device)

    def predict(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N,) class names."""
        index = self.predict_proba(inputs, batch_size).argmax(1)
        return np.array(self.classes, dtype=object)[index]


def load(run_dir: str | Path, device: str | torch.device = "auto") -> SpecialistsModel:
    """Load a finished run directory for prediction."""
    return SpecialistsModel(run_dir, device)
