"""`avs-dist bench train`: the rate arithmetic on a known metrics.jsonl, the synthetic batch,
bad command lines, and one end-to-end run of the tiny preset through the real trainer."""
import json

import pytest
import torch

from avs_dist.bench_train import _existing_frames, harness_rate, main, step_frames, synthetic_like


def _write_metrics(path, times):
    with open(path, "w") as f:
        for step, t in enumerate(times, start=1):
            f.write(json.dumps({"step": step, "epoch": 0, "total": 1.0, "frames_per_s": 10.0 * step,
                                "data_wait_frac": 0.1, "peak_mem_bytes": step, "time": t}) + "\n")


def test_harness_rate_uses_flush_boundaries(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # log_every 2: lines are flushed at steps 2, 4, 6 and 7 (the last); odd steps carry the
    # time of the next flush.
    _write_metrics(path, [2.0, 2.0, 4.0, 4.0, 7.0, 7.0, 8.0])
    r = harness_rate(path, frames_per_step=20, log_every=2, warmup=3)
    assert r["window_steps"] == [4, 7]  # first boundary at or after the warm-up
    assert r["wall_s"] == pytest.approx(4.0)
    assert r["frames_per_s"] == pytest.approx(20 * 3 / 4.0)
    assert r["step_frames_per_s_median"] == pytest.approx(60.0)  # steps 5, 6, 7
    assert r["peak_mem_bytes"] == 7
    with pytest.raises(RuntimeError, match="use more --steps"):
        harness_rate(path, frames_per_step=20, log_every=10, warmup=3)
    # steps of different frame counts (AVSS): lines 5, 6, 7 are global batches 4, 5, 6
    r = harness_rate(path, frames_per_step=lambda k: 10 * k, log_every=2, warmup=3)
    assert r["frames_per_s"] == pytest.approx((40 + 50 + 60) / 4.0) and r["frames_per_step"] == pytest.approx(50)


def test_avss_frames_are_those_that_exist(avss_shards):
    """bench train counts an AVSS step's frames as its clips' own (5 or 10), not G x 5, and
    not the padded frames."""
    from avs_dist.config import load_config
    from avs_dist.data.loader import TrainOrder, train_loader
    from avs_dist.data.shards import iter_videos

    lengths = {v["name"]: v["num_frames"] for v in iter_videos(avss_shards, "train")}
    for mode in ("bucket", "pad"):
        cfg = load_config("tiny_avss", [f"data.shards={json.dumps(str(avss_shards))}", f"data.avss_batching={mode}",
                                        "data.num_workers=0", "data.image_size=32"])
        frames = step_frames(cfg, 6)
        order = TrainOrder.from_shards(avss_shards, cfg.train.seed, 6, bucket=mode == "bucket")
        steps = order.steps_per_epoch + 2  # into the second epoch
        batches = list(train_loader(avss_shards, cfg.data, 0, 1, cfg.train.seed, global_batch=6, steps=steps))
        got = [frames(k) for k in range(steps)]
        assert got == [sum(lengths[n] for n in b["name"]) for b in batches] == [_existing_frames([b]) for b in batches]
        assert set(got) - {30}  # not G x 5
        if mode == "pad":
            assert any(b["frames"].shape[0] * b["frames"].shape[1] > f for b, f in zip(batches, got))  # padding left out


def test_synthetic_like_keeps_shapes_and_supervision():
    batch = {"frames": torch.zeros(2, 5, 3, 8, 8), "masks": torch.zeros(2, 5, 8, 8),
             "mask_valid": torch.tensor([[True, False, False, False, False]] * 2),
             "crops": torch.zeros(2, 5, 3, 4, 4), "audio": torch.zeros(2, 5, 1, 96, 64),
             "label": torch.tensor([3, 7]), "index": torch.tensor([0, 1]), "name": ["a", "b"]}
    out = synthetic_like(batch, torch.device("cpu"), num_classes=23)
    for key, value in batch.items():
        if torch.is_tensor(value):
            assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
    assert out["frames"].std() > 0.5 and out["audio"].std() > 0.5
    assert out["masks"][:, 0].sum() > 0 and out["masks"][:, 1:].sum() == 0  # only valid frames
    assert out["name"] == ["a", "b"] and 0 <= int(out["label"].min()) <= int(out["label"].max()) < 23


def test_bad_command_lines(tmp_path, capsys):
    assert main(["--config", "tiny", "--shards", str(tmp_path), "--steps", "1"]) == 2
    assert "--steps >= 2" in capsys.readouterr().err
    assert main(["--config", "tiny", "--shards", str(tmp_path / "none"), "--steps", "3", "--warmup", "1"]) == 2
    assert "manifest" in capsys.readouterr().err.lower()


@pytest.mark.slow
def test_bench_train_tiny_end_to_end(tmp_path, s4_shards):
    out, run_dir = tmp_path / "bench.json", tmp_path / "run"
    # Smallest run that still has a measured window: step 2, after the flush at step 1.
    rc = main(["--config", "tiny", "--shards", str(s4_shards), "--steps", "2", "--warmup", "1",
               "--run-dir", str(run_dir), "--out", str(out),
               "data.batch_videos=1", "train.log_every_steps=1", "train.image_every_steps=1"])
    assert rc == 0
    report = json.loads(out.read_text())
    for key in ("device", "torch", "date", "precision", "strategy"):
        assert report[key], key
    assert report["device"].startswith("cpu") and report["torch"] == torch.__version__
    syn, har = report["synthetic"], report["harness"]
    assert syn["steps"] == 1 and syn["frames_per_s"] > 0 and syn["batch_shapes"]["frames"] == [1, 5, 3, 64, 64]
    assert har["window_steps"] == [1, 2] and har["steps"] == 2 and har["frames_per_s"] > 0
    assert report["harness_over_synthetic"] == pytest.approx(har["frames_per_s"] / syn["frames_per_s"])
    assert report["frames_per_step"] == 5
    # The harness run is the real trainer with its logging: one line per step, a checkpoint, TB events.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "step_00000002" / "COMPLETE.json").is_file()
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
