"""Checkpoint folders: integrity manifest, atomic replacement, keep-last-K, best, resume discovery."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from avs_dist.train import checkpoint as ckpt
from avs_dist.train.state import rng_state, set_rng_state


def _make(run_dir, step, payload=b"x", complete=True):
    """A checkpoint folder the way the trainer writes one: temp folder, files, COMPLETE.json, rename."""
    tmp = ckpt.temp_path(run_dir, ckpt.step_name(step))
    tmp.mkdir(parents=True)
    ckpt.write_model_folder(tmp, {"w": torch.tensor([float(step)])}, {"name": "t"}, step, 0, {"m": 1})
    (tmp / "ds").mkdir()
    (tmp / "ds" / "shard.bin").write_bytes(payload)
    if complete:
        ckpt.write_complete(tmp, {"step": step})
    final = ckpt.ckpt_root(run_dir) / ckpt.step_name(step)
    ckpt.finalize(tmp, final)
    return final


def test_complete_lists_every_file_recursively(tmp_path):
    folder = _make(tmp_path, 3)
    record = json.loads((folder / ckpt.COMPLETE).read_text())
    assert set(record["files"]) == {"model.pt", "ds/shard.bin"}
    assert record["step"] == 3
    assert ckpt.verify(folder) is None
    obj = ckpt.load_torch(folder / "model.pt")
    assert obj["step"] == 3 and obj["config"] == {"name": "t"} and obj["metrics"] == {"m": 1}
    assert torch.equal(obj["model"]["w"], torch.tensor([3.0]))


def test_verify_detects_corruption_and_missing_files(tmp_path):
    a = _make(tmp_path, 1)
    (a / "ds" / "shard.bin").write_bytes(b"y")
    assert "sha256 mismatch" in ckpt.verify(a)
    b = _make(tmp_path, 2)
    (b / "ds" / "shard.bin").unlink()
    assert "missing" in ckpt.verify(b)
    c = _make(tmp_path, 4, complete=False)
    assert "COMPLETE.json missing" in ckpt.verify(c)
    d = _make(tmp_path, 5)
    (d / ckpt.COMPLETE).write_text("{")
    assert "unreadable" in ckpt.verify(d)


def test_latest_valid_passes_over_corrupt_with_warning(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 4)
    bad = _make(tmp_path, 6)
    with open(bad / "model.pt", "r+b") as f:  # flip one byte
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    _make(tmp_path, 8, complete=False)  # a crash before COMPLETE.json
    warnings = []
    found = ckpt.latest_valid(tmp_path, warnings.append)
    assert found.name == "step_00000004"
    assert len(warnings) == 2
    assert "step_00000008" in warnings[0] and "COMPLETE.json missing" in warnings[0]
    assert "step_00000006" in warnings[1] and "sha256 mismatch" in warnings[1]


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "auto") is None  # fresh run
    a = _make(tmp_path, 2)
    assert ckpt.resolve_resume(tmp_path, "auto") == a
    assert ckpt.resolve_resume(tmp_path, "never") is None
    assert ckpt.resolve_resume(tmp_path, str(a)) == a
    assert ckpt.resolve_resume(tmp_path, str(a / "model.pt")) == a
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))
    (a / "ds" / "shard.bin").write_bytes(b"changed")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        ckpt.resolve_resume(tmp_path, str(a))


def test_prune_keeps_last_k_and_best(tmp_path):
    for s in (1, 2, 3, 4, 5):
        _make(tmp_path, s)
    ckpt.save_best(tmp_path, {"w": torch.zeros(1)}, {}, 1, 0, {"val": {"miou": 0.5}})
    gone = ckpt.prune(tmp_path, 2)
    assert [p.name for p in gone] == ["step_00000001", "step_00000002", "step_00000003"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    assert ckpt.verify(ckpt.ckpt_root(tmp_path) / "best") is None


def test_best_is_replaced_atomically(tmp_path):
    ckpt.save_best(tmp_path, {"w": torch.zeros(1)}, {}, 1, 0, {"val": {"miou": 0.1}})
    ckpt.save_best(tmp_path, {"w": torch.ones(1)}, {}, 7, 2, {"val": {"miou": 0.3}})
    best = ckpt.ckpt_root(tmp_path) / "best"
    obj = ckpt.load_torch(best / "model.pt")
    assert obj["step"] == 7 and obj["metrics"]["val"]["miou"] == 0.3
    assert torch.equal(obj["model"]["w"], torch.ones(1))
    assert [p.name for p in ckpt.ckpt_root(tmp_path).iterdir()] == ["best"]  # no temp folders left


def test_finalize_replaces_existing_and_remove_temps(tmp_path):
    _make(tmp_path, 3, payload=b"old")
    final = _make(tmp_path, 3, payload=b"new")  # e.g. a corrupt step_3 overwritten by a resumed run
    assert (final / "ds" / "shard.bin").read_bytes() == b"new"
    assert ckpt.verify(final) is None
    stale = ckpt.temp_path(tmp_path, ckpt.step_name(9))
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half")
    assert ckpt.remove_temps(tmp_path) == [stale]
    assert not stale.exists()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]


def test_rng_state_roundtrip():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
