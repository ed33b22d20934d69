"""Specialists: dustbin heads, enriched sampling, the dustbin correction, and real runs on a local Ray.

One local Ray instance serves the module (conftest.local_ray, 2 CPUs); every run
is a real `run_pipeline` into tmp_path.
"""

import json
import math
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

from conftest import csv_overrides, tiny_config, write_csv
from jobs.procs import ray_processes_under
from specialists.config import ConfigError, RayConfig, load_config
from specialists.combine import combine_outputs
from specialists.ensemble import SpecialistsModel
from specialists.models import create_model, load_checkpoint, with_dustbin_head, with_fresh_weights
from specialists.parallel import ray_session, train_specialists
from specialists.rundir import RunDir, RunDirError
from specialists.runtime import dataset_for_run
from specialists.dustbin import EnrichedSampler, dustbin_correction, dustbin_corrected, specialist_soft_targets
from specialists.specialist import (conditional_accuracy, load_specialist, model_from_arrays, model_to_arrays,
                                    reads_generalist_weights, train_specialist)
from specialists.specialist_data import ShardStore, cut_generalist_outputs, plan_specialist, specialist_data
from specialists.stages import run_pipeline
from specialists.train import predict_logits

QUIET = dict(log=lambda s: None, progress=False)
ON = "specialists.enabled=true"  # explicit, whatever the shared tiny config says


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray instance for the module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_pipeline(tiny_config(ON), out, **QUIET)
    return out


