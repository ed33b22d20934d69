"""One specialist (Hinton, Vinyals & Dean 2015, sections 5.2 and 6.1), trained without Ray.

A specialist covers k confusable classes (one cluster of `clusters.json`) and
one dustbin class standing for the C - k others:

* it starts as the generalist: same network (optionally widened), a head whose
  k rows are the generalist's rows for its classes and whose dustbin row is
  built from the other rows (`models.with_dustbin_head`);
* each epoch visits every training example of its classes and a fresh draw
  from the others, so that a share `special_fraction` (default 1/2) of the
  epoch is special (`EnrichedSampler`);
* its loss adds the generalist's soft targets at temperature T, collapsed onto
  its classes + dustbin (`distill.collapse_probs`), with weight `soft_weight`;
* it stops early on its own validation slice (its classes' validation
  examples plus others in the same enriched ratio).

The dustbin correction
----------------------
Write pi for the share of the specialist's classes in the training split
(natural prior) and f for their realised share of every enriched epoch. The
sampler keeps the within-group proportions (all special examples are visited)
and draws the others uniformly, so relative to the data each special class is
oversampled by f / pi and each other class by (1 - f) / (1 - pi). A model fit
on the enriched epochs estimates p_train(y | x), proportional to
p(y | x) * r_y with r_y those factors (Bayes' rule with a changed prior). The
natural posterior is recovered by dividing r back out; adding one constant to
all logits changes nothing, so only the ratio matters and the whole correction
is one increment of the dustbin logit:

    b = log(f / (1 - f)) - log(pi / (1 - pi))        (log odds ratio; b > 0 when enriched)

    p_natural = softmax(logits + b * e_dustbin)

This is the paper's "log of the proportion by which the specialist classes
are oversampled", made exact for this scheme: the proportion is the odds
ratio f(1 - pi) / (pi(1 - f)), not f / pi.

The correction is exact for what the hard-label term learns. The soft term
learns the generalist's posterior, which is already in the natural prior;
mixing the two would leave the trained specialist between the two priors and
make b an over-correction. With `dustbin_correction="prior"` (default) the
soft targets are therefore moved into the enriched prior while training (b is
subtracted from the collapsed target's dustbin log-probability before it is
softened at T, see `specialist_soft_targets`), so that both terms learn the
same p_train and b is exact. `"paper"` keeps the soft targets as they are
and still stores b (the paper's recipe); `"none"` stores b = 0.

Weights are saved as trained: b is NOT folded into the head's bias. It is
stored in `specialist.json` (`dustbin_correction`, with
`dustbin_correction_applied: false`); a combiner applies it with
`dustbin_corrected(logits, b)`. Early stopping and the own-slice validation
accuracy use the uncorrected logits, since that slice has the enriched prior.

b targets the natural prior pi, which is right for a specialist run on all
data. A combiner that runs it only where the generalist's top class is one of
its classes meets a much higher share rho of its classes there (about 0.8 on
the 1000-class synthetic set, against pi ~ 0.01), so
`dustbin_correction_active_top1` stores the same formula with pi replaced by
rho measured on the validation split: b_active = log(f/(1-f)) - log(rho/(1-rho)).

Measured (seed 0, f = 1/2, soft_weight 1/2, T = 2):

* calibration, a group cutting across the tiny synthetic set's planted groups
  (pi = 1/4): mean dustbin probability on validation data 0.646 raw, 0.760
  corrected, 0.75 true; with the paper's recipe at soft_weight 0.9, 0.817.
* test accuracy of the ensemble (combine.solve, specialists gated by the
  generalist's top-1 class; generalist / b off / b applied / b_active):
  Banking77 0.8545 / 0.8597 / 0.8529 / 0.8597 ("prior"), and with the
  paper's recipe 0.8571 / 0.8461 / 0.8610; 1000-class synthetic 0.3484 /
  0.3537 / 0.3520 / 0.3537 ("prior"), paper's recipe 0.3531 / 0.3326 / 0.3533.
  The natural-prior correction hurts a gated ensemble: with the paper's
  recipe it ends 0.8 (Banking77) and 1.6 (synthetic) points below the
  generalist alone; "prior" training takes most of that loss away; b_active
  is never worse than leaving b off.
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

from .config import RunConfig, TrainConfig
from .data import Dataset
from .distill import collapse_labels, collapse_probs, distillation_loss, soft_targets
from .models import CheckpointError, create_model, load_checkpoint, save_checkpoint, with_dustbin_head
from .rundir import RunDir, RunDirError, read_json, write_json
from .train import TrainResult, predict_logits, seed_everything, train_model

SPECIALIST_FILE = "specialist.json"  # written last: its presence means the folder is whole


# ---------------------------------------------------------------------------
# enriched epochs and the correction they call for


class EnrichedSampler:
    """`sample(epoch, rng)` for `train_model`: all of a group's examples, then a fresh draw of the others.

    labels: (N,) class ids of the training examples; classes: (k,) the group.
    Each epoch returns, shuffled, every position whose label is in `classes`
    (n_special of them) and `n_other = round(n_special * (1 - f) / f)`
    positions drawn without replacement from the rest, capped at how many
    there are (then the realised fraction is above f).

    fraction: realised special share of an epoch; natural_fraction: their
    share of `labels` (pi in the module docstring).
    """

    def __init__(self, labels: np.ndarray, classes, special_fraction: float):
        labels = np.asarray(labels)
        if not 0 < special_fraction < 1:
            raise ValueError(f"special_fraction={special_fraction} must be in (0, 1)")
        is_special = np.isin(labels, np.asarray(list(classes), dtype=np.int64))
        self.special = np.flatnonzero(is_special)
        self.other = np.flatnonzero(~is_special)
        wanted = int(round(len(self.special) * (1 - special_fraction) / special_fraction))
        self.n_other = min(wanted, len(self.other))
        self.epoch_size = len(self.special) + self.n_other
        self.fraction = len(self.special) / self.epoch_size if self.epoch_size else float("nan")
        self.natural_fraction = len(self.special) / len(labels) if len(labels) else float("nan")

    def __call__(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        drawn = rng.choice(self.other, size=self.n_other, replace=False)
        return rng.permutation(np.concatenate([self.special, drawn]))


def dustbin_correction(fraction: float, natural_fraction: float) -> float:
    """b = log(f / (1 - f)) - log(pi / (1 - pi)): add it to the dustbin logit (see the module docstring).

    fraction: f, the special share of a training epoch; natural_fraction: pi,
    their share of the data the specialist will be used on.
    """
    for name, value in (("fraction", fraction), ("natural_fraction", natural_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value} must be in (0, 1)")
    return math.log(fraction / (1 - fraction)) - math.log(natural_fraction / (1 - natural_fraction))


def dustbin_corrected(logits: torch.Tensor, correction: float) -> torch.Tensor:
    """(N, k+1) logits with `correction` added to the last (dustbin) column."""
    out = logits.clone()
    out[:, -1] += correction
    return out


def specialist_soft_targets(teacher_logits: torch.Tensor, classes: torch.Tensor, temperature: float,
                            prior_shift: float = 0.0) -> torch.Tensor:
    """(B, k+1) soft targets at T from the generalist's (B, C) logits, over classes + dustbin.

    The generalist's T=1 probabilities are collapsed (`collapse_probs`: the
    dustbin gets the mass of every other class), and the collapsed
    distribution is then softened at T (`soft_targets` of its log). Collapsing
    first is what a specialist can match: its dustbin is one logit, and a
    student equal to the collapsed generalist at T=1 is equal to these targets
    at every T. (Softening first and then collapsing gives the dustbin
    sum_j exp(z_j / T), which for T > 1 a single logit only matches by
    inflating the dustbin at T=1.)

    prior_shift: b of the module docstring, subtracted from the dustbin's T=1
    log-probability, which moves the targets into the enriched prior the hard
    labels are drawn from (0: the generalist's natural prior).
    """
    collapsed = collapse_probs(torch.softmax(teacher_logits.float(), dim=1), classes)  # (B, k+1) at T=1
    log_p = torch.log(collapsed.clamp_min(torch.finfo(collapsed.dtype).tiny))
    if prior_shift:
        log_p[:, -1] -= prior_shift
    return soft_targets(log_p, temperature)


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


# ---------------------------------------------------------------------------
# training one specialist


def specialist_train_config(cfg: RunConfig) -> TrainConfig:
    """The generalist's schedule with the specialists' overrides (0 / -1: inherit)."""
    s, t = cfg.specialists, cfg.train
    return dataclasses.replace(t, epochs=s.epochs or t.epochs, batch_size=s.batch_size or t.batch_size,
                               lr=s.lr or t.lr, patience=t.patience if s.patience < 0 else s.patience)


@dataclass
class SpecialistResult:
    model: nn.Module  # head: its k classes in `classes` order, then the dustbin; correction not applied
    classes: list[int]
    dustbin_correction: float  # add to the dustbin logit at inference
    special_fraction: float  # realised special share of each epoch (f)
    natural_fraction: float  # special share of the training split (pi)
    train: TrainResult
    metrics: dict


def _encode(model: nn.Module, inputs):
    if isinstance(inputs, np.ndarray) and not inputs.flags.writeable:
        inputs = np.array(inputs)  # arrays shared read-only (e.g. by Ray's object store); torch wants its own
    return model.encode(inputs)


def train_specialist(generalist: nn.Module, classes, dataset: Dataset, teacher_logits: dict[str, np.ndarray],
                     cfg: RunConfig, *, seed: int, device: torch.device | str = "cpu",
                     progress: bool = False, desc: str = "specialist") -> SpecialistResult:
    """Train one specialist over `classes` (k distinct ids); the generalist is not modified.

    teacher_logits: the generalist's (N, C) float32 logits on `dataset`'s
    splits, {"train": ..., "val": ..., "test": ...}, in split order (the soft
    targets and the generalist's side of the conditional accuracies).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    s = cfg.specialists
    classes = [int(c) for c in classes]
    cls = torch.tensor(classes, dtype=torch.long)
    k = len(classes)

    seed_everything(seed)  # the widened units' fresh weights
    model = with_dustbin_head(generalist, classes, widen=s.widen)

    sampler = EnrichedSampler(dataset.train.labels, classes, s.special_fraction)
    if sampler.n_other == 0:
        raise ValueError(f"specialist over {k} classes: no training example lies outside them, so the dustbin "
                         "cannot be learned")
    correction = dustbin_correction(sampler.fraction, sampler.natural_fraction)
    prior_shift = correction if s.dustbin_correction == "prior" else 0.0
    stored_correction = 0.0 if s.dustbin_correction == "none" else correction

    # The specialist's own validation slice: its classes' validation examples and others in the enriched
    # ratio, drawn once (seeded), so its accuracy is measured under the prior it is trained on.
    val_slice = np.sort(EnrichedSampler(dataset.val.labels, classes, s.special_fraction)(
        0, np.random.default_rng(seed)))
    if not np.isin(dataset.val.labels[val_slice], classes).any():
        raise ValueError(f"specialist over classes {classes[:10]}: none of them has a validation example")

    train_x = _encode(model, dataset.train.inputs)
    train_y = collapse_labels(torch.from_numpy(dataset.train.labels), cls).numpy()  # (N,) in 0..k
    val_x = _encode(model, dataset.val.take(val_slice).inputs)
    val_y = collapse_labels(torch.from_numpy(dataset.val.labels[val_slice]), cls).numpy()
    teacher = torch.from_numpy(np.asarray(teacher_logits["train"]))  # (N, C) at T=1

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
        targets = specialist_soft_targets(teacher[torch.from_numpy(index)], cls, s.temperature, prior_shift)
        parts = distillation_loss(logits, labels, targets.to(logits.device), s.temperature, s.soft_weight)
        return {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}

    result = train_model(model, train_x, train_y, val_x, val_y, specialist_train_config(cfg), seed=seed,
                         device=device, sample=sampler, loss_fn=loss_fn, desc=desc, progress=progress)

    metrics = {
        "classes": k,
        "best_val_accuracy": result.best_val_accuracy,  # own slice, argmax over k + 1 (uncorrected)
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "examples_seen": result.examples_seen,
        "special_fraction": sampler.fraction,
        "natural_fraction": sampler.natural_fraction,
        "dustbin_correction": stored_correction,
    }
    eval_batch = cfg.train.eval_batch_size
    for split in ("val", "test"):
        data = getattr(dataset, split)
        inside = np.flatnonzero(np.isin(data.labels, classes))
        logits = predict_logits(model, _encode(model, data.take(inside).inputs), eval_batch, device)
        acc, n = conditional_accuracy(logits[:, :k], data.labels[inside], classes)
        general_acc, _ = conditional_accuracy(np.asarray(teacher_logits[split])[inside][:, classes],
                                              data.labels[inside], classes)
        metrics.update({f"{split}_examples": n, f"{split}_conditional_accuracy": acc,
                        f"generalist_{split}_conditional_accuracy": general_acc})
    # How well the dustbin is calibrated on natural (not enriched) data: the mean predicted dustbin
    # probability, raw and corrected, against the true share of other classes.
    logits = torch.from_numpy(predict_logits(model, _encode(model, dataset.val.inputs), eval_batch, device))
    metrics["val_dustbin_share"] = float(1 - np.isin(dataset.val.labels, classes).mean())
    metrics["val_dustbin_prob_raw"] = float(torch.softmax(logits, 1)[:, -1].mean())
    metrics["val_dustbin_prob_corrected"] = float(torch.softmax(dustbin_corrected(logits, correction), 1)[:, -1].mean())
    # The prior a combiner gated by the generalist's top-1 class meets instead: among validation examples
    # whose generalist top-1 is one of these classes, the share that truly are one (add-one smoothed).
    active = np.isin(np.asarray(teacher_logits["val"]).argmax(1), classes)
    share = (np.isin(dataset.val.labels[active], classes).sum() + 1) / (active.sum() + 2)
    metrics["active_special_share_top1"] = float(share)
    metrics["dustbin_correction_active_top1"] = dustbin_correction(sampler.fraction, float(share))
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 3)  # this process's CPU time, all threads
    return SpecialistResult(model, classes, stored_correction, sampler.fraction, sampler.natural_fraction,
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


def save_specialist(folder: Path, model: nn.Module, info: dict, history: list[dict]) -> None:
    """Weights, training curve, then `specialist.json` last (atomic writes; a kill leaves it absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPECIALIST_FILE).unlink(missing_ok=True)  # the folder is unfinished until it is rewritten
    save_checkpoint(model, folder, extra={"specialist": {k: info[k] for k in ("classes", "dustbin_correction")}})
    write_json(folder / "history.json", history)
    write_json(folder / SPECIALIST_FILE, info)


def finished_specialist(folder: Path, classes: list[int], generalist_sha256: str) -> dict | None:
    """The folder's `specialist.json` if it is a finished specialist over `classes` of this generalist."""
    try:
        info = read_json(folder / SPECIALIST_FILE)
    except RunDirError:
        return None
    whole = all((folder / name).is_file() for name in ("model.safetensors", "model.json", "history.json"))
    if not whole or info.get("classes") != classes or info.get("generalist_sha256") != generalist_sha256:
        return None
    return info


def load_specialist(folder: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(model, info): info is `specialist.json` (classes, names, dustbin_correction, metrics, ...).

    The model's logits are (N, k+1) over info["classes"] then the dustbin,
    uncorrected: use `dustbin_corrected(logits, info["dustbin_correction"])`.
    """
    folder = Path(folder)
    if not (folder / SPECIALIST_FILE).is_file():
        raise CheckpointError(f"{folder} is not a finished specialist (no {SPECIALIST_FILE})")
    info = read_json(folder / SPECIALIST_FILE)
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
    """Rebuild a model shipped as its spec and numpy weights (e.g. through Ray's object store)."""
    model = create_model(spec["name"], **spec["kwargs"])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model


def model_to_arrays(model: nn.Module) -> tuple[dict, dict[str, np.ndarray]]:
    return model.spec, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
