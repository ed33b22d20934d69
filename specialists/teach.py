"""Distillation runs: `specialists distill` (Hinton, Vinyals & Dean, 2015, sections 2-3, 6 and 8).

A teacher labels a *transfer set* once with soft targets at temperature T; a
student is trained on them (plus, weighted by `1 - student.soft_weight`, the
hard labels where the transfer set has them) by the one training loop.

* teachers: trained here (`teacher.model`, `teacher.train`), or loaded from one
  or several run directories (`teacher.runs`), each giving its generalist or its
  combined generalist+specialists distribution (`specialists.load(run)`); several
  are combined by an arithmetic or a geometric mean (`teacher.mean`);
* transfer sets: the training set, a seeded per-class fraction of it, a file of
  unlabeled inputs, or the training set with classes left out / only some kept;
* classes absent from the transfer set get one bias shift added to their logits,
  chosen on the validation split (section 3: "raise the bias of the 3");
* the student defaults to the teacher's architecture (with `teacher.runs`: one
  model of the generalist's size), and `kept_gain` says how much of the
  teacher's test-accuracy gain over a baseline it keeps: over the runs'
  generalist when distilling their combined distribution (section 8: "we have
  not yet shown that we can distill the knowledge in the specialists back into
  the single large net"), else over `student.baseline`, the same student
  trained on the hard labels alone.

Outputs land in one directory: `config.yaml`, `classes.json`, `teacher/` (when
trained here), `student/` (and `baseline/`), `metrics.json`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import (
    DEVICES,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    _require,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
)
from .data import Dataset, DataError, load_dataset, read_text_csv, resolve_path
from .distill import ENSEMBLE_MEANS, TeacherCache, distillation_loss, ensemble_probs
from .models import create_model, load_checkpoint, model_kwargs, save_checkpoint
from .rundir import RunDir, write_json, write_text
from .train import TrainResult, predict_logits, seed_everything, train_model

__all__ = [
    "BiasConfig",
    "DistillConfig",
    "DistillError",
    "StudentConfig",
    "Teacher",
    "TeacherConfig",
    "TransferConfig",
    "TransferSet",
    "accuracy_by_shift",
    "check_same_classes",
    "choose_bias_shift",
    "class_ids",
    "combine_teachers",
    "combined_teacher",
    "gain_standard_error",
    "kept_gain",
    "load_distill_config",
    "make_transfer_set",
    "module_teacher",
    "resolve_student",
    "run_distill",
    "shift_bias",
    "summary",
    "teacher_scores",
    "train_student",
]

Log = Callable[[str], None]

TEACHER_SOURCES = ("combined", "generalist")


class DistillError(ValueError):
    """Teachers, transfer set and student do not fit together (class sets, output sizes)."""


# ---------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class TeacherConfig:
    """Where the soft targets come from."""

    runs: list[str] = field(default_factory=list)  # run directories; empty: train a teacher here
    source: str = "combined"  # combined: specialists.load(run).predict_proba (generalist + specialists); generalist
    mean: str = "arithmetic"  # how several teachers combine: arithmetic | geometric (of their distributions at T)
    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher trained here (no runs)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str = "teacher") -> None:
        _require(self.source in TEACHER_SOURCES, f"{prefix}.source", self.source, f"must be one of {TEACHER_SOURCES}")
        _require(self.mean in ENSEMBLE_MEANS, f"{prefix}.mean", self.mean, f"must be one of {ENSEMBLE_MEANS}")
        _require(all(str(r).strip() for r in self.runs), f"{prefix}.runs", self.runs, "run directories must not be empty")
        _require(len(set(self.runs)) == len(self.runs), f"{prefix}.runs", self.runs, "lists a run twice")
        self.model.validate(f"{prefix}.model")
        self.train.validate(f"{prefix}.train")


@dataclass(frozen=True)
class StudentConfig:
    """The model trained on the teacher's soft targets, and the loss that weighs them."""

    model: None | ModelConfig = None  # None: the teacher's architecture (the first run's generalist, or teacher.model)
    train: None | TrainConfig = None  # None: the teacher's schedule (the first run's train, or teacher.train)
    temperature: float = 4.0  # T of the soft targets; the soft term is T^2-scaled
    soft_weight: float = 0.9  # weight of the soft (teacher) term; the hard labels get 1 - soft_weight
    baseline: bool = False  # also train the same student on the transfer set's hard labels alone

    def validate(self, prefix: str = "student") -> None:
        if self.model is not None:
            self.model.validate(f"{prefix}.model")
        if self.train is not None:
            self.train.validate(f"{prefix}.train")
        _require(np.isfinite(self.temperature) and self.temperature > 0, f"{prefix}.temperature", self.temperature,
                 "must be a finite number > 0")
        _require(0 <= self.soft_weight <= 1, f"{prefix}.soft_weight", self.soft_weight,
                 "must be in [0, 1] (1: soft targets only, 0: hard labels only)")


