"""The stages of `specialists run`, each reading and writing the run directory.

data -> generalist -> clusters -> specialists (parallel.py) -> peer ensemble
(peer.py) -> evaluation -> report, as they are enabled. A stage whose outputs
are already complete in the run directory is skipped on `--resume`; each
writes its files atomically and records its metrics and seconds last, so
"metrics say done" means "files are whole". `fork_run` starts a new run from
a finished one's completed stages, for ablations that change a later stage.
Also the handlers of `specialists cluster/evaluate/report`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .choices import USER_MODELS
from .cluster import ConfusionClusterer, InvalidParameterError, clusters_to_json
from .combination_choice import candidate_settings, choose_combination, clear_choices, write_choice
from .config import ConfigError, RunConfig, dump_config, load_config, parse_override, to_dict
from .covariance import correlation_from_covariance, rows_per_batch
from .data import Dataset, Split, check_run_fits_data, load_dataset, read_unlabeled_inputs
from .evaluation import StreamedComparison
from .generalist import fit_generalist, is_loaded, load_generalist
from .models import CheckpointError, load_checkpoint, model_kwargs, model_skeleton, save_checkpoint, torch_threads
from .peer import train_peers
from .report import error_share_inside, format_summary, random_share, write_report
from .rundir import WRITES_REFUSED, RunDir, RunDirError, atomic_write, read_json, write_json, write_text
from .runtime import Log, data_summary, dataset_for_run, default_out_dir, setup_torch, timed_stage
from .signals import cluster_rows, confusability, heldout_split
from .specialist import specialists_done
from .train import accuracy, frozen_parameters, iter_logits, predict_classes

# ---------------------------------------------------------------------------
# generalist


def train_generalist(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                     progress: bool = True) -> dict:
    """Train the generalist on all classes (or load the user's, `is_loaded`); checkpoint and metrics into the run
    directory."""
    loaded = is_loaded(cfg.model)
    model, result = (load_generalist(cfg, dataset, device) if loaded
                     else fit_generalist(cfg, dataset, device, seed=cfg.seed, progress=progress))
    test_x = model.encode(dataset.test.inputs)
    test_accuracy = accuracy(model, test_x, dataset.test.labels, cfg.train.eval_batch_size, device)
    save_checkpoint(model, run.generalist)
    write_json(run.generalist / "history.json", result.history)
    metrics = {
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": test_accuracy,
        "test_errors": int(round((1 - test_accuracy) * len(dataset.test))),
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "examples_seen": result.examples_seen,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(result.seconds, 3),  # training alone (the stage's timing adds data and evaluation)
        "cpu_seconds": round(result.cpu_seconds, 3),
    }
    if loaded:
        metrics["loaded_from"] = cfg.model.weights
    log(f"generalist: {f'loaded from {cfg.model.weights} (not trained here), ' if loaded else ''}val accuracy "
        f"{metrics['val_accuracy']:.4f}, test accuracy {test_accuracy:.4f} ({metrics['test_errors']} errors of "
        f"{len(dataset.test)}), best epoch {result.best_epoch}, {result.seconds:.1f}s")
    return metrics


# ---------------------------------------------------------------------------
# clusters of confusable classes (section 5.3)

COVARIANCE_FILE_MAX_CLASSES = 4000  # above this the (C, C) matrix is recomputed for a report, not stored


def signal_inputs(cfg: RunConfig, dataset: Dataset) -> tuple[object, np.ndarray | None]:
    """(raw inputs, labels) of the rows cluster.signal reads: a split, or a user's unlabeled
    file (labels None); (None, None) for a signal that reads no data (head)."""
    rows = cluster_rows(cfg.cluster.signal, cfg.cluster.split)
    if rows is None:
        return None, None
    if rows in ("val", "train", "test"):
        split = getattr(dataset, rows)
        return split.inputs, split.labels
    return read_unlabeled_inputs(rows, dataset, cfg.data.text_column, "cluster.split"), None


def checked_logits(model: torch.nn.Module, inputs, batch_size: int, device: torch.device, name: str = "the model"):
    """The model's (B, C) logits on raw `inputs`, batch by batch on `device`.

    A non-finite logit is a broken model (e.g. training diverged), not a
    clustering setting: CheckpointError naming `name` and the row.
    """
    start = 0
    for logits in iter_logits(model, model.encode(inputs), batch_size, device):  # (B, C)
        finite = torch.isfinite(logits).all(1)
        if not bool(finite.all()):
            row = start + int(torch.nonzero(~finite)[0])
            raise CheckpointError(f"{name} gives non-finite logits (row {row} of the {len(inputs)} inputs); its "
                                  "weights are broken, e.g. training diverged: train it again (a lower train.lr?)")
        yield logits
        start += len(logits)


def signal_matrix(cfg: RunConfig, dataset: Dataset, model: torch.nn.Module, device: torch.device,
                  name: str = "the model") -> tuple[np.ndarray, dict]:
    """The (C, C) matrix of cluster.signal for this generalist, and signals.confusability's record."""
    inputs, labels = signal_inputs(cfg, dataset)
    batch = rows_per_batch(cfg.cluster.batch_size, dataset.n_classes)
    logits = None if inputs is None else checked_logits(model, inputs, batch, device, name)
    return confusability(cfg, model, device, logits=logits, labels=labels, dataset=dataset)


def make_clusterer(cfg: RunConfig) -> ConfusionClusterer:
    c = cfg.cluster
    return ConfusionClusterer(
        n_clusters=c.n_clusters or None,
        classes_per_cluster=None if c.n_clusters else c.classes_per_cluster,
        max_cluster_size=c.max_cluster_size or None, min_cluster_size=c.min_cluster_size,
        overlap=c.overlap, overlap_ratio=c.overlap_ratio, normalize=c.normalize,
        niter=c.niter, nredo=c.nredo, seed=cfg.seed,
    )


def error_pairs(model: torch.nn.Module, split: Split, batch_size: int, device) -> np.ndarray:
    """(E, 2) (true, predicted) class pairs of the model's errors on a labelled split."""
    predicted = predict_classes(model, model.encode(split.inputs), batch_size, device)
    wrong = predicted != split.labels
    return np.stack([split.labels[wrong], predicted[wrong]], axis=1).astype(np.int64)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # np.save(str) would append ".npy" to the temporary name
            np.save(handle, array)

    atomic_write(path, write)


def cluster_classes(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log) -> dict:
    """The generalist's confusability signal -> K-means groups -> clusters.json.

    Scored by the share of the generalist's errors inside one cluster: on validation, and
    on the held-out split (signals.heldout_split: rows the signal never read), beside the
    share random clusters of the same sizes would hold.
    """
    run.require(run.generalist / "model.safetensors", what="generalist")
    model = load_checkpoint(run.generalist, device)
    cov, record = signal_matrix(cfg, dataset, model, device, f"the generalist ({run.generalist})")
    if record["signal"] == "out_of_fold":
        log(f"cluster signal out_of_fold: {record['folds']} fold generalists, {record['examples_seen']} examples, "
            f"{record['train_seconds']:.1f}s of training")
    try:
        clusterer = make_clusterer(cfg).fit(cov)
    except InvalidParameterError as err:  # a setting that fails against this C, e.g. n_clusters > C
        raise ConfigError(f"cluster.{err}") from None  # the message starts with the setting's name
    clusters = clusters_to_json(clusterer, dataset.classes)
    clusters["split"] = cluster_rows(cfg.cluster.signal, cfg.cluster.split) or "none"
    clusters["examples"] = record["rows"]
    clusters["signal"] = {"name": record["signal"], "temperature": record["temperature"]}
    if dataset.n_classes <= COVARIANCE_FILE_MAX_CLASSES:
        _save_npy(run.root / "covariance.npy", cov.astype(np.float32))  # the signal's matrix
    batch = cfg.train.eval_batch_size
    pairs = error_pairs(model, dataset.val, batch, device)
    _, _, share = error_share_inside(pairs, clusterer.groups_)  # NaN without errors
    held = heldout_split(cfg.cluster.signal, cfg.cluster.split)
    held_pairs = error_pairs(model, getattr(dataset, held), batch, device)
    _, _, held_share = error_share_inside(held_pairs, clusterer.groups_)
    write_json(run.clusters, clusters)
    sizes = [len(g) for g in clusterer.groups_]
    log(format_summary(dataset.n_classes, clusterer.groups_, uncovered=clusterer.uncovered_, error_pairs=pairs,
                       heldout_pairs=held_pairs, heldout_name=held))
    metrics = {"groups": len(sizes), "min_size": min(sizes, default=0), "max_size": max(sizes, default=0),
               "uncovered": len(clusterer.uncovered_), "signal": record["signal"],
               "temperature": record["temperature"], "signal_rows": record["rows"],
               "val_errors_inside_clusters": share, "heldout_split": held, "heldout_errors": len(held_pairs),
               "heldout_errors_inside_clusters": held_share,
               "random_errors_inside_clusters": random_share(clusterer.groups_, dataset.n_classes),
               "signal_seconds": record["seconds"]}
    if record["signal"] == "out_of_fold":
        metrics["signal_examples_seen"] = record["examples_seen"]
    if dataset.planted_groups is not None:
        from sklearn.metrics import adjusted_rand_score

        planted = np.empty(dataset.n_classes, np.int64)
        for g, members in enumerate(dataset.planted_groups):
            planted[members] = g
        metrics["planted_adjusted_rand"] = float(adjusted_rand_score(planted, np.asarray(clusters["assignment"])))
    return metrics


# ---------------------------------------------------------------------------
# evaluation of the combination (section 5.4, the paper's Tables 3-4) and the report


def evaluate_run(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log) -> dict:
    """Test accuracy of generalist + specialists against the generalist alone, like Tables 3-4; with
    combine.generalists=G > 1 also the hybrid of G full models + specialists (the section's `hybrid`).

    First, with combine.choose, the settings the run serves are chosen on the validation split
    (combination_choice.py). The test split is only reported: the comparison uses the chosen top_n and
    specialist_weight, and `served` says whether the run serves that combination or, where it did not
    clearly beat the generalist alone on validation, the generalist."""
    from .ensemble import SpecialistsModel

    choices = choose_combinations(cfg, dataset, run, device, log)
    model = SpecialistsModel(run.root, device, generalists=1, use_specialists=True)
    labels, batch = dataset.test.labels, cfg.train.eval_batch_size
    # batch by batch: (batch, C) probabilities at a time, never the test split's (N, C)
    comparison = StreamedComparison([info["classes"] for _, info in model.specialists], dataset.n_classes)
    for start, (general, combined) in zip(range(0, len(labels), batch), model.iter_proba(dataset.test.inputs, batch)):
        comparison.update(general, combined, labels[start:start + len(general)])
    m = {"mode": model.mode, **comparison.result()}
    if not model.specialists:
        log("evaluate: no finished specialists; the model is the generalist alone")
        return {key: m[key] for key in ("mode", "test_accuracy", "generalist_test_accuracy")}
    log(f"ensemble: test accuracy {m['test_accuracy']:.4f} vs generalist {m['generalist_test_accuracy']:.4f} "
        f"({m['test_errors']} vs {m['generalist_test_errors']} errors, {100 * m['error_reduction']:+.1f}% fewer); "
        f"conditional {m['conditional_accuracy']:.4f} vs {m['generalist_conditional_accuracy']:.4f}")
    if 1 in choices:  # counted while choosing: the chosen setting's errors and the generalist's
        best = next(c for c in choices[1]["candidates"]
                    if (c["top_n"], c["specialist_weight"]) == (model.top_n, model.specialist_weight))
        m.update(val_errors=best["val_errors"], generalist_val_errors=choices[1]["full_models_val_errors"])
    else:
        m.update(validation_errors(model, dataset.val, batch))
    served = choices.get(1, {}).get("use_specialists", True)
    m["served"] = "generalist + specialists" if served else "the generalist alone"
    m["combine"] = {"top_n": model.top_n, "specialist_weight": model.specialist_weight,
                    "chosen_on_validation": 1 in choices}
    if (not served) if 1 in choices else m["val_errors"] > m["generalist_val_errors"]:
        start = ("; specialists started from the generalist (specialists.init=generalist) need less data of their "
                 "own" if cfg.specialists.init == "scratch" else "")
        serves = ("the run serves the generalist alone (combination.json; combine.choose=false combines anyway)"
                  if not served else "the run combines them as combine.choose=false asks")
        if m["val_errors"] < m["generalist_val_errors"]:
            how = (f"fixes too few more of the generalist's errors than it breaks to tell from noise (sign test "
                   f"p={choices[1]['p_value']:.2g}, combine.significance={cfg.combine.significance:g})")
        else:
            more = "more" if m["val_errors"] > m["generalist_val_errors"] else "no fewer"
            how = f"makes {more} errors than the generalist alone"
        log(f"warning: on validation the combination {how} "
            f"({m['val_errors']} against {m['generalist_val_errors']} of {len(dataset.val)}): its specialists "
            f"(specialists.init={cfg.specialists.init}) do not help on this data{start}, and a larger "
            f"specialists.budget trains them longer; {serves}")
    if cfg.combine.generalists > 1:
        m["hybrid"] = evaluate_hybrid(SpecialistsModel(run.root, device, use_specialists=True), dataset, batch,
                                      run.read_metrics())
        h = m["hybrid"]
        log(f"hybrid: {h['mode']}: test accuracy {h['test_accuracy']:.4f} ({h['test_errors']} errors, "
            f"{100 * h['error_reduction']:+.1f}% fewer than the generalist), {h['examples_seen']:,} training examples")
    return m


def choose_combinations(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log) -> dict:
    """{full models: choice} made on the validation split and written to combination.json, for the
    combination of 1 full model and for combine.generalists; {} (and no file) with combine.choose=false."""
    from .ensemble import SpecialistsModel

    clear_choices(run)
    if not cfg.combine.choose:
        return {}
    settings = candidate_settings(cfg.combine, dataset.n_classes)
    choices = {}
    for generalists in sorted({1, cfg.combine.generalists}):
        model = SpecialistsModel(run.root, device, generalists=generalists, use_specialists=True)
        if not model.specialists:
            continue
        choice = choose_combination(model, dataset.val.inputs, dataset.val.labels, settings,
                                    cfg.train.eval_batch_size, cfg.combine.significance)
        write_choice(run, generalists, choice)
        choices[generalists] = choice
        log(f"combine: chosen on {choice['val_examples']} validation examples for {generalists} full model(s): "
            f"top_n={choice['top_n']}, specialist_weight={choice['specialist_weight']:g} "
            f"(fixes {choice['fixed']} of the full model(s)' errors, breaks {choice['broken']}, one-sided sign test "
            f"p={choice['p_value']:.2g}; the full model(s) alone make {choice['full_models_val_errors']})"
            + ("" if choice["use_specialists"] else
               f": served without the specialists (combine.significance={cfg.combine.significance:g})"))
    return choices


def validation_errors(model, val, batch: int) -> dict:
    """Errors of the combination and of the generalist alone on the validation split (what a user can
    compare without looking at test)."""
    errors = general_errors = 0
    for start, (general, combined) in zip(range(0, len(val), batch), model.iter_proba(val.inputs, batch)):
        labels = val.labels[start:start + len(general)]
        errors += int((combined.argmax(1) != labels).sum())
        general_errors += int((general.argmax(1) != labels).sum())
    return {"val_errors": errors, "generalist_val_errors": general_errors}


def evaluate_hybrid(model, dataset: Dataset, batch: int, metrics: dict) -> dict:
    """The hybrid's test results (model: a SpecialistsModel with G > 1 full models) and its training
    examples: its full models' (the generalist and peer members 1..G-1) plus the specialists'."""
    labels = dataset.test.labels
    comparison = StreamedComparison([info["classes"] for _, info in model.specialists], dataset.n_classes)
    for start, (general, combined) in zip(range(0, len(labels), batch), model.iter_proba(dataset.test.inputs, batch)):
        comparison.update(general, combined, labels[start:start + len(general)])
    result = comparison.result()
    members = [read_json(model.run.peers / str(k) / "member.json")["examples_seen"] for k in range(1, model.generalists)]
    examples = (int(metrics["generalist"]["examples_seen"]) + sum(members)
                + int(metrics.get("specialists", {}).get("examples_seen", 0)))
    return {"mode": model.mode, "generalists": model.generalists, "examples_seen": examples,
            **{key: result[key] for key in ("test_accuracy", "test_errors", "error_reduction", "relative_accuracy_gain",
                                            "conditional_accuracy")}}


def write_run_report(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                     out: Path | None = None) -> dict:
    """`index.html` and `summary.md` in `out` (default: the run's `report/`) from the run directory's files."""
    run.require(run.clusters, what="cluster")
    clusters = read_json(run.clusters)
    covariance_file = run.root / "covariance.npy"
    model = load_checkpoint(run.generalist, device)
    held = heldout_split(cfg.cluster.signal, cfg.cluster.split)
    if covariance_file.is_file():
        cov = np.load(covariance_file, allow_pickle=False).astype(np.float64)
    else:  # too many classes to store it: recomputed, but out_of_fold's K trainings stand in for the cheap
        # train_tempered (the same rows and T, the generalist's own outputs)
        signal = "train_tempered" if cfg.cluster.signal == "out_of_fold" else cfg.cluster.signal
        again = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, signal=signal))
        cov, _ = signal_matrix(again, dataset, model, device, f"the generalist ({run.generalist})")
    kind = "covariance" if cfg.cluster.normalize == "covariance" else "correlation"
    if kind == "correlation":
        cov = correlation_from_covariance(cov, overwrite=True)  # no second (C, C) matrix
    paths = write_report(
        out or run.report, dataset.classes, cov, [g["classes"] for g in clusters["groups"]], matrix_kind=kind,
        uncovered=clusters["uncovered"]["classes"],
        error_pairs=error_pairs(model, dataset.val, cfg.train.eval_batch_size, device),
        heldout_pairs=error_pairs(model, getattr(dataset, held), cfg.train.eval_batch_size, device), heldout_name=held,
        metrics=run.read_metrics(), settings=clusters["settings"], title=f"specialists: {dataset.name}",
    )
    log(f"report: {paths['html']}")
    return {"html": str(paths["html"])}


