"""Recovery (issue 16): checks before training, the run lock, `--resume` with fixes, Ctrl-C, and a killed
run that resumes bit-identically.

Real runs, files, processes and signals. The fast tests need no Ray: every run they start is refused
before Ray would start, or trains no specialists. The slow ones start one local Ray instance in this
process; the runs they interrupt are `specialists run` processes that join it (`ray.address`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import REPO, TINY_SYNTHETIC, tiny_config
from specialists.cli import main
from specialists.config import ConfigError, RayConfig, load_config
from specialists.rundir import RunDir, RunDirError
from specialists.stages import fork_run, run_pipeline

QUIET = dict(log=lambda s: None, progress=False)
ON = "specialists.enabled=true"
GENERALIST_ONLY = ("specialists.enabled=false", "peer.enabled=false", "train.epochs=3")
# Specialists that each train for a moment, so that a run can be stopped between two of them.
SLOW_SPECIALISTS = (*TINY_SYNTHETIC, "cluster.classes_per_cluster=10", ON, "peer.enabled=false",
                    "specialists.epochs=60", "specialists.patience=0", "specialists.budget=0")
HINT = "resume with `specialists run --resume {}`"


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture(scope="module")
def generalist_run(tmp_path_factory):
    """A finished run without specialists (no Ray): the base of the resume and lock tests."""
    out = tmp_path_factory.mktemp("runs") / "generalist"
    run_pipeline(tiny_config(*GENERALIST_ONLY), out, **QUIET)
    return out


@pytest.fixture
def run_copy(generalist_run, tmp_path):
    import shutil

    shutil.copytree(generalist_run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------
# the run lock


def test_lock_is_held_for_the_block_and_refuses_a_second_holder(tmp_path):
    run = RunDir(tmp_path)
    with run.lock(log=lambda s: None):
        holder = json.loads(run.lock_file.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunDirError) as err:
            with run.lock(log=lambda s: None):
                pass
        message = str(err.value)
        assert f"process {os.getpid()} on host {socket.gethostname()}" in message and str(run.lock_file) in message
        assert json.loads(run.lock_file.read_text()) == holder  # the refused one changed nothing
    assert not run.lock_file.exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has this id now (short of a reuse within the test)


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    run = RunDir(tmp_path)
    pid = _dead_pid()
    run.lock_file.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier"}))
    lines = []
    with run.lock(log=lines.append):
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    assert lines == [f"run lock: {run.lock_file} was left by process {pid} on host {socket.gethostname()}, "
                     "which is gone; taking it over"]
    assert not run.lock_file.exists()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    """This process's id, but a process that started at another time: the PID was reused."""
    run = RunDir(tmp_path)
    stale = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": 1}
    run.lock_file.write_text(json.dumps(stale))
    lines = []
    with run.lock(log=lines.append):
        pass
    assert len(lines) == 1 and "which is gone; taking it over" in lines[0]


@pytest.mark.parametrize("content, expect", [
    (json.dumps({"pid": 1, "host": "another-machine"}), "process 1 on host another-machine"),
    ("", "holds no PID and host"),
    ("not json", "holds no PID and host"),
], ids=["another host", "empty", "garbage"])
def test_lock_that_cannot_be_judged_is_refused_naming_the_file(tmp_path, content, expect):
    run = RunDir(tmp_path)
    run.lock_file.write_text(content)
    with pytest.raises(RunDirError) as err:
        with run.lock(log=lambda s: None):
            pass
    assert expect in str(err.value) and f"delete {run.lock_file}" in str(err.value)
    assert run.lock_file.read_text() == content


