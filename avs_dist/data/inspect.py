"""`avs-dist inspect SHARD_DIR`: counts per split, sha256 check, one sample shown.

Exit status 1 when the set is incomplete (no manifest) or a shard does not match the
manifest (missing, wrong size, wrong sha256).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from avs_dist.data.layout import FRAMES_PER_VIDEO, SPLITS
from avs_dist.data.shards import ShardError, decode_sample, iter_raw, read_manifest, split_shards, verify_shards
from avs_dist.helpformat import HelpFormatter


def sample_strip(video: dict) -> np.ndarray:
    """uint8 [H,W,3], labelled (plots.labelled_grid): one column per frame; rows: the frames,
    the ground-truth masks outlined over their frames (a grey panel where a frame has no mask),
    and the crops (resized to the frame size) with each box's source."""
    from PIL import Image

    from avs_dist.plots import overlay

    frames = video["frames"]
    _, h, w, _ = frames.shape
    masks = np.full_like(frames, 64)
    for m, k in zip(video["masks"], video["mask_frames"]):
        masks[k] = overlay(frames[k], m > 0)
    crops = np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c in video["crops"]])
    sounds = f"  sounds: {video['category']}" if video.get("category") else ""
    sources = ", ".join(sorted(set(video["box_source"])))
    titles = [f"{video['name']}  ({video['split']} #{video['index']}){sounds}",
              f"ground truth: {len(video['masks'])} mask(s); grey: no mask", f"crops (boxes from: {sources})"]
    from avs_dist.plots import labelled_grid

    return labelled_grid([list(frames), list(masks), list(crops)],
                         [f"frame {i + 1}" for i in range(len(frames))], titles)


def _clip_rows(table, video: dict, classes: list[str]) -> None:
    """An AVSS clip's fields (avss/samples.py) as rows of `table`."""
    for k in ("name", "vid", "set", "split", "index", "row", "num_frames", "mask_source", "audio_examples"):
        table.add_row(k, str(video[k]))
    for k in ("frames", "masks", "audio"):
        a = video[k]
        table.add_row(k, f"{a.dtype} {list(a.shape)} min {a.min():.3g} max {a.max():.3g} mean {a.mean():.3g}")
    table.add_row("mask_frames", str(video["mask_frames"].tolist()))
    for k, m in zip(video["mask_frames"], video["masks"]):
        ids, counts = np.unique(m, return_counts=True)
        table.add_row(f"mask {int(k)}", ", ".join(f"{classes[int(c)]} ({int(c)}): {n} px" for c, n in zip(ids, counts)))
    first = video["object_frames"] == (video["object_frames"][0] if len(video["object_frames"]) else -1)
    shown = "; ".join(f"{classes[int(c)]} {np.round(b, 1).tolist()}"
                      for b, c in zip(video["object_boxes"][first], video["object_classes"][first]))
    table.add_row("objects", f"{len(video['object_boxes'])} boxes in {len(set(video['object_frames'].tolist()))} "
                             f"frames" + (f"; frame {int(video['object_frames'][0])}: {shown}" if shown else ""))


