"""The loaded model with specialists: combination, API, evaluation metrics."""

import json

import numpy as np
import pytest

import specialists
from conftest import tiny_config
from specialists.config import load_config
from specialists.models import load_checkpoint
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run
from specialists.stages import run_pipeline
from specialists.train import predict_proba


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    run_pipeline(tiny_config(), out, log=lambda s: None, progress=False)
    return out


@pytest.fixture(scope="module")
def test_split(full_run):
    return dataset_for_run(RunDir(full_run))[1].test


def test_loads_every_specialist(full_run):
    model = specialists.load(full_run, device="cpu")
    clusters = json.loads((full_run / "clusters.json").read_text())
    assert [info["classes"] for _, info in model.specialists] == [g["classes"] for g in clusters["groups"]]
    assert "4 specialists" in repr(model)


def test_combined_probabilities_are_distributions(full_run, test_split):
    proba = specialists.load(full_run, device="cpu").predict_proba(test_split.inputs)
    assert proba.shape == (len(test_split), 40)
    assert np.all(proba >= 0) and np.allclose(proba.sum(1), 1, atol=1e-5)


def test_batched_equals_one_by_one(full_run, test_split):
    model = specialists.load(full_run, device="cpu")
    batched = model.predict_proba(test_split.inputs[:20], batch_size=7)
    single = np.concatenate([model.predict_proba(test_split.inputs[i:i + 1]) for i in range(20)])
    assert np.allclose(batched, single, atol=1e-6)


def test_specialists_change_the_answer_only_where_active(full_run, test_split):
    alone = specialists.load(full_run, device="cpu", use_specialists=False)
    combined = specialists.load(full_run, device="cpu")
    p_alone, p_combined = alone.predict_proba(test_split.inputs), combined.predict_proba(test_split.inputs)
    assert "generalist alone" in alone.mode
    assert not np.allclose(p_alone, p_combined)  # specialists do something
    # mass stays on the classes of the active specialist's group more than it leaves it
    top = p_alone.argmax(1)
    group_of = {c: m for m, (_, info) in enumerate(combined.specialists) for c in info["classes"]}
    same_group = np.array([group_of[a] == group_of[b] for a, b in zip(top, p_combined.argmax(1))])
    assert same_group.mean() > 0.95


def test_ensemble_no_worse_than_generalist(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())["ensemble"]
    assert metrics["test_accuracy"] >= metrics["generalist_test_accuracy"]
    assert sum(row["examples"] for row in metrics["by_covering"]) == 400
    assert metrics["test_errors"] == round((1 - metrics["test_accuracy"]) * 400)


def test_explain(full_run, test_split):
    model = specialists.load(full_run, device="cpu")
    info = specialists.load(full_run, device="cpu", top_n=1).explain(test_split.inputs[0], top=3)
    assert len(info["generalist_top"]) == 3 and len(info["combined_top"]) == 3
    assert len(info["active_specialists"]) == 1  # groups are disjoint and top_n=1
    top_class = info["generalist_top"][0][0]
    specialist = model.specialists[info["active_specialists"][0]["id"]][1]
    assert top_class in specialist["names"]
    combined = specialists.load(full_run, device="cpu", top_n=1).predict_proba(test_split.inputs[:1])[0]
    assert info["combined_top"][0][0] == model.classes[int(combined.argmax())]


def test_bad_options(full_run):
    with pytest.raises(ValueError, match="dustbin='sometimes'"):
        specialists.load(full_run, device="cpu", dustbin="sometimes")
    with pytest.raises(ValueError, match="specialist_weight=0"):
        specialists.load(full_run, device="cpu", specialist_weight=0)
    with pytest.raises(ValueError, match="top_n=0"):
        specialists.load(full_run, device="cpu", top_n=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        specialists.load(full_run, device="cpu").predict_proba(np.zeros((2, 16)), batch_size=0)


def test_load_defaults_to_the_runs_combine_config(full_run, test_split):
    saved = load_config(RunDir(full_run).config).combine
    model = specialists.load(full_run, device="cpu")
    assert (model.top_n, model.dustbin, model.specialist_weight) == (saved.top_n, saved.dustbin,
                                                                     saved.specialist_weight)
    assert f"specialist_weight={saved.specialist_weight:g}" in model.mode
    other = specialists.load(full_run, device="cpu", top_n=1, specialist_weight=1.0)
    assert (other.top_n, other.specialist_weight) == (1, 1.0)
    assert not np.allclose(model.predict_proba(test_split.inputs), other.predict_proba(test_split.inputs))


def test_specialist_weight_pulls_towards_the_specialist(full_run, test_split):
    """One active specialist: on its classes q = (p_g + w p_m) / (1 + w), the closed form of the objective."""
    x = test_split.inputs[:30]
    alone = specialists.load(full_run, device="cpu", use_specialists=False).predict_proba(x).astype(np.float64)
    for w in (1.0, 4.0):
        model = specialists.load(full_run, device="cpu", top_n=1, specialist_weight=w)
        q = model.predict_proba(x)
        for i in range(len(x)):
            info = model.explain(x[i], top=40)
            (active,) = info["active_specialists"]
            _, spec = model.specialists[active["id"]]
            p_m = dict(active["top"])
            for c, name in zip(spec["classes"], spec["names"]):
                assert q[i, c] == pytest.approx((alone[i, c] + w * p_m[name]) / (1 + w), abs=2e-5)


def test_peer_ensemble_spends_the_same_compute(full_run, test_split):
    run = RunDir(full_run)
    metrics = run.read_metrics()
    peer = metrics["peer_ensemble"]
    budget = metrics["generalist"]["examples_seen"] + metrics["specialists"]["examples_seen"]
    assert peer["budget_examples"] == budget
    assert peer["members"] >= 2 and peer["examples_seen"] <= budget
    members = [json.loads((run.peers / str(k) / "member.json").read_text()) for k in range(1, peer["members"])]
    assert peer["examples_seen"] == metrics["generalist"]["examples_seen"] + sum(m["examples_seen"] for m in members)
    assert len({m["seed"] for m in members} | {0}) == peer["members"]  # every member its own seed
    # its accuracy is that of the members' averaged probabilities
    folders = [run.generalist] + [run.peers / str(k) for k in range(1, peer["members"])]
    probs = [predict_proba(m, m.encode(test_split.inputs)) for m in (load_checkpoint(f) for f in folders)]
    correct = np.mean(probs, axis=0).argmax(1) == test_split.labels
    assert peer["test_accuracy"] == pytest.approx(correct.mean())
    assert peer["test_errors"] == int((~correct).sum())


def test_resume_keeps_finished_peers(full_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    run = RunDir(copy)
    before = run.read_metrics()["peer_ensemble"]
    stamp = (run.peers / "1" / "model.safetensors").stat().st_mtime_ns
    metrics = run.read_metrics()
    del metrics["peer_ensemble"]
    (run.metrics).write_text(json.dumps(metrics))
    run_pipeline(None, copy, resume=True, log=lambda s: None, progress=False)
    assert run.read_metrics()["peer_ensemble"] == before
    assert (run.peers / "1" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained


def test_peer_stage_can_be_disabled(tmp_path):
    out = tmp_path / "nopeer"
    run_pipeline(tiny_config("peer.enabled=false", "specialists.epochs=2"), out, log=lambda s: None, progress=False)
    assert "peer_ensemble" not in RunDir(out).read_metrics() and not RunDir(out).peers.exists()
