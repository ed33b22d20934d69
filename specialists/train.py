"""One training loop, readable top to bottom: sample, step, evaluate, stop early.

The generalist and every specialist go through `train_model`; what differs is
passed in: which examples an epoch draws (`sample`) and the loss (`loss_fn`,
which may add a soft-target term).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .config import ConfigError, TrainConfig
from .sparse_adam import RowSparseAdam

# loss_fn(logits (B, K), labels (B,), index (B,) positions in the training set) -> {"loss": scalar, ...parts}
LossFn = Callable[[torch.Tensor, torch.Tensor, np.ndarray], dict]
# sample(epoch, rng) -> positions in the training set to visit this epoch, in order
Sampler = Callable[[int, np.random.Generator], np.ndarray]


@dataclass
class TrainResult:
    best_epoch: int
    best_val_accuracy: float
    epochs_run: int
    examples_seen: int  # forward+backward passes: the compute measure for equal-compute baselines
    seconds: float
    history: list[dict] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this process's CPU time while training, all its threads


class TrainingError(ValueError):
    """Training diverged: a non-finite loss or weight. Nothing of the diverged model is saved."""


_DIVERGED = "training diverged: lower the learning rate ({key}={lr:g}) or check the inputs"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, index: np.ndarray) -> dict:
    loss = nn.functional.cross_entropy(logits, labels)
    return {"loss": loss, "hard_loss": loss.detach()}


@torch.no_grad()
def iter_logits(model: nn.Module, inputs, batch_size: int = 1024, device: torch.device | str = "cpu"):
    """Yield (B, K) float32 logits batch by batch, on `device` (memory O(B * K), not O(N * K))."""
    model.eval()
    for start in range(0, len(inputs), batch_size):
        index = np.arange(start, min(start + batch_size, len(inputs)))
        yield model(*inputs.batch(index, device)).float()


def predict_logits(model: nn.Module, inputs, batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, K) float32 logits of `inputs` (an Encoded* from `model.encode`)."""
    out = [logits.cpu() for logits in iter_logits(model, inputs, batch_size, device)]
    if not out:
        return np.zeros((0, model.head.out_features), dtype=np.float32)
    return torch.cat(out).numpy()


