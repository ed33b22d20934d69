"""The run directory contract and atomic file writes.

A run directory holds `config.yaml`, `classes.json`, `metrics.json` and one
folder per stage (`generalist/`, ...). Every file lands through a temporary
file in the same folder, flushed to disk, and `os.replace`, so a killed run
never leaves a half-written file that a later stage would trust.

One process at a time writes a run: `RunDir.lock()` holds `run.lock`, made with
O_EXCL and holding the writer's PID and host. A lock whose process is gone from
this host is stale and taken over; a live one (or one from another host, which
cannot be checked) refuses the second writer with RunDirError naming both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable


class RunDirError(ValueError):
    """A run directory is missing, incomplete or not ours."""


# What a file system answers where it will not take writes here: permissions, a read-only mount.
WRITES_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync the file, then move it onto `path`.

    A reader never sees a half-written file, and a crash leaves the old one intact.
    The file's mode is 0o666 less the umask (0644 under the usual umask 022), as for
    any file `open` creates: run outputs are meant to be read by others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _new_temp_file(path: Path) -> str:
    """A new empty file beside `path`, created with mode 0o666 so that the kernel applies
    the umask (tempfile.mkstemp would make it 0600 whatever the umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as err:  # e.g. no permission to write the folder: name the file, not its temporary
            raise OSError(err.errno, err.strerror, str(path)) from None
        return str(tmp)
    raise FileExistsError(f"no free temporary file name beside {path}")


def replace_folder(new: str | Path, path: str | Path) -> Path:
    """Move the complete folder `new` (made beside `path`) onto `path`, so that a folder of outputs
    appears whole or not at all. An existing `path` is swapped out first and removed after: the
    caller has decided that it may be replaced."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return path
    old = path.parent / f".{path.name}.{secrets.token_hex(4)}.old"
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
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
    lock_file = property(lambda self: self.root / "run.lock")  # while a process writes the run (see lock)

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

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] = print):
        """Hold `run.lock` for the block, so that no other process writes this run meanwhile.

        RunDirError, naming the holder's PID and host and the lock file, while
        another live process holds it. A lock left by a process that is gone
        from this host (killed, machine restarted) is taken over, with a line
        to `log`. The lock is removed when the block ends, even on Ctrl-C.
        """
        token = _acquire_lock(self.lock_file, log)
        try:
            yield self
        finally:
            _release_lock(self.lock_file, token)

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


# ---------------------------------------------------------------------------
# the run lock


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc), to tell a reused PID; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])  # field 22: starttime
    except (OSError, IndexError, ValueError):
        return None


def _lock_alive(holder: dict) -> bool:
    """Whether the process that wrote a lock may still run. One on another host cannot be checked: it is."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True  # not ours to judge; the message says to delete the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    started, recorded = _process_start(pid), holder.get("process_start")
    return recorded is None or started is None or started == recorded  # else the PID was reused


def _read_lock(path: Path) -> tuple[dict | None, str | None]:
    """(the lock's fields, its text); (None, None) if it is gone; ({}, text) if it holds no lock record."""
    for _ in range(20):  # a writer between its O_EXCL create and its write: give it a moment
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            time.sleep(0.05)
            continue
        return (holder if isinstance(holder, dict) else {}), text
    return {}, text


def _take_over(path: Path, text: str) -> bool:
    """Remove a stale lock whose content is `text`; False if another process changed it first.

    Renamed aside and checked, not unlinked: a process that took the stale lock over a moment ago
    has made a new file, which must stay (it is put back).
    """
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.stale")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    if aside.read_text() == text:
        aside.unlink()
        return True
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink()
    return False


def _acquire_lock(path: Path, log: Callable[[str], None]) -> str:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": secrets.token_hex(8)}
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder, text = _read_lock(path)
            if holder is None:  # released meanwhile
                continue
            who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            if not holder:
                raise RunDirError(f"{path.parent} is locked by {path}, which holds no PID and host; if no other "
                                  f"`specialists` command uses this run, delete {path}") from None
            if _lock_alive(holder):
                raise RunDirError(f"{path.parent} is in use by {who} since {holder.get('since', '?')} (lock file "
                                  f"{path}); wait for it to finish. If that process is gone, delete {path}") from None
            if _take_over(path, text):
                log(f"run lock: {path} was left by {who}, which is gone; taking it over")
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(me) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return me["token"]
    raise RunDirError(f"{path.parent}: other processes keep taking the run lock {path}; is another command "
                      "running on this run?")


def _release_lock(path: Path, token: str) -> None:
    holder, _ = _read_lock(path)
    if holder and holder.get("token") == token:  # ours: not a lock another process took over
        path.unlink()