def test_a_second_run_on_a_locked_run_directory_is_refused(run_copy):
    """A real other process holds the lock, as a concurrent `--resume` would: the second is refused and
    writes nothing (metrics.json keeps its content); once the holder is done, the resume works."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from specialists.rundir import RunDir\n"
                               f"with RunDir({str(run_copy)!r}).lock():\n"
                               "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(run_copy)
        with pytest.raises(RunDirError) as err:
            run_pipeline(None, run_copy, resume=True, **QUIET)
        assert f"process {holder.pid} on host {socket.gethostname()}" in str(err.value)
        assert str(RunDir(run_copy).lock_file) in str(err.value)
        assert snapshot(run_copy) == before
    finally:
        holder.communicate("", timeout=60)  # the holder leaves its block and removes the lock
    assert holder.returncode == 0 and not RunDir(run_copy).lock_file.exists()
    lines = []
    run_pipeline(None, run_copy, resume=True, log=lines.append, progress=False)
    assert "generalist: already trained, skipped" in lines
    assert not RunDir(run_copy).lock_file.exists()


# ---------------------------------------------------------------------------
# --resume with overrides


@pytest.mark.parametrize("override", ["train.lr=0.5", "seed=1", "cluster.classes_per_cluster=5", "combine.top_n=1",
                                      "specialists.enabled=true", "data.synthetic.n_classes=20"])
def test_resume_refuses_an_override_that_changes_results(run_copy, capsys, override):
    before = snapshot(run_copy)
    assert main(["run", "--quiet", "--resume", str(run_copy), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {override.split('=')[0]}=")
    assert "may change only settings that do not change results" in err and "Traceback" not in err
    assert snapshot(run_copy) == before


def test_resume_takes_settings_that_do_not_change_results(run_copy, capsys):
    run = RunDir(run_copy)
    generalist = run.read_metrics()["generalist"]
    assert main(["run", "--quiet", "--resume", str(run_copy), "threads=2", "device=cpu", "ray.num_cpus=1",
                 "ray.connect_timeout_s=3"]) == 0
    saved = load_config(run.config)  # the fix is saved: the next resume uses it too
    assert (saved.threads, saved.device, saved.ray.num_cpus, saved.ray.connect_timeout_s) == (2, "cpu", 1, 3.0)
    assert saved.train == tiny_config(*GENERALIST_ONLY).train
    assert run.read_metrics()["generalist"] == generalist  # not trained again
    assert "resume: threads=2 (was 1)" in capsys.readouterr().out


def test_resume_refuses_a_config_file_that_changes_results(run_copy, tmp_path, capsys):
    config = tmp_path / "other.yaml"
    config.write_text("train:\n  lr: 0.5\n")
    assert main(["run", "--resume", str(run_copy), "--config", str(config)]) == 2
    assert "train.lr=0.5 (the run has 0.01)" in capsys.readouterr().err


def _refused_to_root_too(folder: str) -> bool:
    try:
        os.close(os.open(os.path.join(folder, ".specialists-probe"), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except PermissionError:
        return True
    except OSError:
        return False
    os.unlink(os.path.join(folder, ".specialists-probe"))
    return False


@pytest.mark.skipif(not _refused_to_root_too("/sys/kernel"),
                    reason="needs a folder where creating a file is refused, to root too (/sys/kernel)")
def test_a_refused_write_ends_with_the_file_and_a_resume_hint(run_copy, capsys):
    import shutil

    report = run_copy / "report"
    shutil.rmtree(report)
    report.symlink_to("/sys/kernel")  # the report stage's files cannot be written
    assert main(["run", "--quiet", "--resume", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {report}{os.sep}") and ": Permission denied\n" in err  # the file, not a temporary
    assert HINT.format(run_copy) in err and "Traceback" not in err
    assert not RunDir(run_copy).lock_file.exists()
    report.unlink()  # fixed: the resume finishes the run
    assert main(["run", "--quiet", "--resume", str(run_copy)]) == 0
    assert (report / "index.html").is_file()


# ---------------------------------------------------------------------------
# checks before training


@pytest.fixture
def no_ray():
    if ray.is_initialized():  # left by another module: these runs must meet Ray as a user's would
        ray.shutdown()


def _refused_before_training(cfg, out: Path, error=ConfigError) -> str:
    with pytest.raises(error) as err:
        run_pipeline(cfg, out, **QUIET)
    assert not out.exists()  # refused before the run directory (and the generalist) was made
    assert not ray.is_initialized()
    return str(err.value)


@pytest.mark.parametrize("override, expect", [
    ("ray.cpus_per_task=64", "ray.cpus_per_task=64 but the largest node of the local Ray instance has"),
    ("ray.address=127.0.0.1:{closed}", "ray.address='127.0.0.1:{closed}': no Ray cluster answers"),
    pytest.param("ray.gpus_per_task=1", "ray.gpus_per_task=1 but this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
], ids=["cpus", "address", "gpus"])
def test_ray_settings_are_checked_before_the_generalist_trains(no_ray, tmp_path, override, expect):
    closed = closed_port()
    message = _refused_before_training(tiny_config(ON, override.format(closed=closed)), tmp_path / "run")
    assert expect.format(closed=closed) in message


def test_ray_client_address_honours_the_connect_timeout(no_ray, tmp_path):
    """A port that accepts connections but is no Ray Client server: ray.init would retry for over 30 s;
    the check gives up after ray.connect_timeout_s."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        message = _refused_before_training(
            tiny_config(ON, f"ray.address=ray://127.0.0.1:{port}", "ray.connect_timeout_s=2"), tmp_path / "run")
    assert message.startswith(f"ray.address='ray://127.0.0.1:{port}': no Ray client server answers at "
                              f"127.0.0.1:{port} within 2s")


