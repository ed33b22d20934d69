"""The training loop (max-norm constraint, the kept best epoch, frozen parameters), the character-gram training path
and RowSparseAdam."""

import numpy as np
import pytest
import torch

from specialists.config import ConfigError, TrainConfig
from specialists.models import _distinct_rows_torch, create_model, distinct_rows
from specialists.sparse_adam import RowSparseAdam
from specialists.train import accuracy, cross_entropy, freeze, frozen_parameters, train_model


def row_norms(model) -> list[float]:
    """The largest incoming-weight norm of any unit, per nn.Linear."""
    return [float(m.weight.detach().norm(dim=1).max()) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def train(max_norm: float, seen: list | None = None):
    torch.manual_seed(0)  # the initial weights: torch's own seed differs from process to process
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(240, 6)).astype(np.float32), np.arange(240) % 4
    model = create_model("mlp", n_classes=4, input_shape=[6], hidden=[16], dropout=0.0)
    model.fit_normalizer(x)

    def loss_fn(logits, labels, index):  # runs before each step: records the norms the step before left
        if seen is not None:
            seen.append(max(row_norms(model)))
        return cross_entropy(logits, labels, index)

    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, patience=0, max_norm=max_norm)
    train_model(model, model.encode(x), y, model.encode(x[:40]), y[:40], cfg, seed=0, loss_fn=loss_fn, progress=False)
    return model


def test_max_norm_bounds_every_unit_after_every_step():
    free = train(0.0)
    assert max(row_norms(free)) > 1.2  # this learning rate grows the rows past the bound without the constraint
    seen = []
    bounded = train(0.8, seen)
    assert len(seen) == 4 * 8  # 4 epochs of 8 batches
    assert all(norm <= 0.8 + 1e-5 for norm in seen[1:])  # every step left every unit within the bound
    assert all(norm <= 0.8 + 1e-5 for norm in row_norms(bounded))  # and so does the kept best epoch
    assert max(row_norms(bounded)) > 0.79  # the bound was reached: rows are scaled to it, not shrunk past it


def test_the_model_returned_holds_its_best_validation_epochs_weights():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(240, 6)).astype(np.float32), np.arange(240) % 4
    torch.manual_seed(0)
    val_y = rng.integers(0, 4, 60)  # noise: validation accuracy wanders, so the best epoch is not the last
    model = create_model("mlp", n_classes=4, input_shape=[6], hidden=[16], dropout=0.0)
    model.fit_normalizer(x)
    after_epoch = {}

    def sample(epoch, rng):  # called as each epoch starts: the weights the epoch before left
        after_epoch[epoch - 1] = {k: v.clone() for k, v in model.state_dict().items()}
        return rng.permutation(240)

    cfg = TrainConfig(epochs=12, batch_size=32, lr=0.05, patience=0)
    result = train_model(model, model.encode(x), y, model.encode(x[:60]), val_y, cfg, seed=0, sample=sample,
                         progress=False)
    improved = [row["epoch"] for i, row in enumerate(result.history)
                if row["val_accuracy"] > max([r["val_accuracy"] for r in result.history[:i]], default=-1)]
    assert len(improved) >= 2 and result.best_epoch < 12  # kept twice, and later epochs wrote over the weights
    best = after_epoch[result.best_epoch]
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)
    assert not all(torch.equal(model.state_dict()[k], after_epoch[11][k]) for k in best)


def test_the_last_epoch_when_best_is_returned_as_trained():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)  # learnable: the second epoch scores higher than the first
    torch.manual_seed(0)
    model = create_model("mlp", n_classes=2, input_shape=[6], hidden=[16], dropout=0.0)
    model.fit_normalizer(x)
    after_first = {}

    def sample(epoch, rng):
        if epoch == 2:
            after_first.update({k: v.clone() for k, v in model.state_dict().items()})
        return rng.permutation(240)

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.005, patience=0)
    result = train_model(model, model.encode(x), y, model.encode(x[:120]), y[:120], cfg, seed=0, sample=sample,
                         progress=False)
    assert result.best_epoch == 2 and result.history[1]["val_accuracy"] > result.history[0]["val_accuracy"]
    assert not all(torch.equal(model.state_dict()[k], after_first[k]) for k in after_first)  # not the first's
    assert result.best_val_accuracy == accuracy(model, model.encode(x[:120]), y[:120], 256, "cpu")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("prefixes, frozen", [
    (["embedding"], {"embedding.weight"}),  # the sparse table: RowSparseAdam gets nothing to step
    (["body"], {"body.0.weight", "body.0.bias"}),  # a module path freezes every parameter below it
    (["head.bias", "embedding"], {"head.bias", "embedding.weight"}),
    (["body", "head"], {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}),  # only the table trains
])
def test_frozen_parameters_keep_their_values_and_the_rest_trains(prefixes, frozen, optimizer):
    texts = [f"text {i} about {'cards' if i % 2 else 'loans'} and {i % 5}" for i in range(64)]
    labels = np.arange(64) % 2
    torch.manual_seed(0)
    model = create_model("fasttext", n_classes=2, buckets=997, embed_dim=8, hidden=[16], dropout=0.0,
                         char_ngrams=3)
    start = {name: value.clone() for name, value in model.state_dict().items()}
    freeze(model, prefixes)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, patience=0, optimizer=optimizer)
    result = train_model(model, model.encode(texts), labels, model.encode(texts[:16]), labels[:16], cfg, seed=0,
                         progress=False)
    assert result.examples_seen == 2 * 64  # frozen weights still see every example
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]) == (name in frozen), name


