"""The training loop: one process per rank, DDP or DeepSpeed ZeRO 1/2/3, exact resume.

Entry points (docs/architecture.md, "Training entry points"):

    python -m avs_dist.train --config tiny --shards DIR --run-dir DIR [--resume auto] [k=v ...]
        one rank; RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them
    avs-dist train ... [--nproc N] [--max-restarts R]
        validates the config, then starts N local ranks through torch.distributed.run
    run(cfg, run_dir, resume="auto") -> dict      for launchers that set the env (submitit)
    request_stop()                               what SIGTERM / SIGUSR2 do

Step accounting. A step is one optimizer step of `optim.grad_accum` micro-batches per rank.
An epoch is `steps_per_epoch` loader batches per rank, i.e. that // grad_accum steps (a
trailing partial accumulation is dropped). `train.max_steps` > 0 sets the run's length (and
the cosine horizon), otherwise `train.epochs` full epochs do.

At every step boundary, in this order: log lines are flushed when due, the stop flag is
combined over ranks, validation runs when due (and updates checkpoints/best/), then a
checkpoint is written when due or when stopping. A checkpoint therefore always follows
every action of its step, and resuming from it replays nothing. The data stream is a pure
function of (seed, epoch, batch position) (data/loader.py) and every rank's RNG state is
restored, so a resumed fp32 CPU run logs bit-identical losses to an uninterrupted one.

BatchNorm: DDP runs with broadcast_buffers=False and DeepSpeed never syncs buffers, so each
rank keeps its own running statistics (restored per rank on resume); evaluation and
model.pt see them averaged over ranks (distributed.averaged_buffers), or SyncBatchNorm with
train.sync_bn (GPU only).

Signals: SIGTERM / SIGUSR2 to a rank (or request_stop()) only set a flag; at the next step
boundary the flag is MAX-reduced over a gloo group, every rank saves and run() returns
"stopped". Signal the rank processes, not their process group: torch's DataLoader workers
die on SIGTERM, and the rank then fails on its next batch (torchrun's own SIGTERM does
that: it signals each worker's group, so a stopped agent means a restart from the last
periodic checkpoint, not a stop checkpoint).

Exit codes of `main`: 0 when the run completed or was stopped by a signal after saving a
checkpoint (status "stopped" in run_dir/status.json), 1 on an error, 2 for a bad command line
or config.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from avs_dist import checkpoint as ckpt
from avs_dist import distributed
from avs_dist.config import Config, ConfigError, load_config, save_config, to_dict
from avs_dist.evaluate import PRECISION_DTYPES, autocast, resolve_precision
from avs_dist.fileio import write_json

_STOP = False


def request_stop(signum=None, frame=None) -> None:
    """Ask every rank to checkpoint at the next step boundary and return status "stopped".

    Safe in a signal handler: it only sets a flag; the ranks agree on it at step boundaries.
    """
    global _STOP
    _STOP = True


# 1x1 convolutions get gradients whose strides differ from DDP's bucket views on CPU; a
# performance note about a layout autograd chooses, repeated by every rank.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def install_signal_handlers() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, request_stop)


# ----------------------------------------------------------------------------- helpers
def _dtype(precision: str):
    return PRECISION_DTYPES.get(precision)


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
    optim.lr x optim.tpavi_lr_mult (left out when it has no parameters)."""
    o = cfg.optim
    groups: dict[bool, list] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[".tpavi_b" in f".{name}"].append(p)
    param_groups = [{"params": groups[False], "lr": o.lr}]
    if groups[True]:
        param_groups.append({"params": groups[True], "lr": o.lr * o.tpavi_lr_mult})
    opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return opt_cls(param_groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@contextlib.contextmanager
def preserved_rng():
    """Run a block (loader start-up, evaluation) without consuming the training RNG streams.

    A DataLoader draws its base seed from torch's RNG when an iterator starts; a resumed run
    starts its iterator at another moment than the uninterrupted one did."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


def _floatify(obj):
    """Half-precision model outputs (DeepSpeed bf16/fp16) -> fp32 for the losses."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _floatify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_floatify(v) for v in obj)
    return obj


def peak_mem(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def check_runtime(cfg: Config, world_size: int, cuda: bool) -> None:
    """What the config cannot know by itself: whether this machine can run it."""
    if cfg.train.sync_bn and not cuda and world_size > 1:
        raise ConfigError("train.sync_bn needs GPUs (SyncBatchNorm does not run on CPU); "
                          "without it BN statistics are averaged across ranks for eval and checkpoints")
    if cfg.train.strategy != "ddp" and cfg.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 with DeepSpeed needs a GPU (its CPU accelerator has no fp16); "
                          "use bf16 or fp32, or train.strategy=ddp (torch GradScaler)")


def _find_unused(cfg: Config) -> bool:
    # The crop branch without any crop loss leaves its parameters without gradients.
    crop_loss = cfg.loss.crop_ce or cfg.loss.crop_pair or cfg.loss.crop_audio
    return cfg.model.crop_branch and not crop_loss


def _state_dict_fp32(module: nn.Module) -> dict:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- strategies
class DDPStrategy:
    """torch DDP with autocast (bf16, or fp16 + GradScaler), no_sync accumulation, clipping."""

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: Config, d, precision: str):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.module, self.optimizer, self.scheduler, self.cfg, self.d = model, optimizer, scheduler, cfg, d
        self.precision = precision
        # Buffers are averaged before eval / checkpoints instead of broadcast every forward.
        with warnings.catch_warnings():
            # torch >= 2.13 deprecates broadcast_buffers; torch 2.11 (the GPU machine) lacks its successor.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.engine = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                              broadcast_buffers=False, find_unused_parameters=_find_unused(cfg))
        self.scaler = torch.amp.GradScaler(d.device.type) if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.input_dtype = None

    def autocast(self):
        return autocast(self.d.device, self.precision)

    def micro_context(self, last: bool):
        return contextlib.nullcontext() if last else self.engine.no_sync()

    def forward(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.cfg.optim.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict | None:
        """fp32 state dict on rank 0 (every rank holds the same weights; only rank 0 writes)."""
        return _state_dict_fp32(self.module) if self.d.is_main else None

    def eval_model(self) -> nn.Module:
        return self.module

    def save(self, folder: Path) -> dict:
        """Training state for trainer.pt (written by rank 0)."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, folder: Path, trainer_state: dict, model_state: dict) -> None:
        self.module.load_state_dict(model_state)
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if self.scaler and "scaler" in trainer_state:
            self.scaler.load_state_dict(trainer_state["scaler"])


class ZeroStrategy:
    """DeepSpeed ZeRO stage 1/2/3 with its own bf16/fp16, accumulation and clipping."""

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: Config, d, precision: str, stage: int):
        deepspeed = distributed.import_deepspeed()
        self.cfg, self.d, self.precision, self.stage = cfg, d, precision, stage
        self.optimizer = optimizer
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_videos,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "train_batch_size": cfg.data.batch_videos * cfg.optim.grad_accum * d.world_size,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        self.input_dtype = _dtype(precision)
        if self.input_dtype is not None:
            # ZeRO-3 casts the parameters it partitions but leaves buffers in fp32, and BatchNorm
            # refuses bf16 weights with fp32 running statistics; stages 1/2 cast buffers too.
            for buf in self.module.buffers():
                if buf.is_floating_point() and buf.dtype != self.input_dtype:
                    buf.data = buf.data.to(self.input_dtype)
        self._eval_copy = None

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def micro_context(self, last: bool):
        return contextlib.nullcontext()

    def forward(self, *args):
        out = self.engine(*args)
        return _floatify(out) if self.input_dtype is not None else out

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self) -> torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan"))
        return norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def full_state_dict(self) -> dict:
        """fp32 state dict of the whole model on every rank (a collective on all ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param
        import deepspeed

        params = {id(p): p for p in self.module.parameters()}
        out = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            p = params.get(id(value))
            full = safe_get_full_fp32_param(p) if p is not None and p.requires_grad else None
            if full is None:
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    full = value.detach().clone()
            full = full.detach()
            out[name] = (full.float() if full.is_floating_point() else full).cpu().clone()
        return out

    def eval_model(self) -> nn.Module:
        """A plain fp32 copy: ZeRO-3 forwards are collectives, and ranks evaluate different
        numbers of batches."""
        from avs_dist.models import build_model

        state = self.full_state_dict()
        if self._eval_copy is None:
            self._eval_copy = build_model(self.cfg.model, load_weights=False).to(self.d.device)
            if self.d.device.type == "cuda" and self.cfg.model.channels_last:
                self._eval_copy = self._eval_copy.to(memory_format=torch.channels_last)
        self._eval_copy.load_state_dict(state)
        return self._eval_copy

    def save(self, folder: Path) -> dict:
        self.engine.save_checkpoint(str(folder / "ds"), tag="state")
        return {}

    def load(self, folder: Path, trainer_state: dict, model_state: dict) -> None:
        path, _ = self.engine.load_checkpoint(str(folder / "ds"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{folder / 'ds'}: DeepSpeed found no checkpoint to load")


# ----------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, d):
        from avs_dist.data.loader import steps_per_epoch
        from avs_dist.data.shards import read_manifest

        self.cfg, self.run_dir, self.d = cfg, Path(run_dir), d
        self.shards = cfg.data.shards
        self.manifest = read_manifest(self.shards)
        self.batches_per_epoch = steps_per_epoch(self.manifest, d.world_size, cfg.data.batch_videos)
        self.steps_per_epoch = self.batches_per_epoch // cfg.optim.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"optim.grad_accum={cfg.optim.grad_accum} exceeds the {self.batches_per_epoch} "
                              f"batches per rank per epoch of {self.shards}: no optimizer step fits in an epoch")
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.precision = resolve_precision(cfg.train.precision, d.device)
        self.splits = self.manifest.get("splits", {})
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best_miou = -math.inf
        self.eval_pending = False
        self.last_val: dict = {}
        self.logger = None

    # ---- set-up
    def build(self) -> None:
        from avs_dist.models import build_model, to_channels_last

        cfg, d = self.cfg, self.d
        check_runtime(cfg, d.world_size, d.device.type == "cuda")
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        model = build_model(cfg.model)
        if cfg.train.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(d.device)
        if d.device.type == "cuda" and cfg.model.channels_last:
            to_channels_last(model)  # Conv2d weights only: TPAVI's 5-d Conv3d weights cannot be
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, self.total_steps))
        if cfg.train.strategy == "ddp":
            self.strategy = DDPStrategy(model, optimizer, scheduler, cfg, d, self.precision)
        else:
            self.strategy = ZeroStrategy(model, optimizer, scheduler, cfg, d, self.precision,
                                         int(cfg.train.strategy[-1]))
        # Per-rank python / numpy / torch streams (augmentation lives in the loader, seeded apart).
        random.seed(cfg.train.seed + d.rank)
        np.random.seed(cfg.train.seed + d.rank)
        torch.manual_seed(cfg.train.seed + d.rank)

    def resume_from(self, folder: Path) -> None:
        model_state = ckpt.load_torch(folder / "model.pt")
        state = ckpt.load_torch(folder / "trainer.pt")
        self.strategy.load(folder, state, model_state["model"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_miou = state.get("best_miou", -math.inf)
        self.eval_pending = state.get("eval_pending", False)
        self.last_val = state.get("last_val", {})
        rngs = state["rng"]
        if self.d.world_size == len(rngs):
            ckpt.set_rng_state(rngs[self.d.rank])
            distributed.load_local_buffers(self.strategy.module, state["buffers"][self.d.rank])
        else:
            self.warn(f"checkpoint has RNG states of {len(rngs)} ranks, this run has {self.d.world_size}: "
                      "reseeding, rank-averaged BN statistics (the run continues, but not bit-identically)")

    # ---- logging shorthands
    def info(self, msg) -> None:
        if self.logger is not None:
            self.logger.info(msg)
        elif self.d.is_main:
            print(msg, flush=True)

    def warn(self, msg) -> None:
        if self.logger is not None:
            self.logger.warn(msg)
        else:
            print(f"[rank {self.d.rank}] WARNING: {msg}", file=sys.stderr, flush=True)

    # ---- checkpoints
    def _model_metrics(self) -> dict:
        return {"val": self.last_val, "best_val_miou": self.best_miou if self.best_miou > -math.inf else None}

    def save(self) -> Path:
        """Every rank takes part; rank 0 renames the finished folder into place."""
        d = self.d
        name = ckpt.step_name(self.step)
        tmp, final = ckpt.temp_path(self.run_dir, name), ckpt.ckpt_root(self.run_dir) / name
        with distributed.averaged_buffers(self.strategy.module, d):
            model_state = self.strategy.full_state_dict()
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(d)
        position = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        extra = self.strategy.save(tmp)
        rngs = distributed.gather_objects(d, ckpt.rng_state())
        buffers = distributed.gather_objects(d, distributed.local_buffers(self.strategy.module))
        if d.is_main:
            ckpt.write_model_folder(tmp, model_state, to_dict(self.cfg), self.step, self.epoch, self._model_metrics())
            ckpt.save_torch({**position, **extra, "rng": rngs, "buffers": buffers, "best_miou": self.best_miou,
                             "eval_pending": self.eval_pending, "last_val": self.last_val,
                             "world_size": d.world_size, "strategy": self.cfg.train.strategy}, tmp / "trainer.pt")
        distributed.barrier(d)  # every rank's DeepSpeed shards are on disk
        if d.is_main:
            ckpt.write_complete(tmp, {"step": self.step, "epoch": self.epoch})
            ckpt.finalize(tmp, final)
            ckpt.prune(self.run_dir, self.cfg.train.keep_last)
            self.info(f"checkpoint {final}")
        distributed.barrier(d)
        return final

    # ---- evaluation
    def evaluate(self, split: str, audio_gap: bool) -> dict:
        from avs_dist.data.loader import eval_loader
        from avs_dist.evaluate import evaluate

        with preserved_rng():
            model = self.strategy.eval_model()
            loader = eval_loader(self.shards, split, self.cfg.data, self.d.rank, self.d.world_size,
                                 device=self.d.device, crops=False)
            result = evaluate(model, loader, self.d.device, self.cfg.data.eval_batch_videos, audio_gap,
                              precision=self.precision, group=self.d.control)
        self.strategy.module.train()
        return result

    def validate(self) -> None:
        split = "val" if self.splits.get("val", {}).get("videos") else None
        if split is None:
            self.warn("the shard set has no val videos: no validation, no best checkpoint")
            return
        with distributed.averaged_buffers(self.strategy.module, self.d):
            result = self.evaluate(split, audio_gap=False)
            self.last_val = result
            self.logger.log_eval(self.step, result, split)
            miou = result.get("miou")
            if miou is not None and miou > self.best_miou:
                self.best_miou = miou
                state = self.strategy.full_state_dict()
                if self.d.is_main:
                    path = ckpt.save_best(self.run_dir, state, to_dict(self.cfg), self.step, self.epoch,
                                          {"val": result})
                    self.info(f"best val mIoU {miou:.4f} at step {self.step}: {path}")
                distributed.barrier(self.d)

    # ---- the loop
    def micro_step(self, batch: dict, last: bool):
        from avs_dist.losses import compute_losses

        s = self.strategy
        frames, audio = batch["frames"], batch["audio"]
        crops = batch["crops"] if self.cfg.model.crop_branch else None
        if s.input_dtype is not None:
            frames, audio = frames.to(s.input_dtype), audio.to(s.input_dtype)
            crops = crops.to(s.input_dtype) if crops is not None else None
        with s.micro_context(last):
            with s.autocast():
                out = s.forward(frames, audio, crops)
                total, terms = compute_losses(out, batch, self.cfg.loss)
            s.backward(total)
        return total.detach(), {k: v.detach() for k, v in terms.items()}, out, batch

    def train(self) -> str:
        from avs_dist.data.loader import train_loader

        cfg, d, s = self.cfg, self.d, self.strategy
        ga = cfg.optim.grad_accum
        frames_per_step = d.world_size * cfg.data.batch_videos * 5 * ga
        pending: list = []
        names: list[str] | None = None
        epoch_batches = self.steps_per_epoch * ga
        s.module.train()

        if self.eval_pending:  # the stop that wrote our checkpoint came before a due eval
            self.eval_pending = False
            self.validate()

        def flush():
            if not pending:
                return
            values = torch.stack([v for v, _ in pending]).cpu().tolist()
            for row, (_, meta) in zip(values, pending):
                terms = dict(zip(names, row[:-1]))
                self.logger.log_step(meta["step"], meta["epoch"], terms, meta["lr"], row[-1],
                                     meta["fps"], meta["wait"], meta["mem"])
            pending.clear()

        if self.batch_in_epoch >= epoch_batches:
            self.epoch += 1
            self.batch_in_epoch = 0
        # One endless stream through one set of workers for the whole run (no restart per
        # epoch); its batch order is the same as per-epoch loaders', so resume stays exact.
        # Batches arrive on the device, normalised there from pinned uint8 (no host-side float work).
        with preserved_rng():
            loader = train_loader(self.shards, cfg.data, d.rank, d.world_size, cfg.train.seed,
                                  self.epoch, start_batch=self.batch_in_epoch, device=d.device,
                                  crops=cfg.model.crop_branch, epochs=None, batches_per_epoch=epoch_batches)
            it = iter(loader)
        try:
            while self.step < self.total_steps:
                if self.batch_in_epoch >= epoch_batches:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                while self.step < self.total_steps and self.batch_in_epoch + ga <= epoch_batches:
                    t0 = time.perf_counter()
                    wait = 0.0
                    acc = None
                    for micro in range(ga):
                        tw = time.perf_counter()
                        batch = next(it)
                        wait += time.perf_counter() - tw
                        total, terms, out, dev_batch = self.micro_step(batch, last=micro == ga - 1)
                        self.batch_in_epoch += 1
                        vec = torch.stack([total.float(), *(terms[k].float() for k in sorted(terms))]) / ga
                        acc = vec if acc is None else acc + vec
                        if names is None:
                            names = ["total", *sorted(terms)]
                    lr = s.lr()
                    norm = s.step()
                    self.step += 1
                    dt = time.perf_counter() - t0
                    if d.is_main:  # only rank 0 logs: the other ranks skip the device-to-host copies
                        pending.append((torch.cat([acc, norm.reshape(1).to(acc.device, torch.float32)]),
                                        {"step": self.step, "epoch": self.epoch, "lr": lr,
                                         "fps": frames_per_step / dt, "wait": wait / dt, "mem": peak_mem(d.device)}))
                    if cfg.train.image_every_steps and self.step % cfg.train.image_every_steps == 0 and d.is_main:
                        self._log_images(out, dev_batch)
                    status = self.boundary(flush, epoch_end=self.batch_in_epoch + ga > epoch_batches)
                    if status:
                        return status
        finally:
            del it
        flush()
        return "completed"

    def boundary(self, flush, epoch_end: bool) -> str | None:
        """Step-boundary actions (module docstring); a status string ends the loop."""
        cfg = self.cfg.train
        stop = distributed.any_flag(self.d, _STOP)
        last = self.step == self.total_steps
        eval_due = ((epoch_end and cfg.eval_every_epochs and (self.epoch + 1) % cfg.eval_every_epochs == 0)
                    or (cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0))
        ckpt_due = self.step % cfg.ckpt_every_steps == 0 or last or stop
        if stop or eval_due or ckpt_due or self.step % cfg.log_every_steps == 0:
            flush()
        if eval_due:
            if stop:
                self.eval_pending = True
            else:
                self.validate()
        if ckpt_due:
            self.save()
        if stop:
            self.info(f"stop requested: checkpoint at step {self.step} written, exiting")
            return "stopped"
        return None

    def _log_images(self, out: dict, batch: dict) -> None:
        valid = batch["mask_valid"].reshape(-1).cpu()
        frames = batch["frames"].reshape(-1, *batch["frames"].shape[2:]).float().cpu()[valid]
        masks = batch["masks"].reshape(-1, *batch["masks"].shape[2:]).float().cpu()[valid]
        logits = out["logits"].detach().float().cpu()[valid]
        self.logger.log_images(self.step, frames, masks, logits)

    def final_eval(self) -> dict:
        results = {}
        if self.splits.get("test", {}).get("videos"):
            with distributed.averaged_buffers(self.strategy.module, self.d):
                results["test"] = self.evaluate("test", audio_gap=self.cfg.train.audio_gap_eval)
            self.logger.log_eval(self.step, results["test"], "test")
        else:
            self.warn("the shard set has no test videos: no final test evaluation")
        return results


# ----------------------------------------------------------------------------- run
def _write_pid(run_dir: Path, rank: int) -> None:
    pids = run_dir / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")


def run(cfg: Config, run_dir, resume: str = "auto") -> dict:
    """Train in this process as one rank of the job the environment describes.

    Returns the final metrics with `status` ("completed" or "stopped") on every rank. The
    process group is created here and destroyed before returning.
    """
    from avs_dist.logger import RunLogger

    run_dir = Path(run_dir)
    d = distributed.setup(cfg.train.strategy)
    logger = None
    try:
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_temps(run_dir)
            if removed:
                print(f"removed unfinished checkpoint folders: {[str(p) for p in removed]}", flush=True)
            save_config(cfg, run_dir / "config.json")
        distributed.barrier(d)
        _write_pid(run_dir, d.rank)

        trainer = Trainer(cfg, run_dir, d)
        trainer.build()
        warn = (lambda m: print(f"WARNING: {m}", file=sys.stderr, flush=True)) if d.is_main else (lambda m: None)
        found = ckpt.resolve_resume(run_dir, resume, warn) if d.is_main else None
        found = distributed.broadcast_object(d, None if found is None else str(found))
        if found is not None:
            trainer.resume_from(Path(found))
        logger = RunLogger(run_dir, to_dict(cfg), d.rank, trainer.total_steps, trainer.steps_per_epoch,
                           start_step=trainer.step)
        trainer.logger = logger
        if found is not None:
            logger.info(f"resumed from {found} (step {trainer.step}, epoch {trainer.epoch}, "
                        f"batch {trainer.batch_in_epoch})")
        logger.info(f"rank 0 of {d.world_size} on {d.device} ({d.backend}), strategy {cfg.train.strategy}, "
                    f"precision {trainer.precision}, {trainer.steps_per_epoch} steps/epoch, "
                    f"{trainer.total_steps} steps")

        status = trainer.train()
        result = {"status": status, "step": trainer.step, "epoch": trainer.epoch,
                  "total_steps": trainer.total_steps, "world_size": d.world_size,
                  "strategy": cfg.train.strategy, "precision": trainer.precision,
                  "best_val_miou": trainer.best_miou if trainer.best_miou > -math.inf else None,
                  "val": trainer.last_val}
        if status == "completed":
            result.update(trainer.final_eval())
            logger.finish(_flat_final(result), to_dict(cfg))
        if d.is_main:
            if status == "completed":
                write_json(run_dir / "final_metrics.json", result)
            write_json(run_dir / "status.json", {"status": status, "step": trainer.step,
                                                  "total_steps": trainer.total_steps, "time": time.time()})
        distributed.barrier(d)
        return result
    finally:
        if logger is not None:
            logger.close()
        distributed.teardown()


def _flat_final(result: dict) -> dict:
    out = {}
    for split in ("val", "test"):
        for k, v in (result.get(split) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{split}/{k}"] = v
    if result.get("best_val_miou") is not None:
        out["best_val_miou"] = result["best_val_miou"]
    return out


# ----------------------------------------------------------------------------- command line
def _parser(prog: str, launcher: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="preset name (avs_dist/configs) or a .toml path")
    p.add_argument("--shards", required=True, help="shard set written by `avs-dist pack` (sets data.shards)")
    p.add_argument("--run-dir", required=True, help="checkpoints, logs and metrics go here")
    p.add_argument("--resume", default="auto",
                   help="auto (newest valid checkpoint of --run-dir, default), never, or a checkpoint folder")
    if launcher:
        p.add_argument("--nproc", type=int, default=1, help="local ranks (processes) to start")
        p.add_argument("--max-restarts", type=int, default=0,
                       help="torchrun restarts of all ranks after a failure (each resumes from the last checkpoint)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    return p


def resolve_config(args) -> Config:
    return load_config(args.config, [*args.overrides, f"data.shards={json.dumps(str(args.shards))}"])


def main(argv: list[str] | None = None) -> int:
    """One rank (env from torchrun). Ends the process with os._exit (see distributed.hard_exit)."""
    args = _parser("python -m avs_dist.train", launcher=False).parse_intermixed_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        distributed.hard_exit(2)
    install_signal_handlers()
    resume = args.resume
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a restarted rank continues from this run's own last checkpoint
    rc = 0
    try:
        run(cfg, args.run_dir, resume)
    except Exception:
        traceback.print_exc()
        rc = 1
    distributed.teardown()
    distributed.hard_exit(rc)
    return rc


def cli(argv: list[str] | None = None) -> int:
    """`avs-dist train`: validate everything, then start --nproc local ranks via torchrun."""
    args = _parser("avs-dist train", launcher=True).parse_intermixed_args(argv)
    if args.nproc < 1 or args.max_restarts < 0:
        print(f"avs-dist train: --nproc must be >= 1 and --max-restarts >= 0 "
              f"(got {args.nproc}, {args.max_restarts})", file=sys.stderr)
        return 2
    try:
        cfg = resolve_config(args)
        from avs_dist.data.shards import read_manifest

        read_manifest(args.shards)
        check_runtime(cfg, args.nproc, torch.cuda.is_available())
    except (ConfigError, RuntimeError) as e:
        print(f"avs-dist train: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank_args = ["--config", args.config, "--shards", args.shards, "--run-dir", str(run_dir),
                 "--resume", args.resume, *args.overrides]
    if args.nproc == 1 and args.max_restarts == 0:
        return main(rank_args)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    port = distributed.free_port()
    torchrun_args = ["--nnodes", "1", "--nproc-per-node", str(args.nproc), "--max-restarts", str(args.max_restarts),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                     "--monitor-interval", "0.5", "-m", "avs_dist.train", *rank_args]
    status_file = run_dir / "status.json"
    status_file.unlink(missing_ok=True)
    try:
        torchrun(torchrun_args)
        rc = 0
    except ChildFailedError as e:
        print(f"avs-dist train: {e}", file=sys.stderr)
        rc = 1
    except Exception as e:  # SignalException: the launcher itself was told to stop
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        rc = 0 if status.get("status") == "stopped" else 1
        print(f"avs-dist train: {type(e).__name__}: {e}; run status {status.get('status', 'unknown')}",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
