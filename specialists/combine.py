"""Combine a generalist with specialists: solvers of the objective of section 5.4.

Hinton, Vinyals & Dean (2015), section 5.4: for a test example, take the
generalist's top-n classes; the specialists whose class set meets them are
*active*. The combined distribution q over all C classes minimises

    J(q) = sum_g w_g KL(p_g || q) + sum_{m active} w_m KL(p_m || A_m q)

where A_m q folds q onto specialist m's classes plus one "dustbin" entry that
holds the mass of every other class. One objective, two solvers:

- `solve` (dense inputs) / `solve_rows` (only the active rows of each
  specialist): exact, no learning rate, CPU or CUDA; what inference uses.
- `solve_reference`: gradient descent on the logits of q, as the paper does;
  slow, kept to test the exact solver against.

Shapes: N examples, C classes, G generalists, M specialists. Specialist m
covers the k_m classes `specialist_classes[m]` and outputs k_m + 1
probabilities: its classes in that order, then the dustbin.

`mean="geometric"` replaces KL(p || q) by KL(q || p) everywhere; for models
that cover all classes its minimiser is the normalised weighted geometric mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .choices import ENSEMBLE_MEANS

__all__ = [
    "active_specialists",
    "objective",
    "solve",
    "solve_reference",
    "solve_rows",
]

ROW_SUM_TOL = 1e-4  # how far a probability row may sum from 1
_TINY = 1e-300  # q is clamped here inside log q
# A row where a group of classes has no probability under any model can still
# have to absorb a dustbin's mass (the optimum is then not unique); each such
# zero class gets this much mass, relative to the row's total weight W.
_FLOOR = 1e-10
_CHUNK_ELEMENTS = 1 << 24  # bounds the (rows, K, k, K) membership tensors
# The Newton solver stops at a relative KKT residual tol, or earlier when
# float64 can do no better; it warns where the dustbin mass it leaves misplaced,
# max_m |r_m D_m - a_m| / W, is above max(tol, _WARN_TOL).
_WARN_TOL = 1e-8


# ----------------------------------------------------------------------------
# public API


def active_specialists(
    general_probs: Tensor,
    specialist_classes: Sequence[Tensor],
    top_n: int = 1,
    general_weights: Tensor | None = None,
) -> Tensor:
    """Which specialists are active: their classes meet the generalist's top_n classes.

    general_probs: (N, C) or (G, N, C); with several generalists their weighted
    mean ranks the classes. Returns (N, M) bool.
    """
    general = _as_general(general_probs)
    n_models, _, n_classes = general.shape
    weights = _check_weights("general_weights", general_weights, n_models, general.device)
    _check_general(general, weights)
    if not 1 <= top_n <= n_classes:
        raise ValueError(f"top_n={top_n} must be in [1, n_classes={n_classes}]")
    layout = _Layout.build(specialist_classes, n_classes, general.device)
    mix = _mix(general, weights)
    top = mix.topk(top_n, dim=1).indices  # (N, top_n)
    member = layout.pos >= 0  # (M, C)
    return member[:, top].any(-1).T.contiguous()  # (M, N, top_n) -> (N, M)


def solve(
    general_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    specialist_classes: Sequence[Tensor],
    active: Tensor,
    general_weights: Tensor | None = None,
    specialist_weights: Tensor | None = None,
    **options,
) -> Tensor:
    """Exact minimiser q of J for every example, (N, C), in general_probs' dtype and device.

    general_probs: (N, C) or (G, N, C). specialist_probs[m]: (N, k_m + 1), rows
    where specialist m is inactive are ignored. specialist_classes[m]: (k_m,)
    class indices. active: (N, M) bool. general_weights: (G,), specialist_weights:
    (M,), default all ones; weights are not normalised (a specialist of weight 2
    counts as two). options: `solve_rows`'s mean, tol and max_iter.

    Math (mean="arithmetic"). Write b_c = sum_g w_g p_gc + sum_{m active, c in S_m}
    w_m p_mc, a_m = w_m d_m (d_m: dustbin probability), W = sum_c b_c + sum_m a_m.
    Stationarity on the simplex gives

        q_c = b_c / (W - sum_{m active, c not in S_m} r_m),   r_m = a_m / D_m,

    D_m = sum_{c not in S_m} q_c. The r are the minimiser of the convex dual
    f(r) = -sum_c b_c log(W - s_c(r)) - sum_m a_m log r_m, s_c(r) = sum_{m: c not in S_m} r_m;
    at its minimum sum_c q_c = 1. Classes outside every active specialist share
    s_c = sum_m r_m, so f needs only their total b and the active specialists'
    classes: the work per example is O(k K^2) for K active specialists of k
    classes, plus one pass over its C outputs. No active specialist with a > 0:
    q = b / W (with no active specialist at all, the generalists' weighted
    arithmetic mean). Exactly one: closed form, D_m = (B_m + a_m) / W with B_m
    the b-mass outside S_m. More: damped Newton on the K-dimensional f (Hessian
    K x K, fraction-to-boundary and Armijo steps), quadratically convergent.

    mean="geometric" (all active specialists must cover all C classes): the
    normalised weighted geometric mean of the generalists and active specialists.
    """
    general = _as_general(general_probs)
    probs, rows = _dense_to_rows(specialist_probs, specialist_classes, active, general)
    return solve_rows(general, probs, specialist_classes, rows, general_weights, specialist_weights, **options)


def solve_rows(
    general_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    specialist_classes: Sequence[Tensor],
    specialist_rows: Sequence[Tensor],
    general_weights: Tensor | None = None,
    specialist_weights: Tensor | None = None,
    *,
    mean: str = "arithmetic",
    tol: float = 1e-12,
    max_iter: int = 50,
) -> Tensor:
    """`solve` with each specialist's output given only where it is active.

    specialist_rows[m]: (P_m,) distinct example indices where specialist m is
    active; specialist_probs[m]: (P_m, k_m + 1) its outputs on those examples.
    This is what inference produces (run specialist m on its P_m examples only)
    and what keeps memory at O(N C + sum_m P_m k_m). Returns (N, C).

    mean: see `solve`. tol: relative KKT residual |r_m D_m / a_m - 1| at which
    the Newton iteration stops; max_iter caps it. A RuntimeWarning names the
    examples left with more than max(tol, 1e-8) of their total weight W of
    dustbin mass misplaced, max_m |r_m D_m - a_m| / W, and the largest such.
    """
    _check_mean(mean)
    problem = _Problem.build(
        general_probs, specialist_probs, specialist_classes, specialist_rows,
        general_weights, specialist_weights,
    )
    if mean == "geometric":
        return _solve_geometric(problem)
    if not tol > 0:
        raise ValueError(f"tol={tol} must be > 0")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    return _solve_arithmetic(problem, tol, max_iter)


def full_model_terms(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full models' part of the objective, as `general_probs, general_weights` of `combine`.

    full: (G, N, C) probabilities of the generalist and peer members 1..G-1.
    G = 1: the generalist's (N, C) and no weights (today's combination, exactly);
    G > 1: all G with weight 1/G each, one term of weight 1 on their mean.
    """
    if len(full) == 1:
        return full[0], None
    return full, torch.full((len(full),), 1 / len(full), dtype=full.dtype, device=full.device)


