"""torch's SparseAdam, stepped with row gathers and scatters.

`torch.optim.SparseAdam` reads the moments of a gradient's rows with
`Tensor.sparse_mask`, which multiplies the whole (rows, dim) table by a sparse
mask; at the size of a fastText embedding (200,000 x 128) that costs more than
the rest of a training step. `RowSparseAdam` reads and writes those rows with
`index_select` and `index_add_`, doing the same arithmetic in the same order, so
its weights and state equal SparseAdam's bit for bit (tests/test_train.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class RowSparseAdam(torch.optim.SparseAdam):
    """`torch.optim.SparseAdam` (same arguments, state and results) for parameters whose sparse gradients
    hold whole rows, as nn.Embedding / nn.EmbeddingBag with sparse=True give."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise RuntimeError("SparseAdam does not support dense gradients, please consider Adam instead")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = _zeros_like(param)
                    state["exp_avg_sq"] = _zeros_like(param)
                state["step"] += 1
                _step_rows(param, param.grad, state, beta1, beta2, group["eps"], float(group["lr"]),
                           group.get("maximize", False))
        return loss


def _step_rows(param: torch.Tensor, grad: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float,
               lr: float, maximize: bool) -> None:
    """torch.optim._functional.sparse_adam for one parameter, its masks as row indexing."""
    grad = _coalesced(-grad if maximize else grad)  # the update is non-linear: one row per index
    if grad._values().numel() == 0:
        return
    if grad.sparse_dim() != 1:
        raise ValueError(f"RowSparseAdam steps gradients with one sparse dimension (rows), got {grad.sparse_dim()}")
    rows, values = grad._indices()[0], grad._values()  # (U,) distinct rows, (U, *row shape)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    # old <- b * old + (1 - b) * new, as old += (1 - b) * (new - old)
    old_exp_avg = exp_avg.index_select(0, rows)
    exp_avg_update = values.sub(old_exp_avg).mul_(1 - beta1)
    exp_avg.index_add_(0, rows, exp_avg_update)
    old_exp_avg_sq = exp_avg_sq.index_select(0, rows)
    exp_avg_sq_update = values.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
    exp_avg_sq.index_add_(0, rows, exp_avg_sq_update)
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(eps)
    step = state["step"]
    step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    param.index_add_(0, rows, -step_size * numer.div_(denom))


def _zeros_like(param: torch.Tensor) -> torch.Tensor:
    """`torch.zeros_like(param)`. On the CPU from numpy's calloc: a table's worth of pages the system hands out
    zeroed as a row is first stepped, where torch would write zeros over all of them first."""
    if param.device.type == "cpu" and param.dtype in (torch.float32, torch.float64) and param.is_contiguous():
        dtype = np.float32 if param.dtype == torch.float32 else np.float64
        return torch.from_numpy(np.zeros(param.shape, dtype=dtype))
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def _coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()`, without its sort where the rows are already distinct and increasing (a fastText
    model with character grams bags each distinct row once a batch, `models.distinct_rows`): the same
    indices and values either way."""
    if not grad.is_coalesced() and grad.sparse_dim() == 1:
        rows = grad._indices()[0]
        if rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
            return grad._coalesced_(True)
    return grad.coalesce()
