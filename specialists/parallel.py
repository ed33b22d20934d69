"""Every specialist as one Ray task; the only module that imports ray.

    with ray_session(cfg.ray, log):          # a local instance, or join ray.address / $RAY_ADDRESS
        plans = plan_specialist(m, ...)      # each one's rows, from the labels alone
        cut_generalist_outputs(...)          # one batched pass per split: each one's share, never (N, C)
        shared = ray.put({...})              # generalist weights, validation split: into the store once
        while ...:                           # at most `window` specialists' data in the store at a time
            futures[train_specialist_task.options(...).remote(shared, ray.put(data_m), cfg, ...)] = m
            ray.wait(...)                    # save each specialist as it finishes

Tasks are pure functions of (config, shared data, its own data) -> weights
and metrics; the driver writes the run directory, so a cluster's nodes need
no shared disk. Each specialist's data (its training rows, the generalist's
soft targets on them collapsed to its classes + dustbin, its test examples)
travel as one object of its own, put when it is submitted and freed when it is
saved: the store holds the data of the specialists in flight, not the N x C
outputs of every split (see specialist_data.py). A
specialist whose worker dies (killed, out of memory, node lost) is re-run by
Ray (`ray.max_retries`); one saved before a crash of the whole run is kept and
not trained again on `--resume`, if its files are whole (its weights hash to
what its specialist.json recorded); a damaged or missing one is retrained. The
driver's scratch shards are cut anew by every invocation, never reused.

A bad Ray setting fails within seconds, never by waiting forever: an address
where no Ray cluster answers (probed with one gRPC call and a deadline before
ray.init, which itself would retry for minutes), a cluster that would refuse the
auth token ray.init sends (the same call, with that token), a local instance on a machine
that cannot reach 127.0.0.1 (its loopback interface down), whose temp dir is too
deep for Unix sockets or whose home cannot take the auth token Ray would write,
or more CPUs / GPUs per task than any node of the cluster has (a task Ray could
never schedule).
`preflight` runs these checks before the generalist trains (stages.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import ray
import torch
from ray.exceptions import RayError
from tqdm.auto import tqdm

from .config import ConfigError, RayConfig, RunConfig
from .data import Dataset
from .models import checkpoint_bytes, load_checkpoint, read_only_arrays_shared
from .rundir import RunDir, read_json
from .runtime import set_malloc_thresholds
from .specialist import (SPECIALIST_FILE, SpecialistTrainingError, file_sha256, finished_specialist, model_from_arrays,
                         model_to_arrays, read_groups, reads_generalist_weights, save_specialist, specialist_dir, specialists_summary,
                         train_specialist)
from .specialist_data import (ShardStore, SpecialistData, cut_generalist_outputs, plan_specialist, run_budget,
                              specialist_data)
from .train import frozen_parameters

Log = Callable[[str], None]
SHARDS_PREFIX = ".specialist-shards-"  # scratch folder of the specialists stage in the run directory


# ---------------------------------------------------------------------------
# connecting


class _TokenRefused(Exception):
    """A Ray server answers, and refuses the call for want of a valid auth token."""


def _probe(target: str, method: str, request: bytes, what: str, timeout: float, metadata: tuple = ()) -> str | None:
    """None if `what` answers the gRPC `method` at host:port within `timeout` seconds, else why not.

    One raw gRPC call with a deadline. A server that refuses it for want of
    a valid token (_TokenRefused) is there; anything else (nothing
    listening, a port that speaks no gRPC, another service) is not it.
    """
    import grpc  # a dependency of ray

    try:  # Ray's own channel options: no HTTP proxy (http_proxy in the environment) unless RAY_grpc_enable_http_proxy
        from ray._private.ray_constants import GLOBAL_GRPC_OPTIONS as options
    except ImportError:
        options = (("grpc.enable_http_proxy", 0),)
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            channel.unary_unary(method)(request, timeout=timeout, metadata=metadata or None)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise _TokenRefused(err.details()) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"no {what} answers at {target} within {timeout:g}s ({err.details()})"
            return f"what answers at {target} is not a {what} ({code.name}: {err.details()})"
    return None


def _probe_gcs(target: str, timeout: float, metadata: tuple = ()) -> str | None:
    """A Ray cluster's GCS (what `host:port` joins): an empty request is a valid one."""
    return _probe(target, "/ray.rpc.NodeInfoGcsService/GetClusterId", b"", "Ray cluster", timeout, metadata)