def combine_outputs(full: torch.Tensor, specialist_probs, specialist_classes, top_n: int,
                    specialist_weight: float) -> torch.Tensor:
    """(N, C) combined probabilities from dense outputs, as `SpecialistsModel.predict_proba` gives them.

    full: (G, N, C) full models' probabilities; specialist_probs[m]: (N, k_m + 1)
    specialist m's dustbin-corrected probabilities on every row (only its
    active rows are read); specialist_classes[m]: (k_m,). For trying combine
    settings on stored outputs (`SpecialistsModel.outputs`) without rerunning
    the models.
    """
    if not len(specialist_probs):
        return full.mean(0)
    general, weights = full_model_terms(full)
    active = active_specialists(general, specialist_classes, top_n, weights)  # (N, M)
    spec_weights = torch.full((len(specialist_probs),), float(specialist_weight), dtype=full.dtype, device=full.device)
    return solve(general, specialist_probs, specialist_classes, active, weights, spec_weights)


def objective(
    q: Tensor,
    general_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    specialist_classes: Sequence[Tensor],
    active: Tensor,
    general_weights: Tensor | None = None,
    specialist_weights: Tensor | None = None,
    *,
    mean: str = "arithmetic",
) -> Tensor:
    """J(q) per example, (N,) float64; q: (N, C); the other inputs as `solve` takes them.

    mean="arithmetic": J = sum_g w_g KL(p_g || q) + sum_{m active} w_m KL(p_m || A_m q),
    with 0 log 0 = 0 and q clamped at 1e-300 inside log q. mean="geometric":
    the same with every KL reversed, KL(q || p) (inf where q puts mass on a
    class that a model gives probability 0).
    """
    problem = _dense_problem(mean, general_probs, specialist_probs, specialist_classes, active,
                             general_weights, specialist_weights)
    shape = (problem.n_examples, problem.n_classes)
    if tuple(q.shape) != shape:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected (N, C) = {shape}")
    return _objective(q, problem, mean)


def solve_reference(
    general_probs: Tensor,
    specialist_probs: Sequence[Tensor],
    specialist_classes: Sequence[Tensor],
    active: Tensor,
    general_weights: Tensor | None = None,
    specialist_weights: Tensor | None = None,
    *,
    mean: str = "arithmetic",
    steps: int = 200,
    lr: float = 0.3,
    polish_steps: int = 1000,
) -> Tensor:
    """Minimise J by gradient descent on the logits of q, as the paper does; (N, C).

    The inputs as `solve` takes them. Float64, from uniform q: `steps` Adam steps on all examples at once (cosine
    learning rate from `lr` to 0), then up to `polish_steps` L-BFGS iterations
    on each example alone (one L-BFGS over the whole batch shares its step
    sizes and curvature pairs across examples and stalls). Slow: for tests and
    benchmarks of the exact solvers.
    """
    problem = _dense_problem(mean, general_probs, specialist_probs, specialist_classes, active,
                             general_weights, specialist_weights)
    shape = (problem.n_examples, problem.n_classes)
    logits = torch.zeros(shape, dtype=torch.float64, device=problem.device, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=lr)
    for step in range(steps):
        adam.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        adam.zero_grad()
        _objective(_softmax(logits), problem, mean).sum().backward()
        adam.step()
    logits = logits.detach()
    if polish_steps > 0:
        for i in range(problem.n_examples):
            logits[i] = _lbfgs_logits(logits[i : i + 1], problem.row(i), mean, polish_steps)[0]
    return _softmax(logits).to(problem.general.dtype)


def _softmax(logits: Tensor) -> Tensor:
    """Row softmax of (N, C) logits, the max shift held constant (detached) for the gradient."""
    e = torch.exp(logits - logits.detach().amax(1, keepdim=True))
    return e / e.sum(1, keepdim=True)