# ---------------------------------------------------------------------------
# the run: stages in order, resume, fork


def _generalist_done(run: RunDir) -> bool:
    return "test_accuracy" in run.read_metrics().get("generalist", {})


def _cluster_done(run: RunDir) -> bool:
    return "groups" in run.read_metrics().get("cluster", {}) and run.clusters.is_file()


def _peer_done(run: RunDir) -> bool:
    return "test_accuracy" in run.read_metrics().get("peer_ensemble", {})


# Each resumable stage in order: (timings key, metrics section, files and folders it leaves, whether it is done,
# the config keys it reads). A change to a stage's keys reruns it and every stage after it; `combine` is read
# only by the evaluation, which every run and resume repeats, except combine.generalists, which sets how many
# full models the peer stage trains for the hybrid; a key no stage claims reruns everything.
STAGES = (
    ("generalist", "generalist", ("generalist",), _generalist_done, ("seed", "device", "threads", "data", "model",
                                                                     "train")),
    ("cluster", "cluster", ("clusters.json", "covariance.npy"), _cluster_done, ("cluster",)),
    ("specialists", "specialists", ("specialists",), specialists_done, ("specialists", "ray")),
    ("peer", "peer_ensemble", ("peers",), _peer_done, ("peer", "combine.generalists")),
)
EVALUATION_ONLY = ("combine",)