def _probe_client_server(target: str, timeout: float, metadata: tuple = ()) -> str | None:
    """A Ray Client server (what `ray://host:port` joins): the PING its clients send first. A TCP connect
    alone is no check: ray.init would then retry for over 30 s where the port speaks no Ray Client."""
    from ray.core.generated import ray_client_pb2

    ping = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING).SerializeToString()
    return _probe(target, "/ray.rpc.RayletDriver/ClusterInfo", ping, "Ray client server", timeout, metadata)


_TOKEN_PLACES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"


def _token_refusal(probe: Callable[..., str | None], target: str, timeout: float, joined_auto: bool) -> str:
    """Why a server that wants a token would refuse ray.init ('' if it would not).

    ray.init sends a token (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) where RAY_AUTH_MODE=token, or, with the mode unset,
    only when it joins 'auto'. Refused, it retries for a minute and then
    blames the address.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        found = loader.has_token(ignore_auth_mode=True)
        header = loader.get_token_for_http_header(ignore_auth_mode=True) if found else {}
    except Exception:  # noqa: BLE001 - a Ray without token auth, or a token it cannot read: ray.init will say
        return ""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() not in ("token", "disabled"):  # another scheme: ray.init's to judge
        return ""
    sends = mode.lower() == "token" if mode is not None else joined_auto
    if not found:
        return (f"the Ray cluster at {target} uses token authentication, and this machine has no token: put its "
                f"head's token in {_TOKEN_PLACES}, with RAY_AUTH_MODE=token")
    if not sends:
        return (f"the Ray cluster at {target} uses token authentication, and ray.init sends this machine's token "
                f"({_TOKEN_PLACES}) only with RAY_AUTH_MODE=token")
    try:
        probe(target, timeout, tuple(header.items()))
    except _TokenRefused:
        return (f"the Ray cluster at {target} refused this machine's token ({_TOKEN_PLACES}): set it to the token "
                "its head was started with")
    return ""


def _check_reachable(address: str, key: str, timeout: float) -> None:
    """Fail fast where ray.init would retry for minutes: no Ray cluster at the address, or one that would
    refuse this machine's auth token."""
    joined_auto = address == "auto"
    if joined_auto:
        try:  # Ray's own lookup (ray start's address file, else a running GCS), so the check sees what ray.init will
            from ray._private.services import canonicalize_bootstrap_address

            resolved = canonicalize_bootstrap_address("auto")
        except ConnectionError as err:
            raise ConfigError(f"{key}='auto': {err}") from None
        except (ImportError, ValueError):  # a Ray without this helper: let ray.init find it
            return
        if not resolved:
            return
        address = resolved
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{key}={address!r} is a dashboard's address, what `ray job submit` takes; a run joins a "
                          "cluster at its head's port (HOST:6379, or 'auto' on one of its nodes), and a run submitted "
                          "as a Ray job joins its cluster by itself")
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}={address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    probe, target = _probe_client_server if client else _probe_gcs, f"{host}:{port}"
    try:
        why = probe(target, timeout)
    except _TokenRefused:
        refusal = _token_refusal(probe, target, timeout, joined_auto=joined_auto)
        if refusal:
            raise ConfigError(f"{key}={address!r}: {refusal}") from None
        return
    if why:
        port_hint = " (ray:// is the head's Ray Client port, 10001 unless `ray start --ray-client-server-port`)"
        raise ConfigError(f"{key}={address!r}: {why}; start a cluster with `ray start --head`"
                          f"{port_hint if client else ''}, or leave ray.address empty (and RAY_ADDRESS unset) "
                          "for a local instance")


def _check_local_gpus(cfg: RayConfig) -> None:
    if cfg.gpus_per_task > 0 and torch.cuda.device_count() == 0:
        raise ConfigError(f"ray.gpus_per_task={cfg.gpus_per_task:g} but this machine has no CUDA GPU; "
                          "set ray.gpus_per_task=0 or join a cluster with GPUs (ray.address)")


def _check_loopback(timeout: float = 2.0) -> None:
    """A local instance's processes talk over 127.0.0.1. Where it cannot be reached (the loopback interface is
    down, as in a fresh network namespace) ray.init would retry for minutes, printing only Ray's own warnings."""
    with socket.socket() as server:
        try:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=timeout):
                pass
        except OSError as err:
            raise ConfigError(f"a local Ray instance needs to reach 127.0.0.1, and this machine cannot "
                              f"({err.strerror or err}): bring the loopback interface up (`ip link set lo up`), "
                              "or join a Ray cluster (ray.address)") from None


