"""How the model trains across ranks: torch DDP or DeepSpeed ZeRO 1/2/3, behind one interface.

A Strategy owns the wrapped model, the optimizer, the lr scheduler and (fp16 under DDP) the
loss scaler. The training step (train/step.py) calls, per optimizer step:

    for each micro-batch:   with s.autocast(): out = s.forward(batch, sync_grads=last)
                                               loss = compute_losses(out, ...)
                            s.backward(loss)
    grad_norm, lr = s.optimizer_step()

- `forward(batch, sync_grads)`: the model's output dict in float32 (ZeRO casts the inputs to
  the engine's dtype and the outputs back); `sync_grads=False` on all but the last
  micro-batch lets DDP skip the all-reduce (DeepSpeed decides that itself).
- `backward(loss)`: the gradient of one micro-batch's loss, scaled by 1 / optim.grad_accum.
- `optimizer_step() -> (grad_norm, lr)`: unscale (fp16), clip (optim.grad_clip), step, zero
  the gradients, advance the scheduler. grad_norm is the global norm before clipping (a
  0-d tensor on the device: reading it is the caller's host sync); lr is group 0's lr that
  this step applied. Under DDP and every ZeRO stage both mean the same: the figures of
  the step just taken (an fp16 step skipped for an overflow leaves the schedule where it is).
  A step whose global grad norm is NaN/inf is skipped (no update, the schedule stays) on
  every rank alike; `skipped` then says why (NONFINITE or FP16_OVERFLOW), else None.
- `eval_model()`: a module to evaluate on this rank (ZeRO: a full fp32 copy).
- `model_state_dict()`: full fp32 weights, on rank 0 (None elsewhere under DDP; a collective
  under ZeRO).
- `state_dict()` / `load_state_dict(state, model_state)`: what rank 0 keeps in trainer.pt
  (DDP: optimizer, scheduler, scaler; `model_state()` reads model.pt's weights); `save_shards(folder)` /
  `load_shards(folder, saved_world_size, model_state)`: every rank's own files (ZeRO: DeepSpeed's
  engine checkpoint in folder/ds; a checkpoint of another world size is converted to DeepSpeed's
  universal format first).

What a checkpoint holds, once each: model.pt the trainable weights and the rank-averaged
BatchNorm statistics (never the frozen VGGish: `AVSSystem.state_dict`); DDP's trainer.pt the
optimizer moments; ZeRO's ds/ DeepSpeed's optimizer partitions (its fp32 master weights and
moments) and a model-states file with the buffers and metadata only: neither the frozen
parameters (`exclude_frozen_parameters`) nor the weights, which are in model.pt (ZeRO-1/2 load
them from there, ZeRO-3 restores its partitions from the fp32 ones; `_ShardWriter`).

BatchNorm: DDP runs with broadcast_buffers=False and DeepSpeed never syncs buffers, so each
rank keeps its own running statistics; evaluation and model.pt see them averaged
(distributed.averaged_buffers), or SyncBatchNorm with train.sync_bn (GPU only).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from avs_dist import distributed
from avs_dist.config import Config
from avs_dist.precision import PRECISION_DTYPES, autocast, floatify
from avs_dist.train.cpp_warnings import DDP_ALL_USED, drop_stderr_lines

# 1x1 convolutions get gradients whose strides differ from DDP's bucket views on CPU; a
# performance note about a layout autograd chooses, repeated by every rank.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


# Why optimizer_step skipped its step (Strategy.skipped; None: it stepped). FP16_OVERFLOW is
# the loss scaler's own rule (it lowers the scale and retries); NONFINITE counts towards
# train.max_nonfinite_steps: NaN/inf gradients without fp16, or with a loss scale already
# below 1, where an overflow is no longer the scale's fault.
NONFINITE, FP16_OVERFLOW = "nonfinite", "fp16_overflow"


def skip_kind(scale: float) -> str:
    return FP16_OVERFLOW if scale >= 1 else NONFINITE


def _find_unused(cfg: Config, backend: str, model: nn.Module) -> bool:
    # Parameters that no enabled loss term reaches (losses.unreached_parameters: e.g. the crop
    # branch without its losses) get no gradient, which DDP must be told. On gloo (CPU) the flag
    # also keeps DDP from rebuilding its gradient buckets after the first iteration: with 3+
    # ranks the bucket layout decides each element's ring-allreduce summation order, so a
    # resumed run (initial buckets) would differ in the last bits from an uninterrupted one
    # (rebuilt buckets). CPU runs are the ones kept bit-exact on resume.
    from avs_dist.losses import unreached_parameters

    unreached = unreached_parameters(model, cfg.loss)
    return unreached is None or bool(unreached) or backend == "gloo"


def state_dict_fp32(module: nn.Module) -> dict:
    """A detached CPU copy of `module.state_dict()` with floating tensors in float32."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in module.state_dict().items()}


