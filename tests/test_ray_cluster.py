"""A real Ray cluster: `ray start --head` on loopback, a job submitted through the Jobs API.

The head runs with token authentication (Ray's default since 2.5x) on a token
made for the test, in its own temp dir and process group; it is stopped by
its own process id at the end (not `ray stop`, which would stop every Ray
instance on the machine, other people's test runs included).
"""

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import REPO, TINY_SYNTHETIC, agent_ports, can_unshare, free_port, tiny_config
from specialists.config import ConfigError, RayConfig
from specialists.parallel import preflight, ray_session
from specialists.stages import run_pipeline

RAY = Path(sys.executable).parent / "ray"
EXCLUDES = [".git", ".venv", "runs", "build", "*.egg-info", ".pytest_cache", "__pycache__"]


def _start_head(env: dict, temp_dir: str, attempts: int = 3):
    """(process, GCS port, dashboard port, log file) of a `ray start --head` whose GCS listens.

    Ports are picked free just before the start, and a Ray instance another
    test left running may take one meanwhile: a head that exits while it
    starts is started again on fresh ports, and its log shown if none starts."""
    for attempt in range(attempts):
        port, dashboard = free_port(), free_port()
        cmd = [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *agent_ports()]
        log_path = Path(temp_dir) / f"head{attempt}.log"
        log = open(log_path, "w")
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 90
        while head.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return head, port, dashboard, log
            time.sleep(0.5)
        log.close()
        if head.poll() is None:  # neither listening nor gone: stop it and report
            os.killpg(head.pid, signal.SIGKILL)
            break
    pytest.fail(f"ray start --head did not start in {attempt + 1} attempt(s):\n{log_path.read_text()[-3000:]}")


@pytest.fixture
def ray_head():
    """(dashboard URL, auth headers, process, GCS address, token) of a head node started for one test."""
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head, port, dashboard, log = _start_head(env, temp_dir)
    try:
        yield f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"}, head, f"127.0.0.1:{port}", token
    finally:
        head.send_signal(signal.SIGINT)  # `ray start --block` stops what it started on SIGINT
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its process group still running
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client(url, headers, head, timeout=90):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            return JobSubmissionClient(url, headers=headers)
        except Exception:  # the dashboard is still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _submit(client, head, timeout: float = 300.0, **job) -> str:
    """submit_job, retried while the head's job agent is still starting (Ray answers 500 "No available agent")."""
    deadline = time.monotonic() + timeout
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_job_submitted_to_a_ray_head_trains_the_specialists(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    url, headers, head, _, _ = ray_head
    client = _client(url, headers, head)
    out = tmp_path / "job-run"
    args = ["--out", str(out), "--quiet", *TINY_SYNTHETIC, "cluster.classes_per_cluster=10", "specialists.enabled=true",
            "ray.cpus_per_task=1", "peer.enabled=false"]
    entrypoint = shlex.join([sys.executable, "-m", "jobs.run", *args])
    job = _submit(client, head, entrypoint=entrypoint, runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})
    deadline = time.monotonic() + 240
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status} after 240s:\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "ray: the Ray cluster at" in logs  # joined the head through RAY_ADDRESS, no local instance
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["specialists"]["count"] == 4 and len(metrics["specialists"]["per_specialist"]) == 4
    for m in range(4):
        info = json.loads((out / "specialists" / str(m) / "specialist.json").read_text())
        assert info["worker"]["pid"] != os.getpid()
    assert metrics["specialists"]["test_conditional_accuracy"] > 0.5


def test_the_address_check_joins_as_ray_init_would(ray_head, tmp_path):
    # A head that would refuse this machine's token is named before training (ray.init would retry for a minute
    # and then blame the address); one that ray.init can join passes, even with an HTTP proxy in the environment,
    # which Ray's channels do not use.
    url, headers, head, address, token = ray_head
    _client(url, headers, head)  # the head is up
    script = "\n".join([
        "from specialists.config import ConfigError, RayConfig",
        "from specialists.parallel import preflight",
        "try:",
        f"    print('joined', preflight(RayConfig(address={address!r}, connect_timeout_s=10), log=lambda s: None))",
        "except ConfigError as err:",
        "    print('ConfigError:', err)",
    ])
    home = tmp_path / "home"  # Ray also reads ~/.ray/auth_token
    (home / ".ray").mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    cases = [({}, "uses token authentication, and this machine has no token"),
             ({"RAY_AUTH_TOKEN": token}, "ray.init sends this machine's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                                         "or ~/.ray/auth_token) only with RAY_AUTH_MODE=token"),
             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}, "refused this machine's token"),
             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, None),
             ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "http_proxy": "http://127.0.0.1:9"}, None)]
    for extra, refusal in cases:
        done = subprocess.run([sys.executable, "-c", script], env=base | extra, capture_output=True, text=True,
                              timeout=120)
        said = done.stdout + done.stderr
        if refusal is None:
            assert "joined {'nodes': 1, 'cpus': 2.0" in done.stdout, said
        else:
            assert f"ConfigError: ray.address='{address}': the Ray cluster at {address} " in done.stdout, said
            assert refusal in done.stdout, said


