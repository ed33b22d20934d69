"""The run directory contract and atomic file writes.

A run directory holds `config.yaml`, `classes.json`, `metrics.json` and one
folder per stage (`generalist/`, ...). Every file lands through a temporary
file in the same folder and `os.replace`, so a killed run never leaves a
half-written file that a later stage would trust.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class RunDirError(ValueError):
    """A run directory is missing, incomplete or not ours."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then move the finished file onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path} is not valid JSON: {err}") from None


class RunDir:
    """Paths of one run directory, and its metrics file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    classes = property(lambda self: self.root / "classes.json")
    metrics = property(lambda self: self.root / "metrics.json")
    generalist = property(lambda self: self.root / "generalist")
    clusters = property(lambda self: self.root / "clusters.json")
    specialists = property(lambda self: self.root / "specialists")
    report = property(lambda self: self.root / "report")
    peers = property(lambda self: self.root / "peers")  # the equal-compute peer ensemble (peer.py)

    def create(self, resume: bool = False) -> "RunDir":
        """Make the folder; refuse to mix a new run into a non-empty one."""
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} exists and is not a folder")
        if not resume and self.root.exists() and any(self.root.iterdir()):
            raise RunDirError(
                f"run directory {self.root} already holds files; pick another --out or pass --resume {self.root}"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def require(self, *paths: Path, what: str = "") -> None:
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} does not exist")
        for path in paths:
            if not path.exists():
                stage = f" (run the {what} stage first)" if what else ""
                raise RunDirError(f"{self.root} has no {path.relative_to(self.root)}{stage}")

    def read_classes(self) -> list[str]:
        self.require(self.classes)
        classes = read_json(self.classes)
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise RunDirError(f"{self.classes} must be a JSON list of class names")
        return classes

    def read_metrics(self) -> dict:
        return read_json(self.metrics) if self.metrics.exists() else {}

    def update_metrics(self, updates: dict) -> dict:
        """Merge `updates` into metrics.json one level deep (sections are dicts)."""
        metrics = self.read_metrics()
        for key, value in updates.items():
            if isinstance(value, dict) and isinstance(metrics.get(key), dict):
                metrics[key].update(value)
            else:
                metrics[key] = value
        write_json(self.metrics, metrics)
        return metrics