def _inputs(batch: dict, dtype) -> tuple:
    """The model's positional inputs (models/system.py): frames, audio, crops, frame_exists
    (AVSS clips padded to 10 frames; None for S4 / MS3), masks and mask_valid (an AVSS crop
    branch cuts its object crops from the frames with them)."""
    frames, audio, crops = batch["frames"], batch["audio"], batch.get("crops")
    if dtype is not None:
        frames, audio = frames.to(dtype), audio.to(dtype)
        crops = crops.to(dtype) if crops is not None else None
    return frames, audio, crops, batch.get("frame_exists"), batch.get("masks"), batch.get("mask_valid")


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
                              broadcast_buffers=False, find_unused_parameters=_find_unused(cfg, d.backend, model))
        self.scaler = torch.amp.GradScaler(d.device.type) if precision == "fp16" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.skipped: str | None = None
        # On gloo the flag is on for the bucket order (_find_unused), not for unused parameters:
        # DDP's C++ warning that every parameter was used (once per rank, at the first synced
        # forward) is then expected, so it is dropped there (cpp_warnings.py).
        self._quiet_forward = d.backend == "gloo"

    def autocast(self):
        return autocast(self.d.device, self.precision)

    def forward(self, batch: dict, sync_grads: bool = True) -> dict:
        # What DDP's no_sync() toggles, read at forward time: the backward of a forward made
        # with it off accumulates locally instead of all-reducing.
        self.engine.require_backward_grad_sync = sync_grads
        if self._quiet_forward and sync_grads and torch.is_grad_enabled():
            self._quiet_forward = False
            with drop_stderr_lines(DDP_ALL_USED):
                return self.engine(*_inputs(batch, None))
        return self.engine(*_inputs(batch, None))

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.cfg.optim.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        lr = self.lr()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if self.scaler:
            scale = self.scaler.get_scale()  # a host sync, fp16 only
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # it lowers the scale exactly when it skipped the step; below 1 it is no overflow any more
            self.skipped = None if self.scaler.get_scale() >= scale else skip_kind(self.scaler.get_scale())
        else:
            # The norm of the all-reduced gradients: the same on every rank, so all skip alike.
            # The step's one host sync (GradScaler's found_inf check costs the same).
            self.skipped = None if bool(torch.isfinite(norm)) else NONFINITE
            if self.skipped is None:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped is None:  # as DeepSpeed: a skipped step does not advance the schedule
            self.scheduler.step()
        return norm.detach(), lr

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def model_state_dict(self) -> dict | None:
        """fp32 state dict on rank 0 (every rank holds the same weights; only rank 0 writes)."""
        return state_dict_fp32(self.module) if self.d.is_main else None

    def eval_model(self) -> nn.Module:
        return self.module

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, model_state) -> None:
        """`model_state()`: model.pt's weights (a callable: only DDP needs them)."""
        self.module.load_state_dict(model_state())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save_shards(self, folder: Path) -> None:
        """Nothing per rank: the optimizer is replicated and rank 0 saves it (state_dict)."""

    def load_shards(self, folder: Path, saved_world_size: int, model_state) -> None:
        """Nothing per rank (see save_shards)."""


class _ShardWriter:
    """DeepSpeed's checkpoint engine, with every file written by checkpoint.save_torch (fsynced;
    a failed write names its file and why, where torch's own writer says `basic_ios::clear`) and
    the model-states file without the module's parameters: model.pt holds them (the `module`
    entry keeps the buffers, which DeepSpeed's universal converter reads).

    A failed write is kept in `failure` rather than raised: DeepSpeed's save ends with a barrier
    that every rank must reach; save_shards raises it after."""

    def __init__(self, inner, param_names: set[str]):
        self.inner, self.param_names = inner, param_names
        self.failure: OSError | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path) -> None:
        from avs_dist.train.checkpoint import WriteError, save_torch

        module = state_dict.get("module") if isinstance(state_dict, dict) else None
        if isinstance(module, dict):
            state_dict = {**state_dict, "module": {k: v for k, v in module.items() if k not in self.param_names}}
        try:
            save_torch(state_dict, Path(path))
        except WriteError as e:
            self.failure = self.failure or e


