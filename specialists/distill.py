"""Distillation maths (Hinton, Vinyals & Dean, 2015): losses (sections 2 and 2.1), ensembles of
teachers, the bias shift for classes a transfer set lacks (section 3) and the kept gain.

Pure functions of tensors and arrays; imports torch and numpy (and the name lists of choices.py) only.

Conventions used throughout:

* logits and probabilities are ``(N, C)``: N examples, C classes;
* every loss sums over classes and averages over the N examples (like
  ``F.cross_entropy``'s default ``reduction="mean"``);
* ``teacher_probs`` are the teacher's *soft targets at the same temperature T*
  as the loss, e.g. ``soft_targets(teacher_logits, T)``; the losses never
  re-soften probabilities they are given (so probabilities that were collapsed
  or ensembled after softening stay exactly as given);
* ``soft_weight`` is the weight of the **soft** (teacher) term; the hard
  (label) term gets ``1 - soft_weight``.  Some libraries use ``alpha`` for the
  hard term instead; this module never does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .choices import ENSEMBLE_MEANS

__all__ = [
    "DistillError",
    "DistillLoss",
    "TeacherCache",
    "accuracy_by_shift",
    "choose_bias_shift",
    "collapse_labels",
    "collapse_probs",
    "distillation_loss",
    "ensemble_probs",
    "gain_standard_error",
    "kept_gain",
    "logit_matching_loss",
    "shift_bias",
    "soft_target_loss",
    "soft_targets",
]


class DistillError(ValueError):
    """Teachers, transfer set and student do not fit together (class sets, output sizes)."""


SOFT_FORMS = ("ce", "kl")
ENSEMBLE_INPUTS = ("probs", "logits")


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """The parts of a distillation loss; ``loss`` is the one to backpropagate.

    ``loss``      = ``soft_weight * soft_loss + (1 - soft_weight) * hard_loss``
                    (``= soft_loss`` when there are no labels);
    ``soft_loss`` = ``T**2 * CE(teacher soft targets, student softmax at T)``
                    (or the KL form), i.e. already T^2-scaled;
    ``hard_loss`` = ``CE(labels, student softmax at T=1)``; a zero tensor when
                    the batch has no labels.
    """

    loss: Tensor
    hard_loss: Tensor
    soft_loss: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """Detached scalars keyed by field name, for logging every part."""
        return {f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)}


# --------------------------------------------------------------------------- #
# validation at the public boundary
# --------------------------------------------------------------------------- #


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={temperature!r} must be a number > 0") from None
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name}={temperature!r} must be a finite number > 0")
    return t


def _check_unit_weight(weight: float, name: str) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={weight!r} must be a number in [0, 1]") from None
    if not 0.0 <= w <= 1.0:  # also rejects NaN
        raise ValueError(f"{name}={weight!r} must be in [0, 1]")
    return w


def _check_choice(value: str, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {list(choices)}")


def _check_matrix(x: Tensor, name: str) -> None:
    """(N, C) floating tensor with only finite entries."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten()
        kind = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) ({kind}), "
            f"first in row {int(rows[0])}"
        )


def _prob_tolerance(dtype: torch.dtype) -> float:
    # float32 sums over thousands of classes drift by ~1e-6; half precision by ~eps.
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def _check_probs(p: Tensor, name: str) -> None:
    """(N, C) rows of probabilities: entries in [0, 1], each row summing to 1."""
    _check_matrix(p, name)
    tol = _prob_tolerance(p.dtype)
    p32 = p.float()
    if (p32 < -tol).any() or (p32 > 1 + tol).any():
        lo, hi = float(p32.min()), float(p32.max())
        raise ValueError(
            f"{name} must be probabilities in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
            f"(pass logits through soft_targets first)"
        )
    sums = p32.sum(dim=1)
    off = (sums - 1).abs() > tol
    if off.any():
        row = int(off.nonzero()[0])
        raise ValueError(
            f"{name} rows must sum to 1 (tolerance {tol:g}); row {row} sums to "
            f"{float(sums[row]):.6g} ({int(off.sum())} of {p.shape[0]} rows are off)"
        )


def _check_pair(student: Tensor, teacher: Tensor, student_name: str, teacher_name: str) -> None:
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"class count mismatch: {student_name} has C={student.shape[1]} classes "
            f"but {teacher_name} has C={teacher.shape[1]} (shapes {tuple(student.shape)} "
            f"vs {tuple(teacher.shape)})"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"batch size mismatch: {student_name} has N={student.shape[0]} rows "
            f"but {teacher_name} has N={teacher.shape[0]}"
        )


