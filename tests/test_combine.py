"""The combination solvers: exact vs reference vs fixed point, closed forms, validation."""

import math
import warnings
from itertools import islice

import numpy as np
import pytest
import torch

from specialists import combine
from specialists.combine import active_specialists, objective, solve, solve_reference, solve_rows
from specialists.distill import ensemble_probs

F64 = torch.float64


def softmax_rows(gen, shape, scale=2.0):
    return torch.softmax(scale * torch.randn(shape, generator=gen, dtype=F64), dim=-1)


def random_problem(seed, n=12, n_classes=12, sizes=(3, 5, 4, 6, 5), n_general=2, p_active=0.5):
    """Overlapping specialists, several generalists, unequal weights, several active per row."""
    gen = torch.Generator().manual_seed(seed)
    classes = [torch.randperm(n_classes, generator=gen)[:k] for k in sizes]
    return dict(
        general_probs=softmax_rows(gen, (n_general, n, n_classes), 3.0),
        specialist_probs=[softmax_rows(gen, (n, k + 1)) for k in sizes],
        specialist_classes=classes,
        active=torch.rand(n, len(sizes), generator=gen) < p_active,
        general_weights=0.2 + torch.rand(n_general, generator=gen, dtype=F64),
        specialist_weights=0.2 + 2 * torch.rand(len(sizes), generator=gen, dtype=F64),
    )


def arithmetic_mean(probs, weights):
    """(G, N, C), (G,) -> (N, C) the weighted mean, the minimiser of sum_g w_g KL(p_g || q); by distill's code."""
    return ensemble_probs(list(probs), weights=weights, mean="arithmetic")


def mm_iterates(general_probs, specialist_probs, specialist_classes, active, general_weights, specialist_weights):
    """The majorise-minimise (EM) iterates q_1, q_2, ... of J from uniform q, forever: each step hands
    every active dustbin's mass a_m to the classes outside S_m in proportion to the current q,
    q_c <- (b_c + sum_{m active, c not in S_m} a_m q_c / D_m) / W. J never increases; the rate is linear."""
    b = torch.einsum("g,gnc->nc", general_weights, general_probs)  # (N, C)
    total = b.sum(1)  # (N,) W
    dustbins = []  # (rows, outside mask (C,), a (P,)) per specialist
    for m, (probs, classes) in enumerate(zip(specialist_probs, specialist_classes)):
        rows = active[:, m].nonzero().squeeze(1)
        weight = specialist_weights[m]
        b[rows[:, None], classes[None, :]] += weight * probs[rows, :-1]
        total[rows] += weight * probs[rows].sum(1)
        outside = torch.ones(b.shape[1], dtype=torch.bool)
        outside[classes] = False
        dustbins.append((rows, outside, weight * probs[rows, -1]))
    q = torch.full_like(b, 1.0 / b.shape[1])
    while True:
        numerator = b.clone()
        for rows, outside, a in dustbins:
            q_rows = q[rows] * outside  # (P, C) the classes that share the dustbin
            numerator[rows] += (a / q_rows.sum(1))[:, None] * q_rows
        q = numerator / total[:, None]
        yield q


def kkt_residual(q, problem):
    """max_c |q_c (W - sum_{m active, c not in S_m} a_m / D_m) - b_c| / W: 0 at the optimum."""
    general, weights = problem["general_probs"], problem["general_weights"]
    b = torch.einsum("g,gnc->nc", weights, general)
    total = torch.full((q.shape[0],), weights.sum().item(), dtype=F64)
    denominator = torch.zeros_like(q)
    sw = problem["specialist_weights"]
    for m, (probs, classes) in enumerate(zip(problem["specialist_probs"], problem["specialist_classes"])):
        for i in problem["active"][:, m].nonzero().squeeze(1).tolist():
            outside = torch.ones(q.shape[1], dtype=torch.bool)
            outside[classes] = False
            b[i, classes] += sw[m] * probs[i, :-1]
            total[i] += sw[m]
            denominator[i, outside] += sw[m] * probs[i, -1] / q[i, outside].sum()
    return ((q * (total[:, None] - denominator) - b).abs() / total[:, None]).max().item()


