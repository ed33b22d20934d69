"""The streamed specialist data path reproduces training on the whole arrays, bit for bit.

`reference_train_specialist` below is the specialist training of the code
before the data path was streamed: every worker got the whole data set and the
generalist's (N, C) logits of every split. The package now cuts each
specialist's rows and its collapsed soft targets in one batched pass
(`plan_specialist`, `cut_generalist_outputs`, `specialist_data`); trained from
those, a specialist must come out with the same weights, curve and metrics.
No Ray here: the pipeline tests run the same functions through Ray workers.
"""

import numpy as np
import pytest
import torch

from conftest import csv_overrides, tiny_config, text_rows, write_csv
from specialists.config import load_config
from specialists.data import load_dataset
from specialists.distill import collapse_labels, distillation_loss
from specialists.generalist import fit_generalist
from specialists.models import with_dustbin_head
from specialists.dustbin import EnrichedSampler, dustbin_correction, dustbin_corrected, specialist_soft_targets
from specialists.specialist import conditional_accuracy, train_specialist
from specialists.specialist_data import (ShardStore, cut_generalist_outputs, plan_specialist, specialist_data,
                                         specialist_train_config)
from specialists.train import predict_classes, predict_logits, seed_everything, train_model


def reference_train_specialist(generalist, classes, dataset, teacher_logits, cfg, *, seed):
    """The whole-array specialist training (teacher_logits: the generalist's (N, C) logits of each split)."""
    s = cfg.specialists
    classes = [int(c) for c in classes]
    cls = torch.tensor(classes, dtype=torch.long)
    k = len(classes)
    seed_everything(seed)
    model = with_dustbin_head(generalist, classes, widen=s.widen)
    sampler = EnrichedSampler(dataset.train.labels, classes, s.special_fraction)
    correction = dustbin_correction(sampler.fraction, sampler.natural_fraction)
    prior_shift = correction if s.dustbin_correction == "prior" else 0.0
    stored_correction = 0.0 if s.dustbin_correction == "none" else correction
    val_slice = np.sort(EnrichedSampler(dataset.val.labels, classes, s.special_fraction)(
        0, np.random.default_rng(seed)))
    train_x = model.encode(dataset.train.inputs)
    train_y = collapse_labels(torch.from_numpy(dataset.train.labels), cls).numpy()
    val_x = model.encode(dataset.val.take(val_slice).inputs)
    val_y = collapse_labels(torch.from_numpy(dataset.val.labels[val_slice]), cls).numpy()
    teacher = torch.from_numpy(np.asarray(teacher_logits["train"]))

    def loss_fn(logits, labels, index):
        targets = specialist_soft_targets(teacher[torch.from_numpy(index)], cls, s.temperature, prior_shift)
        parts = distillation_loss(logits, labels, targets, s.temperature, s.soft_weight)
        return {"loss": parts.loss, "hard_loss": parts.hard_loss.detach(), "soft_loss": parts.soft_loss.detach()}

    result = train_model(model, train_x, train_y, val_x, val_y, specialist_train_config(cfg), seed=seed,
                         sample=sampler, loss_fn=loss_fn, progress=False)
    metrics = {"classes": k, "best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
               "epochs_run": result.epochs_run, "examples_seen": result.examples_seen,
               "special_fraction": sampler.fraction, "natural_fraction": sampler.natural_fraction,
               "dustbin_correction": stored_correction}
    for split in ("val", "test"):
        data = getattr(dataset, split)
        inside = np.flatnonzero(np.isin(data.labels, classes))
        logits = predict_logits(model, model.encode(data.take(inside).inputs), cfg.train.eval_batch_size)
        acc, n = conditional_accuracy(logits[:, :k], data.labels[inside], classes)
        general_acc, _ = conditional_accuracy(np.asarray(teacher_logits[split])[inside][:, classes],
                                              data.labels[inside], classes)
        metrics.update({f"{split}_examples": n, f"{split}_conditional_accuracy": acc,
                        f"generalist_{split}_conditional_accuracy": general_acc})
    logits = torch.from_numpy(predict_logits(model, model.encode(dataset.val.inputs), cfg.train.eval_batch_size))
    metrics["val_dustbin_share"] = float(1 - np.isin(dataset.val.labels, classes).mean())
    metrics["val_dustbin_prob_raw"] = float(torch.softmax(logits, 1)[:, -1].mean())
    metrics["val_dustbin_prob_corrected"] = float(torch.softmax(dustbin_corrected(logits, correction), 1)[:, -1].mean())
    active = np.isin(np.asarray(teacher_logits["val"]).argmax(1), classes)
    share = (np.isin(dataset.val.labels[active], classes).sum() + 1) / (active.sum() + 2)
    metrics["active_special_share_top1"] = float(share)
    metrics["dustbin_correction_active_top1"] = dustbin_correction(sampler.fraction, float(share))
    return model, result.history, metrics


def _both_ways(cfg, groups, tmp_path, memory_bytes):
    """{m: (reference (model, history, metrics), streamed (model, history, metrics))}."""
    dataset = load_dataset(cfg.data, cfg.seed)
    generalist, _ = fit_generalist(cfg, dataset, torch.device("cpu"), seed=cfg.seed, epochs=3, progress=False)
    batch = cfg.train.eval_batch_size
    logits = {split: predict_logits(generalist, generalist.encode(getattr(dataset, split).inputs), batch)
              for split in ("train", "val", "test")}
    plans = [plan_specialist(m, group, dataset, cfg) for m, group in enumerate(groups)]
    store = ShardStore(tmp_path / "shards", memory_bytes=memory_bytes)
    val_top1 = cut_generalist_outputs(generalist, dataset, plans, store, batch, "cpu")
    out = {}
    for plan in plans:
        data = specialist_data(plan, dataset, store, val_top1)
        streamed = train_specialist(generalist, data, dataset.val, cfg)
        reference = reference_train_specialist(generalist, plan.classes, dataset, logits, cfg, seed=plan.seed)
        out[plan.m] = reference, (streamed.model, streamed.train.history, streamed.metrics)
    return out