def _run_name(cfg: RunConfig) -> str:
    if cfg.data.kind != "csv_text":
        return cfg.data.kind
    return Path(cfg.data.train.split(":")[-1]).parent.name or "csv"


# What `--resume` may change: where and how fast the run goes (Ray, device, threads, resources per task), not
# what it computes. Any other key differing from the run's config.yaml is refused.
RESUME_OVERRIDABLE = ("ray", "device", "threads")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare_run(cfg: RunConfig | None, out: str | Path | None, resume: bool, overrides: list[str] = (),
                log: Log = print) -> tuple[RunConfig, RunConfig, RunDir]:
    """(the config to save, the config to run with, the run directory): a fresh run's, or a resumed one's.

    A resume starts from the run's config.yaml with `overrides` (or compares a whole `cfg` with it): only
    RESUME_OVERRIDABLE keys may differ, any other is a ConfigError naming it. Its address: an explicit
    ray.address override, else $RAY_ADDRESS (a Ray job's, say), else the saved ray.address; the environment's
    is used, not saved.
    """
    if not resume:
        return cfg, cfg, RunDir(out or default_out_dir(_run_name(cfg)))
    run = RunDir(out)
    run.require(run.config, what="first")
    saved = load_config(run.config)
    given = load_config(run.config, list(overrides)) if cfg is None else cfg
    old, new = _flat(to_dict(saved)), _flat(to_dict(given))
    changed = [key for key in new if new[key] != old.get(key)]
    refused = [key for key in changed if key.split(".")[0] not in RESUME_OVERRIDABLE]
    if refused:
        listed = ", ".join(f"{key}={new[key]!r} (the run has {old.get(key)!r})" for key in refused)
        raise ConfigError(f"{listed}: --resume {run.root} may change only settings that do not change results "
                          f"(ray.*, device, threads); start a new run (--out) to change "
                          f"{'it' if len(refused) == 1 else 'them'}")
    for key in changed:
        log(f"resume: {key}={new[key]!r} (was {old.get(key)!r})")
    active = given
    environment = os.environ.get("RAY_ADDRESS", "").strip()
    explicit = "ray.address" in changed or any(parse_override(o)[0] == "ray.address" for o in overrides)
    if environment and given.ray.address.strip() and not explicit:
        log(f"resume: joining RAY_ADDRESS={environment!r}, not the saved ray.address={given.ray.address!r} "
            "(pass ray.address=... to choose)")
        active = dataclasses.replace(given, ray=dataclasses.replace(given.ray, address=""))
    return given, active, run


