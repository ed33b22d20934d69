"""Generalists users bring (adapters.py): their own torch module, a Hugging Face or a timm classifier.

Every network is built here, tiny, with random or briefly trained weights; nothing is downloaded.
One end-to-end run is `specialists run` itself (the console script, in a folder holding the user's
module, as a user runs it), training specialists on Ray from a user's torch model.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import user_models
from specialists.config import ConfigError, TrainConfig, load_config
from specialists.models import (CheckpointError, create_model, load_checkpoint, model_kwargs, save_checkpoint,
                                trust_factory, with_dustbin_head)
from specialists.stages import run_pipeline
from specialists.train import freeze, frozen_parameters, train_model

HERE = Path(__file__).resolve().parent
QUIET = dict(log=lambda s: None, progress=False)


def torch_config(factory="user_models:build", weights="", *more, n_features=8, n_classes=12):
    return load_config(None, ["data.kind=npz", "data.path=unused.npz", "model.name=torch", f"model.factory={factory}",
                              f"model.factory_args={{n_features: {n_features}, n_classes: {n_classes}}}",
                              f"model.weights={weights}", *more])


def kwargs_of(cfg, n_features=8, n_classes=12):
    return model_kwargs(cfg.model, "features", (n_features,), n_classes)


def grouped_data(seed: int, draw: int = 0, n_classes=12, n_groups=3, n_features=8, per_class=40, test_per_class=15):
    """Gaussian classes in groups: classes of one group lie close together (the confusable ones).

    seed: the classes; draw: the examples drawn from them."""
    rng = np.random.default_rng(seed)
    groups = rng.normal(0, 4.0, (n_groups, n_features))
    means = groups[np.arange(n_classes) % n_groups] + rng.normal(0, 1.2, (n_classes, n_features))
    rng = np.random.default_rng([seed, draw])

    def sample(n):
        y = np.repeat(np.arange(n_classes), n)
        return (means[y] + rng.normal(0, 1.0, (len(y), n_features))).astype(np.float32), y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = sample(per_class), sample(test_per_class)
    return x_train, y_train, x_test, y_test


def trained_user_net(x, y, n_classes=12, steps=150, seed=0) -> torch.nn.Module:
    """What the user trained elsewhere: their own loop, their own code."""
    torch.manual_seed(seed)
    net = user_models.build(x.shape[1], n_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        optimizer.step()
    return net.eval()


# ---------------------------------------------------------------------------
# the torch adapter: head, weights, dustbin rows


def test_the_head_is_the_linear_layer_that_runs_last():
    # Net registers its classifier before the body that feeds it: found by running it, not by registration order
    assert kwargs_of(torch_config())["head"] == "classifier"
    assert kwargs_of(torch_config("user_models:sequential"))["head"] == "2"


def test_the_adapted_model_computes_the_users_logits(tmp_path):
    for factory in ("user_models:build", "user_models:sequential"):  # the second head has no bias: it reads as 0
        torch.manual_seed(1)
        net = getattr(user_models, factory.split(":")[1])(8, 12).eval()
        save_file(net.state_dict(), tmp_path / "w.safetensors")
        cfg = torch_config(factory, tmp_path / "w.safetensors")
        model = create_model("torch", **kwargs_of(cfg)).eval()
        model.load_weights(cfg.model.weights, [str(c) for c in range(12)])
        x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        with torch.no_grad():
            ours = model(*model.encode(x).batch(np.arange(5), "cpu"))
            assert torch.allclose(ours, net(torch.from_numpy(x)), atol=1e-6)


def test_a_specialist_starts_from_the_users_rows_plus_a_dustbin():
    torch.manual_seed(0)
    generalist = create_model("torch", **kwargs_of(torch_config())).eval()
    classes = [7, 2, 9]
    specialist = with_dustbin_head(generalist, classes).eval()
    assert specialist.spec["name"] == "torch" and specialist.head.out_features == 4
    x = torch.randn(6, 8)
    with torch.no_grad():
        full, own = generalist(x), specialist(x)
    assert torch.allclose(own[:, :3], full[:, classes], atol=1e-6)
    others = [c for c in range(12) if c not in classes]
    # the dustbin row is the mean of the other rows, its bias raised by log(9): its logit is their mean + log(9)
    assert torch.allclose(own[:, 3], full[:, others].mean(1) + np.log(9), atol=1e-5)
    with pytest.raises(ValueError, match="no hidden widths to widen"):
        with_dustbin_head(generalist, classes, widen=2)


def test_a_specialist_of_your_network_freezes_its_layers_by_your_names():
    x, _, _, _ = grouped_data(0)
    torch.manual_seed(0)
    generalist = create_model("torch", **kwargs_of(torch_config())).eval()
    specialist = with_dustbin_head(generalist, [7, 2, 9])
    assert frozen_parameters(specialist, ["body.0"]) == ["net.body.0.weight", "net.body.0.bias"]
    with pytest.raises(ConfigError, match=r"'net.body' names no parameter of the torch model; its parameters are "
                                          r"under \['body', 'classifier'\]"):
        frozen_parameters(specialist, ["net.body"])  # the adapter's own name for your network is not yours
    start = {name: value.clone() for name, value in specialist.state_dict().items()}
    freeze(specialist, ["body"])
    labels = np.arange(len(x)) % 4  # its three classes and the dustbin
    train_model(specialist, specialist.encode(x), labels, specialist.encode(x[:40]), labels[:40],
                TrainConfig(epochs=2, batch_size=64, lr=0.05, patience=0), seed=0, progress=False)
    for name, value in specialist.state_dict().items():
        assert torch.equal(value, start[name]) == name.startswith("net.body."), name


# ---------------------------------------------------------------------------
# bad input: refused, naming the setting or file and what was expected


@pytest.mark.parametrize("factory, message", [
    ("no_such_module_here:build", "module 'no_such_module_here' does not import"),
    ("user_models:missing", "has no 'missing'"),
    ("user_models:not_a_model", "returned a dict, not a torch.nn.Module"),
    ("user_models:broken", "RuntimeError: this factory is broken"),
    ("user_models:Probabilities", "not the outputs of its last Linear layer 'fc'.*a softmax"),
    ("user_models:NoLinear", "has no Linear layer"),
])
def test_a_factory_that_cannot_give_a_head_is_refused(factory, message):
    with pytest.raises(ConfigError, match=f"model.factory='{factory}'.*{message}"):
        kwargs_of(torch_config(factory))


@pytest.mark.parametrize("override", ["specialists.widen=2", "specialists.init=scratch"])
def test_a_model_you_bring_keeps_its_architecture_and_weights(override):
    with pytest.raises(ConfigError, match=f"{override.replace('=', '=.*')}.*model.name=torch"):
        torch_config("user_models:build", "", override)


def test_a_model_that_fails_on_the_datas_shape_is_refused():
    with pytest.raises(ConfigError, match=r"inputs of shape \(N, 9\): the model fails on a batch"):
        kwargs_of(torch_config(), n_features=9)


def _state(**changes):
    torch.manual_seed(0)
    state = dict(user_models.build(8, 12).state_dict())
    for key, value in changes.items():
        if value is None:
            del state[key.replace("__", ".")]
        else:
            state[key.replace("__", ".")] = value
    return state


@pytest.mark.parametrize("state, message", [
    (_state(body__0__weight=None), r"missing 1 tensor\(s\) of the model, e.g. \['body.0.weight'\]"),
    (_state(extra=torch.zeros(3)), r"1 tensor\(s\) the model does not have, e.g. \['extra'\]"),
    (_state(body__2__weight=torch.zeros(32, 31)), r"tensor 'body.2.weight' is \(32, 31\) in the weights, \(32, 32\)"),
    (dict(user_models.build(8, 10).state_dict()), "the head 'classifier' has 10 rows .* the data have 12 classes"),
])
def test_weights_that_do_not_match_the_factorys_model_are_refused(tmp_path, state, message):
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=f"model.weights='{tmp_path}/w.safetensors'.*{message}"):
        kwargs_of(torch_config("user_models:build", tmp_path / "w.safetensors"))


def test_weights_that_are_not_a_state_dict_file_are_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        kwargs_of(torch_config("user_models:build", tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="no such file"):
        kwargs_of(torch_config("user_models:build", tmp_path / "absent.safetensors"))
    save_file(_state(classifier__bias=torch.full((12,), float("nan"))), tmp_path / "nan.safetensors")
    cfg = torch_config("user_models:build", tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="tensor 'classifier.bias' holds NaN or inf"):
        create_model("torch", **kwargs_of(cfg)).load_weights(cfg.model.weights, [])


@pytest.mark.parametrize("override, error", [
    ("model.factory=user_models:broken", ConfigError),
    ("model.factory=user_models:NoLinear", ConfigError),
    ("model.weights=WRONG", CheckpointError),
])
def test_bad_input_leaves_no_run_directory(tmp_path, override, error):
    x_train, y_train, x_test, y_test = grouped_data(0)
    np.savez(tmp_path / "data.npz", X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    save_file(dict(user_models.build(8, 5).state_dict()), tmp_path / "wrong.safetensors")  # 5 classes, not 12
    override = override.replace("WRONG", str(tmp_path / "wrong.safetensors"))
    cfg = load_config(None, ["data.kind=npz", f"data.path={tmp_path / 'data.npz'}", "model.name=torch",
                             "model.factory=user_models:build", "model.factory_args={n_features: 8, n_classes: 12}",
                             override])
    with pytest.raises(error):
        run_pipeline(cfg, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_calls_only_a_trusted_factory(tmp_path):
    marker = tmp_path / "MARKER"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "model.json").write_text(json.dumps({"name": "torch", "version": 2, "kwargs": {
        "n_classes": 2, "factory": "os:system", "factory_args": {"command": f"touch {marker}"},
        "input_shape": [2], "head": "fc"}}))
    save_file({"fc.weight": torch.zeros(2, 2)}, hostile / "model.safetensors")
    with pytest.raises(CheckpointError, match="built by calling 'os:system'.*trust_factory"):
        load_checkpoint(hostile)
    assert not marker.exists()

    # a user's own factory, named by a checkpoint: loads once the user trusts it
    cfg = torch_config("user_models:Net")
    model = create_model("torch", **kwargs_of(cfg))
    save_checkpoint(model, tmp_path / "mine")
    with pytest.raises(CheckpointError, match="built by calling 'user_models:Net'"):
        load_checkpoint(tmp_path / "mine")
    trust_factory("user_models:Net")
    loaded = load_checkpoint(tmp_path / "mine")
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# ---------------------------------------------------------------------------
# end to end: `specialists run model.name=torch ...` on Ray, then specialists.load(run).predict


def test_specialists_grow_on_a_users_torch_model(tmp_path, monkeypatch):
    import specialists

    x_train, y_train, x_test, y_test = grouped_data(0)
    np.savez(tmp_path / "data.npz", X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    x_own, y_own, _, _ = grouped_data(0, draw=1)  # the user trained on examples of their own, not the run's
    net = trained_user_net(x_own, y_own)
    save_file(net.state_dict(), tmp_path / "gen.safetensors")
    shutil.copy(HERE / "user_models.py", tmp_path / "user_nets.py")  # the user's module, beside where they run
    command = [str(Path(sys.executable).parent / "specialists"), "run", "--quiet", "--out", "run",
               "data.kind=npz", "data.path=data.npz", "model.name=torch", "model.factory=user_nets:build",
               "model.factory_args={n_features: 8, n_classes: 12}", "model.weights=gen.safetensors",
               "cluster.classes_per_cluster=4", "specialists.epochs=4", "train.epochs=4", "train.batch_size=64",
               "peer.max_members=2", "ray.num_cpus=2", "threads=1",
               "combine.choose=false"]  # served with its specialists, which this test is about
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())

    # the generalist is the user's model as it is: loaded, not trained, and it makes the user's errors
    with torch.no_grad():
        user_logits = net(torch.from_numpy(x_test))
    user_errors = int((user_logits.argmax(1).numpy() != y_test).sum())
    assert metrics["generalist"]["examples_seen"] == 0
    assert metrics["generalist"]["loaded_from"] == "gen.safetensors"
    assert metrics["generalist"]["test_errors"] == user_errors
    # one specialist per cluster, trained on Ray from the user's network
    groups = json.loads((run / "clusters.json").read_text())["groups"]
    assert len(groups) >= 2 and metrics["specialists"]["count"] == len(groups)
    for m in range(len(groups)):
        spec = json.loads((run / "specialists" / str(m) / "model.json").read_text())
        assert spec["name"] == "torch" and spec["kwargs"]["factory"] == "user_nets:build"
        assert spec["kwargs"]["n_classes"] == len(groups[m]["classes"]) + 1
    # the peer baseline spends exactly the specialists' compute on copies of the user's model fine-tuned here
    peer = metrics["peer_ensemble"]
    assert peer["budget_examples"] == metrics["specialists"]["examples_seen"] > 0
    assert peer["members"] == 2 and 0 < peer["examples_seen"] <= peer["budget_examples"]

    # serving: the run names the user's code, so load asks for consent
    with pytest.raises(CheckpointError, match="built by calling 'user_nets:build'"):
        specialists.load(run, device="cpu")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = specialists.load(run, device="cpu", trust_factory="user_nets:build")
    assert len(model.specialists) == len(groups)
    names = model.predict(x_test)
    assert names.shape == (len(y_test),) and set(names) <= {str(c) for c in range(12)}
    generalist_alone = specialists.load(run, device="cpu", use_specialists=False).predict_proba(x_test)
    assert np.allclose(generalist_alone, torch.softmax(user_logits.double(), 1).numpy(), atol=1e-5)
    combined = model.predict_proba(x_test)
    assert np.allclose(combined.sum(1), 1, atol=1e-4)
    combined_errors = int((combined.argmax(1) != y_test).sum())
    # the command line serves it too, with the consent in the environment
    np.save(tmp_path / "new.npy", x_test[:20])
    served = subprocess.run([command[0], "predict", "run", "--input", "new.npy", "--output", "out.csv"], cwd=tmp_path,
                            env={**env, "SPECIALISTS_TRUST_FACTORY": "user_nets:build"}, capture_output=True,
                            text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    with open(tmp_path / "out.csv") as handle:
        assert [row["label"] for row in csv.DictReader(handle)] == list(names[:20])
    # the classes overlap (Gaussian noise), so the user's well-trained model leaves little to fix: the combination
    # must not undo what it gets right
    assert combined_errors <= user_errors + 2, (combined_errors, user_errors)


# ---------------------------------------------------------------------------
# Hugging Face: a tiny BERT and a word-level tokenizer, saved as save_pretrained saves them

INTENTS = ["card_lost", "exchange", "top_up"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    return _make_hf_folder(tmp_path_factory.mktemp("hf") / "bert", INTENTS)


def _make_hf_folder(folder: Path, classes: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + ("lost card stolen missing wallet top up balance add money "
                                                    "exchange rate currency euro dollar").split()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, id2label=dict(enumerate(classes)),
                        label2id={name: i for i, name in enumerate(classes)})
    BertForSequenceClassification(config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def _hf_model(folder, classes=INTENTS):
    cfg = load_config(None, ["model.name=hf", f"model.weights={folder}"])
    model = create_model("hf", **model_kwargs(cfg.model, "text", (), len(classes)))
    model.load_weights(cfg.model.weights, classes)
    return model.eval()


TEXTS = ["lost card", "euro rate dollar exchange today", "top up my balance with money", ""]


def test_a_hugging_face_classifier_keeps_its_logits_through_a_checkpoint(hf_folder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = _hf_model(hf_folder)
    assert model.head_name == "classifier"
    reference = AutoModelForSequenceClassification.from_pretrained(hf_folder).eval()
    tokens = AutoTokenizer.from_pretrained(hf_folder)(TEXTS, padding=True, return_tensors="pt")
    encoded = model.encode(TEXTS)
    with torch.no_grad():
        ours = model(*encoded.batch(np.arange(len(TEXTS)), "cpu"))
        assert torch.allclose(ours, reference(**tokens).logits, atol=1e-5)
        save_checkpoint(model, tmp_path / "ck")
        again = load_checkpoint(tmp_path / "ck")  # rebuilt from model.json (config + tokenizer), no folder needed
        assert torch.allclose(again(*again.encode(TEXTS).batch(np.arange(len(TEXTS)), "cpu")), ours, atol=1e-6)
        specialist = with_dustbin_head(model, [2]).eval()
        own = specialist(*encoded.batch(np.arange(len(TEXTS)), "cpu"))
        assert torch.allclose(own[:, 0], ours[:, 2], atol=1e-5)
        assert torch.allclose(own[:, 1], ours[:, :2].mean(1) + np.log(2), atol=1e-5)


def test_a_hugging_face_classifier_must_name_the_datas_classes_in_order(hf_folder):
    with pytest.raises(CheckpointError, match="id2label names class 0 'card_lost', the data 'top_up'"):
        _hf_model(hf_folder, ["top_up", "card_lost", "exchange"])
    with pytest.raises(CheckpointError, match="the head 'classifier' has 3 rows .* the data have 4 classes"):
        _hf_model(hf_folder, INTENTS + ["other"])
    with pytest.raises(ConfigError, match="model.name=hf reads texts"):
        model_kwargs(load_config(None, ["model.name=hf", f"model.weights={hf_folder}"]).model, "features", (3,), 3)


def _pair_texts(n_per_class: int, seed: int) -> list[list[str]]:
    """Four intents in two confusable pairs: each pair shares most of its words."""
    rng = np.random.default_rng(seed)
    shared = {"card": ["lost", "card", "stolen", "wallet"], "money": ["top", "up", "balance", "money"]}
    own = {"card_lost": "missing", "card_stolen": "stolen", "top_up": "add", "exchange": "euro"}
    rows = []
    for label, word in own.items():
        pool = shared["card" if label.startswith("card") else "money"]
        for _ in range(n_per_class):
            rows.append([" ".join([*rng.choice(pool, size=3), word]), label])
    rng.shuffle(rows)
    return rows


@pytest.mark.slow
def test_specialists_grow_on_a_fine_tuned_hugging_face_classifier(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    import specialists

    classes = ["card_lost", "card_stolen", "exchange", "top_up"]  # the order the run gives them (sorted)
    _make_hf_folder(tmp_path / "bert", classes)  # randomly initialised: the run fine-tunes it
    for split, seed, n in (("train", 0, 40), ("test", 1, 15)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["text", "intent"], *_pair_texts(n, seed)])
    cfg = load_config(None, ["data.kind=csv_text", f"data.train={tmp_path / 'train.csv'}",
                             f"data.test={tmp_path / 'test.csv'}", "data.label_column=intent", "model.name=hf",
                             f"model.weights={tmp_path / 'bert'}", "model.fine_tune=true", "train.epochs=3",
                             "train.batch_size=32", "train.lr=0.003", "cluster.classes_per_cluster=2",
                             "specialists.epochs=2", "peer.max_members=2", "ray.num_cpus=2", "threads=1"])
    run = run_pipeline(cfg, tmp_path / "run", **QUIET)
    metrics = run.read_metrics()
    assert metrics["generalist"]["examples_seen"] > 0 and "loaded_from" not in metrics["generalist"]  # fine-tuned
    assert metrics["specialists"]["count"] >= 1
    assert json.loads((run.specialists / "0" / "model.json").read_text())["name"] == "hf"
    model = specialists.load(run.root, device="cpu")
    texts = [row[0] for row in _pair_texts(3, seed=2)]
    assert set(model.predict(texts)) <= set(classes)
    assert np.allclose(model.predict_proba(texts).sum(1), 1, atol=1e-4)


# ---------------------------------------------------------------------------
# timm


def test_a_timm_classifier_gets_specialist_heads(tmp_path):
    pytest.importorskip("timm", reason="timm does not import: install the timm extra (timm needs torchvision, "
                                       "which PyPI's wheels fail to provide beside torch 2.13+cpu)")
    cfg = load_config(None, ["model.name=timm", "model.arch=test_vit"])
    kwargs = model_kwargs(cfg.model, "image", (16, 16), 10)
    torch.manual_seed(0)
    model = create_model("timm", **kwargs).eval()
    x = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    batch = model.encode(x).batch(np.arange(3), "cpu")
    specialist = with_dustbin_head(model, [4, 1]).eval()
    with torch.no_grad():
        full, own = model(*batch), specialist(*batch)
    assert torch.allclose(own[:, :2], full[:, [4, 1]], atol=1e-5)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, tmp_path / "w.safetensors")
    cfg = load_config(None, ["model.name=timm", "model.arch=test_vit", f"model.weights={tmp_path / 'w.safetensors'}"])
    with pytest.raises(CheckpointError, match="has 10 rows"):
        model_kwargs(cfg.model, "image", (16, 16), 11)