def test_objective_matches_hand_computed_value():
    general = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=F64)
    args = (general, [torch.tensor([[0.6, 0.4]], dtype=F64)], [torch.tensor([0])], torch.tensor([[True]]))
    kl_general = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)  # class 2 agrees
    kl_specialist = 0.6 * math.log(0.6 / 0.4) + 0.4 * math.log(0.4 / 0.6)  # dustbin holds 0.4 + 0.2
    got = objective(q, *args, specialist_weights=torch.tensor([2.0]))
    assert got.item() == pytest.approx(kl_general + 2 * kl_specialist, abs=1e-15)
    reverse = (0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3)  # KL(q || p_g)
               + 0.4 * math.log(0.4 / 0.6) + 0.6 * math.log(0.6 / 0.4))  # KL(A q || p_m)
    assert objective(q, *args, mean="geometric").item() == pytest.approx(reverse, abs=1e-15)


def test_fast_solver_matches_reference_on_random_problems():
    problem = random_problem(0)
    assert (problem["active"].sum(1) >= 2).sum() >= 4  # several active specialists per row
    q = solve(**problem)
    q_ref = solve_reference(**problem)
    j, j_ref = objective(q, **problem), objective(q_ref, **problem)
    assert (j - j_ref).abs().max() < 1e-6
    assert (j <= j_ref + 1e-12).all()  # exact: never worse than gradient descent
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_solver_satisfies_stationarity(seed):
    # the closed form of the optimum, checked on more rows than the reference can afford
    problem = random_problem(seed, n=150, n_classes=40, sizes=(8, 12, 5, 20, 9, 15, 7), p_active=0.4)
    q = solve(**problem)
    assert kkt_residual(q, problem) < 1e-12
    assert kkt_residual(arithmetic_mean(problem["general_probs"], problem["general_weights"]), problem) > 1e-3