def _files(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# pieces


def test_dustbin_head_starts_from_the_generalist_rows():
    torch.manual_seed(0)
    generalist = create_model("mlp", n_classes=12, input_shape=[6], hidden=[10, 7], dropout=0.0).eval()
    classes = [9, 2, 5]
    other = [c for c in range(12) if c not in classes]
    for widen in (1.0, 2.0):
        model = with_dustbin_head(generalist, classes, widen=widen).eval()
        assert model.head.out_features == 4
        if widen == 1.0:
            assert torch.equal(model.head.weight[:3], generalist.head.weight[classes])
            assert torch.equal(model.head.bias[:3], generalist.head.bias[classes])
            assert torch.allclose(model.head.weight[3], generalist.head.weight[other].mean(0))
            assert torch.allclose(model.head.bias[3], generalist.head.bias[other].mean() + math.log(9))
        else:
            assert model.spec["kwargs"]["hidden"] == [20, 14]
        x = torch.randn(5, 6)
        z, s = generalist(x), model(x)
        assert torch.allclose(s[:, :3], z[:, classes], atol=1e-5)  # the same function on its classes
        assert torch.allclose(s[:, 3], z[:, other].mean(1) + math.log(9), atol=1e-5)
    with pytest.raises(ValueError, match="dustbin needs"):
        with_dustbin_head(generalist, list(range(12)))


def test_a_scratch_specialist_keeps_only_the_input_encoding():
    torch.manual_seed(0)
    generalist = create_model("mlp", n_classes=12, input_shape=[6], hidden=[10], dropout=0.0)
    generalist.fit_normalizer(np.random.default_rng(0).normal(3.0, 2.0, (50, 6)).astype(np.float32))
    started = with_dustbin_head(generalist, [9, 2, 5])
    torch.manual_seed(7)
    fresh = with_fresh_weights(started)
    torch.manual_seed(7)
    drawn = create_model("mlp", **started.spec["kwargs"])  # what the network's own initialisation gives
    for name, value in fresh.state_dict().items():
        if name in dict(fresh.named_parameters()):
            assert torch.equal(value, drawn.state_dict()[name]), name  # the seed's weights...
            assert not torch.equal(value, started.state_dict()[name]), name  # ...not the generalist's
        else:
            assert torch.equal(value, started.state_dict()[name]), name  # the generalist's standardisation
    assert fresh.spec == started.spec


@pytest.mark.parametrize("fraction", [0.5, 0.25, 0.8])
def test_enriched_sampling_has_the_configured_ratio_and_redraws(fraction):
    labels = np.repeat(np.arange(20), 30)  # 600 examples, 20 classes
    classes = [3, 7, 11]
    sampler = EnrichedSampler(labels, classes, fraction)
    rng = np.random.default_rng(0)
    epochs = [sampler(e, rng) for e in range(1, 4)]
    for order in epochs:
        special = np.isin(labels[order], classes)
        assert len(np.unique(order)) == len(order)  # no example twice in an epoch
        assert special.sum() == 90  # every special example, every epoch
        assert abs(special.mean() - fraction) < 1 / len(order) + 1e-9
    others = [set(order[~np.isin(labels[order], classes)]) for order in epochs]
    assert others[0] != others[1] != others[2]  # the other classes are re-drawn each epoch
    assert sampler.natural_fraction == pytest.approx(90 / 600)


def test_sampling_caps_at_the_others_there_are():
    labels = np.repeat(np.arange(4), 10)
    sampler = EnrichedSampler(labels, [0, 1, 2], 0.25)  # wants 90 others, there are 10
    assert sampler.n_other == 10 and sampler.fraction == pytest.approx(0.75)


def test_dustbin_correction_is_the_log_odds_ratio():
    assert dustbin_correction(0.5, 0.25) == pytest.approx(math.log(3))
    assert dustbin_correction(0.5, 0.5) == pytest.approx(0.0)  # no enrichment, no correction
    assert dustbin_correction(0.8, 0.1) == pytest.approx(math.log(4) + math.log(9))
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.allclose(dustbin_corrected(logits, 0.7), torch.tensor([[1.0, 2.0, 1.2]]))
    with pytest.raises(ValueError, match="natural_fraction"):
        dustbin_correction(0.5, 0.0)


def test_soft_targets_collapse_then_soften_and_shift_the_prior():
    z = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    p = torch.softmax(z, 1)[0]
    collapsed = torch.tensor([p[2], p[0], p[1] + p[3]])  # classes [2, 0] + dustbin
    t = 2.0
    expected = torch.softmax(collapsed.log() / t, 0)
    assert torch.allclose(specialist_soft_targets(z, torch.tensor([2, 0]), t)[0], expected, atol=1e-6)
    shifted = specialist_soft_targets(z, torch.tensor([2, 0]), t, prior_shift=math.log(3))[0]
    # the dustbin's odds against each special class fall by exp(-b / T)
    assert (shifted[2] / shifted[0]) == pytest.approx(float(expected[2] / expected[0]) * 3 ** -0.5, rel=1e-5)


def test_conditional_accuracy_ignores_other_classes():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 1.0]])
    labels = np.array([4, 4, 7, 1])  # the last is outside classes [4, 7]
    assert conditional_accuracy(scores, labels, [4, 7]) == (pytest.approx(1 / 3), 3)


# ---------------------------------------------------------------------------
# runs


def test_specialists_beat_the_generalist_on_their_classes(tiny_run):
    run = RunDir(tiny_run)
    section = run.read_metrics()["specialists"]
    groups = json.loads(run.clusters.read_text())["groups"]
    assert section["count"] == len(groups) == 4 and section["trained"] == 4
    # measured: val 0.600 vs 0.583, test 0.648 vs 0.628 (40 classes, 27 training examples each)
    assert section["val_conditional_accuracy"] >= section["generalist_val_conditional_accuracy"]
    assert section["test_conditional_accuracy"] > section["generalist_test_conditional_accuracy"]
    per = section["per_specialist"]
    assert [e["id"] for e in per] == [0, 1, 2, 3]
    assert section["examples_seen"] == sum(e["examples_seen"] for e in per) > 0
    for e in per:
        assert e["val_examples"] == 30 and e["test_examples"] == 100  # 10 classes x 3 val / 10 test each
        assert 0 < e["val_conditional_accuracy"] <= 1 and 0 < e["generalist_val_conditional_accuracy"] <= 1


