"""Networks a user might bring (`model.name=torch model.factory=user_models:build`), and some that cannot be used.

Plain torch code, nothing of the specialists package: what a user's own module looks like.
"""

import torch
from torch import nn


class Net(nn.Module):
    """A small MLP whose head is registered before the body that feeds it: the head is found by running it."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.classifier = nn.Linear(hidden, n_classes)
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def build(n_features: int, n_classes: int, hidden: int = 32) -> nn.Module:
    return Net(n_features, n_classes, hidden)


def sequential(n_features: int, n_classes: int) -> nn.Module:
    """A head without a bias, at the end of an nn.Sequential."""
    return nn.Sequential(nn.Linear(n_features, 16), nn.Tanh(), nn.Linear(16, n_classes, bias=False))


class Probabilities(nn.Module):
    """Returns probabilities: a softmax after the last Linear layer, so its outputs are not logits of a Linear."""

    def __init__(self, n_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(n_features, n_classes)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=1)


class NoLinear(nn.Module):
    """Logits from a weight matrix of its own, no nn.Linear."""

    def __init__(self, n_features: int, n_classes: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_features, n_classes))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x) @ self.w


def not_a_model(n_features: int, n_classes: int):
    return {"n_features": n_features}


def broken(n_features: int, n_classes: int):
    raise RuntimeError("this factory is broken")
