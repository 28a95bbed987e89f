"""Optimizer and learning-rate schedule (both Stateful through torch's own state_dict)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from avs_dist.config import Config


def lr_multiplier(cfg: Config, total_steps: int):
    """LambdaLR factor for the step taken after `s` optimizer steps: linear warm-up to 1,
    then constant or cosine down to optim.min_lr_ratio at the last step."""
    o = cfg.optim

    def factor(s: int) -> float:
        if s < o.warmup_steps:
            return (s + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(1, total_steps - o.warmup_steps - 1)
        progress = min(1.0, (s - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam / AdamW over the trainable parameters only (the frozen VGGish gets no state), in
    two groups: group 0 all but the TPAVI blocks at optim.lr, group 1 the TPAVI blocks at
    optim.lr x optim.tpavi_lr_mult (left out when it has no parameters); optim.impl picks
    torch's kernel (foreach / fused)."""
    o = cfg.optim
    groups: dict[bool, list] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[".tpavi_b" in f".{name}"].append(p)
    param_groups = [{"params": groups[False], "lr": o.lr}]
    if groups[True]:
        param_groups.append({"params": groups[True], "lr": o.lr * o.tpavi_lr_mult})
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}}.get(o.impl, {})
    return opt_cls(param_groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **impl)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """LambdaLR(lr_multiplier): the lr of step s (0-based) is optim.lr x factor(s)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (all but its parameters): lr, initial_lr, betas, weight
    decay, kernel flags. Taken from a freshly built optimizer and scheduler: the run's config."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def reapply(optimizer: torch.optim.Optimizer, scheduler, groups: list[dict]) -> None:
    """After a checkpoint's optimizer and scheduler state is loaded: every group's settings back
    to `groups` (hyperparameters() of this run's fresh optimizer), the schedule's base lrs to
    theirs, and each group's lr to the schedule's value for the next step. The moments and the
    step counts stay the checkpoint's.

    torch's (and DeepSpeed's) load_state_dict restores the saved groups' settings, so without
    this a resumed run keeps the checkpoint's lr and weight decay whatever its config says. The
    schedule's shape (warm-up, cosine, total steps) is this run's: LambdaLR does not save its
    function. With an unchanged config every value is the one the checkpoint holds, bit for bit."""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(optimizer.param_groups)} parameter groups, "
                         f"this run's {len(groups)}")
    for group, fresh in zip(optimizer.param_groups, groups):
        group.update(fresh)
        if group.get("fused") or group.get("capturable"):  # these kernels keep the step count on the device
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    for group, fn, base in zip(optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base * fn(scheduler.last_epoch)  # LambdaLR.get_lr's expression
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
