"""Chunked evaluation of a per-row loss over student logits, with the gradient computed during the forward pass.

`kdcache.losses` hands every loss to `mean_over_rows`: the unmasked positions of ``[B, T, V]`` student logits are
flattened to rows and a per-row loss (`RowLoss`, see `kdcache.losses.divergences`) runs ``chunk_tokens`` rows at a
time, so the float32 copy of the student's logits exists for one chunk only. `ChunkedRowLoss`, a custom autograd
function, computes each chunk's gradient eagerly and keeps a single gradient buffer in the student's dtype; backward
only scales it (double backward is not supported). Torch only, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["ChunkedRowLoss", "RowLoss", "compute_dtype", "mean_over_rows"]

RowLoss = Callable[[Tensor, dict[str, Tensor]], Tensor]  # (student logits / T [C, V], row data [C, ...]) -> [C]


def compute_dtype(logits: Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 for every other dtype (the losses never compute in half precision)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class ChunkedRowLoss(torch.autograd.Function):
    """Sum of a per-row loss over selected rows of ``[N, V]`` logits, chunk by chunk, gradient computed eagerly."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        rows: Tensor,
        data: dict,
        row_loss: RowLoss,
        temperature: float,
        chunk_tokens: int,
        needs_grad: bool,
    ) -> Tensor:
        dtype = compute_dtype(logits)
        total = torch.zeros((), dtype=dtype, device=logits.device)
        grad = torch.zeros_like(logits) if needs_grad else None
        for start in range(0, rows.numel(), chunk_tokens):
            index = rows[start : start + chunk_tokens]
            part = {key: value[start : start + chunk_tokens] for key, value in data.items()}
            x = logits.index_select(0, index).to(dtype)
            with torch.enable_grad() if needs_grad else torch.no_grad():
                x.requires_grad_(needs_grad)
                loss = row_loss(x / temperature if temperature != 1.0 else x, part).sum()
                if needs_grad:
                    (chunk_grad,) = torch.autograd.grad(loss, x)
                    grad.index_copy_(0, index, chunk_grad.to(grad.dtype))
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype), None, None, None, None, None, None)


def mean_over_rows(
    student_logits: Tensor,
    mask: Tensor,
    data: dict[str, Tensor],
    row_loss: RowLoss,
    *,
    temperature: float,
    chunk_tokens: int,
) -> Tensor:
    """Mean of ``row_loss`` over the positions where ``mask`` is true; ``data`` values are ``[B, T, ...]`` teacher
    tensors (moved to the student's device here), handed to ``row_loss`` as ``[C, ...]`` chunks."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1 positions, got {chunk_tokens}")
    vocab = student_logits.shape[-1]
    logits = student_logits.reshape(-1, vocab)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat = {key: value.to(logits.device).flatten(0, 1)[rows] for key, value in data.items()}
    needs_grad = student_logits.requires_grad and torch.is_grad_enabled()
    total = ChunkedRowLoss.apply(logits, rows, flat, row_loss, temperature, int(chunk_tokens), needs_grad)
    return total / max(rows.numel(), 1)