def _check_labels(targets: Tensor, n: int, c: int, name: str = "targets") -> None:
    if not isinstance(targets, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of class indices, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must hold integer class indices, got dtype {targets.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"{name} must have shape (N,)=({n},), got shape {tuple(targets.shape)}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= c):
        raise ValueError(
            f"{name} must be class indices in [0, {c - 1}], got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )


def _as_classes(classes: Tensor | Sequence[int], device: torch.device) -> Tensor:
    """(k,) int64 tensor of distinct non-negative class ids."""
    cls = torch.as_tensor(classes, device=device)
    if cls.numel() == 0:
        raise ValueError("classes must be a non-empty 1-D list of class ids, got none")
    if cls.is_floating_point() or cls.is_complex() or cls.dtype == torch.bool:
        raise ValueError(f"classes must be integer class ids, got dtype {cls.dtype}")
    cls = cls.long()
    if cls.ndim != 1 or cls.numel() == 0:
        raise ValueError(f"classes must be a non-empty 1-D list of class ids, got shape {tuple(cls.shape)}")
    if int(cls.min()) < 0:
        raise ValueError(f"classes must be >= 0, got {cls.tolist()}")
    if torch.unique(cls).numel() != cls.numel():
        raise ValueError(f"classes must be distinct, got {cls.tolist()}")
    return cls


# --------------------------------------------------------------------------- #
# soft targets and the losses
# --------------------------------------------------------------------------- #


def soft_targets(logits: Tensor, temperature: float) -> Tensor:
    """Soft targets ``softmax(logits / T)`` over the last dimension.

    ``logits``: (..., C); returns (..., C) probabilities.  T > 1 softens the
    distribution, exposing the small probabilities a teacher gives wrong classes.
    """
    t = _check_temperature(temperature)
    if not isinstance(logits, Tensor) or logits.ndim < 1 or not logits.is_floating_point():
        raise ValueError("logits must be a floating torch.Tensor of shape (..., C)")
    if not torch.isfinite(logits).all():
        raise ValueError(f"logits contain {int((~torch.isfinite(logits)).sum())} non-finite value(s) (NaN or inf)")
    return torch.softmax(logits / t, dim=-1)


def soft_target_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    temperature: float,
    *,
    form: str = "ce",
) -> Tensor:
    """T^2-scaled soft-target loss, averaged over the batch.

    ``student_logits``: (N, C); ``teacher_probs``: (N, C) soft targets at the same
    T.  With ``q = softmax(student_logits / T)`` and ``p = teacher_probs``:

    * ``form="ce"`` (default) returns ``T**2 * mean_n( -sum_i p_i log q_i )``;
    * ``form="kl"`` returns ``T**2 * mean_n( sum_i p_i log(p_i / q_i) )``, which is
      the CE form minus the teacher's entropy: the same gradient wrt the student,
      but 0 when the student matches the teacher.

    The T^2 factor keeps gradient magnitudes roughly constant as T changes
    (dCE/dz_i = (q_i - p_i) / T, and (q_i - p_i) itself shrinks like 1/T).
    """
    t = _check_temperature(temperature)
    _check_choice(form, "form", SOFT_FORMS)
    _check_matrix(student_logits, "student_logits")
    _check_probs(teacher_probs, "teacher_probs")
    _check_pair(student_logits, teacher_probs, "student_logits", "teacher_probs")

    # log-softmax in float32 at least: AMP logits in float16 lose the small tail.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=1)  # (N, C)
    p = teacher_probs.to(dtype)
    per_example = -(p * log_q).sum(dim=1)  # (N,) cross-entropy
    if form == "kl":
        per_example = per_example + torch.xlogy(p, p).sum(dim=1)  # minus entropy; 0 log 0 = 0
    return (t * t) * per_example.mean()


def distillation_loss(
    student_logits: Tensor,
    targets: Tensor | None,
    teacher_probs: Tensor,
    temperature: float,
    soft_weight: float,
    *,
    form: str = "ce",
) -> DistillLoss:
    """Weighted sum of the soft (teacher) and hard (label) objectives.

    ``loss = soft_weight * T**2 * CE_soft + (1 - soft_weight) * CE_hard`` where

    * ``CE_soft`` is ``soft_target_loss`` before its T^2 factor (student softmax
      at T against ``teacher_probs``, which must be soft targets at the same T);
    * ``CE_hard`` is the usual cross-entropy of the student's logits at T=1
      against the integer ``targets`` (N,).

    ``soft_weight`` in [0, 1] weights the **soft** term; ``1`` is pure
    distillation, ``0`` is plain supervised training.  The paper found a
    considerably lower weight on the hard term works best (e.g. 0.9 here).

    ``targets=None`` means an unlabeled transfer batch: ``loss`` is the full
    soft term (``soft_weight`` is not applied) and ``hard_loss`` is 0.

    Collapsed label spaces work unchanged: for a specialist over classes
    ``cls``, pass ``collapse_probs(teacher_probs, cls)`` and
    ``collapse_labels(targets, cls)`` with a (N, k+1) student.
    """
    t = _check_temperature(temperature)
    w = _check_unit_weight(soft_weight, "soft_weight")
    soft = soft_target_loss(student_logits, teacher_probs, t, form=form)
    if targets is None:
        return DistillLoss(loss=soft, hard_loss=torch.zeros_like(soft), soft_loss=soft)
    n, c = student_logits.shape
    _check_labels(targets, n, c)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    hard = F.cross_entropy(student_logits.to(dtype), targets.long())
    return DistillLoss(loss=w * soft + (1.0 - w) * hard, hard_loss=hard, soft_loss=soft)


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Half squared error between zero-meaned logits, averaged over the batch.

    ``mean_n( 1/2 * sum_i ((z_i - mean(z)) - (v_i - mean(v)))**2 )`` for student
    logits ``z`` and teacher logits ``v``, both (N, C).  Its gradient wrt ``z_i``
    is ``(z_i - mean z) - (v_i - mean v)``.

    This is the high-temperature limit of distillation (paper section 2.1): as
    T grows, the gradient of ``soft_target_loss(z, softmax(v / T), T)`` tends to
    ``1/C`` times this loss's gradient (C = number of classes), i.e.
    ``(1/C) (z_i - v_i)`` for zero-mean logits.  This loss omits the 1/C.
    """
    _check_matrix(student_logits, "student_logits")
    _check_matrix(teacher_logits, "teacher_logits")
    _check_pair(student_logits, teacher_logits, "student_logits", "teacher_logits")
    diff = (student_logits - student_logits.mean(dim=1, keepdim=True)) - (
        teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    )  # (N, C)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


# --------------------------------------------------------------------------- #
# collapsed label spaces (specialists: their classes + one dustbin)
# --------------------------------------------------------------------------- #


def collapse_probs(probs: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
    """Keep the columns of ``classes`` and sum every other column into a dustbin.

    ``probs``: (N, C) probabilities; ``classes``: (k,) distinct ids in [0, C).
    Returns (N, k+1): column j < k is ``probs[:, classes[j]]``, column k is the
    mass of all classes not in ``classes``.

    Collapse *after* softening (``collapse_probs(soft_targets(v, T), cls)``):
    the dustbin is a sum of probabilities, not a softmax of one logit, so
    re-tempering collapsed probabilities is not the same thing.
    """
    _check_probs(probs, "probs")
    cls = _as_classes(classes, probs.device)
    c = probs.shape[1]
    if int(cls.max()) >= c:
        raise ValueError(f"classes must be < C={c} (the number of columns of probs), got max {int(cls.max())}")
    other = torch.ones(c, dtype=torch.bool, device=probs.device)
    other[cls] = False
    # Sum the complement directly rather than 1 - kept: no cancellation when kept ~ 1.
    dustbin = probs[:, other].sum(dim=1, keepdim=True)  # (N, 1)
    return torch.cat([probs[:, cls], dustbin], dim=1)


def collapse_labels(labels: Tensor, classes: Tensor | Sequence[int]) -> Tensor:
    """Map class ids onto a specialist's label space.

    ``labels``: (N,) class ids; ``classes``: (k,) distinct ids.  Returns (N,)
    int64 labels in 0..k: ``j`` where ``labels == classes[j]``, and ``k`` (the
    dustbin) for every label not in ``classes``.
    """
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer torch.Tensor of class ids")
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got shape {tuple(labels.shape)}")
    cls = _as_classes(classes, labels.device)
    labels = labels.long()
    k = cls.numel()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    size = int(cls.max()) + 1 if labels.numel() == 0 else max(int(cls.max()), int(labels.max())) + 1
    lookup = torch.full((size,), k, dtype=torch.long, device=labels.device)  # default: dustbin
    lookup[cls] = torch.arange(k, device=labels.device)
    return lookup[labels]


# --------------------------------------------------------------------------- #
# ensembles of teachers
# --------------------------------------------------------------------------- #


def ensemble_probs(
    members: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    mean: str = "arithmetic",
    temperature: float = 1.0,
    *,
    inputs: str = "probs",
) -> Tensor:
    """Combine M teachers' outputs into one (N, C) distribution.

    ``members``: M tensors of shape (N, C), probabilities (``inputs="probs"``) or
    logits (``inputs="logits"``).  Each member is first softened at
    ``temperature``: ``softmax(z / T)`` for logits, and for probabilities the
    same thing, ``softmax(log p / T)`` (log p differs from z by a per-row
    constant).  ``weights`` (M,) are non-negative and normalised to sum to 1;
    ``None`` means equal weights.

    * ``mean="arithmetic"``: ``sum_m w_m p_m`` (the usual ensemble average);
    * ``mean="geometric"``: ``softmax(sum_m w_m log p_m)``, the renormalised
      weighted geometric mean; it favours classes all members agree on and is
      zero wherever any member with w_m > 0 is zero.
    """
    t = _check_temperature(temperature)
    _check_choice(mean, "mean", ENSEMBLE_MEANS)
    _check_choice(inputs, "inputs", ENSEMBLE_INPUTS)
    if isinstance(members, Tensor) or len(members) == 0:
        raise ValueError("members must be a non-empty list of (N, C) tensors")
    for m, x in enumerate(members):
        name = f"members[{m}]"
        _check_probs(x, name) if inputs == "probs" else _check_matrix(x, name)
    shapes = [tuple(x.shape) for x in members]
    if len({s[1] for s in shapes}) > 1:
        raise ValueError(f"teachers have different class counts: shapes {shapes}")
    if len({s[0] for s in shapes}) > 1:
        raise ValueError(f"teachers have different numbers of examples: shapes {shapes}")

    if weights is None:
        w = torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten().cpu()
        if w.numel() != len(members):
            raise ValueError(f"got {w.numel()} weights for {len(members)} members")
        if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError(f"weights={w.tolist()} must be finite, >= 0 and not all 0")
        w = w / w.sum()

    dtype = torch.promote_types(members[0].dtype, torch.float32)
    tiny = torch.finfo(dtype).tiny  # log(0) -> a very negative finite number, never -inf - -inf
    log_ps = []  # M x (N, C) log-probabilities at T
    for x in members:
        x = x.to(dtype)
        scores = x if inputs == "logits" else torch.log(x.clamp_min(tiny))
        log_ps.append(F.log_softmax(scores / t, dim=1))
    if mean == "arithmetic":
        return sum(float(wm) * lp.exp() for wm, lp in zip(w, log_ps))
    return torch.softmax(sum(float(wm) * lp for wm, lp in zip(w, log_ps)), dim=1)


# --------------------------------------------------------------------------- #
# teacher outputs computed once per transfer set
# --------------------------------------------------------------------------- #


class TeacherCache:
    """Teacher outputs for a fixed transfer set, computed once, served by index.

    ``teacher``: a callable (B, ...) inputs -> (B, C) logits, e.g. an
    ``nn.Module`` (put in eval mode for the pass, then restored).
    ``output="logits"`` stores the raw logits (soften later at any T with
    ``soft_targets``); ``output="probs"`` stores ``softmax(logits / temperature)``.
    ``device``: where the teacher runs (inputs are moved there); ``None`` means
    the device of the module's parameters, else CPU.  Outputs are stored on CPU.

    Usage::

        cache = TeacherCache(teacher, output="probs", temperature=4).fit(x_transfer)
        for idx in batches_of_indices:          # every epoch, no teacher forward
            p = cache[idx].to(device)           # (B, C)
    """

    def __init__(
        self,
        teacher: Callable[[Tensor], Tensor],
        *,
        output: str = "logits",
        temperature: float = 1.0,
        batch_size: int = 256,
        device: str | torch.device | None = None,
    ) -> None:
        _check_choice(output, "output", ("logits", "probs"))
        self.temperature = _check_temperature(temperature)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if not callable(teacher):
            raise ValueError(f"teacher must be callable, got {type(teacher).__name__}")
        self.teacher = teacher
        self.output = output
        self.batch_size = batch_size
        self.device = device

    def _device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        if isinstance(self.teacher, nn.Module):
            param = next(self.teacher.parameters(), None)
            if param is not None:
                return param.device
        return torch.device("cpu")

    def _batches(self, data: Tensor | Dataset | Iterable) -> Iterable[Tensor]:
        """Input batches in example-index order."""
        if isinstance(data, Tensor):
            for start in range(0, data.shape[0], self.batch_size):
                yield data[start : start + self.batch_size]
            return
        if isinstance(data, Dataset):
            data = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        elif isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
            raise ValueError("data is a shuffling DataLoader; cached rows must follow example order (shuffle=False)")
        for batch in data:
            # (x, y, ...) tuples from a TensorDataset or DataLoader: the inputs come first.
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def fit(self, data: Tensor | Dataset | Iterable) -> TeacherCache:
        """Run the teacher once over ``data`` and store its outputs.

        ``data``: an (N, ...) input tensor, a map-style ``Dataset`` (e.g.
        ``TensorDataset(x, y)``; inputs are the first field), or an iterable of
        batches (tensors, or tuples whose first element is the inputs) in
        example order.  Sets ``outputs_`` (N, C) on CPU and returns ``self``.
        """
        device = self._device()
        module = self.teacher if isinstance(self.teacher, nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        chunks = []
        try:
            # no_grad, not inference_mode: inference tensors cannot be saved for backward,
            # and cached targets are multiplied into losses that autograd tracks.
            with torch.no_grad():
                for x in self._batches(data):
                    logits = self.teacher(x.to(device))
                    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                        raise ValueError(f"teacher must return (B, C) logits for a batch of B={x.shape[0]}, got {got}")
                    chunks.append(logits.float().cpu())
        finally:
            if module is not None:
                module.train(was_training)
        if not chunks:
            raise ValueError("data yielded no batches; nothing to cache")
        counts = sorted({c.shape[1] for c in chunks})
        if len(counts) > 1:
            raise ValueError(f"teacher returned different class counts across batches: {counts}")
        logits = torch.cat(chunks)  # (N, C)
        _check_matrix(logits, "teacher outputs")
        self.outputs_ = logits if self.output == "logits" else torch.softmax(logits / self.temperature, dim=1)
        return self

    def __len__(self) -> int:
        return self._outputs().shape[0]

    def __getitem__(self, index: Tensor | int | slice | Sequence[int]) -> Tensor:
        """Rows of the cached (N, C) outputs for example ``index`` (on CPU)."""
        if isinstance(index, Tensor):
            index = index.cpu()
        return self._outputs()[index]

    def _outputs(self) -> Tensor:
        if not hasattr(self, "outputs_"):
            raise RuntimeError("TeacherCache is not fitted; call fit(data) first")
        return self.outputs_


# --------------------------------------------------------------------------- #
# section 3: one bias shift for the classes a transfer set lacks
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# how much of a teacher's gain a distilled model keeps
# --------------------------------------------------------------------------- #


MIN_GAIN_EXAMPLES = 5  # a teacher's gain over fewer test examples than this has no share to keep


def kept_gain(distilled: float, baseline: float, teacher: float, n_test: int, gain_stderr: float = 0.0) -> dict:
    """How much of the teacher's test-accuracy gain over `baseline` the distilled model keeps.

    (distilled - baseline) / (teacher - baseline), accuracies in [0, 1] on the
    same n_test examples. Undefined (None, with a reason) when the gain is ~0:
    under MIN_GAIN_EXAMPLES test examples, or under two standard errors
    `gain_stderr` (see `gain_standard_error`), where the ratio would be the share of noise.
    """
    gain = teacher - baseline
    out = {"gain": gain, "gain_stderr": gain_stderr}
    if gain * n_test < MIN_GAIN_EXAMPLES - 1e-9 or gain < 2 * gain_stderr:  # no gain, a loss or noise: no share
        return {"kept_gain": None, **out,
                "reason": f"undefined: the teacher's gain over the baseline, {gain * n_test:+.1f} of {n_test} test "
                          f"examples, is ~0 (under {MIN_GAIN_EXAMPLES} examples or under 2 standard errors, "
                          f"{2 * gain_stderr * n_test:.1f})"}
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
