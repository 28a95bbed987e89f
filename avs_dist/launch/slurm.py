"""What runs inside a Slurm job submitted by `avs-dist submit` (launch/submit.py).

`TrainJob` is the submitit callable: one instance runs in every task (one task per GPU, or
per process on CPU). It turns `submitit.JobEnvironment()` into the torchrun variables the
trainer reads, then trains one rank (train/session.py, train/loop.py).

Preemption and time limits. Slurm sends SIGUSR2 (`--signal=USR2@<delay>`) to every process
of the job step. submitit's own SIGUSR2 handler would, on global rank 0 only, call
`checkpoint()`, run `scontrol requeue` and `sys.exit` from inside the signal handler, i.e.
in the middle of a step, while the other ranks keep training and ZeRO state is sharded
across all of them. So `TrainJob` replaces that handler, on every rank, with one that only
requests a stop (train/stop.py). The ranks agree on it at the next step boundary and all
save one checkpoint together; the loop returns "stopped" on every rank after a barrier, so
the checkpoint is complete. SIGTERM, SIGINT and SIGHUP stop the same way, without a requeue. Only then does rank 0 invoke submitit's saved handler, which
pickles `checkpoint()`'s resubmission, requeues the job and exits. The requeued job resumes
from that checkpoint (`resume="auto"`).

Requeues are counted whoever made them (our `scontrol requeue`, a Slurm preemption, a node
failure: Slurm's SLURM_RESTART_COUNT): past `max_requeues` the job ends with
`RequeueLimitError`, which `avs-dist submit --wait` prints.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass

import submitit

# A requeued or cancelled rank leaves with this code, like submitit's own handler (sys.exit(-1)).
INTERRUPTED_EXIT = 255
REQUEUE_LOCK_WAIT_S = 120.0


class RequeueLimitError(RuntimeError):
    """The job was interrupted more often than --max-requeues allows."""


def master_port(job_id: str | int, restart: int = 0) -> int:
    """A rendezvous port every task derives alike from the job id alone.

    The restart count is mixed in so a requeued job does not wait for its previous
    attempt's socket to leave TIME_WAIT. Range 20000-59999: above common services, below
    Linux's ephemeral ports (32768+ overlap is harmless: a clash is retried by the next job)."""
    return 20000 + (int(job_id) * 16 + restart % 16) % 40000


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def rendezvous_env(job_env) -> dict[str, str]:
    """torchrun's variables from a submitit JobEnvironment (or anything with its attributes)."""
    hostnames = list(job_env.hostnames)
    per_node = job_env.num_tasks // max(1, job_env.num_nodes)
    return {
        "RANK": str(job_env.global_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_RANK": str(job_env.local_rank),
        "LOCAL_WORLD_SIZE": str(per_node),
        "GROUP_RANK": str(job_env.node),
        "MASTER_ADDR": hostnames[0],
        # raw_job_id: an array task has its own SLURM_JOB_ID, hence its own port
        "MASTER_PORT": str(master_port(job_env.raw_job_id, restart_count())),
    }


def _log(msg: str) -> None:
    print(f"[avs-dist slurm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class _StopSignals:
    """Latches which stop signal this process got (SIGUSR2: requeue; SIGTERM / SIGINT / SIGHUP:
    cancel or Slurm preemption) and requests the run's stop (launch/signals.py). Slurm signals
    every process of the step, DataLoader workers included; they ignore it (data/loader.py)."""

    def __init__(self, stop) -> None:
        self.stop = stop
        self.usr2 = False
        self.other = False
        self.submitit_handler = None

    def install(self) -> None:
        from avs_dist.launch.signals import install_stop_signals

        def seen(signum):
            if signum == signal.SIGUSR2:
                self.usr2 = True
            else:
                self.other = True

        self.submitit_handler = signal.getsignal(signal.SIGUSR2)
        install_stop_signals(self.stop, also=seen)

    def requeue_via_submitit(self) -> None:
        """Rank 0, after every rank saved: submitit's handler checkpoints + requeues + exits."""
        handler = self.submitit_handler
        if not callable(handler):
            raise RuntimeError("submitit's SIGUSR2 handler is not installed: TrainJob must run inside a "
                               "submitit Slurm job (avs-dist submit)")
        try:
            handler(signal.SIGUSR2, None)
        except SystemExit:
            pass  # submitit's normal ending after `scontrol requeue`; we leave below, without finalizers


def _leave_after_result(result_pickle) -> None:
    """atexit: once submitit wrote this task's result, skip interpreter finalization.

    Finalizing after gloo was used aborts ~3% of processes (see distributed.hard_exit); the
    job would then read FAILED although its result is there."""
    if result_pickle.exists():
        from avs_dist.distributed import hard_exit

        hard_exit(0)


@dataclass
class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job. Picklable: only the recipe, no live state."""

    config: str  # preset name or absolute .toml path
    overrides: list[str]
    run_dir: str
    max_requeues: int = 3
    resume: str = "auto"  # first attempt; every requeued attempt resumes with "auto"
    requeues: int = 0  # requeues done through checkpoint()

    def attempts_so_far(self) -> int:
        return max(self.requeues, restart_count())

    def __call__(self) -> dict:
        job_env = submitit.JobEnvironment()
        os.environ.update(rendezvous_env(job_env))
        # One BLAS/OpenMP pool per CPU Slurm gave the task, not per core of the node
        # (torch reads this when it is first imported, which happens below).
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        rank = job_env.global_rank
        done = self.attempts_so_far()
        # Every rank names its host in its own log; `avs-dist submit --wait` reads these lines
        # to say where ranks that ended without a result ran (launch/submit.py RANK_HOST).
        _log(f"rank {rank} of {job_env.num_tasks} on host {job_env.hostname}")
        if rank == 0:
            _log(f"{job_env}: attempt {done + 1} (requeues so far {done}, max {self.max_requeues}), "
                 f"MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']}")
        if done > self.max_requeues:
            # Slurm itself requeued it (preemption, node failure) more often than allowed.
            raise RequeueLimitError(f"job {job_env.job_id} was restarted {done} times, more than "
                                    f"--max-requeues {self.max_requeues}; its last checkpoint is in "
                                    f"{self.run_dir}/checkpoints (resubmit with the same --run-dir to continue)")

        result, signals = self._train(job_env.num_tasks, resume="auto" if done else self.resume)
        if result.get("status") == "completed" or not (signals.usr2 or signals.other):
            atexit.register(_leave_after_result, job_env.paths.result_pickle)
            return result
        self._after_stop(result, signals, job_env, done)

    def _train(self, world_size: int, resume: str):
        """One rank of the run, its stop signals installed: (the result, which signals came)."""
        import torch

        from avs_dist.config import load_config
        from avs_dist.launch.args import check_run
        from avs_dist.train.loop import train
        from avs_dist.train.session import Session
        from avs_dist.train.stop import StopRequest, stop_file

        stop = StopRequest(stop_file(self.run_dir))
        signals = _StopSignals(stop)
        signals.install()
        cfg = load_config(self.config, self.overrides)
        # the shards (or the run's checkpoints) may have changed since submit
        check_run(cfg, world_size, torch.cuda.is_available(), run_dir=self.run_dir, resume=resume)
        # A requeued attempt may start on another node before the shared file system has
        # freed the dead attempt's lock (NFSv4 lease: ~90 s): it waits that long for it.
        wait_s = REQUEUE_LOCK_WAIT_S if restart_count() or self.requeues else 0.0
        with Session.open(cfg, self.run_dir, resume, lock_wait_s=wait_s, stop=stop) as session:
            return session.finish(train(session, stop), stop), signals

    def _after_stop(self, result: dict, signals: _StopSignals, job_env, done: int) -> None:
        """Every rank saved the stop checkpoint: requeue (SIGUSR2, within --max-requeues) or leave."""
        from avs_dist.distributed import hard_exit

        rank, step = job_env.global_rank, result.get("step")
        if not signals.usr2:
            # SIGTERM (or INT / HUP) alone: scancel, or Slurm preempting / killing at the time
            # limit. Slurm decides about requeueing; leaving without a result lets `--wait` read its state.
            if rank == 0:
                _log(f"{signals.stop.reason}: checkpoint at step {step} saved in {self.run_dir}/checkpoints; exiting")
            hard_exit(INTERRUPTED_EXIT)
        if done >= self.max_requeues:
            raise RequeueLimitError(f"job {job_env.job_id} was interrupted (SIGUSR2: preemption or time limit) "
                                    f"after {done} requeues; --max-requeues is {self.max_requeues}, so it is not "
                                    f"requeued again. It stopped at step {step}/{result.get('total_steps')} with a "
                                    f"checkpoint in {self.run_dir}/checkpoints: resubmit with the same --run-dir "
                                    f"to continue.")
        if rank == 0:
            _log(f"SIGUSR2: every rank saved step {step}; requeueing (requeue {done + 1} of at most "
                 f"{self.max_requeues})")
            signals.requeue_via_submitit()
        hard_exit(INTERRUPTED_EXIT)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The trainer already wrote the model checkpoint (all ranks, before this is called);
        # the resubmitted callable only needs to know it is a continuation.
        # (dataclasses.replace: a subclass, e.g. the study's StudyJob, stays itself)
        nxt = dataclasses.replace(self, overrides=list(self.overrides), resume="auto",
                                  requeues=self.attempts_so_far() + 1)
        return submitit.helpers.DelayedSubmission(nxt)
