"""AVSS evaluation (avss/evaluation.py through evaluation.evaluate), `avs-dist eval` on an AVSS
checkpoint, and the TensorBoard strip of class logits."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch import nn

from avs_dist.avss.classes import AVSS_CLASSES, NUM_CLASSES
from avs_dist.avss.evaluation import ClipAudioBank
from helpers import write_random_checkpoint
from avs_dist.avss.metrics import SemanticEvaluator
from avs_dist.evaluation import evaluate, segment
from avs_dist.distributed import free_port

S = 8  # pixels per side


class AudioClasses(nn.Module):
    """Class logits from the audio: the frame's class is round(mean log-mel) mod 71 over the
    left half, background on the right; padded frames zeroed as the real model does. The
    frames only add noise, so the mismatched audio changes the prediction."""

    cfg = types.SimpleNamespace(mask_classes=NUM_CLASSES)

    def __init__(self):
        super().__init__()
        self.seen_frame_exists = []

    def forward(self, frames, audio, crops=None, frame_exists=None):
        b, t = frames.shape[:2]
        self.seen_frame_exists.append(frame_exists)
        cls = audio.reshape(b * t, -1).mean(1).round().long().clamp(0, NUM_CLASSES - 1)
        logits = torch.zeros(b * t, NUM_CLASSES, S, S)
        logits[torch.arange(b * t), cls, :, : S // 2] = 5.0
        logits[:, 0, :, S // 2:] = 5.0
        logits = logits + 0.1 * frames.flatten(0, 1)[:, :1]
        if frame_exists is not None:
            logits = logits * frame_exists.reshape(b * t, 1, 1, 1)
        return {"logits": logits}


def make_clips(n, seed=0):
    """n clips of 5 or 10 frames (alternating), each labelled with one or two classes from its
    audio (the log-mel's value is the class), some frames unlabelled."""
    g = torch.Generator().manual_seed(seed)
    clips = []
    for i in range(n):
        length = 10 if i % 2 == 0 else 5
        cls = 1 + (i * 7) % 70
        audio = torch.zeros(length, 1, 96, 64) + cls
        masks = torch.zeros(length, S, S, dtype=torch.int64)
        masks[:, :, : S // 2] = cls
        masks[:, : S // 4, S // 2:] = torch.randint(0, NUM_CLASSES, (1,), generator=g)  # a second class
        valid = torch.ones(length, dtype=torch.bool)
        valid[1] = i % 3 != 0  # some frames without a label
        clips.append({"frames": torch.randn(length, 3, S, S, generator=g), "audio": audio, "masks": masks,
                      "mask_valid": valid, "index": i, "name": f"c{i}"})
    return clips


def collate(clips, pad_to=None):
    """A batch of the loader's AVSS contract (architecture.md), padded to `pad_to` or the longest clip."""
    t = pad_to or max(c["frames"].shape[0] for c in clips)
    b, s = len(clips), clips[0]["frames"].shape[-1]
    out = {"frames": torch.zeros(b, t, 3, s, s), "audio": torch.zeros(b, t, 1, 96, 64),
           "masks": torch.zeros(b, t, s, s, dtype=torch.int64), "mask_valid": torch.zeros(b, t, dtype=torch.bool),
           "frame_exists": torch.zeros(b, t, dtype=torch.bool),
           "index": torch.tensor([c["index"] for c in clips]), "name": [c["name"] for c in clips],
           "hflip": torch.zeros(b, dtype=torch.bool), "crops": None}
    for k, c in enumerate(clips):
        n = c["frames"].shape[0]
        for key in ("frames", "audio", "masks", "mask_valid"):
            out[key][k, :n] = c[key]
        out["frame_exists"][k, :n] = True
    return out


def batches_of(clips, size, pad_to=None):
    return [collate(clips[i:i + size], pad_to) for i in range(0, len(clips), size)]


def oracle(model, batches):
    ev = SemanticEvaluator()
    for b in batches:
        logits = model(b["frames"], b["audio"], frame_exists=b["frame_exists"])["logits"]
        ev.update(logits, b["masks"].flatten(0, 1), b["frame_exists"].flatten(), b["mask_valid"].flatten())
    return ev.result(class_names=list(AVSS_CLASSES))


def test_evaluate_equals_semantic_evaluator_and_passes_frame_exists():
    model = AudioClasses()
    clips = make_clips(7)
    batches = batches_of(clips, 3, pad_to=10)
    res = evaluate(model, batches, "cpu", per_class=True)
    want = oracle(AudioClasses(), batches)
    for key, value in want.items():
        assert res[key] == value, key
    assert res["miou"] == want["miou_frame_all71"] and res["f"] == want["f_frame_all71"]
    assert list(res)[:7] == ["miou_avsbench", "f_avsbench", "miou", "f", "audio_gap", "miou_mismatched",
                             "f_mismatched"]
    assert res["videos"] == 7 and res["frames"] == want["frames_scored"] > 0
    assert res["frames_padded"] == 3 * 5  # three 5-frame clips padded to 10
    # the model got each batch's frame_exists (both passes)
    assert all(fe is not None and fe.shape[1] == 10 for fe in model.seen_frame_exists)
    assert len(model.seen_frame_exists) == 2 * len(batches)
    assert [e["name"] for e in res["per_class"]] == list(AVSS_CLASSES)
    # the audio decides the class: another clip's audio of other classes loses the objects
    assert res["audio_gap"] > 0.05 and res["miou_mismatched"] < res["miou"]
    gaps = res["audio_gap_per_class"]
    assert gaps and "background" not in gaps and all(n in AVSS_CLASSES for n in gaps)
    assert max(gaps.values()) > 0.5
    # without per_class: no per-class list (validation's result)
    short = evaluate(AudioClasses(), batches, "cpu", audio_gap=False)
    assert "per_class" not in short and "audio_gap" not in short and short["miou"] == res["miou"]


def test_batching_and_padding_do_not_change_a_figure():
    clips = make_clips(6, seed=3)
    a = evaluate(AudioClasses(), batches_of(clips, 4, pad_to=10), "cpu")
    b = evaluate(AudioClasses(), batches_of(clips, 1), "cpu")  # each clip at its own length (bucketed)
    assert a == b


def test_a_padded_frame_never_changes_a_correct_figure():
    """Whatever the model outputs on a padded frame, and whatever lies in the padded label,
    the correct figures stay; only the reference's (which scores padded frames) may move."""
    clips = make_clips(4, seed=5)
    batches = batches_of(clips, 4, pad_to=10)
    clean = evaluate(AudioClasses(), batches, "cpu", audio_gap=False)

    class Garbage(AudioClasses):
        def forward(self, frames, audio, crops=None, frame_exists=None):
            out = super().forward(frames, audio, crops, None)["logits"]
            pad = ~frame_exists.reshape(-1)
            out[pad] = torch.randn(int(pad.sum()), NUM_CLASSES, S, S)  # not zeroed
            return {"logits": out}

    dirty = [dict(b) for b in batches]
    for b in dirty:
        b["masks"] = b["masks"].clone()
        b["masks"][~b["frame_exists"]] = 17  # junk labels under padded frames
    res = evaluate(Garbage(), dirty, "cpu", audio_gap=False)
    correct = [k for k in clean if k.startswith(("miou_frame", "f_frame", "miou_dataset", "f_dataset", "iou_", "f_"))
               and not k.endswith("avsbench")]
    assert len(correct) >= 16
    for k in correct + ["miou", "f", "frames_scored", "frames_padded"]:
        assert res[k] == clean[k], k


def test_a_clip_evaluated_twice_is_refused():
    clips = make_clips(3)
    with pytest.raises(ValueError, match="more than once"):
        evaluate(AudioClasses(), batches_of(clips + clips[:1], 2, pad_to=10), "cpu", audio_gap=False)


def test_partners_have_the_same_length_and_other_classes():
    clips = make_clips(8)
    bank = ClipAudioBank(per_length=8)
    for b in batches_of(clips, 3, pad_to=10):
        bank.add(b)
    assert bank.freeze() == 8
    for c in clips:
        n, cls = c["frames"].shape[0], int(c["masks"][0, 0, 0])
        index, audio = bank.partner(n, c["index"], frozenset({cls}))
        assert index != c["index"] and audio.shape[0] == n
        assert int(audio.mean().round()) != cls  # the partner's class (its audio) is another
    one = ClipAudioBank()
    one.add(collate(clips[:1]))
    one.freeze()
    with pytest.raises(ValueError, match="two clips"):
        one.partner(10, 0, frozenset())


def test_segment_passes_frame_exists_to_the_real_model():
    from avs_dist.config import load_config
    from avs_dist.models.system import build_model

    cfg = load_config("tiny_avss", ["data.image_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model, load_weights=False).eval()
    b = collate([{**c, "frames": torch.randn(c["frames"].shape[0], 3, 32, 32),
                  "masks": torch.zeros(c["frames"].shape[0], 32, 32, dtype=torch.int64)} for c in make_clips(2)])
    with torch.no_grad():
        logits = segment(model, b["frames"], b["audio"], b["frame_exists"])
    assert logits.shape == (20, NUM_CLASSES, 32, 32) and logits.dtype == torch.float32
    pad = ~b["frame_exists"].reshape(-1)
    assert int(pad.sum()) == 5 and bool((logits[pad] == 0).all()) and bool((logits[~pad] != 0).any())


# ---- two processes over gloo ----

def _eval_worker(rank, world, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = [c for c in make_clips(7) if c["index"] % world == rank]  # interleaved, like a sharded loader
        res = evaluate(AudioClasses(), batches_of(mine, 2 + rank), "cpu", per_class=True)  # each rank its own batching
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from avs_dist.distributed import hard_exit  # gloo can abort at shutdown (platform notes)
    hard_exit(0)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_eval_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = evaluate(AudioClasses(), batches_of(make_clips(7), 3, pad_to=10), "cpu", per_class=True)
    assert expected["audio_gap"] > 0
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected


# ---- `avs-dist eval` on an AVSS checkpoint (the loader's AVSS batches are stood in for) ----

PACKED = 32


def _clip_batches(shard_dir, split):
    """The clips of `split` as loader batches of the contract, from iter_videos (one clip each)."""
    from avs_dist.data.shards import iter_videos
    from avs_dist.data.transforms import normalize_uint8

    out = []
    for v in iter_videos(shard_dir, split, crops=False):
        n = int(v["num_frames"])
        masks = torch.zeros(n, PACKED, PACKED, dtype=torch.int64)
        valid = torch.zeros(n, dtype=torch.bool)
        masks[torch.as_tensor(v["mask_frames"])] = torch.as_tensor(v["masks"]).long()
        valid[torch.as_tensor(v["mask_frames"])] = True
        frames = normalize_uint8(torch.as_tensor(v["frames"]).permute(0, 3, 1, 2))
        out.append(collate([{"frames": frames, "audio": torch.as_tensor(v["audio"]).unsqueeze(1), "masks": masks,
                             "mask_valid": valid, "index": v["index"], "name": v["name"]}], pad_to=10))
    return out


def test_eval_cli_on_an_avss_checkpoint(avss_shards, tmp_path, capsys):
    """The real eval loader (bucketed AVSS batches, 5 and 10 frames) under `avs-dist eval`."""
    from avs_dist.evaluate import main

    folder = write_random_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000000", "tiny_avss",
                                     [f"data.image_size={PACKED}", f"data.shards={avss_shards}"])
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(folder), "--shards", str(avss_shards), "--split", "test", "--out", str(out),
                 "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    for key in ("miou_avsbench", "f_avsbench", "miou", "f", "miou_frame_all71", "miou_frame_objects",
                "miou_dataset_objects", "iou_frame_background", "audio_gap", "videos", "frames", "checkpoint"):
        assert key in res, key
    assert res["miou"] == res["miou_frame_all71"] and res["videos"] == len(_clip_batches(avss_shards, "test"))
    assert res["frames_avsbench"] == 10 * res["videos"]
    names = [e["name"] for e in res["per_class"]]
    assert names == list(AVSS_CLASSES) and len(res["per_class"]) == NUM_CLASSES
    assert all(set(e) >= {"iou_frame", "iou_avsbench", "frames_gt"} for e in res["per_class"])
    printed = capsys.readouterr().out
    assert "iou_frame" in printed and "miou_frame_objects" in printed and "background" in printed
    assert "not in any scored frame" in printed
    present = [e["name"] for e in res["per_class"] if e["present"] and e["index"]]
    assert present and all(n in printed for n in present)
    if res["audio_gap_per_class"]:  # drawn beside the JSON
        assert set(res["audio_gap_per_class"]) <= set(present)
        assert (tmp_path / "eval_audio_gap.png").stat().st_size > 1000
    # predict writes S4 / MS3 sounding-object masks: an AVSS checkpoint is refused in one line
    from avs_dist.cli import main as cli

    assert cli(["predict", "--checkpoint", str(folder), "--input", str(tmp_path), "--out", str(tmp_path / "p"),
                "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "71-class AVSBench-semantic model" in err and "avs-dist eval" in err and "Traceback" not in err


def test_manifest_classes_of_the_wrong_length_are_refused(avss_shards, tmp_path, monkeypatch):
    import shutil

    from avs_dist.config import load_config
    from avs_dist.errors import BadFileError
    from avs_dist.evaluation import evaluate_loaded
    from avs_dist.models.system import build_model

    bad = tmp_path / "shards"
    shutil.copytree(avss_shards, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:70]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("avs_dist.data.loader.eval_loader", lambda *a, **k: [])
    cfg = load_config("tiny_avss", [f"data.image_size={PACKED}"])
    with pytest.raises(BadFileError, match="'classes' has 70 names.*re-pack"):
        evaluate_loaded(build_model(cfg.model, load_weights=False), cfg, {}, bad, "test", "cpu")


# ---- TensorBoard strip of class logits ----

def test_tensorboard_strip_of_class_logits(tmp_path):
    """An AVSS step's images (the path that used to crash on 71 channels): the strip is written,
    read back as a PNG of three >= 160 px panels per labelled frame, each class labelled or
    predicted shown in its palette colour (the outline's exact colour), the rows taken across
    the clips."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator as ea

    from avs_dist.avss.classes import index_to_colour
    from avs_dist.train.logger import RunLogger

    clips = make_clips(2)
    batch = collate(clips, pad_to=10)
    batch["frames"] = torch.zeros_like(batch["frames"])  # grey frames: only the overlays have colour
    logits = AudioClasses()(batch["frames"], batch["audio"], frame_exists=batch["frame_exists"])["logits"]
    logits[:, 45, :2, :2] = 50.0  # a predicted class that is in no label ("mower")
    out = types.SimpleNamespace(batch=batch, out={"logits": logits})
    logger = RunLogger(tmp_path, {"train": {"image_every_steps": 1}}, rank=0, total_steps=1, steps_per_epoch=1,
                       tty=False)
    logger._images_of(1, out)
    logger.close()
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE)
    acc.Reload()
    (image,) = acc.Images("images/frame_gt_pred")
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    rows = min(int(batch["mask_valid"].sum()), 8)
    assert pixels.shape[1] >= 3 * 160 and pixels.shape[0] >= rows * 160
    colours = {tuple(c) for c in pixels.reshape(-1, 3).tolist()}
    # the rows go frame by frame across the clips: both clips' classes (1 and 8) are on the strip
    by_frame = batch["masks"].transpose(0, 1)[batch["mask_valid"].t()][:rows]
    shown = {int(c) for c in by_frame.unique() if c} | {45}
    assert {1, 8} <= shown
    for c in shown:
        assert tuple(int(v) for v in index_to_colour(c)) in colours, c
    Image.fromarray(pixels).save(tmp_path / "strip.png")  # to look at when it fails


# ---- an AVSS result in the training's terminal line, run summary and RESULTS.md ----

def test_an_avss_result_in_the_eval_line_summary_and_results_file(tmp_path, capsys):
    """The ~40 figures of an AVSS evaluation: the terminal line shows the headline ones by name
    (no counts, no per-class entries); eval.jsonl keeps them all; the counts are no figures of
    the model (HParams); the summary and RESULTS.md give the test figures with their weights."""
    from avs_dist.config import load_config, to_dict
    from avs_dist.provenance import final_source
    from avs_dist.train.logger import RunLogger
    from avs_dist.train.results import results_text
    from avs_dist.train.summary import final_numbers, summary_rows

    res = evaluate(AudioClasses(), batches_of(make_clips(6), 3, pad_to=10), "cpu", per_class=True)
    logger = RunLogger(tmp_path, to_dict(load_config("tiny_avss")), rank=0, total_steps=3, steps_per_epoch=3,
                       tty=False)
    logger.log_eval(3, res, "val")
    logger.log_eval(3, res, "test", source=final_source(3, 0))
    logger.close()
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("eval ")]
    assert len(lines) == 2 and lines[1].startswith("eval test of the last model (step 3, end of training): ")
    for line in lines:
        shown = line.split(": ", 1)[1].split()
        names = shown[0::2]
        assert names[:7] == ["miou_avsbench", "f_avsbench", "miou", "f", "audio_gap", "miou_mismatched",
                             "f_mismatched"], line
        assert {"miou_frame_objects", "miou_dataset_objects", "iou_frame_background"} <= set(names)
        assert len(names) <= 10 and len(line) < 300, line
        assert not any(n.startswith(("frames", "classes_", "objects_", "per_class", "audio_gap_per")) for n in names)
    logged = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    assert logged["frames_avsbench"] == res["frames_avsbench"] and len(logged["per_class"]) == NUM_CLASSES

    final = {"status": "completed", "step": 3, "epoch": 0, "total_steps": 3, "world_size": 1, "best_val_miou":
             res["miou"], "best_val_step": 3, "val": res, "test": res, "test_source": final_source(3, 0)}
    numbers = final_numbers(json.loads(json.dumps(final)))
    assert "test/miou_frame_objects" in numbers and "test/audio_gap" in numbers
    assert not any(k.split("/")[-1] in ("frames_scored", "frames_padded", "frames_unlabelled", "frames_avsbench",
                                        "classes_present", "objects_present", "videos") for k in numbers)
    rows = dict(summary_rows(final, {"wall_s": 1.0, "peak_mem": 0}, 3, 3, tmp_path))
    test_row = rows["test (last, step 3)"]
    assert f"miou_avsbench {res['miou_avsbench']:.4f}" in test_row
    assert f"miou_frame_objects {res['miou_frame_objects']:.4f}" in test_row
    assert rows["eval sets"] == f"val 6 videos ({res['frames']} frames), test 6 videos ({res['frames']} frames)"

    (tmp_path / "config.json").write_text(json.dumps(to_dict(load_config("tiny_avss"))))
    (tmp_path / "status.json").write_text(json.dumps({"status": "completed", "step": 3, "total_steps": 3}))
    (tmp_path / "final_metrics.json").write_text(json.dumps(final))
    text = results_text(tmp_path)
    assert "(avss)" in text
    assert (f"**Test**, last model (step 3, end of training): miou_avsbench {res['miou_avsbench']:.4f}, "
            f"f_avsbench {res['f_avsbench']:.4f}, miou {res['miou']:.4f}") in text
    assert f"miou_frame_objects {res['miou_frame_objects']:.4f}" in text
