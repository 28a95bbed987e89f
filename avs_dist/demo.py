"""`avs-dist demo`: the whole path on a CPU machine in a few minutes.

synth (AVSBench layout) -> pack (WebDataset shards) -> 2-process DDP training of the `tiny`
preset -> eval of its best checkpoint on test with the audio gap -> both test results (the
training's own, of its last model, and eval's, of the best checkpoint), each naming its
weights -> `predict --video` on one synthetic test clip (synth also writes the clips as mp4 with
their sound) -> where RESULTS.md, the TensorBoard logs and that clip's overlay video are.

Each step runs the real command line in a subprocess, exactly as a user would type it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from avs_dist.helpformat import HelpFormatter
from avs_dist.provenance import describe


def _step(title: str, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "avs_dist", *args]
    print(f"\n=== {title}\n$ avs-dist {shlex.join(args)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"demo: step '{title}' failed with exit code {rc}")
    print(f"--- {title}: {time.time() - t0:.0f} s", flush=True)


def _figures(result: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in result.items() if k in ("miou", "f", "miou_avsbench", "f_avsbench",
                                                         "audio_gap", "miou_mismatched", "videos"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="avs-dist demo", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for data, shards and the run")
    p.add_argument("--videos", type=int, default=40, help="synthetic S4 videos")
    p.add_argument("--classes", type=int, default=3,
                   help="sound classes in the synthetic set (the tiny preset learns 3 in its 300 steps)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (DDP over gloo on CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="override the training steps (tiny: 300; the --study runs: 150)")
    p.add_argument("--study", action="store_true",
                   help="instead of one run: the tiny_demo study (2 arms x 2 seeds, avs_dist/studies) and its report")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    data, shards, run = out / "avsbench", out / "shards", out / "run"
    overrides = [f"train.max_steps={args.steps}"] if args.steps else []

    _step("synthetic AVSBench data", ["synth", "--out", str(data), "--videos", str(args.videos),
                                      "--size", "64", "--subset", "s4", "--seed", "0",
                                      "--classes", str(args.classes), "--raw-videos", "--force"])  # the demo's own folder
    _step("pack into shards", ["pack", "--data-root", str(data), "--subset", "s4", "--out", str(shards),
                               "--boxes", str(data / "boxes" / "Single-source"), "--crop-size", "32",
                               "--workers", "2", "--overwrite"])
    _step("inspect the shards", ["inspect", str(shards)])
    if args.study:
        return _study(out, shards, args.nproc, overrides)
    _step(f"train tiny, {args.nproc} processes", ["train", "--config", "tiny", "--shards", str(shards),
                                                  "--run-dir", str(run), "--nproc", str(args.nproc),
                                                  "--resume", "never", *overrides])
    # the run folder: eval takes its best/ checkpoint, else its newest valid one (train/checkpoint.py model_file)
    _step("evaluate the best checkpoint on test, with the audio gap",
          ["eval", "--checkpoint", str(run), "--shards", str(shards), "--split", "test",
           "--out", str(out / "eval_test.json")])
    clip = _test_clip(data)
    _step("predict a synthetic test clip from its video, with an overlay video",
          ["predict", "--checkpoint", str(run), "--video", str(clip), "--out", str(out / "predict_video")])
    overlay_video = out / "predict_video" / clip.stem / f"{clip.stem}_overlay.mp4"
    print("\n=== demo finished")
    final = json.loads((run / "final_metrics.json").read_text())
    best = json.loads((out / "eval_test.json").read_text())
    # two evaluations of two different sets of weights: each line says which
    print(f"test, {describe(final.get('test_source'))}, evaluated by the training:\n  {_figures(final['test'])}")
    print(f"test, {describe(best.get('source'))}, evaluated by `avs-dist eval`:\n  {_figures(best)}")
    print("audio_gap: test mIoU minus the mIoU of the same frames with the audio of another class's video")
    print(f"results: {run / 'RESULTS.md'}")
    print(f"TensorBoard: tensorboard --logdir {run / 'tb'}")
    print(f"overlay video of test clip {clip.stem}: {overlay_video}")
    return 0


def _test_clip(data: Path) -> Path:
    """The raw mp4 of the first test video of the synthetic S4 set (CSV order)."""
    from avs_dist.data.layout import raw_video_path, read_s4

    rec = next(r for r in read_s4(data) if r.split == "test")
    return raw_video_path(data, rec)


def _study(out: Path, shards: Path, nproc: int, overrides: list[str]) -> int:
    """`avs-dist study run tiny_demo`: without and with the crop losses, two seeds each; it
    prints its report. Run again, it continues where it stopped."""
    study = out / "study"
    rc = subprocess.call([sys.executable, "-m", "avs_dist", "study", "run", "tiny_demo", "--shards", str(shards),
                          "--out", str(study), "--nproc", str(nproc), *overrides])
    print(f"\n=== demo study {'finished' if rc == 0 else f'ended with exit code {rc}'}: {study / 'report.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
