"""The loaded model with specialists: combination, API, evaluation metrics."""

import json

import numpy as np
import pytest

import specialists
from conftest import tiny_config
from specialists.pipeline import dataset_for_run, run_pipeline
from specialists.rundir import RunDir


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
    info = model.explain(test_split.inputs[0], top=3)
    assert len(info["generalist_top"]) == 3 and len(info["combined_top"]) == 3
    assert len(info["active_specialists"]) == 1  # groups are disjoint and top_n=1
    top_class = info["generalist_top"][0][0]
    specialist = model.specialists[info["active_specialists"][0]["id"]][1]
    assert top_class in specialist["names"]
    combined = model.predict_proba(test_split.inputs[:1])[0]
    assert info["combined_top"][0][0] == model.classes[int(combined.argmax())]


def test_bad_options(full_run):
    with pytest.raises(ValueError, match="dustbin='sometimes'"):
        specialists.load(full_run, device="cpu", dustbin="sometimes")
    with pytest.raises(ValueError, match="top_n=0"):
        specialists.load(full_run, device="cpu", top_n=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        specialists.load(full_run, device="cpu").predict_proba(np.zeros((2, 16)), batch_size=0)
