"""`specialists run` end to end: the run directory, its stages, resume and fork, the commands."""

import json
import pickle
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

import specialists
from conftest import csv_overrides, tiny_config
from specialists.cli import main
from specialists.combination_choice import candidate_settings
from specialists.config import ConfigError, load_config
from specialists.export import export_run
from specialists.models import CheckpointError, load_checkpoint
from specialists.rundir import RunDir, RunDirError, read_json
from specialists.runtime import dataset_for_run
from specialists.stages import fork_run, run_pipeline


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "synthetic"
    run_pipeline(tiny_config("specialists.enabled=false"), out, log=lambda s: None, progress=False)
    return out


def test_run_directory_contract(synthetic_run):
    assert (synthetic_run / "config.yaml").is_file()
    assert json.loads((synthetic_run / "classes.json").read_text())[:2] == ["c00", "c01"]
    assert (synthetic_run / "generalist" / "model.safetensors").is_file()
    metrics = json.loads((synthetic_run / "metrics.json").read_text())
    assert {"val_accuracy", "test_accuracy"} <= set(metrics["generalist"])
    assert {"data", "generalist", "total"} <= set(metrics["timings"])
    assert load_config(synthetic_run / "config.yaml") == tiny_config("specialists.enabled=false")
    assert not list(synthetic_run.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_generalist_beats_chance_widely(synthetic_run):
    metrics = json.loads((synthetic_run / "metrics.json").read_text())["generalist"]
    assert metrics["test_accuracy"] > 0.5 > 10 * (1 / 40)  # chance is 2.5%


def test_same_seed_same_result(synthetic_run, tmp_path):
    run_pipeline(tiny_config("specialists.enabled=false"), tmp_path / "again", log=lambda s: None, progress=False)
    first = json.loads((synthetic_run / "metrics.json").read_text())
    second = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert _without_seconds(first["generalist"]) == _without_seconds(second["generalist"])
    assert (synthetic_run / "generalist" / "model.safetensors").read_bytes() == \
        (tmp_path / "again" / "generalist" / "model.safetensors").read_bytes()


def test_api_predicts_arrays(synthetic_run):
    model = specialists.load(synthetic_run, device="cpu")
    _, ds = dataset_for_run(RunDir(synthetic_run))
    proba = model.predict_proba(ds.test.inputs[:50])
    assert proba.shape == (50, 40) and np.allclose(proba.sum(1), 1, atol=1e-5)
    names = model.predict(ds.test.inputs[:50])
    assert list(names) == [model.classes[i] for i in proba.argmax(1)]
    one_by_one = np.concatenate([model.predict_proba(ds.test.inputs[i:i + 1]) for i in range(5)])
    assert np.allclose(one_by_one, proba[:5], atol=1e-6)
    with pytest.raises(ValueError, match="expects"):
        model.predict_proba(np.zeros((3, 7)))
    with pytest.raises(TypeError, match="not texts"):
        model.predict_proba(["a text"])
    with pytest.raises(ValueError, match="NaN"):
        model.predict_proba(np.full((2, 16), np.nan))


def test_cli_on_a_users_csv(csv_pair, tmp_path, capsys):
    out = tmp_path / "csvrun"
    assert main(["run", "--quiet", "--out", str(out), *csv_overrides(*csv_pair)]) == 0
    printed = capsys.readouterr().out
    assert "generalist.test_accuracy" in printed and str(out) in printed
    model = specialists.load(out, device="cpu")
    assert model.classes == ["card_lost", "exchange", "top_up"]
    assert list(model.predict(["my card was stolen from my wallet", "what is the euro dollar rate"])) == \
        ["card_lost", "exchange"]
    with pytest.raises(TypeError, match="list of texts"):
        model.predict_proba("one string")


@pytest.mark.parametrize("override, expect", [
    ("train.epochs=-2", "train.epochs=-2"),
    ("data.train=missing.csv", "does not exist"),
    ("data.label_column=nope", "no column 'nope'"),
    ("model.name=mlp", "reads arrays, but the data are texts"),
])
def test_bad_input_leaves_no_run_directory(csv_pair, tmp_path, capsys, override, expect):
    out = tmp_path / "never"
    assert main(["run", "--quiet", "--out", str(out), *csv_overrides(*csv_pair), override]) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_mix_into_a_used_directory(synthetic_run):
    with pytest.raises(RunDirError, match="already holds files"):
        run_pipeline(tiny_config("specialists.enabled=false"), synthetic_run, log=lambda s: None, progress=False)


def test_corrupt_and_mismatched_checkpoints(synthetic_run, tmp_path):
    import shutil
    folder = tmp_path / "ckpt"
    shutil.copytree(synthetic_run / "generalist", folder)
    assert load_checkpoint(folder).head.out_features == 40

    spec = json.loads((folder / "model.json").read_text())
    spec["kwargs"]["hidden"] = [64]
    (folder / "model.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(folder)

    shutil.copy(synthetic_run / "generalist" / "model.json", folder / "model.json")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(folder)

    class Boom:  # a pickle that would run code if anything unpickled it
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (folder / "model.safetensors").write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------
# a small full run with its numbers pinned, and forks of it

# 12 classes in 3 planted groups, 2 epochs: the generalist, 2 specialists on a local Ray, 3 peers;
# specialists.budget=0: the specialists' schedule the numbers were recorded with (epochs, no budget)
PINNED = [
    "data.kind=synthetic", "data.synthetic.n_classes=12", "data.synthetic.n_groups=3",
    "data.synthetic.n_features=8", "data.synthetic.subspace_dim=3", "data.synthetic.train_per_class=20",
    "data.synthetic.test_per_class=10", "data.synthetic.class_spread=1.0",
    "model.name=mlp", "model.hidden=[16]", "model.dropout=0.0",
    "train.epochs=2", "train.batch_size=32", "train.lr=0.01", "threads=1",
    "cluster.classes_per_cluster=4", "specialists.epochs=2", "specialists.budget=0", "peer.max_members=3",
    "ray.num_cpus=2", "combine.choose=false",
]
# Recorded from a run of PINNED with the code before issue 10's restructuring (pipeline.py, commit d4ff1e0):
# what the stages compute must not change when the code that runs them moves.
PINNED_GROUPS = [[0, 2, 3, 4, 5, 8, 10], [1, 6, 7, 11]]
PINNED_METRICS = {
    "generalist": {"val_accuracy": 8 / 24, "test_accuracy": 37 / 120, "test_errors": 83, "best_epoch": 2,
                   "epochs_run": 2, "examples_seen": 432, "parameters": 348},
    "cluster": {"groups": 2, "min_size": 4, "max_size": 7, "uncovered": 1, "val_errors_inside_clusters": 13 / 16,
                "planted_adjusted_rand": 0.5045045045045045},
    "specialists": {"count": 2, "trained": 2, "examples_seen": 720, "val_conditional_accuracy": 8 / 22,
                    "generalist_val_conditional_accuracy": 7 / 22, "test_conditional_accuracy": 37 / 110,
                    "generalist_test_conditional_accuracy": 33 / 110, "improved_on_val": 1},
    "peer_ensemble": {"members": 3, "budget_examples": 1152, "examples_seen": 1080, "val_accuracy": 6 / 24,
                      "val_errors": 18, "test_accuracy": 29 / 120, "test_errors": 91,
                      "member_test_accuracies": [37 / 120, 28 / 120, 26 / 120]},
    "ensemble": {
        "mode": "generalist + 2 specialists (top_n=3, dustbin=active, specialist_weight=4)",
        "test_accuracy": 39 / 120, "generalist_test_accuracy": 37 / 120, "test_errors": 81,
        "generalist_test_errors": 83, "error_reduction": 2 / 83, "relative_accuracy_gain": 0.054054054054053946,
        "conditional_accuracy": 39 / 110, "generalist_conditional_accuracy": 33 / 110, "covered_test_examples": 110,
        "by_covering": [
            {"specialists_covering": 0, "examples": 10, "generalist_correct": 7, "change_in_correct": -7,
             "relative_gain": -1.0},
            {"specialists_covering": 1, "examples": 110, "generalist_correct": 30, "change_in_correct": 9,
             "relative_gain": 0.3},
        ],
    },
}
QUIET = dict(log=lambda s: None, progress=False)


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pinned"
    run_pipeline(load_config(None, PINNED), out, **QUIET)
    return RunDir(out)


def _files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_seconds(section: dict) -> dict:
    return {k: v for k, v in section.items() if "seconds" not in k}


def test_pinned_run_gives_the_recorded_metrics(pinned_run):
    metrics = pinned_run.read_metrics()
    for section, expected in PINNED_METRICS.items():
        assert {k: metrics[section][k] for k in expected} == expected, section
    assert [g["classes"] for g in read_json(pinned_run.clusters)["groups"]] == PINNED_GROUPS


def test_fork_for_another_combination_keeps_every_stage(pinned_run, tmp_path):
    fork = fork_run(pinned_run.root, tmp_path / "top1", ["combine.top_n=1"])
    for folder in ("generalist", "specialists", "peers"):
        assert _files(fork.root / folder) == _files(pinned_run.root / folder)
    assert fork.clusters.read_bytes() == pinned_run.clusters.read_bytes()
    assert "ensemble" not in fork.read_metrics()  # the evaluation is what the fork is for
    lines = []
    run_pipeline(None, fork.root, resume=True, log=lines.append, progress=False)
    assert {"generalist: already trained, skipped", "cluster: already done, skipped",
            "specialists: already trained, skipped", "peer ensemble: already trained, skipped"} <= set(lines)
    base, forked = pinned_run.read_metrics(), fork.read_metrics()
    for section in ("generalist", "cluster", "specialists", "peer_ensemble"):
        assert forked[section] == base[section]
    assert "top_n=1" in forked["ensemble"]["mode"]
    assert forked["ensemble"]["generalist_test_errors"] == base["ensemble"]["generalist_test_errors"]


def test_fork_reruns_from_the_first_stage_its_overrides_change(pinned_run, tmp_path):
    overrides = ["cluster.classes_per_cluster=6", "specialists.enabled=false", "peer.enabled=false"]
    fork = fork_run(pinned_run.root, tmp_path / "fork", overrides)
    assert _files(fork.generalist) == _files(pinned_run.generalist)
    assert not fork.clusters.exists() and not fork.specialists.exists() and not fork.peers.exists()
    assert set(fork.read_metrics()) == {"data", "generalist", "timings"}
    assert load_config(fork.config) == load_config(None, [*PINNED, *overrides])
    lines = []
    run_pipeline(None, fork.root, resume=True, log=lines.append, progress=False)
    assert "generalist: already trained, skipped" in lines

    fresh = run_pipeline(load_config(None, [*PINNED, *overrides]), tmp_path / "fresh", **QUIET)
    assert read_json(fork.clusters)["groups"] == read_json(fresh.clusters)["groups"]
    forked, scratch = fork.read_metrics(), fresh.read_metrics()
    for section in ("generalist", "cluster", "ensemble"):
        assert _without_seconds(forked[section]) == _without_seconds(scratch[section])


def test_fork_refuses_a_used_directory_and_bad_overrides(pinned_run, tmp_path):
    with pytest.raises(RunDirError, match="already holds files"):
        fork_run(pinned_run.root, pinned_run.root, ["combine.top_n=1"])
    with pytest.raises(ConfigError, match="no_such_key"):
        fork_run(pinned_run.root, tmp_path / "bad", ["cluster.no_such_key=1"])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(RunDirError, match="has no config.yaml"):
        fork_run(tmp_path, tmp_path / "other")


def test_report_and_distill_commands_do_not_import_ray(pinned_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(pinned_run.root, run)
    (run / "report" / "index.html").unlink()
    code = textwrap.dedent(f"""
        import sys
        from specialists.cli import main
        assert main(["report", {str(run)!r}]) == 0
        assert main(["distill", "no_such_section.key=1"]) == 2  # parsed, its module imported, then refused
        print(sorted(name for name in sys.modules if name == "ray" or name.startswith("ray.")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (run / "report" / "index.html").is_file()
    assert "no_such_section" in done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc's mallopt: elsewhere set_malloc_thresholds is a no-op")
def test_a_freed_large_block_goes_back_to_the_os():
    """Every command calls set_malloc_thresholds, so one stage's large temporaries do not stay resident
    through the next. Without it glibc, having freed a 16 MiB block, serves 8 MiB from its heap and keeps it."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        from specialists.runtime import set_malloc_thresholds
        set_malloc_thresholds()
        big = np.ones(16 << 20, np.uint8)
        del big  # glibc raises its mapping threshold past the next block's size
        block = np.ones(8 << 20, np.uint8)  # touched: resident
        keep = [np.ones(1024, np.uint8) for _ in range(64)]  # blocks after it: the heap top cannot be trimmed
        before = rss()
        del block
        print((before - rss()) / 2**20)
    """)
    returned = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    assert returned >= 7.5  # MiB given back when the block is freed


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc's mallopt: elsewhere set_malloc_thresholds is a no-op")
def test_freed_small_blocks_stay_mapped_for_the_next_training_step():
    """Below LARGE_ALLOCATION, freed blocks at the top of the heap are kept for reuse: a training step's
    temporaries are not given back and faulted in again every step."""
    script = textwrap.dedent("""
        import os
        import numpy as np
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        from specialists.runtime import set_malloc_thresholds
        set_malloc_thresholds()
        blocks = [np.ones(1 << 20, np.uint8) for _ in range(3)]  # 3 MiB at the top of the heap, touched
        before = rss()
        del blocks
        print((before - rss()) / 2**20)
    """)
    returned = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    assert returned < 0.5  # MiB given back: none (glibc's fixed default would trim the 3 MiB)


def test_the_run_counts_validation_errors_and_warns_when_its_specialists_do_not_help(pinned_run, tmp_path):
    """metrics.json's ensemble holds the combination's and the generalist's validation errors, and the run
    warns, naming specialists.init, when its specialists make validation worse."""
    _, dataset = dataset_for_run(pinned_run)
    model = specialists.load(pinned_run.root, device="cpu")
    ensemble = pinned_run.read_metrics()["ensemble"]
    combined = model.predict_proba(dataset.val.inputs).argmax(1)
    assert ensemble["val_errors"] == int((combined != dataset.val.labels).sum())
    with torch.no_grad():
        rows = np.arange(len(dataset.val))
        logits = model.generalist(*model.generalist.encode(dataset.val.inputs).batch(rows, torch.device("cpu")))
    assert ensemble["generalist_val_errors"] == int((logits.argmax(1).numpy() != dataset.val.labels).sum())
    # specialists trusted 1,000 times over the generalist after one step at a learning rate that wrecks them
    lines = []
    fork = fork_run(pinned_run.root, tmp_path / "wrecked", ["specialists.lr=50", "specialists.epochs=1",
                                                            "combine.specialist_weight=1000"])
    run_pipeline(None, fork.root, resume=True, log=lines.append, progress=False)
    wrecked = fork.read_metrics()["ensemble"]
    assert wrecked["val_errors"] > wrecked["generalist_val_errors"]
    assert any(line.startswith("warning: on validation the combination makes more errors") and
               "specialists.init=generalist" in line for line in lines)


@pytest.fixture(scope="module")
def chosen_run(pinned_run, tmp_path_factory):
    """The pinned run with combine.choose=true: only its evaluate stage runs again."""
    fork = fork_run(pinned_run.root, tmp_path_factory.mktemp("runs") / "chosen", ["combine.choose=true"])
    run_pipeline(None, fork.root, resume=True, **QUIET)
    return fork


def _val_errors(model, split) -> int:
    return int((model.predict_proba(split.inputs).argmax(1) != split.labels).sum())


def test_the_run_chooses_top_n_and_specialist_weight_on_validation_and_serves_them(chosen_run):
    _, dataset = dataset_for_run(chosen_run)
    choice = read_json(chosen_run.root / "combination.json")["1"]
    settings = candidate_settings(load_config(chosen_run.config).combine, dataset.n_classes)
    errors = {(n, w): _val_errors(specialists.load(chosen_run.root, device="cpu", top_n=n, specialist_weight=w,
                                                   use_specialists=True), dataset.val) for n, w in settings}
    assert [c["val_errors"] for c in choice["candidates"]] == list(errors.values())  # what predict_proba makes
    best = min(errors, key=errors.get)  # the first of the fewest: the config's own pair on a tie
    generalist = specialists.load(chosen_run.root, device="cpu", use_specialists=False)
    alone = _val_errors(generalist, dataset.val)
    assert (choice["top_n"], choice["specialist_weight"]) == best and len(set(errors.values())) > 1
    assert choice["full_models_val_errors"] == alone
    # what the best setting fixes and breaks of the generalist's validation errors, and the sign test on them
    right = specialists.load(chosen_run.root, device="cpu", top_n=best[0], specialist_weight=best[1],
                             use_specialists=True).predict_proba(dataset.val.inputs).argmax(1) == dataset.val.labels
    general_right = generalist.predict_proba(dataset.val.inputs).argmax(1) == dataset.val.labels
    assert (choice["fixed"], choice["broken"]) == ((right & ~general_right).sum(), (~right & general_right).sum())
    assert choice["p_value"] == pytest.approx(binomtest(choice["fixed"], choice["fixed"] + choice["broken"],
                                                        alternative="greater").pvalue)
    assert choice["use_specialists"] == (errors[best] < alone and choice["p_value"] < 0.05)
    served = specialists.load(chosen_run.root, device="cpu")
    assert (served.top_n, served.specialist_weight, served.use_specialists) == (*best, choice["use_specialists"])
    assert specialists.load(chosen_run.root, device="cpu", top_n=2).top_n == 2  # an option given wins
    ensemble = chosen_run.read_metrics()["ensemble"]
    assert ensemble["combine"] == {"top_n": best[0], "specialist_weight": best[1], "chosen_on_validation": True}
    assert ensemble["served"] == ("generalist + specialists" if choice["use_specialists"] else "the generalist alone")
    assert (ensemble["val_errors"], ensemble["generalist_val_errors"]) == (errors[best], alone)


def test_a_gain_within_noise_on_validation_is_not_served_unless_significance_is_1(chosen_run, tmp_path):
    """The pinned run's best setting makes one validation error fewer than its generalist of 24 rows: too
    few to tell from noise at the default level, served at combine.significance=1 (any net gain)."""
    choice = read_json(chosen_run.root / "combination.json")["1"]
    assert choice["val_errors"] == choice["full_models_val_errors"] and not choice["use_specialists"]
    assert min(c["val_errors"] for c in choice["candidates"]) < choice["full_models_val_errors"]
    fork = fork_run(chosen_run.root, tmp_path / "any_gain", ["combine.significance=1"])
    run_pipeline(None, fork.root, resume=True, **QUIET)
    assert read_json(fork.root / "combination.json")["1"]["use_specialists"]
    assert specialists.load(fork.root, device="cpu").use_specialists


def test_a_run_whose_specialists_do_not_beat_the_generalist_on_validation_serves_it_alone(pinned_run, tmp_path):
    lines = []
    fork = fork_run(pinned_run.root, tmp_path / "wrecked", ["combine.choose=true", "specialists.lr=50",
                                                            "specialists.epochs=1"])
    run_pipeline(None, fork.root, resume=True, log=lines.append, progress=False)
    choice = read_json(fork.root / "combination.json")["1"]
    assert not choice["use_specialists"] and choice["val_errors"] == choice["full_models_val_errors"]
    assert min(c["val_errors"] for c in choice["candidates"]) >= choice["full_models_val_errors"]
    _, dataset = dataset_for_run(fork)
    served = specialists.load(fork.root, device="cpu")
    generalist = specialists.load(fork.root, device="cpu", use_specialists=False)
    np.testing.assert_array_equal(served.predict_proba(dataset.val.inputs), generalist.predict_proba(dataset.val.inputs))
    assert fork.read_metrics()["ensemble"]["served"] == "the generalist alone"
    assert "the run serves the generalist alone" in (fork.report / "summary.md").read_text()
    exported = export_run(fork.root, tmp_path / "export", "torchscript", log=lambda s: None)
    assert read_json(exported / "export.json")["specialists"] == []  # an export serves what the run serves
    assert any(line.startswith("warning: on validation the combination makes") and
               "serves the generalist alone" in line for line in lines)


def test_combine_choose_false_serves_the_configured_settings(pinned_run, chosen_run, tmp_path):
    assert not (pinned_run.root / "combination.json").exists()  # PINNED sets combine.choose=false
    assert specialists.load(pinned_run.root, device="cpu").top_n == 3
    fork = fork_run(chosen_run.root, tmp_path / "unchosen", ["combine.choose=false"])
    run_pipeline(None, fork.root, resume=True, **QUIET)
    assert not (fork.root / "combination.json").exists()  # a choice made before is forgotten
    assert fork.read_metrics()["ensemble"]["combine"]["chosen_on_validation"] is False


@pytest.mark.parametrize("entry, fragment", [
    ({"top_n": 0, "specialist_weight": 4.0, "use_specialists": True}, "top_n=0"),
    ({"top_n": 1, "specialist_weight": "x", "use_specialists": True}, "specialist_weight='x'"),
    ({"top_n": 1, "specialist_weight": 4.0, "use_specialists": "yes"}, "use_specialists='yes'"),
])
def test_a_damaged_combination_file_is_refused_naming_file_and_key(chosen_run, tmp_path, entry, fragment):
    copy = tmp_path / "copy"
    shutil.copytree(chosen_run.root, copy)
    (copy / "combination.json").write_text(json.dumps({"1": entry}))
    with pytest.raises(RunDirError, match=r"combination\.json.*" + fragment.replace("(", r"\(")):
        specialists.load(copy, device="cpu")
