"""`specialists distill` (Hinton, Vinyals & Dean, 2015, sections 2-3, 6 and 8): teacher(s) -> soft targets on
a transfer set, computed once -> student -> metrics.json.

A teacher labels a *transfer set* (`transfer.py`) once with soft targets at
temperature T; a student is trained on them (plus, weighted by
`1 - student.soft_weight`, the hard labels where the transfer set has them) by
the one training loop.

* teachers: trained here (`teacher.model`, `teacher.train`, by
  `generalist.fit_generalist`), or loaded from one or several run directories
  (`teacher.runs`), each giving its generalist or its combined
  generalist+specialists distribution (`specialists.load(run)`); several are
  combined by an arithmetic or a geometric mean (`teacher.mean`);
* classes absent from the transfer set get one bias shift added to their logits,
  chosen on the validation split (section 3: "raise the bias of the 3");
* the student defaults to the teacher's architecture (with `teacher.runs`: one
  model of the generalist's size), and `kept_gain` says how much of the
  teacher's test-accuracy gain over a baseline it keeps: over the runs'
  generalist when distilling their combined distribution (section 8: "we have
  not yet shown that we can distill the knowledge in the specialists back into
  the single large net"), else over `student.baseline`, the same student
  trained on the hard labels alone.

The settings are `config.DistillConfig`; the maths (bias shift, kept gain,
ensembles of teachers) is in `distill.py`. Outputs land in one directory:
`config.yaml`, `classes.json`, `teacher/` (when trained here), `student/`
(and `baseline/`), `metrics.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import ConfigError, DataConfig, DistillConfig, TrainConfig, dump_config, load_config, resolve_student
from .data import Dataset, load_dataset, take_inputs
from .distill import (
    TeacherCache,
    choose_bias_shift,
    distillation_loss,
    ensemble_probs,
    gain_standard_error,
    kept_gain,
    shift_bias,
)
from .generalist import build_model, fit_generalist
from .models import load_checkpoint, model_kwargs, save_checkpoint
from .rundir import RunDir, write_json, write_text
from .runtime import Log, data_summary, dataset_for_run, default_out_dir, setup_torch, timed_stage
from .train import TrainResult, predict_logits, seed_everything, train_model
from .transfer import TransferSet, make_transfer_set

__all__ = [
    "DistillError",
    "Teacher",
    "check_same_classes",
    "combined_teacher",
    "module_teacher",
    "run_distill",
    "summary",
    "teacher_scores",
    "train_student",
]


class DistillError(ValueError):
    """Teachers, transfer set and student do not fit together (class sets, output sizes)."""


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
    cache = TeacherCache(lambda index: teacher.scores(take_inputs(inputs, index.numpy())), output="logits",
                         batch_size=batch_size, device="cpu")
    return cache.fit(torch.arange(len(inputs))).outputs_


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
# metrics


def _correct(scores: np.ndarray | torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """(N,) 1.0 where argmax(scores) is the label, else 0.0."""
    return (np.asarray(scores).argmax(1) == labels).astype(np.float64)


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


# ---------------------------------------------------------------------------
# the run


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


def _timed(job: _Job, stage: str, fn: Callable[[], tuple[dict | None, object]], section: str) -> tuple:
    """`runtime.timed_stage` for a stage `fn() -> (metrics section, what later stages need)`; returns both."""
    done = []

    def metrics() -> dict | None:
        done.append(fn())
        return done[0][0]

    timed_stage(job.out, stage, metrics, section)
    return done[0]


def _teachers(job: _Job, log: Log, progress: bool) -> tuple[dict | None, tuple[list[Teacher], list[np.ndarray]]]:
    """The teachers, and (combined source) which test examples each run's generalist gets right."""
    cfg, ds = job.cfg, job.dataset
    if not job.runs:
        model, result = fit_generalist(cfg.teacher, ds, job.device, seed=cfg.seed, desc="teacher", progress=progress)
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
    soft = ensemble_probs([teacher_scores(x, transfer.inputs, job.batch) for x in teachers], mean=cfg.teacher.mean,
                          temperature=t, inputs="logits")
    seconds = time.perf_counter() - started
    test_scores = [teacher_scores(x, ds.test.inputs, job.batch) for x in teachers]
    test_probs = ensemble_probs(test_scores, mean=cfg.teacher.mean, inputs="logits").numpy()  # (N_test, C) at T = 1
    test = _split_metrics(np.log(np.maximum(test_probs, 1e-38)), ds.test.labels, ds.classes, job.absent)
    metrics = {"source": cfg.teacher.source if job.runs else "trained", "runs": [str(r.root) for r in job.runs],
               "mean": cfg.teacher.mean, "test_accuracy": test["accuracy"], "test_errors": test["errors"]}
    if (transfer.truth >= 0).all():  # argmax of the soft targets (the same as at T = 1 for one teacher)
        metrics["transfer_accuracy"] = float(_correct(soft, transfer.truth).mean())
    log(f"teacher: {len(teachers)} x {metrics['source']} ({cfg.teacher.mean} mean), test accuracy "
        f"{test['accuracy']:.4f} ({test['errors']} errors); soft targets at T={t:g} for {len(transfer)} examples "
        f"in {seconds:.1f}s")
    return metrics, (soft, _correct(test_probs, ds.test.labels), [_correct(x, ds.test.labels) for x in test_scores])


def _adjust_bias(job: _Job, model: nn.Module, unadjusted: dict, result: TrainResult,
                 log: Log) -> tuple[dict, dict, np.ndarray]:
    """Section 3: shift the absent classes' logits by the amount best on validation.

    Returns the `bias` section, the shifted model's metrics and (N_test,) which test examples it gets right.
    """
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
    model = build_model(cfg.student, ds)
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

    job.out = RunDir(out or default_out_dir("distill")).create()
    write_text(job.out.config, dump_config(cfg))
    write_json(job.out.classes, ds.classes)
    job.out.update_metrics({
        "data": data_summary(ds, job.device),
        "transfer": {"split": transfer.source, "examples": len(transfer), "labelled": transfer.labelled,
                     "classes": int(len(transfer.present)), "absent_classes": [ds.classes[c] for c in job.absent]},
    })
    log(f"data: {ds.name}, {ds.n_classes} classes, {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test; "
        f"transfer set {len(transfer)} examples{'' if transfer.labelled else ' (unlabeled)'}, {len(job.absent)} "
        f"classes absent; device {job.device}; output {job.out.root}")

    _, (teachers, generalist_correct) = _timed(job, "teacher", lambda: _teachers(job, log, progress), "teacher")
    teacher, (soft, teacher_correct, member_correct) = _timed(job, "soft_targets",
                                                              lambda: _soft_targets(job, teachers, log), "teacher")
    if job.runs and cfg.teacher.source == "generalist":
        generalist_correct = member_correct
    baseline_correct = None
    if cfg.student.baseline:
        _, baseline_correct = _timed(job, "baseline", lambda: _student(job, "baseline", None, log, progress),
                                     "baseline")
    student, _ = _timed(job, "student", lambda: _student(job, "student", soft, log, progress), "student")
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