def _check_socket_paths() -> None:
    """A local instance makes Unix sockets in a session folder under its temp dir (RAY_TMPDIR, else TMPDIR,
    else /tmp), and a socket's path holds at most 107 bytes (103 on macOS): past that, ray.init fails with a
    traceback once the generalist has trained."""
    try:
        from ray._common.utils import get_default_ray_temp_dir
    except ImportError:  # a Ray that keeps it elsewhere: let ray.init check
        return
    temp_dir = get_default_ray_temp_dir()
    # Ray's session folder is named by the start's date and time and the process that starts the instance
    session = f"session_2000-01-01_00-00-00_000000_{os.getpid()}"
    longest = os.path.join(temp_dir, session, "sockets", "plasma_store")
    most = (104 if sys.platform == "darwin" else 108) - 1
    if len(longest.encode()) > most:
        key = next((k for k in ("RAY_TMPDIR", "TMPDIR") if k in os.environ), "the temp dir")
        raise ConfigError(f"{key}={os.path.dirname(temp_dir)!r}: a local Ray instance's socket paths there would "
                          f"be {len(longest.encode())} bytes, over the {most} a Unix socket allows; set RAY_TMPDIR "
                          "to a shorter directory (RAY_TMPDIR=/tmp)")


def _check_token_file() -> None:
    """A local instance with token authentication (Ray's default since 2.5x) that finds no token writes a new
    one to ~/.ray/auth_token. Where that cannot be written (a read-only home), ray.init fails once the generalist
    has trained."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        return
    try:
        from ray._private.authentication.authentication_token_setup import _get_default_token_path
        from ray._raylet import AuthenticationTokenLoader

        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            return
        path = _get_default_token_path()
    except Exception:  # noqa: BLE001 - a Ray without token auth, or a token it cannot read: ray.init will say
        return
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # what Ray would write into
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ConfigError(f"a local Ray instance uses token authentication (Ray's default) and, finding no token, "
                          f"would write one to {path}, but {folder} cannot be written: set RAY_AUTH_TOKEN to any "
                          "long random string (`export RAY_AUTH_TOKEN=$(python -c 'import secrets; "
                          "print(secrets.token_hex(32))')`), or RAY_AUTH_MODE=disabled")


def _check_local_machine(cfg: RayConfig) -> None:
    """What a local instance needs of this machine, checked before ray.init: the GPUs asked for, Unix socket
    paths that fit, a reachable 127.0.0.1, a token or a home it can write one to."""
    _check_local_gpus(cfg)
    _check_socket_paths()
    _check_loopback()
    _check_token_file()


def check_resources(cfg: RayConfig, where: str) -> dict:
    """The connected cluster's totals; ConfigError if no single node could run one specialist."""
    return _check_nodes(cfg, [n["Resources"] for n in ray.nodes() if n.get("Alive")], where)