@pytest.mark.parametrize("overrides, expect", [
    ([], "error: combine.top_n=3: the data have 2 classes"),  # issue 16, bug 1: the default top_n
    (["combine.top_n=2", "cluster.split=nowhere.csv"], "error: cluster.split='nowhere.csv': not val/train/test"),
], ids=["top_n", "cluster.split"])
def test_settings_the_data_make_impossible_are_refused_before_training(tmp_path, capsys, overrides, expect):
    from conftest import write_csv

    two = write_csv(tmp_path / "two.csv", [[f"{label} text {i}", label] for label in "AB" for i in range(10)])
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), "data.kind=csv_text", f"data.train={two}", f"data.test={two}",
                 "data.label_column=intent", "train.epochs=2", "peer.enabled=false", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expect) and "Traceback" not in err
    assert not out.exists()


def test_bad_ray_address_at_resume_follows_override_then_environment_then_saved(no_ray, generalist_run, tmp_path,
                                                                                 monkeypatch):
    saved, environment, given = closed_port(), closed_port(), closed_port()
    fork = fork_run(generalist_run, tmp_path / "fork", [ON, f"ray.address=127.0.0.1:{saved}"])
    assert (fork.root / "clusters.json").is_file()  # generalist and clusters kept: the specialists are next
    before = snapshot(fork.root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=rf"^ray.address='127.0.0.1:{saved}': no Ray cluster answers"):
        run_pipeline(None, fork.root, resume=True, **QUIET)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{environment}")
    lines = []
    with pytest.raises(ConfigError, match=rf"^RAY_ADDRESS='127.0.0.1:{environment}': no Ray cluster answers"):
        run_pipeline(None, fork.root, resume=True, log=lines.append, progress=False)
    assert f"resume: joining RAY_ADDRESS='127.0.0.1:{environment}', not the saved " \
           f"ray.address='127.0.0.1:{saved}' (pass ray.address=... to choose)" in lines
    with pytest.raises(ConfigError, match=rf"^ray.address='127.0.0.1:{given}': no Ray cluster answers"):
        run_pipeline(None, fork.root, resume=True, overrides=[f"ray.address=127.0.0.1:{given}"], **QUIET)
    assert snapshot(fork.root) == before  # every refusal came before anything was written
    assert not ray.is_initialized()


