import pytest

from specialists.config import ConfigError, RunConfig, dump_config, load_config


def test_defaults_are_the_banking77_config():
    cfg = load_config(None, [])
    assert cfg.data.kind == "csv_text" and cfg.data.train == "builtin:banking77/train.csv"
    assert load_config("configs/banking77.yaml", []) == cfg


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
])
def test_bad_values_name_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hiden: [8]\n")
    with pytest.raises(ConfigError, match="model.hiden"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
