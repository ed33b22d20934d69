"""Typed run configuration: defaults in code, YAML overrides, `a.b=value` overrides.

Every stage of `specialists run` reads one frozen dataclass of this file
(`specialists distill` reads those of distill_config.py, loaded the same way). `load_config` merges, in order, the code
defaults, a YAML file and command-line overrides, and rejects unknown keys,
wrong types and impossible values with a message naming the key and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .choices import (  # the one list of each choice; choices.py imports nothing
    AUTO,
    CLUSTER_SIGNALS,
    DATA_KINDS,
    DEVICES,
    DUSTBIN_CORRECTIONS,
    DUSTBIN_MODES,
    LABELLED_SIGNALS,
    MODEL_NAMES,
    NORMALIZATIONS,
    OPTIMIZERS,
    SCHEDULES,
    SPECIALIST_INITS,
    USER_MODELS,
)


class ConfigError(ValueError):
    """A configuration key or value is unknown, mistyped or impossible."""


_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # module.path:attr.path


# Bounds on model sizes, far above any useful value, that refuse a typo before it allocates memory.
MAX_WIDTH = 1 << 16  # a hidden layer's units, an embedding's dimensions
MAX_BUCKETS = 1 << 26  # hashed n-gram rows
MAX_TABLE = 1 << 31  # weights of the embedding table (8 GiB of float32)
FASTTEXT_SPECIALIST_CHAR_NGRAMS = 3  # what specialists.init=auto's fasttext specialists read beside the words:
FASTTEXT_SPECIALIST_CHAR_NGRAMS_MIN = 2  # character 2..3-grams (README, the frontier)
FASTTEXT_SPECIALIST_BUCKETS = 100_000  # ... into at most this many hash buckets (README, the frontier)


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """ConfigError `key=value: why` unless `ok` (every config's validate uses it)."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass(frozen=True)
class SyntheticConfig:
    """A large label set with planted groups of confusable classes.

    Each group owns a random low-dimensional subspace in which its classes
    differ; a narrow generalist cannot resolve every group's subspace at once,
    which is the capacity-limited regime specialists are for.
    """

    n_classes: int = 1000
    n_groups: int = 50
    n_features: int = 128
    subspace_dim: int = 8  # directions in which one group's classes differ
    train_per_class: int = 60
    test_per_class: int = 20
    group_spread: float = 3.0  # distance scale between group centres
    class_spread: float = 1.0  # distance scale between classes of one group: smaller is harder
    noise: float = 1.0  # per-example noise; larger is harder
    frequency_skew: float = 0.0  # 0: balanced classes; >0: Zipf-like class frequencies

    def validate(self, prefix: str) -> None:
        require(self.n_classes >= 2, f"{prefix}.n_classes", self.n_classes, "need at least 2 classes")
        require(1 <= self.n_groups <= self.n_classes, f"{prefix}.n_groups", self.n_groups,
                 f"must be between 1 and n_classes={self.n_classes}")
        require(self.n_features >= 1, f"{prefix}.n_features", self.n_features, "must be >= 1")
        require(1 <= self.subspace_dim <= self.n_features, f"{prefix}.subspace_dim", self.subspace_dim,
                 f"must be between 1 and n_features={self.n_features}")
        require(self.train_per_class >= 2, f"{prefix}.train_per_class", self.train_per_class,
                 "need >= 2 so a validation split can be carved")
        require(self.test_per_class >= 1, f"{prefix}.test_per_class", self.test_per_class, "must be >= 1")
        for name in ("group_spread", "class_spread", "noise"):
            value = getattr(self, name)
            require(value > 0, f"{prefix}.{name}", value, "must be > 0")
        require(self.frequency_skew >= 0, f"{prefix}.frequency_skew", self.frequency_skew, "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from. `builtin:banking77` is the embedded default."""

    kind: str = "csv_text"
    train: str = "builtin:banking77/train.csv"  # csv_text: CSV path
    test: str = "builtin:banking77/test.csv"
    text_column: str = "text"
    label_column: str = "category"
    path: str = ""  # npz: the .npz file; mnist: the folder of IDX files
    val_fraction: float = 0.1  # carved from train, stratified, seeded
    max_train: int = 0  # 0: all; else a seeded stratified subsample of train
    name: str = ""  # what the report's title and metrics.json call the data; "": the source's (a CSV's file name)
    # >= 2: leave fold holdout_fold of holdout_folds (data.fold_of_rows, seeded) out of the training split;
    # `specialists distill` sets these on the runs that give out-of-fold teacher targets
    holdout_folds: int = 0
    holdout_fold: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self, prefix: str = "data") -> None:
        require(self.kind in DATA_KINDS, f"{prefix}.kind", self.kind, f"must be one of {DATA_KINDS}")
        require(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "must be in (0, 1)")
        require(self.max_train >= 0, f"{prefix}.max_train", self.max_train, "must be >= 0 (0 = all)")
        require(self.holdout_folds == 0 or 2 <= self.holdout_folds <= 20, f"{prefix}.holdout_folds",
                 self.holdout_folds, "must be 0 (off) or in [2, 20]")
        require(0 <= self.holdout_fold < max(self.holdout_folds, 1), f"{prefix}.holdout_fold", self.holdout_fold,
                 f"must be in [0, holdout_folds={self.holdout_folds})")
        if self.kind == "csv_text":
            require(bool(self.train), f"{prefix}.train", self.train, "a CSV path is required")
            require(bool(self.test), f"{prefix}.test", self.test, "a CSV path is required")
            require(bool(self.text_column), f"{prefix}.text_column", self.text_column, "must not be empty")
            require(bool(self.label_column), f"{prefix}.label_column", self.label_column, "must not be empty")
        if self.kind in ("npz", "mnist"):
            require(bool(self.path), f"{prefix}.path", self.path, f"a path is required for kind={self.kind}")
        self.synthetic.validate(f"{prefix}.synthetic")


@dataclass(frozen=True)
class ModelConfig:
    """The generalist's architecture; specialists copy it."""

    name: str = "fasttext"  # fasttext (texts) | mlp (features, images) | cnn (images)
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.2
    input_dropout: float = 0.0  # the paper's MNIST nets drop 20% of input pixels
    embed_dim: int = 128  # fasttext: embedding size
    buckets: int = 200_000  # fasttext: hashed n-gram vocabulary size
    ngrams: int = 2  # fasttext: word n-grams up to this length
    # fasttext: also the character 1..n-grams of each word; 0 = off. For text written
    # without spaces (Chinese, Japanese, Thai) set 2 or 3: a clause is one long word there.
    char_ngrams: int = 0
    char_ngrams_min: int = 1  # fasttext: the shortest character grams (1: single characters too)
    jitter: int = 0  # cnn/mlp on images: random translation by up to this many pixels when training
    # A generalist you bring (name torch | hf | timm; adapters.py, README "Bring your own model"):
    factory: str = ""  # torch: "module:callable" returning your torch.nn.Module (your code: it is imported)
    factory_args: dict[str, Any] = field(default_factory=dict)  # torch: keyword arguments of the factory
    arch: str = ""  # timm: the architecture, e.g. resnet18
    # torch, timm: a safetensors state dict; hf: a save_pretrained folder (config.json, model.safetensors,
    # tokenizer.json); "" (torch, timm): the generalist stage trains the network from its initial weights
    weights: str = ""
    fine_tune: bool = False  # with weights: false uses them as they are (not trained here); true trains on, with train.*

    def validate(self, prefix: str = "model") -> None:
        require(self.name in MODEL_NAMES, f"{prefix}.name", self.name, f"must be one of {MODEL_NAMES}")
        user = self.name in USER_MODELS
        require(self.name == "torch" or not self.factory, f"{prefix}.factory", self.factory,
                 f"is read only with {prefix}.name=torch (here {self.name})")
        require(self.name == "torch" or not self.factory_args, f"{prefix}.factory_args", self.factory_args,
                 f"is read only with {prefix}.name=torch (here {self.name})")
        require(self.name != "torch" or bool(_FACTORY.fullmatch(self.factory)), f"{prefix}.factory", self.factory,
                 "model.name=torch needs 'module:callable', the function or class that builds your network, "
                 "e.g. my_pkg.nets:build")
        require(self.name == "timm" or not self.arch, f"{prefix}.arch", self.arch,
                 f"is read only with {prefix}.name=timm (here {self.name})")
        require(self.name != "timm" or bool(self.arch), f"{prefix}.arch", self.arch,
                 "model.name=timm needs the architecture, e.g. resnet18")
        require(user or not self.weights, f"{prefix}.weights", self.weights,
                 f"is read only for a model you bring ({'|'.join(USER_MODELS)}); {self.name} trains here")
        require(self.name != "hf" or bool(self.weights), f"{prefix}.weights", self.weights,
                 "model.name=hf needs the folder save_pretrained wrote (config.json, model.safetensors, tokenizer.json)")
        require(not self.fine_tune or bool(self.weights), f"{prefix}.fine_tune", self.fine_tune,
                 f"needs {prefix}.weights to start from (without weights the generalist is trained from scratch)")
        require(all(1 <= h <= MAX_WIDTH for h in self.hidden), f"{prefix}.hidden", self.hidden,
                 f"every width must be in [1, {MAX_WIDTH}]")
        require(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")
        require(0 <= self.input_dropout < 1, f"{prefix}.input_dropout", self.input_dropout, "must be in [0, 1)")
        require(1 <= self.embed_dim <= MAX_WIDTH, f"{prefix}.embed_dim", self.embed_dim,
                 f"must be in [1, {MAX_WIDTH}]")
        require(16 <= self.buckets <= MAX_BUCKETS, f"{prefix}.buckets", self.buckets, f"must be in [16, {MAX_BUCKETS}]")
        require(self.buckets * self.embed_dim <= MAX_TABLE, f"{prefix}.buckets", self.buckets,
                 f"with {prefix}.embed_dim={self.embed_dim} the embedding table would have "
                 f"{self.buckets * self.embed_dim} weights, over {MAX_TABLE}")
        require(self.ngrams >= 1, f"{prefix}.ngrams", self.ngrams, "must be >= 1")
        require(0 <= self.char_ngrams <= 8, f"{prefix}.char_ngrams", self.char_ngrams,
                 "must be in [0, 8] (0 = off; 2 or 3 for text without spaces)")
        require(1 <= self.char_ngrams_min <= max(self.char_ngrams, 1), f"{prefix}.char_ngrams_min",
                 self.char_ngrams_min, f"must be in [1, {prefix}.char_ngrams] (here {self.char_ngrams}; 1 when the "
                 "model reads no character grams)")
        require(0 <= self.jitter <= 64, f"{prefix}.jitter", self.jitter, "must be in [0, 64] pixels")


@dataclass(frozen=True)
class TrainConfig:
    """One training loop's schedule (generalist; specialists override some of it)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9  # sgd only
    patience: int = 4  # epochs without validation improvement before stopping; 0 = never stop early
    eval_batch_size: int = 1024
    schedule: str = "constant"  # learning rate: constant | linear (to 0 over the epochs, or a budget's examples)
    # the dropout nets' max-norm constraint (Srivastava et al. 2014): after every step each unit's incoming
    # weights (a row of an nn.Linear) are scaled back to this L2 norm if longer; 0 = off
    max_norm: float = 0.0

    def validate(self, prefix: str = "train") -> None:
        require(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "must be >= 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        require(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        require(self.optimizer in OPTIMIZERS, f"{prefix}.optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        require(0 <= self.momentum < 1, f"{prefix}.momentum", self.momentum, "must be in [0, 1)")
        require(self.patience >= 0, f"{prefix}.patience", self.patience, "must be >= 0")
        require(self.eval_batch_size >= 1, f"{prefix}.eval_batch_size", self.eval_batch_size, "must be >= 1")
        require(self.schedule in SCHEDULES, f"{prefix}.schedule", self.schedule, f"must be one of {SCHEDULES}")
        require(self.max_norm >= 0, f"{prefix}.max_norm", self.max_norm, "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class ClusterConfig:
    """Confusable-class clustering (paper section 5.3): covariance of the generalist's
    probabilities on `split`, then faiss K-means on its normalised columns.

    `validate` checks what needs no data; checks against the number of classes
    (n_clusters <= C, room for every class) are ConfusionClusterer.fit's, whose
    InvalidParameterError the cluster stage reports as a ConfigError.
    """

    enabled: bool = True
    split: str = "val"  # val | train | test | a path to unlabeled inputs (.csv with data.text_column, or .npy)
    n_clusters: int = 0  # k; 0: derived from classes_per_cluster
    classes_per_cluster: int = 20  # chosen on Banking77 validation errors (README, The stages: Clusters)
    max_cluster_size: int = 0  # 0: no limit
    min_cluster_size: int = 2
    overlap: int = 1  # a class may join up to this many groups (1: disjoint)
    overlap_ratio: float = 1.5
    normalize: str = "l2"  # l2 (spherical K-means on unit columns) | correlation | covariance
    niter: int = 25
    nredo: int = 5
    batch_size: int = 4096  # rows per batch of the signal; fewer at large C (covariance.rows_per_batch)
    # one of CLUSTER_SIGNALS (signals.py). probs by measurement: tempered T=2 holds more of the held-out errors
    # inside clusters but did not lower the ensemble's validation errors on Banking77 (README, cluster signals)
    signal: str = "probs"
    temperature: float = 2.0  # T of softmax(z / T) for the tempered, train_tempered, out_of_fold and confusion signals
    folds: int = 5  # out_of_fold: generalists trained, each predicting the fold it did not see

    def groups(self, n_classes: int) -> int:
        """k for data of n_classes classes: n_clusters, else ceil(n_classes / classes_per_cluster)."""
        return self.n_clusters or math.ceil(n_classes / self.classes_per_cluster)

    def validate(self, prefix: str = "cluster") -> None:
        require(self.n_clusters >= 0, f"{prefix}.n_clusters", self.n_clusters, "must be >= 0 (0 = from classes_per_cluster)")
        require(self.classes_per_cluster >= 1, f"{prefix}.classes_per_cluster", self.classes_per_cluster, "must be >= 1")
        require(self.max_cluster_size >= 0, f"{prefix}.max_cluster_size", self.max_cluster_size, "must be >= 0 (0 = no limit)")
        require(self.min_cluster_size >= 1, f"{prefix}.min_cluster_size", self.min_cluster_size, "must be >= 1")
        require(self.max_cluster_size == 0 or self.max_cluster_size >= self.min_cluster_size,
                 f"{prefix}.max_cluster_size", self.max_cluster_size, f"must be >= min_cluster_size={self.min_cluster_size}")
        require(self.overlap >= 1, f"{prefix}.overlap", self.overlap, "must be >= 1")
        require(self.overlap_ratio >= 1, f"{prefix}.overlap_ratio", self.overlap_ratio, "must be >= 1")
        require(self.normalize in NORMALIZATIONS, f"{prefix}.normalize", self.normalize,
                 f"must be one of {NORMALIZATIONS}")
        require(self.niter >= 1, f"{prefix}.niter", self.niter, "must be >= 1")
        require(self.nredo >= 1, f"{prefix}.nredo", self.nredo, "must be >= 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        require(bool(self.split), f"{prefix}.split", self.split, "must be val, train, test or a file path")
        require(self.signal in CLUSTER_SIGNALS, f"{prefix}.signal", self.signal, f"must be one of {CLUSTER_SIGNALS}")
        require(0 < self.temperature < float("inf"), f"{prefix}.temperature", self.temperature,
                 "must be a finite number > 0")
        require(self.folds >= 2, f"{prefix}.folds", self.folds, "must be >= 2")
        unlabeled = self.split not in ("val", "train", "test")
        require(not (unlabeled and self.signal in LABELLED_SIGNALS), f"{prefix}.signal", self.signal,
                 f"reads labels, but {prefix}.split={self.split!r} is an unlabeled file; use a signal that needs "
                 "no labels (probs, tempered, head) "
                 f"or {prefix}.split=val|train|test")
        require(not (unlabeled and self.signal == "train_tempered"), f"{prefix}.signal", self.signal,
                 f"reads the training split, so {prefix}.split={self.split!r} would go unused; "
                 f"use {prefix}.signal=tempered to read the file")


@dataclass(frozen=True)
class SpecialistsConfig:
    """One specialist per cluster (paper sections 5.2 and 6.1), all trained on Ray.

    A specialist starts from the generalist's weights with a head over its
    classes plus a dustbin, sees an enriched epoch (`special_fraction` of it
    from its own classes, re-drawn each epoch) and is regularised towards the
    generalist's soft targets. Zero / -1 schedule values inherit `train`.
    """

    enabled: bool = True
    special_fraction: float = 0.5  # share of each epoch drawn from the specialist's own classes
    soft_weight: float = 0.5  # weight of the generalist's soft targets; the labels get 1 - this
    temperature: float = 2.0  # T of the soft targets (the soft term is T^2-scaled)
    # prior: soft targets moved into the enriched prior while training, dustbin logit corrected after (exact);
    # paper: the paper's recipe, unmoved soft targets and the same correction; none: no correction
    dustbin_correction: str = "prior"
    epochs: int = 0  # 0: train.epochs
    batch_size: int = 0  # 0: train.batch_size
    # 5x the generalist's default: a specialist must move away from its starting point (the generalist) to add
    # anything to the combination; chosen on Banking77 validation errors, with patience 8 (README, ablation)
    lr: float = 0.01  # 0: train.lr
    patience: int = 8  # -1: train.patience; 0: never stop early
    widen: float = 1.0  # hidden widths x this; the extra units start with zero outgoing weights
    # generalist: its weights (the paper). scratch: the same network with fresh weights drawn from the specialist's
    # seed (only the input encoding, e.g. feature standardisation, is the generalist's): independent of it, like
    # a peer member, for data where ensembles gain from independent errors. auto: the model's default, made
    # concrete when the config loads (RunConfig.with_model_defaults).
    init: str = AUTO
    # With init=scratch and model.name=fasttext, the specialists may hash other n-grams than the generalist
    # (0 / -1: the model's): specialists that read other features make errors of their own (README, the frontier)
    ngrams: int = 0
    char_ngrams: int = -1
    char_ngrams_min: int = 0  # 0: model.char_ngrams_min
    embed_dim: int = 0  # with init=scratch and fasttext: the specialists' embedding size (0: model.embed_dim)
    buckets: int = 0  # with init=scratch and fasttext: the specialists' hash buckets (0: model.buckets)
    # Extra training compute of all specialists together, as a fraction of the generalist's examples_seen
    # (forward + backward passes), shared in proportion to their epoch sizes; early stopping still applies.
    # 0: no budget (specialists.epochs and early stopping decide). 0.5: chosen on Banking77 validation errors
    # (README, Performance: the accuracy-compute frontier).
    budget: float = 0.5
    schedule: str = ""  # "": train.schedule; linear: the learning rate decays to 0 over each one's budget share
    # Parameters a specialist keeps at their starting values, by name prefix (`model.named_parameters()`, e.g.
    # [embedding] for fastText's table, or a backbone you bring): cheaper steps, nothing learnt below them
    freeze: list[str] = field(default_factory=list)

    def hashing(self) -> dict:
        """The fasttext settings a specialist reads instead of the generalist's (empty: the same)."""
        return {**({"ngrams": self.ngrams} if self.ngrams else {}),
                **({"char_ngrams": self.char_ngrams} if self.char_ngrams >= 0 else {}),
                **({"char_ngrams_min": self.char_ngrams_min} if self.char_ngrams_min else {})}

    def fresh_network(self) -> dict:
        """The fasttext settings a specialist started afresh takes instead of the generalist's: its hashing,
        its embedding size and its number of buckets (empty: the same)."""
        return {**self.hashing(), **({"embed_dim": self.embed_dim} if self.embed_dim else {}),
                **({"buckets": self.buckets} if self.buckets else {})}

    def validate(self, prefix: str = "specialists") -> None:
        require(0 < self.special_fraction < 1, f"{prefix}.special_fraction", self.special_fraction,
                 "must be in (0, 1): the rest of each epoch comes from the other classes")
        require(0 <= self.soft_weight <= 1, f"{prefix}.soft_weight", self.soft_weight, "must be in [0, 1]")
        require(self.temperature > 0, f"{prefix}.temperature", self.temperature, "must be > 0")
        require(self.dustbin_correction in DUSTBIN_CORRECTIONS, f"{prefix}.dustbin_correction",
                 self.dustbin_correction, f"must be one of {DUSTBIN_CORRECTIONS}")
        require(self.epochs >= 0, f"{prefix}.epochs", self.epochs, "must be >= 0 (0 = train.epochs)")
        require(self.batch_size >= 0, f"{prefix}.batch_size", self.batch_size, "must be >= 0 (0 = train.batch_size)")
        require(self.lr >= 0, f"{prefix}.lr", self.lr, "must be >= 0 (0 = train.lr)")
        require(self.patience >= -1, f"{prefix}.patience", self.patience, "must be >= -1 (-1 = train.patience)")
        require(self.widen >= 1, f"{prefix}.widen", self.widen, "must be >= 1 (1 = the generalist's widths)")
        require(self.init in SPECIALIST_INITS, f"{prefix}.init", self.init,
                f"must be one of {(AUTO, *SPECIALIST_INITS)}")
        require(self.ngrams >= 0, f"{prefix}.ngrams", self.ngrams, "must be >= 0 (0 = model.ngrams)")
        require(-1 <= self.char_ngrams <= 8, f"{prefix}.char_ngrams", self.char_ngrams,
                 "must be in [-1, 8] (-1 = model.char_ngrams, 0 = none)")
        require(0 <= self.char_ngrams_min <= 8, f"{prefix}.char_ngrams_min", self.char_ngrams_min,
                 "must be in [0, 8] (0 = model.char_ngrams_min)")
        require(0 <= self.embed_dim <= MAX_WIDTH, f"{prefix}.embed_dim", self.embed_dim,
                f"must be in [0, {MAX_WIDTH}] (0 = model.embed_dim)")
        require(self.buckets == 0 or 16 <= self.buckets <= MAX_BUCKETS, f"{prefix}.buckets", self.buckets,
                f"must be 0 (model.buckets) or in [16, {MAX_BUCKETS}]")
        require(self.schedule in ("", *SCHEDULES), f"{prefix}.schedule", self.schedule,
                 f"must be one of {SCHEDULES}, or empty for train.schedule")
        require(self.budget >= 0, f"{prefix}.budget", self.budget,
                 "must be >= 0: extra examples as a fraction of the generalist's (0 = no budget)")
        require(all(name.strip() for name in self.freeze), f"{prefix}.freeze", self.freeze,
                "names must not be empty: a prefix of parameter names, e.g. [embedding]")


@dataclass(frozen=True)
class RayConfig:
    """Where the specialists train: a local Ray instance (default) or an existing cluster."""

    address: str = ""  # "": a local instance, or the cluster in $RAY_ADDRESS; "auto" | "host:port" | "ray://host:port"
    num_cpus: int = 0  # local instance only: CPUs Ray may use; 0 = all of this machine's
    cpus_per_task: float = 1.0  # per specialist; its torch threads = max(1, floor(this))
    gpus_per_task: float = 0.0  # per specialist; > 0 trains it on CUDA (0.5: two share a GPU)
    max_retries: int = 3  # re-runs of a specialist whose worker died (killed, out of memory, node lost); -1 = forever
    retry_exceptions: bool = False  # also re-run one whose code raised (off: a raised error repeats)
    connect_timeout_s: float = 10.0  # how long `address` may take to answer before it is an error

    def validate(self, prefix: str = "ray") -> None:
        address = self.address.strip()
        if address not in ("", "auto"):
            hostport = address[len("ray://"):] if address.startswith("ray://") else address
            host, _, port = hostport.rpartition(":")
            require(bool(host) and port.isdigit() and 0 < int(port) < 65536, f"{prefix}.address", self.address,
                     "must be empty (local), 'auto', 'host:port' or 'ray://host:port'")
        require(self.num_cpus >= 0, f"{prefix}.num_cpus", self.num_cpus, "must be >= 0 (0 = all)")
        require(self.cpus_per_task > 0, f"{prefix}.cpus_per_task", self.cpus_per_task, "must be > 0")
        require(self.num_cpus == 0 or self.cpus_per_task <= self.num_cpus, f"{prefix}.cpus_per_task",
                 self.cpus_per_task, f"must be <= ray.num_cpus={self.num_cpus}, or no specialist could start")
        require(0 <= self.gpus_per_task <= 1, f"{prefix}.gpus_per_task", self.gpus_per_task,
                 "must be in [0, 1]: a specialist trains on one device (0.5: two share a GPU)")
        require(self.max_retries >= -1, f"{prefix}.max_retries", self.max_retries, "must be >= -1 (-1 = forever)")
        require(self.connect_timeout_s > 0, f"{prefix}.connect_timeout_s", self.connect_timeout_s, "must be > 0")


@dataclass(frozen=True)
class CombineConfig:
    """How generalist and specialists are combined (section 5.4): by the evaluate
    stage, and by `specialists.load(run_dir)` unless it is given other options."""

    # defaults chosen on Banking77 and synthetic validation data (README, ablation); the paper's recipe is
    # top_n=1, specialist_weight=1
    top_n: int = 3  # the generalist's top-n classes pick the active specialists
    dustbin: str = "active"  # dustbin-logit correction of specialist outputs: active | natural | none
    specialist_weight: float = 4.0  # weight of each active specialist's KL term (the generalist's is 1)
    # full models in the combination: the generalist and peer members 1..generalists-1 (the peer stage trains
    # them on the generalist's schedule, and matches the peer ensemble's budget to the hybrid's compute)
    generalists: int = 1
    # true: the evaluate stage chooses top_n and specialist_weight on validation errors among
    # combination_choice's grid and these values, or the full models alone where the chosen setting does not
    # pass `significance`; false: these values, served as they are
    choose: bool = True
    # with choose: the specialists are served only where the chosen setting fixes more of the full models'
    # validation errors than it breaks at this one-sided sign test level (1: any net gain)
    significance: float = 0.05

    def validate(self, prefix: str = "combine") -> None:
        require(self.top_n >= 1, f"{prefix}.top_n", self.top_n, "must be >= 1")
        require(self.dustbin in DUSTBIN_MODES, f"{prefix}.dustbin", self.dustbin, f"must be one of {DUSTBIN_MODES}")
        require(self.specialist_weight > 0, f"{prefix}.specialist_weight", self.specialist_weight, "must be > 0")
        require(self.generalists >= 1, f"{prefix}.generalists", self.generalists,
                 "must be >= 1 (1 = the generalist alone with the specialists)")
        require(0 < self.significance <= 1, f"{prefix}.significance", self.significance,
                "must be in (0, 1] (1 = any net gain on validation)")


@dataclass(frozen=True)
class PeerConfig:
    """The equal-compute baseline a user would pick instead: generalists trained
    with other seeds until all of them together have processed as many
    examples as generalist + specialists did, their probabilities averaged."""

    enabled: bool = True
    max_members: int = 8  # the run's own generalist included

    def validate(self, prefix: str = "peer") -> None:
        require(self.max_members >= 2, f"{prefix}.max_members", self.max_members, "must be >= 2")


@dataclass(frozen=True)
class RunConfig:
    """Everything `specialists run` needs."""

    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    threads: int = 0  # torch CPU threads; 0 = torch's default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    specialists: SpecialistsConfig = field(default_factory=SpecialistsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)

    def with_model_defaults(self) -> RunConfig:
        """This config with `specialists.init=auto` made concrete for its model.

        fasttext: scratch specialists that read character FASTTEXT_SPECIALIST_CHAR_NGRAMS_MIN..
        FASTTEXT_SPECIALIST_CHAR_NGRAMS-grams beside the generalist's words (unless specialists.char_ngrams or
        char_ngrams_min is set), chosen on Banking77 validation errors (README,
        the accuracy-compute frontier), in at most FASTTEXT_SPECIALIST_BUCKETS hash buckets (unless
        specialists.buckets is set): on Banking77 no more validation errors than the generalist's 200,000, in half
        the memory and less time. Other models: the generalist's weights, the paper's start.
        """
        s = self.specialists
        if s.init != AUTO:
            return self
        if self.model.name == "fasttext":
            chars = FASTTEXT_SPECIALIST_CHAR_NGRAMS if s.char_ngrams == -1 else s.char_ngrams
            shortest = s.char_ngrams_min or (FASTTEXT_SPECIALIST_CHAR_NGRAMS_MIN
                                             if chars >= FASTTEXT_SPECIALIST_CHAR_NGRAMS_MIN else 0)
            buckets = s.buckets or (FASTTEXT_SPECIALIST_BUCKETS if self.model.buckets > FASTTEXT_SPECIALIST_BUCKETS
                                    else 0)
            s = dataclasses.replace(s, init="scratch", char_ngrams=chars, char_ngrams_min=shortest, buckets=buckets)
        else:
            s = dataclasses.replace(s, init="generalist")
        return dataclasses.replace(self, specialists=s)

    def validate(self) -> None:
        require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        require(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = default)")
        self.data.validate()
        self.model.validate()
        self.train.validate()
        self.cluster.validate()
        self.specialists.validate()
        self.ray.validate()
        self.combine.validate()
        self.peer.validate()
        require(self.specialists.widen == 1 or self.model.name not in USER_MODELS, "specialists.widen",
                 self.specialists.widen, f"must be 1 with model.name={self.model.name}: a model you bring keeps its "
                 "architecture")
        require(self.specialists.init == "generalist" or self.model.name not in USER_MODELS, "specialists.init",
                 self.specialists.init, f"must be generalist with model.name={self.model.name}: a model you bring is "
                 "initialised by its own weights")
        for key, value in self.specialists.fresh_network().items():
            # a config.yaml holds what init=auto chose (char_ngrams: 3 ...): another start must reset those too
            model_own = SpecialistsConfig.__dataclass_fields__[key].default
            require(self.model.name == "fasttext" and self.specialists.init == "scratch", f"specialists.{key}", value,
                    "needs model.name=fasttext and specialists.init=scratch: a specialist started from the "
                    f"generalist's weights must read its features and keep its sizes (specialists.{key}={model_own} "
                    "takes the model's)")
        chars = self.model.char_ngrams if self.specialists.char_ngrams == -1 else self.specialists.char_ngrams
        shortest = self.specialists.char_ngrams_min or self.model.char_ngrams_min
        require(shortest <= max(chars, 1), "specialists.char_ngrams_min", shortest,
                f"must be <= the specialists' char_ngrams={chars} (1 when they read no character grams)")
        table = (self.specialists.buckets or self.model.buckets) * (self.specialists.embed_dim or self.model.embed_dim)
        require(table <= MAX_TABLE, "specialists.buckets", self.specialists.buckets or self.model.buckets,
                f"with specialists.embed_dim={self.specialists.embed_dim or self.model.embed_dim} a specialist's "
                f"embedding table would have {table} weights, over {MAX_TABLE}")
        require(self.combine.generalists == 1 or self.peer.enabled, "combine.generalists", self.combine.generalists,
                 "needs peer.enabled=true: full models beyond the generalist are peer members (without the peer "
                 "stage there is 1 full model)")
        require(self.combine.generalists <= self.peer.max_members, "combine.generalists", self.combine.generalists,
                 f"must be <= peer.max_members={self.peer.max_members} (the generalist and peer members)")


# ---------------------------------------------------------------------------
# dict <-> dataclass


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` as `annotation`, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None  # before trying a dataclass option, which would read None as its defaults
        for option in typing.get_args(annotation):
            if option is not type(None):
                try:
                    return _check_type(key, value, option)
                except ConfigError:
                    pass
        raise ConfigError(f"{key}={value!r}: expected {annotation}")
    if origin is dict:  # plain data for a user's code (model.factory_args): names to JSON values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}={value!r}: expected a mapping of names to values, e.g. {{n_classes: 10}}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}={value!r}: values must be numbers, strings, booleans, null, lists or "
                              f"mappings ({err})") from None
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            example = f"[{value}]" if isinstance(value, str) and item_type is str else "[256, 256]"
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. {example}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    if dataclasses.is_dataclass(annotation):
        return _from_dict(annotation, value, key)
    raise ConfigError(f"{key}: unsupported type {annotation}")  # a bug in this file, not user input


def _from_dict(cls: type, values: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, starting from its defaults."""
    if values is None:
        values = {}
    where = prefix or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key {key!r}; known keys under {where}: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(key, value, hints[name])
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override {dotted!r}: empty key segment")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 3 is int, [1, 2] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: missing key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file, e.g. configs/synthetic.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read as UTF-8 text: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Defaults <- YAML file <- `a.b=value` overrides; validated."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    config = _from_dict(cls, tree)
    if isinstance(config, RunConfig):
        config = config.with_model_defaults()
    config.validate()
    return config


def dump_config(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