def test_run_directory_holds_what_a_combiner_needs(tiny_run):
    run = RunDir(tiny_run)
    _, dataset = dataset_for_run(run)
    groups = json.loads(run.clusters.read_text())["groups"]
    for m, group in enumerate(groups):
        folder = tiny_run / "specialists" / str(m)
        assert {p.name for p in folder.iterdir()} == {"model.safetensors", "model.json", "history.json",
                                                       "specialist.json"}
        model, info = load_specialist(folder)
        assert info["classes"] == group["classes"] and info["names"] == group["names"]
        assert info["dustbin"] == len(group["classes"]) and info["dustbin_correction_applied"] is False
        assert info["dustbin_correction"] == pytest.approx(dustbin_correction(0.5, info["natural_fraction"]))
        assert info["special_fraction"] == pytest.approx(0.5, abs=0.01)
        share = info["metrics"]["active_special_share_top1"]  # where the generalist's top-1 is one of its classes
        assert info["dustbin_correction_active_top1"] == pytest.approx(dustbin_correction(0.5, share))
        history = json.loads((folder / "history.json").read_text())
        assert len(history) == info["metrics"]["epochs_run"] and {"loss", "hard_loss", "soft_loss"} <= set(history[0])
        # the saved weights reproduce the saved metric
        inside = np.isin(dataset.val.labels, group["classes"])
        logits = predict_logits(model, model.encode(dataset.val.inputs[inside]))
        acc, _ = conditional_accuracy(logits[:, :-1], dataset.val.labels[inside], group["classes"])
        assert acc == pytest.approx(info["metrics"]["val_conditional_accuracy"])
    assert not list(tiny_run.rglob("*.tmp"))


def test_the_correction_calibrates_a_confusable_dustbin(tiny_run, tmp_path):
    # A group that cuts across the planted groups, so the dustbin is confusable with its classes:
    # trained on half special examples (natural share 1/4), the raw dustbin probability is too low;
    # corrected by b = log 3 it matches the true share of other classes.
    run = RunDir(tiny_run)
    cfg, dataset = dataset_for_run(run)
    generalist = load_checkpoint(run.generalist)
    cfg = tiny_config("specialists.patience=0")
    plan = plan_specialist(0, [0, 3, 5, 8, 13, 21, 22, 30, 34, 39], dataset, cfg)
    store = ShardStore(tmp_path)
    val_top1 = cut_generalist_outputs(generalist, dataset, [plan], store, cfg.train.eval_batch_size, "cpu")
    result = train_specialist(generalist, specialist_data(plan, dataset, store, val_top1), dataset.val, cfg)
    m = result.metrics
    assert m["dustbin_correction"] == pytest.approx(math.log(3))
    raw_error = abs(m["val_dustbin_prob_raw"] - m["val_dustbin_share"])
    corrected_error = abs(m["val_dustbin_prob_corrected"] - m["val_dustbin_share"])
    assert corrected_error < 0.05 and corrected_error < raw_error / 2


def test_a_scratch_specialist_reads_only_its_generalists_spec_and_buffers(tiny_run, tmp_path):
    run = RunDir(tiny_run)
    _, dataset = dataset_for_run(run)
    generalist = load_checkpoint(run.generalist)
    cfg = tiny_config("specialists.init=scratch", "specialists.epochs=1")
    assert not reads_generalist_weights(cfg.specialists)
    assert reads_generalist_weights(tiny_config("specialists.init=generalist").specialists)
    assert reads_generalist_weights(tiny_config("specialists.init=scratch", "specialists.widen=2").specialists)
    classes = [0, 3, 5, 8]
    # its start: the network a dustbin head on the generalist would have, drawn afresh from its seed
    starts = []
    for build in (lambda: with_fresh_weights(with_dustbin_head(generalist, classes)),
                  lambda: with_fresh_weights(generalist, n_classes=len(classes) + 1)):
        torch.manual_seed(7)
        starts.append(build().state_dict())
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0]) and starts[0].keys() == starts[1].keys()
    # so the generalist is sent to its worker without its weights, and it trains the same specialist
    spec, state = model_to_arrays(generalist, parameters=False)
    assert state and all(name.startswith("input_") for name in state)  # the input standardisation alone
    sent = model_from_arrays(spec, state)
    plan = plan_specialist(2, classes, dataset, cfg)
    store = ShardStore(tmp_path)
    val_top1 = cut_generalist_outputs(generalist, dataset, [plan], store, 256, "cpu")
    data = specialist_data(plan, dataset, store, val_top1)
    trained = [train_specialist(g, data, dataset.val, cfg).model.state_dict() for g in (generalist, sent)]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    with pytest.raises(ValueError, match="all of its buffers"):
        model_from_arrays(spec, {})


