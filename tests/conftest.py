"""Shared fixtures: tiny real data sets and small real runs."""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from specialists.config import load_config

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"

# A small synthetic set: 40 classes in 4 planted groups; trains in a few seconds.
TINY_SYNTHETIC = [
    "data.kind=synthetic",
    "data.synthetic.n_classes=40",
    "data.synthetic.n_groups=4",
    "data.synthetic.n_features=16",
    "data.synthetic.subspace_dim=4",
    "data.synthetic.train_per_class=30",
    "data.synthetic.test_per_class=10",
    "data.synthetic.class_spread=1.5",
    "model.name=mlp",
    "model.hidden=[32]",
    "model.dropout=0.0",
    "train.epochs=15",
    "train.batch_size=64",
    "train.lr=0.01",
    "threads=1",
]


def tiny_config(*overrides: str):
    # groups of the planted size: 4 specialists (the default, 20 classes a cluster, would make 2); the tiny
    # set's specialists need their whole schedule to beat its generalist: no compute budget (test_hybrid sets one).
    # The combination served as configured: its gain on these few validation rows would not pass the run's sign
    # test, and the choice on validation has tests of its own (test_stages.py)
    return load_config(None, [*TINY_SYNTHETIC, "cluster.classes_per_cluster=10", "specialists.budget=0",
                              "combine.choose=false", *overrides])


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for a test module that asks for it, connected as the runs connect."""
    from specialists.config import RayConfig
    from specialists.parallel import ray_session

    with ray_session(RayConfig(num_cpus=2), log=lambda line: None):
        yield


def can_unshare(flag: str) -> bool:
    """Whether `unshare -r<flag>` works here (user namespaces: n for network, m for mounts)."""
    return bool(shutil.which("unshare")) and subprocess.run(["unshare", f"-r{flag}", "true"],
                                                          capture_output=True).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """`ray start` options for every port a node's agents would otherwise take at a fixed default: a second
    node on the host, or a Ray instance another process runs, would hold them (head: "No available agent")."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


def write_csv(path: Path, rows: list[list[str]], header=("text", "intent")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def text_rows(n_per_class: int, seed: int = 0) -> list[list[str]]:
    """Three intents with distinct vocabularies, so a fastText model can learn them quickly."""
    rng = np.random.default_rng(seed)
    vocab = {
        "card_lost": ["lost", "card", "stolen", "missing", "wallet"],
        "top_up": ["top", "up", "balance", "add", "money"],
        "exchange": ["exchange", "rate", "currency", "euro", "dollar"],
    }
    rows = []
    for label, words in vocab.items():
        for _ in range(n_per_class):
            rows.append([" ".join(rng.choice(words, size=5)), label])
    rng.shuffle(rows)
    return rows


@pytest.fixture
def csv_pair(tmp_path):
    train = write_csv(tmp_path / "train.csv", text_rows(30, seed=0))
    test = write_csv(tmp_path / "test.csv", text_rows(10, seed=1))
    return train, test


def csv_overrides(train: Path, test: Path) -> list[str]:
    return ["data.kind=csv_text", f"data.train={train}", f"data.test={test}", "data.text_column=text",
            "data.label_column=intent", "model.buckets=4096", "model.embed_dim=16", "model.hidden=[16]",
            "train.epochs=8", "train.batch_size=16", "train.lr=0.02", "threads=1"]
