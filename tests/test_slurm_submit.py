"""avs_dist/launch/submit.py and avs_dist/launch/slurm.py without a cluster: flags -> sbatch, sweeps, rendezvous."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from avs_dist.config import ConfigError
from avs_dist.launch import submit
from avs_dist.launch.slurm import TrainJob, master_port, rendezvous_env


def test_dry_run_renders_the_sbatch_script(tmp_path, capsys):
    rc = submit.main(["--config", "tiny", "--shards", str(tmp_path / "shards"), "--run-dir", str(tmp_path / "run"),
                      "train.max_steps=5", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8",
                      "--mem-gb", "64", "--partition", "gpu", "--account", "proj", "--qos", "high",
                      "--constraint", "h100", "--time", "90", "--signal-delay", "300",
                      "--sbatch-extra", "exclusive", "--sbatch-extra", "mail-type=END", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100",
                 "#SBATCH --time=90", "#SBATCH --signal=USR2@300", "#SBATCH --exclusive",
                 "#SBATCH --mail-type=END", "#SBATCH --requeue", "#SBATCH --job-name=avs-tiny"]:
        assert line in out, line
    assert "srun" in out and "submitit.core._submit" in out
    assert f"run dir {tmp_path / 'run'}" in out and "train.max_steps=5" in out
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_dry_run_array_is_one_job_array_with_one_run_dir_per_spec(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# learning rates\noptim.lr=1e-4 train.seed=1\n\noptim.lr=3e-4  # the default-ish\n")
    rc = submit.main(["--config", "tiny", "--shards", "s", "--run-dir", str(tmp_path / "sw"), "train.max_steps=5",
                      "--array", "optim.lr=1e-3", f"@{sweep}", "--array-parallelism", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --array=0-2%2" in out
    assert f"run dir {tmp_path / 'sw' / '0_optim.lr=1e-3'}" in out
    assert f"run dir {tmp_path / 'sw' / '1_optim.lr=1e-4_train.seed=1'}" in out
    assert f"run dir {tmp_path / 'sw' / '2_optim.lr=3e-4'}" in out


@pytest.mark.parametrize("bad, message", [
    (["optim.lr=7"], "optim.lr must be in (0, 1)"),
    (["--array", "optim.lr=1e-4", "optim.nope=1"], "unknown config key 'optim.nope'"),
    (["--array", "optim.lr"], "not key=value"),
    (["--array", "@/nonexistent/sweep.txt"], "not found"),
    (["--time", "0"], "--time must be positive"),
])
def test_bad_input_fails_before_submitting(tmp_path, capsys, bad, message):
    rc = submit.main(["--config", "tiny", "--shards", "s", "--run-dir", str(tmp_path / "r"), *bad, "--dry-run"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_shards_is_a_clear_error(tmp_path, capsys):
    rc = submit.main(["--config", "tiny", "--shards", str(tmp_path / "none"), "--run-dir", str(tmp_path / "r")])
    assert rc == 2
    assert "manifest.json" in capsys.readouterr().err


def test_array_specs_and_dir_names(tmp_path):
    assert submit.read_array_specs(["a.b=1 c.d='x y'"]) == [["a.b=1", "c.d=x y"]]
    with pytest.raises(ConfigError):
        submit.read_array_specs([])
    assert submit.sweep_dir_name(3, ["model.tpavi_stages=[0,1]", "optim.lr=1e-4"], 2) == \
        "03_model.tpavi_stages=_0_1_optim.lr=1e-4"
    assert submit.sbatch_extra(["exclusive", "--mail-type=END"]) == {"requeue": True, "exclusive": True,
                                                                      "mail_type": "END"}


def test_rendezvous_env_from_job_environment(monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    env = SimpleNamespace(global_rank=5, local_rank=1, num_tasks=8, num_nodes=2, node=1,
                          hostnames=["gpu-a01", "gpu-a02"], raw_job_id="4242")
    out = rendezvous_env(env)
    assert out == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                   "MASTER_ADDR": "gpu-a01", "MASTER_PORT": str(master_port("4242", 2))}
    ports = {master_port(j, r) for j in range(100, 140) for r in range(3)}
    assert len(ports) == 120 and all(20000 <= p < 60000 for p in ports)


def test_checkpoint_resubmits_a_continuation(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = TrainJob("tiny", ["optim.lr=1e-4"], "/runs/a", max_requeues=2, resume="never")
    nxt = job.checkpoint().function
    assert isinstance(nxt, TrainJob)
    assert (nxt.requeues, nxt.resume, nxt.overrides, nxt.run_dir) == (1, "auto", ["optim.lr=1e-4"], "/runs/a")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")  # requeued by Slurm itself (preemption) as well
    assert nxt.checkpoint().function.requeues == 5


def test_cli_dispatches_submit(tmp_path, capsys):
    from avs_dist.cli import main

    assert main(["submit", "--config", "tiny", "--shards", "s", "--run-dir", str(tmp_path), "--dry-run"]) == 0
    assert "#SBATCH" in capsys.readouterr().out
    assert os.environ.get("SUBMITIT_EXECUTOR") is None  # rendering a script starts no job machinery
    json.dumps(submit.slurm_parameters(submit._parser().parse_args(
        ["--config", "tiny", "--shards", "s", "--run-dir", "r"])))  # parameters stay plain data


def test_lost_ranks_names_the_hosts_of_ranks_without_a_result(tmp_path):
    """A 4-rank job whose node 2 died: ranks 2, 3 wrote no result; the message names their host
    (from the line every TrainJob rank logs) and the checkpoint a resubmission resumes from."""
    import submitit

    logs, run_dir = tmp_path / "slurm", tmp_path / "run"
    logs.mkdir()
    job = submitit.SlurmJob(folder=logs, job_id="42", tasks=(0, 1, 2, 3))
    for rank, host in enumerate(["avsn1", "avsn1", "avsn2", "avsn2"]):
        job.task(rank).paths.stderr.write_text(f"[avs-dist slurm 10:00:00] rank {rank} of 4 on host {host}\n"
                                               "RuntimeError: Connection closed by peer [10.213.47.12]:27342\n")
    for rank in (0, 1):
        job.task(rank).paths.result_pickle.write_bytes(b"")
    assert submit.lost_ranks(job, run_dir) == ("  ranks 2, 3 on avsn2: ended without a result (killed, or the node "
                                               "failed); no checkpoint was saved yet\n")
    from avs_dist.train import checkpoint as ckpt

    for step in (2, 4):
        folder = run_dir / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        ckpt.write_model_folder(folder, {}, {}, step, 0)
    ckpt.write_complete(run_dir / "checkpoints" / "step_00000002", {"step": 2})  # step 4 never completed
    job.task(3).paths.stderr.write_text("")  # died before it named its host
    assert submit.lost_ranks(job, run_dir) == (
        f"  rank 2 on avsn2; rank 3 on a host it never named: ended without a result (killed, or the node failed); "
        f"resubmit with the same --run-dir to resume from {run_dir / 'checkpoints' / 'step_00000002'}\n")
    for rank in (2, 3):
        job.task(rank).paths.result_pickle.write_bytes(b"")
    assert submit.lost_ranks(job, run_dir) == ""
