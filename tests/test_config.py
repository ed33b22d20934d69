import dataclasses
from pathlib import Path

import pytest

from specialists.config import ConfigError, RunConfig, dump_config, load_config
from specialists.distill_config import DistillConfig, load_distill_config, resolve_student
from specialists.rundir import RunDirError


def test_defaults_are_the_banking77_config():
    cfg = load_config(None, [])
    assert cfg.data.kind == "csv_text" and cfg.data.train == "builtin:banking77/train.csv"
    assert load_config("configs/banking77.yaml", []) == cfg


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load = load_distill_config if path.name.startswith("distill_") else load_config
    load(path, [])  # a stale key or value in a shipped config raises ConfigError, naming it


def test_the_chars_config_is_the_default_with_character_ngrams():
    chars = load_config("configs/banking77_chars.yaml", [])
    assert chars.model.char_ngrams == 3 and chars.specialists.init == "generalist"
    default = load_config(None, ["model.char_ngrams=3", "specialists.init=generalist"])
    assert chars == default


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\nmodel:\n  hidden: [8, 8]\n")
    cfg = load_config(path, ["train.epochs=3", "data.val_fraction=0.2", "model.hidden=[4]"])
    assert cfg.train.epochs == 3 and cfg.model.hidden == [4] and cfg.data.val_fraction == 0.2
    assert cfg.train.lr == RunConfig().train.lr  # untouched defaults stay


def test_dumped_config_round_trips(tmp_path):
    cfg = load_config("configs/synthetic.yaml", ["seed=3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=-1", "train.epochs=-1"),
    ("train.epochs=0", "train.epochs=0"),
    ("train.epochs=abc", "train.epochs='abc'"),
    ("train.lr=0", "train.lr=0.0"),
    ("data.synthetic.n_classes=0", "data.synthetic.n_classes=0"),
    ("data.kind=parquet", "data.kind='parquet'"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5"),
    ("model.hidden=[0]", "model.hidden=[0]"),
    ("model.hidden=5", "model.hidden=5"),
    ("train.epochs=2.5", "train.epochs=2.5"),
    ("train.epoch=3", "train.epoch"),
    ("nonsense=1", "nonsense"),
    ("train=3", "train"),
    ("novalue", "novalue"),
    ("combine.top_n=0", "combine.top_n=0"),
    ("combine.dustbin=always", "combine.dustbin='always'"),
    ("combine.specialist_weight=0", "combine.specialist_weight=0.0"),
    ("peer.max_members=1", "peer.max_members=1"),
    ("train.max_norm=-1", "train.max_norm=-1"),
    ("specialists.init=random", "specialists.init='random'"),
    ("specialists.ngrams=-1", "specialists.ngrams=-1"),
    ("specialists.char_ngrams=9", "specialists.char_ngrams=9"),
    ("specialists.char_ngrams_min=-1", "specialists.char_ngrams_min=-1"),
    ("specialists.char_ngrams_min=4", "specialists.char_ngrams_min=4"),  # above the specialists' char_ngrams=3
    ("model.char_ngrams_min=0", "model.char_ngrams_min=0"),
    ("model.char_ngrams_min=2", "model.char_ngrams_min=2"),  # the model reads no character grams
    ("specialists.embed_dim=-1", "specialists.embed_dim=-1"),
    ("specialists.buckets=-1", "specialists.buckets=-1"),
    ("specialists.buckets=8", "specialists.buckets=8"),
    ("specialists.buckets=many", "specialists.buckets"),
    ("combine.significance=0", "combine.significance=0"),
    ("combine.significance=1.5", "combine.significance=1.5"),
    ("specialists.freeze=embedding", "specialists.freeze='embedding': expected a list, e.g. [embedding]"),
    ("specialists.freeze=[1]", "specialists.freeze[0]=1: expected a string"),
    ('specialists.freeze=[""]', "specialists.freeze=['']: names must not be empty"),
])
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_specialists_hashing_needs_fasttext_and_a_scratch_start():
    with pytest.raises(ConfigError, match=r"specialists.ngrams=1: needs model.name=fasttext"):
        load_config("configs/synthetic.yaml", ["specialists.init=scratch", "specialists.ngrams=1"])
    with pytest.raises(ConfigError, match=r"specialists.char_ngrams=3: needs model.name=fasttext"):
        load_config("configs/synthetic.yaml", ["specialists.char_ngrams=3"])  # auto: generalist for an mlp
    with pytest.raises(ConfigError, match=r"specialists.char_ngrams=3: needs .*specialists.init=scratch"):
        load_config(None, ["specialists.init=generalist", "specialists.char_ngrams=3"])  # must read its features
    cfg = load_config(None, ["specialists.init=scratch", "specialists.char_ngrams=4"])
    assert cfg.specialists.hashing() == {"char_ngrams": 4} and RunConfig().specialists.hashing() == {}
    assert load_config(None, ["specialists.init=scratch"]).specialists.hashing() == {}  # the model's own grams
    with pytest.raises(ConfigError, match=r"specialists.embed_dim=64: needs .*specialists.init=scratch"):
        load_config(None, ["specialists.init=generalist", "specialists.embed_dim=64"])  # its weights' size
    with pytest.raises(ConfigError, match=r"specialists.embed_dim=64: needs model.name=fasttext"):
        load_config("configs/synthetic.yaml", ["specialists.init=scratch", "specialists.embed_dim=64"])
    assert load_config(None, ["specialists.embed_dim=64"]).specialists.fresh_network() == {
        "char_ngrams": 3, "char_ngrams_min": 2, "embed_dim": 64, "buckets": 100_000}
    with pytest.raises(ConfigError, match=r"specialists.char_ngrams_min=2: needs .*specialists.init=scratch"):
        load_config(None, ["specialists.init=generalist", "specialists.char_ngrams_min=2"])
    with pytest.raises(ConfigError, match=r"specialists.buckets=5000: needs .*specialists.init=scratch"):
        load_config(None, ["specialists.init=generalist", "specialists.buckets=5000"])  # its table's size
    with pytest.raises(ConfigError, match=r"specialists.buckets=5000: needs model.name=fasttext"):
        load_config("configs/synthetic.yaml", ["specialists.init=scratch", "specialists.buckets=5000"])
    with pytest.raises(ConfigError, match=r"specialists.buckets=20000000: with specialists.embed_dim=128 a "
                                          r"specialist's embedding table would have 2560000000 weights"):
        load_config(None, ["specialists.buckets=20000000"])
    assert load_config(None, ["specialists.init=scratch", "specialists.buckets=5000"]).specialists.fresh_network() \
        == {"buckets": 5000}