def _train_one(tiny_run, tmp_path, cfg, m: int, classes: list[int]):
    """Specialist m of `classes`, trained here with `cfg` from the tiny run's generalist: (generalist, plan, weights)."""
    run = RunDir(tiny_run)
    _, dataset = dataset_for_run(run)
    generalist = load_checkpoint(run.generalist)
    plan = plan_specialist(m, classes, dataset, cfg)
    store = ShardStore(tmp_path)
    val_top1 = cut_generalist_outputs(generalist, dataset, [plan], store, 256, "cpu")
    trained = train_specialist(generalist, specialist_data(plan, dataset, store, val_top1), dataset.val, cfg)
    return generalist, plan, trained.model.state_dict()


@pytest.mark.parametrize("init", ["generalist", "scratch"])
def test_a_specialist_starts_from_the_generalist_or_from_its_own_seed(tiny_run, tmp_path, init):
    cfg = tiny_config(f"specialists.init={init}", "specialists.lr=1e-12", "specialists.epochs=1")  # barely moves
    classes = [0, 3, 5, 8]
    generalist, plan, trained = _train_one(tiny_run, tmp_path, cfg, 2, classes)
    from_generalist = with_dustbin_head(generalist, classes).state_dict()
    torch.manual_seed(plan.seed)  # what the network's own initialisation draws from the specialist's seed
    drawn = create_model(generalist.spec["name"], **{**generalist.spec["kwargs"], "n_classes": 5}).state_dict()
    for name, value in trained.items():
        if name.startswith("input_"):  # the input standardisation is the generalist's either way
            assert torch.equal(value, from_generalist[name])
            continue
        assert torch.allclose(value, (from_generalist if init == "generalist" else drawn)[name], atol=1e-6), name
        assert not torch.allclose(value, (drawn if init == "generalist" else from_generalist)[name]), name


def test_a_specialist_with_frozen_layers_keeps_its_generalists_weights_there(tiny_run, tmp_path):
    cfg = tiny_config("specialists.init=generalist", "specialists.freeze=[body]", "specialists.epochs=2")
    classes = [0, 3, 5, 8]
    generalist, _, trained = _train_one(tiny_run, tmp_path, cfg, 1, classes)
    start = with_dustbin_head(generalist, classes).state_dict()
    assert {name for name in trained if name.startswith("body.")}  # the test freezes something
    for name, value in trained.items():
        if name.startswith("body.") or name.startswith("input_"):
            assert torch.equal(value, start[name]), name
        else:
            assert not torch.allclose(value, start[name]), name  # the head trained


def test_freezing_what_the_model_lacks_is_refused_before_any_work(tiny_run, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"specialists.freeze=\['encoder'\]: 'encoder' names no parameter of the "
                                          r"mlp model; its parameters are under \['body', 'head'\]"):
        run_pipeline(tiny_config(ON, "specialists.freeze=[encoder]"), out, **QUIET)
    assert not out.exists()  # refused before the generalist trained
    run = _copy_run(tiny_run, tmp_path)  # a generalist you bring is checked at the specialists stage
    shutil.rmtree(run.specialists)
    _, dataset = dataset_for_run(run)
    with pytest.raises(ConfigError, match="'encoder' names no parameter"):
        train_specialists(tiny_config("specialists.freeze=[encoder]"), dataset, run, torch.device("cpu"), **QUIET)
    assert not run.specialists.exists()


