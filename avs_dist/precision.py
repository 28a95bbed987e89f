"""Numeric precision: one rule for training, evaluation, prediction and the benchmarks.

`train.precision` / `--precision` is one of "auto", "fp32", "bf16", "fp16"; "auto" is bf16 on
a GPU and fp32 on the CPU (bf16 on a CPU without bf16 hardware is slow and only emulated).
bf16 and fp16 run the model under torch.autocast (DDP, eval, predict, bench). DeepSpeed
instead casts the model itself (its "bf16" / "fp16" config); its strategy casts the inputs
and `floatify`s the outputs so the losses always see float32.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA, "fp32" elsewhere; other values unchanged. ValueError for an unknown one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (got {precision!r})")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """torch.autocast for bf16 / fp16 on `device`, a no-op context for fp32."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def floatify(obj):
    """Half-precision floating tensors (nested in dicts, lists, tuples) -> float32; the rest unchanged."""
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: floatify(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(floatify(v) for v in obj)
    return obj