@dataclass(frozen=True)
class TransferConfig:
    """The examples the student learns from. Classes are named as in classes.json (MNIST: 0..9)."""

    split: str = "train"  # train | a file of unlabeled inputs: .npy (arrays) or .csv (texts, column data.text_column)
    fraction: float = 1.0  # seeded per-class share of the examples kept (every kept class keeps at least one)
    omit_classes: list[int | str] = field(default_factory=list)  # leave these classes out
    keep_classes: list[int | str] = field(default_factory=list)  # keep only these classes
    labels: bool = True  # use the hard labels (weighted 1 - student.soft_weight); false: soft targets only

    def validate(self, prefix: str = "transfer") -> None:
        _require(bool(self.split.strip()), f"{prefix}.split", self.split, "must be train or a file path")
        _require(0 < self.fraction <= 1, f"{prefix}.fraction", self.fraction, "must be in (0, 1]")
        _require(not (self.omit_classes and self.keep_classes), f"{prefix}.keep_classes", self.keep_classes,
                 f"set omit_classes or keep_classes, not both (omit_classes={self.omit_classes})")
        for key in ("omit_classes", "keep_classes"):
            names = [str(c) for c in getattr(self, key)]
            _require(len(set(names)) == len(names), f"{prefix}.{key}", getattr(self, key), "lists a class twice")


@dataclass(frozen=True)
class BiasConfig:
    """Section 3: one logit shift for the classes the transfer set lacks, chosen on validation accuracy."""

    adjust: bool = True
    max_shift: float = 20.0  # shifts searched: -max_shift .. +max_shift
    step: float = 0.1

    def validate(self, prefix: str = "bias") -> None:
        _require(self.max_shift >= 0, f"{prefix}.max_shift", self.max_shift, "must be >= 0")
        _require(self.step > 0, f"{prefix}.step", self.step, "must be > 0")
        _require(self.max_shift / self.step <= 100_000, f"{prefix}.step", self.step,
                 f"gives more than 200,001 shifts for max_shift={self.max_shift}")


@dataclass(frozen=True)
class DistillConfig:
    """Everything `specialists distill` needs."""

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    # `None | X`, not `X | None`: config.py tries a union's options in order, and a null read as X is X's defaults
    data: None | DataConfig = None  # None: the first teacher run's data, or (no runs) the default data
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)

    def validate(self) -> None:
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        _require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        _require(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = default)")
        if self.data is not None and self.teacher.runs:
            raise ConfigError(f"data.*: the data come from the teacher run {self.teacher.runs[0]!r} (its config.yaml); "
                              "drop the data keys when teacher.runs is set")
        if self.data is not None:
            self.data.validate()
        self.teacher.validate()
        self.student.validate()
        self.transfer.validate()
        self.bias.validate()


def load_distill_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DistillConfig:
    """Defaults <- YAML file <- `a.b=value` overrides, validated (ConfigError names the key).

    `student.model` and `student.train` start from the teacher's: the first
    teacher run's `model` / `train` (its config.yaml), else `teacher.model` /
    `teacher.train`; the keys given under them override that. The returned
    config spells every value out, as config.yaml will.
    """
    cfg = load_config(path, list(overrides), cls=DistillConfig)
    return resolve_student(cfg, _student_keys(path, overrides))


def _student_keys(path: str | Path | None, overrides: Sequence[str]) -> dict[str, set[str]]:
    """The keys a user gave under student.model and student.train (YAML file, then overrides)."""
    given: dict[str, set[str]] = {"model": set(), "train": set()}
    student = (read_yaml(path) if path else {}).get("student")
    if isinstance(student, dict):
        for part in given:
            if isinstance(student.get(part), dict):
                given[part] = set(student[part])
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts[0] != "student" or len(parts) < 2 or parts[1] not in given:
            continue
        if len(parts) == 2:  # student.model={...} replaces what came before; null inherits everything
            given[parts[1]] = set(value) if isinstance(value, dict) else set()
        else:
            given[parts[1]].add(parts[2])
    return given


def _teacher_architecture(cfg: DistillConfig) -> tuple[ModelConfig, TrainConfig]:
    if cfg.teacher.runs:
        run = RunDir(cfg.teacher.runs[0])
        run.require(run.config, what="run")
        run_cfg = load_config(run.config)
        return run_cfg.model, run_cfg.train
    return cfg.teacher.model, cfg.teacher.train


def resolve_student(cfg: DistillConfig, given: dict[str, set[str]] | None = None) -> DistillConfig:
    """`cfg` with student.model / student.train filled in from the teacher's (see load_distill_config).

    given: the keys the user set under student.model / student.train; None: a
    non-None student.model / student.train is taken whole.
    """
    base_model, base_train = _teacher_architecture(cfg)

    def merge(base, mine, keys):
        if mine is None:
            return base
        if given is None:
            return mine
        return dataclasses.replace(base, **{k: getattr(mine, k) for k in keys})

    student = dataclasses.replace(cfg.student,
                                  model=merge(base_model, cfg.student.model, (given or {}).get("model", ())),
                                  train=merge(base_train, cfg.student.train, (given or {}).get("train", ())))
    resolved = dataclasses.replace(cfg, student=student)
    resolved.validate()
    return resolved


# ---------------------------------------------------------------------------
# transfer sets


