"""A real two-node Ray cluster on loopback: `ray start --head`, then `ray start --address` for a second node.

Each node is its own raylet with 1 CPU, so with one CPU per specialist the
specialists must spread over both. A small `specialists run` goes in through
the Jobs API; its driver (on the head) writes the run directory, the
specialists' weights come back through Ray (the tasks are never told the run
directory), and the result equals a local run with the same seed. A second
test SIGKILLs the worker node while it trains a specialist: that specialist is
retried on the head and the run completes. Both nodes run with token
authentication in their own temp dir and process groups, and are stopped by
process id (never `ray stop`, which would stop other people's Ray instances).
"""

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from conftest import REPO, TINY_SYNTHETIC, agent_ports, free_port, tiny_config
from jobs.procs import ray_processes_under
from specialists.stages import run_pipeline

pytestmark = pytest.mark.slow  # two Ray nodes, a job, and a local run to compare with: a minute or more

RAY = Path(sys.executable).parent / "ray"
EXCLUDES = [".git", ".venv", "runs", "build", "*.egg-info", ".pytest_cache", "__pycache__"]
# 8 specialists of seconds each (not the budget's fraction of a second): more work than the head alone
# finishes while the second node starts its first worker and imports torch (tens of seconds when the machine
# is loaded; Ray reuses a leased worker for the next task)
RUN = [*TINY_SYNTHETIC, "cluster.classes_per_cluster=5", "specialists.enabled=true", "ray.cpus_per_task=1",
       "peer.enabled=false", "specialists.budget=0", "specialists.epochs=400", "specialists.patience=0"]
VOLATILE = {"seconds", "cpu_seconds", "worker", "weights_sha256"}