def _needs_ray(cfg: RunConfig, run: RunDir, resume: bool) -> bool:
    """Whether this run will train specialists (so Ray is checked before the generalist trains)."""
    return (cfg.specialists.enabled and (cfg.cluster.enabled or run.clusters.is_file())
            and not (resume and specialists_done(run)))


@contextmanager
def _resume_hint(run: RunDir):
    """A run stopped by Ctrl-C or by the file system (permissions, a full disk) says how to go on: the note
    is printed by the command line; the finished stages' files are whole (atomic writes)."""
    try:
        yield
    except (KeyboardInterrupt, OSError) as err:
        note = f"the finished stages are kept; resume with `specialists run --resume {run.root}`"
        err.__notes__ = [*getattr(err, "__notes__", []), note]  # what add_note does (Python >= 3.11)
        raise


def run_pipeline(cfg: RunConfig | None, out: str | Path | None = None, resume: bool = False,
                 log: Log = print, progress: bool = True, overrides: list[str] = ()) -> RunDir:
    """`specialists run`: every stage that exists, in order, into one run directory.

    Everything that can be checked before the generalist trains is checked
    first, before the run directory is made: the data, the settings against
    the data (check_run_fits_data), the model's size, the device, and Ray (its
    address and resources, when specialists will train). The stages run under
    the run lock (RunDir.lock). `resume=True` finishes the run `out`, with
    `overrides` of settings that do not change results (see prepare_run).
    """
    saved, cfg, run = prepare_run(cfg, out, resume, overrides, log)
    started = time.perf_counter()
    device = setup_torch(cfg)
    dataset = load_dataset(cfg.data, cfg.seed)  # validate data and model before anything is written
    check_run_fits_data(cfg, dataset)
    kwargs = model_kwargs(cfg.model, dataset.input_kind, dataset.input_shape, dataset.n_classes)
    if cfg.specialists.enabled and cfg.specialists.freeze and cfg.model.name not in USER_MODELS:
        frozen_parameters(model_skeleton(cfg.model.name, kwargs), cfg.specialists.freeze)  # yours: at their stage
    needs_ray = _needs_ray(cfg, run, resume)
    if needs_ray:
        from .parallel import preflight  # ray: imported only by runs that train specialists

        preflight(cfg.ray, log)
    run.create(resume=resume)
    with run.lock(log), _resume_hint(run):
        write_text(run.config, dump_config(saved))
        if not needs_ray:
            return _run_stages(cfg, dataset, run, device, resume, log, progress, started)
        from .parallel import start_early, stop_early

        # Ray starts, and its workers import torch, while the generalist trains: off the specialists' path
        warming = start_early(cfg.ray, workers=cfg.cluster.groups(dataset.n_classes))
        # ... on the cores those workers leave it: with more threads than free cores, the generalist's threads
        # spin waiting for each other, and both it and the workers take longer (README, Performance)
        cores = torch.get_num_threads()
        threads = max(1, cores - warming) if warming and cores > 1 and not cfg.threads and device.type == "cpu" else 0
        try:
            return _run_stages(cfg, dataset, run, device, resume, log, progress, started, threads)
        finally:
            stop_early()  # a run that ended before its specialists stage took the session over


