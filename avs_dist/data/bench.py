"""`avs-dist bench data`: our shard loader vs a per-file loader like the AVSBench reference.

All loaders read the same videos (the first N of a split, CSV order) with the same number
of DataLoader workers and videos per batch, one after the other in one process, alternating
for `--rounds` rounds (the best round of each counts, so the page cache is warm for all).

- per_file: a torch Dataset + DataLoader that reads one video as the reference S4Dataset /
  MS3Dataset does: per frame PIL open + convert RGB + ToTensor + Normalize, masks with PIL
  mode '1' + ToTensor, pickle.load of the .pkl; float32 normalised frames, no crops.
- reference_like: `eval_loader(crops=False)` on the shards, float32 normalised batch on
  the CPU: the same work and output as per_file (a model without a crop branch, as the
  AVSBench reference); the like-for-like comparison. The workers send uint8, the main
  process normalises (the loader's CPU path).
- reference_like_float_workers: the same batch with the workers normalising and sending
  float32 (4x the bytes through shared memory).
- two_branch: the same with the 5 crops per video decoded and normalised too (the
  two-branch model's batch; per_file still reads no crops).
- uint8_for_gpu (and uint8_for_gpu_two_branch): what a GPU run gets with `device=...`:
  workers send uint8 frames / masks; the GPU normalises them (not counted: no CPU work).

"Per core" is videos per CPU-second of this process and its worker processes together
(getrusage SELF + CHILDREN; workers are joined at the end of each pass). Every batch is
read once in this process (what the trainer's copy to the GPU or the model does), so
tensors that arrive in shared memory pay their page faults inside the measurement. Other processes
on the machine slow every loader; the load average before each pass is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from avs_dist.config import DataConfig
from avs_dist.data.layout import read_subset
from avs_dist.data.loader import eval_loader
from avs_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from avs_dist.data.shards import iter_videos, read_manifest
from avs_dist.helpformat import HelpFormatter

LOADERS = ("per_file", "reference_like", "reference_like_float_workers", "two_branch", "uint8_for_gpu",
           "uint8_for_gpu_two_branch")


class PerFileDataset(torch.utils.data.Dataset):
    """One video per item, read from the AVSBench files the way the reference Dataset does."""

    def __init__(self, records):
        from torchvision import transforms

        self.records = records
        self.img_transform = transforms.Compose([transforms.ToTensor(),
                                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.mask_transform = transforms.Compose([transforms.ToTensor()])

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from PIL import Image

        r = self.records[i]
        imgs = torch.stack([self.img_transform(Image.open(p).convert("RGB")) for p in r.frame_paths])
        mode = "1" if r.subset == "s4" else "P"  # the reference's S4 and MS3 loaders (avsbench-format.md §1)
        masks = torch.stack([self.mask_transform(Image.open(p).convert(mode)) for p in r.mask_paths])
        with open(r.logmel_path, "rb") as f:
            audio = pickle.load(f).detach()
        return imgs, audio, masks, r.category or "", r.name


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its finished child processes) CPU seconds, user + system."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _read_once(tensors) -> None:
    """Read every byte of a batch once in this process, as any consumer does (a copy to
    the GPU, the model's first layer): tensors that arrive in shared memory pay their page
    faults here. numpy: one thread, so the reading costs the same for every loader."""
    for t in tensors:
        if torch.is_tensor(t):
            t = t.numpy()
        if isinstance(t, np.ndarray) and t.dtype != object:
            t.sum()


def _measure(make_batches, count, tensors) -> dict:
    load = os.getloadavg()[0]
    (main0, child0), t0 = _cpu_seconds(), time.perf_counter()
    videos = 0
    it = iter(make_batches())
    for batch in it:
        videos += count(batch)
        _read_once(tensors(batch))
    del it  # shuts the workers down, so their CPU time is counted
    wall, (main1, child1) = time.perf_counter() - t0, _cpu_seconds()
    cpu = main1 - main0 + child1 - child0
    return {"videos": videos, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "main_cpu_s": round(main1 - main0, 4),
            "videos_per_s": round(videos / wall, 2), "videos_per_cpu_s": round(videos / cpu, 2),
            "cores_used": round(cpu / wall, 2), "load_avg_1min": round(load, 2)}


def _makers(shards, split: str, cfg: DataConfig, n: int, records, batch_videos: int, workers: int) -> dict:
    """name -> (make a fresh loader, videos in a batch, the batch's tensors) for each LOADERS entry."""

    def shards_count(b):
        return len(b["index"])

    def uint8(crops):
        # What the workers hand a GPU run (device=...): the GPU's normalisation is not counted.
        return lambda: eval_loader(shards, split, cfg, max_videos=n, device="cpu", crops=crops).loader

    def per_file():
        return torch.utils.data.DataLoader(PerFileDataset(records), batch_size=batch_videos, shuffle=False,
                                           num_workers=workers)

    def tensors(b):
        return b.values()

    return {
        "per_file": (per_file, lambda b: b[0].shape[0], lambda b: b[:3]),
        "reference_like": (lambda: eval_loader(shards, split, cfg, max_videos=n, crops=False), shards_count,
                           tensors),
        "reference_like_float_workers": (lambda: eval_loader(shards, split, cfg, max_videos=n, crops=False,
                                                             transport="float"), shards_count, tensors),
        "two_branch": (lambda: eval_loader(shards, split, cfg, max_videos=n), shards_count, tensors),
        "uint8_for_gpu": (uint8(False), shards_count, tensors),
        "uint8_for_gpu_two_branch": (uint8(True), shards_count, tensors),
    }


def run(data_root: str | Path, shards: str | Path, videos: int = 128, workers: int = 2,
        batch_videos: int = 4, split: str = "train", rounds: int = 3, loaders=LOADERS) -> dict:
    manifest = read_manifest(shards)
    subset = manifest["subset"]
    skipped = {s["name"] for s in manifest["skipped"]}
    records = [r for r in read_subset(data_root, subset) if r.split == split and r.name not in skipped][:videos]
    n = len(records)
    if n == 0:
        raise ValueError(f"no {split} videos to read in {data_root} / {shards}")
    first = next(iter_videos(shards, split))
    size = tuple(first["frames"].shape[1:3])
    # Keep the stored sizes: resizing would be the same extra work for every loader.
    cfg = DataConfig(eval_batch_videos=batch_videos, num_workers=workers, prefetch_factor=2,
                     image_size=size[0], crop_size=first["crops"].shape[1])

    makers = _makers(shards, split, cfg, n, records, batch_videos, workers)
    loaders = ["per_file", *(k for k in loaders if k != "per_file")]
    results = {k: [] for k in loaders}
    for _ in range(rounds):
        for k in loaders:
            results[k].append(_measure(*makers[k]))
    # Best round by CPU time: the least disturbed by the other processes on the machine.
    best = {k: max(v, key=lambda r: r["videos_per_cpu_s"]) for k, v in results.items()}
    for k, b in best.items():
        if b["videos"] != n:
            raise RuntimeError(f"{k} read {b['videos']} videos, expected {n}")
    ratios = {k: {"per_core": round(best[k]["videos_per_cpu_s"] / best["per_file"]["videos_per_cpu_s"], 2),
                  "wall": round(best[k]["videos_per_s"] / best["per_file"]["videos_per_s"], 2)}
              for k in loaders if k != "per_file"}
    return {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.processor(),
                    "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()]},
        "subset": subset, "split": split, "videos": n, "workers": workers, "batch_videos": batch_videos,
        "image_format": manifest["options"]["image_format"], "frame_size": list(size),
        "crop_size": cfg.crop_size, "rounds": rounds,
        "ratio_vs_per_file": ratios,
        **best, "all_rounds": results,
        "note": "ratio_vs_per_file.reference_like is the like-for-like comparison (frames + masks + audio, "
                "float32 normalised on the CPU, no crops, as the reference Dataset); two_branch also "
                "decodes and normalises 5 crops per video (per_file reads none); uint8_for_gpu* count the "
                "loader's CPU for a GPU run, whose normalisation happens on the GPU. Best round by "
                "videos per CPU-second; wall-clock figures depend on the machine's other load "
                "(load_avg_1min per pass).",
    }


def result_table(result: dict):
    """The rich Table `avs-dist bench data` prints for `run`'s result."""
    from rich.table import Table

    t = Table(title=f"{result['subset']} {result['split']}: {result['videos']} videos, {result['workers']} workers, "
                    f"frames {result['frame_size']} ({result['image_format']}), load {result['machine']['load_avg_1_5_15_at_end']}")
    # The loader names share long prefixes: never cut them (rich would, to fit 80 columns).
    t.add_column("loader", no_wrap=True, min_width=max(len(n) for n in LOADERS))
    for col in ("videos/s", "CPU s", "cores used", "videos / CPU s", "x per core", "x wall"):
        t.add_column(col, justify="right")
    for name in ["per_file", *result["ratio_vs_per_file"]]:
        r, x = result[name], result["ratio_vs_per_file"].get(name, {"per_core": 1.0, "wall": 1.0})
        t.add_row(name, f"{r['videos_per_s']:.1f}", f"{r['cpu_s']:.2f}", f"{r['cores_used']:.2f}",
                  f"{r['videos_per_cpu_s']:.1f}", f"{x['per_core']:.2f}", f"{x['wall']:.2f}")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avs-dist bench data", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    ap.add_argument("--data-root", required=True, help="the AVSBench (or synth) folder the shards were packed from")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-videos", type=int, default=4)
    ap.add_argument("--split", default="train", choices=("train", "val", "test"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loaders", default=",".join(LOADERS),
                    help=f"comma-separated subset of {', '.join(LOADERS)} (per_file always runs)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    loaders = [k.strip() for k in a.loaders.split(",") if k.strip()]
    bad = [k for k in loaders if k not in LOADERS]
    if bad:
        ap.error(f"unknown loader(s) {', '.join(bad)}; choose from {', '.join(LOADERS)}")
    result = run(a.data_root, a.shards, a.videos, a.workers, a.batch_videos, a.split, a.rounds, loaders)
    from rich.console import Console

    Console().print(result_table(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