def test_ray_started_early_is_taken_over_by_the_stage_and_shut_down_after(no_ray):
    from specialists.parallel import ray_session, start_early, stop_early

    assert start_early(RayConfig(num_cpus=1), workers=3) == 1  # the workers warming here: as many as it has CPUs
    assert start_early(RayConfig(num_cpus=1), workers=3) == 0  # begun already: nothing more
    lines = []
    with ray_session(RayConfig(num_cpus=1), log=lines.append) as resources:
        assert ray.is_initialized() and resources["cpus"] == 1
    assert lines == ["ray: the local Ray instance, 1 node(s), 1 CPUs, 0 GPUs"]
    # shutting down in the background since the block ended: a new session waits for it, then starts as usual
    with ray_session(RayConfig(num_cpus=2), log=lambda s: None) as resources:
        assert resources["cpus"] == 2
    assert not ray.is_initialized()
    start_early(RayConfig(num_cpus=1), workers=1)
    with ray_session(RayConfig(num_cpus=1), log=lambda s: None):
        pass
    stop_early()  # as the run does at its end: then Ray is down
    assert not ray.is_initialized()


def test_an_early_start_that_failed_fails_the_stage_with_its_error(no_ray):
    from specialists.config import RayConfig
    from specialists.parallel import ray_session, start_early

    closed = closed_port()
    cfg = RayConfig(address=f"127.0.0.1:{closed}", connect_timeout_s=1.0)
    assert start_early(cfg, workers=1) == 0  # a cluster's workers do not start on this machine
    with pytest.raises(ConfigError, match=rf"^ray.address='127.0.0.1:{closed}': no Ray cluster answers"):
        with ray_session(cfg, log=lambda s: None):
            pass
    assert not ray.is_initialized()


SESSIONS_IN_ONE_PROCESS = """
import ray
from specialists.config import RayConfig
from specialists.parallel import ray_session, start_early, stop_early, warm_worker
with ray_session(RayConfig(num_cpus=1), log=print):  # a session of its own, as train_specialists opens
    pass
start_early(RayConfig(num_cpus=1), workers=1)  # then a run's: connected and warmed in a background thread
with ray_session(RayConfig(num_cpus=1), log=print):
    ray.get(warm_worker.remote())
    print("submitted from the caller's thread")
stop_early()
"""


