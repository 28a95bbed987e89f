"""A bad shard is found before any training process starts, by `train`, `eval` and `submit`:
present and of the manifest's size always; sha256 with --check-sha256. The file is named."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def truncated(s4_shards, tmp_path):
    """A copy of the shard set whose test shard lost its last 1000 bytes."""
    shards = tmp_path / "shards"
    shutil.copytree(s4_shards, shards)
    test = shards / "test-00000.tar"
    test.write_bytes(test.read_bytes()[:-1000])
    return shards, test


def _train(argv):
    from avs_dist.launch.local import main

    return main(argv)


def test_train_refuses_a_truncated_shard_before_starting(truncated, tmp_path, capsys):
    shards, bad = truncated
    run_dir = tmp_path / "run"
    rc = _train(["--config", "tiny", "--shards", str(shards), "--run-dir", str(run_dir), "--nproc", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{bad}: truncated" in err and "do not match manifest.json" in err
    assert not run_dir.exists()  # no process started, nothing written


def test_eval_refuses_a_truncated_shard(truncated, tmp_path, capsys):
    from avs_dist.evaluate import main

    shards, bad = truncated
    rc = main(["--checkpoint", str(tmp_path / "none"), "--shards", str(shards), "--split", "test"])
    assert rc == 2
    assert f"{bad}: truncated" in capsys.readouterr().err
    # the val split does not read the bad shard: its check passes (and the missing checkpoint is next)
    assert main(["--checkpoint", str(tmp_path / "none"), "--shards", str(shards), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: truncated" not in err and "none does not exist" in err


def test_submit_refuses_a_truncated_shard(truncated, tmp_path, capsys):
    from avs_dist.launch import submit

    shards, bad = truncated
    rc = submit.main(["--config", "tiny", "--shards", str(shards), "--run-dir", str(tmp_path / "run"),
                      "--nodes", "1", "--tasks-per-node", "2"])
    assert rc == 2
    assert f"{bad}: truncated" in capsys.readouterr().err


def test_sha256_check_at_start_is_a_flag(s4_shards, tmp_path, capsys):
    """Same size, one flipped byte: only --check-sha256 finds it before training."""
    shards = tmp_path / "shards"
    shutil.copytree(s4_shards, shards)
    val = shards / "val-00000.tar"
    data = bytearray(val.read_bytes())
    data[700] ^= 1
    val.write_bytes(bytes(data))
    base = ["--config", "tiny", "--shards", str(shards), "--run-dir", str(tmp_path / "run"), "--nproc", "2"]
    from avs_dist.data.shards import check_shards

    check_shards(shards)  # presence and size: fine
    assert _train([*base, "--check-sha256"]) == 2
    assert f"{val}: sha256" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shards_that_do_not_fit_the_config_are_refused_with_the_pack_command(s4_shards, synth_root, tmp_path,
                                                                               capsys):
    # The fixture packs crops at 32 px from 64 px frames, as `tiny` (crop 32, image 64) expects.
    import shlex

    from avs_dist.cli import main as cli
    from avs_dist.config import ConfigError, load_config
    from avs_dist.launch.args import check_run

    def refused(*overrides, config="tiny"):
        cfg = load_config(config, [*overrides, f'data.shards="{s4_shards}"'])
        with pytest.raises(ConfigError) as e:
            check_run(cfg, 1, False)
        return str(e.value)

    msg = refused("data.crop_size=16")
    assert "crops packed at 32 px, the config's data.crop_size is 16" in msg and "data.crop_size=32" in msg
    command = msg.split("`")[1]
    assert command.startswith("avs-dist pack ") and "--crop-size 16" in command
    assert "--subset ms3" in refused("subset=ms3", "loss.crop_ce=false")
    assert "set data.image_size=64" in refused("data.image_size=96")  # 64 px frames would be upsampled
    check_run(load_config("tiny", ["data.image_size=32", f'data.shards="{s4_shards}"']), 1, False)  # down: fine
    # no crop branch: the crops are never read, their size does not matter
    check_run(load_config("tiny", ["data.crop_size=16", "model.crop_branch=false", "loss.crop_ce=false",
                                   "loss.crop_pair=false", "loss.crop_audio=false", f'data.shards="{s4_shards}"']),
              1, False)

    # the command it gives packs shards that fit (into a folder of the test's own)
    argv = shlex.split(command)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "crop16")
    assert cli([*argv, "--workers", "1", "--no-progress"]) == 0
    check_run(load_config("tiny", ["data.crop_size=16", f'data.shards="{tmp_path / "crop16"}"']), 1, False)
    rc = cli(["train", "--config", "tiny", "--shards", str(s4_shards), "--run-dir", str(tmp_path / "run"),
              "data.crop_size=16"])
    assert rc == 2 and "avs-dist pack" in capsys.readouterr().err and not (tmp_path / "run").exists()
