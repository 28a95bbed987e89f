"""`avs-dist predict`: mask PNGs and overlays a person can look at.

Input is either a shard set (`avs-dist pack` output: every video of --split, CSV order) or
a folder of one video: 5 image files (sorted by name) and one .wav (log-mel as AVSBench
computes it), or a folder of such video folders. For each video `name` it writes

    {out}/{name}/{name}_{i}_mask.png      0 / 255, i = 1..5 like the AVSBench frame names
    {out}/{name}/{name}_{i}_overlay.png   the frame, the predicted mask lightly tinted and outlined
                                          in a colour that stands out there (plots.overlay)
    {out}/predictions.json                which checkpoint (provenance.py source: best/last/step,
                                          step), the input, and each video's foreground fraction

Frames are resized to the model's image size for the model; masks and overlays come back
at the size of the input frames (logits upsampled bilinearly, then sigmoid > 0.5 as in
AVSBench).

`--video FILE ...` instead takes video files of any length (>= 1 s), rate, size, orientation
and audio, and writes per video masks, overlays, an overlay video with the source audio and a
JSON of each frame's mask area; `--fps`, `--allow-silence`. The timing and every output are
described in avs_dist/video/predict.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from avs_dist.data.layout import FRAMES_PER_VIDEO
from avs_dist.data.transforms import normalize_uint8, stack_images
from avs_dist.errors import UserError
from avs_dist.helpformat import HelpFormatter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREDICTIONS_FILE = "predictions.json"


class PredictInputError(UserError, ValueError):
    """An input that is neither a shard set nor a folder of 5 frames and a wav."""


def prepare_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float32 [T,3,size,size], resized and ImageNet-normalised by the
    loaders' own functions, so the model sees exactly what evaluation feeds it."""
    return normalize_uint8(stack_images([np.ascontiguousarray(frames)], size, normalize=False))[0]


@torch.no_grad()
def predict_masks(model, frames: np.ndarray, audio: np.ndarray, size: int, device, precision="auto") -> np.ndarray:
    """One video: uint8 frames [T,H,W,3] + log-mel [T,(1,)96,64] -> bool masks [T,H,W] at frame size."""
    from avs_dist.evaluation import segment
    from avs_dist.precision import autocast

    device = torch.device(device)
    x = prepare_frames(frames, size).unsqueeze(0).to(device)
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(1, frames.shape[0], 1, 96, 64).to(device)
    with autocast(device, precision):
        logits = segment(model, x, a)  # [T,1,size,size]
    h, w = frames.shape[1:3]
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits[:, 0]) > 0.5).cpu().numpy()