def predict_proba(model: nn.Module, inputs, batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """(N, K) float32 softmax probabilities."""
    logits = torch.from_numpy(predict_logits(model, inputs, batch_size, device))
    return torch.softmax(logits.double(), dim=1).float().numpy()


def predict_classes(model: nn.Module, inputs, batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """(N,) int64 argmax class of each input, batch by batch (never the (N, K) logits)."""
    out = [logits.cpu().numpy().argmax(1) for logits in iter_logits(model, inputs, batch_size, device)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, inputs, labels: np.ndarray, batch_size: int, device) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((predict_classes(model, inputs, batch_size, device) == labels).mean())


def _all_finite(weights: torch.Tensor) -> bool:
    """Whether every weight is finite. A finite sum settles it in one pass without allocating a mask
    (on fastText's hashed embedding the per-element check costs as much as a short specialist epoch's
    steps); a non-finite sum (NaN/inf present, or finite weights whose float32 sum overflowed) is
    checked element by element."""
    return bool(torch.isfinite(weights.sum())) or bool(torch.isfinite(weights).all())


class _Optimizers:
    """Adam for dense weights plus SparseAdam for sparse embeddings, stepped as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr


@torch.no_grad()
def constrain_max_norm(model: nn.Module, max_norm: float) -> None:
    """Scale each row of every nn.Linear weight (one unit's incoming weights) back to L2 norm
    `max_norm` where it is longer; shorter rows are left as they are."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            torch.renorm(module.weight, 2, 0, max_norm, out=module.weight)


def _kept(state: dict, kept: dict | None) -> dict:
    """A copy of `state`, written over `kept` where it holds one: a fastText table is 100 MB, and a
    fresh copy every better epoch spends more on allocating it than on copying."""
    if kept is None or kept.keys() != state.keys():
        return copy.deepcopy(state)
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and kept[name].shape == value.shape:
            kept[name].copy_(value)
        else:
            kept[name] = copy.deepcopy(value)
    return kept


def frozen_parameters(model: nn.Module, prefixes: list[str], key: str = "specialists.freeze") -> list[str]:
    """The names of `model`'s parameters under any of `prefixes` (a name, or a module path above names).

    A network you bring sits below its adapter's `parameter_root`, so its prefixes are read as its own module
    names them (`body`, not `net.body`). Raises ConfigError naming `key` where a prefix matches no parameter,
    or every parameter would be frozen.
    """
    root = getattr(model, "parameter_root", "")
    names = [name for name, _ in model.named_parameters()]
    given = [name.removeprefix(root) for name in names]
    frozen = []
    for prefix in prefixes:
        matched = [full for full, name in zip(names, given) if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            kind = getattr(model, "spec", {}).get("name", "")
            tops = sorted({name.split(".")[0] for name in given})
            raise ConfigError(f"{key}={list(prefixes)!r}: {prefix!r} names no parameter of the "
                              f"{kind + ' ' if kind else ''}model; its parameters are under {tops}")
        frozen += [name for name in matched if name not in frozen]
    if frozen and len(frozen) == len(names):
        raise ConfigError(f"{key}={list(prefixes)!r}: that freezes every parameter, so nothing would train")
    return frozen


def freeze(model: nn.Module, prefixes: list[str], key: str = "specialists.freeze") -> None:
    """Keep the parameters under `prefixes` at their values: no gradients, no optimiser state."""
    frozen = set(frozen_parameters(model, prefixes, key))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> _Optimizers:
    trained = [p for p in model.parameters() if p.requires_grad]  # not those `freeze` kept
    if cfg.optimizer == "sgd":  # SGD takes sparse gradients as they are
        return _Optimizers(torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay))
    # A sparse embedding (fastText's 200k hashed n-grams) only touches the rows a batch
    # uses; dense Adam would update all of them every step.
    sparse_ids = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    sparse = [p for p in trained if id(p) in sparse_ids]
    dense = [p for p in trained if id(p) not in sparse_ids]
    optimizers = [torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)] if dense else []
    if sparse:
        optimizers.append(RowSparseAdam(sparse, lr=cfg.lr))
    return _Optimizers(*optimizers)


def train_model(
    model: nn.Module,
    train_inputs,
    train_labels: np.ndarray,
    val_inputs,
    val_labels: np.ndarray,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    sample: Sampler | None = None,
    loss_fn: LossFn = cross_entropy,
    desc: str = "train",
    progress: bool = True,
    lr_key: str = "train.lr",
    max_examples: int = 0,
) -> TrainResult:
    """Train in place; on return `model` holds the weights of its best validation epoch.

    max_examples: a compute budget in training examples (forward + backward
    passes); the epoch that reaches it is cut short, so `examples_seen` never
    exceeds it, and is still validated. 0: no cap (`cfg.epochs` and early
    stopping decide). `cfg.schedule="linear"` decays the learning rate from
    `cfg.lr` to 0 over max_examples, or without a cap over `cfg.epochs` epochs.

    Raises TrainingError, naming `desc`, the epoch and `lr_key` (the setting
    `cfg.lr` came from), when the loss or a weight becomes NaN/inf.
    """
    if max_examples < 0:
        raise ValueError(f"max_examples={max_examples} must be >= 0 (0: no cap)")
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    sample = sample or (lambda epoch, rng: rng.permutation(len(train_labels)))

    best_accuracy, best_epoch, best_state = -1.0, 0, None
    best_is_current = False  # the weights now are the best epoch's, not yet copied (the last epoch's need no copy)
    history, seen, started, planned = [], 0, time.perf_counter(), None
    cpu_started = time.process_time()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if max_examples and seen >= max_examples:
            break
        if best_is_current:  # this epoch changes them
            best_state, best_is_current = _kept(model.state_dict(), best_state), False
        model.train()
        order = sample(epoch, rng)
        if max_examples:
            order = order[:max_examples - seen]  # sampled in full first: the rng advances as without a cap
        if planned is None:
            planned = max_examples or cfg.epochs * len(order)  # what a linear schedule decays over
        parts_sum = {}
        for start in range(0, len(order), cfg.batch_size):
            index = order[start:start + cfg.batch_size]
            if cfg.schedule == "linear":
                optimizer.set_lr(cfg.lr * max(0.0, 1 - (seen + start) / max(planned, 1)))
            logits = model(*train_inputs.batch(index, device))
            parts = loss_fn(logits, labels[index].to(device), index)
            values = {name: float(value.detach()) for name, value in parts.items()}
            if not math.isfinite(values["loss"]):
                raise TrainingError(f"{desc}: the loss is {values['loss']} at epoch {epoch}, batch "
                                    f"{start // cfg.batch_size + 1}; {_DIVERGED.format(key=lr_key, lr=cfg.lr)}")
            optimizer.zero_grad()
            parts["loss"].backward()
            optimizer.step()
            if cfg.max_norm:
                constrain_max_norm(model, cfg.max_norm)
            for name, value in values.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value * len(index)
        seen += len(order)
        bad = next((name for name, p in model.named_parameters() if not _all_finite(p.detach())), None)
        if bad is not None:
            raise TrainingError(f"{desc}: weight {bad!r} holds NaN/inf after epoch {epoch}; "
                                f"{_DIVERGED.format(key=lr_key, lr=cfg.lr)}")

        val_accuracy = accuracy(model, val_inputs, val_labels, cfg.eval_batch_size, device)
        row = {"epoch": epoch, **{k: v / max(len(order), 1) for k, v in parts_sum.items()}, "val_accuracy": val_accuracy}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_acc=f"{val_accuracy:.4f}")
        if val_accuracy > best_accuracy:
            best_accuracy, best_epoch, best_is_current = val_accuracy, epoch, True
        elif cfg.patience and epoch - best_epoch >= cfg.patience:
            break
    bar.close()

    if not best_is_current:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_epoch, best_accuracy, len(history), seen, time.perf_counter() - started, history,
                       time.process_time() - cpu_started)