def test_frozen_parameters_are_named_by_prefix_and_a_bad_one_is_refused():
    model = create_model("fasttext", n_classes=2, buckets=97, embed_dim=4, hidden=[8])
    assert frozen_parameters(model, ["body", "body.0.weight"]) == ["body.0.weight", "body.0.bias"]
    assert frozen_parameters(model, []) == []
    with pytest.raises(ConfigError, match=r"specialists.freeze=\['bod'\]: 'bod' names no parameter of the fasttext "
                                          r"model; its parameters are under \['body', 'embedding', 'head'\]"):
        frozen_parameters(model, ["bod"])  # a prefix of names, not of letters
    with pytest.raises(ConfigError, match="freezes every parameter"):
        frozen_parameters(model, ["embedding", "body", "head"])
    assert all(p.requires_grad for p in model.parameters())  # refused: nothing was frozen


@pytest.mark.parametrize("find", [distinct_rows, _distinct_rows_torch], ids=["cpu (numpy)", "device (torch)"])
def test_distinct_rows_equals_torch_unique(find):
    for ids in (torch.randint(0, 50, (300,)), torch.tensor([7, 7, 7]), torch.zeros(0, dtype=torch.long)):
        rows, position = find(ids, 50)
        expected_rows, expected_position = torch.unique(ids, return_inverse=True)
        assert rows.dtype == position.dtype == torch.long
        assert torch.equal(rows, expected_rows) and torch.equal(position, expected_position)


def test_character_gram_training_bags_each_distinct_row_once_with_the_same_outputs_and_gradients():
    texts = ["the cat sat on the mat", "a tattered hat", "that is that"]
    torch.manual_seed(0)
    model = create_model("fasttext", n_classes=3, buckets=997, embed_dim=8, hidden=[16], dropout=0.0,
                         char_ngrams=3)
    ids, offsets = model.encode(texts).batch(np.arange(3), torch.device("cpu"))
    assert len(torch.unique(ids)) < len(ids)  # grams repeat: the training path has rows to share
    grads = {}
    for training in (True, False):
        model.train(training)
        model.zero_grad()
        logits = model(ids, offsets)
        logits.sum().backward()
        grads[training] = (logits.detach(), model.embedding.weight.grad.to_dense())
    assert torch.equal(grads[True][0], grads[False][0])
    torch.testing.assert_close(grads[True][1], grads[False][1])
    assert model.embedding.weight.grad.is_sparse  # still sparse: SparseAdam takes it


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("rows_of", ["repeated", "distinct"])
def test_row_sparse_adam_steps_exactly_as_torchs_sparse_adam(maximize, rows_of):
    torch.manual_seed(0)
    start = torch.randn(500, 8)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = [(ours, RowSparseAdam([ours], lr=0.01, maximize=maximize)),
                  (theirs, torch.optim.SparseAdam([theirs], lr=0.01, maximize=maximize))]
    for _ in range(25):
        if rows_of == "repeated":  # an uncoalesced gradient, as EmbeddingBag gives
            rows = torch.randint(0, 500, (200,))
        else:  # distinct and increasing, as the character-gram path gives: stepped without coalescing
            rows = torch.randperm(500)[:200].sort().values
        values = torch.randn(200, 8)
        for param, optimizer in optimizers:
            param.grad = torch.sparse_coo_tensor(rows[None], values, param.shape, check_invariants=True)
            optimizer.step()
    assert torch.equal(ours, theirs) and not torch.equal(ours, start)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(optimizers[0][1].state[ours][key], optimizers[1][1].state[theirs][key])
    assert optimizers[0][1].state[ours]["step"] == optimizers[1][1].state[theirs]["step"] == 25
    with pytest.raises(RuntimeError, match="dense gradients"):
        ours.grad = torch.zeros_like(ours)
        optimizers[0][1].step()
