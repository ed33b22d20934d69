import json
import pickle

import numpy as np
import pytest

import specialists
from conftest import csv_overrides, tiny_config
from specialists.cli import main
from specialists.config import load_config
from specialists.models import CheckpointError, load_checkpoint
from specialists.pipeline import run_pipeline
from specialists.rundir import RunDirError


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
    assert first["generalist"] == second["generalist"]
    assert (synthetic_run / "generalist" / "model.safetensors").read_bytes() == \
        (tmp_path / "again" / "generalist" / "model.safetensors").read_bytes()


def test_api_predicts_arrays(synthetic_run):
    model = specialists.load(synthetic_run, device="cpu")
    from specialists.pipeline import dataset_for_run
    from specialists.rundir import RunDir
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
