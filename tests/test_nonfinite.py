"""Non-finite training: steps with a NaN/inf gradient are skipped and counted, past
train.max_nonfinite_steps the run fails naming the step, the term and the checkpoint to resume
from; a non-finite model is never saved, resumed (`--resume auto` passes it by name) or evaluated."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from procs import run_session
from avs_dist.train import checkpoint as ckpt


def _tiny_state() -> dict:
    from avs_dist.config import load_config
    from avs_dist.models import build_model

    torch.manual_seed(0)
    return build_model(load_config("tiny").model).state_dict()


def _checkpoint(run_dir, step: int, state: dict):
    """A valid checkpoint folder (model.pt + COMPLETE.json) holding `state`."""
    from avs_dist.config import load_config, to_dict

    folder = ckpt.ckpt_root(run_dir) / ckpt.step_name(step)
    folder.mkdir(parents=True)
    ckpt.write_model_folder(folder, state, to_dict(load_config("tiny")), step, 0)
    ckpt.write_complete(folder, {"step": step, "epoch": 0, "world_size": 1, "strategy": "ddp"})
    return folder


@pytest.fixture(scope="module")
def states():
    good = _tiny_state()
    bad = {k: v.clone() for k, v in good.items()}
    bad["avs.resnet.conv1.weight"].view(-1)[0] = float("nan")
    return good, bad


def test_resume_auto_passes_over_a_nonfinite_checkpoint_by_name(tmp_path, states):
    good, bad = states
    first = _checkpoint(tmp_path, 4, good)
    nan = _checkpoint(tmp_path, 8, bad)
    warnings = []
    assert ckpt.resolve_resume(tmp_path, "auto", warnings.append) == first
    assert warnings == [f"skipping checkpoint {nan}: model.pt: 1 of {len(bad)} tensors hold NaN/inf "
                        "(first: avs.resnet.conv1.weight)"]
    with pytest.raises(ValueError, match=f"--resume {nan}: model.pt: 1 of {len(bad)} tensors hold NaN/inf"):
        ckpt.resolve_resume(tmp_path, str(nan))


def test_eval_refuses_a_nonfinite_checkpoint(tmp_path, states):
    from avs_dist.evaluation import load_for_inference

    nan = _checkpoint(tmp_path, 8, states[1])
    with pytest.raises(ValueError) as e:
        load_for_inference(nan)
    assert str(e.value) == (f"{nan / 'model.pt'}: 1 of {len(states[1])} tensors hold NaN/inf (first: "
                            "avs.resnet.conv1.weight); a non-finite model cannot be evaluated "
                            "(take an earlier checkpoint)")


def test_eval_cli_one_line(tmp_path, states, s4_shards):
    nan = _checkpoint(tmp_path, 8, states[1])
    rc, out = run_session([sys.executable, "-m", "avs_dist.cli", "eval", "--checkpoint", str(nan), "--shards",
                           str(s4_shards)], 300)
    assert rc != 0 and "Traceback" not in out, out
    assert "tensors hold NaN/inf (first: avs.resnet.conv1.weight)" in out


@pytest.mark.slow
def test_nan_init_stops_past_the_limit_without_a_checkpoint(s4_shards, tmp_path, states):
    """The reported case: model.init_from with one NaN trained on, saved NaN checkpoints at steps 4
    and 8 and best/, and exited 0 "completed". Now: steps 1-2 skipped, the run fails at step 2
    (2 ranks under torchrun, the same global batch of 2 videos)."""
    init = tmp_path / "nan_state.pt"
    torch.save(states[1], init)
    run_dir = tmp_path / "run"
    rc, out = run_session([sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards",
                           str(s4_shards), "--run-dir", str(run_dir), "--nproc", "2", "data.batch_videos=1",
                           "data.num_workers=0",
                           "train.max_steps=8", "train.ckpt_every_steps=4", "train.eval_every_steps=2",
                           "train.eval_every_epochs=0", "train.image_every_steps=0", "train.audio_gap_eval=false",
                           "train.max_nonfinite_steps=1", f"model.init_from={init}"], 600)
    assert rc == 1, out
    reason = ("step 2: non-finite loss total=nan, bce=nan; 2 steps in a row skipped, more than "
              f"train.max_nonfinite_steps=1: the run stops. {run_dir} has no checkpoint to resume from (the same "
              "command starts the run over); were the starting weights (model.init_from) finite?")
    assert f"error: {reason}" in out and "Traceback" not in out
    # under torchrun: its ChildFailedError traceback is one line (launch/torchrun.py), then the outcome
    assert re.search(r"torchrun: rank [01] ended with exit code 1 \(its own output above says why\)", out), out
    assert "ChildFailedError" not in out and "avs-dist train: the run failed" in out
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["status"], status["reason"], status["step"]) == ("failed", reason, 2)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["nonfinite_steps"], r["total"]) for r in lines] == [
        (1, "nonfinite", 1, None), (2, "nonfinite", 2, None)]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


class _SkippingStrategy:
    """The strategy interface train_step uses, around one BatchNorm; skips like DDPStrategy does
    when the gradient norm is not finite."""

    def __init__(self):
        import contextlib

        self.module = torch.nn.Sequential(torch.nn.BatchNorm1d(3))
        self.skipped = None
        self.autocast = contextlib.nullcontext

    def forward(self, batch, sync_grads):
        return self.module(batch["x"])

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.module.parameters()]))
        self.skipped = None if torch.isfinite(norm) else "nonfinite"
        for p in self.module.parameters():
            p.grad = None
        return norm, 0.1


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(monkeypatch):
    from avs_dist.train import step as step_mod

    monkeypatch.setattr(step_mod, "compute_losses", lambda out, batch, cfg: (out.sum(), {"bce": out.sum()}))
    s = _SkippingStrategy()
    bn = s.module[0]
    step_mod.train_step(s, [{"x": torch.randn(8, 3)}], None)  # a finite step moves the statistics
    assert s.skipped is None and not torch.equal(bn.running_mean, torch.zeros(3))
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    out = step_mod.train_step(s, [{"x": x}], None)
    assert out.skipped == "nonfinite"
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
