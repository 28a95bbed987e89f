"""A checkpoint that cannot be written says which file, why (a full disk: how much was needed
and how much is free) and which checkpoint the run can resume from, on every rank at once; and
what a ZeRO checkpoint's model-states file holds.

The full disk is simulated in-process (a write that raises ENOSPC, as the OS does), not made:
the real disk is shared."""
from __future__ import annotations

import errno
import os
import socket
import sys

import pytest
import torch
import torch.nn as nn

from avs_dist import fileio
from avs_dist.train import checkpoint as ckpt


def _full_disk(monkeypatch, after_bytes: int = 100):
    """Every file opened for writing takes `after_bytes`, then fails with ENOSPC."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.left = f, after_bytes

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if "w" in mode and "b" in mode else f

    monkeypatch.setattr("builtins.open", fake_open)


def test_save_torch_on_a_full_disk_names_the_file_and_the_sizes(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    target = tmp_path / "model.pt"
    with pytest.raises(ckpt.WriteError) as info:
        ckpt.save_torch({"w": torch.zeros(250_000)}, target)  # 1 MB of tensors
    msg = str(info.value)
    assert msg.startswith(f"writing {target} failed: no space left on device (it needs ~1.0 MB, ")
    assert msg.endswith(" free without it)")
    assert "unexpected pos" not in msg and "\n" not in msg
    assert not target.exists()  # the partial file is gone


def test_the_cpp_writers_iostream_error_is_told_as_no_space_when_it_is(tmp_path):
    """torch.save(obj, path) writes in C++ and says `basic_ios::clear: iostream error`."""
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    err.__context__ = RuntimeError("basic_ios::clear: iostream error")
    free = fileio.free_bytes(tmp_path)
    msg = fileio.describe_write_failure(tmp_path / "x.pt", err, need=free + 10**9)
    assert msg.startswith(f"writing {tmp_path / 'x.pt'} failed: no space left on device (it needs ~")
    msg = fileio.describe_write_failure(tmp_path / "x.pt", err, need=10)  # not a space problem: said as it is
    assert "unexpected pos 704" in msg


def test_shard_writer_leaves_the_weights_to_model_pt(tmp_path):
    """ZeRO's model-states file keeps the buffers (and DeepSpeed's metadata), not the parameters."""
    from avs_dist.train.strategy import _ShardWriter

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    writer = _ShardWriter(inner=None, param_names={n for n, _ in model.named_parameters()})
    path = tmp_path / "mp_rank_00_model_states.pt"
    writer.save({"module": model.state_dict(), "param_shapes": [{"0.weight": (4, 3, 1, 1)}]}, str(path))
    saved = torch.load(path, weights_only=False)
    assert set(saved["module"]) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert saved["param_shapes"] == [{"0.weight": (4, 3, 1, 1)}]
    writer.save({"optimizer_state_dict": {"x": torch.ones(3)}}, str(tmp_path / "optim_states.pt"))
    assert torch.equal(torch.load(tmp_path / "optim_states.pt")["optimizer_state_dict"]["x"], torch.ones(3))
    assert writer.failure is None
    # a failed write is kept, not raised: DeepSpeed's save ends in a barrier every rank must reach
    writer.save({"x": torch.ones(3)}, str(tmp_path / "no-such-folder" / "optim_states.pt"))
    assert isinstance(writer.failure, ckpt.WriteError) and "no-such-folder/optim_states.pt failed" in str(writer.failure)


def test_launcher_names_the_checkpoint_to_resume_from_or_that_there_is_none(tmp_path, capsys):
    from avs_dist.launch.local import _outcome

    assert _outcome(1, tmp_path) == 1
    err = capsys.readouterr().err
    assert "keeps its last checkpoint" not in err
    assert f"{tmp_path} has no checkpoint to resume from" in err
    folder = ckpt.ckpt_root(tmp_path) / "step_00000004"
    folder.mkdir(parents=True)
    ckpt.write_model_folder(folder, {"w": torch.zeros(1)}, {}, 4, 0)
    ckpt.write_complete(folder, {"step": 4})
    assert _outcome(1, tmp_path) == 1
    assert f"the run can resume from {folder} (step 4)" in capsys.readouterr().err


class _Strategy:
    """What Checkpointer.save needs of a strategy; rank `fail_rank`'s shard write hits a full disk."""

    def __init__(self, rank, fail_rank):
        self.module, self.rank, self.fail_rank = nn.Linear(2, 2), rank, fail_rank

    def model_state_dict(self):
        return self.module.state_dict() if self.rank == 0 else None

    def state_dict(self):
        return {}

    def save_shards(self, folder):
        ckpt.save_torch({"shard": torch.zeros(1000)}, folder / f"shard{self.rank}.pt")


def _save_worker(rank, world, port, run_dir, fail_rank, out):
    import torch.distributed as dist

    from avs_dist import distributed
    from avs_dist.config import load_config
    from avs_dist.train.state import RankState, TrainState

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = distributed.Dist(rank, world, rank, torch.device("cpu"), "gloo", dist.group.WORLD)
        strategy = _Strategy(rank, fail_rank)
        log = type("Log", (), {"info": staticmethod(print)})()
        saver = ckpt.Checkpointer(run_dir, d, load_config("tiny"), strategy, {"train": TrainState()},
                                  RankState(strategy.module, rank, 0), log)
        saver.save(2, 0, {})  # a checkpoint the run can come back to
        if rank == fail_rank:
            import builtins

            real_open = builtins.open

            def full(path, mode="r", *a, **k):
                if "w" in mode and str(path).endswith(f"shard{rank}.pt"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                return real_open(path, mode, *a, **k)

            builtins.open = full
        try:
            saver.save(4, 0, {})
            result = "saved"
        except ckpt.CheckpointSaveError as e:
            result = str(e)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_failed_shard_write_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    """Rank 1's file cannot be written: both ranks raise the same one-line error (none waits
    in a collective), the temp folder is gone, and the error names the last good checkpoint."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    mp.start_processes(_save_worker, args=(2, port, str(run_dir), 1, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1], messages
    msg = messages[0]
    assert msg.startswith("checkpoint step_00000004 not saved: rank 1: writing ")
    assert "shard1.pt failed: no space left on device (it needs ~4.0 kB, " in msg
    assert " free without it) (with the partial checkpoint removed, " in msg and ", and step_00000002 took " in msg
    assert msg.endswith(f"the run can resume from {ckpt.ckpt_root(run_dir) / 'step_00000002'} (step 2): "
                        "the same command resumes it")
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    assert not ckpt.temp_path(run_dir, "step_00000004").exists()
    assert "\n" not in msg


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
