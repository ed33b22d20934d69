"""The one atomic writer: file modes, and what a failed write leaves behind (real files)."""

import os
import stat

import pytest

from specialists import rundir
from specialists.rundir import atomic_write, write_bytes, write_json, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_0666_less_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    written = [
        write_text(tmp_path / "config.yaml", "seed: 0\n"),
        write_json(tmp_path / "metrics.json", {"a": 1}),
        write_bytes(tmp_path / "report" / "heatmap.png", b"\x89PNG"),
        atomic_write(tmp_path / "covariance.npy", lambda tmp: open(tmp, "wb").close()),
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_a_rewrite_replaces_the_content_and_leaves_no_temp(tmp_path):
    target = write_bytes(tmp_path / "index.html", b"old")
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]


def test_failed_replace_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "summary.md"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rundir.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_failed_write_callback_leaves_nothing(tmp_path):
    def crash(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "model.safetensors", crash)
    assert list(tmp_path.iterdir()) == []