def _lbfgs_logits(logits: Tensor, problem: _Problem, mean: str, max_iter: int) -> Tensor:
    """L-BFGS on the logits (N, C) of q from the given start; returns the final logits."""
    logits = logits.clone().requires_grad_()
    lbfgs = torch.optim.LBFGS(
        [logits], lr=1, max_iter=max_iter, history_size=30,
        tolerance_grad=1e-11, tolerance_change=1e-15, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        lbfgs.zero_grad()
        value = _objective(_softmax(logits), problem, mean).sum()
        value.backward()
        return value

    lbfgs.step(closure)
    return logits.detach()


# ----------------------------------------------------------------------------
# validation


def _check_mean(mean: str) -> None:
    if mean not in ENSEMBLE_MEANS:
        raise ValueError(f"mean={mean!r} must be one of {ENSEMBLE_MEANS}")


def _dense_problem(mean: str, *inputs) -> _Problem:
    """The validated problem of `solve`'s inputs (active rows as a dense (N, M) mask)."""
    _check_mean(mean)
    return _Problem.build_dense(*inputs)


def _as_general(general_probs: Tensor) -> Tensor:
    """(N, C) or (G, N, C) -> (G, N, C)."""
    if not isinstance(general_probs, Tensor):
        raise ValueError(f"general_probs must be a torch.Tensor, got {type(general_probs).__name__}")
    if general_probs.dim() == 2:
        general_probs = general_probs[None]
    if general_probs.dim() != 3 or general_probs.shape[-1] == 0:
        raise ValueError(f"general_probs must have shape (N, C) or (G, N, C), got {tuple(general_probs.shape)}")
    if not general_probs.is_floating_point():
        raise ValueError(f"general_probs must be floating point, got {general_probs.dtype}")
    return general_probs


def _check_weights(name: str, weights, n: int, device) -> Tensor:
    """-> (n,) float64 on device, all >= 0 and finite; None means ones."""
    if weights is None:
        return torch.ones(n, dtype=torch.float64, device=device)
    weights = torch.as_tensor(weights, dtype=torch.float64).to(device)
    if weights.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(weights.shape)}, expected ({n},)")
    bad = ~torch.isfinite(weights) | (weights < 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}]={weights[i].item()} must be finite and >= 0")
    return weights


def _check_probs(name: str, probs: Tensor, where) -> None:
    """Raise on NaN/inf, negative entries or rows not summing to 1 in probs (..., K).

    where(index tuple of a row) -> text naming that row for the message.
    """
    if probs.numel() == 0:
        return
    sums = probs.sum(-1).double()  # in probs' dtype: a float64 copy of probs would cost a pass
    if not torch.isfinite(sums).all():
        bad = (~torch.isfinite(probs)).nonzero()[0]
        value = probs[tuple(bad)].item()
        raise ValueError(f"{name} contains {value} at {where(tuple(bad[:-1].tolist()))}, class column {int(bad[-1])}")
    if probs.amin() < 0:
        bad = (probs < 0).nonzero()[0]
        value = probs[tuple(bad)].item()
        raise ValueError(
            f"{name} contains {value} at {where(tuple(bad[:-1].tolist()))}, class column {int(bad[-1])}; "
            "probabilities must be >= 0"
        )
    error = (sums - 1).abs()
    if error.amax() > ROW_SUM_TOL:
        bad = tuple(int(i) for i in torch.unravel_index(error.argmax(), error.shape))
        raise ValueError(
            f"{name} at {where(bad)} sums to {sums[bad].item():.6g}, expected 1 (tolerance {ROW_SUM_TOL})"
        )


def _check_general(general: Tensor, weights: Tensor) -> None:
    _check_probs("general_probs", general, lambda i: f"model {i[0]}, row {i[1]}")
    if not weights.sum() > 0:
        raise ValueError(f"general_weights sum to {weights.sum().item()}; at least one must be > 0")


def _dense_to_rows(specialist_probs, specialist_classes, active, general) -> tuple[list, list]:
    """Dense (N, k_m + 1) specialist outputs + (N, M) active -> the active rows of each."""
    n = general.shape[1]
    n_specialists = len(specialist_classes)
    if len(specialist_probs) != n_specialists:
        raise ValueError(
            f"got {len(specialist_probs)} specialist_probs for {n_specialists} specialist_classes"
        )
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        raise ValueError(f"active must be a bool tensor, got {getattr(active, 'dtype', type(active).__name__)}")
    if tuple(active.shape) != (n, n_specialists):
        raise ValueError(f"active has shape {tuple(active.shape)}, expected (N, M) = {(n, n_specialists)}")
    active = active.to(general.device)
    probs, rows = [], []
    for m, p in enumerate(specialist_probs):
        k = len(specialist_classes[m])
        if not isinstance(p, Tensor) or tuple(p.shape) != (n, k + 1):
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"specialist_probs[{m}] has shape {shape}, expected (N, k_m + 1) = {(n, k + 1)}")
        r = active[:, m].nonzero().squeeze(1)
        rows.append(r)
        probs.append(p.index_select(0, r.to(p.device)))
    return probs, rows


@dataclass
class _Layout:
    """The specialists' class sets as tables.

    classes: (M, k_max) class indices, padded with 0. sizes: (M,) k_m.
    pos: (M, C) position of each class in specialist m's output, -1 if absent.
    """

    classes: Tensor
    sizes: Tensor
    pos: Tensor

    @staticmethod
    def build(specialist_classes: Sequence[Tensor], n_classes: int, device) -> _Layout:
        lists = []
        for m, c in enumerate(specialist_classes):
            c = torch.as_tensor(c)
            if c.dtype.is_floating_point or c.dtype.is_complex or c.dtype == torch.bool:
                raise ValueError(f"specialist_classes[{m}] must hold integer class indices, got {c.dtype}")
            if c.dim() != 1 or c.numel() == 0:
                raise ValueError(f"specialist_classes[{m}] must be a non-empty 1-D tensor, got shape {tuple(c.shape)}")
            lists.append(c.to(device=device, dtype=torch.long))
        n_specialists = len(lists)
        sizes = [len(c) for c in lists]
        pos = torch.full((n_specialists, n_classes), -1, dtype=torch.long, device=device)
        if n_specialists == 0:
            return _Layout(torch.zeros(0, 1, dtype=torch.long, device=device),
                           torch.zeros(0, dtype=torch.long, device=device), pos)
        flat = torch.cat(lists)
        owner = torch.repeat_interleave(torch.arange(n_specialists, device=device),
                                        torch.tensor(sizes, device=device))
        within = torch.cat([torch.arange(k, device=device) for k in sizes])
        bad = (flat < 0) | (flat >= n_classes)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"specialist_classes[{int(owner[i])}] contains class {int(flat[i])}, "
                f"outside [0, n_classes={n_classes})"
            )
        counts = torch.zeros(n_specialists, n_classes, dtype=torch.int32, device=device)
        counts.index_put_((owner, flat), torch.ones_like(flat, dtype=torch.int32), accumulate=True)
        if counts.amax() > 1:
            m, c = (counts > 1).nonzero()[0].tolist()
            raise ValueError(f"specialist_classes[{m}] lists class {c} {int(counts[m, c])} times")
        pos[owner, flat] = within
        classes = torch.zeros(n_specialists, max(sizes), dtype=torch.long, device=device)
        classes[owner, within] = flat
        return _Layout(classes, torch.tensor(sizes, device=device), pos)


