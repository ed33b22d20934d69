"""The teachers of `specialists distill`: trained models and teacher runs as scores of raw inputs, checked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .data import take_inputs
from .distill import DistillError, TeacherCache
from .models import load_checkpoint
from .rundir import RunDir
from .specialist import SPECIALIST_FILE
from .train import predict_logits
from .transfer import shift_images


@dataclass
class Teacher:
    """One teacher: `scores(inputs)` gives (B, C) logits or log-probabilities for raw inputs."""

    name: str
    classes: list[str]
    scores: Callable[[object], torch.Tensor]
    model: object = None  # the loaded run model (ensemble.SpecialistsModel) behind a run's teacher


def module_teacher(model: nn.Module, classes: list[str], name: str, device, batch_size: int = 1024) -> Teacher:
    """A trained model (logits) as a teacher."""
    if model.head.out_features != len(classes):
        raise DistillError(f"teacher {name} predicts {model.head.out_features} classes but its class list has "
                           f"{len(classes)}")

    def scores(inputs) -> torch.Tensor:
        return torch.from_numpy(predict_logits(model, model.encode(inputs), batch_size, device))

    return Teacher(name, classes, scores)


def combined_teacher(run_dir: str | Path, device, batch_size: int = 1024, **options) -> Teacher:
    """A run's combined distribution (`specialists.load(run, **options).predict_proba`) as a teacher."""
    from .ensemble import load

    model = load(run_dir, device, **options)

    def scores(inputs) -> torch.Tensor:
        probs = torch.from_numpy(np.asarray(model.predict_proba(inputs, batch_size), dtype=np.float32))
        # (B, C) log q; a zero probability becomes a very negative finite score
        return torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))

    return Teacher(str(run_dir), list(model.classes), scores, model)


def shift_averaged(teacher: Teacher, pixels: int, shape: tuple[int, ...]) -> Teacher:
    """`teacher` with its distribution averaged (arithmetic mean) over its image inputs, one of shape `shape`,
    moved by up to `pixels` in each direction, zero fill: (2 pixels + 1)^2 translations, an ensemble of one
    model, as for a teacher trained on jittered images."""
    moves = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)]

    def scores(inputs) -> torch.Tensor:
        images = np.asarray(inputs).reshape(-1, *shape)
        probs = sum(torch.softmax(teacher.scores(shift_images(images, dy, dx).reshape(np.shape(inputs))).float(), 1)
                    for dy, dx in moves) / len(moves)
        return torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))  # (B, C) log of the mean

    return Teacher(f"{teacher.name} (mean over {len(moves)} shifts)", teacher.classes, scores, teacher.model)


def check_same_classes(teachers: Sequence[Teacher], classes: list[str]) -> None:
    """Every teacher must score exactly `classes`, in that order."""
    for teacher in teachers:
        if teacher.classes != classes:
            raise DistillError(class_difference(teacher.name, teacher.classes, "the data", classes))


def class_difference(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    """The message saying how class lists `a` and `b` differ (their first differing position or their sizes)."""
    if len(a) != len(b):
        return (f"teachers must share one class set: {a_name} has {len(a)} classes, {b_name} has {len(b)} "
                f"(only in {a_name}: {sorted(set(a) - set(b))[:5]}, only in {b_name}: {sorted(set(b) - set(a))[:5]})")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return (f"teachers must share one class set: class {i} is {a[i]!r} in {a_name} but {b[i]!r} in {b_name} "
            f"(only in {a_name}: {sorted(set(a) - set(b))[:5]}, only in {b_name}: {sorted(set(b) - set(a))[:5]})")


def check_same_data(first: RunDir, first_cfg, other: RunDir, other_cfg) -> None:
    """Teacher runs must have learnt from the same data (synthetic data are drawn from the run's seed)."""
    if other_cfg.data != first_cfg.data:
        raise DistillError(f"teacher runs must share their data: {other.root}'s data config differs from "
                           f"{first.root}'s ({other_cfg.data} vs {first_cfg.data})")
    if first_cfg.data.kind == "synthetic" and other_cfg.seed != first_cfg.seed:
        raise DistillError(f"teacher runs must share their data: synthetic data are drawn from the seed, and "
                           f"{first.root} has seed={first_cfg.seed} but {other.root} seed={other_cfg.seed}")


def finished_peers(run: RunDir) -> int:
    """How many peer members 1, 2, ... of the run are finished (`peers/<k>/member.json`), counted in order."""
    k = 0
    while (run.peers / str(k + 1) / "member.json").is_file():
        k += 1
    return k


def run_teacher(run: RunDir, source: str, device, batch_size: int = 1024) -> Teacher:
    """What teacher run `run` gives as `source` (see TEACHER_SOURCES); refuses what the run lacks."""
    if source == "generalist":
        return module_teacher(load_checkpoint(run.generalist, device), run.read_classes(), str(run.root), device,
                              batch_size)
    check_source(run, source)
    options = {"generalists": 1 + finished_peers(run) if source in ("peers", "hybrid") else 1,
               "use_specialists": source != "peers"}
    return combined_teacher(run.root, device, batch_size, **options)


def check_source(run: RunDir, source: str) -> None:
    """Refuse a teacher.source the run cannot give: a generalist-only run has no combination to distil."""
    if source in ("peers", "hybrid") and finished_peers(run) == 0:
        raise DistillError(f"teacher.source={source}: {run.root} has no finished peer members in peers/ (the "
                           "equal-compute peer ensemble, peer.enabled=true); use teacher.source=combined or generalist")
    if source in ("combined", "hybrid") and not (run.specialists.is_dir() and any(
            (f / SPECIALIST_FILE).is_file() for f in run.specialists.iterdir())):
        raise DistillError(f"teacher.source={source}: {run.root} has no finished specialists, so it is a "
                           "generalist-only run and its combined distribution is its generalist's; distil it with "
                           "teacher.source=generalist (against student.baseline) or train its specialists first")


def teacher_scores(teacher: Teacher, inputs, batch_size: int = 1024) -> torch.Tensor:
    """(N, C) scores of `inputs`, one teacher pass over them (cached: callers index the result)."""
    cache = TeacherCache(lambda index: teacher.scores(take_inputs(inputs, index.numpy())), output="logits",
                         batch_size=batch_size, device="cpu")
    return cache.fit(torch.arange(len(inputs))).outputs_
