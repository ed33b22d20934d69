import pytest

from jobs.frontier import VARIANTS, chosen_method, default_variants, summarise
from specialists.config import dump_config, load_config
from specialists.report.document import render_md


def record(val: int, test: int, full_models: int = 1, **extra) -> dict:
    return {"val_errors": val, "test_errors": test, "examples_x": 1.5, "cpu_seconds": 1.0,
            "full_models": full_models, "tempered": False, "variant": "default", "top_n": 2,
            "specialist_weight": 1.0, **extra}


def seed_results(peer: tuple, specialists: tuple, hybrid: tuple) -> dict:
    row = {"peer": record(*peer, full_models=2, variant=None),
           "specialists": record(*specialists), "specialists_fixed": record(*specialists),
           "hybrid": record(*hybrid, full_models=2, specialists_budget=0.25)}
    return {"generalist": {"test_errors": 500}, "budgets": {"0.5": row}}


def test_the_verdict_takes_b_or_c_by_validation_not_by_the_test_means():
    # (c) has the lower test mean (395 against 400) but (b) is better on validation on both seeds,
    # so the verdict compares (b)'s 400 with the peers' 398: not won.
    results = {0: seed_results(peer=(100, 398), specialists=(90, 400), hybrid=(95, 390)),
               1: seed_results(peer=(100, 398), specialists=(90, 400), hybrid=(95, 400))}
    doc, summary = summarise(results, [0.5], "t")
    text = render_md(doc)
    assert summary["means"]["chosen"][0.5] == 400.0
    assert "400 400 (400.0): +2.0" in text and "NOT won: (b), (b)" in text
    assert "-3.0" in text  # the lower test mean, (c)'s 395, printed beside it


def test_each_variant_scored_by_every_seed_gets_a_row_of_its_own():
    results = {0: seed_results(peer=(100, 398), specialists=(90, 400), hybrid=(95, 390)),
               1: seed_results(peer=(100, 398), specialists=(90, 400), hybrid=(95, 400))}
    for s, (a, b) in enumerate([((90, 400), (94, 410)), ((92, 404), (91, 402))]):
        results[s]["budgets"]["0.5"]["variants"] = {
            "scratch": record(*a, specialists_cpu_seconds=7.0), "scratch_chars3": record(*b, specialists_cpu_seconds=9.0)}
    results[1]["budgets"]["0.5"]["variants"]["widen2"] = record(80, 390, specialists_cpu_seconds=1.0)  # one seed only
    text = render_md(summarise(results, [0.5], "t")[0])
    assert "| 0.5 | scratch | 90 92 (91.0) | 400 404 (402.0) | 7.0 |" in text
    assert "| 0.5 | scratch_chars3 | 94 91 (92.5) | 410 402 (406.0) | 9.0 |" in text
    assert "widen2" not in text
    del results[0]["budgets"]["0.5"]["variants"]  # scored before the table existed: no rows, no error
    assert "Each training variant alone" not in render_md(summarise(results, [0.5], "t")[0])


def test_a_validation_tie_goes_to_the_method_with_fewer_full_models():
    row = seed_results(peer=(100, 398), specialists=(90, 400), hybrid=(90, 380))["budgets"]["0.5"]
    assert chosen_method(row) == "specialists"
    del row["hybrid"]
    assert chosen_method(row) == "specialists"
    row["hybrid"] = record(89, 380, full_models=2)
    assert chosen_method(row) == "hybrid"


@pytest.mark.parametrize("path, expected", [
    (None, ["generalist", "scratch", "scratch_chars3"]),
    ("configs/synthetic.yaml", ["generalist", "scratch"]),  # an mlp hashes nothing
])
def test_the_default_variants_are_the_papers_start_and_fresh_ones_each_a_valid_config(path, expected, tmp_path):
    variants = default_variants(load_config(path))
    assert variants == expected
    # as Seed.specialists applies them: over the base run's config.yaml, its defaults made concrete
    base = tmp_path / "config.yaml"
    base.write_text(dump_config(load_config(path, ["specialists.enabled=false", "peer.enabled=false"])))
    starts = {v: load_config(base, VARIANTS[v]).specialists for v in variants}
    assert (starts["generalist"].init, starts["generalist"].fresh_network()) == ("generalist", {})
    assert (starts["scratch"].init, starts["scratch"].fresh_network()) == ("scratch", {})  # the generalist's grams
    if "scratch_chars3" in starts:  # 1..3-grams, and the generalist's buckets
        assert starts["scratch_chars3"].fresh_network() == {"char_ngrams": 3, "char_ngrams_min": 1}
        assert load_config(base, VARIANTS["scratch_chars3_b100k"]).specialists.fresh_network() == {
            "char_ngrams": 3, "char_ngrams_min": 1, "buckets": 100_000}
        own = load_config(base).specialists  # what the base config's own specialists train
        assert load_config(base, VARIANTS["scratch_chars23_b100k"]).specialists == own
        assert own.fresh_network() == {"char_ngrams": 3, "char_ngrams_min": 2, "buckets": 100_000}
