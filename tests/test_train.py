"""The training loop's max-norm constraint (train.max_norm), on a real MLP."""

import numpy as np
import torch

from specialists.config import TrainConfig
from specialists.models import create_model
from specialists.train import cross_entropy, train_model


def row_norms(model) -> list[float]:
    """The largest incoming-weight norm of any unit, per nn.Linear."""
    return [float(m.weight.detach().norm(dim=1).max()) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def train(max_norm: float, seen: list | None = None):
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