def _assert_identical(reference, streamed):
    (model_a, history_a, metrics_a), (model_b, history_b, metrics_b) = reference, streamed
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name  # bit for bit, not close
    assert history_a == history_b
    assert {k: v for k, v in metrics_b.items() if k not in ("seconds", "cpu_seconds")} == metrics_a


@pytest.mark.parametrize("overrides, memory_bytes", [
    ([], 256 << 20),  # shares held in memory
    (["specialists.dustbin_correction=paper", "specialists.widen=1.5", "specialists.special_fraction=0.3"], 0),
], ids=["in memory", "spilled to files, widened"])
def test_streamed_specialists_equal_whole_array_training(tmp_path, overrides, memory_bytes):
    # small eval batches: the generalist's pass over each split is cut across many batches
    cfg = tiny_config("specialists.epochs=6", "specialists.patience=2", "train.eval_batch_size=100", *overrides)
    groups = [[0, 3, 5, 8, 13, 21, 22, 30, 34, 39], [1, 2, 4]]
    for reference, streamed in _both_ways(cfg, groups, tmp_path, memory_bytes).values():
        _assert_identical(reference, streamed)


def test_streamed_text_specialist_equals_whole_array_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", text_rows(30, seed=0))
    test = write_csv(tmp_path / "test.csv", text_rows(10, seed=1))
    cfg = load_config(None, [*csv_overrides(train, test), "specialists.epochs=4", "specialists.patience=0",
                             "train.eval_batch_size=7", "specialists.init=generalist"])  # the reference's start
    for reference, streamed in _both_ways(cfg, [[1]], tmp_path, 0).values():
        _assert_identical(reference, streamed)


def test_a_plan_replays_the_enriched_sampler_over_the_whole_split():
    cfg = tiny_config("specialists.epochs=5")
    dataset = load_dataset(cfg.data, cfg.seed)
    classes = [2, 7, 11]
    plan = plan_specialist(4, classes, dataset, cfg)
    sampler, rng = EnrichedSampler(dataset.train.labels, classes, 0.5), np.random.default_rng(cfg.seed + 4)
    assert plan.seed == cfg.seed + 4 and plan.orders.shape == (5, sampler.epoch_size)
    for epoch in range(1, 6):
        assert np.array_equal(plan.train_rows[plan.orders[epoch - 1]], sampler(epoch, rng))
    assert np.all(np.diff(plan.train_rows) > 0)  # sorted, each row once
    assert len(plan.train_rows) < len(dataset.train)  # only the rows its epochs visit
    assert np.isin(dataset.test.labels[plan.test_inside], classes).all()
    assert np.isin(dataset.test.labels, classes).sum() == len(plan.test_inside)


def test_a_group_without_outside_examples_cannot_be_planned():
    cfg = tiny_config()
    dataset = load_dataset(cfg.data, cfg.seed)
    with pytest.raises(ValueError, match="no training example lies outside them"):
        plan_specialist(0, range(dataset.n_classes), dataset, cfg)


def test_the_shard_store_returns_blocks_in_order_from_memory_and_files(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 0, 7, 1)]
    store = ShardStore(tmp_path, memory_bytes=200)  # room for the first array (144 bytes) only
    for m, width in ((1, 3), (2, 2), (3, 5)):
        store.allocate(m, "teacher", 12 if m < 3 else 0, width)
    assert store.spilled_bytes == 12 * 2 * 4 and [p.name for p in tmp_path.glob("*.f32")] == ["2.teacher.f32"]
    for block in blocks:
        store.write(1, "teacher", block)
        store.write(2, "teacher", block[:, :2])
    with pytest.raises(ValueError, match="does not fit"):
        store.write(1, "teacher", blocks[0])  # a 13th row
    assert np.array_equal(store.pop(1, "teacher"), np.concatenate(blocks))
    assert np.array_equal(store.pop(2, "teacher"), np.concatenate(blocks)[:, :2])
    assert store.pop(3, "teacher").shape == (0, 5)  # nothing to write
    assert not list(tmp_path.glob("*.f32"))
    store.allocate(4, "teacher", 2, 3)
    store.write(4, "teacher", blocks[3])
    with pytest.raises(ValueError, match="1 of its 2 rows were written"):
        store.pop(4, "teacher")


def test_batched_class_predictions_equal_the_whole_array_argmax():
    cfg = tiny_config()
    dataset = load_dataset(cfg.data, cfg.seed)
    generalist, _ = fit_generalist(cfg, dataset, torch.device("cpu"), seed=0, epochs=1, progress=False)
    encoded = generalist.encode(dataset.test.inputs)
    whole = predict_logits(generalist, encoded, 10_000).argmax(1)
    for batch in (1, 7, 64, 10_000):
        assert np.array_equal(predict_classes(generalist, encoded, batch), whole)
    assert predict_classes(generalist, generalist.encode(dataset.test.inputs[:0]), 8).shape == (0,)