class ZeroStrategy:
    """DeepSpeed ZeRO stage 1/2/3 with its own bf16/fp16, accumulation and clipping.

    universal=True: the checkpoint to resume from was written by another number of ranks;
    load_shards converts it to DeepSpeed's universal checkpoint first."""

    TAG = "state"

    def __init__(self, model: nn.Module, optimizer, scheduler, cfg: Config, d, precision: str, stage: int,
                 universal: bool = False):
        deepspeed = distributed.import_deepspeed()
        self.cfg, self.d, self.precision, self.stage = cfg, d, precision, stage
        self.optimizer = optimizer
        from avs_dist.config import global_batch

        g, b = global_batch(cfg.data, d.world_size, cfg.optim.grad_accum)
        ds_config = {
            "train_micro_batch_size_per_gpu": b,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "train_batch_size": g,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
            "checkpoint": {"load_universal": universal},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        self.engine.checkpoint_engine = _ShardWriter(self.engine.checkpoint_engine,
                                                     {n for n, _ in self.module.named_parameters()})
        self.input_dtype = PRECISION_DTYPES.get(precision)
        if self.input_dtype is not None:
            # ZeRO-3 casts the parameters it partitions but leaves buffers in fp32, and BatchNorm
            # refuses bf16 weights with fp32 running statistics; stages 1/2 cast buffers too.
            for buf in self.module.buffers():
                if buf.is_floating_point() and buf.dtype != self.input_dtype:
                    buf.data = buf.data.to(self.input_dtype)
        self._eval_copy = None
        self.skipped: str | None = None

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # DeepSpeed casts the model itself

    def forward(self, batch: dict, sync_grads: bool = True) -> dict:
        out = self.engine(*_inputs(batch, self.input_dtype))
        return floatify(out) if self.input_dtype is not None else out

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-steps in step(); away from the boundary it does no optimizer work.
            self.engine.step()

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        lr = self.lr()
        self.engine.step()  # the accumulation boundary: the optimizer and scheduler step
        # DeepSpeed skips a step whose global grad norm is NaN/inf (every stage and precision:
        # its overflow check), the same on every rank; under fp16 that is its loss scaling.
        self.skipped = None
        if not self.engine.was_step_applied():
            self.skipped = skip_kind(float(getattr(self.engine.optimizer, "cur_scale", 1.0))) if self.precision == "fp16" else NONFINITE
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return torch.tensor(float("nan")), lr
        return (norm.detach().float() if torch.is_tensor(norm) else torch.tensor(float(norm))), lr

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def model_state_dict(self) -> dict:
        """fp32 state dict of the whole model on every rank (a collective on all ranks)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

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
        from avs_dist.models import build_model, to_channels_last

        state = self.model_state_dict()
        if self._eval_copy is None:
            self._eval_copy = build_model(self.cfg.model, load_weights=False).to(self.d.device)
            if self.d.device.type == "cuda" and self.cfg.model.channels_last:
                to_channels_last(self._eval_copy)
        self._eval_copy.load_state_dict(state)
        return self._eval_copy

    def state_dict(self) -> dict:
        return {"zero_stage": self.stage}  # the optimizer state lives in the per-rank shards

    def load_state_dict(self, state: dict, model_state) -> None:
        """The weights come with the engine's shards (load_shards), not from model.pt."""
        if state.get("zero_stage") != self.stage:
            raise ValueError(f"the checkpoint was written by ZeRO stage {state.get('zero_stage')}, this run uses "
                             f"stage {self.stage}: set train.strategy=zero{state.get('zero_stage')}")

    def save_shards(self, folder: Path) -> None:
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        # The marker DeepSpeed's universal-checkpoint converter requires of a checkpoint.
        info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        writer = self.engine.checkpoint_engine
        writer.failure = None
        self.engine.save_checkpoint(str(folder / "ds"), tag=self.TAG, client_state=info,
                                    exclude_frozen_parameters=True)
        if writer.failure is not None:
            raise writer.failure

    def load_shards(self, folder: Path, saved_world_size: int, model_state) -> None:
        """The engine's state from folder/ds; `model_state()`: model.pt's weights (ZeRO-1/2)."""
        source = folder / "ds"
        if saved_world_size != self.d.world_size:
            source = self._universal_copy(folder)

        def load_module(src: dict, dst: nn.Module) -> None:
            # ds/ holds the buffers only (_ShardWriter). ZeRO-1/2 keep whole parameters on every
            # rank: model.pt's fp32 weights, cast as DeepSpeed casts its master weights. ZeRO-3
            # restores its partitions from the fp32 ones in the optimizer files.
            dst.load_state_dict(model_state() if self.stage < 3 else src, strict=self.stage < 3)

        try:
            path, _ = self.engine.load_checkpoint(str(source), tag=self.TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True, custom_load_fn=load_module)
        finally:
            distributed.barrier(self.d)
            if source != folder / "ds" and self.d.is_main:
                shutil.rmtree(source, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"{source}: DeepSpeed found no checkpoint to load")

    def _universal_copy(self, folder: Path) -> Path:
        """DeepSpeed's universal checkpoint of folder/ds, converted on rank 0 by its own
        converter (deepspeed.checkpoint.ds_to_universal) next to the checkpoint folder."""
        out = folder.parent / f".tmp-universal-{folder.name}"

        def convert() -> None:
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(folder / "ds" / self.TAG), "--output_folder", str(out / self.TAG),
                   "--num_extract_workers", "1", "--num_merge_workers", "1"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"converting {folder / 'ds'} to a universal checkpoint failed:\n"
                                   f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
            (out / "latest_universal").write_text(self.TAG)

        distributed.on_main(self.d, convert)
        return out


def build_strategy(model: nn.Module, optimizer, scheduler, cfg: Config, d, precision: str,
                   resume_world_size: int | None = None):
    """DDPStrategy for train.strategy=ddp, else ZeroStrategy of that stage."""
    if cfg.train.strategy == "ddp":
        return DDPStrategy(model, optimizer, scheduler, cfg, d, precision)
    universal = resume_world_size is not None and resume_world_size != d.world_size
    return ZeroStrategy(model, optimizer, scheduler, cfg, d, precision, int(cfg.train.strategy[-1]), universal)
