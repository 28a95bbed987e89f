"""Two nodes for real, against `slurm/dev-cluster.sh start --nodes 2`: each node a network
namespace with its own address, hostname and slurmd. 2-node x 2-task jobs through
`avs-dist submit` (DDP and ZeRO-2), a preemption on two nodes, a node that dies mid-run,
torchrun's c10d rendezvous across the namespaces, and the plain sbatch template.

The baseline of every loss comparison is a 1-node x 4-rank run of the same config through
torchrun on this machine (`avs-dist train --nproc 4`): the same world size gives every rank
the same data, so fp32 CPU losses are equal bit for bit, step by step.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from procs import kill_session, run_session
from slurm_jobs import DEV_CLUSTER, STEPS, TINY, Submission, losses, sacct_states

from avs_dist.launch.submit import RANK_HOST, failed_nodes

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_nodes")]


def test_start_resumes_a_node_an_earlier_run_left_drained(dev_nodes):
    """slurmctld keeps a drain across restarts (a full disk drains a node: 'SlurmdSpoolDir is
    full'); `start` resumes the nodes it owns instead of waiting 60 s for a node that never comes."""
    node = dev_nodes[-1]
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=SlurmdSpoolDir is full"],
                   check=True)
    out = subprocess.run(["bash", str(DEV_CLUSTER), "start", "--nodes", str(len(dev_nodes))], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{node} was drain (SlurmdSpoolDir is full): resumed" in out.stderr + out.stdout
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout.split("\n")
    assert f"{node} idle" in states, states


def one_node_four_ranks(shards: Path, run_dir: Path, *overrides: str) -> dict[int, float]:
    cmd = [sys.executable, "-m", "avs_dist.cli", "train", "--config", "tiny", "--shards", str(shards),
           "--run-dir", str(run_dir), "--nproc", "4", *TINY, *overrides]
    rc, out = run_session(cmd, timeout=600)
    assert rc == 0, out
    return losses(run_dir)


@pytest.fixture(scope="module")
def reference_ddp(s4_shards, tmp_path_factory):
    return one_node_four_ranks(s4_shards, tmp_path_factory.mktemp("ref") / "ddp")


@pytest.fixture(scope="module")
def reference_zero2(s4_shards, tmp_path_factory):
    return one_node_four_ranks(s4_shards, tmp_path_factory.mktemp("ref") / "zero2", "train.strategy=zero2")


def rank_hosts(run_dir: Path, job: str) -> dict[int, str]:
    """global rank -> the host it ran on, as each rank logged it (its own log file)."""
    hosts: dict[int, str] = {}
    for log in (run_dir / "slurm").glob(f"{job}_*_log.err"):
        hosts.update((int(r), h) for r, h in RANK_HOST.findall(log.read_text()))
    return hosts


def assert_two_ranks_per_node(hosts: dict[int, str], nodes: list[str]) -> None:
    assert sorted(hosts) == [0, 1, 2, 3], hosts
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts  # block layout: ranks 0,1 | 2,3
    assert {hosts[0], hosts[2]} <= set(nodes), (hosts, nodes)


def complete_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step_*/COMPLETE.json"))


def test_srun_steps_run_inside_their_nodes(dev_nodes):
    """A job step on two nodes runs in each node's namespace: its hostname, its own address, and
    no route out of the bridge."""
    out = subprocess.run(["srun", "-N2", "-n2", "--time=2", "sh", "-c",
                          'echo "$(hostname) $(ip -4 -o addr show dev eth0 | cut -d" " -f7) '
                          '$(ip route show default | wc -l)"'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert all(row[2] == "0" for row in rows), out.stdout  # no default route
    seen = {node: addr for node, addr, _ in rows}
    assert len(seen) == 2 and set(seen) <= set(dev_nodes), out.stdout
    for node, addr in seen.items():  # the address every node and this machine resolve the name to
        assert addr.split("/")[0] == subprocess.run(["getent", "hosts", node], capture_output=True, text=True,
                                                    check=True).stdout.split()[0]


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_two_nodes_by_two_tasks_equal_one_node_by_four(strategy, s4_shards, slurm_nodes, request, tmp_path):
    reference = request.getfixturevalue(f"reference_{strategy}")
    sub = Submission(s4_shards, tmp_path / "run", f"train.strategy={strategy}", nodes=2, tasks=2)
    rc = sub.wait(timeout=600)
    assert rc == 0, sub.output
    final = json.loads((sub.run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["step"] == STEPS and final["world_size"] == 4
    assert final["strategy"] == strategy
    assert_two_ranks_per_node(rank_hosts(sub.run_dir, sub.job_id(1)), slurm_nodes)
    # Evaluation over 4 ranks on 2 nodes visits every test video once.
    videos = json.loads((s4_shards / "manifest.json").read_text())["splits"]["test"]["videos"]
    assert final["test"]["videos"] == videos
    assert losses(sub.run_dir) == reference
    assert sacct_states(sub.job_id(1)) == ["COMPLETED"]


@dataclass
class Preempted:
    sub: Submission
    job: str
    rc: int


@pytest.fixture(scope="module")
def preempted(s4_shards, slurm_nodes, tmp_path_factory):
    """A 2-node DDP job sent SIGUSR2 (`scancel --signal=USR2`: every process of the step, both nodes)."""
    sub = Submission(s4_shards, tmp_path_factory.mktemp("usr2") / "run", nodes=2, tasks=2)
    job = sub.job_id()
    sub.wait_for_steps(1, timeout=300)  # the stop lands at a later step boundary, before the last
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    return Preempted(sub, job, sub.wait(timeout=600))


def test_usr2_on_two_nodes_saves_once_requeues_and_resumes(preempted, slurm_nodes):
    sub, job = preempted.sub, preempted.job
    assert preempted.rc == 0, sub.output
    states = sacct_states(job)
    assert states[0] == "REQUEUED" and states[-1] == "COMPLETED", states
    # One collective checkpoint at the stop (every rank passed its barrier: COMPLETE.json), and the last.
    stops = sorted(p.name for p in (sub.run_dir / "checkpoints").glob("step_*"))
    assert len(stops) == 2 and stops[-1] == f"step_{STEPS:08d}", stops
    assert complete_checkpoints(sub.run_dir) == stops
    log = (sub.run_dir / "slurm" / f"{job}_0_log.err").read_text()
    assert "requeueing (requeue 1 of at most 3)" in log and "attempt 2" in log
    out = (sub.run_dir / "slurm" / f"{job}_0_log.out").read_text()
    assert f"resumed from {sub.run_dir / 'checkpoints' / stops[0]} " in out
    assert_two_ranks_per_node(rank_hosts(sub.run_dir, job), slurm_nodes)  # both attempts on both nodes
    assert sorted(losses(sub.run_dir)) == list(range(1, STEPS + 1))


def test_usr2_on_two_nodes_resumed_losses_equal_the_uninterrupted_run(preempted, reference_ddp):
    assert preempted.rc == 0, preempted.sub.output
    stop = min(int(p.name[5:]) for p in (preempted.sub.run_dir / "checkpoints").glob("step_*"))
    if stop > STEPS - 2:
        pytest.skip(f"the stop came at step {stop}: too late for a second step after the resume")
    assert losses(preempted.sub.run_dir) == reference_ddp


def sacct_attempts(job: str) -> list[str]:
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State"], capture_output=True, text=True,
                         check=True).stdout
    return [s.split()[0] for s in out.splitlines() if s.strip()]


def wait_until(what: str, timeout: float, check) -> None:
    end = time.time() + timeout
    while not check():
        if time.time() > end:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(1)


@dataclass
class NodeFailure:
    job: str
    victim: str  # the node whose every process was killed
    checkpoint: str  # the newest complete checkpoint when it died
    states: list[str]  # sacct's record of every attempt
    down_reason: str  # sinfo -R once Slurm noticed
    wait_rc: int | None  # `avs-dist submit --wait`'s exit code (None: still waiting at the end)
    sub: Submission


@pytest.fixture(scope="module")
def node_failure(s4_shards, dev_nodes, tmp_path_factory):
    """A 2-node ZeRO-2 job loses every process of its second node (slurmd too) after its step-2
    checkpoint; Slurm marks the node down and requeues the job; the node comes back (`start`)
    and the requeued job resumes by itself. What each party did is recorded for the tests."""
    sub = Submission(s4_shards, tmp_path_factory.mktemp("nodefail") / "run", "train.strategy=zero2",
                     "train.ckpt_every_steps=2", nodes=2, tasks=2)
    job = sub.job_id()
    restart = ["bash", str(DEV_CLUSTER), "start", "--nodes", str(len(dev_nodes))]
    try:
        sub.wait_for_steps(3, timeout=300)  # step 3 logged: the step-2 checkpoint is complete
        victim = rank_hosts(sub.run_dir, job)[2]  # not the batch script's node
        checkpoint = complete_checkpoints(sub.run_dir)[-1]
        subprocess.run(["bash", str(DEV_CLUSTER), "kill-node", victim], check=True)
        wait_until("Slurm records the node failure", 180, lambda: "NODE_FAIL" in sacct_attempts(job))
        down_reason = subprocess.run(["sinfo", "-h", "-R", "-o", "%N %E"], capture_output=True, text=True).stdout
        subprocess.run(restart, check=True, capture_output=True)
        wait_until("Slurm requeues the job (a second attempt in sacct)", 120, lambda: len(sacct_attempts(job)) > 1)
        wait_until("the requeued job ends", 600, lambda: sacct_attempts(job)[-1] not in
                   ("REQUEUED", "PENDING", "RUNNING", "COMPLETING"))
        try:
            wait_rc = sub.proc.wait(120)
        except subprocess.TimeoutExpired:
            wait_rc = None
        return NodeFailure(job, victim, checkpoint, sacct_attempts(job), down_reason, wait_rc, sub)
    finally:
        subprocess.run(restart, capture_output=True)  # later tests need every node back
        subprocess.run(["scancel", job])
        if sub.proc.poll() is None:
            sub.proc.kill()


def test_node_failure_requeues_and_resumes_from_the_last_checkpoint(node_failure, reference_zero2):
    f = node_failure
    assert f.states[0] == "NODE_FAIL" and f.states[-1] == "COMPLETED", f.states
    assert re.search(rf"^{f.victim} Not responding", f.down_reason, re.M), f.down_reason  # Slurm names it
    out = (f.sub.run_dir / "slurm" / f"{f.job}_0_log.out").read_text()
    assert f"resumed from {f.sub.run_dir / 'checkpoints' / f.checkpoint} " in out  # ZeRO shards saved on 2 nodes
    assert losses(f.sub.run_dir) == reference_zero2


def test_node_failure_wait_follows_the_requeue_to_the_end(node_failure):
    f = node_failure
    assert f.wait_rc == 0, f.sub.output
    assert f"job {f.job} completed" in f.sub.output and f.victim in f.sub.output, f.sub.output


def test_node_failure_names_the_node_once_it_is_back_up(node_failure):
    """The node is up again (sinfo -R no longer lists it): accounting's node events name it."""
    f = node_failure
    assert f.victim not in subprocess.run(["sinfo", "-h", "-R", "-N", "-o", "%N"], capture_output=True,
                                          text=True).stdout
    rows = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", f.job, "-o", "State,NodeList,Start,End"],
                          capture_output=True, text=True, check=True).stdout.split()
    _, nodes, start, end = next(r.split("|") for r in rows if r.startswith("NODE_FAIL"))
    assert failed_nodes(nodes, start, end) == f"{f.victim}: Not responding"


def in_node(node: str, *cmd: str) -> list[str]:
    return ["bash", str(DEV_CLUSTER), "exec", node, *cmd]


def test_torchrun_c10d_rendezvous_across_two_nodes(s4_shards, dev_nodes, reference_ddp, tmp_path):
    first, second = dev_nodes[:2]
    port = subprocess.run(in_node(first, sys.executable, "-c", "import socket; s = socket.socket(); "
                                  "s.bind(('', 0)); print(s.getsockname()[1])"),
                          capture_output=True, text=True, check=True).stdout.strip()
    run_dir = tmp_path / "torchrun"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first}:{port}", "--rdzv-id", f"avs-test-{port}",
             "--max-restarts", "0", "--monitor-interval", "0.5", "-m", "avs_dist.launch.rank", "--config", "tiny",
             "--shards", str(s4_shards), "--run-dir", str(run_dir), *TINY]
    logs = {node: tmp_path / f"{node}.log" for node in (first, second)}
    env = {**os.environ, "LOGLEVEL": "INFO"}  # each agent logs its rendezvous result
    procs = {node: subprocess.Popen(in_node(node, *agent), stdout=logs[node].open("w"), stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True) for node in (first, second)}
    try:
        rcs = {node: p.wait(timeout=600) for node, p in procs.items()}
    finally:
        for p in procs.values():
            kill_session(p)
    text = {node: log.read_text() for node, log in logs.items()}
    assert rcs == {first: 0, second: 0}, text
    # Each node's agent ran two of the four ranks, against one master on one of the two nodes.
    ranks = {node: re.findall(r"global_ranks=\[([\d, ]+)\]", t) for node, t in text.items()}
    assert all(ranks.values()), text
    assert sorted(int(r) for found in ranks.values() for r in found[0].split(",")) == [0, 1, 2, 3], ranks
    masters = {m for t in text.values() for m in re.findall(r"master_addr=(\S+)", t)}
    assert len(masters) == 1 and masters <= {first, second}, masters
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["status"] == "completed" and final["world_size"] == 4 and final["step"] == STEPS
    assert losses(run_dir) == reference_ddp


def test_plain_sbatch_template_on_two_nodes(s4_shards, slurm_nodes, reference_ddp, tmp_path):
    run_dir = tmp_path / "sbatch"
    run_dir.mkdir()
    name = f"avs-test-2n-{tmp_path.name}"
    try:
        out = subprocess.run(
            ["sbatch", "--wait", "--parsable", f"--job-name={name}", "--nodes=2", "--ntasks-per-node=2",
             "--cpus-per-task=1", "--time=10", f"--output={run_dir}/slurm-%j.out",
             str(DEV_CLUSTER.parent / "train.sbatch"), "--config", "tiny", "--shards", str(s4_shards),
             "--run-dir", str(run_dir), *TINY],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    finally:
        subprocess.run(["scancel", "--name", name])  # never leave it queued after a failure
    logs = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert out.returncode == 0, out.stderr + logs
    assert "4 task(s) on 2 node(s)" in logs and "run status 'completed'" in logs
    hosts = {int(r): h for r, h in re.findall(r"train\.sbatch: rank (\d+) of 4 on host (\S+)", logs)}
    assert_two_ranks_per_node(hosts, slurm_nodes)
    assert losses(run_dir) == reference_ddp
