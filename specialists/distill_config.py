"""The typed config of `specialists distill`: teacher, student, transfer set, bias shift; the student's inheritance."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .choices import ARRAY_AUGMENTATIONS, DEVICES, ENSEMBLE_MEANS, STUDENT_INITS, TEACHER_SOURCES, TEXT_AUGMENTATIONS
from .config import (ConfigError, DataConfig, ModelConfig, TrainConfig, load_config, parse_override, read_yaml,
                     require)
from .rundir import RunDir


@dataclass(frozen=True)
class TeacherConfig:
    """Where the soft targets come from."""

    runs: list[str] = field(default_factory=list)  # run directories; empty: train a teacher here
    source: str = "combined"  # combined: specialists.load(run).predict_proba (generalist + specialists); generalist
    mean: str = "arithmetic"  # how several teachers combine: arithmetic | geometric (of their distributions at T)
    # images: each teacher's distribution averaged over its input moved by up to this many pixels each way
    # ((2s + 1)^2 translations, zero fill); 0: off
    shift_pixels: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)  # the teacher trained here (no runs)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, prefix: str = "teacher") -> None:
        require(self.source in TEACHER_SOURCES, f"{prefix}.source", self.source, f"must be one of {TEACHER_SOURCES}")
        require(self.mean in ENSEMBLE_MEANS, f"{prefix}.mean", self.mean, f"must be one of {ENSEMBLE_MEANS}")
        require(self.shift_pixels >= 0, f"{prefix}.shift_pixels", self.shift_pixels, "must be >= 0 (0: off)")
        require(all(str(r).strip() for r in self.runs), f"{prefix}.runs", self.runs, "run directories must not be empty")
        require(len(set(self.runs)) == len(self.runs), f"{prefix}.runs", self.runs, "lists a run twice")
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
    # Chosen on validation accuracy: one student per (T, soft weight) pair, the best kept; empty: the one above
    temperatures: list[float] = field(default_factory=list)
    soft_weights: list[float] = field(default_factory=list)
    # auto: start from the teacher run's generalist when the student has its architecture; scratch; generalist;
    # both: the grid from each starting point, the best on validation kept
    init: str = "auto"
    # > 0: per-cluster targets, each specialist's distribution over its own classes (dustbin left out) on the
    # transfer examples whose label (teacher's top class when unlabeled) it covers, as a T^2-scaled term of this weight
    cluster_weight: float = 0.0

    def validate(self, prefix: str = "student") -> None:
        if self.model is not None:
            self.model.validate(f"{prefix}.model")
        if self.train is not None:
            self.train.validate(f"{prefix}.train")
        require(math.isfinite(self.temperature) and self.temperature > 0, f"{prefix}.temperature", self.temperature,
                 "must be a finite number > 0")
        require(0 <= self.soft_weight <= 1, f"{prefix}.soft_weight", self.soft_weight,
                 "must be in [0, 1] (1: soft targets only, 0: hard labels only)")
        require(all(math.isfinite(t) and t > 0 for t in self.temperatures), f"{prefix}.temperatures",
                 self.temperatures, "every temperature must be a finite number > 0")
        require(all(0 <= w <= 1 for w in self.soft_weights), f"{prefix}.soft_weights", self.soft_weights,
                 "every soft weight must be in [0, 1]")
        require(self.init in STUDENT_INITS, f"{prefix}.init", self.init, f"must be one of {STUDENT_INITS}")
        require(math.isfinite(self.cluster_weight) and self.cluster_weight >= 0, f"{prefix}.cluster_weight",
                 self.cluster_weight, "must be a finite number >= 0 (0: off)")


@dataclass(frozen=True)
class TransferConfig:
    """The examples the student learns from. Classes are named as in classes.json (MNIST: 0..9)."""

    split: str = "train"  # train | a file of unlabeled inputs: .npy (arrays) or .csv (texts, column data.text_column)
    fraction: float = 1.0  # seeded per-class share of the examples kept (every kept class keeps at least one)
    omit_classes: list[int | str] = field(default_factory=list)  # leave these classes out
    keep_classes: list[int | str] = field(default_factory=list)  # keep only these classes
    labels: bool = True  # use the hard labels (weighted 1 - student.soft_weight); false: soft targets only
    # Augmented copies of the training inputs added to the transfer set (seeded), each keeping its source's label:
    # texts token_dropout | span_mask | swap, vectors and images noise | jitter | mixup; each copy draws one of these
    augment: list[str] = field(default_factory=list)
    copies: int = 1  # augmented copies per training example (with augment)
    # true: each augmented copy is drawn anew whenever a batch holds it, and the teacher labels it there (student and
    # teacher see the same input: consistent teaching); false: drawn once and labelled once, before training
    fresh: bool = False
    strength: float = 0.15  # token share dropped / masked / swapped; noise sd and jitter in feature sds; mixup's alpha
    # >= 2: out-of-fold teacher targets on the training examples: K runs of the teacher, each trained without one fold
    # (generalist and specialists), label the fold they did not see; 0: the teacher run labels its own training set
    folds: int = 0

    def validate(self, prefix: str = "transfer") -> None:
        require(bool(self.split.strip()), f"{prefix}.split", self.split, "must be train or a file path")
        require(0 < self.fraction <= 1, f"{prefix}.fraction", self.fraction, "must be in (0, 1]")
        require(not (self.omit_classes and self.keep_classes), f"{prefix}.keep_classes", self.keep_classes,
                 f"set omit_classes or keep_classes, not both (omit_classes={self.omit_classes})")
        for key in ("omit_classes", "keep_classes"):
            names = [str(c) for c in getattr(self, key)]
            require(len(set(names)) == len(names), f"{prefix}.{key}", getattr(self, key), "lists a class twice")
        known = TEXT_AUGMENTATIONS + ARRAY_AUGMENTATIONS
        require(all(a in known for a in self.augment), f"{prefix}.augment", self.augment,
                 f"each must be one of {TEXT_AUGMENTATIONS} (texts) or {ARRAY_AUGMENTATIONS} (vectors, images)")
        require(1 <= self.copies <= 100, f"{prefix}.copies", self.copies, "must be in [1, 100]")
        require(math.isfinite(self.strength) and 0 < self.strength <= 1, f"{prefix}.strength", self.strength,
                 "must be in (0, 1]")
        require(not self.fresh or bool(self.augment), f"{prefix}.fresh", self.fresh,
                 "draws the augmented copies afresh: set transfer.augment too")
        require(not (self.fresh and self.folds), f"{prefix}.fresh", self.fresh,
                 f"out-of-fold targets (transfer.folds={self.folds}) are labelled once, by the fold runs: "
                 "set one of them")
        require(self.folds == 0 or 2 <= self.folds <= 20, f"{prefix}.folds", self.folds, "must be 0 (off) or in [2, 20]")
        require(not (self.augment or self.folds) or self.split == "train", f"{prefix}.split", self.split,
                 "augment and folds work on the training set: use transfer.split=train with them")


@dataclass(frozen=True)
class BiasConfig:
    """Section 3: one logit shift for the classes the transfer set lacks, chosen on validation accuracy."""

    adjust: bool = True
    max_shift: float = 20.0  # shifts searched: -max_shift .. +max_shift
    step: float = 0.1

    def validate(self, prefix: str = "bias") -> None:
        require(self.max_shift >= 0, f"{prefix}.max_shift", self.max_shift, "must be >= 0")
        require(self.step > 0, f"{prefix}.step", self.step, "must be > 0")
        require(self.max_shift / self.step <= 100_000, f"{prefix}.step", self.step,
                 f"gives more than 200,001 shifts for max_shift={self.max_shift}")


@dataclass(frozen=True)
class DistillConfig:
    """Everything `specialists distill` needs."""

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    # `None | X`, not `X | None`: _check_type tries a union's options in order, and a null read as X is X's defaults
    data: None | DataConfig = None  # None: the first teacher run's data, or (no runs) the default data
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    bias: BiasConfig = field(default_factory=BiasConfig)

    def validate(self) -> None:
        require(self.seed >= 0, "seed", self.seed, "must be >= 0")
        require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        require(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = default)")
        if self.data is not None and self.teacher.runs:
            raise ConfigError(f"data.*: the data come from the teacher run {self.teacher.runs[0]!r} (its config.yaml); "
                              "drop the data keys when teacher.runs is set")
        if self.data is not None:
            self.data.validate()
        self.teacher.validate()
        self.student.validate()
        self.transfer.validate()
        self.bias.validate()
        if self.student.cluster_weight and self.transfer.fresh:
            raise ConfigError(f"student.cluster_weight={self.student.cluster_weight} caches each transfer row's "
                              "specialist targets, and transfer.fresh=true draws the augmented rows anew: "
                              "set one of them")


def load_distill_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> DistillConfig:
    """Defaults <- YAML file <- `a.b=value` overrides, validated (ConfigError names the key).

    `student.model` and `student.train` start from the teacher's: the first
    teacher run's `model` / `train` (its config.yaml), else `teacher.model` /
    `teacher.train`; the keys given under them override that. The returned
    config spells every value out, as config.yaml will.
    """
    cfg = load_config(path, list(overrides), cls=DistillConfig)
    return resolve_student(cfg, _student_keys(path, overrides))


def _student_keys(path: str | Path | None, overrides: typing.Sequence[str]) -> dict[str, set[str]]:
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