@dataclass
class _Problem:
    """Validated inputs on one device.

    general: (G, N, C). general_weights: (G,) float64. probs[m]: (P_m, k_m + 1)
    outputs of specialist m on the examples rows[m]: (P_m,). specialist_weights: (M,).
    """

    general: Tensor
    general_weights: Tensor
    probs: list
    rows: list
    layout: _Layout
    specialist_weights: Tensor

    @property
    def device(self):
        return self.general.device

    @property
    def n_examples(self) -> int:
        return self.general.shape[1]

    @property
    def n_classes(self) -> int:
        return self.general.shape[2]

    def specialists(self):
        """(m, rows, probs, classes) of each specialist, skipping empty and zero-weight ones."""
        for m, (rows, probs) in enumerate(zip(self.rows, self.probs)):
            if rows.numel() and self.specialist_weights[m] > 0:
                yield m, rows, probs, self.layout.classes[m, : probs.shape[1] - 1]

    def row(self, i: int) -> _Problem:
        """The problem of example i alone (N = 1)."""
        rows, probs = [], []
        for r, p in zip(self.rows, self.probs):
            hit = r == i
            rows.append(torch.zeros(int(hit.sum()), dtype=torch.long, device=self.device))
            probs.append(p[hit])
        return _Problem(self.general[:, i : i + 1], self.general_weights, probs, rows, self.layout,
                        self.specialist_weights)

    @staticmethod
    def build_dense(general_probs, specialist_probs, specialist_classes, active,
                    general_weights=None, specialist_weights=None) -> _Problem:
        general = _as_general(general_probs)
        probs, rows = _dense_to_rows(specialist_probs, specialist_classes, active, general)
        return _Problem.build(general, probs, specialist_classes, rows, general_weights, specialist_weights)

    @staticmethod
    def build(general_probs, specialist_probs, specialist_classes, specialist_rows,
              general_weights, specialist_weights) -> _Problem:
        general = _as_general(general_probs)
        n_models, n, n_classes = general.shape
        device = general.device
        general_weights = _check_weights("general_weights", general_weights, n_models, device)
        _check_general(general, general_weights)
        layout = _Layout.build(specialist_classes, n_classes, device)
        n_specialists = len(layout.sizes)
        if len(specialist_probs) != n_specialists or len(specialist_rows) != n_specialists:
            raise ValueError(
                f"got {len(specialist_probs)} specialist_probs and {len(specialist_rows)} specialist_rows "
                f"for {n_specialists} specialist_classes"
            )
        specialist_weights = _check_weights("specialist_weights", specialist_weights, n_specialists, device)
        sizes = layout.sizes.tolist()
        rows = []
        for m, (r, p) in enumerate(zip(specialist_rows, specialist_probs)):
            r = torch.as_tensor(r, device=device)
            if r.dtype.is_floating_point or r.dtype == torch.bool or r.dim() != 1:
                raise ValueError(f"specialist_rows[{m}] must be a 1-D integer tensor, got {r.dtype} {tuple(r.shape)}")
            if not isinstance(p, Tensor) or tuple(p.shape) != (len(r), sizes[m] + 1):
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(
                    f"specialist_probs[{m}] has shape {shape}, expected (P_m, k_m + 1) = {(len(r), sizes[m] + 1)}"
                )
            if p.device != device:
                raise ValueError(f"specialist_probs[{m}] is on {p.device}, general_probs on {device}")
            if not p.is_floating_point():
                raise ValueError(f"specialist_probs[{m}] must be floating point, got {p.dtype}")
            rows.append(r.long())
        if n_specialists:
            _check_rows(rows, n)
            for m, (r, p) in enumerate(zip(rows, specialist_probs)):
                _check_probs(f"specialist_probs[{m}]", p, lambda i, r=r: f"example {int(r[i[0]])}")
                if sizes[m] == n_classes and p.numel() and p[:, -1].amax() > 0:
                    i = int(p[:, -1].argmax())
                    raise ValueError(
                        f"specialist {m} covers all {n_classes} classes, so its dustbin is empty, "
                        f"but its dustbin probability is {p[i, -1].item()} at example {int(r[i])}"
                    )
        return _Problem(general, general_weights, list(specialist_probs), rows, layout, specialist_weights)


def _check_rows(rows: list, n: int) -> None:
    """Every specialist's example indices are in [0, N) and distinct."""
    flat = torch.cat(rows)
    if flat.numel() == 0:
        return
    owner = torch.repeat_interleave(
        torch.arange(len(rows), device=flat.device), torch.tensor([len(r) for r in rows], device=flat.device)
    )
    bad = (flat < 0) | (flat >= n)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"specialist_rows[{int(owner[i])}] contains example {int(flat[i])}, outside [0, N={n})")
    key = (owner * n + flat).sort().values
    repeated = key[1:] == key[:-1]
    if repeated.any():
        k = int(key[1:][repeated][0])
        raise ValueError(f"specialist_rows[{k // n}] lists example {k % n} more than once")


