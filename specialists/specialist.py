"""One specialist (Hinton, Vinyals & Dean 2015, sections 5.2 and 6.1): its training, without Ray, and its files.

A specialist covers k confusable classes (one cluster of `clusters.json`) and
one dustbin class standing for the C - k others:

* it starts as the generalist: same network (optionally widened), a head whose
  k rows are the generalist's rows for its classes and whose dustbin row is
  built from the other rows (`models.with_dustbin_head`); or, with
  `specialists.init=scratch`, as the same network with fresh weights;
* each epoch visits every training example of its classes and a fresh draw
  from the others, so that a share `special_fraction` (default 1/2) of the
  epoch is special (`dustbin.EnrichedSampler`, planned by `specialist_data.py`);
* its loss adds the generalist's soft targets at temperature T, collapsed onto
  its classes + dustbin (`distill.collapse_probs`), with weight `soft_weight`;
* it stops early on its own validation slice (its classes' validation
  examples plus others in the same enriched ratio).

The dustbin correction it stores, and why, is in dustbin.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import RunConfig, SpecialistsConfig
from .data import Split
from .distill import collapse_labels, distillation_loss
from .dustbin import dustbin_correction, dustbin_corrected, soften_collapsed
from .models import (CheckpointError, load_checkpoint, model_to_load, read_only_arrays_shared, save_checkpoint_bytes,
                     with_dustbin_head, with_fresh_weights)
from .rundir import RunDir, RunDirError, read_json, write_json
from .specialist_data import SpecialistData, logits_by_batch, specialist_train_config
from .train import TrainResult, freeze, predict_logits, seed_everything, train_model

SPECIALIST_FILE = "specialist.json"  # written last: its presence means the folder is whole


class SpecialistTrainingError(RuntimeError):
    """Some specialists failed after their retries; the others are saved, `--resume` trains the rest."""


# ---------------------------------------------------------------------------
# training one specialist


def conditional_accuracy(scores: np.ndarray, labels: np.ndarray, classes) -> tuple[float, int]:
    """Accuracy on the examples whose label is in `classes`, argmax over those classes only.

    scores: (N, k) scores of `classes` in that order (a specialist's logits
    without the dustbin, or the generalist's columns `classes`); labels: (N,)
    class ids. Examples of other classes are ignored. Returns (accuracy, n).
    """
    classes = np.asarray(list(classes), dtype=np.int64)
    keep = np.isin(labels, classes)
    if not keep.any():
        return float("nan"), 0
    predicted = classes[np.asarray(scores)[keep].argmax(1)]
    return float((predicted == labels[keep]).mean()), int(keep.sum())


@dataclass
class SpecialistResult:
    model: nn.Module  # head: its k classes in `classes` order, then the dustbin; correction not applied
    classes: list[int]
    dustbin_correction: float  # add to the dustbin logit at inference
    special_fraction: float  # realised special share of each epoch (f)
    natural_fraction: float  # special share of the training split (pi)
    train: TrainResult
    metrics: dict


def reads_generalist_weights(s: SpecialistsConfig) -> bool:
    """Whether a specialist reads its generalist's weights: a scratch one of the generalist's widths reads only
    its spec and buffers (the input encoding), so its generalist may be sent without them."""
    return s.init != "scratch" or s.widen != 1


def train_specialist(generalist: nn.Module, data: SpecialistData, val: Split, cfg: RunConfig, *,
                     device: torch.device | str = "cpu", progress: bool = False,
                     desc: str = "specialist") -> SpecialistResult:
    """Train specialist data.plan.m from its data (`specialist_data`); the generalist is not modified.

    val: the whole validation split (its own slice, the conditional accuracy
    and the dustbin's calibration are measured on it).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    s, plan = cfg.specialists, data.plan
    classes = plan.classes
    cls = torch.tensor(classes, dtype=torch.long)
    k = len(classes)

    seed_everything(plan.seed)  # the widened units' fresh weights, or all of them
    if not reads_generalist_weights(s):  # the same draws as below, without copying weights to draw over
        model = with_fresh_weights(generalist, n_classes=k + 1, **s.fresh_network())
    else:
        model = with_dustbin_head(generalist, classes, widen=s.widen)
        if s.init == "scratch":
            model = with_fresh_weights(model, **s.fresh_network())
    freeze(model, s.freeze)
    correction = dustbin_correction(plan.fraction, plan.natural_fraction)
    prior_shift = correction if s.dustbin_correction == "prior" else 0.0
    stored_correction = 0.0 if s.dustbin_correction == "none" else correction

    train_x = model.encode(data.train.inputs)  # (n, ...) its rows only
    train_y = collapse_labels(torch.from_numpy(data.train.labels), cls).numpy()  # (n,) in 0..k
    val_x = model.encode(val.take(plan.val_slice).inputs)
    val_y = collapse_labels(torch.from_numpy(val.labels[plan.val_slice]), cls).numpy()
    teacher = torch.from_numpy(data.teacher)  # (n, k+1) collapsed, at T=1

    def sample(epoch: int, rng: np.random.Generator) -> np.ndarray:
        return np.array(plan.orders[epoch - 1])  # drawn by plan_specialist with this same rng

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
        targets = soften_collapsed(teacher[torch.from_numpy(index)], s.temperature, prior_shift)
        parts = distillation_loss(logits, labels, targets.to(logits.device), s.temperature, s.soft_weight)
        return {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}

    schedule = dataclasses.replace(specialist_train_config(cfg), epochs=len(plan.orders))  # as planned
    result = train_model(model, train_x, train_y, val_x, val_y, schedule, seed=plan.seed,
                         device=device, sample=sample, loss_fn=loss_fn, desc=desc, progress=progress,
                         lr_key="specialists.lr" if s.lr else "train.lr", max_examples=plan.max_examples)

    metrics = {
        "classes": k,
        "best_val_accuracy": result.best_val_accuracy,  # own slice, argmax over k + 1 (uncorrected)
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "examples_seen": result.examples_seen,
        "special_fraction": plan.fraction,
        "natural_fraction": plan.natural_fraction,
        "dustbin_correction": stored_correction,
    }
    eval_batch = cfg.train.eval_batch_size
    for split, inside, general in (("val", val.take(plan.val_inside), data.val_scores),
                                   ("test", data.test, data.test_scores)):
        logits = predict_logits(model, model.encode(inside.inputs), eval_batch, device)
        acc, n = conditional_accuracy(logits[:, :k], inside.labels, classes)
        general_acc, _ = conditional_accuracy(general, inside.labels, classes)
        metrics.update({f"{split}_examples": n, f"{split}_conditional_accuracy": acc,
                        f"generalist_{split}_conditional_accuracy": general_acc})
    # How well the dustbin is calibrated on natural (not enriched) data: the mean predicted dustbin
    # probability, raw and corrected, against the true share of other classes.
    logits = torch.from_numpy(np.concatenate([b for _, b in logits_by_batch(model, val.inputs, eval_batch, device)]))
    metrics["val_dustbin_share"] = float(1 - np.isin(val.labels, classes).mean())
    metrics["val_dustbin_prob_raw"] = float(torch.softmax(logits, 1)[:, -1].mean())
    metrics["val_dustbin_prob_corrected"] = float(torch.softmax(dustbin_corrected(logits, correction), 1)[:, -1].mean())
    # The prior a combiner gated by the generalist's top-1 class meets instead: among validation examples
    # whose generalist top-1 is one of these classes, the share that truly are one (add-one smoothed).
    share = (data.val_active_inside + 1) / (data.val_active + 2)
    metrics["active_special_share_top1"] = float(share)
    metrics["dustbin_correction_active_top1"] = dustbin_correction(plan.fraction, float(share))
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 3)  # this process's CPU time, all threads
    return SpecialistResult(model, classes, stored_correction, plan.fraction, plan.natural_fraction,
                            result, metrics)


# ---------------------------------------------------------------------------
# the run directory: clusters.json in, specialists/<m>/ out


def specialist_dir(run: RunDir, m: int) -> Path:
    return run.specialists / str(m)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_groups(run: RunDir, class_names: list[str], n_outputs: int) -> list[list[int]]:
    """The groups of `clusters.json`, checked against the run's classes and the generalist's head.

    n_outputs: the generalist's number of output classes. Raises RunDirError
    naming the first mismatch. A group may hold every class (a data set with
    fewer classes than `cluster.classes_per_cluster`); it gets no specialist.
    """
    run.require(run.clusters, what="cluster")
    clusters = read_json(run.clusters)
    where = f"{run.clusters}"
    redo = "; re-cluster (delete it and run with --resume) or point at the run it belongs to"
    n = len(class_names)
    if n_outputs != n:
        raise RunDirError(f"{run.generalist}: the generalist has {n_outputs} outputs but the run has {n} classes")
    if not isinstance(clusters, dict) or not isinstance(clusters.get("groups"), list):
        raise RunDirError(f"{where}: expected an object with a 'groups' list (see cluster.clusters_to_json)")
    if clusters.get("n_classes") != n:
        raise RunDirError(f"{where}: n_classes={clusters.get('n_classes')!r} but the generalist has {n} classes{redo}")
    if not clusters["groups"]:
        raise RunDirError(f"{where}: no groups, so there is no specialist to train{redo}")
    groups = []
    for m, group in enumerate(clusters["groups"]):
        members = group.get("classes") if isinstance(group, dict) else None
        if not isinstance(members, list) or not members or not all(isinstance(c, int) for c in members):
            raise RunDirError(f"{where}: group {m} must have a non-empty 'classes' list of class ids")
        bad = [c for c in members if not 0 <= c < n]
        if bad:
            raise RunDirError(f"{where}: group {m} lists class {bad[0]}, but the generalist has {n} classes "
                              f"(0..{n - 1}){redo}")
        if len(set(members)) != len(members):
            raise RunDirError(f"{where}: group {m} lists a class twice: {members}")
        names, expected = group.get("names"), [class_names[c] for c in members]
        if names is not None and names != expected:
            raise RunDirError(f"{where}: group {m} names its classes {names[:5]}, the run calls them "
                              f"{expected[:5]}{redo}")
        groups.append([int(c) for c in members])
    return groups


def save_specialist(folder: Path, spec: dict, weights, info: dict, history: list[dict]) -> None:
    """Weights (`models.checkpoint_bytes`, as a worker sends them), training curve, then `specialist.json`
    last (atomic writes; a kill leaves it absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPECIALIST_FILE).unlink(missing_ok=True)  # the folder is unfinished until it is rewritten
    save_checkpoint_bytes(folder, spec, weights,
                          extra={"specialist": {k: info[k] for k in ("classes", "dustbin_correction")}})
    write_json(folder / "history.json", history)
    # the weights' hash, so a resume can tell these weights from a file damaged or replaced since
    write_json(folder / SPECIALIST_FILE, {**info, "weights_sha256": hashlib.sha256(weights).hexdigest()})


def finished_specialist(folder: Path, classes: list[int], generalist_sha256: str) -> dict | None:
    """The folder's `specialist.json` if it is a finished, intact specialist over `classes` of this generalist.

    Intact: its files parse, and the weights hash to the `weights_sha256` that
    `specialist.json` recorded (a folder from before that field must load as
    a checkpoint instead). Anything else is None: `--resume` retrains it.
    """
    try:
        info = read_json(folder / SPECIALIST_FILE)
        read_json(folder / "history.json")
        read_json(folder / "model.json")
    except RunDirError:
        return None
    if (not isinstance(info, dict) or not (folder / "model.safetensors").is_file() or info.get("classes") != classes
            or info.get("generalist_sha256") != generalist_sha256):
        return None
    if "weights_sha256" in info:
        return info if file_sha256(folder / "model.safetensors") == info["weights_sha256"] else None
    try:
        load_checkpoint(folder)
    except CheckpointError:
        return None
    return info


def _check_info(info, folder: Path, n_classes: int | None) -> None:
    """The fields of specialist.json a combiner uses: classes, the dustbin corrections."""
    where = folder / SPECIALIST_FILE
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    classes = info.get("classes")
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes)):
        raise CheckpointError(f"{where}: 'classes' must be a non-empty list of class ids, got {classes!r:.80}")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{where}: 'classes' lists a class twice")
    if n_classes is not None:
        bad = [c for c in classes if not 0 <= c < n_classes]
        if bad or len(classes) >= n_classes:
            why = f"class {bad[0]}" if bad else f"all {len(classes)} classes"
            raise CheckpointError(f"{where}: 'classes' holds {why}, but the run has {n_classes} classes "
                                  f"(0..{n_classes - 1}) and a specialist covers fewer than all")
    for key in ("dustbin_correction", "dustbin_correction_active_top1"):
        value = info.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: {key!r} must be a finite number, got {value!r}")


def load_specialist(folder: str | Path, device: torch.device | str = "cpu", *, n_classes: int | None = None,
                    generalist_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """(model, info): info is `specialist.json` (classes, names, dustbin_correction, metrics, ...).

    The model's logits are (N, k+1) over info["classes"] then the dustbin,
    uncorrected: use `dustbin_corrected(logits, info["dustbin_correction"])`.
    n_classes: the run's class count, to check the classes against;
    generalist_sha256: the run's generalist weights, which the specialist must
    have been trained from (its `generalist_sha256`).
    """
    folder = Path(folder)
    if not (folder / SPECIALIST_FILE).is_file():
        raise CheckpointError(f"{folder} is not a finished specialist (no {SPECIALIST_FILE})")
    try:
        info = read_json(folder / SPECIALIST_FILE)
    except RunDirError as err:
        raise CheckpointError(str(err)) from None
    _check_info(info, folder, n_classes)
    if generalist_sha256 is not None and info.get("generalist_sha256") != generalist_sha256:
        raise CheckpointError(f"{folder} was trained from another generalist (its generalist_sha256 "
                              f"{str(info.get('generalist_sha256'))[:12]!r} is not this run's "
                              f"{generalist_sha256[:12]!r}); delete it and run with --resume to retrain it")
    model = load_checkpoint(folder, device)
    if model.head.out_features != len(info["classes"]) + 1:
        raise CheckpointError(f"{folder}: the head has {model.head.out_features} outputs, "
                              f"{SPECIALIST_FILE} lists {len(info['classes'])} classes + a dustbin")
    return model, info


def specialists_summary(entries: list[dict], trained: list[int], skipped: list[int] = ()) -> dict:
    """The `specialists` section of metrics.json from every specialist's metrics (id order).

    skipped: ids of groups that hold every class, so have no specialist.
    """

    def pooled(key: str, split: str) -> float:
        n = sum(e[f"{split}_examples"] for e in entries)
        hits = sum(e[key] * e[f"{split}_examples"] for e in entries if e[f"{split}_examples"])
        return hits / n if n else float("nan")

    summary = {
        "count": len(entries),
        "trained": len(trained),  # in this invocation; the others were finished already (--resume)
        "examples_seen": sum(e["examples_seen"] for e in entries),  # all specialists' forward+backward passes
        "seconds": round(sum(e["seconds"] for e in entries), 3),  # summed task time, not wall time
        "cpu_seconds": round(sum(e.get("cpu_seconds", 0.0) for e in entries), 3),
        "skipped_groups": list(skipped),  # they hold every class: no dustbin to learn, the generalist covers them
    }
    for split in ("val", "test"):
        summary[f"{split}_conditional_accuracy"] = pooled(f"{split}_conditional_accuracy", split)
        summary[f"generalist_{split}_conditional_accuracy"] = pooled(f"generalist_{split}_conditional_accuracy", split)
    summary["improved_on_val"] = sum(e["val_conditional_accuracy"] > e["generalist_val_conditional_accuracy"]
                                     for e in entries)
    summary["per_specialist"] = entries
    return summary


def specialists_done(run: RunDir) -> bool:
    """Whether every group of clusters.json has a finished specialist of the current generalist (for --resume)."""
    metrics = run.read_metrics().get("specialists", {})
    if "count" not in metrics or not run.clusters.is_file() or not (run.generalist / "model.safetensors").is_file():
        return False
    clusters = read_json(run.clusters)
    groups = [g.get("classes") for g in clusters.get("groups", [])]
    trainable = [m for m, group in enumerate(groups) if len(group) < clusters.get("n_classes", 0)]
    sha = file_sha256(run.generalist / "model.safetensors")
    return metrics["count"] == len(trainable) and all(
        finished_specialist(specialist_dir(run, m), groups[m], sha) is not None for m in trainable)


def model_from_arrays(spec: dict, state: dict[str, np.ndarray]) -> nn.Module:
    """Rebuild a model shipped as its spec and numpy weights (e.g. through Ray's object store). Sent without
    its parameters (`model_to_arrays(parameters=False)`), it holds its buffers and unset parameters."""
    model = model_to_load(spec["name"], spec["kwargs"])
    parameters = {name for name, _ in model.named_parameters()}
    strict = not parameters.isdisjoint(state)
    if not strict and set(model.state_dict()) - parameters != set(state):
        raise ValueError(f"a {spec['name']} model sent without its parameters must hold all of its buffers")
    with read_only_arrays_shared():  # load_state_dict copies them into the model's own weights
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=strict)
    return model


def model_to_arrays(model: nn.Module, parameters: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(spec, numpy state); parameters=False: the buffers alone."""
    names = set() if parameters else {name for name, _ in model.named_parameters()}
    return model.spec, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k not in names}
