"""Ray worker processes of a process tree, found through Linux /proc (benchmarks and tests)."""

from __future__ import annotations

import os


def ray_processes_under(root: int, title: str = "ray::") -> list[int]:
    """Pids descended from `root` whose command line starts with `title` (Ray sets a worker's to
    `ray::<task>` while it runs one)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().startswith(title.encode()):
                    found.append(pid)
        except OSError:
            pass
    return found
