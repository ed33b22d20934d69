"""The cluster and report stages of a real run: generalist -> covariance -> faiss groups -> report."""

import json

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import tiny_config
from specialists.cli import main
from specialists.stages import run_pipeline


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "planted"
    cfg = tiny_config("data.synthetic.n_classes=60", "data.synthetic.n_groups=6", "cluster.n_clusters=6",
                     "cluster.split=train",  # 1,620 unlabeled rows: 3 per class in val is too few
                     "specialists.enabled=false")
    run_pipeline(cfg, out, log=lambda s: None, progress=False)
    return out


def test_recovers_planted_groups(planted_run):
    clusters = json.loads((planted_run / "clusters.json").read_text())
    planted = json.loads((planted_run / "planted_groups.json").read_text())
    truth = np.empty(60, int)
    for g, members in enumerate(planted):
        truth[members] = g
    assignment = np.array(clusters["assignment"])
    assert (assignment >= 0).all()
    assert adjusted_rand_score(truth, assignment) > 0.9
    metrics = json.loads((planted_run / "metrics.json").read_text())
    assert metrics["cluster"]["planted_adjusted_rand"] == pytest.approx(adjusted_rand_score(truth, assignment))


def test_clusters_json_names_every_group(planted_run):
    clusters = json.loads((planted_run / "clusters.json").read_text())
    classes = json.loads((planted_run / "classes.json").read_text())
    assert clusters["n_groups"] == len(clusters["groups"]) == 6
    for group in clusters["groups"]:
        assert group["names"] == [classes[c] for c in group["classes"]]
        assert len(group["distances"]) == group["size"]
    assert clusters["settings"]["n_clusters"] == 6 and clusters["split"] == "train"


def test_report_holds_every_cluster(planted_run):
    html = (planted_run / "report" / "index.html").read_text()
    summary = (planted_run / "report" / "summary.md").read_text()
    clusters = json.loads((planted_run / "clusters.json").read_text())
    for group in clusters["groups"]:
        for name in group["names"]:
            assert name in html and name in summary
    for png in ("heatmap.png", "cluster_sizes.png"):
        data = (planted_run / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_same_seed_same_groups(planted_run, tmp_path):
    cfg = tiny_config("data.synthetic.n_classes=60", "data.synthetic.n_groups=6", "cluster.n_clusters=6",
                     "cluster.split=train",  # 1,620 unlabeled rows: 3 per class in val is too few
                     "specialists.enabled=false")
    run_pipeline(cfg, tmp_path / "again", log=lambda s: None, progress=False)
    first = json.loads((planted_run / "clusters.json").read_text())["groups"]
    second = json.loads((tmp_path / "again" / "clusters.json").read_text())["groups"]
    assert [g["classes"] for g in first] == [g["classes"] for g in second]


def test_recluster_and_report_commands(planted_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(planted_run, run)
    assert main(["cluster", str(run), "cluster.n_clusters=3"]) == 0
    assert "errors inside one cluster" in capsys.readouterr().out
    assert json.loads((run / "clusters.json").read_text())["n_groups"] <= 3
    assert "n_clusters: 3" in (run / "config.yaml").read_text()
    (run / "report" / "index.html").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "index.html").is_file()


def test_report_out_writes_elsewhere_and_only_reads_the_run(planted_run, tmp_path, capsys):
    # For a run the user cannot write to (a colleague's, a read-only share): the run is read, never written.
    before = {p: p.read_bytes() for p in sorted(planted_run.rglob("*")) if p.is_file()}
    out = tmp_path / "elsewhere"
    assert main(["report", str(planted_run), "--out", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in sorted(planted_run.rglob("*")) if p.is_file()} == before
    summary = (out / "summary.md").read_text()
    for group in json.loads((planted_run / "clusters.json").read_text())["groups"]:
        assert all(name in summary for name in group["names"])
    assert {p.name for p in out.iterdir()} == {"index.html", "summary.md", "heatmap.png", "cluster_sizes.png"}


def test_report_out_that_is_a_file_is_refused(planted_run, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["report", str(planted_run), "--out", str(taken)]) == 2
    assert f"--out {taken} exists and is not a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine"


@pytest.mark.parametrize("args, expect", [
    (["cluster", "{run}", "cluster.n_clusters=61"], "cluster.n_clusters=61 must be <= n_classes=60"),
    (["cluster", "{run}", "cluster.n_clusters=-1"], "cluster.n_clusters=-1"),
    (["cluster", "{run}", "train.epochs=3"], "only takes cluster.* overrides"),
    (["cluster", "{run}", "cluster.max_cluster_size=2", "cluster.n_clusters=6"],
     "cluster.max_cluster_size=2 * n_clusters=6 < n_classes=60"),
    (["report", "{empty}"], "has no config.yaml"),
])
def test_bad_cluster_requests(planted_run, tmp_path, capsys, args, expect):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(planted_run, run)
    before = (run / "clusters.json").read_bytes()
    (tmp_path / "empty").mkdir()
    args = [a.format(run=run, empty=tmp_path / "empty") for a in args]
    assert main(args) == 2
    assert expect in capsys.readouterr().err
    assert (run / "clusters.json").read_bytes() == before  # nothing half-written


def test_run_without_generalist_is_refused(tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "classes.json").write_text(json.dumps([str(i) for i in range(77)]))
    assert main(["cluster", str(run)]) == 2
    assert "no generalist" in capsys.readouterr().err


def test_a_broken_generalist_is_not_reported_as_a_cluster_setting(planted_run, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    run = tmp_path / "copy"
    shutil.copytree(planted_run, run)
    weights = run / "generalist" / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.startswith("head.") and k.endswith("weight"))
    state[key][3, 0] = np.nan  # what a diverged training would leave
    save_file(state, weights)
    before = (run / "clusters.json").read_bytes()
    assert main(["cluster", str(run)]) == 2
    err = capsys.readouterr().err
    assert "generalist" in err and "non-finite logits" in err and "cluster." not in err
    assert (run / "clusters.json").read_bytes() == before