def _train_generalist(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                      progress: bool, threads: int) -> dict:
    if not threads:
        return train_generalist(cfg, dataset, run, device, log, progress)
    log(f"generalist: {threads} torch thread(s) while Ray starts its workers on this machine")
    with torch_threads(threads):
        return train_generalist(cfg, dataset, run, device, log, progress)


def _train_specialists(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, log: Log,
                       progress: bool) -> dict:
    from .parallel import train_specialists  # ray: imported only by runs that train specialists

    return train_specialists(cfg, dataset, run, device, log, progress)


def _run_stages(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device, resume: bool, log: Log,
                progress: bool, started: float, generalist_threads: int = 0) -> RunDir:
    """run_pipeline's stages, in order, under the run lock.

    generalist_threads: torch threads the generalist trains with (0: as set up).
    """
    write_json(run.classes, dataset.classes)
    if dataset.planted_groups is not None:
        write_json(run.root / "planted_groups.json", dataset.planted_groups)
    run.update_metrics({"timings": {"data": round(time.perf_counter() - started, 3)},
                        "data": data_summary(dataset, device)})
    log(f"data: {dataset.name}, {dataset.n_classes} classes, {len(dataset.train)} train / {len(dataset.val)} val / "
        f"{len(dataset.test)} test; device {device}; run directory {run.root}")

    # Per stage of STAGES: its name in the log, why it may not run ((condition, reason) pairs, tried in order when
    # its turn comes), what a resume says when it is done already, and its body.
    plan = {
        "generalist": ("generalist", [], "already trained",
                       lambda: _train_generalist(cfg, dataset, run, device, log, progress, generalist_threads)),
        "cluster": ("cluster", [(lambda: not cfg.cluster.enabled, "disabled (cluster.enabled=false)")], "already done",
                    lambda: cluster_classes(cfg, dataset, run, device, log)),
        "specialists": ("specialists", [
            (lambda: not cfg.specialists.enabled, "disabled (specialists.enabled=false)"),
            (lambda: not run.clusters.is_file(), "no clusters.json (the cluster stage is disabled), skipped"),
        ], "already trained", lambda: _train_specialists(cfg, dataset, run, device, log, progress)),
        "peer": ("peer ensemble", [
            (lambda: not cfg.peer.enabled, "disabled (peer.enabled=false)"),
            (lambda: not specialists_done(run), "skipped, it matches the specialists' compute and there are none"),
        ], "already trained", lambda: train_peers(cfg, dataset, run, device, log, progress)),
    }
    for timing, section, _, done, _ in STAGES:
        name, skips, finished, body = plan[timing]
        reason = next((why for skipped, why in skips if skipped()), None)
        if reason is None and resume and done(run):
            reason = f"{finished}, skipped"
        if reason is not None:
            log(f"{name}: {reason}")
        else:
            timed_stage(run, timing, body, section)

    timed_stage(run, "evaluate", lambda: evaluate_run(cfg, dataset, run, device, log), "ensemble")

    run.update_metrics({"timings": {"total": round(time.perf_counter() - started, 3)}})
    if run.clusters.is_file():
        timed_stage(run, "report", lambda: write_run_report(cfg, dataset, run, device, log))
    return run


