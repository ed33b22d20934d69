"""Every specialist as one Ray task, submitted together; the only module that imports ray.

    with ray_session(cfg.ray, log):          # a local instance, or join ray.address / $RAY_ADDRESS
        shared = ray.put({...})              # data, generalist weights, its logits: into the store once
        futures = [train_specialist_task.options(num_cpus=..., num_gpus=..., max_retries=...)
                   .remote(shared, m, classes, cfg, ...) for m in todo]
        ray.wait(...)                        # save each specialist as it finishes

Tasks are pure functions of (config, shared data) -> weights and metrics; the
driver writes the run directory, so a cluster's nodes need no shared disk. A
specialist whose worker dies (killed, out of memory, node lost) is re-run by
Ray (`ray.max_retries`); one saved before a crash of the whole run is kept and
not trained again on `--resume`.

A bad Ray setting fails within seconds, never by waiting forever: an address
where no Ray cluster answers (probed with one gRPC call and a deadline before
ray.init, which itself would retry for minutes), or more CPUs / GPUs per task
than any node of the cluster has (a task Ray could never schedule).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import ray
import torch
from ray.exceptions import RayError
from tqdm.auto import tqdm

from .config import ConfigError, RayConfig, RunConfig
from .data import Dataset
from .models import load_checkpoint
from .rundir import RunDir, read_json
from .specialist import (SPECIALIST_FILE, file_sha256, finished_specialist, model_from_arrays, model_to_arrays,
                         read_groups, save_specialist, specialist_dir, specialists_summary, train_specialist)
from .train import predict_logits

Log = Callable[[str], None]


class SpecialistTrainingError(RuntimeError):
    """Some specialists failed after their retries; the others are saved, `--resume` trains the rest."""


# ---------------------------------------------------------------------------
# connecting


def _probe_gcs(target: str, timeout: float) -> str | None:
    """None if a Ray cluster's GCS answers at host:port within `timeout` seconds, else why not.

    One raw gRPC call to a GCS method (an empty request is a valid one). A
    GCS answers it, or refuses it for want of an auth token, which still
    proves it is there; anything else is not a Ray cluster.
    """
    import grpc  # a dependency of ray

    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=timeout)
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                return None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return f"no Ray cluster answers at {target} within {timeout:g}s ({err.details()})"
            return f"what answers at {target} is not a Ray cluster ({code.name}: {err.details()})"
    return None


def _check_reachable(address: str, key: str, timeout: float) -> None:
    """Fail fast where ray.init would retry for minutes: no Ray cluster at the address."""
    if address == "auto":
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
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}={address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    if client:  # the Ray Client server: a TCP connect is the check
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                why = None
        except OSError as err:
            why = f"no Ray client server answers at {host}:{port} within {timeout:g}s ({err.strerror or err})"
    else:
        why = _probe_gcs(f"{host}:{port}", timeout)
    if why:
        raise ConfigError(f"{key}={address!r}: {why}; start a cluster with `ray start --head`, or leave "
                          "ray.address empty (and RAY_ADDRESS unset) for a local instance")


def _check_local_gpus(cfg: RayConfig) -> None:
    if cfg.gpus_per_task > 0 and torch.cuda.device_count() == 0:
        raise ConfigError(f"ray.gpus_per_task={cfg.gpus_per_task:g} but this machine has no CUDA GPU; "
                          "set ray.gpus_per_task=0 or join a cluster with GPUs (ray.address)")


def check_resources(cfg: RayConfig, where: str) -> dict:
    """The connected cluster's totals; ConfigError if no single node could run one specialist."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most = {name: max((r.get(name, 0.0) for r in nodes), default=0.0) for name in ("CPU", "GPU")}
    for name, wanted, key in (("GPU", cfg.gpus_per_task, "gpus_per_task"), ("CPU", cfg.cpus_per_task, "cpus_per_task")):
        if wanted > most[name]:
            raise ConfigError(f"ray.{key}={wanted:g} but the largest node of {where} has {most[name]:g} {name}s "
                              f"({len(nodes)} node(s)); no specialist could ever be scheduled")
    return {"nodes": len(nodes), "cpus": sum(r.get("CPU", 0.0) for r in nodes),
            "gpus": sum(r.get("GPU", 0.0) for r in nodes)}


@contextmanager
def ray_session(cfg: RayConfig, log: Log = print) -> Iterator[dict]:
    """Connect Ray for the block; yields the cluster's resources (nodes, cpus, gpus).

    An instance this process already started (e.g. by a test) is used as is
    and left running. Otherwise `ray.address` (or $RAY_ADDRESS, which Ray jobs
    set) joins that cluster and disconnects after; with neither, a local
    instance with `ray.num_cpus` CPUs is started and shut down after.
    """
    if ray.is_initialized():
        yield check_resources(cfg, "the running Ray instance")
        return
    address = cfg.address.strip() or os.environ.get("RAY_ADDRESS", "").strip()
    key = "ray.address" if cfg.address.strip() else "RAY_ADDRESS"
    if address:
        _check_reachable(address, key, cfg.connect_timeout_s)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise ConfigError(f"{key}={address!r}: {err}") from None
        where = f"the Ray cluster at {address}"
    else:
        _check_local_gpus(cfg)
        # "local": a new instance even when `ray start` left one running here (ray.init() would join that)
        ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False,
                 logging_level=logging.WARNING)
        where = "the local Ray instance"
    try:
        resources = check_resources(cfg, where)
        log(f"ray: {where}, {resources['nodes']} node(s), {resources['cpus']:g} CPUs, {resources['gpus']:g} GPUs")
        yield resources
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------
# the task