def test_specialists_that_hash_character_grams_are_served_their_own_encoding(tmp_path):
    # Six intents of distinct words; two clusters of three; scratch specialists hashing 1..3-character grams.
    rng = np.random.default_rng(0)
    words = {f"intent{c}": [f"w{c}x{i}" for i in range(6)] for c in range(6)}

    def rows(n):
        return [[" ".join(rng.choice(ws, size=5)), label] for label, ws in words.items() for _ in range(n)]

    train, test = write_csv(tmp_path / "train.csv", rows(20)), write_csv(tmp_path / "test.csv", rows(5))
    cfg = load_config(None, [*csv_overrides(train, test), "data.val_fraction=0.2", "cluster.n_clusters=2", ON,
                             "peer.enabled=false", "specialists.init=scratch", "specialists.char_ngrams=3",
                             "specialists.budget=0", "specialists.epochs=3", "specialists.embed_dim=8",
                             "specialists.buckets=1024"])
    run = run_pipeline(cfg, tmp_path / "run", **QUIET)
    model = SpecialistsModel(run.root, "cpu", use_specialists=True)
    texts = [r[0] for r in rows(2)]
    rows_all = np.arange(len(texts))
    full, special = model.outputs(texts)
    assert model.generalist.char_ngrams == 0 and len(special) == 2
    for (net, info), probs, correction in zip(model.specialists, special, model.dustbin_corrections()):
        assert net.char_ngrams == 3 and net.embedding.embedding_dim == 8 < model.generalist.embedding.embedding_dim
        assert net.embedding.num_embeddings == net.buckets == 1024 < model.generalist.buckets
        with torch.no_grad():
            own = net(*net.encode(texts).batch(rows_all, torch.device("cpu")))
        own_probs = torch.softmax(dustbin_corrected(own.double(), correction), 1).float().numpy()
        assert np.allclose(probs, own_probs, atol=1e-6)
        general_ids, _ = model.generalist.encode(texts).batch(rows_all, torch.device("cpu"))
        assert int(general_ids.max()) >= net.buckets  # the generalist's encoding would not even index its table
    classes = [torch.tensor(info["classes"]) for _, info in model.specialists]
    expected = combine_outputs(torch.from_numpy(full).double(), [torch.from_numpy(p).double() for p in special],
                               classes, model.top_n, model.specialist_weight).numpy()
    assert np.allclose(model.predict_proba(texts), expected, atol=1e-5)  # its export: tests/test_serve.py


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds Ray's worker processes through /proc")
def test_a_killed_worker_is_retried_and_the_run_completes(tmp_path):
    # Long enough specialists that one is still training when its worker process is SIGKILLed.
    cfg = tiny_config(ON, "specialists.epochs=150", "specialists.patience=0", "specialists.budget=0", "ray.max_retries=2")
    killed = []

    def kill_first_specialist_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = ray_processes_under(os.getpid(), "ray::train_specialist_task")
            if running:
                time.sleep(1.0)  # let it get into training
                if running[0] in ray_processes_under(os.getpid(), "ray::train_specialist_task"):
                    os.kill(running[0], signal.SIGKILL)
                    killed.append(running[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_specialist_worker, daemon=True)
    killer.start()
    run = run_pipeline(cfg, tmp_path / "run", **QUIET)
    killer.join(timeout=5)
    assert killed, "no specialist worker was seen running"
    section = run.read_metrics()["specialists"]
    assert section["count"] == 4 and [e["id"] for e in section["per_specialist"]] == [0, 1, 2, 3]
    pids = []
    for m in range(4):
        info = json.loads((run.specialists / str(m) / "specialist.json").read_text())
        assert info["metrics"]["epochs_run"] == 150
        pids.append(info["worker"]["pid"])
    assert killed[0] not in pids  # the killed attempt left nothing; its retry did the work


def test_resume_trains_only_the_missing_specialist(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    run = RunDir(out)
    original = (out / "specialists" / "2" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "specialists" / "2")
    metrics = run.read_metrics()
    metrics["specialists"]["per_specialist"] = [e for e in metrics["specialists"]["per_specialist"] if e["id"] != 2]
    (out / "metrics.json").write_text(json.dumps(metrics))
    kept = {m: _files(out / "specialists" / str(m)) for m in (0, 1, 3)}
    generalist = _files(out / "generalist")
    lines = []
    run_pipeline(None, out, resume=True, log=lines.append, progress=False)
    assert any("3 of 4 already trained, training 1" in line for line in lines)
    assert any(line.startswith("specialist 2:") for line in lines)
    assert not any(line.startswith(("specialist 0:", "specialist 1:", "specialist 3:")) for line in lines)
    for m in (0, 1, 3):
        assert _files(out / "specialists" / str(m)) == kept[m]  # untouched: same bytes, same mtimes
    assert _files(out / "generalist") == generalist
    assert (out / "specialists" / "2" / "model.safetensors").read_bytes() == original  # seeded: the same weights
    section = run.read_metrics()["specialists"]
    assert section["count"] == 4 and section["trained"] == 1
    assert [e["id"] for e in section["per_specialist"]] == [0, 1, 2, 3]
    # a second resume has nothing to do
    lines.clear()
    run_pipeline(None, out, resume=True, log=lines.append, progress=False)
    assert "specialists: already trained, skipped" in lines


def test_damaged_specialists_are_retrained_at_resume(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    run = RunDir(out)
    cfg, dataset = dataset_for_run(run)
    original = {m: (out / "specialists" / str(m) / "model.safetensors").read_bytes() for m in range(4)}
    weights = {m: out / "specialists" / str(m) / "model.safetensors" for m in range(4)}
    flipped = bytearray(original[0])
    flipped[-3] ^= 0xFF  # still a loadable safetensors file: only its hash tells
    weights[0].write_bytes(bytes(flipped))
    weights[1].write_bytes(original[1][:len(original[1]) // 2])  # truncated
    weights[2].unlink()
    (out / "specialists" / "3" / "history.json").write_text("[{")
    lines = []
    section = train_specialists(cfg, dataset, run, torch.device("cpu"), log=lines.append, progress=False)
    assert section["trained"] == 4 and section["count"] == 4  # none trusted (intact ones are: the test above)
    assert sorted(line.split(":")[0] for line in lines if line.startswith("specialist ")) == [
        f"specialist {m}" for m in range(4)]
    for m in range(4):  # seeded: retrained to the very same weights
        assert weights[m].read_bytes() == original[m]
        json.loads((out / "specialists" / str(m) / "history.json").read_text())


# ---------------------------------------------------------------------------
# bad input: a clear error within seconds


def _copy_run(tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return RunDir(out)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(n_classes=50), "n_classes=50 but the generalist has 40 classes"),
    (lambda c: c["groups"][1]["classes"].__setitem__(0, 45), "group 1 lists class 45"),
    (lambda c: c["groups"][0]["names"].reverse(), "group 0 names its classes"),
    (lambda c: c.update(groups=[]), "no groups"),
], ids=["n_classes", "class out of range", "names", "no groups"])
def test_clusters_not_matching_the_generalist_are_rejected(tiny_run, tmp_path, edit, message):
    run = _copy_run(tiny_run, tmp_path)
    clusters = json.loads(run.clusters.read_text())
    edit(clusters)
    run.clusters.write_text(json.dumps(clusters))
    shutil.rmtree(run.specialists)
    started = time.monotonic()
    with pytest.raises(RunDirError, match=message):
        run_pipeline(None, run.root, resume=True, **QUIET)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("override, message", [
    ("ray.cpus_per_task=64", "ray.cpus_per_task=64 but the largest node"),
    pytest.param("ray.gpus_per_task=1", "ray.gpus_per_task=1 but the largest node",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
], ids=["cpus", "gpus"])
def test_more_resources_than_any_node_has_fail_fast(tiny_run, tmp_path, override, message):
    run = _copy_run(tiny_run, tmp_path)
    shutil.rmtree(run.specialists)
    _, dataset = dataset_for_run(run)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        train_specialists(tiny_config(override), dataset, run, torch.device("cpu"), **QUIET)
    assert time.monotonic() - started < 10
    assert not run.specialists.exists()  # failed before any work


def test_the_running_instance_is_reused_and_left_running():
    with ray_session(RayConfig(), log=lambda s: None) as resources:
        assert resources["cpus"] == 2
    assert ray.is_initialized()
