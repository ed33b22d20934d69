"""The loaded model of a run: `specialists.load(run_dir).predict_proba(inputs)`.

With specialists in the run directory, the prediction for each input is the
combination of section 5.4: the generalist's top-n classes pick the active
specialists, each runs only on the inputs where it is active, and
`combine.solve_rows` finds the q minimising KL(generalist || q) plus the
specialists' KL terms on their classes + dustbin. Inputs with no active
specialist get the generalist's distribution unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .combine import active_specialists, solve_rows
from .config import DUSTBIN_MODES, CombineConfig, load_config
from .models import load_checkpoint, resolve_device
from .rundir import RunDir, RunDirError
from .specialist import SPECIALIST_FILE, dustbin_corrected, load_specialist



class SpecialistsModel:
    """A run's generalist and its finished specialists behind one predictor.

    Inputs are raw texts (a list of strings) for text runs and arrays or tensors
    of shape (N, *input_shape) for feature and image runs.

    Options left as None take the run's `combine` config section (the values
    its evaluate stage measured), else the defaults of `CombineConfig`:
    top_n: how many of the generalist's top classes activate specialists (paper: 1).
    dustbin: which dustbin-logit correction to apply to specialist outputs:
        "active" (the prior of the examples a specialist sees when gated by the
        generalist's top-1 class; measured never worse than none), "natural" (the
        training split's prior), or "none".
    specialist_weight: weight of each active specialist's KL term; the generalist's is 1.
    use_specialists: False gives the generalist alone.
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto", top_n: int | None = None,
                 dustbin: str | None = None, specialist_weight: float | None = None, use_specialists: bool = True):
        self.run = RunDir(run_dir)
        self.run.require(self.run.classes, self.run.generalist / "model.json", what="generalist")
        saved = load_config(self.run.config).combine if self.run.config.is_file() else CombineConfig()
        top_n = saved.top_n if top_n is None else top_n
        dustbin = saved.dustbin if dustbin is None else dustbin
        specialist_weight = saved.specialist_weight if specialist_weight is None else specialist_weight
        if dustbin not in DUSTBIN_MODES:
            raise ValueError(f"dustbin={dustbin!r} must be one of {DUSTBIN_MODES}")
        if not specialist_weight > 0:
            raise ValueError(f"specialist_weight={specialist_weight} must be > 0")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.classes = self.run.read_classes()
        if not 1 <= top_n <= len(self.classes):
            raise ValueError(f"top_n={top_n} must be between 1 and the number of classes ({len(self.classes)})")
        self.top_n, self.dustbin, self.specialist_weight = top_n, dustbin, float(specialist_weight)
        self.generalist = load_checkpoint(self.run.generalist, self.device)
        if self.generalist.head.out_features != len(self.classes):
            raise RunDirError(f"{self.run.generalist} predicts {self.generalist.head.out_features} classes but "
                              f"{self.run.classes} lists {len(self.classes)}")
        self.specialists: list[tuple[torch.nn.Module, dict]] = []
        if use_specialists and self.run.specialists.is_dir():
            folders = sorted((f for f in self.run.specialists.iterdir() if (f / SPECIALIST_FILE).is_file()),
                             key=lambda f: int(f.name) if f.name.isdigit() else f.name)
            self.specialists = [load_specialist(f, self.device) for f in folders]
        for _, info in self.specialists:
            bad = [c for c in info["classes"] if not 0 <= c < len(self.classes)]
            if bad:
                raise RunDirError(f"specialist {info.get('id')} covers classes {bad} outside the run's "
                                  f"{len(self.classes)} classes")
        self._classes_t = [torch.tensor(info["classes"], dtype=torch.long, device=self.device)
                           for _, info in self.specialists]

    @property
    def input_kind(self) -> str:
        return self.generalist.input_kind

    @property
    def mode(self) -> str:
        if not self.specialists:
            return "generalist alone (no finished specialists in the run directory)"
        return (f"generalist + {len(self.specialists)} specialists (top_n={self.top_n}, dustbin={self.dustbin}, "
                f"specialist_weight={self.specialist_weight:g})")

    def __repr__(self) -> str:
        return f"SpecialistsModel({str(self.run.root)!r}: {self.mode})"

    def _encode(self, inputs):
        if isinstance(inputs, str):
            raise TypeError("pass a list of texts, not one string: predict_proba([text])")
        if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "US" and self.input_kind == "text":
            inputs = inputs.tolist()
        return self.generalist.encode(inputs)

    def _correction(self, info: dict) -> float:
        if self.dustbin == "none":
            return 0.0
        key = "dustbin_correction_active_top1" if self.dustbin == "active" else "dustbin_correction"
        return float(info.get(key, 0.0))

    @torch.no_grad()
    def _combine_batch(self, encoded, index: np.ndarray) -> tuple[torch.Tensor, dict]:
        """(B, C) combined probabilities for rows `index` of `encoded`, and what went into them."""
        batch = encoded.batch(index, self.device)
        general = torch.softmax(self.generalist(*batch).double(), dim=1)  # (B, C)
        if not torch.isfinite(general).all():
            raise ValueError("the generalist produced NaN/inf probabilities; check the inputs and checkpoint")
        parts = {"generalist": general, "active": None, "specialist_probs": [], "specialist_rows": []}
        if not self.specialists:
            return general, parts
        active = active_specialists(general, self._classes_t, self.top_n)  # (B, M)
        parts["active"] = active
        for m, (model, info) in enumerate(self.specialists):
            rows = torch.nonzero(active[:, m]).flatten()
            probs = torch.zeros(0, len(info["classes"]) + 1, dtype=torch.float64, device=self.device)
            if len(rows):
                logits = model(*encoded.batch(index[rows.cpu().numpy()], self.device)).double()
                probs = torch.softmax(dustbin_corrected(logits, self._correction(info)), dim=1)
                if not torch.isfinite(probs).all():
                    raise ValueError(f"specialist {info.get('id', m)} produced NaN/inf probabilities")
            parts["specialist_probs"].append(probs)
            parts["specialist_rows"].append(rows)
        weights = torch.full((len(self.specialists),), self.specialist_weight, dtype=torch.float64, device=self.device)
        q = solve_rows(general, parts["specialist_probs"], self._classes_t, parts["specialist_rows"],
                       specialist_weights=weights)
        return q, parts

    def predict_proba(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N, C) class probabilities, columns in the order of `classes`."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        encoded = self._encode(inputs)
        out = [self._combine_batch(encoded, np.arange(s, min(s + batch_size, len(encoded))))[0].float().cpu()
               for s in range(0, len(encoded), batch_size)]
        if not out:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.cat(out).numpy()

    def predict(self, inputs, batch_size: int = 1024) -> np.ndarray:
        """(N,) class names."""
        index = self.predict_proba(inputs, batch_size).argmax(1)
        return np.array(self.classes, dtype=object)[index]

    def explain(self, example, top: int = 5) -> dict:
        """What the combination did for one input: the generalist's top classes, the
        active specialists with their outputs, and the combined top classes."""
        encoded = self._encode([example] if self.input_kind == "text" else np.asarray(example)[None])
        q, parts = self._combine_batch(encoded, np.arange(1))

        def ranked(probs: torch.Tensor, names: list[str]) -> list[tuple[str, float]]:
            values, order = probs.topk(min(top, len(names)))
            return [(names[int(i)], round(float(v), 6)) for v, i in zip(values, order)]

        active = []
        for m, (_, info) in enumerate(self.specialists):
            if parts["active"] is not None and bool(parts["active"][0, m]):
                probs = parts["specialist_probs"][m][0]
                names = [self.classes[c] for c in info["classes"]] + ["<dustbin>"]
                active.append({"id": info.get("id", m), "classes": len(info["classes"]),
                               "top": ranked(probs, names), "dustbin": round(float(probs[-1]), 6)})
        return {"mode": self.mode, "generalist_top": ranked(parts["generalist"][0], self.classes),
                "active_specialists": active, "combined_top": ranked(q[0], self.classes)}


def load(run_dir: str | Path, device: str | torch.device = "auto", **options) -> SpecialistsModel:
    """Load a run directory for prediction; options: top_n, dustbin, specialist_weight, use_specialists."""
    return SpecialistsModel(run_dir, device, **options)