@ray.remote
def warm_worker() -> int:
    """Nothing: a worker that runs it has imported this module (torch included) before the first specialist."""
    return os.getpid()


@ray.remote
def train_specialist_task(shared: dict, m: int, classes: list[int], cfg: RunConfig, threads: int) -> dict:
    """Train specialist m in a Ray worker; returns its weights (numpy), curve and metrics."""
    torch.set_num_threads(threads)
    use_gpu = cfg.ray.gpus_per_task > 0
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError(f"specialist {m}: Ray assigned GPU(s) {ray.get_gpu_ids()} but torch sees no CUDA device")
    generalist = model_from_arrays(shared["generalist"]["spec"], shared["generalist"]["state"])
    with warnings.catch_warnings():  # the store's arrays are read-only; the specialist only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        result = train_specialist(generalist, classes, shared["dataset"], shared["logits"], cfg, seed=cfg.seed + m,
                                  device=torch.device("cuda" if use_gpu else "cpu"), desc=f"specialist {m}")
    spec, state = model_to_arrays(result.model)
    return {"spec": spec, "state": state, "history": result.train.history, "metrics": {"id": m, **result.metrics},
            "worker": {"node": ray.util.get_node_ip_address(), "pid": os.getpid()}}


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
        # the same correction for the prior where a top-1-gated combiner uses it (see specialist.py)
        "dustbin_correction_active_top1": metrics["dustbin_correction_active_top1"],
        "special_fraction": metrics["special_fraction"],
        "natural_fraction": metrics["natural_fraction"],
        "soft_weight": s.soft_weight,
        "temperature": s.temperature,
        "widen": s.widen,
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
                  todo: list[int], sha: str, device: torch.device, log: Log, progress: bool) -> dict[int, str]:
    """Train specialists `todo`, saving each as it finishes; returns {m: error} of those that failed."""
    threads = max(1, int(cfg.ray.cpus_per_task))
    options = dict(num_cpus=cfg.ray.cpus_per_task, num_gpus=cfg.ray.gpus_per_task, max_retries=cfg.ray.max_retries,
                   retry_exceptions=cfg.ray.retry_exceptions)
    failures: dict[int, str] = {}
    with ray_session(cfg.ray, log) as resources:  # first: a bad address or resource request fails before any work
        # workers import torch (about a second each) while this process computes the logits, not after
        slots = int(resources["cpus"] // cfg.ray.cpus_per_task) if cfg.ray.cpus_per_task else len(todo)
        warming = [warm_worker.options(num_cpus=cfg.ray.cpus_per_task, num_gpus=cfg.ray.gpus_per_task).remote()
                   for _ in range(max(1, min(len(todo), slots)))]
        batch = cfg.train.eval_batch_size
        # (N, C) generalist logits of every split, once: the soft targets and the baseline of the metrics
        logits = {split: predict_logits(generalist, generalist.encode(getattr(dataset, split).inputs), batch, device)
                  for split in ("train", "val", "test")}
        spec, state = model_to_arrays(generalist)
        shared = ray.put({"dataset": dataset, "logits": logits, "generalist": {"spec": spec, "state": state}})
        del logits, state
        futures = {train_specialist_task.options(**options).remote(shared, m, groups[m], cfg, threads): m
                   for m in todo}
        del warming  # never waited on: a specialist may start on a worker that is still warming
        bar = tqdm(total=len(todo), desc="specialists", unit="specialist", disable=not progress)
        try:
            while futures:
                ready, _ = ray.wait(list(futures), num_returns=1)
                m = futures.pop(ready[0])
                done = len(todo) - len(futures)
                try:
                    result = ray.get(ready[0])
                except RayError as err:
                    failures[m] = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                    with tqdm.external_write_mode():
                        log(f"specialist {m}: FAILED after retries: {failures[m]} [{done}/{len(todo)}]")
                    bar.update(1)
                    continue
                model = model_from_arrays(result["spec"], result["state"])
                info = _specialist_info(cfg, dataset, m, groups[m], result, sha)
                save_specialist(specialist_dir(run, m), model, info, result["history"])
                bar.update(1)
                with tqdm.external_write_mode():
                    log(_progress_line(m, result["metrics"], done, len(todo)))
        finally:
            for future in futures:  # interrupted: do not leave tasks running on a cluster we only joined
                ray.cancel(future, force=True)
            bar.close()
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
    failures = _train_on_ray(cfg, dataset, run, generalist, groups, todo, sha, device, log, progress) if todo else {}
    if failures:
        listed = "; ".join(f"{m}: {why}" for m, why in sorted(failures.items()))
        raise SpecialistTrainingError(f"{len(failures)} of {len(trainable)} specialists failed ({listed}); the "
                                      f"others are saved, `specialists run --resume {run.root}` trains the rest")
    infos = [read_json(specialist_dir(run, m) / SPECIALIST_FILE) for m in trainable]
    return specialists_summary([info["metrics"] for info in infos], trained=todo, skipped=skipped)