# ----------------------------------------------------------------------------
# objective


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) along the last axis with 0 log 0 = 0 (and a finite gradient there)."""
    return (torch.xlogy(p, p.clamp_min(_TINY)) - torch.xlogy(p, q)).sum(-1)


def _objective(q: Tensor, problem: _Problem, mean: str) -> Tensor:
    """J per example, (N,) float64; differentiable in q."""
    q = q.double()
    forward = mean == "arithmetic"
    q_log = q.clamp_min(_TINY)  # q inside a log: keep finite where q underflows
    keep = problem.general_weights > 0  # 0 * inf must not turn into nan
    general = problem.general[keep].double()
    kl = _kl(general, q_log[None]) if forward else _kl(q[None], general)  # (G, N)
    total = problem.general_weights[keep] @ kl
    for m, rows, probs, classes in problem.specialists():
        q_rows = q[rows]  # (P, C)
        outside = torch.ones(problem.n_classes, dtype=torch.bool, device=q.device)
        outside[classes] = False
        # sum outside classes directly: 1 - sum(inside) loses a small dustbin to rounding
        folded = torch.cat([q_rows[:, classes], (q_rows * outside).sum(1, keepdim=True)], dim=1)
        probs = probs.double()
        kl = _kl(probs, folded.clamp_min(_TINY)) if forward else _kl(folded, probs)
        total = total.index_add(0, rows, problem.specialist_weights[m] * kl)
    return total


# ----------------------------------------------------------------------------
# geometric mean


def _softmax_rows(log_q: Tensor, name: str) -> Tensor:
    """Row softmax of float64 log-weights; a row that is -inf everywhere is an error."""
    empty = ~torch.isfinite(log_q.amax(1))
    if empty.any():
        i = int(empty.nonzero()[0, 0])
        raise ValueError(f"geometric mean undefined at row {i}: every class has probability 0 in some model of {name}")
    return torch.softmax(log_q, dim=1)


def _solve_geometric(problem: _Problem) -> Tensor:
    keep = problem.general_weights > 0
    log_mix = torch.einsum("g,gnc->nc", problem.general_weights[keep], problem.general[keep].double().log())
    total = torch.full((problem.n_examples,), problem.general_weights.sum().item(),
                       dtype=torch.float64, device=problem.device)
    for m, rows, probs, classes in problem.specialists():
        if len(classes) != problem.n_classes:
            raise ValueError(
                f"mean='geometric' needs models over all classes; specialist {m} covers "
                f"{len(classes)} of {problem.n_classes}"
            )
        weight = problem.specialist_weights[m]
        log_mix[rows[:, None], classes[None, :]] += weight * probs[:, :-1].double().log()
        total[rows] += weight
    return _softmax_rows(log_mix / total[:, None], "general_probs/specialist_probs").to(problem.general.dtype)


# ----------------------------------------------------------------------------
# exact solver of the arithmetic (forward KL) objective


def _mix(general: Tensor, weights: Tensor) -> Tensor:
    """sum_g w_g p_g: (G, N, C), (G,) -> a new (N, C) tensor in general's dtype."""
    weights = weights.tolist()
    mix = general[0] * weights[0]
    for g in range(1, len(weights)):
        mix.add_(general[g], alpha=weights[g])
    return mix


