"""The equal-compute baseline: an ensemble of generalists (the `peer` stage).

What a user would train instead of specialists, given the same compute: more
generalists with other seeds, their probabilities averaged. Compute is counted
as training examples processed (forward + backward passes, `examples_seen`);
the budget is the generalist's plus every specialist's. Member 0 is the run's
own generalist; member k >= 1 is the same model and schedule with seed
`seed + k`, its epochs capped so that the members together stay within the
budget (early stopping may end one sooner, leaving the rest to the next).
Members are saved under `peers/<k>/`, each with its `member.json` written
last, so `--resume` keeps the finished ones.

With `combine.generalists=G` > 1 the hybrid combination uses members
1..G-1 as full models beside the generalist: they are trained first, on the
generalist's whole schedule, and counted in the budget (generalist + those
members + specialists), so the peer ensemble still matches the compute of
what it is compared with.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .config import RunConfig
from .data import Dataset
from .generalist import fit_generalist
from .models import load_checkpoint, save_checkpoint
from .rundir import RunDir, read_json, write_json
from .train import iter_logits

MEMBER_FILE = "member.json"


def peer_budget(metrics: dict) -> int:
    """Examples processed by generalist + specialists, from a run's metrics."""
    return int(metrics["generalist"]["examples_seen"]) + int(metrics.get("specialists", {}).get("examples_seen", 0))


def member_epochs(budget: int, used: int, epoch_size: int, max_epochs: int) -> int:
    """Epochs the next member may train: what `budget` leaves after `used` (examples), in whole epochs of
    `epoch_size`, at most `max_epochs` (the generalist's schedule); < 1: no room for another member."""
    return min(max_epochs, (budget - used) // epoch_size)


def _train_member(cfg: RunConfig, dataset: Dataset, run: RunDir, k: int, epochs: int, device: torch.device,
                  progress: bool) -> dict:
    folder = run.peers / str(k)
    done = folder / MEMBER_FILE
    if done.is_file():
        return read_json(done)
    model, result = fit_generalist(cfg, dataset, device, seed=cfg.seed + k, epochs=epochs, desc=f"peer {k}",
                                   progress=progress)
    save_checkpoint(model, folder)
    info = {"member": k, "seed": cfg.seed + k, "epochs_allowed": epochs, "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch, "examples_seen": result.examples_seen,
            "val_accuracy": result.best_val_accuracy, "seconds": round(result.seconds, 3),
            "cpu_seconds": round(result.cpu_seconds, 3)}
    write_json(done, info)  # last: its presence means the checkpoint is whole
    return info


def train_peers(cfg: RunConfig, dataset: Dataset, run: RunDir, device: torch.device,
                log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train the peer ensemble within the budget and measure it; returns the `peer_ensemble` metrics section."""
    metrics = run.read_metrics()
    used = int(metrics["generalist"]["examples_seen"])
    epoch_size = len(dataset.train)
    members = [{"member": 0, "seed": cfg.seed, "examples_seen": used,
                "val_accuracy": metrics["generalist"]["val_accuracy"]}]
    for k in range(1, cfg.combine.generalists):  # the hybrid's full models: the generalist's whole schedule
        info = _train_member(cfg, dataset, run, k, cfg.train.epochs, device, progress)
        used += info["examples_seen"]
        members.append(info)
        log(f"peer {k}: seed {info['seed']}, {info['epochs_run']} epochs, val accuracy {info['val_accuracy']:.4f} "
            f"(a full model of the hybrid, combine.generalists={cfg.combine.generalists})")
    budget = peer_budget(metrics) + used - int(metrics["generalist"]["examples_seen"])
    while len(members) < cfg.peer.max_members:
        epochs = member_epochs(budget, used, epoch_size, cfg.train.epochs)
        if epochs < 1:
            break
        info = _train_member(cfg, dataset, run, len(members), epochs, device, progress)
        used += info["examples_seen"]
        members.append(info)
        log(f"peer {info['member']}: seed {info['seed']}, {info['epochs_run']} of {epochs} epochs, val accuracy "
            f"{info['val_accuracy']:.4f}")

    models = [load_checkpoint(folder, device) for folder in
              [run.generalist] + [run.peers / str(m["member"]) for m in members[1:]]]
    section = {"members": len(members), "budget_examples": budget, "examples_seen": used,
               "hybrid_full_models": cfg.combine.generalists,
               "hybrid_examples_seen": sum(m["examples_seen"] for m in members[:cfg.combine.generalists]),
               # the members trained here (1, 2, ...): their training alone, wall and this process's CPU
               "train_seconds": round(sum(m.get("seconds", 0.0) for m in members[1:]), 3),
               "cpu_seconds": round(sum(m.get("cpu_seconds", 0.0) for m in members[1:]), 3)}
    for split in ("val", "test"):
        section.update(_score(models, getattr(dataset, split), split, cfg.train.eval_batch_size, device))
    log(f"peer ensemble: {len(members)} generalists, {used:,} of {budget:,} examples, test accuracy "
        f"{section['test_accuracy']:.4f} ({section['test_errors']} errors)")
    return section


def _score(models: list, split, name: str, batch_size: int, device: torch.device) -> dict:
    """The arithmetic mean of the members' probabilities scored on a labelled split, batch by batch:
    memory O(members x batch x C), never (N, C)."""
    labels = split.labels
    correct, member_correct = 0, np.zeros(len(models), dtype=np.int64)
    batches = zip(*(iter_logits(m, m.encode(split.inputs), batch_size, device) for m in models))
    for start, logits in zip(range(0, len(labels), batch_size), batches):
        probs = np.stack([torch.softmax(z.double(), dim=1).float().cpu().numpy() for z in logits])  # (M, B, C)
        truth = labels[start:start + probs.shape[1]]
        correct += int((probs.mean(axis=0).argmax(1) == truth).sum())
        member_correct += (probs.argmax(2) == truth).sum(1)
    n = len(labels)
    return {f"{name}_accuracy": correct / n, f"{name}_errors": n - correct,
            f"member_{name}_accuracies": [int(c) / n for c in member_correct]}
