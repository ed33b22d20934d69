"""Text features for every language: Unicode words, character n-grams, and old checkpoints that still read ASCII."""

import csv
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import specialists
from specialists.config import ConfigError, load_config
from specialists.models import (
    CACHED_TEXT_CHARS,
    SPEC_VERSION,
    CheckpointError,
    EncodedTexts,
    create_model,
    hash_ngrams,
    load_checkpoint,
    model_kwargs,
    save_checkpoint,
    tokenize,
    with_dustbin_head,
)
from specialists.train import predict_proba, train_model

BANKING77 = Path(specialists.__file__).parent / "datasets" / "banking77"

# A frozen copy of the hashing that every checkpoint before spec version 2 was trained with.
_V1_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def v1_features(text: str, buckets: int, ngrams: int) -> np.ndarray:
    words = _V1_WORD.findall(text.lower())
    grams = [" ".join(words[i:i + n]) for n in range(1, ngrams + 1) for i in range(len(words) - n + 1)]
    return np.array([zlib.crc32(g.encode()) % buckets for g in grams], dtype=np.int64)


# ---------------------------------------------------------------- words


@pytest.mark.parametrize("split", ["train.csv", "test.csv"])
def test_banking77_features_are_unchanged(split):
    # The default run's texts get exactly the features they had before Unicode tokens.
    with open(BANKING77 / split, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    assert len(texts) > 3000
    for text in texts:
        expected = v1_features(text, 200_000, 2)
        np.testing.assert_array_equal(hash_ngrams(text, 200_000, 2), expected, err_msg=text)
        np.testing.assert_array_equal(hash_ngrams(text, 200_000, 2, tokenizer="ascii"), expected, err_msg=text)


def test_ascii_text_keeps_its_words():
    text = "I can't top-up my card?! Card #4 was DECLINED twice... (ATM, 10:30)"
    assert tokenize(text) == tokenize(text, "ascii") == _V1_WORD.findall(text.lower())
    assert tokenize("my_card") == ["my_card"] and tokenize("my_card", "ascii") == ["my", "_", "card"]


def test_accented_and_non_latin_words_stay_whole():
    assert tokenize("Un café, s'il vous plaît!") == ["un", "café", ",", "s'il", "vous", "plaît", "!"]
    assert tokenize("café", "ascii") == ["caf", "é"]  # what version 1 did
    assert tokenize("cafe\u0301") == ["café"]  # a combining accent is the same word
    assert tokenize("Привет, МИР!") == ["привет", ",", "мир", "!"]
    assert tokenize("STRASSE Straße") == ["strasse", "strasse"]  # casefold, not lower
    assert tokenize("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs are marks, not \w
    assert tokenize("don\u2019t") == tokenize("don't") == ["don't"]
    assert tokenize("مرحبا بالعالم") == ["مرحبا", "بالعالم"]


def test_chinese_and_japanese_give_related_character_grams():
    zh = "我喜欢吃苹果。"
    assert tokenize(zh) == ["我喜欢吃苹果", "。"]  # no spaces: a clause is one word
    assert len(hash_ngrams(zh, 1 << 20, 1)) == 2
    grams = hash_ngrams(zh, 1 << 20, 1, char_ngrams=2)
    # 2 words, 6 + 5 characters grams of the clause, 1 of "。"
    assert len(grams) == 2 + 6 + 5 + 1
    # Sentences that share a word written without spaces share features.
    other = set(hash_ngrams("他不喜欢苹果", 1 << 20, 1, char_ngrams=2).tolist())
    shared = set(grams.tolist()) & other
    assert {zlib.crc32(f" {g}".encode()) % (1 << 20) for g in ["苹果", "喜欢", "苹", "果"]} <= shared
    ja = hash_ngrams("東京に行きました", 1 << 20, 2, char_ngrams=3)
    assert len(ja) == 1 + 8 + 7 + 6
    assert len(hash_ngrams("東京に行きました", 1 << 20, 2)) == 1


def test_character_grams_do_not_collide_with_words():
    assert tokenize("a") == ["a"]
    word, char = hash_ngrams("a", 1 << 20, 1, char_ngrams=1)
    assert word != char
    np.testing.assert_array_equal(hash_ngrams("a b", 1 << 20, 2, char_ngrams=0), v1_features("a b", 1 << 20, 2))


def test_unknown_tokenizer_is_refused():
    with pytest.raises(ValueError, match="'bytes'"):
        tokenize("x", "bytes")
    with pytest.raises(ValueError, match="'bytes'"):
        create_model("fasttext", n_classes=3, buckets=64, tokenizer="bytes")


# ---------------------------------------------------------------- config


def test_char_ngrams_is_validated_and_reaches_the_model():
    cfg = load_config(None, ["model.char_ngrams=2"])
    kwargs = model_kwargs(cfg.model, "text", (), 4)
    assert kwargs["char_ngrams"] == 2
    model = create_model("fasttext", **kwargs)
    assert model.spec["kwargs"]["char_ngrams"] == 2
    assert len(model.encode(["我喜欢吃苹果"]).ids[0]) == 1 + 6 + 5  # one word, its 1- and 2-character grams
    assert load_config(None, []).model.char_ngrams == 0
    for bad in ("-1", "9"):
        with pytest.raises(ConfigError, match="model.char_ngrams"):
            load_config(None, [f"model.char_ngrams={bad}"])


def test_char_ngrams_min_leaves_out_the_shorter_grams_and_reaches_the_model():
    # "card": 4 + 3 + 2 character 1..3-grams; from 2 characters, 3 + 2
    assert len(hash_ngrams("card", 1 << 20, 1, char_ngrams=3)) == 1 + 9
    shorter = hash_ngrams("card", 1 << 20, 1, char_ngrams=3, char_ngrams_min=2)
    assert len(shorter) == 1 + 5
    assert set(shorter) < set(hash_ngrams("card", 1 << 20, 1, char_ngrams=3))  # the same ids, fewer of them
    cfg = load_config(None, ["model.char_ngrams=3", "model.char_ngrams_min=2"])
    model = create_model("fasttext", **model_kwargs(cfg.model, "text", (), 4))
    assert model.spec["kwargs"]["char_ngrams_min"] == 2
    np.testing.assert_array_equal(model.encode(["card"]).ids[0], hash_ngrams("card", cfg.model.buckets, 2, 3,
                                                                             char_ngrams_min=2))
    with pytest.raises(ValueError, match="char_ngrams_min=4"):
        create_model("fasttext", n_classes=3, buckets=64, char_ngrams=3, char_ngrams_min=4)


# ---------------------------------------------------------------- checkpoints


TEXTS = ["I lost my card", "Où est ma carte ? Je l’ai perdue", "Привет, где моя карта?", "我的卡丢了", "top_up failed"]


def _scores(model, texts):
    return predict_proba(model, model.encode(texts))


def _v1_scores(model, texts):
    """What a version-1 model predicted: the same weights on the frozen version-1 features."""
    ids = [v1_features(t, model.buckets, model.ngrams) for t in texts]
    return predict_proba(model, EncodedTexts(ids))


def test_old_checkpoint_predicts_as_before(tmp_path):
    torch.manual_seed(0)
    model = create_model("fasttext", n_classes=4, buckets=512, embed_dim=8, ngrams=2, hidden=[8], dropout=0.0)
    assert model.spec["version"] == SPEC_VERSION
    save_checkpoint(model, tmp_path / "old")
    spec = json.loads((tmp_path / "old" / "model.json").read_text())
    del spec["version"]  # a checkpoint written before spec versions
    (tmp_path / "old" / "model.json").write_text(json.dumps(spec))
    save_checkpoint(model, tmp_path / "new")

    old, new = load_checkpoint(tmp_path / "old"), load_checkpoint(tmp_path / "new")
    assert old.tokenizer == "ascii" and new.tokenizer == "unicode"
    before = _v1_scores(model, TEXTS)
    np.testing.assert_array_equal(_scores(old, TEXTS), before)
    # The version matters: a new checkpoint reads the non-ASCII texts differently, the ASCII ones alike.
    after = _scores(new, TEXTS)
    np.testing.assert_array_equal(after[0], before[0])
    assert not np.allclose(after[1:4], before[1:4])

    # Re-saved, and grown into a specialist, the old model keeps its words.
    save_checkpoint(old, tmp_path / "resaved")
    again = load_checkpoint(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "model.json").read_text())["version"] == SPEC_VERSION
    np.testing.assert_array_equal(_scores(again, TEXTS), before)
    specialist = with_dustbin_head(old, [0, 2])
    assert specialist.tokenizer == "ascii"
    np.testing.assert_array_equal(specialist.encode(TEXTS).ids[2], old.encode(TEXTS).ids[2])


def test_a_version_2_checkpoint_reads_character_grams_from_one_character(tmp_path):
    save_checkpoint(create_model("fasttext", n_classes=3, buckets=64, embed_dim=4, hidden=[4], char_ngrams=3), tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    assert "char_ngrams_min" not in spec["kwargs"]  # as version 2 wrote them
    (tmp_path / "model.json").write_text(json.dumps({**spec, "version": 2}))
    model = load_checkpoint(tmp_path)
    assert model.char_ngrams_min == 1
    np.testing.assert_array_equal(model.encode(["card"]).ids[0], hash_ngrams("card", 64, 2, 3))


@pytest.mark.parametrize("version", [SPEC_VERSION + 1, 0, "2", True])
def test_unknown_spec_version_is_refused(tmp_path, version):
    save_checkpoint(create_model("fasttext", n_classes=3, buckets=64, embed_dim=4, hidden=[4]), tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**spec, "version": version}))
    with pytest.raises(CheckpointError, match="spec version"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- learning


def _chinese_topics(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Sentences without spaces whose topic is one two-character word among random fillers."""
    topics = [["苹果", "香蕉", "葡萄"], ["汽车", "火车", "飞机"], ["下雨", "下雪", "刮风"]]
    who = ["我", "他", "她", "我们", "老师", "朋友", "妈妈", "孩子"]
    when = ["今天", "明天", "昨天", "早上", "晚上", "周末", "现在", ""]
    verb = ["喜欢", "看见", "想起", "讨厌", "说到", "等着", "谈论", "记得"]
    end = ["。", "了", "吗", "呢", "！", ""]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(topics), n)
    texts = ["".join([rng.choice(who), rng.choice(when), rng.choice(verb), rng.choice(topics[y]), rng.choice(end)])
             for y in labels]
    return texts, labels


def test_character_grams_let_fasttext_learn_text_without_spaces():
    train_x, train_y = _chinese_topics(600, seed=0)
    val_x, val_y = _chinese_topics(150, seed=1)
    test_x, test_y = _chinese_topics(300, seed=2)
    accuracy, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as threads=1 in the other tests: the cores are shared
    try:
        for char_ngrams in (0, 2):
            cfg = load_config(None, ["model.buckets=4096", "model.embed_dim=16", "model.hidden=[16]",
                                     "model.dropout=0.0", f"model.char_ngrams={char_ngrams}", "train.epochs=6",
                                     "train.lr=0.02", "train.batch_size=32", "train.patience=0"])
            model = create_model("fasttext", **model_kwargs(cfg.model, "text", (), 3))
            train_model(model, model.encode(train_x), train_y, model.encode(val_x), val_y, cfg.train, seed=0,
                        progress=False)
            accuracy[char_ngrams] = float((_scores(model, test_x).argmax(1) == test_y).mean())
    finally:
        torch.set_num_threads(threads)
    # Whole clauses as words: an unseen sentence is an unseen word, so about chance (1/3).
    assert accuracy[0] < 0.6, accuracy
    assert accuracy[2] > 0.95, accuracy


def test_a_text_is_hashed_once_per_hashing_and_shared_read_only():
    """FastText.encode caches each text's ids: a run encodes the same texts in several stages."""
    chars = create_model("fasttext", n_classes=3, buckets=4096, embed_dim=4, hidden=[4], char_ngrams=2)
    words = create_model("fasttext", n_classes=3, buckets=512, embed_dim=4, hidden=[4])
    first, again, other = chars.encode(TEXTS), chars.encode(TEXTS), words.encode(TEXTS)
    for text, ids, same, own in zip(TEXTS, first.ids, again.ids, other.ids):
        np.testing.assert_array_equal(ids, hash_ngrams(text, 4096, 2, char_ngrams=2))
        np.testing.assert_array_equal(own, hash_ngrams(text, 512, 2))  # another hashing: its own entry
        assert same is ids and not ids.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            ids[0] = -1
    long = "a long text " * (CACHED_TEXT_CHARS // 12 + 1)  # hashed anew: the cache's memory stays bounded
    first, again = chars.encode([long]).ids[0], chars.encode([long]).ids[0]
    assert first is not again and first.flags.writeable
    np.testing.assert_array_equal(first, again)
