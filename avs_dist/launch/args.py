"""The flags every training launcher shares, and the checks a run can fail before it starts.

`avs-dist train`, the rank entry and `avs-dist submit` build their parsers on `run_parser()`
(argparse parents), so each flag is defined once, and call `check_run` before any process
starts: a bad config, a global batch that does not split over the ranks, a setting this
machine cannot run, or a shard missing or of the wrong size is reported at once, naming the
key or the file, instead of after hours of training.
"""
from __future__ import annotations

import argparse
import json
import os

from avs_dist.config import Config, ConfigError, global_batch, load_config


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a Slurm or container share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", required=True, help="preset name (avs_dist/configs) or a .toml path")
    p.add_argument("--shards", required=True, help="shard set written by `avs-dist pack` (sets data.shards)")
    p.add_argument("--run-dir", required=True, help="checkpoints, logs and metrics go here")
    p.add_argument("--resume", default="auto",
                   help="auto (newest valid checkpoint of --run-dir, default), never, or a checkpoint folder")
    p.add_argument("--check-sha256", action="store_true",
                   help="before starting, also check every shard's sha256 against the manifest "
                        "(always checked: present, and of the manifest's size)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
    return p


def resolve_config(args) -> Config:
    """The config of `args` (preset + overrides, --shards as data.shards), validated."""
    return load_config(args.config, [*args.overrides, f"data.shards={json.dumps(str(args.shards))}"])


def rank_args(args) -> list[str]:
    """The rank entry's command line for the same run (the launcher did any sha256 check: the
    ranks check presence and size only)."""
    return ["--config", args.config, "--shards", str(args.shards), "--run-dir", str(args.run_dir),
            "--resume", args.resume, *args.overrides]


def check_runtime(cfg: Config, world_size: int, cuda: bool) -> None:
    """What the config cannot know by itself: whether this machine and world size can run it."""
    if cfg.train.sync_bn and not cuda and world_size > 1:
        raise ConfigError("train.sync_bn needs GPUs (SyncBatchNorm does not run on CPU); "
                          "without it BN statistics are averaged across ranks for eval and checkpoints")
    if cfg.train.strategy != "ddp" and cfg.train.precision == "fp16" and not cuda:
        raise ConfigError("train.precision=fp16 with DeepSpeed needs a GPU (its CPU accelerator has no fp16); "
                          "use bf16 or fp32, or train.strategy=ddp (torch GradScaler)")
    global_batch(cfg.data, world_size, cfg.optim.grad_accum)
    check_weight_files(cfg)


WEIGHT_FILES = ("pretrained_backbone", "pretrained_crop_backbone", "vggish_weights", "init_from")


def check_weight_files(cfg: Config) -> None:
    """Every weights file the model config names exists (ConfigError naming the key otherwise),
    before any process spends minutes starting up to fail on it."""
    from pathlib import Path

    for key in WEIGHT_FILES:
        value = getattr(cfg.model, key)
        if value and not Path(value).exists():
            raise ConfigError(f"model.{key}={value}: no such file here; give the path of the file on this "
                              f"machine, or model.{key}=\"\" to go without it")


def check_resume(cfg: Config, run_dir, resume: str, world_size: int, manifest: dict) -> None:
    """ConfigError when the checkpoint this run would resume from (--resume, in --run-dir) was
    trained with a setting this run changes and cannot (config.RESUME_RULES): one line naming
    each key, both values and what to do. The changes that can be applied are the ranks' to
    print (train/session.py), once they have resumed. A --resume folder that is missing or not
    a valid checkpoint: MissingFileError / BadFileError (checkpoint.resolve_resume)."""
    from avs_dist.train import checkpoint as ckpt

    if resume not in ("auto", "never"):
        ckpt.resolve_resume(run_dir, resume, warn=lambda msg: None)
    found = ckpt.peek_resume(run_dir, resume)
    if found:
        ckpt.resume_changes(*found, cfg, world_size, manifest)


def check_run(cfg: Config, world_size: int, cuda: bool, sha256: bool = False, shards: bool = True,
              run_dir=None, resume: str = "auto") -> dict:
    """Every check of a run on `world_size` ranks before any of them starts; returns the manifest.

    ConfigError for the config and the runtime; ShardError for the shard set: its manifest,
    train videos, and every shard of the splits the run reads (train, and val / test when
    they have videos) present with the manifest's size (and sha256 with `sha256`); then
    ConfigError when the shards do not fit the config (check_shards_fit) and (with `run_dir`)
    for a setting that differs from the checkpoint it resumes and cannot change (check_resume).
    shards=False skips the shard set (`avs-dist submit --dry-run`)."""
    from avs_dist.data.shards import check_shards, read_manifest

    check_runtime(cfg, world_size, cuda)
    if not shards:
        if run_dir is not None:
            check_resume(cfg, run_dir, resume, world_size, {})
        return {}
    from avs_dist.data.loader import TrainOrder

    manifest = read_manifest(cfg.data.shards)
    splits = manifest.get("splits", {})
    TrainOrder.from_shards(cfg.data.shards, cfg.train.seed, global_batch(cfg.data, world_size, cfg.optim.grad_accum)[0],
                           manifest=manifest)  # ShardError without train videos
    check_shards(cfg.data.shards, [s for s in ("train", "val", "test") if splits.get(s, {}).get("videos")],
                 sha256=sha256, manifest=manifest)
    check_shards_fit(cfg, manifest, stored_frame_size(cfg.data.shards, manifest))
    if run_dir is not None:
        check_resume(cfg, run_dir, resume, world_size, manifest)
    return manifest


def pack_command(manifest: dict, shard_dir, crop_size: int) -> str:
    """The `avs-dist pack` command that packs the same source as `manifest` with `crop_size`."""
    import shlex

    opts = manifest.get("options", {})
    cmd = ["avs-dist", "pack", "--data-root", str(opts.get("data_root", "DATA_ROOT")), "--subset",
           str(manifest.get("subset")), "--out", f"{str(shard_dir).rstrip('/')}-crop{crop_size}",
           "--crop-size", str(crop_size)]
    if opts.get("boxes"):
        cmd += ["--boxes", str(opts["boxes"])]
    if opts.get("image_format", "npy") != "npy":
        cmd += ["--image-format", str(opts["image_format"])]
    return shlex.join(cmd)


def subset_pack_command(manifest: dict, shard_dir, subset: str) -> str:
    """The `avs-dist pack` command for `subset` from the download `manifest` was packed from
    (its --data-root; an AVSBench-object root and an AVSS release root may differ: the
    command says which one it needs)."""
    import shlex

    root = str(manifest.get("options", {}).get("data_root", "DATA_ROOT"))
    cmd = ["avs-dist", "pack", "--data-root", root, "--subset", subset, "--out",
           f"{str(shard_dir).rstrip('/')}-{subset}"]
    if subset == "avss":
        cmd += ["--sets", "v1s,v1m,v2"]
    return shlex.join(cmd)


def check_shards_fit(cfg: Config, manifest: dict, frame_size: tuple[int, int] | None) -> None:
    """What the shards were packed with against what the config trains on; ConfigError otherwise.

    - subset: an S4 config on MS3 or AVSS shards (or any other pair) trains the wrong task;
      the error gives the `avs-dist pack` command for the config's subset;
    - crop size (when the crop branch is on): the loader would resize every crop at every step,
      after reading crops packed bigger (or smaller: blurred) than the model sees; the error
      gives the `avs-dist pack` command that fits, or the data.crop_size that fits the shards;
      AVSS shards pack no crops (no options.crop_size): the model cuts them at data.crop_size;
    - image size: frames smaller than data.image_size would be upsampled (blurred) at every
      step. Larger frames are fine: data.image_size is what they are resized to (the reference
      resizes AVSBench's 224 px frames the same way).
    The schema version is read_manifest's check. `frame_size` (h, w) of the stored frames, or
    None to skip that check."""
    shards = cfg.data.shards
    if manifest.get("subset") != cfg.subset:
        need = ("the AVSBench-semantic release (metadata.csv)" if cfg.subset == "avss"
                else "the AVSBench-object download (Single-source/, Multi-sources/)")
        raise ConfigError(f"{shards} holds {manifest.get('subset')} videos but the config trains subset={cfg.subset}: "
                          f"pack {cfg.subset} shards with `{subset_pack_command(manifest, shards, cfg.subset)}` "
                          f"(--data-root: {need}), or use a {manifest.get('subset')} preset")
    packed = manifest.get("options", {}).get("crop_size")
    if cfg.model.crop_branch and packed is not None and packed != cfg.data.crop_size:
        raise ConfigError(f"{shards} holds crops packed at {packed} px, the config's data.crop_size is "
                          f"{cfg.data.crop_size}: pack to fit with `{pack_command(manifest, shards, cfg.data.crop_size)}` "
                          f"(or set data.crop_size={packed})")
    if frame_size is not None and min(frame_size) < cfg.data.image_size:
        h, w = frame_size
        raise ConfigError(f"{shards} holds {h}x{w} px frames, smaller than data.image_size={cfg.data.image_size}: "
                          f"they would be upsampled; set data.image_size={min(h, w)} or pack larger frames")


def stored_frame_size(shard_dir, manifest: dict) -> tuple[int, int] | None:
    """(h, w) of the first train video's frames (one sample read), None without train videos."""
    from avs_dist.data.shards import decode_sample, iter_raw, split_shards

    for entry in split_shards(shard_dir, "train", manifest):
        if entry["keys"]:
            key = entry["keys"][0]
            frames = decode_sample(next(iter(iter_raw([entry["path"]], select=key.__eq__))))["frames"]
            return tuple(frames.shape[1:3])
    return None