def _solve_arithmetic(problem: _Problem, tol: float, max_iter: int) -> Tensor:
    general, layout = problem.general, problem.layout
    dtype, device = general.dtype, general.device
    n, n_classes = problem.n_examples, problem.n_classes
    q = _mix(general, problem.general_weights)  # (N, C) b of the generalists

    # Pairs (example, active specialist), sorted by example, then laid out as
    # slots: row i of the active examples holds its K <= k_slots specialists.
    pair_m = [m for m, (rows, _) in enumerate(zip(problem.rows, problem.probs))
              if rows.numel() and problem.specialist_weights[m] > 0]
    if not pair_m:
        return q / q.sum(1, keepdim=True)
    k_max = int(layout.sizes[pair_m].max())
    pair_row = torch.cat([problem.rows[m] for m in pair_m])
    pair_spec = torch.cat([torch.full_like(problem.rows[m], m) for m in pair_m])
    pair_in = torch.zeros(len(pair_row), k_max, dtype=torch.float64, device=device)  # (P, k_max)
    offset = 0
    for m in pair_m:
        p = problem.probs[m]
        pair_in[offset: offset + len(p), : p.shape[1] - 1] = p[:, :-1]
        offset += len(p)
    pair_dust = torch.cat([problem.probs[m][:, -1].double() for m in pair_m])  # (P,)
    pair_total = torch.cat([problem.probs[m].sum(1, dtype=torch.float64) for m in pair_m])  # (P,)

    order = torch.argsort(pair_row * len(layout.sizes) + pair_spec)
    row_sorted = pair_row[order]
    counts = torch.bincount(pair_row, minlength=n)
    k_slots = int(counts.max())
    examples = (counts > 0).nonzero().squeeze(1)  # (Na,) examples with an active specialist
    compact = torch.full((n,), -1, dtype=torch.long, device=device)
    compact[examples] = torch.arange(len(examples), device=device)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=device) - first[row_sorted]
    slot_pair = torch.full((len(examples), k_slots), -1, dtype=torch.long, device=device)
    slot_pair[compact[row_sorted], slot] = order

    valid = slot_pair >= 0  # (Na, K)
    slot_pair = slot_pair.clamp_min(0)
    spec = pair_spec[slot_pair]  # (Na, K)
    weight = torch.where(valid, problem.specialist_weights[spec], 0.0)
    dust = torch.where(valid, weight * pair_dust[slot_pair], 0.0)  # (Na, K) a_m
    spec_total = (torch.where(valid, weight * pair_total[slot_pair], 0.0)).sum(1)  # (Na,)
    entry_valid = valid[:, :, None] & (torch.arange(k_max, device=device) < layout.sizes[spec][:, :, None])
    classes = torch.where(entry_valid, layout.classes[spec][:, :, :k_max], 0)  # (Na, K, k_max)

    # Generalist mass on the active classes; zeroing it in q leaves q summing
    # to the mass outside them, B_out, free of cancellation.
    entries = entry_valid.nonzero(as_tuple=True)  # the valid (example, slot, position) triples
    at = (examples[entries[0]], classes[entries])  # q[at]: the active classes of each example
    general_union = torch.zeros(classes.shape, dtype=torch.float64, device=device)  # (Na, K, k_max)
    general_union[entries] = q[at].double()
    q[at] = 0
    b_out = q.sum(1).double()  # (N,); summing in q's dtype avoids a float64 copy of q

    scale = 1 / b_out  # (N,) multiplies the generalist mass on classes outside every active specialist
    shift = torch.zeros_like(b_out)  # (N,) added to those classes (floor of a degenerate row)
    values = torch.zeros_like(general_union)  # (Na, K, k_max) q on the active classes
    misplaced = torch.zeros_like(b_out)  # (N,) dustbin mass / W that Newton left misplaced
    # Examples with K active specialists are solved together, so that work
    # grows with K^2 per example, not with the largest K in the batch.
    n_slots = counts[examples]  # (Na,)
    for k in n_slots.unique().tolist():
        group = (n_slots == k).nonzero().squeeze(1)
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // (k * k * k_max))
        for start in range(0, len(group), rows_per_chunk):
            i = group[start: start + rows_per_chunk]
            ex = examples[i]
            chunk = _Chunk(
                spec=spec[i, :k], valid=valid[i, :k], slot_pair=slot_pair[i, :k], weight=weight[i, :k],
                dust=dust[i, :k], classes=classes[i, :k], entry_valid=entry_valid[i, :k],
                general_union=general_union[i, :k], b_out=b_out[ex], spec_total=spec_total[i],
            )
            values[i, :k], scale[ex], shift[ex], misplaced[ex] = _solve_chunk(
                chunk, layout=layout, pair_in=pair_in, n_classes=n_classes, tol=tol, max_iter=max_iter)
    _warn_unconverged(misplaced, tol, max_iter)
    q.mul_(scale.to(dtype)[:, None])
    if (shift > 0).any():
        q.add_(shift.to(dtype)[:, None])
    q[at] = values[entries].to(dtype)
    return q


def _warn_unconverged(misplaced: Tensor, tol: float, max_iter: int) -> None:
    """Warn about the examples whose misplaced dustbin mass / W is above max(tol, _WARN_TOL)."""
    bad = misplaced > max(tol, _WARN_TOL)
    count = int(bad.sum())
    if count:
        worst = int(misplaced.argmax())
        warnings.warn(
            f"combine.solve: {count} of {len(misplaced)} examples not converged (tol={tol}, "
            f"max_iter={max_iter}): KKT residual max_m |r_m D_m - a_m| / W (dustbin mass misplaced, "
            f"as a fraction of the example's total weight W) up to {misplaced[worst].item():.2e} "
            f"at example {worst}; q there is approximate",
            RuntimeWarning, stacklevel=4)


@dataclass(frozen=True)
class _Chunk:
    """n examples that each have K active specialists, one per slot; solved together.

    (n, K) per slot: spec (which specialist), valid (the slot is used),
    slot_pair (its row of pair_in), weight (w_m), dust (a_m = w_m d_m).
    (n, K, k) per class position: classes, entry_valid (a class is there),
    general_union (the generalists' mass on it). (n,) per example: b_out (the
    generalists' mass outside every active specialist), spec_total (sum over
    the slots of w_m times the sum of specialist m's outputs).
    """

    spec: Tensor
    valid: Tensor
    slot_pair: Tensor
    weight: Tensor
    dust: Tensor
    classes: Tensor
    entry_valid: Tensor
    general_union: Tensor
    b_out: Tensor
    spec_total: Tensor