@dataclass
class TransferSet:
    """The student's training examples.

    inputs: raw inputs (texts or an (N, ...) array); labels: (N,) int64 class ids
    the student is given, -1 where it is given none; truth: (N,) the true class
    ids where known (for metrics), else -1; present: the class ids the set
    contains (all classes for unlabeled data, whose classes are unknown).
    """

    inputs: list[str] | np.ndarray
    labels: np.ndarray
    truth: np.ndarray
    present: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())


def class_ids(names: Sequence[int | str], classes: list[str], key: str) -> np.ndarray:
    """Class names (ints are read as names: MNIST's 3 is "3") -> (k,) ids in `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [n for n in names if str(n) not in index]
    if unknown:
        raise ConfigError(f"{key}={list(names)!r}: {unknown[0]!r} is not a class; classes are "
                          f"{classes[:12]}{' ...' if len(classes) > 12 else ''}")
    return np.array([index[str(n)] for n in names], dtype=np.int64)


def _take(inputs, index: np.ndarray):
    return [inputs[i] for i in index] if isinstance(inputs, list) else inputs[index]


def _unlabeled_inputs(path_text: str, dataset: Dataset, text_column: str):
    path = resolve_path(path_text)
    if not path.is_file():
        raise DataError(f"transfer.split={path_text!r}: not 'train' and no such file")
    if dataset.input_kind == "text":
        if path.suffix != ".csv":
            raise DataError(f"transfer.split={path_text!r}: text data needs a .csv with column {text_column!r}")
        with open(path, newline="", encoding="utf-8") as handle:
            header = handle.readline()
        if text_column not in header:
            raise DataError(f"transfer.split={path_text!r}: no column {text_column!r} (data.text_column)")
        texts, _ = read_text_csv(str(path), text_column, text_column, "transfer.split")  # labels unused
        return texts
    try:
        inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"transfer.split={path_text!r}: not a readable .npy array: {err}") from None
    if tuple(inputs.shape[1:]) != dataset.input_shape or len(inputs) == 0:
        raise DataError(f"transfer.split={path_text!r}: inputs have shape {inputs.shape}; the model expects "
                        f"(N, {', '.join(map(str, dataset.input_shape))}) with N >= 1")
    return inputs


def make_transfer_set(cfg: TransferConfig, dataset: Dataset, seed: int, text_column: str = "text") -> TransferSet:
    """The transfer set `cfg` describes, drawn from `dataset` (seeded)."""
    n_classes = dataset.n_classes
    if cfg.split != "train":
        if cfg.omit_classes or cfg.keep_classes:
            raise ConfigError(f"transfer.omit_classes / keep_classes need labels, but transfer.split={cfg.split!r} "
                              "is unlabeled")
        inputs = _unlabeled_inputs(cfg.split, dataset, text_column)
        index = np.arange(len(inputs))
        if cfg.fraction < 1:
            rng = np.random.default_rng(seed)
            index = np.sort(rng.permutation(len(inputs))[: max(1, int(round(cfg.fraction * len(inputs))))])
        unknown = np.full(len(index), -1, np.int64)
        return TransferSet(_take(inputs, index), unknown, unknown, np.arange(n_classes), cfg.split)

    labels = dataset.train.labels
    keep = np.ones(len(labels), dtype=bool)
    if cfg.omit_classes:
        keep &= ~np.isin(labels, class_ids(cfg.omit_classes, dataset.classes, "transfer.omit_classes"))
    if cfg.keep_classes:
        keep &= np.isin(labels, class_ids(cfg.keep_classes, dataset.classes, "transfer.keep_classes"))
    index = np.flatnonzero(keep)
    if cfg.fraction < 1:
        rng = np.random.default_rng(seed)
        chosen = []
        for c in np.unique(labels[index]):  # per class, so a small fraction keeps every class
            members = index[labels[index] == c]
            chosen.append(rng.permutation(members)[: max(1, int(round(cfg.fraction * len(members))))])
        index = np.sort(np.concatenate(chosen)) if chosen else index
    if len(index) == 0:
        raise DataError(f"the transfer set is empty (omit_classes={cfg.omit_classes}, keep_classes={cfg.keep_classes})")
    split = dataset.train.take(index)
    shown = split.labels if cfg.labels else np.full(len(index), -1, np.int64)
    return TransferSet(split.inputs, shown, split.labels, np.unique(split.labels), "train")


# ---------------------------------------------------------------------------
# teachers: raw inputs -> scores, computed once per transfer set


@dataclass
class Teacher:
    """One teacher: `scores(inputs)` gives (B, C) logits or log-probabilities for raw inputs."""

    name: str
    classes: list[str]
    scores: Callable[[object], torch.Tensor]


def module_teacher(model: nn.Module, classes: list[str], name: str, device, batch_size: int = 1024) -> Teacher:
    """A trained model (logits) as a teacher."""
    if model.head.out_features != len(classes):
        raise DistillError(f"teacher {name} predicts {model.head.out_features} classes but its class list has "
                           f"{len(classes)}")

    def scores(inputs) -> torch.Tensor:
        return torch.from_numpy(predict_logits(model, model.encode(inputs), batch_size, device))

    return Teacher(name, classes, scores)


def combined_teacher(run_dir: str | Path, device, batch_size: int = 1024) -> Teacher:
    """A run's combined distribution (`specialists.load(run).predict_proba`) as a teacher."""
    from .ensemble import load

    model = load(run_dir, device)

    def scores(inputs) -> torch.Tensor:
        probs = torch.from_numpy(np.asarray(model.predict_proba(inputs, batch_size), dtype=np.float32))
        # (B, C) log q; a zero probability becomes a very negative finite score
        return torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))

    return Teacher(str(run_dir), list(model.classes), scores)