def test_sessions_one_after_another_in_one_process_submit_from_the_callers_thread():
    """A notebook or job that trains specialists again after an earlier session: Ray must not abort the process
    on a repeated task id (it did when the caller's thread had connected an earlier session itself)."""
    done = subprocess.run([sys.executable, "-c", SESSIONS_IN_ONE_PROCESS], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "submitted from the caller's thread" in done.stdout


def test_the_generalist_leaves_the_warming_workers_their_cores_then_threads_are_restored(no_ray, tmp_path):
    """A local Ray instance warms its workers while the generalist trains; the generalist takes the cores they
    leave, unless `threads` is set."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        lines = []
        run_pipeline(tiny_config(ON, "peer.enabled=false", "ray.num_cpus=2", "threads=0"), tmp_path / "run",
                     log=lines.append, progress=False)
        assert "generalist: 1 torch thread(s) while Ray starts its workers on this machine" in lines  # 3 - 2 workers
        assert torch.get_num_threads() == 3
        lines = []
        run_pipeline(tiny_config(ON, "peer.enabled=false", "ray.num_cpus=2", "threads=3"), tmp_path / "set",
                     log=lines.append, progress=False)
        assert not any("torch thread(s)" in line for line in lines)  # the user's setting stands
    finally:
        torch.set_num_threads(before)


def test_a_run_that_fails_before_its_specialists_leaves_no_ray_running(no_ray, tmp_path):
    """Ray starts with the run (parallel.start_early); a generalist that diverges ends the run, and Ray too."""
    from specialists import parallel
    from specialists.train import TrainingError

    with pytest.raises(TrainingError, match="train.lr"):
        run_pipeline(tiny_config(ON, "train.optimizer=sgd", "train.lr=1e30"), tmp_path / "run", **QUIET)
    assert not ray.is_initialized() and parallel._early is None


# ---------------------------------------------------------------------------
# interrupted runs (slow: real Ray, real signals)


@pytest.fixture(scope="module")
def shared_ray():
    """A local Ray instance in this process, which the interrupted `specialists run` processes join."""
    from specialists.parallel import ray_session

    with ray_session(RayConfig(num_cpus=2), log=lambda line: None):
        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def reference(shared_ray, tmp_path_factory):
    """The uninterrupted run that interrupted ones must reproduce, byte for byte."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    run_pipeline(load_config(None, list(SLOW_SPECIALISTS)), out, **QUIET)
    return RunDir(out)


def _start_run(out: Path, address: str, *extra: str) -> subprocess.Popen:
    """`specialists run` in its own process (and session), joining the test's Ray instance."""
    return subprocess.Popen([sys.executable, "-m", "specialists.cli", "run", "--quiet", "--out", str(out),
                             *SLOW_SPECIALISTS, f"ray.address={address}", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finished_specialists(out: Path) -> int:
    return len(list(out.glob("specialists/*/specialist.json")))


def _wait_for_a_specialist(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 300
    while _finished_specialists(out) == 0:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no specialist finished within 300 s"
        time.sleep(0.02)


def _same_models(run: RunDir, reference: RunDir) -> None:
    assert (run.generalist / "model.safetensors").read_bytes() == \
        (reference.generalist / "model.safetensors").read_bytes()
    assert json.loads(run.clusters.read_text()) == json.loads(reference.clusters.read_text())
    for m in range(4):
        for name in ("model.safetensors", "history.json"):
            assert (run.specialists / str(m) / name).read_bytes() == \
                (reference.specialists / str(m) / name).read_bytes(), (m, name)
    for section in ("generalist", "ensemble"):
        ours, theirs = run.read_metrics()[section], reference.read_metrics()[section]
        assert {k: v for k, v in ours.items() if "seconds" not in k} == \
            {k: v for k, v in theirs.items() if "seconds" not in k}


@pytest.mark.slow
def test_a_killed_run_resumes_bit_identically(shared_ray, reference, tmp_path):
    out = tmp_path / "killed"
    process = _start_run(out, shared_ray)
    try:
        _wait_for_a_specialist(process, out)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and anything it started, without a chance to clean up
        process.communicate()
    done = _finished_specialists(out)
    assert 1 <= done < 4, f"{done} specialists were finished when the run was killed"
    run = RunDir(out)
    assert json.loads(run.lock_file.read_text())["pid"] == process.pid  # left behind: stale
    lines = []
    run_pipeline(None, out, resume=True, log=lines.append, progress=False, overrides=["ray.max_retries=1"])
    assert any(line.startswith("run lock: ") and f"left by process {process.pid}" in line for line in lines)
    assert f"specialists: {done} of 4 already trained, training {4 - done}" in lines
    assert not run.lock_file.exists()
    _same_models(run, reference)


@pytest.mark.slow
def test_ctrl_c_ends_with_a_resume_hint_and_the_run_resumes(shared_ray, reference, tmp_path):
    out = tmp_path / "interrupted"
    process = _start_run(out, shared_ray)
    try:
        _wait_for_a_specialist(process, out)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends the driver
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err
    assert "interrupted" in err and HINT.format(out) in err
    assert "Traceback" not in err, err
    run = RunDir(out)
    assert not run.lock_file.exists()  # released on the way out
    assert not list(out.glob(".specialist-shards-*")) and not list(out.rglob("*.tmp"))
    run_pipeline(None, out, resume=True, **QUIET)
    _same_models(run, reference)


@pytest.mark.slow
def test_a_run_that_failed_on_its_ray_address_resumes_with_a_fix(shared_ray, reference, tmp_path):
    """The cluster the run was started on is gone: `--resume DIR ray.address=...` points it at another."""
    fork = fork_run(reference.root, tmp_path / "moved", [f"ray.address=127.0.0.1:{closed_port()}"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "specialists.cli", "run", "--quiet", "--resume", str(fork.root)]
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ray.address='127.0.0.1:")
    fixed = subprocess.run([*command, f"ray.address={shared_ray}"], cwd=REPO, capture_output=True, text=True,
                           env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert load_config(fork.config).ray.address == shared_ray
    _same_models(fork, reference)
