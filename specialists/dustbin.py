"""Enriched epochs and the dustbin correction they call for (Hinton, Vinyals & Dean 2015, section 5.2).

A specialist over k classes trains on epochs where a share f of the examples
are from its classes (`EnrichedSampler`), and predicts them plus one dustbin
class standing for the others.

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
its classes meets a much higher share rho of its classes there, so
`dustbin_correction_active_top1` stores the same formula with pi replaced by
rho measured on the validation split: b_active = log(f/(1-f)) - log(rho/(1-rho)).

Applied by a combiner that gates specialists by the generalist's top
classes, the natural-prior b hurts; "prior" training and b_active take most
of that loss away (measurements: README, Performance, "Dustbin correction").
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .distill import collapse_probs, soft_targets


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
    return soften_collapsed(collapsed, temperature, prior_shift)


def soften_collapsed(collapsed: torch.Tensor, temperature: float, prior_shift: float = 0.0) -> torch.Tensor:
    """(B, k+1) soft targets at T from (B, k+1) collapsed T=1 probabilities: the second half of
    `specialist_soft_targets`, for a worker that was shipped the collapsed probabilities, not (B, C) logits."""
    log_p = torch.log(collapsed.clamp_min(torch.finfo(collapsed.dtype).tiny))
    if prior_shift:
        log_p[:, -1] -= prior_shift
    return soft_targets(log_p, temperature)
