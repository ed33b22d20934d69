"""Issue 11: the specialists' compute budget, and the hybrid of several full models with the specialists.

One local Ray instance serves the module (conftest.local_ray, 2 CPUs), and one tiny
run (`specialists.budget=0.5`, `combine.generalists=2`) most of the tests.
"""

import numpy as np
import pytest
import torch

import specialists
from conftest import tiny_config
from specialists.cli import main
from specialists.combine import active_specialists, solve, solve_rows
from specialists.config import ConfigError, load_config
from specialists.models import create_model, load_checkpoint
from specialists.report import format_results
from specialists.rundir import RunDir, RunDirError, read_json
from specialists.runtime import dataset_for_run
from specialists.dustbin import EnrichedSampler, dustbin_corrected
from specialists.specialist_data import budget_shares
from specialists.stages import fork_run, run_pipeline
from specialists.train import cross_entropy, train_model

BUDGET = 0.5


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray instance for the module


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "hybrid"
    run_pipeline(tiny_config(f"specialists.budget={BUDGET}", "combine.generalists=2"), out, log=lambda s: None,
                 progress=False)
    return RunDir(out)


@pytest.fixture(scope="module")
def data(hybrid_run):
    return dataset_for_run(hybrid_run)[1]


# ---------------------------------------------------------------------------
# the budget


def test_budget_is_honoured(hybrid_run):
    metrics = hybrid_run.read_metrics()
    cfg = load_config(hybrid_run.config)
    spent = metrics["specialists"]["examples_seen"]
    allowed = BUDGET * metrics["generalist"]["examples_seen"]
    assert 0 < spent <= allowed + metrics["specialists"]["count"] * cfg.train.batch_size
    assert metrics["specialists"]["budget_examples"] == round(allowed)
    # each specialist within its share, shares in proportion to the specialists' epochs
    _, dataset = dataset_for_run(hybrid_run)
    groups = [g["classes"] for g in read_json(hybrid_run.clusters)["groups"]]
    shares = budget_shares(groups, dataset.train.labels, cfg.specialists.special_fraction, round(allowed))
    for entry, share in zip(metrics["specialists"]["per_specialist"], shares):
        assert entry["examples_seen"] <= share
    assert sum(shares) <= round(allowed)


def test_budget_shares_follow_the_epochs():
    labels = np.repeat(np.arange(6), [10, 10, 10, 30, 30, 30])
    groups = [[0, 1], [3, 4]]
    sizes = [EnrichedSampler(labels, g, 0.5).epoch_size for g in groups]
    assert sizes == [40, 120]
    assert budget_shares(groups, labels, 0.5, 1000) == [250, 750]
    assert budget_shares(groups, labels, 0.5, 7) == [1, 5]  # rounded down, never 0 (0 would mean no cap)


def test_max_examples_caps_training_exactly(data):
    model = create_model("mlp", n_classes=40, input_shape=[16], hidden=[8], dropout=0.0)
    cfg = tiny_config("train.patience=0").train
    x = model.encode(data.train.inputs)
    cap = 3 * len(data.train) // 2  # one and a half epochs
    result = train_model(model, x, data.train.labels, model.encode(data.val.inputs), data.val.labels, cfg, seed=0,
                         loss_fn=cross_entropy, progress=False, max_examples=cap)
    assert result.examples_seen == cap and result.epochs_run == 2  # the second epoch cut short, then validated
    with pytest.raises(ValueError, match="max_examples=-1"):
        train_model(model, x, data.train.labels, x, data.train.labels, cfg, seed=0, progress=False, max_examples=-1)


# ---------------------------------------------------------------------------
# the hybrid


def _dense_outputs(model, inputs):
    """(G, N, C) full models' and per specialist (N, k+1) corrected probabilities, computed here from the models."""
    x = model.generalist.encode(inputs)
    batch = x.batch(np.arange(len(x)), "cpu")
    with torch.no_grad():
        full = torch.stack([torch.softmax(m(*batch).double(), 1) for m in model.full_models])
        special = [torch.softmax(dustbin_corrected(m(*batch).double(), model._correction(info)), 1)
                   for m, info in model.specialists]
    return full, special


def test_hybrid_with_one_full_model_is_todays_combination(hybrid_run, data):
    model = specialists.load(hybrid_run.root, device="cpu", generalists=1)
    assert len(model.full_models) == 1 and "generalist + 4 specialists" in model.mode
    inputs = data.test.inputs
    full, special = _dense_outputs(model, inputs)
    general = full[0]
    classes = [torch.tensor(info["classes"]) for _, info in model.specialists]
    active = active_specialists(general, classes, model.top_n)  # the generalist alone picks them
    rows = [torch.nonzero(active[:, m]).flatten() for m in range(len(classes))]
    weights = torch.full((len(classes),), model.specialist_weight, dtype=torch.float64)
    today = solve_rows(general, [p[r] for p, r in zip(special, rows)], classes, rows, specialist_weights=weights)
    assert np.array_equal(model.predict_proba(inputs, batch_size=len(inputs)), today.float().numpy())