def test_an_unreachable_address_fails_within_seconds(tmp_path):
    assert not ray.is_initialized()
    closed = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"ray.address='127.0.0.1:{closed}': no Ray cluster answers"):
        run_pipeline(tiny_config("specialists.enabled=true", f"ray.address=127.0.0.1:{closed}"), tmp_path / "run",
                     log=lambda s: None, progress=False)
    assert time.monotonic() - started < 30  # checked before the generalist trains; ray.init alone retries for minutes
    assert not (tmp_path / "run").exists()
    assert not ray.is_initialized()


def test_a_dashboard_address_is_refused_at_once(tmp_path, monkeypatch):
    # RAY_ADDRESS=http://HEAD:8265 is what `ray job submit` takes; left exported, it is not a cluster to join
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS='http://127.0.0.1:8265' is a dashboard's address, what "
                                          r"`ray job submit` takes; a run joins a cluster at its head's port"):
        run_pipeline(tiny_config("specialists.enabled=true"), tmp_path / "run", log=lambda s: None, progress=False)
    assert not (tmp_path / "run").exists() and not ray.is_initialized()


def test_something_that_is_not_ray_is_not_taken_for_a_cluster():
    with socket.socket() as server:  # a listening TCP port that speaks no gRPC
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ConfigError, match=f"ray.address='127.0.0.1:{port}'"):
            with ray_session(RayConfig(address=f"127.0.0.1:{port}", connect_timeout_s=2.0), log=lambda s: None):
                pass
    assert time.monotonic() - started < 5 and not ray.is_initialized()


def _tiny_run_script(out) -> str:
    """Python that runs a tiny run with specialists into `out` and prints a ConfigError it raises."""
    return "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(REPO / 'tests')!r})",
        "from conftest import tiny_config",
        "from specialists.config import ConfigError",
        "from specialists.stages import run_pipeline",
        "try:",
        f"    run_pipeline(tiny_config('specialists.enabled=true'), {str(out)!r}, log=lambda s: None, progress=False)",
        "except ConfigError as err:",
        "    print('ConfigError:', err)",
    ])


@pytest.mark.skipif(not can_unshare("n"), reason="no `unshare -rn` here (user network namespaces)")
def test_a_local_instance_without_loopback_fails_before_training(tmp_path):
    # A fresh network namespace has its loopback interface down: ray.init would retry for minutes there.
    out = tmp_path / "run"
    script = _tiny_run_script(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(["unshare", "-rn", sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ConfigError: a local Ray instance needs to reach 127.0.0.1" in done.stdout, done.stdout + done.stderr
    assert "ip link set lo up" in done.stdout
    assert not out.exists()  # checked before the run directory is made


@pytest.mark.skipif(not can_unshare("m"), reason="no `unshare -rm` here (user mount namespaces)")
def test_a_read_only_home_without_a_token_fails_before_training(tmp_path):
    # Ray's local instance would write a new auth token to ~/.ray/auth_token, after the generalist has trained.
    home, out = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    script = _tiny_run_script(out)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    quoted = shlex.quote(str(home))
    mount = f"mount --bind {quoted} {quoted} && mount -o remount,ro,bind {quoted}"  # home read-only, in the namespace
    done = subprocess.run(["unshare", "-rm", "bash", "-c", f"{mount} && exec {shlex.quote(sys.executable)} -c "
                           f"{shlex.quote(script)}"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (f"ConfigError: a local Ray instance uses token authentication (Ray's default) and, finding no token, "
            f"would write one to {home / '.ray' / 'auth_token'}, but {home} cannot be written") in done.stdout, \
        done.stdout + done.stderr
    assert not out.exists() and not (home / ".ray").exists()


def test_a_temp_dir_too_deep_for_ray_sockets_fails_before_training(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 70)  # Ray's Unix sockets would lie some 70 bytes below it
    deep.mkdir()
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(deep))
    with pytest.raises(ConfigError, match=rf"TMPDIR='{deep}': a local Ray instance's socket paths there would be "
                                          r"\d+ bytes, over the \d+ a Unix socket allows; set RAY_TMPDIR"):
        run_pipeline(tiny_config("specialists.enabled=true"), tmp_path / "run", log=lambda s: None, progress=False)
    assert not (tmp_path / "run").exists() and not ray.is_initialized()
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")  # what the message advises
    assert preflight(RayConfig(), log=lambda s: None)["cpus"] >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_on_a_machine_without_any_fail_before_ray_starts():
    started = time.monotonic()
    with pytest.raises(ConfigError, match="ray.gpus_per_task=1 but this machine has no CUDA GPU"):
        with ray_session(RayConfig(gpus_per_task=1.0), log=lambda s: None):
            pass
    assert time.monotonic() - started < 2 and not ray.is_initialized()
