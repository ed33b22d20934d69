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
  combined by an arithmetic or a geometric mean (`teacher.mean`); on images,
  each may be averaged over its input shifted by up to `teacher.shift_pixels`;
* classes absent from the transfer set get one bias shift added to their logits,
  chosen on the validation split (section 3: "raise the bias of the 3");
* the student defaults to the teacher's architecture (with `teacher.runs`: one
  model of the generalist's size), and `kept_gain` says how much of the
  teacher's test-accuracy gain over a baseline it keeps: over the runs'
  generalist when distilling their combined distribution (section 8: "we have
  not yet shown that we can distill the knowledge in the specialists back into
  the single large net"), else over `student.baseline`, the same student
  trained on the hard labels alone.

A teacher run gives (`teacher.source`) its generalist + specialists
(`combined`), its generalist alone, its peer ensemble (`peers`: the generalist
and `peers/<k>/`, section 4) or the hybrid (all its full models + its
specialists). With `transfer.folds=K` the training examples are labelled out of
fold: K copies of the teacher run, each trained without one fold of the
training split (`data.holdout_folds`), label that fold (and its augmented
copies); the teacher's test accuracy stays the full run's. With
`transfer.fresh` the augmented copies are drawn anew in every batch and the
teacher labels them there (consistent teaching).

The student starts from the run's generalist when it has its architecture
(`student.init`), stops early on validation accuracy, and its temperature and
soft weight are chosen on validation (`student.temperatures`,
`student.soft_weights`); `student.cluster_weight` adds each specialist's
distribution inside its cluster as a loss term.

The settings are `distill_config.DistillConfig`; the maths (bias shift, kept
gain, ensembles of teachers) is in `distill.py`, the teachers in
`distill_teachers.py`, the student's training in `distill_student.py`; this
file orchestrates them. Outputs land in one directory, which
`specialists.load(DIR)` serves as a single model: `config.yaml`,
`classes.json`, `teacher/` (when trained here), `student/` (and `baseline/`),
`folds/<k>/` (out-of-fold teacher runs), `metrics.json`, `report/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import ConfigError, DataConfig, dump_config, load_config, to_dict
from .data import Dataset, fold_of_rows, load_dataset, take_inputs
from .distill import DistillError, choose_bias_shift, ensemble_probs, gain_standard_error, kept_gain, shift_bias
from .distill_config import DistillConfig, resolve_student
from .distill_student import FreshCopies, cluster_targets, train_student
from .distill_teachers import (Teacher, check_same_classes, check_same_data, check_source, class_difference,
                               module_teacher, run_teacher, shift_averaged, teacher_scores)
from .generalist import build_model, fit_generalist
from .models import load_checkpoint, model_kwargs, save_checkpoint
from .rundir import WRITES_REFUSED, RunDir, write_json, write_text
from .runtime import Log, data_summary, dataset_for_run, default_out_dir, setup_torch, timed_stage
from .train import TrainResult, predict_logits, seed_everything, train_model
from .transfer import Augmenter, TransferSet, make_transfer_set

__all__ = ["KEPT_GAIN_DEFINITION", "is_student_dir", "run_distill", "summary"]


KEPT_GAIN_DEFINITION = ("(student - baseline) / (teacher - baseline), test accuracy; the baseline is the teacher "
                        "run's generalist (the student.baseline net when a teacher is trained here or "
                        "teacher.source=generalist); null, with a reason, when the teacher's gain is under "
                        "5 test examples or 2 standard errors")

# teacher.source -> the section of the teacher run's metrics.json that records its distilled student
RUN_SECTIONS = {"combined": "distilled", "peers": "distilled_peers", "hybrid": "distilled_hybrid"}


def is_student_dir(root: str | Path) -> bool:
    """A `specialists distill` output (student/ without a generalist/): `specialists.load` serves it."""
    root = Path(root)
    return (root / "student" / "model.json").is_file() and not (root / "generalist" / "model.json").is_file()


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
    """The model's metrics, and (N_test,) its predicted class of each test example."""
    test_logits = predict_logits(model, model.encode(dataset.test.inputs), batch, device)
    test = _split_metrics(test_logits, dataset.test.labels, dataset.classes, absent)
    metrics = {"test_accuracy": test["accuracy"], "test_errors": test["errors"]}
    metrics.update({f"test_{k}": v for k, v in test.items() if k not in ("accuracy", "errors")})
    metrics.update(val_accuracy=result.best_val_accuracy, best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                   train_accuracy=float((predict_logits(model, model.encode(dataset.train.inputs), batch, device)
                                         .argmax(1) == dataset.train.labels).mean()),
                   parameters=sum(p.numel() for p in model.parameters()),
                   examples_seen=result.examples_seen, train_seconds=round(result.seconds, 3))
    if (transfer.truth >= 0).all():
        metrics["transfer_accuracy"] = float((predict_logits(model, model.encode(transfer.inputs), batch, device)
                                              .argmax(1) == transfer.truth).mean())
    return metrics, test_logits.argmax(1)


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
    init: str  # scratch | generalist | both: where the student starts
    run_seed: int = 0  # the first teacher run's seed (its folds are drawn with it)
    out: RunDir | None = None
    generalist_predicted: np.ndarray | None = None  # (N_test,) the teacher run's generalist's classes
    teacher_section: dict = field(default_factory=dict)  # this student as a row of the teacher run's Table 3


def _prepare(cfg: DistillConfig) -> _Job:
    runs = [RunDir(r) for r in cfg.teacher.runs]
    run_cfg = None
    if runs:
        first = runs[0].read_classes()
        for other in runs[1:]:
            classes = other.read_classes()
            if classes != first:
                raise DistillError(class_difference(str(runs[0].root), first, str(other.root), classes))
        run_cfg, dataset = dataset_for_run(runs[0])
        for other in runs[1:]:
            check_same_data(runs[0], run_cfg, other, load_config(other.config))
        for run in runs:
            run.require(run.generalist / "model.json", what="generalist")
            check_source(run, cfg.teacher.source)
        data_cfg = run_cfg.data
    else:
        if cfg.teacher.source != "combined":
            raise ConfigError(f"teacher.source={cfg.teacher.source} reads teacher runs; without teacher.runs the "
                              "teacher is trained here")
        data_cfg = cfg.data or DataConfig()
        dataset = load_dataset(data_cfg, cfg.seed)
        model_kwargs(cfg.teacher.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    model_kwargs(cfg.student.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    if cfg.teacher.shift_pixels and (dataset.input_kind != "image"
                                     or cfg.teacher.shift_pixels >= min(dataset.input_shape[-2:])):
        raise ConfigError(f"teacher.shift_pixels={cfg.teacher.shift_pixels} moves image inputs, and must be smaller "
                          f"than their side; these data are {dataset.input_kind} of shape {dataset.input_shape}")
    if cfg.transfer.folds and len(runs) != 1:
        raise ConfigError(f"transfer.folds={cfg.transfer.folds} retrains one teacher run without each fold; "
                          f"teacher.runs lists {len(runs)}")
    if cfg.student.cluster_weight and (len(runs) != 1 or cfg.teacher.source not in ("combined", "hybrid")):
        raise ConfigError(f"student.cluster_weight={cfg.student.cluster_weight} reads the specialists of one teacher "
                          f"run: needs one of teacher.runs and teacher.source=combined or hybrid")
    init = cfg.student.init
    same = run_cfg is not None and cfg.student.model == run_cfg.model
    if init == "auto":
        init = "generalist" if same else "scratch"
    elif init in ("generalist", "both") and not same:
        raise ConfigError(f"student.init={init}: " + ("the student starts from a teacher run's generalist, and "
                          "teacher.runs is empty" if run_cfg is None else "the student's architecture "
                          f"(student.model) differs from the run's generalist ({run_cfg.model})"))
    transfer = make_transfer_set(cfg.transfer, dataset, cfg.seed, data_cfg.text_column)
    if cfg.student.baseline and not transfer.labelled:
        raise ConfigError("student.baseline=true trains on hard labels, but the transfer set has none "
                          f"(transfer.split={cfg.transfer.split!r}, transfer.labels={cfg.transfer.labels})")
    absent = np.setdiff1d(np.arange(dataset.n_classes), transfer.present)
    return _Job(cfg, runs, dataset, transfer, absent, setup_torch(cfg), cfg.student.train.eval_batch_size, init,
                run_cfg.seed if run_cfg is not None else cfg.seed)


def _timed(job: _Job, stage: str, fn: Callable[[], tuple[dict | None, object]], section: str) -> tuple:
    """`runtime.timed_stage` for a stage `fn() -> (metrics section, what later stages need)`; returns both."""
    done = []

    def metrics() -> dict | None:
        done.append(fn())
        return done[0][0]

    timed_stage(job.out, stage, metrics, section)
    return done[0]


def _teachers(job: _Job, log: Log, progress: bool) -> tuple[dict | None, tuple[list[Teacher], list[np.ndarray]]]:
    """The teachers, and (runs, source other than generalist) which test examples each run's generalist gets right."""
    cfg, ds = job.cfg, job.dataset
    if not job.runs:
        model, result = fit_generalist(cfg.teacher, ds, job.device, seed=cfg.seed, desc="teacher", progress=progress)
        save_checkpoint(model, job.out.root / "teacher")
        write_json(job.out.root / "teacher" / "history.json", result.history)
        log(f"teacher: trained, val accuracy {result.best_val_accuracy:.4f}, best epoch {result.best_epoch}, "
            f"{result.seconds:.1f}s")
        metrics = {"val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                   "epochs_run": result.epochs_run, "parameters": sum(p.numel() for p in model.parameters())}
        return metrics, ([_shifted(job, module_teacher(model, ds.classes, "teacher", job.device, job.batch))], [])
    teachers, generalist_correct = [], []
    for run in job.runs:
        teacher = run_teacher(run, cfg.teacher.source, job.device, job.batch)
        teachers.append(_shifted(job, teacher))
        if cfg.teacher.source == "generalist":  # its test accuracy comes with the teacher's test pass
            if teacher is not teachers[-1] and job.generalist_predicted is None:  # unless shift-averaged
                job.generalist_predicted = teacher_scores(teacher, ds.test.inputs, job.batch).numpy().argmax(1)
            continue
        generalist = load_checkpoint(run.generalist, job.device)
        logits = predict_logits(generalist, generalist.encode(ds.test.inputs), job.batch, job.device)
        if job.generalist_predicted is None:
            job.generalist_predicted = logits.argmax(1)
        generalist_correct.append(_correct(logits, ds.test.labels))
    check_same_classes(teachers, ds.classes)
    return None, (teachers, generalist_correct)


def _shifted(job: _Job, teacher: Teacher) -> Teacher:
    """The teacher averaged over shifted inputs (teacher.shift_pixels), or as it is."""
    pixels = job.cfg.teacher.shift_pixels
    return shift_averaged(teacher, pixels, job.dataset.input_shape) if pixels else teacher


def _out_of_fold_scores(job: _Job, log: Log, progress: bool) -> tuple[torch.Tensor, dict]:
    """(N, C) teacher scores of the transfer set, each row from a copy of the teacher run that never saw its
    training row (nor, for an augmented copy, the row it was made from), and the cost of those runs."""
    from .stages import fork_run, run_pipeline  # the fold runs are whole `specialists run`s

    cfg, ds, transfer, base = job.cfg, job.dataset, job.transfer, job.runs[0]
    k_folds, source = cfg.transfer.folds, cfg.teacher.source
    fold = fold_of_rows(ds.train.labels, k_folds, job.run_seed)[transfer.origin]  # (N,) as data.load_dataset draws them
    overrides = [f"data.holdout_folds={k_folds}"]
    if source in ("combined", "generalist"):  # the peer members are not part of these teachers
        overrides += ["peer.enabled=false", "combine.generalists=1"]
    if source == "generalist":
        overrides += ["cluster.enabled=false", "specialists.enabled=false"]
    scores, runs, seconds, examples = None, [], 0.0, 0
    for k in range(k_folds):
        folder = job.out.root / "folds" / str(k)
        if not (folder / "config.yaml").is_file():
            fork_run(base, folder, [*overrides, f"data.holdout_fold={k}"])
        started = time.perf_counter()
        run = run_pipeline(None, folder, resume=True, log=lambda m: None, progress=progress)
        seconds += time.perf_counter() - started
        metrics = run.read_metrics()
        examples += _examples_seen(metrics)
        rows = np.flatnonzero(fold == k)
        teacher = _shifted(job, run_teacher(run, source, job.device, job.batch))
        part = teacher_scores(teacher, take_inputs(transfer.inputs, rows), job.batch)
        if scores is None:
            scores = torch.empty(len(transfer), part.shape[1], dtype=part.dtype)
        scores[torch.from_numpy(rows)] = part
        runs.append({"fold": k, "run": str(folder), "rows": int(len(rows)),
                     "train_examples": int(metrics.get("data", {}).get("train", 0)),
                     "seconds": round(time.perf_counter() - started, 1), "examples_seen": _examples_seen(metrics)})
        log(f"out-of-fold teacher {k + 1}/{k_folds}: trained without fold {k}, labels its {len(rows)} transfer rows "
            f"({runs[-1]['seconds']:.0f}s)")
    np.save(job.out.root / "folds" / "fold_of_transfer_rows.npy", fold)
    base_metrics = base.read_metrics()
    cost = {"folds": k_folds, "runs": runs, "seconds": round(seconds, 1), "examples_seen": examples,
            "teacher_run_seconds": base_metrics.get("timings", {}).get("total"),
            "teacher_run_examples_seen": _examples_seen(base_metrics)}
    return scores, cost


def _examples_seen(metrics: dict) -> int:
    """Training examples a run's models processed (generalist + specialists + peers), from its metrics.json."""
    total = int(metrics.get("generalist", {}).get("examples_seen", 0))
    total += int(metrics.get("specialists", {}).get("examples_seen", 0) or 0)
    total += int(metrics.get("peer_ensemble", {}).get("examples_seen", 0) or 0) - (
        int(metrics.get("generalist", {}).get("examples_seen", 0)) if "peer_ensemble" in metrics else 0)
    return max(total, 0)


def _soft_targets(job: _Job, teachers: list[Teacher], log: Log, progress: bool) -> tuple[dict, tuple]:
    """The teachers' (N, C) scores of the transfer set (one pass, or out of fold), and their test metrics.

    Also returns which test examples the combined teacher gets right, and each
    member (the generalists' own, when they are the teachers).
    """
    cfg, ds, transfer = job.cfg, job.dataset, job.transfer
    started = time.perf_counter()
    oof = None
    if cfg.transfer.folds:
        scores, oof = _out_of_fold_scores(job, log, progress)
        transfer_scores = [scores]
    else:
        transfer_scores = [teacher_scores(x, transfer.inputs, job.batch) for x in teachers]
    seconds = time.perf_counter() - started
    test_scores = [teacher_scores(x, ds.test.inputs, job.batch) for x in teachers]
    test_probs = ensemble_probs(test_scores, mean=cfg.teacher.mean, inputs="logits").numpy()  # (N_test, C) at T = 1
    if job.runs and cfg.teacher.source == "generalist" and job.generalist_predicted is None:
        job.generalist_predicted = test_scores[0].numpy().argmax(1)  # the first run's generalist
    test = _split_metrics(np.log(np.maximum(test_probs, 1e-38)), ds.test.labels, ds.classes, job.absent)
    metrics = {"source": cfg.teacher.source if job.runs else "trained", "runs": [str(r.root) for r in job.runs],
               "mean": cfg.teacher.mean, "shift_pixels": cfg.teacher.shift_pixels,
               "test_accuracy": test["accuracy"], "test_errors": test["errors"],
               "label_seconds": round(seconds, 3)}
    if job.runs and teachers[0].model is not None:
        metrics["mode"] = teachers[0].model.mode
    if oof is not None:
        metrics["out_of_fold"] = oof
    probs1 = ensemble_probs(transfer_scores, mean=cfg.teacher.mean, inputs="logits")  # (N, C) at T = 1
    if (transfer.truth >= 0).all():
        metrics["transfer_accuracy"] = float(_correct(probs1, transfer.truth).mean())
        if transfer.augmented.any():
            metrics["transfer_accuracy_on_augmented"] = float(
                _correct(probs1[torch.from_numpy(transfer.augmented)], transfer.truth[transfer.augmented]).mean())
    log(f"teacher: {len(teachers)} x {metrics['source']} ({cfg.teacher.mean} mean), test accuracy "
        f"{test['accuracy']:.4f} ({test['errors']} errors); scores of {len(transfer)} transfer examples"
        f"{' out of fold' if oof else ''} in {seconds:.1f}s")
    return metrics, (transfer_scores, probs1, _correct(test_probs, ds.test.labels),
                     [_correct(x, ds.test.labels) for x in test_scores])


def _adjust_bias(job: _Job, model: nn.Module, unadjusted: dict, result: TrainResult,
                 log: Log) -> tuple[dict, dict, np.ndarray]:
    """Section 3: shift the absent classes' logits by the amount best on validation.

    Returns the `bias` section, the shifted model's metrics and (N_test,) its predicted classes.
    """
    ds, bias = job.dataset, job.cfg.bias
    val_logits = predict_logits(model, model.encode(ds.val.inputs), job.batch, job.device)
    shift = choose_bias_shift(val_logits, ds.val.labels, job.absent, bias.max_shift, bias.step)
    before = _split_metrics(val_logits, ds.val.labels, ds.classes, job.absent)
    shift_bias(model, job.absent, shift)
    after = _split_metrics(predict_logits(model, model.encode(ds.val.inputs), job.batch, job.device), ds.val.labels,
                           ds.classes, job.absent)
    metrics, predicted = _model_metrics(model, ds, job.transfer, result, job.batch, job.device, job.absent)
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
    return section, metrics, predicted


def _new_student(job: _Job, init: str | None = None) -> nn.Module:
    """The student's starting point: the teacher run's generalist (student.init), or fresh seeded weights."""
    if (init or job.init) == "generalist":
        return load_checkpoint(job.runs[0].generalist, job.device)
    seed_everything(job.cfg.seed)  # the same initial weights for every student and the baseline
    return build_model(job.cfg.student, job.dataset)


def _fresh_copies(job: _Job, teachers: list[Teacher], temperature: float, student: nn.Module) -> FreshCopies:
    """transfer.fresh: the transfer set's augmented rows drawn anew in every batch and labelled by `teachers`
    at `temperature`, from the same plain inputs (and the same augmentations) as its fixed copies."""
    cfg, transfer = job.cfg, job.transfer
    plain = np.flatnonzero(~transfer.augmented)  # the training rows, in increasing order
    augmenter = Augmenter(take_inputs(transfer.inputs, plain), job.dataset.input_kind, cfg.transfer.augment,
                          cfg.transfer.strength)
    plain_rows = np.searchsorted(transfer.origin[plain], transfer.origin)  # each row's plain input

    def teacher(inputs) -> torch.Tensor:
        return ensemble_probs([teacher_scores(x, inputs, job.batch) for x in teachers], mean=cfg.teacher.mean,
                              temperature=temperature, inputs="logits")

    return FreshCopies(transfer, augmenter, plain_rows, teacher, student.encode, cfg.seed)


def _student(job: _Job, name: str, scores: list[torch.Tensor] | None, probs1: torch.Tensor | None, log: Log,
             progress: bool, teachers: list[Teacher]) -> tuple[dict, np.ndarray]:
    """Train the student on the soft targets, one per (T, soft weight) of the grid, and keep the best on
    validation (or, scores=None, the baseline on the hard labels); save and score it. With transfer.fresh the
    augmented rows' targets come from `teachers` as they are drawn."""
    cfg, ds, transfer = job.cfg, job.dataset, job.transfer
    if scores is None:
        model = _new_student(job, "generalist" if job.init == "generalist" else "scratch")
        result = train_model(model, model.encode(transfer.inputs), transfer.labels, model.encode(ds.val.inputs),
                             ds.val.labels, cfg.student.train, seed=cfg.seed, device=job.device, desc=name,
                             progress=progress)
        grid, chosen = [], None
    else:
        cluster = None
        if cfg.student.cluster_weight:
            rows_class = np.where(transfer.truth >= 0, transfer.truth, probs1.argmax(1).numpy())
            from .ensemble import load

            cluster = cluster_targets(load(job.runs[0].root, job.device, generalists=1), transfer.inputs, rows_class,
                                      job.batch)
        inits = ["generalist", "scratch"] if job.init == "both" else [job.init]
        grid_points = [(i, t, w) for i in inits for t in (cfg.student.temperatures or [cfg.student.temperature])
                       for w in (cfg.student.soft_weights or [cfg.student.soft_weight])]
        best, grid = None, []
        for init, t, w in grid_points:
            soft = ensemble_probs(scores, mean=cfg.teacher.mean, temperature=t, inputs="logits")
            candidate = _new_student(job, init)
            fresh = _fresh_copies(job, teachers, t, candidate) if cfg.transfer.fresh else None
            result = train_student(candidate, transfer, soft, ds.val.inputs, ds.val.labels, cfg.student.train,
                                   temperature=t, soft_weight=w, seed=cfg.seed, device=job.device,
                                   desc=f"{name} {init} T={t:g} w={w:g}", progress=progress, cluster=cluster,
                                   cluster_weight=cfg.student.cluster_weight, fresh=fresh)
            grid.append({"init": init, "temperature": t, "soft_weight": w, "val_accuracy": result.best_val_accuracy,
                         "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                         "examples_seen": result.examples_seen, "seconds": round(result.seconds, 3),
                         # the teacher passes fresh copies cost: inputs it labelled while the student trained
                         "fresh_teacher_examples": fresh.drawn if fresh else 0})
            if len(grid_points) > 1:
                log(f"{name}: from {init}, T={t:g}, soft weight {w:g}: val accuracy {result.best_val_accuracy:.4f} "
                    f"(best epoch {result.best_epoch})")
            if best is None or result.best_val_accuracy > best[1].best_val_accuracy:
                best = (candidate, result, init, t, w)
        model, result, chosen_init, chosen_t, chosen_w = best
        chosen = {"temperature": chosen_t, "soft_weight": chosen_w}
    metrics, predicted = _model_metrics(model, ds, transfer, result, job.batch, job.device, job.absent)
    metrics["init"] = job.init if chosen is None else chosen_init
    if chosen is not None:
        metrics.update(chosen, grid=grid, grid_examples_seen=sum(g["examples_seen"] for g in grid),
                       grid_seconds=round(sum(g["seconds"] for g in grid), 3))
    if job.generalist_predicted is not None:  # a student that is the generalist copied differs on no example
        metrics["test_predictions_differing_from_generalist"] = int((predicted != job.generalist_predicted).sum())
    bias = None
    if scores is not None and len(job.absent) and cfg.bias.adjust:
        bias, adjusted, predicted = _adjust_bias(job, model, metrics, result, log)
        metrics.update(adjusted)
        job.out.update_metrics({"bias": bias})
    save_checkpoint(model, job.out.root / name, extra={"bias_shift": bias} if bias else None)
    write_json(job.out.root / name / "history.json", result.history)
    log(f"{name}: test accuracy {metrics['test_accuracy']:.4f} ({metrics['test_errors']} errors), "
        f"best epoch {result.best_epoch}" + (f", T={chosen['temperature']:g}, soft weight {chosen['soft_weight']:g}"
                                             + f", from {metrics['init']}" + (" (chosen on validation)" if len(grid) > 1 else "")
                                             if chosen else "")
        + f", {result.seconds:.1f}s")
    return metrics, (predicted == ds.test.labels).astype(np.float64)


def _report_kept_gain(job: _Job, teacher: dict, teacher_correct: np.ndarray, student: dict,
                      baseline_correct: np.ndarray | None, generalist_correct: list[np.ndarray], log: Log) -> None:
    """kept_gain in the output's metrics.json and, distilling runs' ensembles, a section in each run's."""
    # Over the generalist when distilling runs' ensembles (section 8's open question); else over the hard-label
    # student trained on the same examples, the fairest baseline when there is one.
    cfg = job.cfg
    if job.runs and (cfg.teacher.source != "generalist" or baseline_correct is None):
        correct, baseline_name = np.mean(generalist_correct, axis=0), "generalist"  # (N_test,) mean over the runs
    elif baseline_correct is not None:
        correct, baseline_name = baseline_correct, "baseline"
    else:
        return
    baseline_accuracy = float(correct.mean())
    n_test = len(job.dataset.test)
    kept = {**kept_gain(student["test_accuracy"], baseline_accuracy, teacher["test_accuracy"], n_test,
                        gain_standard_error(teacher_correct, correct)),
            "definition": KEPT_GAIN_DEFINITION, "baseline": baseline_name,
            "baseline_test_accuracy": baseline_accuracy, "teacher_test_accuracy": teacher["test_accuracy"],
            "student_test_accuracy": student["test_accuracy"], "test_examples": n_test}
    job.out.update_metrics({"kept_gain": kept})
    value = "undefined" if kept["kept_gain"] is None else f"{kept['kept_gain']:.1%}"
    log(f"kept gain: {value} of the teacher's gain over the {baseline_name} ({baseline_accuracy:.4f} -> teacher "
        f"{teacher['test_accuracy']:.4f}, student {student['test_accuracy']:.4f})")
    if job.runs and cfg.teacher.source in RUN_SECTIONS:
        section = {"out": str(job.out.root.resolve()), "runs": [str(r.root) for r in job.runs],
                   "source": cfg.teacher.source, "student_test_accuracy": student["test_accuracy"],
                   "student_test_errors": student["test_errors"], "generalist_test_accuracy": baseline_accuracy,
                   "ensemble_test_accuracy": teacher["test_accuracy"], "kept_gain": kept["kept_gain"],
                   "definition": KEPT_GAIN_DEFINITION, "gain": kept["gain"], "gain_stderr": kept["gain_stderr"],
                   "temperature": student.get("temperature", cfg.student.temperature),
                   "soft_weight": student.get("soft_weight", cfg.student.soft_weight),
                   "transfer_examples": len(job.transfer), "student_parameters": student["parameters"]}
        if "reason" in kept:
            section["reason"] = kept["reason"]
        job.teacher_section = section
        for run in job.runs:
            try:
                run.update_metrics({RUN_SECTIONS[cfg.teacher.source]: section})
            except OSError as err:
                if err.errno not in WRITES_REFUSED:
                    raise
                log(f"teacher run {run.root} cannot be written ({err.strerror}): its metrics.json and Table 3 do "
                    f"not list this student; the student's own report does")


def _write_report(job: _Job) -> None:
    """report/ of the student run: the teacher run's Table 3 with the student as one more row, then its metrics."""
    from .report import write_results_report

    metrics = job.out.read_metrics()
    table = {}
    if job.runs and job.cfg.teacher.source in RUN_SECTIONS:
        run_metrics = job.runs[0].read_metrics()
        table = {key: run_metrics[key] for key in ("generalist", "ensemble", "peer_ensemble") if key in run_metrics}
        table[RUN_SECTIONS[job.cfg.teacher.source]] = job.teacher_section
    write_results_report(job.out.report, table, metrics, to_dict(job.cfg),
                         title=f"Distilled student of {', '.join(str(r.root) for r in job.runs) or 'a teacher'}")


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
                     "augmented": int(transfer.augmented.sum()), "out_of_fold_folds": cfg.transfer.folds,
                     "classes": int(len(transfer.present)), "absent_classes": [ds.classes[c] for c in job.absent]},
    })
    log(f"data: {ds.name}, {ds.n_classes} classes, {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test; "
        f"transfer set {len(transfer)} examples{'' if transfer.labelled else ' (unlabeled)'}, {len(job.absent)} "
        f"classes absent; student starts from {job.init}; "
        f"device {job.device}; output {job.out.root}")

    _, (teachers, generalist_correct) = _timed(job, "teacher", lambda: _teachers(job, log, progress), "teacher")
    teacher, (scores, probs1, teacher_correct, member_correct) = _timed(
        job, "soft_targets", lambda: _soft_targets(job, teachers, log, progress), "teacher")
    if job.runs and cfg.teacher.source == "generalist":
        generalist_correct = member_correct
    baseline_correct = None
    if cfg.student.baseline:
        _, baseline_correct = _timed(job, "baseline", lambda: _student(job, "baseline", None, None, log, progress, []),
                                     "baseline")
    student, _ = _timed(job, "student", lambda: _student(job, "student", scores, probs1, log, progress, teachers),
                        "student")
    _report_kept_gain(job, teacher, teacher_correct, student, baseline_correct, generalist_correct, log)
    job.out.update_metrics({"timings": {"total": round(time.perf_counter() - started, 3)}})
    _write_report(job)
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