def test_hybrid_of_two_equals_solve_with_both_full_models(hybrid_run, data):
    model = specialists.load(hybrid_run.root, device="cpu", generalists=2)
    assert "2 full models" in model.mode
    peer = load_checkpoint(hybrid_run.peers / "1")
    full, special = _dense_outputs(model, data.test.inputs)
    x = peer.encode(data.test.inputs)
    with torch.no_grad():
        assert torch.equal(full[1], torch.softmax(peer(*x.batch(np.arange(len(x)), "cpu")).double(), 1))
    classes = [torch.tensor(info["classes"]) for _, info in model.specialists]
    halves = torch.tensor([0.5, 0.5], dtype=torch.float64)  # the full models' terms together weigh 1
    active = active_specialists(full, classes, model.top_n, halves)
    expected = solve(full, special, classes, active, halves,
                     torch.full((len(classes),), model.specialist_weight, dtype=torch.float64))
    assert np.allclose(model.predict_proba(data.test.inputs), expected.numpy(), atol=1e-6)
    # and it is not the one-generalist combination
    one = specialists.load(hybrid_run.root, device="cpu", generalists=1).predict_proba(data.test.inputs)
    assert not np.allclose(one, expected.numpy(), atol=1e-3)


def test_load_with_two_generalists_predicts_like_evaluate(hybrid_run, data):
    hybrid = hybrid_run.read_metrics()["ensemble"]["hybrid"]
    model = specialists.load(hybrid_run.root, device="cpu", generalists=2)
    predicted = model.predict(data.test.inputs)
    names = np.array(model.classes, dtype=object)
    assert int((predicted != names[data.test.labels]).sum()) == hybrid["test_errors"]
    assert hybrid["test_accuracy"] == float((predicted == names[data.test.labels]).mean())
    assert hybrid["generalists"] == 2 and hybrid["mode"] == model.mode
    # `specialists evaluate` measures the same again, and load() without options takes the run's G=2
    assert main(["evaluate", str(hybrid_run.root)]) == 0
    assert hybrid_run.read_metrics()["ensemble"]["hybrid"] == hybrid
    assert np.array_equal(specialists.load(hybrid_run.root, device="cpu").predict(data.test.inputs), predicted)
    explained = model.explain(data.test.inputs[0], top=3)
    assert len(explained["full_models_top"]) == 3 and explained["mode"] == model.mode


def test_hybrid_is_in_the_results_table_and_the_peer_budget(hybrid_run):
    metrics = hybrid_run.read_metrics()
    table = format_results(metrics)
    assert "2 full models + specialists" in table and "generalist + specialists" in table
    peer = metrics["peer_ensemble"]
    member = read_json(hybrid_run.peers / "1" / "member.json")
    cfg = load_config(hybrid_run.config)
    assert member["epochs_allowed"] == cfg.train.epochs  # a full model: the generalist's whole schedule
    assert peer["budget_examples"] == (metrics["generalist"]["examples_seen"] + member["examples_seen"]
                                       + metrics["specialists"]["examples_seen"])
    assert metrics["ensemble"]["hybrid"]["examples_seen"] == peer["budget_examples"]
    assert peer["examples_seen"] <= peer["budget_examples"]


def test_fork_with_other_generalists_retrains_only_the_peers(hybrid_run, tmp_path):
    fork = fork_run(hybrid_run, tmp_path / "fork", ["combine.generalists=1"])
    assert (fork.specialists / "0" / "specialist.json").is_file() and not fork.peers.exists()
    fork = fork_run(hybrid_run, tmp_path / "fork2", ["combine.top_n=1"])
    assert (fork.peers / "1" / "member.json").is_file()


# ---------------------------------------------------------------------------
# refused settings


@pytest.mark.parametrize("overrides, message", [
    (["combine.generalists=0"], "combine.generalists=0"),
    (["combine.generalists=2", "peer.enabled=false"], "combine.generalists=2: needs peer.enabled=true"),
    (["combine.generalists=9"], "combine.generalists=9: must be <= peer.max_members=8"),
    (["specialists.budget=-0.5"], "specialists.budget=-0.5"),
    (["specialists.budget=lots"], "specialists.budget='lots': expected a number"),
])
def test_bad_settings_are_refused_naming_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, overrides)


def test_load_refuses_more_full_models_than_trained(hybrid_run):
    have = hybrid_run.read_metrics()["peer_ensemble"]["members"]  # the generalist and the finished peers
    with pytest.raises(RunDirError, match=f"generalists={have + 1}: .* has {have} full model"):
        specialists.load(hybrid_run.root, device="cpu", generalists=have + 1)
    with pytest.raises(ValueError, match="generalists=0"):
        specialists.load(hybrid_run.root, device="cpu", generalists=0)