def _show(console, manifest: dict, report: dict, video: dict | None) -> None:
    from rich.table import Table

    t = Table(title=f"{manifest['subset']} shard set ({manifest['created']})")
    for col in ("split", "videos", "shards", "MB"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split in SPLITS:
        s = manifest["splits"][split]
        mb = sum(e["bytes"] for e in manifest["shards"] if e["split"] == split) / 1e6
        t.add_row(split, str(s["videos"]), str(s["shards"]), f"{mb:.1f}")
    console.print(t)
    opts = manifest["options"]
    avss = manifest["subset"] == "avss"
    if avss:
        console.print(f"options: image_format={opts['image_format']} image_size={opts['image_size']} "
                      f"shard_videos={opts['shard_videos']} masks={opts['masks']} sets={','.join(manifest['sets'])}")
    else:
        console.print(f"options: image_format={opts['image_format']} crop_size={opts['crop_size']} "
                      f"shard_videos={opts['shard_videos']} boxes={opts['boxes']}")
    if manifest["skipped"]:
        console.print(f"[yellow]{len(manifest['skipped'])} videos were skipped when packing:")
        for b in manifest["skipped"]:
            console.print(f"  {b['name']} ({b['split']}): " + "; ".join(b["problems"]))
    masks = manifest["masks_not_clean"]
    if masks["count"]:
        from avs_dist.data.pack import not_clean_summary

        console.print(not_clean_summary(masks, subset=manifest["subset"]), style="yellow", markup=False,
                      highlight=False)
    else:
        console.print(f"masks: all {masks['of']} " + ("of known classes" if avss else "clean 0/255"))
    if report["ok"]:
        console.print(f"[green]sha256 OK for all {report['checked']} shards")
    else:
        console.print(f"[red]{len(report['problems'])} of {report['checked']} shards do not match the manifest:")
        for p in report["problems"]:
            console.print(f"  [red]{p}")
    if report["extra"]:
        console.print(f"[yellow]files not in the manifest: {', '.join(report['extra'])}")
    if video is None:
        return
    v = Table(title=f"sample: {video['split']}[{video['index']}]")
    v.add_column("field")
    v.add_column("value")
    if avss:
        _clip_rows(v, video, manifest["classes"])
        console.print(v)
        return
    for k in ("name", "category", "label", "split", "index", "row", "audio_source"):
        v.add_row(k, str(video[k]))
    for k in ("frames", "crops", "masks", "audio"):
        a = video[k]
        v.add_row(k, f"{a.dtype} {list(a.shape)} min {a.min():.3g} max {a.max():.3g} mean {a.mean():.3g}")
    v.add_row("mask_frames", str(video["mask_frames"].tolist()))
    for i in range(FRAMES_PER_VIDEO):
        v.add_row(f"box {i + 1}", f"{np.round(video['boxes'][i], 1).tolist()} ({video['box_source'][i]})")
    console.print(v)


def _read_video(shard_dir, split: str, index: int, manifest: dict) -> dict:
    """The index-th video of `split`: only its own shard member is read and decoded."""
    for e in split_shards(shard_dir, split, manifest):
        if index < len(e["keys"]):
            key = e["keys"][index]
            return decode_sample(next(iter(iter_raw([e["path"]], select=key.__eq__))))
        index -= len(e["keys"])
    raise ShardError(f"{split} has no video at this index")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="avs-dist inspect", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    ap.add_argument("shard_dir")
    ap.add_argument("--split", choices=SPLITS, default=None, help="split of the sample shown (default: first non-empty)")
    ap.add_argument("--index", type=int, default=0, help="position of the sample in its split")
    ap.add_argument("--save-png", default=None, help="write a frames / masks / crops strip of the sample here "
                    "(avss: frames / colour masks / object boxes)")
    a = ap.parse_args(argv)
    from rich.console import Console

    console = Console()
    try:
        manifest = read_manifest(a.shard_dir)
        report = verify_shards(a.shard_dir)
        split = a.split or next((s for s in SPLITS if manifest["splits"][s]["videos"]), None)
        video = None
        if split is not None and report["ok"]:
            if not 0 <= a.index < manifest["splits"][split]["videos"]:
                raise ShardError(f"--index {a.index}: {split} has {manifest['splits'][split]['videos']} videos")
            video = _read_video(a.shard_dir, split, a.index, manifest)
    except ShardError as e:
        print(f"avs-dist inspect: {e}", file=sys.stderr)
        return 1
    _show(console, manifest, report, video)
    if a.save_png and video is not None:
        from PIL import Image

        Path(a.save_png).parent.mkdir(parents=True, exist_ok=True)
        if manifest["subset"] == "avss":
            from avs_dist.avss.pictures import clip_strip

            strip = clip_strip(video, manifest["classes"])
        else:
            strip = sample_strip(video)
        Image.fromarray(strip).save(a.save_png)
        console.print(f"wrote {a.save_png}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
