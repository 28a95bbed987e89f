"""`avs-dist bench model`: training-step throughput, peak memory and FLOPs of model variants.

Each variant times full training steps (forward, losses, backward, Adam step) on synthetic
tensors already on the device: median of --steps steps after warm-up, with a device
synchronisation around each step on GPU. FLOPs are counted once per variant with
torch.utils.flop_counter.FlopCounterMode over one forward + backward (plus formulas for the
CPU attention kernels, see flop_counter). Variants differ in
precision (fp32 / bf16 autocast), memory format (NCHW / channels_last), TPAVI implementation
(reference / factorized), branches (one: AVSModel; two: + crop branch and its losses) and
batch size, and optional flags: `_mmup` (decoder upsampling as matrix products, model.upsample),
`_fadam` (fused Adam), `_pvt` (the preset's PVT-v2 encoder instead of its ResNet; the crop
branch stays a ResNet), `_avss` (AVSBench-semantic: 71 class logits, TPAVI in groups of 5 without
audio bias, cross-entropy and the AVSS AVM loss, every frame existing and labelled, as in a v2
clip; one branch only) and `_t{T}` (clips of T frames instead of 5, e.g. `_t10`: the AVSS clip
length; a batch of 5-second AVSS clips padded to 10 costs what `_t10` costs). Names read
`{impl}_{precision}_{cl|nchw}_{one|two}_b{B}[_flags]`; --variants takes a comma-separated list
of names or shell patterns (e.g. 'factorized_bf16_*', '*_pvt'). Each result gives the cost per
step and per clip (`ms_per_clip_median`: the step's median over its B clips).

Presets: `cpu` (ResNet-18 or PVT-v2-b0, 32 decoder channels, 64 px; about a minute on 2 cores)
and `full` (ResNet-50 or PVT-v2-b5, 256 channels, 224 px: the configurations of docs
perf-baseline, for one GPU). `reference_fp32_nchw_one_b4[_pvt]` is the reference's own setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from .config import SUBSET_MASK_CLASSES, LossConfig, ModelConfig
from .fileio import write_json
from .losses import compute_losses
from .models import build_model, to_channels_last
from .helpformat import HelpFormatter
from .precision import autocast as precision_autocast
from .train.logger import peak_memory_bytes as peak_mem


@dataclasses.dataclass
class Variant:
    impl: str  # "factorized" | "reference"
    precision: str  # "fp32" | "bf16"
    channels_last: bool
    two_branch: bool
    batch: int  # videos (clips) per step
    upsample: str = "interpolate"  # suffix "_mmup": model.upsample="matmul"
    fused_adam: bool = False  # suffix "_fadam": torch.optim.Adam(fused=True) (CUDA only)
    pvt: bool = False  # suffix "_pvt": the preset's PVT-v2 backbone
    avss: bool = False  # suffix "_avss": the AVSBench-semantic model and losses
    frames: int = 5  # suffix "_t{T}": frames per clip

    @property
    def name(self) -> str:
        return (f"{self.impl}_{self.precision}_{'cl' if self.channels_last else 'nchw'}_"
                f"{'two' if self.two_branch else 'one'}_b{self.batch}"
                f"{'_mmup' if self.upsample == 'matmul' else ''}{'_fadam' if self.fused_adam else ''}"
                f"{'_pvt' if self.pvt else ''}{'_avss' if self.avss else ''}"
                f"{f'_t{self.frames}' if self.frames != 5 else ''}")


FLAGS = ("mmup", "fadam", "pvt", "avss")
AVSS_CLASSES = SUBSET_MASK_CLASSES["avss"]


def _frames_flag(flag: str) -> int | None:
    """'t10' -> 10; None for anything else."""
    return int(flag[1:]) if flag.startswith("t") and flag[1:].isdigit() and int(flag[1:]) > 0 else None


def _v(spec: str) -> Variant:
    impl, prec, fmt, branches, b, *flags = spec.split("_")
    frames = [_frames_flag(f) for f in flags if _frames_flag(f) is not None]
    if impl not in ("factorized", "reference") or prec not in ("fp32", "bf16") or fmt not in ("cl", "nchw") \
            or branches not in ("one", "two") or not b.startswith("b") or len(frames) > 1 \
            or any(f not in FLAGS and _frames_flag(f) is None for f in flags) \
            or ("avss" in flags and branches == "two"):
        # not yet: the synthetic AVSS batch's per-pixel random classes would make ~70 object
        # crops per frame, no measure of the AVSS crop branch (it needs object-like masks)
        raise ValueError(spec)
    return Variant(impl, prec, fmt == "cl", branches == "two", int(b[1:]),
                   upsample="matmul" if "mmup" in flags else "interpolate", fused_adam="fadam" in flags,
                   pvt="pvt" in flags, avss="avss" in flags, frames=frames[0] if frames else 5)


PRESETS = {
    "cpu": {
        "model": dict(backbone="resnet18", decoder_channels=32, crop_depth=18, crop_hidden=64),
        "pvt_backbone": "pvt_v2_b0",
        "image": 64, "crop": 32, "warmup": 1, "steps": 3,
        "variants": [_v(s) for s in (
            "reference_fp32_nchw_one_b2", "factorized_fp32_nchw_one_b2", "factorized_fp32_cl_one_b2",
            "factorized_fp32_nchw_two_b2", "factorized_bf16_nchw_one_b2", "factorized_fp32_nchw_one_b1",
            "factorized_fp32_nchw_one_b2_mmup", "reference_fp32_nchw_one_b2_pvt", "factorized_fp32_nchw_one_b2_pvt",
            "factorized_bf16_nchw_one_b2_pvt",
            # AVSS: a clip of 5 frames against one of 10
            "factorized_fp32_nchw_one_b2_avss", "factorized_fp32_nchw_one_b2_avss_t10")],
    },
    "full": {
        "model": dict(backbone="resnet50", decoder_channels=256, crop_depth=50, crop_hidden=512),
        "pvt_backbone": "pvt_v2_b5",
        "image": 224, "crop": 224, "warmup": 5, "steps": 20,
        "variants": [_v(s) for s in (
            "reference_fp32_nchw_one_b4", "factorized_fp32_nchw_one_b4",
            "reference_bf16_cl_one_b4", "factorized_bf16_cl_one_b4",
            "reference_bf16_cl_one_b16", "reference_bf16_cl_two_b16",
            "factorized_bf16_cl_one_b16", "factorized_bf16_cl_two_b16",
            "factorized_bf16_nchw_one_b16", "factorized_bf16_nchw_two_b16",
            "factorized_bf16_cl_one_b8", "factorized_bf16_cl_one_b32", "factorized_bf16_cl_two_b32",
            "factorized_bf16_cl_two_b16_mmup", "factorized_bf16_cl_two_b16_fadam",
            "factorized_bf16_cl_two_b16_mmup_fadam",
            # PVT-v2-b5: the reference's setting against ours, then larger batches
            "reference_fp32_nchw_one_b4_pvt", "factorized_bf16_cl_one_b4_pvt", "factorized_bf16_cl_one_b4_mmup_pvt",
            "factorized_bf16_cl_one_b16_mmup_pvt", "factorized_bf16_cl_two_b16_mmup_pvt",
            "factorized_bf16_cl_one_b32_mmup_pvt",
            # AVSS (avss_avsbench's model): the reference's setting at 10 frames, ours at 5 and 10
            "reference_fp32_nchw_one_b4_pvt_avss_t10", "factorized_bf16_cl_one_b4_mmup_pvt_avss",
            "factorized_bf16_cl_one_b4_mmup_pvt_avss_t10")],
    },
}


def synthetic_batch(batch: int, image: int, crop: int, device: torch.device, frames: int = 5,
                    classes: int = 1) -> dict:
    """S4's training batch (classes=1: 0/1 masks, frame 0 supervised), or an AVSS one (class
    indices, every frame existing and labelled, as in a v2 clip)."""
    g = torch.Generator().manual_seed(0)
    valid = torch.zeros(batch, frames, dtype=torch.bool)
    valid[:, 0] = True  # S4 training supervises the first frame only
    cpu = {
        "frames": torch.randn(batch, frames, 3, image, image, generator=g),
        "audio": torch.randn(batch, frames, 1, 96, 64, generator=g),
        "crops": torch.randn(batch, frames, 3, crop, crop, generator=g),
        "masks": (torch.rand(batch, frames, image, image, generator=g) > 0.5).float(),
        "mask_valid": valid,
        "label": torch.randint(0, 23, (batch,), generator=g),
    }
    if classes > 1:
        cpu.update(masks=torch.randint(0, classes, (batch, frames, image, image), generator=g),
                   mask_valid=torch.ones(batch, frames, dtype=torch.bool),
                   frame_exists=torch.ones(batch, frames, dtype=torch.bool))
        del cpu["crops"], cpu["label"]
    return {k: v.to(device) for k, v in cpu.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)



def _cpu_attention_flops() -> dict:
    """FlopCounterMode formulas for the CPU kernels of scaled_dot_product_attention (PVT-v2's
    attention, through timm), which torch's counter lacks: the same counts as its formulas
    for the CUDA kernels. Without them a CPU count leaves out PVT's attention."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def flop_counter():
    """torch.utils.flop_counter.FlopCounterMode, counting CPU attention too."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())


def run_variant(v: Variant, preset: dict, device: torch.device, steps: int, warmup: int) -> dict:
    model_kw = {**preset["model"], **({"backbone": preset["pvt_backbone"]} if v.pvt else {})}
    if v.avss:  # avss_avsbench's model and losses
        model_kw.update(mask_classes=AVSS_CLASSES, tpavi_frames_per_group=5, tpavi_audio_bias=False)
        lcfg = LossConfig(bce=False, ce=True, avm=True, avm_weight=0.5, avm_variant="avss")
    else:
        lcfg = LossConfig(crop_ce=v.two_branch, crop_pair=v.two_branch, crop_audio=v.two_branch)
    mcfg = ModelConfig(**model_kw, tpavi_impl=v.impl, crop_branch=v.two_branch,
                       channels_last=v.channels_last, upsample=v.upsample)
    torch.manual_seed(0)
    model = build_model(mcfg, load_weights=False).to(device)
    if v.channels_last:
        to_channels_last(model)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                           fused=True if v.fused_adam and device.type == "cuda" else None)
    batch = synthetic_batch(v.batch, preset["image"], preset["crop"], device, v.frames,
                            AVSS_CLASSES if v.avss else 1)
    autocast = precision_autocast(device, v.precision)

    def forward():
        return model(batch["frames"], batch["audio"], batch["crops"] if v.two_branch else None,
                     batch.get("frame_exists"))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = forward()
            total, _ = compute_losses(out, batch, lcfg)
        total.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    # on CPU the process's RSS high-water mark: it never decreases across variants
    peak = peak_mem(device) / 2**30
    mem_kind = "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss"

    counter = flop_counter()
    opt.zero_grad(set_to_none=True)
    with counter:
        with autocast:
            out = forward()
            total, _ = compute_losses(out, batch, lcfg)
        total.backward()
    flops = counter.get_total_flops()

    frames = v.batch * v.frames
    med = statistics.median(times)
    del model, opt, batch
    return {
        "name": v.name, **dataclasses.asdict(v), "frames_per_step": frames, "frames_per_clip": v.frames,
        "ms_per_step_median": med * 1e3, "ms_per_step_all": [t * 1e3 for t in times],
        "ms_per_clip_median": med * 1e3 / v.batch,
        "frames_per_s": frames / med, "peak_mem_gib": peak, "mem_kind": mem_kind,
        "gflop_per_frame": flops / frames / 1e9, "achieved_tflop_s": flops / med / 1e12,
    }


def select(variants: list[Variant], patterns: str | None) -> list[Variant]:
    if not patterns:
        return variants
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [v for v in variants if any(fnmatch.fnmatchcase(v.name, p) for p in pats)]
    known = {v.name for v in variants}
    for p in pats:  # a full name outside the preset's list is still a valid variant
        if p not in known and not any(ch in p for ch in "*?["):
            try:
                chosen.append(_v(p))
            except ValueError:
                raise SystemExit(f"bench model: variant {p!r} is not a preset variant or a name like "
                                 f"'factorized_bf16_cl_two_b16' (preset variants: {', '.join(sorted(known))})")
    if not chosen:
        raise SystemExit(f"bench model: --variants {patterns!r} matches none of: {', '.join(sorted(known))}")
    return chosen


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (without sparsity);
# `--peak-tflops` for any other card. perf-baseline measured ~800 for a large bf16 matmul on an H100.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    name = device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def add_ratios(results: list[dict], peak_tflops: float | None) -> None:
    """x_reference: frames/s over the reference setting of the same encoder and task measured in
    the same run (reference_fp32_nchw_one_b4[_pvt][_avss_t10], or the first such reference_* variant);
    peak_fraction: achieved TFLOP/s over the card's bf16 peak."""
    refs = {}
    for r in results:
        if "error" not in r and r["impl"] == "reference" and r["precision"] == "fp32" and not r["channels_last"]:
            refs.setdefault((r["pvt"], r.get("avss", False)), r)
    for r in results:
        if "error" in r:
            continue
        ref = refs.get((r["pvt"], r.get("avss", False)))
        r["x_reference"] = r["frames_per_s"] / ref["frames_per_s"] if ref else None
        r["reference_variant"] = ref["name"] if ref else None
        r["peak_fraction"] = r["achieved_tflop_s"] / peak_tflops if peak_tflops else None



