"""Serving a run: `model(inputs)` and `classes_`, `specialists predict` into a CSV, `specialists export`."""

import csv
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

import specialists
from conftest import tiny_config, write_csv
from specialists.cli import main
from specialists.combine import solve
from specialists.config import load_config
from specialists.combine import combine_outputs
from specialists.export import ExportError, encoded_inputs, export_run
from specialists.models import hash_ngrams
from specialists.rundir import RunDir
from specialists.runtime import dataset_for_run
from specialists.stages import run_pipeline

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None


def quiet(_):
    pass


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    """40 synthetic classes in 4 planted groups, an mlp generalist and 4 specialists (on Ray)."""
    out = tmp_path_factory.mktemp("runs") / "features"
    run_pipeline(tiny_config("peer.enabled=false"), out, log=quiet, progress=False)
    return out


# Six intents in two groups that share their words: the generalist confuses within a group.
INTENTS = {
    "card_lost": ("lost", ["card", "missing", "wallet", "where"]),
    "card_stolen": ("stolen", ["card", "missing", "wallet", "where"]),
    "card_blocked": ("blocked", ["card", "missing", "wallet", "where"]),
    "top_up": ("topup", ["balance", "money", "add", "account"]),
    "top_up_failed": ("failed", ["balance", "money", "add", "account"]),
    "refund": ("refund", ["balance", "money", "add", "account"]),
}