def test_a_saved_default_config_restarted_from_the_generalist_is_told_which_keys_to_reset(tmp_path):
    saved = tmp_path / "config.yaml"  # as a run directory holds it: init=auto made concrete
    saved.write_text(dump_config(load_config(None)))
    with pytest.raises(ConfigError, match=r"specialists.char_ngrams=3: .*\(specialists.char_ngrams=-1 takes the "
                                          r"model's\)"):
        load_config(saved, ["specialists.init=generalist"])
    with pytest.raises(ConfigError, match=r"specialists.char_ngrams_min=2: .*\(specialists.char_ngrams_min=0 takes "):
        load_config(saved, ["specialists.init=generalist", "specialists.char_ngrams=-1"])
    with pytest.raises(ConfigError, match=r"specialists.buckets=100000: .*\(specialists.buckets=0 takes the model's\)"):
        load_config(saved, ["specialists.init=generalist", "specialists.char_ngrams=-1",
                            "specialists.char_ngrams_min=0"])
    reset = load_config(saved, ["specialists.init=generalist", "specialists.char_ngrams=-1",
                                "specialists.char_ngrams_min=0", "specialists.buckets=0"])
    assert reset.specialists == load_config(None, ["specialists.init=generalist"]).specialists


@pytest.mark.parametrize("overrides, buckets", [
    ([], 100_000),  # half the generalist's 200,000: as few validation errors (README, Performance)
    (["specialists.buckets=300000"], 300_000),  # what a user sets is kept
    (["model.buckets=50000"], 0),  # never more than the generalist's: its own
    (["specialists.init=scratch"], 0),  # a start the user names keeps the model's hashing
])
def test_auto_fasttext_specialists_hash_into_at_most_100k_buckets(overrides, buckets):
    assert load_config(None, overrides).specialists.buckets == buckets


