"""One optimizer step: the micro-batches' forward and backward passes, then the optimizer step.

`avs-dist bench train` times this same function on synthetic batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from avs_dist.losses import compute_losses
from avs_dist.train.strategy import NONFINITE


@dataclass
class StepOutput:
    """What one optimizer step produced, still on the device (no host sync here).

    losses [1 + n_terms] float32: "total" then each loss term (sorted by name), each the
    mean over the micro-batches of this rank; names: their names; grad_norm: 0-d, the global
    gradient norm before clipping; lr: group 0's lr applied by this step; out / batch: the
    last micro-batch's model output and batch (for image logging); skipped: why the strategy
    skipped the update (train/strategy.py NONFINITE / FP16_OVERFLOW), None when it stepped."""

    losses: torch.Tensor
    names: list[str]
    grad_norm: torch.Tensor
    lr: float
    out: dict
    batch: dict
    skipped: str | None = None


def train_step(strategy, micro_batches: list[dict], loss_cfg) -> StepOutput:
    """Forward, losses and backward for each micro-batch, then strategy.optimizer_step().

    Gradients are all-reduced only after the last micro-batch (strategy.forward's
    sync_grads); the losses are averaged over the micro-batches like the gradients are. A step
    the strategy skips for non-finite values also leaves the BatchNorm running statistics as
    they were: its forward passes would otherwise have written NaN/inf into them, and every
    later step and checkpoint would carry them (one fused copy of those buffers per step)."""
    stats = running_stats(strategy.module)
    before = torch._foreach_mul(stats, 1.0) if stats else []
    total_terms = None
    for i, batch in enumerate(micro_batches):
        with strategy.autocast():
            out = strategy.forward(batch, sync_grads=i == len(micro_batches) - 1)
            loss, terms = compute_losses(out, batch, loss_cfg)
        strategy.backward(loss)
        names = ["total", *sorted(terms)]
        vec = torch.stack([loss.detach().float(), *(terms[k].detach().float() for k in names[1:])])
        total_terms = vec if total_terms is None else total_terms + vec
    grad_norm, lr = strategy.optimizer_step()
    if strategy.skipped == NONFINITE and stats:
        torch._foreach_copy_(stats, before)
    return StepOutput(total_terms / len(micro_batches), names, grad_norm, lr, out, batch, strategy.skipped)


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """The running mean and variance buffers of every BatchNorm of `module` that tracks them."""
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
            for b in (m.running_mean, m.running_var) if b is not None]
