"""Foreseeable bad inputs: one line `avs-dist <cmd>: error: ...` naming the file or setting and
the fix, exit status 2, no traceback, and (train) before any process starts."""

import torch

from avs_dist.cli import main


def _one_line(capsys, prefix):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def test_eval_and_predict_missing_checkpoint(s4_shards, tmp_path, capsys):
    assert main(["eval", "--checkpoint", "nope", "--shards", str(s4_shards), "--device", "cpu"]) == 2
    line = _one_line(capsys, "avs-dist eval: error: checkpoint nope does not exist")
    assert "run_dir/checkpoints/best" in line
    assert main(["predict", "--checkpoint", "nope", "--input", str(s4_shards), "--out", str(tmp_path)]) == 2
    _one_line(capsys, "avs-dist predict: error: checkpoint nope does not exist")
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty"), "--shards", str(s4_shards)]) == 2
    assert "no valid best/ or step_*/ checkpoint" in _one_line(capsys, "avs-dist eval: error:")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert main(["predict", "--checkpoint", str(junk), "--input", str(s4_shards), "--out", str(tmp_path)]) == 2
    assert "cannot be read as a torch checkpoint" in _one_line(capsys, f"avs-dist predict: error: {junk}")


def test_train_missing_weights_file_before_any_process(s4_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(run),
                 f"model.pretrained_backbone={tmp_path / 'r18.pth'}"]) == 2
    line = _one_line(capsys, "avs-dist train:")
    assert f"model.pretrained_backbone={tmp_path / 'r18.pth'}: no such file" in line
    assert not run.exists()  # nothing started


def _fake_checkpoint(run_dir, global_batch):
    from avs_dist.config import load_config, to_dict
    from avs_dist.train import checkpoint as ckpt

    folder = ckpt.ckpt_root(run_dir) / ckpt.step_name(2)
    folder.mkdir(parents=True)
    ckpt.write_model_folder(folder, {}, to_dict(load_config("tiny")), 2, 0, {})
    torch.save({"format": 2, "world_size": 2, "data": {"global_batch_videos": global_batch, "epoch": 0}},
               folder / "trainer.pt")
    ckpt.write_complete(folder, {"step": 2, "epoch": 0, "world_size": 2, "strategy": "ddp"})
    return folder


def test_resume_on_another_number_of_ranks_names_the_override(s4_shards, tmp_path, capsys):
    # tiny: 4 videos per rank; a checkpoint of 2 ranks holds a global batch of 8, this run has 1 rank
    run = tmp_path / "run"
    folder = _fake_checkpoint(run, 8)
    argv = ["train", "--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(run), "--nproc", "1"]
    assert main(argv) == 2
    line = _one_line(capsys, "avs-dist train:")
    assert str(folder) in line and "set data.global_batch_videos=8 to continue it" in line
    assert not (run / "status.json").exists() and not (run / "metrics.jsonl").exists()  # no rank ran
    from avs_dist.launch.args import check_resume
    from avs_dist.config import load_config

    check_resume(load_config("tiny", ["data.global_batch_videos=8"]), run, "auto", 1, {})  # the fix is accepted
    check_resume(load_config("tiny"), run, "never", 1, {})


def test_resume_folder_that_does_not_exist(s4_shards, tmp_path, capsys):
    assert main(["train", "--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(tmp_path / "r"),
                 "--resume", str(tmp_path / "gone")]) == 2
    assert "no such checkpoint folder" in _one_line(capsys, "avs-dist train: error: --resume")


def test_every_project_error_is_a_user_error():
    from avs_dist.config import ConfigError
    from avs_dist.data.audio import AudioError
    from avs_dist.data.boxes import BoxError
    from avs_dist.data.layout import LayoutError
    from avs_dist.data.pack import PackError
    from avs_dist.data.shards import ShardError
    from avs_dist.errors import UserError
    from avs_dist.models.weights import WeightsError
    from avs_dist.predict import PredictInputError

    for cls in (ConfigError, AudioError, BoxError, LayoutError, PackError, ShardError, WeightsError, PredictInputError):
        assert issubclass(cls, UserError), cls