def _nodes(url: str, headers: dict) -> dict[str, list[str]]:
    """{state: [node ids]} from the head's State API ({} while the dashboard is not up)."""
    request = urllib.request.Request(f"{url}/api/v0/nodes", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            nodes = json.loads(answer.read())["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return {}
    states: dict[str, list[str]] = {}
    for node in nodes:
        states.setdefault(node["state"], []).append(node["node_id"])
    return states


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # `ray start --block` stops what it started on SIGINT
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything of its process group still running
    except ProcessLookupError:
        pass


@pytest.fixture
def two_nodes(monkeypatch):
    """(dashboard URL, auth headers, head process, worker-node process), both nodes registered."""
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="raym", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # token auth; a lost node is declared dead within seconds, not the default tens of seconds
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_health_check_period_ms="500",
               RAY_health_check_failure_threshold="4")
    port, dashboard = free_port(), free_port()
    head_cmd = [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}", "--num-cpus=1", "--disable-usage-stats",
                f"--temp-dir={temp_dir}", *agent_ports()]
    # its own temp dir too: on one host, nodes sharing one would share (and garbage-collect) the job's files
    worker_cmd = [str(RAY), "start", "--block", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                  "--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp_dir}/w", *agent_ports()]
    logs = [open(Path(temp_dir) / name, "w") for name in ("head.log", "worker.log")]
    head = subprocess.Popen(head_cmd, stdout=logs[0], stderr=subprocess.STDOUT, env=env, start_new_session=True)
    worker = None
    try:
        time.sleep(3)  # the head's GCS first
        worker = subprocess.Popen(worker_cmd, stdout=logs[1], stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local run in the test starts its own instance
        url, headers = f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 180
        while len(_nodes(url, headers).get("ALIVE", [])) < 2:
            assert head.poll() is None and worker.poll() is None, "a `ray start` exited"
            assert time.monotonic() < deadline, "the two nodes did not register within 180s"
            time.sleep(1)
        yield url, headers, head, worker
    finally:
        for process in (worker, head):
            if process is not None:
                _stop(process)
        for log in logs:
            log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job(url, headers, head, args: list[str], timeout: float = 600.0):
    """Submit `python -m jobs.run ARGS` and wait for it; returns (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    deadline = time.monotonic() + timeout
    entrypoint = shlex.join([sys.executable, "-m", "jobs.run", *args])
    while True:  # the dashboard, then its job agent, are still starting
        assert head.poll() is None, "ray start --head exited"
        try:
            client = JobSubmissionClient(url, headers=headers)
            job = client.submit_job(entrypoint=entrypoint,
                                    runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
            break
        except Exception:
            assert time.monotonic() < deadline, "could not submit the job"
            time.sleep(1)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    return status, client.get_job_logs(job)


def _specialist(out: Path, m: int) -> dict:
    return json.loads((out / "specialists" / str(m) / "specialist.json").read_text())


def _stable(info: dict) -> dict:
    info = {k: v for k, v in info.items() if k not in VOLATILE}
    return {**info, "metrics": {k: v for k, v in info["metrics"].items() if k not in VOLATILE}}


def test_specialists_spread_over_two_nodes_equal_a_local_run(two_nodes, tmp_path):
    from ray.job_submission import JobStatus

    url, headers, head, _ = two_nodes
    out = tmp_path / "cluster-run"
    status, logs = _job(url, headers, head, ["--out", str(out), "--quiet", *RUN])
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "2 node(s), 2 CPUs" in logs  # joined the cluster through RAY_ADDRESS
    infos = [_specialist(out, m) for m in range(8)]
    where = [(info["id"], info["worker"]["node_id"][:8], info["metrics"]["seconds"]) for info in infos]
    assert len({info["worker"]["node_id"] for info in infos}) == 2, (where, logs[-3000:])  # both nodes trained some

    local = run_pipeline(tiny_config(*RUN[len(TINY_SYNTHETIC):]), tmp_path / "local-run", log=lambda s: None,
                         progress=False)
    for m, info in enumerate(infos):
        folder = f"specialists/{m}/model.safetensors"
        assert (out / folder).read_bytes() == (local.root / folder).read_bytes()  # the very same weights
        assert _stable(info) == _stable(_specialist(local.root, m))
    cluster_section = json.loads((out / "metrics.json").read_text())["specialists"]
    local_section = local.read_metrics()["specialists"]
    for section in (cluster_section, local_section):
        section.pop("profile", None)  # wall seconds of the stage's parts
        for key in ("seconds", "cpu_seconds"):
            section.pop(key)
            for entry in section["per_specialist"]:
                entry.pop(key)
    assert cluster_section == local_section


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker node's processes through /proc")
def test_a_killed_worker_node_has_its_specialists_retried_on_the_head(two_nodes, tmp_path):
    import threading

    from ray.job_submission import JobStatus

    url, headers, head, worker = two_nodes
    out = tmp_path / "run"
    killed = []

    def kill_the_worker_node_mid_specialist():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if ray_processes_under(worker.pid, "ray::train_specialist_task"):
                time.sleep(1.0)  # let it get into training
                os.killpg(worker.pid, signal.SIGKILL)  # the node: its raylet, agents and workers
                killed.append(time.time())
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_the_worker_node_mid_specialist, daemon=True)
    killer.start()
    status, logs = _job(url, headers, head, ["--out", str(out), "--quiet", *RUN, "specialists.epochs=150",
                                             "ray.max_retries=3"])
    killer.join(timeout=5)
    assert killed, "no specialist was seen training on the worker node"
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["specialists"]
    assert metrics["count"] == 8 and [e["id"] for e in metrics["per_specialist"]] == list(range(8))
    dead = _nodes(url, headers).get("DEAD", [])
    assert len(dead) == 1  # the worker node, seen lost by the cluster
    on_dead = [m for m in range(8) if _specialist(out, m)["worker"]["node_id"] == dead[0]]
    assert len(on_dead) < 8  # the one training there when it died was retried on the head
    for m in on_dead:  # a result kept from the lost node was received before it died, never after
        assert (out / "specialists" / str(m) / "specialist.json").stat().st_mtime <= killed[0] + 1.0
    for m in range(8):
        assert _specialist(out, m)["metrics"]["epochs_run"] == 150