def _local_cpus() -> int:
    """The CPUs a local Ray instance finds on this machine (container limits included)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except (ImportError, AttributeError):  # a Ray without this helper
        return os.cpu_count() or 1


def _check_nodes(cfg: RayConfig, nodes: list[dict], where: str) -> dict:
    """Each node's resources ({"CPU": n, "GPU": n}) -> the totals; ConfigError if none could run a specialist."""
    most = {name: max((r.get(name, 0.0) for r in nodes), default=0.0) for name in ("CPU", "GPU")}
    for name, wanted, key in (("GPU", cfg.gpus_per_task, "gpus_per_task"), ("CPU", cfg.cpus_per_task, "cpus_per_task")):
        if wanted > most[name]:
            raise ConfigError(f"ray.{key}={wanted:g} but the largest node of {where} has {most[name]:g} {name}s "
                              f"({len(nodes)} node(s)); no specialist could ever be scheduled")
    return {"nodes": len(nodes), "cpus": sum(r.get("CPU", 0.0) for r in nodes),
            "gpus": sum(r.get("GPU", 0.0) for r in nodes)}


def _address(cfg: RayConfig) -> tuple[str, str]:
    """(the address to join, the setting it came from): ray.address, else $RAY_ADDRESS; ("", "") for a local
    instance. The stages decide which of a resumed run's saved ray.address and $RAY_ADDRESS is meant."""
    if cfg.address.strip():
        return cfg.address.strip(), "ray.address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env, "RAY_ADDRESS" if env else ""


def preflight(cfg: RayConfig, log: Log = print) -> dict:
    """Check, before anything trains, that the specialists stage could run; returns the resources found.

    ConfigError naming the setting where no Ray cluster answers at the
    address (ray.address, or $RAY_ADDRESS), or where no node could ever run
    one specialist (ray.cpus_per_task, ray.gpus_per_task). A cluster is
    joined, checked and left (the stage joins it again); a local instance is
    checked against this machine without starting it.
    """
    if ray.is_initialized():
        return check_resources(cfg, "the running Ray instance")
    address, _ = _address(cfg)
    if address:
        with ray_session(cfg, log) as resources:
            return resources
    _check_local_machine(cfg)
    gpus = torch.cuda.device_count()
    return _check_nodes(cfg, [{"CPU": float(cfg.num_cpus or _local_cpus()), "GPU": float(gpus)}],
                        "the local Ray instance")


def _connect(cfg: RayConfig) -> str:
    """ray.init as configured: join ray.address (or $RAY_ADDRESS), else start a local instance; returns where."""
    address, key = _address(cfg)
    if address:
        _check_reachable(address, key, cfg.connect_timeout_s)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ConfigError(f"{key}={address!r}: {err}") from None
        return f"the Ray cluster at {address}"
    _check_local_machine(cfg)
    # "local": a new instance even when `ray start` left one running here (ray.init() would join that)
    ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False, logging_level=logging.WARNING)
    return "the local Ray instance"