def check_same_classes(teachers: Sequence[Teacher], classes: list[str]) -> None:
    """Every teacher must score exactly `classes`, in that order."""
    for teacher in teachers:
        if teacher.classes != classes:
            raise DistillError(_class_difference(teacher.name, teacher.classes, "the data", classes))


def _class_difference(a_name: str, a: list[str], b_name: str, b: list[str]) -> str:
    if len(a) != len(b):
        return (f"teachers must share one class set: {a_name} has {len(a)} classes, {b_name} has {len(b)} "
                f"(only in {a_name}: {sorted(set(a) - set(b))[:5]}, only in {b_name}: {sorted(set(b) - set(a))[:5]})")
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return (f"teachers must share one class set: class {i} is {a[i]!r} in {a_name} but {b[i]!r} in {b_name} "
            f"(only in {a_name}: {sorted(set(a) - set(b))[:5]}, only in {b_name}: {sorted(set(b) - set(a))[:5]})")


def _check_same_data(first: RunDir, first_cfg, other: RunDir, other_cfg) -> None:
    """Teacher runs must have learnt from the same data (synthetic data are drawn from the run's seed)."""
    if other_cfg.data != first_cfg.data:
        raise DistillError(f"teacher runs must share their data: {other.root}'s data config differs from "
                           f"{first.root}'s ({other_cfg.data} vs {first_cfg.data})")
    if first_cfg.data.kind == "synthetic" and other_cfg.seed != first_cfg.seed:
        raise DistillError(f"teacher runs must share their data: synthetic data are drawn from the seed, and "
                           f"{first.root} has seed={first_cfg.seed} but {other.root} seed={other_cfg.seed}")


def teacher_scores(teacher: Teacher, inputs, batch_size: int = 1024) -> torch.Tensor:
    """(N, C) scores of `inputs`, one teacher pass over them (cached: callers index the result)."""
    cache = TeacherCache(lambda index: teacher.scores(_take(inputs, index.numpy())), output="logits",
                         batch_size=batch_size, device="cpu")
    return cache.fit(torch.arange(len(inputs))).outputs_


def combine_teachers(scores: Sequence[torch.Tensor], temperature: float, mean: str) -> torch.Tensor:
    """(N, C) soft targets at `temperature` from M teachers' (N, C) scores."""
    return ensemble_probs(list(scores), mean=mean, temperature=temperature, inputs="logits")


# ---------------------------------------------------------------------------
# the student


def train_student(student: nn.Module, transfer: TransferSet, soft: torch.Tensor, val_inputs, val_labels: np.ndarray,
                  cfg: TrainConfig, *, temperature: float, soft_weight: float, seed: int, device="cpu",
                  desc: str = "student", progress: bool = True) -> TrainResult:
    """Train `student` in place on `transfer` against cached soft targets.

    soft: (N, C) teacher probabilities at `temperature`, row i for transfer example i.
    The loss is `soft_weight * T^2 CE(soft, student at T) + (1 - soft_weight) CE(labels,
    student)` on a labelled transfer set, the soft term alone on an unlabeled one.
    """
    n_out = student.head.out_features
    if soft.ndim != 2 or soft.shape[0] != len(transfer):
        raise DistillError(f"soft targets have shape {tuple(soft.shape)}; the transfer set has {len(transfer)} examples")
    if n_out != soft.shape[1]:
        raise DistillError(f"the student predicts {n_out} classes but the teacher {soft.shape[1]}: "
                           f"build the student with n_classes={soft.shape[1]}")
    labelled = transfer.labelled
    soft = soft.float()

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
        targets = soft[torch.from_numpy(np.asarray(index))].to(logits.device)  # (B, C) cached, no teacher pass
        parts = distillation_loss(logits, labels if labelled else None, targets, temperature, soft_weight)
        return {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}

    # train_model indexes a label per row; an unlabeled set's placeholders never reach the loss
    labels = np.where(transfer.labels >= 0, transfer.labels, 0)
    return train_model(student, student.encode(transfer.inputs), labels, student.encode(val_inputs), val_labels, cfg,
                       seed=seed, device=device, loss_fn=loss_fn, desc=desc, progress=progress)


# ---------------------------------------------------------------------------
# section 3: a bias shift for the classes the transfer set lacks