def fork_run(base: str | Path | RunDir, out: str | Path, overrides: list[str] = ()) -> RunDir:
    """A new run directory `out` holding `base`'s config with `overrides` and copies of the
    completed stages of `base` that the overrides leave unchanged.

    A stage is kept when no key it or an earlier stage reads is overridden
    (see STAGES): `specialists.soft_weight=0` keeps the generalist and the
    clusters, `cluster.overlap=2` only the generalist, `combine.top_n=1`
    everything. Finish it with `run_pipeline(None, out, resume=True)` (or
    `specialists run --resume OUT`), which trains the rest and evaluates.
    """
    base = base if isinstance(base, RunDir) else RunDir(base)
    base.require(base.config, base.classes, what="first")
    old = load_config(base.config)
    cfg = load_config(base.config, list(overrides))
    run = RunDir(out).create()
    old_keys, new_keys = to_dict(old), to_dict(cfg)
    changed = {key for key in new_keys if new_keys[key] != old_keys[key]} - set(EVALUATION_ONLY)
    if cfg.combine.generalists != old.combine.generalists:
        changed.add("combine.generalists")
    first_changed = min((next((i for i, stage in enumerate(STAGES) if key in stage[4]), 0) for key in changed),
                        default=len(STAGES))
    metrics = base.read_metrics()
    kept = {"data": metrics.get("data", {}), "timings": {"data": metrics.get("timings", {}).get("data", 0.0)}}
    for name, section, files, done, _ in STAGES[:first_changed]:
        if not done(base):
            break
        for file in files:
            source = base.root / file
            if source.is_dir():
                shutil.copytree(source, run.root / file)
            elif source.is_file():
                shutil.copy2(source, run.root / file)
        kept[section] = metrics[section]
        if name in metrics.get("timings", {}):
            kept["timings"][name] = metrics["timings"][name]
    shutil.copy2(base.classes, run.classes)
    write_json(run.metrics, kept)
    write_text(run.config, dump_config(cfg))  # last: a fork without config.yaml is not resumable
    return run