@pytest.mark.parametrize("overrides, shortest", [
    ([], 2),  # character 2..3-grams: fewer validation errors than 1..3 (README, the frontier)
    (["specialists.char_ngrams_min=1"], 1),  # what a user sets is kept
    (["specialists.char_ngrams=1"], 0),  # single characters only: the model's shortest, 1
    (["specialists.init=scratch"], 0),  # a start the user names keeps the model's hashing
])
def test_auto_fasttext_specialists_read_character_grams_from_two_characters(overrides, shortest):
    cfg = load_config(None, overrides)
    assert cfg.specialists.char_ngrams_min == shortest


@pytest.mark.parametrize("path, overrides, init, char_ngrams", [
    (None, [], "scratch", 3),  # fasttext: fresh specialists on character 1..3-grams beside the words
    (None, ["specialists.char_ngrams=5"], "scratch", 5),  # the grams a user sets are kept
    (None, ["specialists.char_ngrams=0"], "scratch", 0),  # none
    (None, ["specialists.init=generalist"], "generalist", -1),  # the paper's start, the generalist's features
    ("configs/synthetic.yaml", [], "generalist", -1),  # other models: the paper's start
    ("configs/mnist.yaml", [], "generalist", -1),
])
def test_specialists_init_auto_is_made_concrete_for_the_model(path, overrides, init, char_ngrams, tmp_path):
    cfg = load_config(path, overrides)
    assert (cfg.specialists.init, cfg.specialists.char_ngrams) == (init, char_ngrams)
    # the run directory's config.yaml holds the concrete start, so a run reloads as it was trained
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    assert "init: auto" not in saved.read_text() and load_config(saved) == cfg


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hiden: [8]\n")
    with pytest.raises(ConfigError, match="model.hiden"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")


# ---------------------------------------------------------------------------
# `specialists distill` settings


def test_student_inherits_the_teacher_and_the_keys_given_win(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("teacher:\n  model: {name: mlp, hidden: [64]}\n  train: {epochs: 9}\n"
                    "student:\n  model: {hidden: [8]}\n")
    cfg = load_distill_config(path, ["student.train.lr=0.05"])
    assert cfg.student.model == dataclasses.replace(cfg.teacher.model, hidden=[8])
    assert cfg.student.train == dataclasses.replace(cfg.teacher.train, lr=0.05) and cfg.student.train.epochs == 9
    # student.model={...} replaces what the YAML gave under it: hidden is the teacher's again
    whole = load_distill_config(path, ["student.model={dropout: 0.0}"])
    assert whole.student.model == dataclasses.replace(whole.teacher.model, dropout=0.0)
    # without the keys given, a student.model is taken whole and a missing one is the teacher's
    mine = dataclasses.replace(cfg.teacher.model, name="cnn")
    resolved = resolve_student(DistillConfig(teacher=cfg.teacher, student=dataclasses.replace(cfg.student, model=mine,
                                                                                              train=None)))
    assert resolved.student.model == mine and resolved.student.train == cfg.teacher.train


def test_resolved_distill_config_round_trips(tmp_path):
    cfg = load_distill_config(None, ["teacher.model.name=mlp", "student.temperature=2", "transfer.omit_classes=[3]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_distill_config(path) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["teacher.source=both"], "teacher.source='both': must be one of ('combined', 'generalist', 'peers', 'hybrid')"),
    (["teacher.runs=[a, a]"], "teacher.runs=['a', 'a']: lists a run twice"),
    (["student.temperature=-2"], "student.temperature=-2.0: must be a finite number > 0"),
    (["transfer.omit_classes=[3, '3']"], "lists a class twice"),
    (["transfer.omit_classes=[a]", "transfer.keep_classes=[b]"], "set omit_classes or keep_classes, not both"),
    (["bias.step=0.00001"], "gives more than 200,001 shifts"),
])
def test_bad_distill_values_name_key_and_value(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_distill_config(None, overrides)
    assert fragment in str(err.value)


def test_data_keys_are_refused_with_teacher_runs():
    with pytest.raises(ConfigError, match="data come from the teacher run 'some/run'"):
        load_distill_config(None, ["teacher.runs=[some/run]", "data.kind=synthetic"])


def test_a_teacher_run_without_its_config_is_named(tmp_path):
    with pytest.raises(RunDirError, match="has no config.yaml"):
        load_distill_config(None, [f"teacher.runs=[{tmp_path}]"])