def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:44} ERROR {r['error']}"
    xref = f"{r['x_reference']:6.2f}" if r["x_reference"] else f"{'-':>6}"
    peak = f"{100 * r['peak_fraction']:6.1f}%" if r["peak_fraction"] else f"{'-':>7}"
    return (f"{r['name']:44} {r['ms_per_step_median']:9.1f} {r['frames_per_s']:9.1f} {xref} {r['peak_mem_gib']:9.2f} "
            f"{r['gflop_per_frame']:9.2f} {r['achieved_tflop_s']:8.3f} {peak}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="avs-dist bench model", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--steps", type=int, help="timed steps per variant (preset default: cpu 3, full 20)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (preset default: cpu 1, full 5)")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--variants", help="comma-separated names or patterns, e.g. 'factorized_bf16_cl_*'")
    ap.add_argument("--list", action="store_true", help="list the preset's variants and exit")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense bf16 peak for peak_fraction (default: known cards, BF16_PEAK_TFLOPS)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    variants = select(preset["variants"], args.variants)
    if args.list:
        print("\n".join(v.name for v in variants))
        return 0
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench model: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(dev)
    steps = args.steps if args.steps is not None else preset["steps"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if steps < 1 or warmup < 0:
        print("bench model: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    report = {
        "device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": args.preset, "model": preset["model"], "pvt_backbone": preset["pvt_backbone"],
        "image": preset["image"], "crop": preset["crop"],
        "steps": steps, "warmup": warmup, "bf16_peak_tflops": bf16_peak(device, args.peak_tflops), "results": [],
    }
    print(f"device {report['device']}, torch {report['torch']}, preset {args.preset}, "
          f"{steps} steps after {warmup} warm-up")
    header = (f"{'variant':44} {'ms/step':>9} {'frames/s':>9} {'x ref':>6} {'peak GiB':>9} {'GFLOP/fr':>9} "
              f"{'TFLOP/s':>8} {'of peak':>7}")
    print(header)
    for v in variants:
        try:
            r = run_variant(v, preset, device, steps, warmup)
        except torch.cuda.OutOfMemoryError as e:
            r = {"name": v.name, **dataclasses.asdict(v), "error": f"out of memory: {str(e).splitlines()[0]}"}
        except Exception as e:  # one failing variant must not lose the others' numbers
            r = {"name": v.name, **dataclasses.asdict(v), "error": f"{type(e).__name__}: {e}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report["results"].append(r)
        add_ratios(report["results"], report["bf16_peak_tflops"])
        if args.out:  # after every variant, so a run cut short keeps what it measured
            write_json(args.out, report)
        print(_row(r), flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return 1 if all("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