def _solve_chunk(chunk: _Chunk, *, layout: _Layout, pair_in: Tensor, n_classes: int, tol: float,
                 max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve the examples of one chunk; pair_in: (P, k_max) every active pair's outputs on its classes.

    Returns q on the active classes (n, K, k), and for the classes outside every
    active specialist q_c = scale * (generalist mass) + shift, scale and shift (n,);
    then the misplaced dustbin mass / W (n,) of the rows solved by Newton, 0 elsewhere.
    """
    classes, entry_valid, general_union = chunk.classes, chunk.entry_valid, chunk.general_union
    a, b_out = chunk.dust, chunk.b_out
    n, k_slots, k_max = classes.shape
    device = classes.device
    # membership (n, K, k, K): class (i, m, j) belongs to slot m' of the same example
    pos = layout.pos[chunk.spec[:, None, None, :], classes[..., None]]
    member = (pos >= 0) & chunk.valid[:, None, None, :] & entry_valid[..., None]
    # b_c: generalists plus every active specialist that covers c
    pin = pair_in[chunk.slot_pair].reshape(n, k_slots * k_max)  # (n, K * k)
    flat = torch.arange(k_slots, device=device) * k_max + pos.clamp_min(0)
    spec_prob = pin.gather(1, flat.reshape(n, -1)).reshape(member.shape)
    b = general_union + (member * chunk.weight[:, None, None, :] * spec_prob).sum(-1)  # (n, K, k)
    # each class counts once: at the first slot that holds it
    earlier = torch.ones(k_slots, k_slots, dtype=torch.bool, device=device).tril(-1)  # [m, m'] = m' < m
    primary = entry_valid & ~(member & earlier[:, None, :]).any(-1)
    total = b_out + torch.where(primary, general_union, 0.0).sum((1, 2)) + chunk.spec_total  # (n,) W
    n_out = n_classes - primary.sum((1, 2))  # classes in no active specialist

    # A group of classes with b = 0 can have to take dustbin mass (then q is
    # not unique and the dual below has no minimum): give each zero class a
    # tiny mass, _FLOOR * W, in rows where that can happen.
    free = a > 0
    n_free = free.sum(1)
    zero = primary & (b == 0)
    zero_out = (b_out == 0) & (n_out > 0)
    floor = torch.where((n_free > 0) & (zero.any((1, 2)) | zero_out), _FLOOR * total, 0.0)
    b = torch.where(entry_valid & (b == 0), floor[:, None, None], b)
    out_floor = torch.where(zero_out, floor, 0.0)
    b_out = b_out + out_floor
    total = total + floor * zero.sum((1, 2)) + out_floor

    # Denominators y_c = W - sum_{m active, c not in S_m} r_m, so q_c = b_c / y_c.
    # No specialist with a > 0: y = W. One: closed form, computed without the
    # cancellation of W - r.
    b_primary = torch.where(primary, b, 0.0)
    only = free.double().argmax(1)  # the free slot when n_free == 1
    in_only = member.gather(-1, only[:, None, None, None].expand(n, k_slots, k_max, 1)).squeeze(-1)
    b_outside = b_out + torch.where(in_only, 0.0, b_primary).sum((1, 2))
    a_only = a.gather(1, only[:, None]).squeeze(1)
    y_rest = torch.where(n_free == 1, total * b_outside / (b_outside + a_only), total)
    y = torch.where(in_only, total[:, None, None], y_rest[:, None, None])  # (n, K, k)
    y_out = y_rest

    many = (n_free >= 2).nonzero().squeeze(1)
    misplaced = torch.zeros_like(total)
    if len(many):
        member_f = (member & primary[..., None]).double().reshape(n, -1, k_slots)[many]
        r, y_out_many, misplaced[many] = _newton(b_primary.reshape(n, -1)[many], member_f, b_out[many],
                                                total[many], a[many], tol, max_iter)
        y[many] = y_out_many[:, None, None] + torch.einsum("ikjl,il->ikj", member[many].double(), r)
        y_out[many] = y_out_many

    q_active = torch.where(b > 0, b / y, 0.0)  # (n, K, k)
    q_out = torch.where(b_out > 0, b_out / y_out, 0.0)
    norm = q_out + torch.where(primary, q_active, 0.0).sum((1, 2))  # 1 up to rounding
    scale = 1 / (y_out * norm)
    shift = torch.where(out_floor > 0, out_floor / n_out.clamp_min(1) * scale, 0.0)
    return q_active / norm[:, None, None], scale, shift, misplaced


def solve_spd(m: Tensor, rhs: Tensor) -> Tensor:
    """Solve m x = rhs for (n, K, K) symmetric positive semi-definite m, (n, K, R) rhs.

    LU first; where m is singular in float64 (a few huge terms of rank one can
    swamp it), the pseudo-inverse instead, which drops the lost directions.
    """
    x, info = torch.linalg.solve_ex(m, rhs)
    bad = (info != 0) | ~torch.isfinite(x).all(2).all(1)
    if bad.any():
        lam, vec = torch.linalg.eigh(m[bad])
        keep = lam > lam.amax(1, keepdim=True) * m.shape[1] * torch.finfo(m.dtype).eps
        inv = torch.where(keep, 1 / torch.where(keep, lam, 1.0), 0.0)
        x[bad] = vec @ (inv[:, :, None] * (vec.transpose(1, 2) @ rhs[bad]))
    return x


def _newton(b, member, b_out, total, a, tol, max_iter):
    """Minimise the dual f(r) = -sum_c b_c log y_c - b_out log y_out - sum_m a_m log r_m.

    y_out = W - sum_m r_m, y_c = y_out + sum_{m: c in S_m} r_m. b: (n, E) mass of
    each active class (each class once, 0 for padding); member: (n, E, K) float
    0/1; b_out, total (W): (n,); a: (n, K) dustbin masses, slots with a = 0 stay
    at r = 0. f is convex; at its minimiser sum_c b_c / y_c + b_out / y_out = 1.
    Stops at a relative KKT residual max_m |r_m D_m / a_m - 1| <= tol, at
    max_iter, or when a step can no longer change r and the y in float64.
    Returns r (n, K), y_out (n,) and there max_m |r_m D_m - a_m| / W (n,): the
    dustbin mass that q misplaces, as a fraction of W (<= the relative residual).

    y_out is carried along with r and updated by the steps, never recomputed
    as W - sum r: at the optimum it can be many orders below W (the classes
    outside every active specialist get far more than the generalists' mass),
    and the difference would leave it, and every q_c = b_c / y_c, few correct
    digits. The iterate is then exact for a W within rounding of the given one.
    Likewise D_m and the Hessian are sums over the classes outside S_m, taken
    directly, not as total - inside.
    """
    n, k_slots = a.shape
    free = a > 0
    has_b, has_out = b > 0, b_out > 0
    eye = torch.eye(k_slots, dtype=a.dtype, device=a.device)
    inf = torch.tensor(math.inf, dtype=a.dtype, device=a.device)
    eps = torch.finfo(a.dtype).eps
    safe_a = torch.where(free, a, 1.0)
    outside_member = 1 - member

    def denominators(r, y_out, i):
        return y_out[:, None] + torch.einsum("iek,ik->ie", member[i], r)

    def value(r, y, y_out, i):
        return -(torch.xlogy(b[i], y).sum(1) + torch.xlogy(b_out[i], y_out) + torch.xlogy(a[i], r).sum(1))

    def max_step(r, d, d_out, y, y_out, i):
        """Largest alpha keeping (r + alpha d, y_out + alpha d_out) inside the domain of f."""
        fall = -d_out[:, None] - torch.einsum("iek,ik->ie", member[i], d)  # how fast each y_c falls
        alpha = torch.where(has_b[i] & (fall > 0), y / fall, inf).amin(1)
        alpha = torch.minimum(alpha, torch.where(has_out[i] & (d_out < 0), -y_out / d_out, inf))
        return torch.minimum(alpha, torch.where(free[i] & (d < 0), -r / d, inf).amin(1))

    # Start at r = a (D = 1, strictly feasible; y_out = W - sum a, the mass b of
    # all the classes), move toward each specialist's own closed form
    # r_m = a_m W / (B_m + a_m) as far as the domain allows.
    everyone = torch.arange(n, device=a.device)
    r = a.clone()
    y_out = b_out + b.sum(1)
    outside_mass = b_out[:, None] + torch.einsum("ie,iek->ik", b, outside_member)
    target = torch.where(free, a * total[:, None] / (outside_mass + safe_a), 0.0)
    d = target - r
    alpha = (0.99 * max_step(r, d, -d.sum(1), denominators(r, y_out, everyone), y_out, everyone)).clamp(max=1)
    r = r + alpha[:, None] * d
    y_out = y_out - alpha * d.sum(1)

    misplaced_mass = torch.zeros(n, dtype=a.dtype, device=a.device)  # at each example's last iterate
    live = everyone
    for iteration in range(max_iter + 1):
        if len(live) == 0:
            break
        r_live, y_out_live, a_live, free_live = r[live], y_out[live], a[live], free[live]
        y = denominators(r_live, y_out_live, live)
        q = torch.where(has_b[live], b[live] / y, 0.0)  # (n, E)
        q_out = torch.where(has_out[live], b_out[live] / y_out_live, 0.0)
        not_in = outside_member[live]
        outside = q_out[:, None] + torch.einsum("ie,iek->ik", q, not_in)  # D_m
        grad = torch.where(free_live, outside - a_live / r_live.where(free_live, 1.0), 0.0)
        misplaced = (grad * r_live).abs()  # |r_m D_m - a_m|
        misplaced_mass[live] = misplaced.amax(1) / total[live]
        go = (misplaced / safe_a[live]).amax(1) > tol  # |r_m D_m / a_m - 1|
        if iteration == max_iter or not go.any():
            break
        if not go.all():
            live, r_live, y_out_live, a_live, free_live = (
                live[go], r_live[go], y_out_live[go], a_live[go], free_live[go])
            y, q, q_out, not_in, grad = y[go], q[go], q_out[go], not_in[go], grad[go]

        # Hessian H = M + v_out 1 1^T, M = sum_c (q_c / y_c) u_c u_c^T + diag(a / r^2),
        # u_c the indicator of the slots whose S_m miss c. When y_out is tiny,
        # v_out = q_out / y_out swamps M and H is singular in float64: solve
        # with M (Jacobi-scaled, its scales differ by orders) and add the
        # rank-one term by Sherman-Morrison. The step of y_out, -1^T step, is
        # formed directly: it can be far below the steps of r.
        v = q / y
        v_out = q_out / y_out_live
        ones = free_live.to(a.dtype)
        m = (torch.einsum("ie,iek,iel->ikl", v, not_in, not_in)
             + torch.diag_embed(torch.where(free_live, a_live / r_live.where(free_live, 1.0) ** 2, 0.0)))
        m = torch.where(free_live[:, :, None] & free_live[:, None, :], m, eye)
        s = m.diagonal(dim1=1, dim2=2).rsqrt()
        x = s[:, :, None] * solve_spd(m * s[:, :, None] * s[:, None, :], torch.stack([s * grad, s * ones], dim=2))
        x_grad, x_ones = x[..., 0], x[..., 1]  # M^-1 grad, M^-1 1
        along = (ones * x_grad).sum(1)
        shrink = 1 / (1 + v_out * (ones * x_ones).sum(1))  # 1^T H^-1 grad = shrink * 1^T M^-1 grad
        step = -(x_grad - (v_out * shrink * along)[:, None] * x_ones)
        step_out = shrink * along  # -1^T step
        decrease = -(grad * step).sum(1)

        # fraction to the boundary, then halve until Armijo holds (with slack
        # for rounding, so that the last quadratic steps are not refused)
        f0 = value(r_live, y, y_out_live, live)
        slack = 16 * eps * (f0.abs() + 1)
        alpha = (0.99 * max_step(r_live, step, step_out, y, y_out_live, live)).clamp(max=1)
        pending = torch.ones_like(alpha, dtype=torch.bool)
        for _ in range(60):
            r_try = r_live + alpha[:, None] * step
            y_out_try = y_out_live + alpha * step_out
            accept = pending & (value(r_try, denominators(r_try, y_out_try, live), y_out_try, live)
                                <= f0 - 1e-4 * alpha * decrease + slack)
            r[live[accept]] = r_try[accept]
            y_out[live[accept]] = y_out_try[accept]
            pending &= ~accept
            if not pending.any():
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        # a step that no longer changes r and the y, or that no line search
        # accepts: as close as float64 gets (the caller judges the residual)
        move_out = alpha * step_out
        move = move_out[:, None] + alpha[:, None] * torch.einsum("iek,ik->ie", member[live], step)
        tiny = (((alpha[:, None] * step).abs() <= 4 * eps * r_live).all(1)
                & (move_out.abs() <= 4 * eps * y_out_live) & (move.abs() <= 4 * eps * y).all(1))
        live = live[~(pending | tiny)]
    return r, y_out, misplaced_mass