def overlay(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with the predicted mask lightly tinted and outlined just outside it, in a
    colour that stands out from the pixels there, edged in black or white (plots.overlay):
    visible on an object of any colour."""
    from avs_dist.plots import overlay as outlined

    return outlined(frame, mask)


def write_video(out_dir: Path, name: str, frames: np.ndarray, masks: np.ndarray) -> list[Path]:
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (frame, mask) in enumerate(zip(frames, masks), start=1):
        mask_path = folder / f"{name}_{i}_mask.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        over_path = folder / f"{name}_{i}_overlay.png"
        Image.fromarray(overlay(frame, mask)).save(over_path)
        written += [mask_path, over_path]
    return written


# ---- inputs ----

def read_folder_video(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """5 image files (sorted by name) and one .wav -> (uint8 [5,H,W,3], log-mel [5,1,96,64])."""
    from avs_dist.data.audio import logmel_from_wav

    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    wavs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav")
    if len(images) != FRAMES_PER_VIDEO:
        raise PredictInputError(f"{folder}: expected {FRAMES_PER_VIDEO} image files, found {len(images)}"
                                + (f" ({', '.join(p.name for p in images[:8])})" if images else ""))
    if len(wavs) != 1:
        raise PredictInputError(f"{folder}: expected exactly one .wav file, found {len(wavs)}")
    frames = []
    for p in images:
        try:
            with Image.open(p) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise PredictInputError(f"{p}: not a readable image ({e})") from None
    if len({f.shape for f in frames}) != 1:
        raise PredictInputError(f"{folder}: the frames differ in size: {[f.shape[:2] for f in frames]}")
    return np.stack(frames), logmel_from_wav(wavs[0])


def _is_video_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".wav" for p in folder.iterdir())


def iter_inputs(path: Path, split: str):
    """(name, uint8 frames [5,H,W,3], log-mel) for a shard set, a video folder, or a folder of them."""
    from avs_dist.data.shards import MANIFEST, iter_videos

    if not path.exists():
        raise PredictInputError(f"input {path} does not exist")
    if path.is_dir() and (path / MANIFEST).is_file():
        for video in iter_videos(path, split):
            yield video["name"], video["frames"], video["audio"]
        return
    if not path.is_dir():
        raise PredictInputError(f"input {path} is a file; give a shard set or a folder of 5 frames and a .wav")
    if _is_video_folder(path):
        yield (path.name, *read_folder_video(path))
        return
    subs = sorted(p for p in path.iterdir() if p.is_dir() and _is_video_folder(p))
    if not subs:
        raise PredictInputError(f"{path}: not a shard set (no manifest.json), and neither it nor its "
                                "subfolders hold 5 frames and a .wav")
    for sub in subs:
        yield (sub.name, *read_folder_video(sub))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avs-dist predict", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, model.pt, or AVSBench .pth")
    p.add_argument("--input", help="a shard set, a folder of 5 frames + .wav, or a folder of those")
    p.add_argument("--video", nargs="+", metavar="FILE",
                   help="video files (any length >= 1 s, rate, size, orientation, audio): masks, overlays, an "
                        "overlay video and a JSON per video (avs_dist/video/predict.py); instead of --input")
    p.add_argument("--fps", type=int, default=1,
                   help="--video: masks per second (the model runs this many times per 5-second window; each "
                        "output frame takes the nearest sampled frame's mask)")
    p.add_argument("--allow-silence", action="store_true",
                   help="--video: predict a video without sound, feeding silence (the outputs say so)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="test", help="split to predict when --input is a shard set")
    p.add_argument("--limit", type=int, default=0, help="stop after this many videos (0: all)")
    p.add_argument("--vggish-weights", default=None, help="vggish-10086976.pth (AVSBench reference checkpoints)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = p.parse_args(argv)
    if (args.input is None) == (args.video is None):
        p.error("give either --input or --video")
    videos = None
    if args.video is not None:  # every video's problem before the model is even loaded
        from avs_dist.video.predict import check_videos

        videos = check_videos([Path(v) for v in args.video], args.allow_silence)

    from avs_dist.evaluation import load_with_source, mask_classes
    from avs_dist.fileio import write_json
    from avs_dist.provenance import describe

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, source = load_with_source(args.checkpoint, device, args.vggish_weights)
    if mask_classes(model) != 1:  # sigmoid(logit 0) of a class-logit model would be its background score
        raise UserError(f"{source['checkpoint']}: a {mask_classes(model)}-class AVSBench-semantic model; predict "
                        "writes the sounding-object masks of S4 / MS3 models only (score AVSS checkpoints with "
                        "avs-dist eval, which prints per-class figures)")
    out = Path(args.out)
    if args.video is not None:
        return _main_video(args, videos, model, cfg, source, device, out)
    print(f"predicting with the {describe(source)}: {source['checkpoint']}", flush=True)
    videos = {}
    for name, frames, audio in iter_inputs(Path(args.input), args.split):
        masks = predict_masks(model, frames, audio, cfg.data.image_size, device, args.precision)
        write_video(out, name, frames, masks)
        videos[name] = {"foreground_frac": float(masks.mean())}
        print(f"{name}: foreground {masks.mean():.1%} of pixels", flush=True)
        if args.limit and len(videos) >= args.limit:
            break
    if not videos:
        print(f"no videos found in {args.input} (split {args.split})", file=sys.stderr)
        return 1
    # what the masks come from, beside them (PREDICTIONS_FILE)
    write_json(out / PREDICTIONS_FILE, {"source": source, "checkpoint": source["checkpoint"],
                                        "input": str(Path(args.input).resolve()), "split": args.split,
                                        "image_size": cfg.data.image_size, "videos": videos})
    print(f"wrote masks and overlays of {len(videos)} video(s) to {out} ({describe(source)}; {PREDICTIONS_FILE})")
    return 0


def _main_video(args, videos, model, cfg, source, device, out: Path) -> int:
    """--video: thin over avs_dist/video/predict.py; `videos` from its check_videos."""
    from avs_dist.fileio import write_json
    from avs_dist.provenance import describe
    from avs_dist.video.predict import predict_video

    print(f"predicting {len(videos)} video(s) with the {describe(source)}: {source['checkpoint']}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    names, summaries = set(), {}
    for path, _ in videos:
        name, k = path.stem, 2
        while name in names:
            name, k = f"{path.stem}_{k}", k + 1
        names.add(name)
        s = predict_video(model, cfg, path, out, name, per_second=args.fps, allow_silence=args.allow_silence,
                          device=device, precision=args.precision, source=source)
        summaries[name] = {"video": s["video"], "audio": s["audio"], "seconds": s["seconds"],
                           "overlay_video": str(out / name / s["overlay_video"]), "mean_area_frac": s["mean_area_frac"]}
    write_json(out / PREDICTIONS_FILE, {"source": source, "checkpoint": source["checkpoint"], "videos": summaries})
    for name, s in summaries.items():
        print(f"overlay video: {s['overlay_video']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
