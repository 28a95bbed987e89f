"""Small helpers several test files share: a random-init checkpoint folder, the frames of a
normalised batch back as uint8, and the clips each step of a run trained on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def write_random_checkpoint(folder: Path, preset: str = "tiny", overrides=(), seed: int = 0) -> Path:
    """A complete checkpoint folder (model.pt, COMPLETE.json; step 0) of `preset` with its seeded
    random init, as `eval` / `predict` read it."""
    from avs_dist.config import load_config, to_dict
    from avs_dist.models.system import build_model
    from avs_dist.train import checkpoint as ckpt

    torch.manual_seed(seed)
    cfg = load_config(preset, list(overrides))
    folder.mkdir(parents=True)
    ckpt.write_model_folder(folder, build_model(cfg.model, load_weights=False).state_dict(), to_dict(cfg), 0, 0, {})
    ckpt.write_complete(folder, {"step": 0, "epoch": 0})
    return folder


def uint8_frames(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised [...,3,H,W] -> uint8 [...,H,W,3] (asserting the values were whole)."""
    from avs_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    y = (x * std + mean) * 255.0
    assert (y - y.round()).abs().max() < 1e-3
    return y.round().to(torch.uint8).movedim(-3, -1).numpy()


def videos_per_step(run_dir) -> dict[int, list[str]]:
    """{step: sorted names of the videos / clips all ranks trained on} from run_dir/videos/rank*.jsonl
    (train.record_videos)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((Path(run_dir) / "videos").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["names"])
    return {k: sorted(v) for k, v in sorted(steps.items())}