def intent_rows(n_per_class, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for label, (own, shared) in INTENTS.items():
        for _ in range(n_per_class):
            words = list(rng.choice(shared, size=4)) + ([own] if rng.random() < 0.7 else [])
            rng.shuffle(words)
            rows.append([" ".join(words), label])
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A fastText generalist over 6 intents and 2 specialists (on Ray)."""
    root = tmp_path_factory.mktemp("text")
    train = write_csv(root / "train.csv", intent_rows(40, seed=0))
    test = write_csv(root / "test.csv", intent_rows(10, seed=1))
    cfg = load_config(None, [
        "data.kind=csv_text", f"data.train={train}", f"data.test={test}", "data.text_column=text",
        "data.label_column=intent", "model.buckets=4096", "model.embed_dim=16", "model.hidden=[16]",
        "train.epochs=8", "train.batch_size=16", "train.lr=0.02", "threads=1", "cluster.classes_per_cluster=3",
        "specialists.epochs=4", "specialists.buckets=2048", "peer.enabled=false",
        "combine.choose=false"])  # the combination is exported whether or not it helps on 12 validation texts
    out = root / "run"
    run_pipeline(cfg, out, log=quiet, progress=False)
    return out


def split_of(run):
    return dataset_for_run(RunDir(run))[1].test


# ----------------------------------------------------------------------------- model(inputs), classes_


def test_call_returns_labels_and_scores_like_pipelines(feature_run):
    model = specialists.load(feature_run, device="cpu")
    x = split_of(feature_run).inputs[:6]
    proba = model.predict_proba(x)
    assert list(model.classes_) == json.loads((feature_run / "classes.json").read_text())
    one = model(x)
    assert [d["label"] for d in one] == list(model.predict(x))
    assert [d["score"] for d in one] == pytest.approx(proba.max(1).tolist())
    top = model(x, top_k=3)
    assert len(top) == 6 and all(len(row) == 3 for row in top)
    for row, p in zip(top, proba):
        assert [d["label"] for d in row] == [model.classes_[i] for i in np.argsort(-p, kind="stable")[:3]]
        assert [d["score"] for d in row] == sorted((d["score"] for d in row), reverse=True)
    with pytest.raises(ValueError, match=r"top_k=41 must be an integer in \[1, 40\]"):
        model(x, top_k=41)


# ----------------------------------------------------------------------------- specialists predict


def read_predictions(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_predict_npy_equals_the_loaded_model(feature_run, tmp_path):
    x = split_of(feature_run).inputs
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(feature_run), "--input", str(tmp_path / "x.npy"), "--output", str(out),
                 "--top-k", "3", "--batch-size", "7", "--device", "cpu"]) == 0
    rows = read_predictions(out)
    model = specialists.load(feature_run, device="cpu")
    proba = model.predict_proba(x)
    assert list(rows[0]) == ["row", "label", "score", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3"]
    assert [int(r["row"]) for r in rows] == list(range(len(x)))
    assert [r["label"] for r in rows] == list(model.predict(x))
    assert [r["label_1"] for r in rows] == [r["label"] for r in rows]
    third = np.argsort(-proba, axis=1, kind="stable")[:, 2]
    assert [r["label_3"] for r in rows] == [model.classes[i] for i in third]
    np.testing.assert_allclose([float(r["score"]) for r in rows], proba.max(1), atol=1e-6)
    np.testing.assert_allclose([float(r["score_3"]) for r in rows], proba[np.arange(len(x)), third], atol=1e-6)


def test_predict_text_csv_equals_the_loaded_model(text_run, tmp_path):
    texts = split_of(text_run).inputs + ['card, "lost" — où est ma carte ?', ""]
    write_csv(tmp_path / "in.csv", [[t, "note, with comma"] for t in texts], header=("text", "note"))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(text_run), "--input", str(tmp_path / "in.csv"), "--output", str(out),
                 "--batch-size", "5"]) == 0
    rows = read_predictions(out)
    model = specialists.load(text_run, device="cpu")
    assert list(rows[0]) == ["row", "label", "score"]
    assert [r["label"] for r in rows] == list(model.predict(texts))
    np.testing.assert_allclose([float(r["score"]) for r in rows], model.predict_proba(texts).max(1), atol=1e-6)
    # a .txt input: one text a line, and another column named with --column
    (tmp_path / "in.txt").write_text("\n".join(texts[:-1]) + "\n", encoding="utf-8")
    assert main(["predict", str(text_run), "--input", str(tmp_path / "in.txt"), "--output", str(out)]) == 0
    assert [r["label"] for r in read_predictions(out)] == list(model.predict(texts[:-1]))
    assert main(["predict", str(text_run), "--input", str(tmp_path / "in.csv"), "--output", str(out),
                 "--column", "note"]) == 0
    assert {r["label"] for r in read_predictions(out)} == set(model.predict(["note, with comma"]))


def test_predict_refuses_bad_input_and_writes_nothing(feature_run, text_run, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    write_csv(tmp_path / "in.csv", [["hello", "x"]], header=("body", "note"))
    assert main(["predict", str(text_run), "--input", str(tmp_path / "in.csv"), "--output", str(out)]) == 2
    assert "has no column named 'text'; its columns are ['body', 'note']" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((4, 17), np.float32))
    assert main(["predict", str(feature_run), "--input", str(tmp_path / "wide.npy"), "--output", str(out)]) == 2
    assert "has rows of shape (17,); the run's model reads examples of shape (N, 16)" in capsys.readouterr().err
    x = split_of(feature_run).inputs.copy()
    x[30, 2] = np.nan  # found in the fourth batch, after three were written to the temporary file
    np.save(tmp_path / "nan.npy", x)
    try:  # a ValueError from the model's input check, or the same as a one-line user error
        code = main(["predict", str(feature_run), "--input", str(tmp_path / "nan.npy"), "--output", str(out),
                     "--batch-size", "10"])
        message = capsys.readouterr().err
    except ValueError as err:
        code, message = 2, str(err)
    assert code == 2 and "NaN" in message
    assert main(["predict", str(feature_run), "--input", str(tmp_path / "wide.npy"), "--output", str(out),
                 "--top-k", "41"]) == 2
    assert "--top-k 41 must be between 1 and the number of classes (40)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "nan.npy", "wide.npy"]  # no output, no temp


# ----------------------------------------------------------------------------- the numpy combiner


def random_problem(rng, n, n_classes, groups):
    logits = rng.normal(size=(n, n_classes)) * 3
    specialist = [rng.normal(size=(n, len(g) + 1)) * 2 for g in groups]
    return logits, specialist


def write_spec(folder, n_classes, groups, top_n, weight, n_full=1, corrections=None):
    corrections = corrections or [0.0] * len(groups)
    spec = {"classes": [str(i) for i in range(n_classes)], "input": {"kind": "features", "names": ["x"]},
            "full_models": [{"file": f"full_{g}.onnx"} for g in range(n_full)],
            "specialists": [{"file": f"s{m}.onnx", "classes": g, "dustbin_correction": c}
                            for m, (g, c) in enumerate(zip(groups, corrections))],
            "combine": {"top_n": top_n, "specialist_weight": weight}}
    (folder / "export.json").write_text(json.dumps(spec))


def load_combiner(folder):
    spec = importlib.util.spec_from_file_location("combine_numpy_copy", folder / "combine_numpy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(folder)


@pytest.mark.parametrize("n_full", [1, 2])
def test_numpy_combiner_equals_the_torch_solver(tmp_path, n_full):
    """Overlapping specialists, up to 4 active a row (top_n=3), several full models: as ensemble.combine_outputs."""
    import shutil

    from specialists import combine_numpy

    rng = np.random.default_rng(n_full)
    n_classes = 12
    groups = [[0, 1, 2, 3], [2, 3, 4], [5, 6, 7, 8], [8, 9, 10], [0, 5, 10]]
    corrections = [0.3, -0.2, 0.0, 1.0, -1.5]
    full = [rng.normal(size=(300, n_classes)) * 3 for _ in range(n_full)]
    _, specialist = random_problem(rng, 300, n_classes, groups)
    write_spec(tmp_path, n_classes, groups, top_n=3, weight=4.0, n_full=n_full, corrections=corrections)
    shutil.copyfile(combine_numpy.__file__, tmp_path / "combine_numpy.py")
    combiner = load_combiner(tmp_path)
    full_probs = torch.stack([torch.softmax(torch.from_numpy(z), 1) for z in full])
    corrected = [torch.softmax(torch.from_numpy(s) + torch.tensor([0.0] * len(g) + [c], dtype=torch.float64), 1)
                 for s, g, c in zip(specialist, groups, corrections)]
    expected = combine_outputs(full_probs, corrected, [torch.tensor(g) for g in groups], 3, 4.0).numpy()
    active = combiner.active(combiner.general_probs(full))
    assert (active.sum(1) >= 2).mean() > 0.5  # the Newton path, not only the closed forms
    got = combiner.predict_proba(full, [s[active[:, m]] for m, s in enumerate(specialist)])
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_numpy_solver_on_peaked_rows(tmp_path):
    """Specialists sure of a class the generalist gives almost nothing: the y_out cancellation case."""
    from specialists.combine_numpy import solve_row

    rng = np.random.default_rng(5)
    for _ in range(50):
        g = torch.softmax(torch.from_numpy(rng.normal(size=10) * 12), 0)
        classes = [torch.tensor([0, 1, 2]), torch.tensor([2, 3]), torch.tensor([1, 2, 3, 4])]
        probs = [torch.softmax(torch.from_numpy(rng.normal(size=len(c) + 1) * 12), 0) for c in classes]
        expected = solve(g[None], [p[None] for p in probs], classes, torch.ones(1, 3, dtype=torch.bool))[0]
        got = solve_row(g.numpy(), [p.numpy() for p in probs], [c.numpy() for c in classes])
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-9)


# ----------------------------------------------------------------------------- specialists export


def exported_proba(folder, inputs, fmt):
    combiner = load_combiner(folder)
    if fmt == "onnx":
        import onnxruntime as ort

        sessions = [ort.InferenceSession(str(f)) for f in combiner.model_files]
        models = [lambda *x, s=s: s.run(None, dict(zip(combiner.input_names, x)))[0] for s in sessions]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
            nets = [torch.jit.load(str(f)) for f in combiner.model_files]
        models = [lambda *x, net=net: net(*(torch.from_numpy(a) for a in x)).detach().numpy() for net in nets]
    return combiner.run(inputs, models)


def check_export(run, folder, fmt):
    model = specialists.load(run, device="cpu")
    split = split_of(run)
    spec = json.loads((folder / "export.json").read_text())
    assert len(spec["specialists"]) == len(model.specialists) >= 2
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["export.json", "combine_numpy.py"] + [f["file"] for f in spec["full_models"]]
        + [s["file"] for s in spec["specialists"]])
    inputs = split.inputs + ["", "où est ma carte"] if model.input_kind == "text" else split.inputs  # an empty bag
    got = exported_proba(folder, encoded_inputs(model, inputs), fmt)
    np.testing.assert_allclose(got, model.predict_proba(inputs), atol=1e-5)


def test_export_torchscript_reproduces_predict_proba(feature_run, text_run, tmp_path):
    for run in (feature_run, text_run):
        folder = export_run(run, tmp_path / run.name, "torchscript", log=quiet)
        check_export(run, folder, "torchscript")


def test_an_export_whose_specialists_hash_character_grams_takes_one_encoding_each(text_run, tmp_path):
    """The default fasttext specialists read character 2..3-grams beside the generalist's words."""
    folder = export_run(text_run, tmp_path / "out", "torchscript", log=quiet)
    spec = json.loads((folder / "export.json").read_text())
    words, chars = spec["input"]["encodings"]
    assert spec["input"]["encoding"] == words and (words["char_ngrams"], chars["char_ngrams"]) == (0, 3)
    assert chars["char_ngrams_min"] == 2  # character 2..3-grams
    assert (words["buckets"], chars["buckets"]) == (4096, 2048)  # specialists.buckets: a smaller table of their own
    assert [f["encoding"] for f in spec["full_models"]] == [0]
    assert {s["encoding"] for s in spec["specialists"]} == {1}
    model = specialists.load(text_run, device="cpu")
    inputs = split_of(text_run).inputs
    per_encoding = encoded_inputs(model, inputs)
    assert len(per_encoding) == 2
    for encoding, (ids, offsets) in zip((words, chars), per_encoding):  # export.json says how to hash a text
        hashing = {k: v for k, v in encoding.items() if k != "function"}
        assert encoding["function"] == "specialists.models.hash_ngrams"
        np.testing.assert_array_equal(ids[:offsets[1]], hash_ngrams(inputs[0], **hashing))
    with pytest.raises(ValueError, match="read 2 encodings of the inputs"):
        exported_proba(folder, per_encoding[0], "torchscript")  # the generalist's encoding alone
    np.testing.assert_allclose(exported_proba(folder, per_encoding, "torchscript"), model.predict_proba(inputs),
                               atol=1e-5)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime/onnxscript not installed: pip install 'specialists[export]'")
def test_export_onnx_reproduces_predict_proba(feature_run, text_run, tmp_path):
    """An mlp, and fastText's EmbeddingBag inputs (ids, offsets) with dynamic batch and id counts, under onnxruntime."""
    for run in (feature_run, text_run):
        assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / run.name)]) == 0
        check_export(run, tmp_path / run.name, "onnx")


def test_export_refuses_an_occupied_folder(feature_run, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ExportError, match="holds files and is not an earlier export"):
        export_run(feature_run, tmp_path / "busy", "torchscript", log=quiet)
    with pytest.raises(ExportError, match="--format 'tflite' must be one of"):
        export_run(feature_run, tmp_path / "x", "tflite", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
