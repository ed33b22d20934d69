"""Tests for specialists.distill: hand-computed values, limits, and bad inputs."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from specialists.distill import (
    DistillLoss,
    TeacherCache,
    accuracy_by_shift,
    choose_bias_shift,
    collapse_labels,
    collapse_probs,
    distillation_loss,
    ensemble_probs,
    gain_standard_error,
    kept_gain,
    logit_matching_loss,
    shift_bias,
    soft_target_loss,
    soft_targets,
)
from specialists.models import create_model


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _grad(loss_fn, z):
    z = z.detach().clone().requires_grad_(True)
    loss_fn(z).backward()
    return z.grad


# --------------------------------------------------------------------------- #
# hand-computed values
# --------------------------------------------------------------------------- #

Z = [[1.0, 0.0, -1.0], [0.5, 2.0, -0.5]]  # student logits, 2 examples x 3 classes
P = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]  # teacher soft targets
Y = [0, 2]  # labels


def test_soft_targets_hand_value():
    got = soft_targets(torch.tensor(Z), temperature=2.0)
    want = torch.tensor([_softmax(row, 2.0) for row in Z])
    assert torch.allclose(got, want, atol=1e-7)
    # Higher T is softer: the top probability shrinks.
    assert soft_targets(torch.tensor(Z), 5.0)[0, 0] < got[0, 0] < soft_targets(torch.tensor(Z), 1.0)[0, 0]


def test_soft_target_loss_ce_and_kl_hand_values():
    t = 2.0
    ce = [-sum(p * math.log(q) for p, q in zip(P[n], _softmax(Z[n], t))) for n in range(2)]
    ent = [-sum(p * math.log(p) for p in P[n]) for n in range(2)]
    want_ce = t**2 * (ce[0] + ce[1]) / 2  # T^2-scaled, mean over the batch
    want_kl = t**2 * ((ce[0] - ent[0]) + (ce[1] - ent[1])) / 2

    got_ce = soft_target_loss(torch.tensor(Z), torch.tensor(P), t)
    got_kl = soft_target_loss(torch.tensor(Z), torch.tensor(P), t, form="kl")
    assert got_ce.item() == pytest.approx(want_ce, rel=1e-6)
    assert got_kl.item() == pytest.approx(want_kl, rel=1e-6)


def test_distillation_loss_hand_value_and_weight_meaning():
    t, w = 3.0, 0.7  # w != 0.5 so swapping the weights would be caught
    soft = [-sum(p * math.log(q) for p, q in zip(P[n], _softmax(Z[n], t))) for n in range(2)]
    hard = [-math.log(_softmax(Z[n])[Y[n]]) for n in range(2)]  # labels use T = 1
    want_soft = t**2 * sum(soft) / 2
    want_hard = sum(hard) / 2

    parts = distillation_loss(torch.tensor(Z), torch.tensor(Y), torch.tensor(P), t, soft_weight=w)
    assert isinstance(parts, DistillLoss)
    assert parts.soft_loss.item() == pytest.approx(want_soft, rel=1e-6)
    assert parts.hard_loss.item() == pytest.approx(want_hard, rel=1e-6)
    assert parts.loss.item() == pytest.approx(w * want_soft + (1 - w) * want_hard, rel=1e-6)
    assert set(parts.as_dict()) == {"loss", "hard_loss", "soft_loss"}

    # soft_weight=1 is pure distillation, 0 is pure supervised.
    only_soft = distillation_loss(torch.tensor(Z), torch.tensor(Y), torch.tensor(P), t, 1.0)
    only_hard = distillation_loss(torch.tensor(Z), torch.tensor(Y), torch.tensor(P), t, 0.0)
    assert only_soft.loss.item() == pytest.approx(want_soft, rel=1e-6)
    assert only_hard.loss.item() == pytest.approx(want_hard, rel=1e-6)


def test_unlabeled_batch_is_soft_loss_only():
    parts = distillation_loss(torch.tensor(Z), None, torch.tensor(P), 2.0, soft_weight=0.3)
    assert parts.hard_loss.item() == 0.0
    assert parts.loss.item() == pytest.approx(parts.soft_loss.item())
    assert parts.loss.item() == pytest.approx(soft_target_loss(torch.tensor(Z), torch.tensor(P), 2.0).item())


def test_kl_form_is_zero_at_match_and_has_the_ce_gradient():
    torch.manual_seed(0)
    v = torch.randn(4, 5)
    p = soft_targets(v, 4.0)
    assert soft_target_loss(v, p, 4.0, form="kl").item() == pytest.approx(0.0, abs=1e-5)
    assert soft_target_loss(v, p, 4.0, form="ce").item() > 1.0  # T^2 * entropy

    z = torch.randn(4, 5)
    g_ce = _grad(lambda x: soft_target_loss(x, p, 4.0, form="ce"), z)
    g_kl = _grad(lambda x: soft_target_loss(x, p, 4.0, form="kl"), z)
    assert g_ce.abs().max() > 1e-3
    assert torch.allclose(g_ce, g_kl, atol=1e-6)


def test_soft_target_gradient_matches_closed_form():
    # dCE/dz_i = (1/T)(q_i - p_i); T^2 scaling and the batch mean give T (q - p) / N.
    torch.manual_seed(1)
    t, z, v = 3.0, torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    p = soft_targets(v, t)
    g = _grad(lambda x: soft_target_loss(x, p, t), z)
    want = t * (torch.softmax(z / t, dim=1) - p) / z.shape[0]
    assert torch.allclose(g, want, atol=1e-12)


# --------------------------------------------------------------------------- #
# temperature: the logit-matching limit and gradient-scale invariance
# --------------------------------------------------------------------------- #


def test_high_temperature_limit_is_logit_matching():
    # As T grows, grad of T^2 * CE(softmax(v/T), softmax(z/T)) -> (1/C) * grad of
    # 1/2 ||(z - mean z) - (v - mean v)||^2, C = number of classes (paper section 2.1).
    torch.manual_seed(2)
    n_classes = 6
    z = torch.randn(4, n_classes, dtype=torch.float64)
    v = torch.randn(4, n_classes, dtype=torch.float64)
    g_match = _grad(lambda x: logit_matching_loss(x, v), z) / n_classes

    rel = []
    for t in (1.0, 10.0, 100.0, 1000.0):
        g_soft = _grad(lambda x: soft_target_loss(x, soft_targets(v, t), t), z)
        rel.append(((g_soft - g_match).norm() / g_match.norm()).item())
    assert rel[0] > 0.1  # far from the limit at T = 1
    assert all(a > b for a, b in zip(rel, rel[1:])), rel
    assert rel[-1] < 1e-3, rel


def test_logit_matching_hand_value():
    z, v = [1.0, 2.0, 3.0], [0.0, 0.0, 3.0]  # zero-meaned: [-1, 0, 1] and [-1, -1, 2]
    want = 0.5 * (0.0**2 + 1.0**2 + (-1.0) ** 2)
    assert logit_matching_loss(torch.tensor([z]), torch.tensor([v])).item() == pytest.approx(want)
    # Adding a constant to either side's logits changes nothing.
    assert logit_matching_loss(torch.tensor([z]) + 5, torch.tensor([v]) - 2).item() == pytest.approx(want)


def test_t_squared_scaling_keeps_gradient_magnitude_constant():
    torch.manual_seed(3)
    z, v = torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 10, dtype=torch.float64)
    temps = (1.0, 2.0, 5.0, 20.0, 100.0)
    scaled = [_grad(lambda x: soft_target_loss(x, soft_targets(v, t), t), z).norm().item() for t in temps]
    unscaled = [s / t**2 for s, t in zip(scaled, temps)]
    assert max(scaled) / min(scaled) < 1.5, scaled
    assert max(unscaled) / min(unscaled) > 1e3, unscaled  # what the T^2 factor corrects


# --------------------------------------------------------------------------- #
# ensembles of teachers
# --------------------------------------------------------------------------- #


def test_arithmetic_and_geometric_means_differ_by_hand():
    p1, p2 = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    arith = ensemble_probs([p1, p2], mean="arithmetic")
    geo = ensemble_probs([p1, p2], mean="geometric")
    # arithmetic: (0.5 + 0.9) / 2 = 0.7; geometric: sqrt(.45) : sqrt(.05) = 3 : 1.
    assert torch.allclose(arith, torch.tensor([[0.7, 0.3]]), atol=1e-6)
    assert torch.allclose(geo, torch.tensor([[0.75, 0.25]]), atol=1e-6)


def test_weighted_ensemble_by_hand():
    p1, p2 = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    # weights (3, 1) are normalised to (0.75, 0.25).
    arith = ensemble_probs([p1, p2], weights=[3.0, 1.0])
    assert torch.allclose(arith, torch.tensor([[0.6, 0.4]]), atol=1e-6)
    geo = ensemble_probs([p1, p2], weights=[3.0, 1.0], mean="geometric")
    a = 0.5**0.75 * 0.9**0.25
    b = 0.5**0.75 * 0.1**0.25
    assert torch.allclose(geo, torch.tensor([[a / (a + b), b / (a + b)]]), atol=1e-6)


def test_ensemble_of_logits_at_temperature():
    torch.manual_seed(4)
    logits = [torch.randn(5, 4) for _ in range(3)]
    t = 2.5
    arith = ensemble_probs(logits, temperature=t, inputs="logits")
    want = sum(torch.softmax(z / t, dim=1) for z in logits) / 3
    assert torch.allclose(arith, want, atol=1e-6)
    # Geometric mean of softmaxes = softmax of the mean logit.
    geo = ensemble_probs(logits, mean="geometric", temperature=t, inputs="logits")
    assert torch.allclose(geo, torch.softmax(sum(logits) / 3 / t, dim=1), atol=1e-6)
    # Re-tempering T=1 probabilities gives the same as softening the logits.
    from_probs = ensemble_probs([torch.softmax(z, dim=1) for z in logits], temperature=t)
    assert torch.allclose(from_probs, arith, atol=1e-5)


def test_geometric_mean_vetoes_a_class_any_teacher_rules_out():
    p1, p2 = torch.tensor([[0.0, 0.5, 0.5]]), torch.tensor([[0.8, 0.1, 0.1]])
    geo = ensemble_probs([p1, p2], mean="geometric")
    assert geo[0, 0].item() < 1e-12
    assert torch.allclose(geo.sum(dim=1), torch.ones(1))
    assert ensemble_probs([p1, p2])[0, 0].item() == pytest.approx(0.4)


# --------------------------------------------------------------------------- #
# collapsed label spaces
# --------------------------------------------------------------------------- #


def test_collapse_probs_by_hand():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    got = collapse_probs(probs, [2, 0])  # order of classes is kept
    want = torch.tensor([[0.3, 0.1, 0.6], [0.25, 0.25, 0.5]])
    assert torch.allclose(got, want, atol=1e-7)
    assert collapse_probs(probs, torch.tensor([0, 1, 2, 3]))[:, -1].abs().max() == 0  # empty dustbin


def test_collapse_labels_by_hand():
    labels = torch.tensor([0, 1, 2, 3, 2, 7])
    assert collapse_labels(labels, [2, 0]).tolist() == [1, 2, 0, 2, 0, 2]
    assert collapse_labels(torch.tensor([], dtype=torch.long), [1]).tolist() == []


def test_specialist_loss_on_collapsed_space():
    torch.manual_seed(5)
    teacher = soft_targets(torch.randn(6, 10), 2.0)
    labels = torch.tensor([1, 4, 9, 4, 0, 3])
    cls = [4, 9, 3]
    p = collapse_probs(teacher, cls)
    y = collapse_labels(labels, cls)
    assert p.shape == (6, 4) and y.tolist() == [3, 0, 1, 0, 3, 2]
    student = torch.randn(6, 4, requires_grad=True)
    parts = distillation_loss(student, y, p, 2.0, soft_weight=0.9)
    parts.loss.backward()
    assert torch.isfinite(parts.loss) and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------- #
# TeacherCache
# --------------------------------------------------------------------------- #


class CountingTeacher(nn.Module):
    """A real linear teacher that counts the examples it has been run on."""

    def __init__(self, d_in=3, n_classes=4):
        super().__init__()
        torch.manual_seed(6)
        self.linear = nn.Linear(d_in, n_classes)
        self.examples_seen = 0

    def forward(self, x):
        self.examples_seen += x.shape[0]
        return self.linear(x)


def test_teacher_cache_runs_teacher_once_per_example():
    x = torch.randn(50, 3)
    teacher = CountingTeacher()
    cache = TeacherCache(teacher, output="probs", temperature=2.0, batch_size=16).fit(x)
    assert teacher.examples_seen == 50 and len(cache) == 50

    gen = torch.Generator().manual_seed(0)
    for _epoch in range(3):
        for idx in torch.randperm(50, generator=gen).split(8):
            out = cache[idx]
            assert out.shape == (idx.numel(), 4)
    assert teacher.examples_seen == 50  # no recomputation across epochs

    with torch.no_grad():
        want = torch.softmax(teacher.linear(x) / 2.0, dim=1)
    idx = torch.tensor([7, 0, 49])
    assert torch.allclose(cache[idx], want[idx], atol=1e-6)
    assert teacher.training  # eval() during fit, training mode restored


def test_teacher_cache_inputs_agree_and_targets_are_usable_in_autograd():
    x, y = torch.randn(23, 3), torch.randint(0, 4, (23,))
    teacher = CountingTeacher()
    from_tensor = TeacherCache(teacher, batch_size=7).fit(x)
    one_by_one = TeacherCache(teacher, batch_size=1).fit(x)
    from_dataset = TeacherCache(teacher, batch_size=5).fit(TensorDataset(x, y))
    from_batches = TeacherCache(teacher).fit([(x[:10], y[:10]), (x[10:], y[10:])])
    assert teacher.examples_seen == 4 * 23
    for other in (one_by_one, from_dataset, from_batches):
        assert torch.allclose(from_tensor.outputs_, other.outputs_, atol=1e-6)

    with torch.no_grad():
        assert torch.allclose(from_tensor.outputs_, teacher.linear(x), atol=1e-6)  # raw logits

    # Cached probabilities go straight into a loss that autograd saves them for.
    probs = TeacherCache(teacher, output="probs", temperature=3.0).fit(x)[torch.arange(5)]
    assert not probs.requires_grad
    student = torch.randn(5, 4, requires_grad=True)
    soft_target_loss(student, probs, 3.0).backward()
    assert student.grad.abs().sum() > 0


def test_teacher_cache_rejects_misuse():
    x = torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="not fitted"):
        TeacherCache(CountingTeacher())[0]
    with pytest.raises(ValueError, match="shuffle"):
        TeacherCache(CountingTeacher()).fit(DataLoader(TensorDataset(x), shuffle=True))
    with pytest.raises(ValueError, match="output='proba'"):
        TeacherCache(CountingTeacher(), output="proba")
    with pytest.raises(ValueError, match="temperature=0"):
        TeacherCache(CountingTeacher(), temperature=0)


# --------------------------------------------------------------------------- #
# bad inputs raise ValueErrors that name the bad value
# --------------------------------------------------------------------------- #

ZT, PT, YT = torch.tensor(Z), torch.tensor(P), torch.tensor(Y)


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match=f"temperature={t}"):
        soft_target_loss(ZT, PT, t)
    with pytest.raises(ValueError, match="temperature="):
        soft_targets(ZT, t)
    with pytest.raises(ValueError, match="temperature="):
        ensemble_probs([PT], temperature=t)


@pytest.mark.parametrize("w", [-0.1, 1.5, float("nan")])
def test_bad_soft_weight(w):
    with pytest.raises(ValueError, match=f"soft_weight={w}"):
        distillation_loss(ZT, YT, PT, 2.0, soft_weight=w)


def test_class_count_mismatch_shows_both_sizes():
    with pytest.raises(ValueError, match=r"C=3 classes but teacher_probs has C=4"):
        soft_target_loss(ZT, torch.full((2, 4), 0.25), 2.0)
    with pytest.raises(ValueError, match=r"C=3 classes but teacher_logits has C=5"):
        logit_matching_loss(ZT, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"N=2 rows but teacher_probs has N=1"):
        soft_target_loss(ZT, PT[:1], 2.0)


def test_ensemble_rejects_mismatched_teachers_and_bad_weights():
    with pytest.raises(ValueError, match=r"different class counts: shapes \[\(2, 3\), \(2, 4\)\]"):
        ensemble_probs([PT, torch.full((2, 4), 0.25)])
    with pytest.raises(ValueError, match="different numbers of examples"):
        ensemble_probs([PT, PT[:1]])
    with pytest.raises(ValueError, match=r"weights=\[-1.0, 2.0\]"):
        ensemble_probs([PT, PT], weights=[-1.0, 2.0])
    with pytest.raises(ValueError, match="got 3 weights for 2 members"):
        ensemble_probs([PT, PT], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="mean='harmonic'"):
        ensemble_probs([PT], mean="harmonic")
    with pytest.raises(ValueError, match="non-empty"):
        ensemble_probs([])


def test_nan_inputs():
    bad_z = ZT.clone()
    bad_z[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"student_logits contains 1 non-finite value\(s\) \(NaN\), first in row 1"):
        soft_target_loss(bad_z, PT, 2.0)
    bad_p = PT.clone()
    bad_p[0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_probs contains .*NaN"):
        distillation_loss(ZT, YT, bad_p, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"members\[1\] contains .*NaN"):
        ensemble_probs([ZT, bad_z], inputs="logits")
    with pytest.raises(ValueError, match="NaN"):
        logit_matching_loss(ZT, bad_z)


def test_probabilities_must_sum_to_one():
    off = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.1]])
    with pytest.raises(ValueError, match="row 1 sums to 0.9"):
        soft_target_loss(ZT, off, 2.0)
    with pytest.raises(ValueError, match=r"members\[0\] rows must sum to 1"):
        ensemble_probs([off])
    with pytest.raises(ValueError, match="probs rows must sum to 1"):
        collapse_probs(off, [0])
    # Logits passed where probabilities are expected are caught, not silently used.
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        soft_target_loss(ZT, ZT, 2.0)


def test_bad_labels_and_classes():
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\], got values in \[0, 3\]"):
        distillation_loss(ZT, torch.tensor([0, 3]), PT, 2.0, 0.5)
    with pytest.raises(ValueError, match="integer class indices"):
        distillation_loss(ZT, torch.tensor([0.0, 1.0]), PT, 2.0, 0.5)
    with pytest.raises(ValueError, match="classes must be < C=3"):
        collapse_probs(PT, [0, 3])
    with pytest.raises(ValueError, match=r"distinct, got \[1, 1\]"):
        collapse_labels(YT, [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        collapse_probs(PT, [])
    with pytest.raises(ValueError, match="form='mse'"):
        soft_target_loss(ZT, PT, 2.0, form="mse")


# --------------------------------------------------------------------------- #
# section 3's bias shift and the kept gain
# --------------------------------------------------------------------------- #


def test_accuracy_by_shift_matches_argmax():
    rng = np.random.default_rng(0)
    logits, labels, cls = rng.normal(size=(300, 7)) * 3, rng.integers(0, 7, 300), [2, 5]
    shifts = np.array([-4.0, -1.0, 0.0, 0.5, 2.0, 6.0])
    mask = np.isin(np.arange(7), cls)
    brute = [((logits + s * mask).argmax(1) == labels).mean() for s in shifts]
    assert np.allclose(accuracy_by_shift(logits, labels, cls, shifts), brute)

    # a plateau of equally good shifts: the middle one is chosen
    two = np.array([[0.0, 1.0]])  # class 0 wins once its logit is shifted past +1
    assert choose_bias_shift(two, np.array([0]), [0], max_shift=4.5, step=0.5) == pytest.approx(3.0)  # 1.5 .. 4.5

    model = create_model("mlp", n_classes=7, input_shape=[4], hidden=[8], dropout=0.0)
    x = torch.randn(5, 4)
    before = model(x).detach()
    shift_bias(model, cls, 1.5)
    assert torch.allclose(model(x).detach() - before, torch.tensor(mask * 1.5, dtype=torch.float32), atol=1e-6)


def test_kept_gain_values():
    assert kept_gain(0.83, 0.80, 0.85, 1000)["kept_gain"] == pytest.approx(0.6)
    assert kept_gain(0.86, 0.80, 0.85, 1000)["kept_gain"] == pytest.approx(1.2)
    assert kept_gain(0.78, 0.80, 0.85, 1000, gain_stderr=0.02)["kept_gain"] == pytest.approx(-0.4)
    undefined = kept_gain(0.83, 0.80, 0.8005, 1000)  # half a test example
    assert undefined["kept_gain"] is None and "+0.5 of 1000 test examples, is ~0" in undefined["reason"]
    assert kept_gain(0.83, 0.85, 0.80, 1000)["kept_gain"] is None  # the teacher is worse: no gain to keep
    noisy = kept_gain(0.83, 0.80, 0.81, 1000, gain_stderr=0.006)  # +10 examples, 2 standard errors = 12
    assert noisy["kept_gain"] is None and "2 standard errors, 12.0" in noisy["reason"]


def test_gain_standard_error_is_mcnemars():
    # 8 examples only the teacher gets right, 2 only the baseline, 90 both or neither
    teacher = np.array([1] * 8 + [0] * 2 + [1] * 50 + [0] * 40)
    baseline = np.array([0] * 8 + [1] * 2 + [1] * 50 + [0] * 40)
    assert gain_standard_error(teacher, baseline) == pytest.approx(np.sqrt(8 + 2) / 100)
    assert gain_standard_error(teacher, teacher) == 0.0
