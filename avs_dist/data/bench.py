"""`avs-dist bench data`: our shard loader vs a per-file loader like the AVSBench reference.

Both read the same videos (the first N of a split, CSV order) with the same number of
DataLoader workers and videos per batch, one after the other in one process, alternating
for `--rounds` rounds (the best round of each counts, so the page cache is warm for both).

- shard loader: `eval_loader` on the shard set: decode frames, crops, masks, audio;
  collate into the training batch (normalised float frames and crops, masks, mask_valid).
- per-file loader: a torch Dataset + DataLoader that reads one video as the reference
  S4Dataset / MS3Dataset does: per frame PIL open + convert RGB + ToTensor + Normalize,
  masks with PIL mode '1' + ToTensor, pickle.load of the .pkl. It reads no crops, so the
  comparison favours it.

"Per core" is videos per CPU-second of this process and its worker processes together
(getrusage SELF + CHILDREN; workers are joined at the end of each pass).
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

import torch

from avs_dist.config import DataConfig
from avs_dist.data.layout import read_subset
from avs_dist.data.loader import IMAGENET_MEAN, IMAGENET_STD, eval_loader
from avs_dist.data.shards import iter_videos, read_manifest


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
        masks = torch.stack([self.mask_transform(Image.open(p).convert("1")) for p in r.mask_paths])
        with open(r.logmel_path, "rb") as f:
            audio = pickle.load(f).detach()
        return imgs, audio, masks, r.category or "", r.name


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _measure(make_batches, count) -> dict:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    videos = 0
    it = iter(make_batches())
    for batch in it:
        videos += count(batch)
    del it  # shuts the workers down, so their CPU time is counted
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    return {"videos": videos, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "videos_per_s": round(videos / wall, 2), "videos_per_cpu_s": round(videos / cpu, 2),
            "cores_used": round(cpu / wall, 2)}


def run(data_root: str | Path, shards: str | Path, videos: int = 256, workers: int = 2,
        batch_videos: int = 4, split: str = "train", rounds: int = 2) -> dict:
    manifest = read_manifest(shards)
    subset = manifest["subset"]
    skipped = {s["name"] for s in manifest["skipped"]}
    records = [r for r in read_subset(data_root, subset) if r.split == split and r.name not in skipped][:videos]
    n = len(records)
    if n == 0:
        raise ValueError(f"no {split} videos to read in {data_root} / {shards}")
    first = next(iter_videos(shards, split))
    size = tuple(first["frames"].shape[1:3])
    # Keep the stored sizes: resizing would be the same extra work for both loaders.
    cfg = DataConfig(eval_batch_videos=batch_videos, num_workers=workers, prefetch_factor=2,
                     image_size=size[0], crop_size=first["crops"].shape[1])

    def shard_batches():
        return eval_loader(shards, split, cfg, max_videos=n)

    def shard_batches_uint8():
        # What a GPU run does with device=...: workers send uint8, the GPU normalises.
        return eval_loader(shards, split, cfg, max_videos=n, device="cpu").loader

    def file_batches():
        return torch.utils.data.DataLoader(PerFileDataset(records), batch_size=batch_videos, shuffle=False,
                                           num_workers=workers, pin_memory=torch.cuda.is_available())

    results = {"shard_loader": [], "shard_loader_uint8": [], "per_file_loader": []}
    for _ in range(rounds):
        results["shard_loader"].append(_measure(shard_batches, lambda b: len(b["index"])))
        results["shard_loader_uint8"].append(_measure(shard_batches_uint8, lambda b: len(b["index"])))
        results["per_file_loader"].append(_measure(file_batches, lambda b: b[0].shape[0]))
    best = {k: max(v, key=lambda r: r["videos_per_s"]) for k, v in results.items()}
    for k, b in best.items():
        if b["videos"] != n:
            raise RuntimeError(f"{k} read {b['videos']} videos, expected {n}")
    def ratio(name, key):
        return round(best[name][key] / best["per_file_loader"][key], 2)

    return {
        "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.processor()},
        "subset": subset, "split": split, "videos": n, "workers": workers, "batch_videos": batch_videos,
        "image_format": manifest["options"]["image_format"], "frame_size": list(size),
        "crop_size": cfg.crop_size, "rounds": rounds,
        **best, "all_rounds": results,
        "ratio_per_core": ratio("shard_loader", "videos_per_cpu_s"),
        "ratio_wall": ratio("shard_loader", "videos_per_s"),
        "ratio_per_core_uint8": ratio("shard_loader_uint8", "videos_per_cpu_s"),
        "ratio_wall_uint8": ratio("shard_loader_uint8", "videos_per_s"),
        "note": "the shard loaders also decode 5 crops per video, the per-file loader none; shard_loader "
                "returns the float batch contract, shard_loader_uint8 the uint8 batch that train_loader("
                "device=...) normalises on the GPU (that work is not counted here)",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avs-dist bench data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="the AVSBench (or synth) folder the shards were packed from")
    ap.add_argument("--shards", required=True)
    ap.add_argument("--videos", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-videos", type=int, default=4)
    ap.add_argument("--split", default="train", choices=("train", "val", "test"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = ap.parse_args(argv)
    result = run(a.data_root, a.shards, a.videos, a.workers, a.batch_videos, a.split, a.rounds)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['subset']} {result['split']}: {result['videos']} videos, {result['workers']} workers, "
                    f"frames {result['frame_size']} ({result['image_format']})")
    for col in ("loader", "videos/s", "CPU s", "cores used", "videos / CPU s"):
        t.add_column(col, justify="right")
    for name in ("shard_loader", "shard_loader_uint8", "per_file_loader"):
        r = result[name]
        t.add_row(name, f"{r['videos_per_s']:.1f}", f"{r['cpu_s']:.2f}", f"{r['cores_used']:.2f}",
                  f"{r['videos_per_cpu_s']:.1f}")
    Console().print(t)
    print(f"shard loader vs per-file: {result['ratio_per_core']}x per core, {result['ratio_wall']}x wall; "
          f"uint8 transport: {result['ratio_per_core_uint8']}x per core, {result['ratio_wall_uint8']}x wall")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
