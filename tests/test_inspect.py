"""`specialists inspect`: the clustering report from a model's saved outputs, no run directory."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import specialists
from specialists.arrays import ArrayFileError, open_rows
from specialists.cli import main
from specialists.config import ConfigError
from specialists.inspection import INSPECT_FILES, InspectError

C, GROUP, N = 24, 6, 1500


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """Logits of a model that confuses classes within 4 planted groups of 6; labels; names."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N)
    z = rng.normal(size=(N, C))
    z[np.arange(N)[:, None], (y // GROUP * GROUP)[:, None] + np.arange(GROUP)] += 3.0  # the true class's group
    z[np.arange(N), y] += 1.5
    names = [f"intent {i} é" for i in range(C)]
    return z.astype(np.float32), y, names


@pytest.fixture
def files(tmp_path, planted):
    z, y, names = planted
    np.save(tmp_path / "z.npy", z)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "classes.json").write_text(json.dumps(names), encoding="utf-8")
    return tmp_path


def planted_groups():
    return [list(range(g, g + GROUP)) for g in range(0, C, GROUP)]


def run(**kw):
    kw.setdefault("classes_per_cluster", GROUP)
    return specialists.inspect(**kw)


def test_logits_file_to_report_recovers_planted_groups(files, planted):
    out = files / "report"
    result = run(logits=files / "z.npy", labels=files / "y.npy", classes=files / "classes.json", out=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(INSPECT_FILES)
    clusters = json.loads((out / "clusters.json").read_text(encoding="utf-8"))
    assert [g["classes"] for g in clusters["groups"]] == planted_groups()
    assert clusters["groups"][0]["names"][0] == "intent 0 é"
    assert clusters["examples"] == N and clusters["signal"] == "logits"
    # errors of this model stay inside the planted groups, and the report says so
    z, y, _ = planted
    wrong = z.argmax(1) != y
    inside = (z.argmax(1)[wrong] // GROUP == y[wrong] // GROUP).mean()
    assert clusters["errors_inside_clusters"] == pytest.approx(inside)
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "Most confused pairs" in html and "intent 0 é" in html
    assert result.paths["html"] == out / "index.html"


def test_without_labels_the_report_shows_clusters_only(files):
    out = files / "nolabels"
    run(logits=files / "z.npy", out=out)
    clusters = json.loads((out / "clusters.json").read_text())
    assert [g["classes"] for g in clusters["groups"]] == planted_groups()
    assert clusters["groups"][0]["names"][0] == "0"  # no names: column indices
    assert "errors_inside_clusters" not in clusters
    assert "No validation errors given" in (out / "summary.md").read_text()


def test_formats_and_batch_sizes_give_the_same_clusters(tmp_path, files, planted):
    z, y, names = planted
    np.savez_compressed(tmp_path / "zc.npz", logits=z, labels=y)  # members picked by name
    with open(tmp_path / "z.csv", "w", encoding="utf-8") as handle:
        handle.write(",".join(names) + "\n")  # a header: the class names
        np.savetxt(handle, z, delimiter=",", fmt="%.9g")
    reference = run(logits=files / "z.npy", labels=files / "y.npy", out=tmp_path / "ref").clusters
    for source, labels, batch in [(tmp_path / "zc.npz", tmp_path / "zc.npz", 7), (tmp_path / "z.csv", y, 333)]:
        got = run(logits=source, labels=labels, out=tmp_path / f"out{batch}", batch_size=batch).clusters
        assert got["errors_inside_clusters"] == reference["errors_inside_clusters"]
        assert [g["classes"] for g in got["groups"]] == [g["classes"] for g in reference["groups"]], source
        assert got["inertia"] == pytest.approx(reference["inertia"], rel=1e-4), source
    assert got["groups"][0]["names"] == names[:GROUP]  # the CSV's header names the classes


def test_probabilities_and_temperature_match_the_logits_path(tmp_path, planted):
    z, _, _ = planted
    inertia = {}
    for temperature in (1.0, 3.0):
        from_logits = run(logits=z, out=tmp_path / f"l{temperature}", temperature=temperature).clusters
        from_probs = run(probs=softmax(z.astype(np.float64)), out=tmp_path / f"p{temperature}",
                         temperature=temperature).clusters
        assert [g["classes"] for g in from_probs["groups"]] == [g["classes"] for g in from_logits["groups"]]
        np.testing.assert_allclose([d for g in from_probs["groups"] for d in g["distances"]],
                                   [d for g in from_logits["groups"] for d in g["distances"]], atol=1e-4)
        inertia[temperature] = from_logits["inertia"]
    assert inertia[1.0] != pytest.approx(inertia[3.0], rel=1e-3)  # T changes the covariance clustered


def test_row_readers_return_the_file_exactly(tmp_path):
    x = np.random.default_rng(1).normal(size=(103, 5)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.savez(tmp_path / "s.npz", a=x)
    np.savez_compressed(tmp_path / "d.npz", a=x, b=x[:3])
    with zipfile.ZipFile(tmp_path / "d.npz") as archive:
        assert archive.getinfo("a.npy").compress_type == zipfile.ZIP_DEFLATED
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", fmt="%.9g")
    for name, key in [("c.npy", None), ("f.npy", None), ("s.npz", None), ("d.npz", "a"), ("t.csv", None)]:
        rows = open_rows(tmp_path / name, key=key)
        starts, batches = zip(*rows.batches(10))
        assert starts == tuple(range(0, 103, 10)), name
        np.testing.assert_array_equal(np.concatenate(batches).astype(x.dtype), x, err_msg=name)
    with pytest.raises(ArrayFileError, match=r"d\.npz holds 2 arrays \['a', 'b'\]"):
        open_rows(tmp_path / "d.npz")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "c.npy").read_bytes()[:-7])
    with pytest.raises(ArrayFileError, match=r"cut\.npy: not a readable \.npy file"):
        list(open_rows(tmp_path / "cut.npy").batches(50))


def test_the_same_folder_is_replaced_by_a_new_report(files):
    out = files / "again"
    run(logits=files / "z.npy", out=out)
    run(logits=files / "z.npy", out=out, n_clusters=2)
    assert json.loads((out / "clusters.json").read_text())["n_groups"] == 2
    assert sorted(p.name for p in files.iterdir() if p.name.startswith(".")) == []  # no temporary folder left


# ----------------------------------------------------------------------------- bad input


def refused(files, match, **kw):
    out = files / "refused"
    with pytest.raises(InspectError, match=match):
        run(out=out, **kw)
    assert not out.exists()
    assert [p.name for p in files.iterdir() if p.name.startswith(".")] == []


def test_probabilities_that_do_not_sum_to_one_suggest_logits(files, planted):
    scores = 1 / (1 + np.exp(-planted[0]))  # sigmoid scores: positive, rows do not sum to 1
    scores[:5] /= scores[:5].sum(1, keepdims=True)
    np.save(files / "scores.npy", scores)
    refused(files, r"scores\.npy, row 5: probabilities sum to .*not 1.*pass --logits", probs=files / "scores.npy")
    refused(files, r"z\.npy, row 0: a negative probability .*pass --logits", probs=files / "z.npy")


def test_non_finite_values_name_the_first_bad_row(files, planted):
    z = planted[0].copy()
    z[1234, 3] = np.nan
    z[1400, 0] = np.inf
    np.save(files / "nan.npy", z)
    refused(files, r"nan\.npy, row 1234: column 3 is nan", logits=files / "nan.npy", batch_size=100)
    z[1234, 3] = 0
    np.save(files / "inf.npy", z)
    refused(files, r"inf\.npy, row 1400: column 0 is inf", logits=files / "inf.npy")


def test_labels_of_the_wrong_length(files, planted):
    np.save(files / "short.npy", planted[1][:-1])
    refused(files, rf"short\.npy has {N - 1} labels but the outputs have {N} rows", logits=files / "z.npy",
            labels=files / "short.npy")
    # a CSV's row count is known only at its end: still refused before anything is written
    np.savetxt(files / "z.csv", planted[0][:N - 2], delimiter=",")
    refused(files, rf"short\.npy has {N - 1} labels but .*z\.csv has {N - 2} rows", logits=files / "z.csv",
            labels=files / "short.npy")


def test_labels_outside_the_classes(files, planted):
    y = planted[1].copy()
    y[7] = C
    np.save(files / "big.npy", y)
    refused(files, rf"big\.npy, row 7: class {C} is outside \[0, {C}\)", logits=files / "z.npy",
            labels=files / "big.npy")


def test_labels_as_names_need_the_classes(files, planted):
    _, y, names = planted
    (files / "names.txt").write_text("label\n" + "\n".join(names[i] for i in y) + "\n", encoding="utf-8")
    refused(files, r"names\.txt holds class names .*pass the classes file", logits=files / "z.npy",
            labels=files / "names.txt")
    by_name = run(logits=files / "z.npy", labels=files / "names.txt", classes=files / "classes.json",
                  out=files / "byname").clusters
    by_index = run(logits=files / "z.npy", labels=files / "y.npy", out=files / "byindex").clusters
    assert by_name["errors_inside_clusters"] == by_index["errors_inside_clusters"]


def test_classes_file_of_the_wrong_length(files, planted):
    names = planted[2]
    (files / "short.txt").write_text("\n".join(names[:-1]) + "\n", encoding="utf-8")
    refused(files, rf"short\.txt lists {C - 1} class names but .*z\.npy has {C} columns", logits=files / "z.npy",
            classes=files / "short.txt")
    (files / "long.json").write_text(json.dumps(names + ["extra"]))
    refused(files, rf"long\.json lists {C + 1} class names", logits=files / "z.npy", classes=files / "long.json")


def test_both_or_neither_outputs(files):
    refused(files, "exactly one of probs .* or logits .*got both", logits=files / "z.npy", probs=files / "z.npy")
    refused(files, "got neither")


def test_wrong_shapes_and_formats(files):
    refused(files, r"y\.npy has shape \(1500,\); expected logits \(N, C\)", logits=files / "y.npy")
    (files / "z.txt").write_text("1,2\n")
    refused(files, r"z\.txt: unknown format '\.txt'", logits=files / "z.txt")
    refused(files, r"missing\.npy: no such file", logits=files / "missing.npy")


def test_settings_are_checked_before_writing(files):
    with pytest.raises(ConfigError, match="cluster.split does not apply to inspect"):
        run(logits=files / "z.npy", out=files / "x", split="train")
    with pytest.raises(ConfigError, match=r"cluster\.n_clusters=99 must be <= n_classes=24"):
        run(logits=files / "z.npy", out=files / "x", n_clusters=99)
    with pytest.raises(ConfigError, match="unknown key 'cluster.colour'"):
        run(logits=files / "z.npy", out=files / "x", colour=1)
    assert not (files / "x").exists()


def test_an_out_folder_with_other_files_is_refused(files):
    (files / "busy").mkdir()
    (files / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InspectError, match="holds files that are not an inspect report"):
        run(logits=files / "z.npy", out=files / "busy")
    assert [p.name for p in (files / "busy").iterdir()] == ["notes.txt"]


# ----------------------------------------------------------------------------- command line


def test_cli_without_ray(files):
    code = ("import sys; from specialists.cli import main; "
            f"rc = main(['inspect', '--logits', {str(files / 'z.npy')!r}, '--labels', {str(files / 'y.npy')!r}, "
            f"'--out', {str(files / 'cli')!r}, 'cluster.classes_per_cluster={GROUP}', 'seed=3']); "
            "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "errors inside one cluster" in done.stdout and "report:" in done.stdout
    assert json.loads((files / "cli" / "clusters.json").read_text())["settings"]["seed"] == 3


def test_cli_errors_are_one_line(files, capsys):
    assert main(["inspect", "--probs", str(files / "z.npy"), "--out", str(files / "bad")]) == 2
    assert "pass --logits" in capsys.readouterr().err
    assert main(["inspect", "--logits", str(files / "z.npy"), "cluster.split=val"]) == 2
    with pytest.raises(SystemExit):  # argparse: --probs or --logits is required
        main(["inspect", "--labels", str(files / "y.npy")])
    assert not (files / "bad").exists()