# ---------------------------------------------------------------------------
# commands on an existing run directory


def recluster(run_dir: str | Path, overrides: list[str] = (), log: Log = print) -> RunDir:
    """`specialists cluster RUN_DIR [cluster.k=v ...]`: new groups for an existing generalist."""
    run = RunDir(run_dir)
    run.require(run.generalist / "model.safetensors", what="generalist")
    bad = [o for o in overrides if not o.startswith("cluster.")]
    if bad:
        raise ConfigError(f"specialists cluster only takes cluster.* overrides, got {bad}")
    if run.specialists.is_dir() and any(run.specialists.iterdir()):
        raise RunDirError(f"{run.root} already has specialists trained on its clusters; "
                          "re-cluster in a new run (specialists run ... cluster.key=value)")
    cfg, dataset = dataset_for_run(run)
    cfg = load_config(run.config, list(overrides))
    device = setup_torch(cfg)
    with run.lock(log):
        timed_stage(run, "cluster", lambda: cluster_classes(cfg, dataset, run, device, log), "cluster")
        write_text(run.config, dump_config(cfg))  # the config now says how clusters.json was made
        timed_stage(run, "report", lambda: write_run_report(cfg, dataset, run, device, log))
    return run


def evaluate_command(run_dir: str | Path, log: Log = print) -> RunDir:
    """`specialists evaluate RUN_DIR`."""
    run = RunDir(run_dir)
    run.require(run.generalist / "model.safetensors", what="generalist")
    cfg, dataset = dataset_for_run(run)
    device = setup_torch(cfg)
    with run.lock(log):
        timed_stage(run, "evaluate", lambda: evaluate_run(cfg, dataset, run, device, log), "ensemble")
    return run


def report_run(run_dir: str | Path, log: Log = print, out: str | Path | None = None) -> RunDir:
    """`specialists report RUN_DIR [--out DIR]`: the HTML/Markdown report from a run directory, written into
    DIR (default: RUN_DIR/report); with --out the run directory is only read."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise RunDirError(f"--out {out} exists and is not a folder")
    run = RunDir(run_dir)
    cfg, dataset = dataset_for_run(run)
    try:
        write_run_report(cfg, dataset, run, setup_torch(cfg), log, out=Path(out) if out else None)
    except OSError as err:
        if out is None and err.errno in WRITES_REFUSED:
            err.add_note(f"write the report elsewhere: specialists report {run.root} --out DIR")
        raise
    return run