def accuracy_by_shift(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int],
                      shifts: np.ndarray) -> np.ndarray:
    """Accuracy of argmax(logits + shift on `classes`) for each shift, without re-running the model.

    logits: (N, C); classes: the shifted columns. Returns (S,) accuracies.
    """
    mask = np.zeros(logits.shape[1], dtype=bool)
    mask[np.asarray(classes, dtype=np.int64)] = True
    if mask.all() or not mask.any():
        return np.full(len(shifts), float((logits.argmax(1) == labels).mean()))
    shifted, other = logits[:, mask], logits[:, ~mask]
    # the winner is the best shifted class when its logit + shift beats the best other one
    best_shifted, best_other = np.flatnonzero(mask)[shifted.argmax(1)], np.flatnonzero(~mask)[other.argmax(1)]
    margin = shifted.max(1) - other.max(1)  # (N,)
    right_shifted, right_other = best_shifted == labels, best_other == labels
    return np.array([np.where(margin + s > 0, right_shifted, right_other).mean() for s in shifts])


def choose_bias_shift(logits: np.ndarray, labels: np.ndarray, classes: Sequence[int], max_shift: float = 20.0,
                      step: float = 0.1) -> float:
    """The shift of `classes`' logits that maximises accuracy on (logits, labels), e.g. validation.

    Among equally good shifts, the middle one: the centre of a plateau is the
    furthest from the drops on either side of it.
    """
    shifts = np.round(np.arange(-max_shift, max_shift + step / 2, step) / step) * step
    accuracies = accuracy_by_shift(logits, labels, classes, shifts)
    best = np.flatnonzero(accuracies >= accuracies.max() - 1e-12)
    return round(float(shifts[best[len(best) // 2]]), 6)


def shift_bias(model: nn.Module, classes: Sequence[int], shift: float) -> None:
    """Add `shift` to the head's bias of `classes`, in place (logit + shift for those classes)."""
    with torch.no_grad():
        model.head.bias[torch.as_tensor(np.asarray(classes, dtype=np.int64))] += shift


def kept_gain(distilled: float, baseline: float, teacher: float, n_test: int, gain_stderr: float = 0.0) -> dict:
    """How much of the teacher's test-accuracy gain over `baseline` the distilled model keeps.

    (distilled - baseline) / (teacher - baseline), accuracies in [0, 1] on the
    same n_test examples. Undefined (None, with a reason) when the gain is ~0:
    under one test example, or under two standard errors `gain_stderr` (see
    `gain_standard_error`), where the ratio would be the share of noise.
    """
    gain = teacher - baseline
    out = {"gain": gain, "gain_stderr": gain_stderr}
    if gain * n_test < 1 or gain < 2 * gain_stderr:  # the share of no gain, a loss or noise means nothing
        return {"kept_gain": None, **out,
                "reason": f"undefined: the teacher's gain over the baseline, {gain * n_test:+.1f} of {n_test} test "
                          f"examples, is ~0 (under 1 example or under 2 standard errors, {2 * gain_stderr * n_test:.1f})"}
    return {"kept_gain": (distilled - baseline) / gain, **out}


def gain_standard_error(teacher_correct: np.ndarray, baseline_correct: np.ndarray) -> float:
    """Standard error of mean(teacher_correct - baseline_correct), paired on the same test examples.

    teacher_correct, baseline_correct: (N,) 1 where right, 0 where wrong (a
    mean over several baselines may be fractional). With b examples only the
    teacher gets right and c only the baseline, this is sqrt(b + c) / N
    (McNemar's): the examples both get right or both get wrong carry no noise.
    """
    diff = np.asarray(teacher_correct, dtype=np.float64) - np.asarray(baseline_correct, dtype=np.float64)
    return float(np.sqrt(np.sum(diff ** 2))) / max(len(diff), 1)


# ---------------------------------------------------------------------------
# the run


def _build(model_cfg: ModelConfig, dataset: Dataset) -> nn.Module:
    kwargs = model_kwargs(model_cfg, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model = create_model(model_cfg.name, **kwargs)
    if hasattr(model, "fit_normalizer"):
        model.fit_normalizer(dataset.train.inputs)
    return model


def _split_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str], absent: np.ndarray) -> dict:
    predicted = logits.argmax(1)
    wrong = predicted != labels
    out = {"accuracy": float(1 - wrong.mean()), "errors": int(wrong.sum())}
    if len(absent):
        on_absent = np.isin(labels, absent)
        out["errors_on_absent"] = int((wrong & on_absent).sum())
        out["recall_absent"] = float((~wrong[on_absent]).mean()) if on_absent.any() else float("nan")
        out["errors_by_absent_class"] = {classes[c]: int((wrong & (labels == c)).sum()) for c in absent}
    return out


def _model_metrics(model: nn.Module, dataset: Dataset, transfer: TransferSet, result: TrainResult,
                   batch: int, device, absent: np.ndarray) -> tuple[dict, np.ndarray]:
    """The model's metrics, and (N_test,) 1/0: which test examples it gets right."""
    test_logits = predict_logits(model, model.encode(dataset.test.inputs), batch, device)
    test = _split_metrics(test_logits, dataset.test.labels, dataset.classes, absent)
    metrics = {"test_accuracy": test["accuracy"], "test_errors": test["errors"]}
    metrics.update({f"test_{k}": v for k, v in test.items() if k not in ("accuracy", "errors")})
    metrics.update(val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                   train_accuracy=float((predict_logits(model, model.encode(dataset.train.inputs), batch, device)
                                         .argmax(1) == dataset.train.labels).mean()),
                   parameters=sum(p.numel() for p in model.parameters()))
    if (transfer.truth >= 0).all():
        metrics["transfer_accuracy"] = float((predict_logits(model, model.encode(transfer.inputs), batch, device)
                                              .argmax(1) == transfer.truth).mean())
    return metrics, _correct(test_logits, dataset.test.labels)


def _timed(run: RunDir, stage: str, fn: Callable[[], tuple[dict | None, object]], section: str | None = None):
    """Run a stage `fn() -> (metrics, result)`; record the metrics section and its seconds in one atomic write."""
    started = time.perf_counter()
    metrics, result = fn()
    updates = {"timings": {stage: round(time.perf_counter() - started, 3)}}
    if section and metrics is not None:
        updates[section] = metrics
    run.update_metrics(updates)
    return metrics, result


def default_out_dir() -> Path:
    return Path("runs") / f"distill-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@dataclass
class _Job:
    """What one distillation works on, all checked before anything is written."""

    cfg: DistillConfig
    runs: list[RunDir]
    dataset: Dataset
    transfer: TransferSet
    absent: np.ndarray  # (k,) class ids missing from the transfer set
    device: torch.device
    batch: int  # evaluation batch size
    out: RunDir | None = None


def _prepare(cfg: DistillConfig) -> _Job:
    from .pipeline import dataset_for_run, setup_torch  # pipeline imports every stage; keep this module light

    runs = [RunDir(r) for r in cfg.teacher.runs]
    if runs:
        first = runs[0].read_classes()
        for other in runs[1:]:
            classes = other.read_classes()
            if classes != first:
                raise DistillError(_class_difference(str(runs[0].root), first, str(other.root), classes))
        run_cfg, dataset = dataset_for_run(runs[0])
        for other in runs[1:]:
            _check_same_data(runs[0], run_cfg, other, load_config(other.config))
        for run in runs:
            run.require(run.generalist / "model.json", what="generalist")
        data_cfg = run_cfg.data
    else:
        data_cfg = cfg.data or DataConfig()
        dataset = load_dataset(data_cfg, cfg.seed)
        model_kwargs(cfg.teacher.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model_kwargs(cfg.student.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    transfer = make_transfer_set(cfg.transfer, dataset, cfg.seed, data_cfg.text_column)
    if cfg.student.baseline and not transfer.labelled:
        raise ConfigError("student.baseline=true trains on hard labels, but the transfer set has none "
                          f"(transfer.split={cfg.transfer.split!r}, transfer.labels={cfg.transfer.labels})")
    absent = np.setdiff1d(np.arange(dataset.n_classes), transfer.present)
    return _Job(cfg, runs, dataset, transfer, absent, setup_torch(cfg), cfg.student.train.eval_batch_size)


def _correct(scores: np.ndarray | torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where argmax(scores) is the label, else 0.0."""
    return (np.asarray(scores).argmax(1) == labels).astype(np.float64)


def _teachers(job: _Job, log: Log, progress: bool) -> tuple[dict | None, tuple[list[Teacher], list[np.ndarray]]]:
    """The teachers, and (combined source) which test examples each run's generalist gets right."""
    cfg, ds = job.cfg, job.dataset
    if not job.runs:
        seed_everything(cfg.seed)
        model = _build(cfg.teacher.model, ds)
        result = train_model(model, model.encode(ds.train.inputs), ds.train.labels, model.encode(ds.val.inputs),
                             ds.val.labels, cfg.teacher.train, seed=cfg.seed, device=job.device, desc="teacher",
                             progress=progress)
        save_checkpoint(model, job.out.root / "teacher")
        write_json(job.out.root / "teacher" / "history.json", result.history)
        log(f"teacher: trained, val accuracy {result.best_val_accuracy:.4f}, best epoch {result.best_epoch}, "
            f"{result.seconds:.1f}s")
        metrics = {"val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "parameters": sum(p.numel() for p in model.parameters())}
        return metrics, ([module_teacher(model, ds.classes, "teacher", job.device, job.batch)], [])
    teachers, generalist_correct = [], []
    for run in job.runs:
        generalist = load_checkpoint(run.generalist, job.device)
        if cfg.teacher.source == "generalist":  # its test accuracy comes with the teacher's test pass
            teachers.append(module_teacher(generalist, run.read_classes(), str(run.root), job.device, job.batch))
        else:
            teachers.append(combined_teacher(run.root, job.device, job.batch))
            logits = predict_logits(generalist, generalist.encode(ds.test.inputs), job.batch, job.device)
            generalist_correct.append(_correct(logits, ds.test.labels))
    check_same_classes(teachers, ds.classes)
    return None, (teachers, generalist_correct)


def _soft_targets(job: _Job, teachers: list[Teacher], log: Log) -> tuple[dict, tuple]:
    """(N, C) soft targets for the transfer set (one teacher pass), and the teacher's test metrics.

    Also returns which test examples the combined teacher gets right, and each
    member (the generalists' own, when they are the teachers).
    """
    cfg, ds, transfer = job.cfg, job.dataset, job.transfer
    t = cfg.student.temperature
    started = time.perf_counter()
    soft = combine_teachers([teacher_scores(x, transfer.inputs, job.batch) for x in teachers], t, cfg.teacher.mean)
    seconds = time.perf_counter() - started
    test_scores = [teacher_scores(x, ds.test.inputs, job.batch) for x in teachers]
    test_probs = combine_teachers(test_scores, 1.0, cfg.teacher.mean).numpy()  # (N_test, C) at T = 1
    test = _split_metrics(np.log(np.maximum(test_probs, 1e-38)), ds.test.labels, ds.classes, job.absent)
    metrics = {"source": cfg.teacher.source if job.runs else "trained", "runs": [str(r.root) for r in job.runs],
               "mean": cfg.teacher.mean, "test_accuracy": test["accuracy"], "test_errors": test["errors"]}
    if (transfer.truth >= 0).all():  # argmax of the soft targets (the same as at T = 1 for one teacher)
        metrics["transfer_accuracy"] = float(_correct(soft, transfer.truth).mean())
    log(f"teacher: {len(teachers)} x {metrics['source']} ({cfg.teacher.mean} mean), test accuracy "
        f"{test['accuracy']:.4f} ({test['errors']} errors); soft targets at T={t:g} for {len(transfer)} examples "
        f"in {seconds:.1f}s")
    return metrics, (soft, _correct(test_probs, ds.test.labels), [_correct(x, ds.test.labels) for x in test_scores])


def _adjust_bias(job: _Job, model: nn.Module, unadjusted: dict, result: TrainResult, log: Log) -> tuple[dict, dict]:
    """Section 3: shift the absent classes' logits by the amount best on validation; (bias section, new metrics)."""
    ds, bias = job.dataset, job.cfg.bias
    val_logits = predict_logits(model, model.encode(ds.val.inputs), job.batch, job.device)
    shift = choose_bias_shift(val_logits, ds.val.labels, job.absent, bias.max_shift, bias.step)
    before = _split_metrics(val_logits, ds.val.labels, ds.classes, job.absent)
    shift_bias(model, job.absent, shift)
    after = _split_metrics(predict_logits(model, model.encode(ds.val.inputs), job.batch, job.device), ds.val.labels,
                           ds.classes, job.absent)
    metrics, correct = _model_metrics(model, ds, job.transfer, result, job.batch, job.device, job.absent)
    metrics["val_accuracy"] = after["accuracy"]
    section = {"classes": [ds.classes[c] for c in job.absent], "shift": shift,
               "val_accuracy_before": before["accuracy"], "val_accuracy_after": after["accuracy"],
               "val_recall_absent_before": before["recall_absent"], "val_recall_absent_after": after["recall_absent"],
               "test_accuracy_before": unadjusted["test_accuracy"], "test_errors_before": unadjusted["test_errors"],
               "test_errors_on_absent_before": unadjusted["test_errors_on_absent"],
               "test_accuracy_after": metrics["test_accuracy"], "test_errors_after": metrics["test_errors"],
               "test_errors_on_absent_after": metrics["test_errors_on_absent"]}
    log(f"bias: {len(job.absent)} absent classes shifted by {shift:+.2f} (chosen on validation): val accuracy "
        f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}, test errors {unadjusted['test_errors']} -> "
        f"{metrics['test_errors']} ({unadjusted['test_errors_on_absent']} -> {metrics['test_errors_on_absent']} "
        "on absent classes)")
    return section, metrics, correct


def _student(job: _Job, name: str, soft: torch.Tensor | None, log: Log, progress: bool) -> tuple[dict, np.ndarray]:
    """Train the student on the soft targets (or, soft=None, the baseline on the hard labels); save and score it."""
    cfg, ds, transfer = job.cfg, job.dataset, job.transfer
    seed_everything(cfg.seed)  # the same initial weights for the student and the baseline
    model = _build(cfg.student.model, ds)
    if soft is not None:
        result = train_student(model, transfer, soft, ds.val.inputs, ds.val.labels, cfg.student.train,
                               temperature=cfg.student.temperature, soft_weight=cfg.student.soft_weight,
                               seed=cfg.seed, device=job.device, desc=name, progress=progress)
    else:
        result = train_model(model, model.encode(transfer.inputs), transfer.labels, model.encode(ds.val.inputs),
                             ds.val.labels, cfg.student.train, seed=cfg.seed, device=job.device, desc=name,
                             progress=progress)
    metrics, correct = _model_metrics(model, ds, transfer, result, job.batch, job.device, job.absent)
    bias = None
    if soft is not None and len(job.absent) and cfg.bias.adjust:
        bias, metrics, correct = _adjust_bias(job, model, metrics, result, log)
        job.out.update_metrics({"bias": bias})
    save_checkpoint(model, job.out.root / name, extra={"bias_shift": bias} if bias else None)
    write_json(job.out.root / name / "history.json", result.history)
    log(f"{name}: test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_errors']} errors), "
        f"best epoch {result.best_epoch}, {result.seconds:.1f}s")
    return metrics, correct


def _report_kept_gain(job: _Job, teacher: dict, teacher_correct: np.ndarray, student: dict,
                      baseline_correct: np.ndarray | None, generalist_correct: list[np.ndarray], log: Log) -> None:
    """kept_gain in the output's metrics.json and, distilling runs' combined q, `distilled` in each run's."""
    # Over the generalist when distilling runs (section 8's open question); else over the hard-label
    # student trained on the same examples, the fairest baseline when there is one.
    cfg = job.cfg
    if job.runs and (cfg.teacher.source == "combined" or baseline_correct is None):
        correct, baseline_name = np.mean(generalist_correct, axis=0), "generalist"  # (N_test,) mean over the runs
    elif baseline_correct is not None:
        correct, baseline_name = baseline_correct, "baseline"
    else:
        return
    baseline_accuracy = float(correct.mean())
    kept = {**kept_gain(student["test_accuracy"], baseline_accuracy, teacher["test_accuracy"], len(job.dataset.test),
                        gain_standard_error(teacher_correct, correct)),
            "baseline": baseline_name, "baseline_test_accuracy": baseline_accuracy,
            "teacher_test_accuracy": teacher["test_accuracy"], "student_test_accuracy": student["test_accuracy"]}
    job.out.update_metrics({"kept_gain": kept})
    value = "undefined" if kept["kept_gain"] is None else f"{kept['kept_gain']:.1%}"
    log(f"kept gain: {value} of the teacher's gain over the {baseline_name} ({baseline_accuracy:.4f} -> teacher "
        f"{teacher['test_accuracy']:.4f}, student {student['test_accuracy']:.4f})")
    if job.runs and cfg.teacher.source == "combined":
        section = {"out": str(job.out.root.resolve()), "runs": [str(r.root) for r in job.runs],
                   "student_test_accuracy": student["test_accuracy"], "generalist_test_accuracy": baseline_accuracy,
                   "ensemble_test_accuracy": teacher["test_accuracy"], "kept_gain": kept["kept_gain"],
                   "gain": kept["gain"], "gain_stderr": kept["gain_stderr"], "temperature": cfg.student.temperature,
                   "transfer_examples": len(job.transfer), "student_parameters": student["parameters"]}
        if "reason" in kept:
            section["reason"] = kept["reason"]
        for run in job.runs:
            run.update_metrics({"distilled": section})


def run_distill(cfg: DistillConfig, out: str | Path | None = None, log: Log = print,
                progress: bool = True) -> RunDir:
    """`specialists distill`: teacher(s) -> soft targets on the transfer set (once) -> student -> metrics.json."""
    started = time.perf_counter()
    cfg = resolve_student(cfg)  # a student.model / student.train of None: the teacher's
    job = _prepare(cfg)
    ds, transfer = job.dataset, job.transfer

    job.out = RunDir(out or default_out_dir()).create()
    write_text(job.out.config, dump_config(cfg))
    write_json(job.out.classes, ds.classes)
    job.out.update_metrics({
        "data": {"name": ds.name, "classes": ds.n_classes, "train": len(ds.train), "val": len(ds.val),
                 "test": len(ds.test), "device": str(job.device)},
        "transfer": {"split": transfer.source, "examples": len(transfer), "labelled": transfer.labelled,
                     "classes": int(len(transfer.present)), "absent_classes": [ds.classes[c] for c in job.absent]},
    })
    log(f"data: {ds.name}, {ds.n_classes} classes, {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test; "
        f"transfer set {len(transfer)} examples{'' if transfer.labelled else ' (unlabeled)'}, {len(job.absent)} "
        f"classes absent; device {job.device}; output {job.out.root}")

    _, (teachers, generalist_correct) = _timed(job.out, "teacher", lambda: _teachers(job, log, progress), "teacher")
    teacher, (soft, teacher_correct, member_correct) = _timed(job.out, "soft_targets",
                                                              lambda: _soft_targets(job, teachers, log), "teacher")
    if job.runs and cfg.teacher.source == "generalist":
        generalist_correct = member_correct
    baseline_correct = None
    if cfg.student.baseline:
        _, baseline_correct = _timed(job.out, "baseline", lambda: _student(job, "baseline", None, log, progress),
                                     "baseline")
    student, _ = _timed(job.out, "student", lambda: _student(job, "student", soft, log, progress), "student")
    _report_kept_gain(job, teacher, teacher_correct, student, baseline_correct, generalist_correct, log)
    job.out.update_metrics({"timings": {"total": round(time.perf_counter() - started, 3)}})
    return job.out


def summary(run: RunDir) -> str:
    """A few lines: teacher, baseline and student test accuracy, the bias shift and the kept gain."""
    metrics = run.read_metrics()
    lines = []
    for section in ("teacher", "baseline", "student"):
        if section in metrics:
            m = metrics[section]
            lines.append(f"  {section:<9} test accuracy {m['test_accuracy']:.4f}  ({m['test_errors']} errors)")
    if "bias" in metrics:
        b = metrics["bias"]
        lines.append(f"  bias      {b['shift']:+.2f} on {len(b['classes'])} absent classes: test errors "
                     f"{b['test_errors_before']} -> {b['test_errors_after']}")
    if "kept_gain" in metrics:
        k = metrics["kept_gain"]
        value = k.get("reason") if k["kept_gain"] is None else f"{k['kept_gain']:.1%}"
        lines.append(f"  kept gain {value} (of the teacher's gain over the {k['baseline']})")
    return "\n".join(lines)