def _warm_workers(cfg: RayConfig, resources: dict, most: int) -> list:
    """Start up to `most` workers, one per slot, importing torch; the refs (never waited on) keep them queued."""
    slots = int(resources["cpus"] // cfg.cpus_per_task) if cfg.cpus_per_task else most
    return [warm_worker.options(num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task,
                                scheduling_strategy="SPREAD").remote() for _ in range(max(1, min(most, slots)))]


class _EarlyStart:
    """Ray connected and its workers warmed in a background thread, while the driver trains the generalist.

    Starting a local instance takes seconds, and each new worker seconds more
    to import torch; begun with the run, that is done before the specialists
    stage needs them instead of at its start. The thread lives until Ray is
    shut down: the processes a local instance starts are killed when the
    thread that started them ends (Ray sets PR_SET_PDEATHSIG, which is per
    thread).
    """

    def __init__(self, cfg: RayConfig, workers: int):
        self.cfg, self.workers = cfg, workers
        self.where, self.error, self.warming = "", None, []
        self.started, self.stopped = threading.Event(), threading.Event()
        self.shut_down_here = False  # stop(wait=False): the thread shuts Ray down, the driver goes on
        if threading.current_thread() is threading.main_thread():  # what ray.init sets only there
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        self.thread = threading.Thread(target=self._run, name="ray-start", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with _quiet_sigterm_warning():
                self.where = _connect(self.cfg)
            if self.workers:
                self.warming = _warm_workers(self.cfg, check_resources(self.cfg, self.where), self.workers)
        except BaseException as err:  # noqa: BLE001 - raised again in the driver's thread by join
            self.error = err
        self.started.set()
        self.stopped.wait()
        if self.shut_down_here and ray.is_initialized():
            ray.shutdown()

    def join(self) -> str:
        """Where Ray runs, once started; the start's error (or a Ctrl-C while waiting) is raised here, Ray
        shut down."""
        try:
            self.started.wait()
            if self.error is not None:
                raise self.error
        except BaseException:
            self.stop()
            raise
        self.warming = []
        return self.where

    def stop(self, wait: bool = True) -> None:
        """Shut Ray down (if it started) and let the thread end. wait=False: the thread shuts it down while
        the driver goes on (the next stages need no Ray, and shutting down takes over a second); `_settle`
        waits for it before Ray is used again, and `stop_early` before the run returns."""
        global _stopping
        self.started.wait()
        if not wait:
            self.shut_down_here = True
            _stopping = self
        elif ray.is_initialized():
            ray.shutdown()
        self.stopped.set()
        if wait:
            self.thread.join()


@contextmanager
def _quiet_sigterm_warning() -> Iterator[None]:
    """ray.init outside the main thread warns that it set no SIGTERM handler; _EarlyStart sets one."""
    quiet = logging.Filter()
    quiet.filter = lambda record: "SIGTERM handler is not set" not in record.getMessage()
    logger = logging.getLogger("ray._private.worker")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


_early: _EarlyStart | None = None  # begun by start_early, taken over by the next ray_session
_stopping: _EarlyStart | None = None  # shutting Ray down in its thread (stop(wait=False))


def _settle() -> None:
    """Wait until a session shutting down in the background (stop(wait=False)) is down."""
    global _stopping
    stopping, _stopping = _stopping, None
    if stopping is not None:
        stopping.thread.join()


def start_early(cfg: RayConfig, workers: int) -> int:
    """Begin connecting Ray (and warming up to `workers` workers) now, in the background; returns how many
    of them start on this machine (a local instance: as many as its CPUs hold; a cluster's: 0).

    The next `ray_session` takes this session over, waiting for it if need
    be, and shuts it down after; `stop_early` shuts it down if no stage
    took it (the run ended, or failed, before its specialists). Nothing is
    begun, and 0 returned, if Ray is already connected in this process.
    """
    global _early
    _settle()
    if _early is not None or ray.is_initialized():
        return 0
    _early = _EarlyStart(cfg, workers)
    if _address(cfg)[0]:
        return 0
    slots = int((cfg.num_cpus or _local_cpus()) // cfg.cpus_per_task)
    return max(1, min(workers, slots))


def stop_early() -> None:
    """Shut down a session `start_early` began that no `ray_session` took over (errors in it are dropped), and
    wait for one that a `ray_session` is shutting down in the background."""
    global _early
    early, _early = _early, None
    if early is not None:
        early.stop()
    _settle()


@contextmanager
def ray_session(cfg: RayConfig, log: Log = print) -> Iterator[dict]:
    """Connect Ray for the block; yields the cluster's resources (nodes, cpus, gpus).

    A session `start_early` began is taken over (and shut down after). An
    instance this process otherwise already started (e.g. by a test) is used
    as is and left running. Otherwise `ray.address` (or $RAY_ADDRESS, which
    Ray jobs set) joins that cluster and disconnects after; with neither, a
    local instance with `ray.num_cpus` CPUs is started and shut down after.
    """
    global _early
    _settle()
    early, _early = _early, None
    began = early is not None
    if not began and ray.is_initialized():
        yield check_resources(cfg, "the running Ray instance")
        return
    if not began:
        # Connected from a thread of its own, as start_early does, never from the caller's: Ray keeps each
        # thread's task counter across sessions, and the thread that connects numbers its tasks from the
        # same first id in every session, so a thread that connected once and submits in a later session
        # can repeat a task id, which aborts the process ("Check failed: inserted.second").
        early = _EarlyStart(cfg, 0)
    where = early.join()
    try:
        resources = check_resources(cfg, where)
        log(f"ray: {where}, {resources['nodes']} node(s), {resources['cpus']:g} CPUs, {resources['gpus']:g} GPUs")
        yield resources
    finally:
        early.stop(wait=not began)  # begun early: in its thread, while the run goes on; stop_early waits


# ---------------------------------------------------------------------------
# the task


@ray.remote
def warm_worker() -> int:
    """A worker that runs it has imported this module (torch included) before the first specialist, and
    what torch imports lazily on a first optimizer (torch._dynamo: seconds of CPU in every new process)."""
    set_malloc_thresholds()  # as in the driver: a worker trains as it does
    weight = torch.zeros(1, requires_grad=True)
    torch.optim.Adam([weight])
    torch.optim.SparseAdam([weight])
    return os.getpid()


@ray.remote
def train_specialist_task(shared: dict, data: SpecialistData, cfg: RunConfig, threads: int) -> dict:
    """Train one specialist in a Ray worker from its own data; returns its weights (numpy), curve and metrics."""
    torch.set_num_threads(threads)
    set_malloc_thresholds()
    m = data.plan.m
    use_gpu = cfg.ray.gpus_per_task > 0
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"specialist {m}: Ray assigned GPU(s) {ray.get_gpu_ids()} but torch sees no CUDA device")
    generalist = model_from_arrays(shared["generalist"]["spec"], shared["generalist"]["state"])
    with read_only_arrays_shared():  # the object store's arrays: the specialist only reads them
        result = train_specialist(generalist, data, shared["val"], cfg,
                                  device=torch.device("cuda" if use_gpu else "cpu"), desc=f"specialist {m}")
    # the weights file's bytes, made here: the driver only writes them (uint8: Ray ships arrays without a copy)
    weights = np.frombuffer(checkpoint_bytes(result.model), dtype=np.uint8)
    return {"spec": result.model.spec, "weights": weights, "history": result.train.history,
            "metrics": {"id": m, **result.metrics},
            "worker": {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                       "pid": os.getpid()}}


# ---------------------------------------------------------------------------
# the pipeline stage


def _specialist_info(cfg: RunConfig, dataset: Dataset, m: int, classes: list[int], result: dict, sha: str) -> dict:
    """specialist.json: what a combiner needs, how it was trained, and its metrics."""
    metrics = result["metrics"]
    s = cfg.specialists
    return {
        "id": m,
        "classes": classes,  # output j < k is class classes[j]; output k is the dustbin
        "names": [dataset.classes[c] for c in classes],
        "dustbin": len(classes),
        "dustbin_correction": metrics["dustbin_correction"],  # add to the dustbin logit before the softmax
        "dustbin_correction_applied": False,  # the weights are as trained
        "dustbin_correction_mode": s.dustbin_correction,
        # the same correction for the prior where a top-1-gated combiner uses it (see dustbin.py)
        "dustbin_correction_active_top1": metrics["dustbin_correction_active_top1"],
        "special_fraction": metrics["special_fraction"],
        "natural_fraction": metrics["natural_fraction"],
        "soft_weight": s.soft_weight,
        "temperature": s.temperature,
        "widen": s.widen,
        "init": s.init,
        "freeze": list(s.freeze),
        "seed": cfg.seed + m,
        "generalist_sha256": sha,
        "worker": result["worker"],
        "metrics": metrics,
    }


def _progress_line(m: int, metrics: dict, done: int, total: int) -> str:
    return (f"specialist {m}: {metrics['classes']} classes, best val accuracy {metrics['best_val_accuracy']:.4f} "
            f"(own slice), conditional {metrics['val_conditional_accuracy']:.4f} vs generalist "
            f"{metrics['generalist_val_conditional_accuracy']:.4f}, {metrics['seconds']:.1f}s [{done}/{total}]")


def _train_on_ray(cfg: RunConfig, dataset: Dataset, run: RunDir, generalist: torch.nn.Module, groups: list[list[int]],
                  todo: list[int], sha: str, device: torch.device, log: Log, progress: bool,
                  shares: dict[int, int] | None = None, profile: dict | None = None) -> dict[int, str]:
    """Train specialists `todo`, saving each as it finishes; returns {m: error} of those that failed.

    shares: {m: training examples specialist m may process} (specialists.budget); None or absent: no cap.
    profile: filled with the wall seconds of the stage's parts (Ray start, cutting the generalist's
    outputs, training until the last specialist is saved, Ray shut down).

    The driver never holds the generalist's (N, C) outputs: one batched pass
    per split cuts each specialist's share into a ShardStore (memory, then
    files in the run directory, removed after). A specialist's data enter the
    object store when it is submitted, at most `window` of them at a time, and
    leave it once it is saved, so the store holds O(window) specialists' data.
    """
    threads = max(1, int(cfg.ray.cpus_per_task))
    # SPREAD: over every node of a cluster, not packed onto the driver's first (one node: no difference)
    options = dict(num_cpus=cfg.ray.cpus_per_task, num_gpus=cfg.ray.gpus_per_task, max_retries=cfg.ray.max_retries,
                   retry_exceptions=cfg.ray.retry_exceptions, scheduling_strategy="SPREAD")
    failures: dict[int, str] = {}
    done: list[int] = []  # finished, saved or failed

    def failed(m: int, why: str, when: str = "") -> None:
        failures[m] = why
        done.append(m)
        bar.update(1)
        with tqdm.external_write_mode():
            log(f"specialist {m}: FAILED{when}: {why} [{len(done)}/{len(todo)}]")

    profile = {} if profile is None else profile
    clock = time.perf_counter()
    with ray_session(cfg.ray, log) as resources:  # first: a bad address or resource request fails before any work
        profile["ray_start_seconds"] = round(time.perf_counter() - clock, 3)
        bar = tqdm(total=len(todo), desc="specialists", unit="specialist", disable=not progress)
        # workers import torch (seconds each) while this process cuts the data, not after (warm ones: at once)
        slots = int(resources["cpus"] // cfg.ray.cpus_per_task) if cfg.ray.cpus_per_task else len(todo)
        warming = _warm_workers(cfg.ray, resources, len(todo))
        plans = {}
        for m in todo:
            try:
                plans[m] = plan_specialist(m, groups[m], dataset, cfg, (shares or {}).get(m, 0))
            except ValueError as err:  # a group these splits cannot train: the others still train
                failed(m, str(err))
        for stale in run.root.glob(SHARDS_PREFIX + "*"):  # left by a killed run: never trusted, always recut
            shutil.rmtree(stale, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix=SHARDS_PREFIX, dir=run.root))
        futures: dict = {}  # task ref -> (m, its data's ref, kept alive until it is saved, for retries)
        try:
            started = time.perf_counter()
            store = ShardStore(folder)
            val_top1 = cut_generalist_outputs(generalist, dataset, list(plans.values()), store,
                                              cfg.train.eval_batch_size, device)
            log(f"specialists: generalist outputs cut for {len(plans)} specialist(s) in "
                f"{time.perf_counter() - started:.1f}s ({store.spilled_bytes / 2**20:.0f} MiB spilled to disk)")
            profile["cut_seconds"] = round(time.perf_counter() - started, 3)
            started = time.perf_counter()
            spec, state = model_to_arrays(generalist, parameters=reads_generalist_weights(cfg.specialists))
            shared = ray.put({"generalist": {"spec": spec, "state": state}, "val": dataset.val})
            del state, warming  # never waited on: a specialist may start on a worker that is still warming
            # the longest first (planned examples), so that the last one to finish is a short one
            waiting = sorted((m for m in todo if m in plans),
                             key=lambda m: -min(plans[m].orders.size, plans[m].max_examples or plans[m].orders.size))
            window = max(2, 2 * slots)  # every slot busy, and the next one queued while a result is saved
            while waiting or futures:
                while waiting and len(futures) < window:
                    m = waiting.pop(0)
                    data = ray.put(specialist_data(plans.pop(m), dataset, store, val_top1))
                    futures[train_specialist_task.options(**options).remote(shared, data, cfg, threads)] = (m, data)
                ready, _ = ray.wait(list(futures), num_returns=1)
                m, _ = futures.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except RayError as err:
                    failed(m, str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__,
                           " after retries")
                    continue
                info = _specialist_info(cfg, dataset, m, groups[m], result, sha)
                save_specialist(specialist_dir(run, m), result["spec"], result["weights"], info, result["history"])
                done.append(m)
                bar.update(1)
                with tqdm.external_write_mode():
                    log(_progress_line(m, result["metrics"], len(done), len(todo)))
            profile["train_seconds"] = round(time.perf_counter() - started, 3)
            clock = time.perf_counter()
        finally:
            # Interrupted (Ctrl-C, an error): the tasks in flight end with this driver's Ray session, which
            # ray_session shuts down (a cluster ends a job's tasks when its driver leaves). Not ray.cancel: it races
            # with a task that is finishing and can abort this process inside Ray ("Check failed: it !=
            # submissible_tasks_.end()", ray-project/ray#54527), leaving no message and a stale run lock.
            futures.clear()
            bar.close()
            shutil.rmtree(folder, ignore_errors=True)
    profile["ray_stop_seconds"] = round(time.perf_counter() - clock, 3)
    return failures


def train_specialists(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log = print,
                      progress: bool = True) -> dict:
    """The specialists stage: one specialist per group of clusters.json, those not finished yet.

    Writes `specialists/<m>/` (model.safetensors, model.json, history.json,
    specialist.json last) and returns the `specialists` metrics section, built
    from every specialist's specialist.json (those of earlier runs included).
    """
    run.require(run.generalist / "model.safetensors", what="generalist")
    generalist = load_checkpoint(run.generalist, device)
    frozen_parameters(generalist, cfg.specialists.freeze)  # a specialist's parameters bear its generalist's names
    groups = read_groups(run, dataset.classes, generalist.head.out_features)
    skipped = [m for m, group in enumerate(groups) if len(group) == dataset.n_classes]
    if skipped:
        log(f"specialists: group(s) {skipped} hold every class, so get no specialist (the generalist is one)")
    trainable = [m for m in range(len(groups)) if m not in skipped]
    sha = file_sha256(run.generalist / "model.safetensors")
    todo = [m for m in trainable if finished_specialist(specialist_dir(run, m), groups[m], sha) is None]
    if len(todo) < len(trainable):
        log(f"specialists: {len(trainable) - len(todo)} of {len(trainable)} already trained, training {len(todo)}")
    if cfg.ray.gpus_per_task == 0 and device.type == "cuda":
        log("specialists: training on CPUs (ray.gpus_per_task=0); set ray.gpus_per_task=1 to use the GPU")
    budget, shares = run_budget(cfg, run.read_metrics()["generalist"]["examples_seen"], groups, trainable,
                                dataset.train.labels)
    if budget:
        log(f"specialists: budget {cfg.specialists.budget:g} x the generalist's examples = {budget:,} examples, "
            f"shared by {len(trainable)} specialists in proportion to their epochs")
    profile: dict = {}
    failures = (_train_on_ray(cfg, dataset, run, generalist, groups, todo, sha, device, log, progress, shares,
                              profile) if todo else {})
    if failures:
        listed = "; ".join(f"{m}: {why}" for m, why in sorted(failures.items()))
        raise SpecialistTrainingError(f"{len(failures)} of {len(trainable)} specialists failed ({listed}); the "
                                      f"others are saved, `specialists run --resume {run.root}` trains the rest")
    infos = [read_json(specialist_dir(run, m) / SPECIALIST_FILE) for m in trainable]
    summary = specialists_summary([info["metrics"] for info in infos], trained=todo, skipped=skipped)
    return {**summary, "budget": cfg.specialists.budget, "budget_examples": budget, "profile": profile}