def peaked_problem(seed, n=400, n_classes=77, n_specialists=12, sharpness=5.0):
    """Trained-classifier-like outputs: peaked (softmax of logits x 5), about 20% of
    specialist entries near 1e-12; specialists of 4-15 classes (some overlapping,
    some disjoint) with weights 2 and 4; 2-3 active per example, first those that
    the generalist's top-2 classes activate."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 16, (n_specialists,), generator=gen).tolist()
    classes = [torch.randperm(n_classes, generator=gen)[:k] for k in sizes]
    truth = torch.randint(n_classes, (n,), generator=gen)
    logits = torch.randn(n, n_classes, generator=gen, dtype=F64)
    logits[torch.arange(n), truth] += 2 + 2 * torch.rand(n, generator=gen, dtype=F64)
    general = torch.softmax(sharpness * logits, dim=1)
    member = torch.zeros(n_specialists, n_classes, dtype=torch.bool)
    for m, c in enumerate(classes):
        member[m, c] = True
    hits = member[:, general.topk(2, dim=1).indices].any(-1).T  # (n, M)
    rank = (hits + torch.rand(n, n_specialists, generator=gen)).argsort(1, descending=True).argsort(1)
    active = rank < 2 + (torch.rand(n, generator=gen) < 0.5).long()[:, None]
    probs = []
    for c in classes:
        position = torch.full((n_classes,), len(c), dtype=torch.long)  # the dustbin for other classes
        position[c] = torch.arange(len(c))
        out = torch.randn(n, len(c) + 1, generator=gen, dtype=F64)
        out[torch.arange(n), position[truth]] += 2
        p = torch.softmax(sharpness * out, dim=1)
        tiny = torch.rand(p.shape, generator=gen) < 0.2
        p = torch.where(tiny, 1e-12 * torch.rand(p.shape, generator=gen, dtype=F64), p)
        probs.append(p / p.sum(1, keepdim=True))
    weights = torch.tensor([2.0, 4.0], dtype=F64).repeat(n_specialists)[:n_specialists]
    return dict(general_probs=general[None], specialist_probs=probs, specialist_classes=classes, active=active,
                general_weights=torch.ones(1, dtype=F64), specialist_weights=weights)


def test_weighted_specialists_on_peaked_outputs_converge_without_warning():
    # Regression: the Newton solver used to stall on such rows (a few in 400;
    # "not converged to tol=1e-12 in max_iter=50"), its KKT residual stuck at
    # the rounding of D_m = 1 - (mass in S_m) and of W - sum r.
    problem = peaked_problem(0)
    counts = problem["active"].sum(1)
    assert counts.min() == 2 and counts.max() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        q = solve(**problem)
    assert kkt_residual(q, problem) < 1e-12  # every row at the optimum
    rows = [240, 293]  # two of the rows where the old solver stalled (the reference costs ~1 s a row)
    sub = dict(problem, general_probs=problem["general_probs"][:, rows], active=problem["active"][rows],
               specialist_probs=[p[rows] for p in problem["specialist_probs"]])
    j, j_ref = objective(q[rows], **sub), objective(solve_reference(**sub), **sub)
    assert (j - j_ref).abs().max() < 1e-6
    assert (j <= j_ref + 1e-12).all()


def test_unconverged_rows_warn_with_how_far_they_are():
    problem = peaked_problem(0, n=60)
    with pytest.warns(RuntimeWarning, match=r"\d+ of 60 examples not converged \(tol=1e-12, max_iter=2\): "
                                            r"KKT residual .* up to \d\.\d\de[+-]\d\d at example \d+"):
        solve(**problem, max_iter=2)


def test_newton_system_falls_back_to_pseudo_inverse_when_singular():
    # a huge rank-one term can make the (Jacobi-scaled) Newton matrix singular in float64
    m = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 4.0]]], dtype=F64)
    rhs = torch.tensor([[[2.0], [2.0]], [[2.0], [4.0]]], dtype=F64)
    x = combine.solve_spd(m, rhs)
    torch.testing.assert_close(x, torch.tensor([[[1.0], [1.0]], [[1.0], [1.0]]], dtype=F64), atol=1e-12, rtol=0)


def test_fixed_point_decreases_objective_and_reaches_fast_optimum():
    problem = random_problem(3)
    iterates = mm_iterates(**problem)
    values = torch.stack([objective(q, **problem) for q in islice(iterates, 100)])  # (100, N)
    assert (values[1:] - values[:-1] <= 1e-13).all()
    assert (values[0] - values[-1]).sum() > 1e-3  # the iteration does move
    q_mm = next(islice(iterates, 3000, None))
    j_mm, j = objective(q_mm, **problem), objective(solve(**problem), **problem)
    assert (j_mm - j).max() < 1e-6
    assert (j_mm >= j - 1e-12).all()


def test_rows_without_active_specialist_are_the_generalist_mean():
    problem = random_problem(4)
    problem["active"][:5] = False
    q = solve(**problem)
    mean = arithmetic_mean(problem["general_probs"], problem["general_weights"])
    torch.testing.assert_close(q[:5], mean[:5], atol=1e-15, rtol=0)
    assert (q[5:] - mean[5:]).abs().max() > 1e-3  # active rows do move


def test_specialists_over_all_classes_give_the_arithmetic_mean():
    gen = torch.Generator().manual_seed(5)
    n, n_classes = 10, 7
    general = softmax_rows(gen, (2, n, n_classes))
    order = [torch.randperm(n_classes, generator=gen) for _ in range(3)]
    full = softmax_rows(gen, (3, n, n_classes))  # in class order
    probs = [torch.cat([full[m][:, order[m]], torch.zeros(n, 1, dtype=F64)], dim=1) for m in range(3)]
    weights = torch.tensor([1.0, 0.5], dtype=F64)
    specialist_weights = torch.tensor([2.0, 0.3, 1.0], dtype=F64)
    active = torch.rand(n, 3, generator=gen) < 0.6
    q = solve(general, probs, order, active, weights, specialist_weights)
    for i in range(n):
        on = active[i]
        models = torch.cat([general[:, i], full[on, i]])
        expected = arithmetic_mean(models[:, None], torch.cat([weights, specialist_weights[on]]))[0]
        torch.testing.assert_close(q[i], expected, atol=1e-14, rtol=0)


def test_geometric_mean_of_full_models():
    gen = torch.Generator().manual_seed(6)
    n, n_classes = 5, 6
    general = softmax_rows(gen, (1, n, n_classes))
    order = torch.randperm(n_classes, generator=gen)
    full = softmax_rows(gen, (n, n_classes))
    probs = [torch.cat([full[:, order], torch.zeros(n, 1, dtype=F64)], dim=1)]
    active = torch.tensor([[True], [True], [False], [True], [False]])
    args = (general, probs, [order], active, torch.tensor([0.7], dtype=F64), torch.tensor([1.6], dtype=F64))
    q = solve(*args, mean="geometric")
    # by hand: q proportional to p_g^(0.7/2.3) p_m^(1.6/2.3)
    by_hand = general[0] ** (0.7 / 2.3) * full ** (1.6 / 2.3)
    by_hand = by_hand / by_hand.sum(1, keepdim=True)
    torch.testing.assert_close(q[active[:, 0]], by_hand[active[:, 0]], atol=1e-14, rtol=0)
    torch.testing.assert_close(q[~active[:, 0]], general[0][~active[:, 0]], atol=1e-14, rtol=0)
    q_ref = solve_reference(*args, mean="geometric")
    gap = objective(q_ref, *args, mean="geometric") - objective(q, *args, mean="geometric")
    assert gap.abs().max() < 1e-6 and (gap >= -1e-12).all()
    assert (objective(solve(*args), *args, mean="geometric") - objective(q, *args, mean="geometric")).max() > 1e-4


def test_geometric_mean_needs_full_specialists():
    problem = random_problem(7)
    with pytest.raises(ValueError, match="covers 3 of 12"):
        solve(**problem, mean="geometric")


def edge_case_problem():
    """One row per edge case, on C = 8 classes and 4 specialists."""
    gen = torch.Generator().manual_seed(8)
    n, n_classes = 9, 8
    general = softmax_rows(gen, (n, n_classes))
    general[0:3] = 0
    general[0:3, 0] = 1  # one-hot generalist: the dustbin mass must go to zero classes
    general[3, 5:] = 0  # zeros outside the specialists
    general[3] /= general[3].sum()
    classes = [torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), torch.tensor([0, 3, 4]), torch.arange(8)]
    probs = [softmax_rows(gen, (n, len(c) + 1)) for c in classes]
    probs[3][:, -1] = 0  # covers every class: no dustbin
    probs[3] /= probs[3].sum(1, keepdim=True)
    probs[1][[4, 8], -1] = 0  # d = 0
    probs[1][[4, 8]] /= probs[1][[4, 8]].sum(1, keepdim=True)
    probs[0][5, :2] = 0  # zeros inside a specialist, generalist zero there too
    probs[0][5] /= probs[0][5].sum()
    general[5, :2] = 0
    general[5] /= general[5].sum()
    active = torch.tensor([
        [1, 0, 0, 0],  # one-hot, one specialist: closed form
        [1, 0, 1, 0],  # one-hot, two overlapping specialists: Newton
        [1, 1, 1, 1],  # one-hot, everything
        [1, 0, 1, 0],  # zeros outside the union
        [1, 1, 0, 0],  # same classes twice, one with d = 0
        [1, 0, 1, 0],  # zeros where the generalist and specialist are both zero
        [0, 0, 0, 1],  # only a full specialist: arithmetic mean
        [0, 0, 0, 0],  # nothing active
        [0, 1, 1, 0],  # two overlapping, one with d = 0: closed form over the other
    ], dtype=torch.bool)
    return dict(general_probs=general, specialist_probs=probs, specialist_classes=classes, active=active,
                specialist_weights=torch.tensor([1.0, 0.5, 2.0, 0.7], dtype=F64))


def test_edge_cases_match_reference():
    problem = edge_case_problem()
    q = solve(**problem)
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(9, dtype=F64), atol=1e-14, rtol=0)
    j, j_ref = objective(q, **problem), objective(solve_reference(**problem), **problem)
    assert (j - j_ref).abs().max() < 1e-6
    assert (j <= j_ref + 1e-9).all()  # degenerate rows: the floor costs about 1e-10


def test_one_hot_generalist_sends_dustbin_mass_uniformly():
    general = torch.zeros(1, 6, dtype=F64)
    general[0, 0] = 1
    p = torch.tensor([[0.5, 0.2, 0.1, 0.2]], dtype=F64)
    q = solve(general, [p], [torch.tensor([0, 1, 2])], torch.tensor([[True]]))
    # W = 2: classes 0..2 get (generalist + specialist) / 2, the dustbin 0.2 / 2 spreads over 3 classes
    expected = torch.tensor([[0.75, 0.1, 0.05, 0.1 / 3, 0.1 / 3, 0.1 / 3]], dtype=F64)
    torch.testing.assert_close(q, expected, atol=1e-9, rtol=0)


def test_rows_format_equals_dense_and_ignores_inactive_rows():
    problem = random_problem(9, n=30)
    q = solve(**problem)
    rows = [problem["active"][:, m].nonzero().squeeze(1).flip(0) for m in range(5)]  # any order
    probs = [p[r] for p, r in zip(problem["specialist_probs"], rows)]
    q_rows = solve_rows(problem["general_probs"], probs, problem["specialist_classes"], rows,
                        problem["general_weights"], problem["specialist_weights"])
    torch.testing.assert_close(q_rows, q, atol=1e-15, rtol=0)
    for p, a in zip(problem["specialist_probs"], problem["active"].T):
        p[~a] = float("nan")
    torch.testing.assert_close(solve(**problem), q, atol=1e-15, rtol=0)


def test_small_chunks_give_the_same_answer(monkeypatch):
    problem = random_problem(10, n=40)
    q = solve(**problem)
    monkeypatch.setattr(combine, "_CHUNK_ELEMENTS", 1)  # one example per chunk
    torch.testing.assert_close(solve(**problem), q, atol=1e-15, rtol=0)


def test_float32_inputs_give_float32_output_near_float64():
    problem = random_problem(11, n=50)
    q = solve(**problem)
    as32 = dict(problem, general_probs=problem["general_probs"].float(),
                specialist_probs=[p.float() for p in problem["specialist_probs"]])
    q32 = solve(**as32)
    assert q32.dtype == torch.float32 and q32.device == q.device
    torch.testing.assert_close(q32.double(), q, atol=1e-6, rtol=0)
    assert (q32 >= 0).all() and (q32.sum(1) - 1).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    problem = random_problem(12, n=40)
    moved = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t.cuda() for t in v]) for k, v in problem.items()}
    q = solve(**moved)
    assert q.is_cuda
    torch.testing.assert_close(q.cpu(), solve(**problem), atol=1e-12, rtol=0)


def test_active_specialists_top_n_and_weighted_generalists():
    general = torch.tensor([[[0.5, 0.3, 0.2, 0.0]], [[0.1, 0.2, 0.3, 0.4]]], dtype=F64)
    classes = [torch.tensor([0]), torch.tensor([1, 3]), torch.tensor([2])]
    assert active_specialists(general[0], classes).tolist() == [[True, False, False]]
    assert active_specialists(general[0], classes, top_n=2).tolist() == [[True, True, False]]
    # weighted mean: 0.1 * first + 0.9 * second ranks class 3 first
    assert active_specialists(general, classes, general_weights=torch.tensor([0.1, 0.9])).tolist() == [
        [False, True, False]]
    with pytest.raises(ValueError, match="top_n=5"):
        active_specialists(general, classes, top_n=5)


def break_general_sum(p):
    p["general_probs"][0, 3, 2] += 0.2


def break_general_nan(p):
    p["general_probs"][1, 2, 4] = float("nan")


def break_specialist_inf(p):
    i = int(p["active"][:, 2].nonzero()[0, 0])
    p["specialist_probs"][2][i, 1] = float("inf")


def break_specialist_negative(p):
    i = int(p["active"][:, 0].nonzero()[0, 0])
    p["specialist_probs"][0][i, 0] = -0.1
    p["specialist_probs"][0][i, 1] += 0.1


def break_class_range(p):
    p["specialist_classes"][1] = torch.tensor([0, 12, 3, 4, 5])


def break_class_duplicate(p):
    p["specialist_classes"][1] = torch.tensor([0, 4, 3, 4, 5])


def break_general_weight(p):
    p["general_weights"] = torch.tensor([1.0, -0.5])


def break_specialist_weight(p):
    p["specialist_weights"] = torch.tensor([1.0, 1.0, float("nan"), 1.0, 1.0])


def break_zero_weights(p):
    p["general_weights"] = torch.zeros(2)


def break_specialist_shape(p):
    p["specialist_probs"][3] = torch.full((12, 8), 1 / 8)


def break_active_shape(p):
    p["active"] = p["active"][:, :4]


def break_active_dtype(p):
    p["active"] = p["active"].long()


def break_general_shape(p):
    p["general_probs"] = p["general_probs"][0, 0]


def break_full_dustbin(p):
    p["specialist_classes"][0] = torch.arange(12)
    p["specialist_probs"][0] = torch.full((12, 13), 1 / 13, dtype=F64)


@pytest.mark.parametrize("breaker, message", [
    (break_general_sum, r"model 0, row 3 sums to 1\.2"),
    (break_general_nan, r"contains nan at model 1, row 2, class column 4"),
    (break_specialist_inf, r"specialist_probs\[2\] contains inf"),
    (break_specialist_negative, r"specialist_probs\[0\] contains -0\.1"),
    (break_class_range, r"specialist_classes\[1\] contains class 12, outside \[0, n_classes=12\)"),
    (break_class_duplicate, r"specialist_classes\[1\] lists class 4 2 times"),
    (break_general_weight, r"general_weights\[1\]=-0\.5"),
    (break_specialist_weight, r"specialist_weights\[2\]=nan"),
    (break_zero_weights, r"general_weights sum to 0"),
    (break_specialist_shape, r"specialist_probs\[3\] has shape \(12, 8\), expected \(N, k_m \+ 1\) = \(12, 7\)"),
    (break_active_shape, r"active has shape \(12, 4\), expected \(N, M\) = \(12, 5\)"),
    (break_active_dtype, r"active must be a bool tensor, got torch.int64"),
    (break_general_shape, r"general_probs must have shape \(N, C\) or \(G, N, C\), got \(12,\)"),
    (break_full_dustbin, r"specialist 0 covers all 12 classes.*dustbin probability is 0\.0769"),
])
@pytest.mark.parametrize("entry", ["solve", "objective", "solve_reference"])
def test_bad_inputs_raise_naming_the_value(breaker, message, entry):
    problem = random_problem(13)
    breaker(problem)
    call = {
        "solve": lambda: solve(**problem),
        "objective": lambda: objective(torch.full((12, 12), 1 / 12, dtype=F64), **problem),
        "solve_reference": lambda: solve_reference(**problem, steps=1, polish_steps=0),
    }[entry]
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_options_raise():
    problem = random_problem(14)
    with pytest.raises(ValueError, match="mean='harmonic'"):
        solve(**problem, mean="harmonic")
    with pytest.raises(ValueError, match=r"q has shape \(12, 11\)"):
        objective(torch.full((12, 11), 1 / 11, dtype=F64), **problem)
    rows = [torch.tensor([3, 1, 3])] + [torch.zeros(0, dtype=torch.long)] * 4
    probs = [torch.full((3, 4), 0.25, dtype=F64)] + [torch.zeros(0, k + 1, dtype=F64) for k in (5, 4, 6, 5)]
    with pytest.raises(ValueError, match=r"specialist_rows\[0\] lists example 3 more than once"):
        solve_rows(problem["general_probs"], probs, problem["specialist_classes"], rows)
    rows[0] = torch.tensor([3, 1, 12])
    with pytest.raises(ValueError, match=r"specialist_rows\[0\] contains example 12"):
        solve_rows(problem["general_probs"], probs, problem["specialist_classes"], rows)



def test_real_rows_that_did_not_converge_now_do():
    """Three Banking77 test examples (top_n=3, specialist weight 4, two active specialists each) on which
    the Newton iteration used to stop unconverged: W - sum(r) lost its digits to cancellation. Now no
    RuntimeWarning, and the objective is at the reference solver's optimum."""
    import warnings
    from pathlib import Path

    from specialists.combine import objective, solve_reference, solve_rows

    data = np.load(Path(__file__).parent / "data" / "combine_unconverged.npz")
    for j in range(3):
        general = torch.from_numpy(data[f"ex{j}_general"])[None]
        probs = [torch.from_numpy(data[f"ex{j}_probs{m}"])[None] for m in range(2)]
        classes = [torch.from_numpy(data[f"ex{j}_classes{m}"]).long() for m in range(2)]
        weights = torch.from_numpy(data[f"ex{j}_w"]).double()
        rows = [torch.zeros(1, dtype=torch.long)] * 2
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            q = solve_rows(general, probs, classes, rows, specialist_weights=weights)
        active = torch.ones(1, 2, dtype=torch.bool)
        reference = solve_reference(general, probs, classes, active, specialist_weights=weights)
        fast = objective(q, general, probs, classes, active, specialist_weights=weights)
        slow = objective(reference, general, probs, classes, active, specialist_weights=weights)
        assert float(fast) <= float(slow) + 1e-6
