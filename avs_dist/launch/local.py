"""`avs-dist train`: check the run, then train with --nproc local ranks under torchrun.

    avs-dist train --config tiny --shards DIR --run-dir DIR [--nproc N] [--max-restarts R] [k=v ...]

With one process and no restarts the rank runs in this process. Otherwise this process
starts torchrun (its own session, so a terminal's Ctrl-C reaches only us) with the rank
entry (launch/rank.py) and supervises the run:

- SIGTERM, SIGUSR2, SIGINT or SIGHUP here writes the run's stop file: every rank saves one
  checkpoint at the next step boundary and exits; a second signal aborts: SIGKILL to every
  process of the run (torchrun, ranks, loader workers: those with our AVS_LAUNCHER_PID).
- torchrun signalled: it passes the signal on to the ranks (which then stop the same way;
  it waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT, here 300 s unless set, before it kills them), or
  it dies (SIGKILL; SIGUSR2 on a torch whose torchrun does not handle it) and the ranks, now
  orphans, notice within seconds (avs_dist/launch/signals.py) and stop. This process is their
  child subreaper: orphaned ranks become its children, and it waits for every one of them.
- a rank signalled: all ranks agree to stop at the next step boundary.
- this process killed (SIGKILL): the ranks notice within seconds and stop.

The same command on a run directory that holds this run, completed, says so and where its
RESULTS.md is, and exits 0 (`--reevaluate` evaluates it on test again instead).

Exit code 0 when the run completed or stopped after its checkpoint (the last line says
which; status.json too), 1 when it failed, 2 for a bad command line, config or shard set.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from avs_dist.launch.args import check_run, rank_args, resolve_config, run_parser, usable_cores
from avs_dist.launch.signals import LAUNCHER_ENV, STOP_SIGNALS

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# torchrun's grace for stopping ranks (it SIGKILLs them after it): a stop is a step, a save
# (ZeRO shards, sha256 of every file) and an exit. The signals it passes on to the ranks
# (torch versions with --signals-to-handle; older ones die of SIGUSR2, see above).
TORCHRUN_ENV = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300", "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"}


def _parser() -> argparse.ArgumentParser:
    from avs_dist.config import preset_names
    from avs_dist.helpformat import HelpFormatter

    p = argparse.ArgumentParser(prog="avs-dist train", parents=[run_parser()], formatter_class=HelpFormatter,
                                description="train with one or --nproc local processes (torchrun)",
                                epilog="presets (--config): " + ", ".join(preset_names()))
    p.add_argument("--nproc", type=int, default=1, help="local ranks (processes) to start")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts of all ranks after a failure (each resumes from the last checkpoint)")
    p.add_argument("--reevaluate", action="store_true",
                   help="on a run directory that already holds this run, completed: evaluate its last model "
                        "on test again and rewrite its results (without it the run is reported, not redone)")
    return p


def report_completed(args, cfg) -> bool:
    """True (after saying so) when --run-dir already holds this run, completed, and nothing asks
    to redo it: the same command again reports where its results are instead of evaluating again."""
    from avs_dist.config import to_dict
    from avs_dist.train.results import RESULTS_FILE, completed_run, write_results

    if args.reevaluate or args.resume != "auto":
        return False
    status = completed_run(args.run_dir, to_dict(cfg))
    if status is None:
        return False
    results = Path(args.run_dir) / RESULTS_FILE
    if not results.is_file():  # a run from before RESULTS.md existed
        write_results(args.run_dir)
    print(f"avs-dist train: {args.run_dir} holds this run, already completed at step {status['step']} of "
          f"{status['total_steps']}; results in {results} (--reevaluate evaluates it on test again, "
          "--resume never trains it again from scratch)", flush=True)
    return True


def torchrun_command(nproc: int, max_restarts: int, args: list[str]) -> list[str]:
    from avs_dist import distributed

    return [sys.executable, "-m", "avs_dist.launch.torchrun", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{distributed.free_port()}", "--monitor-interval", "0.5",
            "-m", "avs_dist.launch.rank", *args]


def _become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: orphaned ranks go to init; their watchdog still ends them
        return False


def _wait_for_orphans() -> None:
    """Reap every remaining child: ranks (and their loader workers) whose torchrun died."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def run_processes(launcher_pid: int) -> list[int]:
    """Every process started for this launcher's run: torchrun, the ranks, their loader workers
    (they inherit AVS_LAUNCHER_PID=<launcher pid>, whatever session or parent they have now)."""
    want = f"{LAUNCHER_ENV}={launcher_pid}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != launcher_pid:
            try:
                if want in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone, or not ours
                pass
    return found


def rank_threads(nproc: int) -> dict:
    """{"OMP_NUM_THREADS": cores // nproc} unless the environment sets it (then {}), and one line
    saying so: torchrun would otherwise pick 1 and print a five-line banner about it."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = usable_cores()
    threads = max(1, cores // nproc)
    print(f"avs-dist train: OMP_NUM_THREADS={threads} per rank ({cores} cores / {nproc} ranks; "
          "set OMP_NUM_THREADS to choose)", flush=True)
    return {"OMP_NUM_THREADS": str(threads)}


def supervise(cmd: list[str], run_dir: Path, env_extra: dict | None = None, keep_fds: tuple[int, ...] = ()) -> int:
    """Run `cmd` (torchrun) to the end, turning signals into the run's stop file (module docstring).
    `env_extra`: environment variables for torchrun and the ranks (rank_threads); `keep_fds`:
    descriptors torchrun inherits (the run directory's lock: it then outlives us)."""
    from avs_dist.fileio import write_text_atomic
    from avs_dist.train.stop import stop_file

    _become_subreaper()
    env = {**TORCHRUN_ENV, **os.environ, **(env_extra or {}), LAUNCHER_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=keep_fds)
    seen: list[str] = []

    def on_signal(signum, frame):
        seen.append(signal.Signals(signum).name)
        if len(seen) == 1:
            write_text_atomic(stop_file(run_dir), f"{seen[0]} to avs-dist train (pid {os.getpid()})\n")
            print(f"avs-dist train: {seen[0]}: every rank saves a checkpoint at the next step boundary, then "
                  "exits (signal again to abort without one)", file=sys.stderr, flush=True)
        else:
            print(f"avs-dist train: {seen[-1]} again: aborting without a checkpoint", file=sys.stderr, flush=True)
            for pid in run_processes(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    rc = proc.wait()
    _wait_for_orphans()
    return _outcome(rc, run_dir)


def _outcome(rc: int, run_dir: Path) -> int:
    path = run_dir / "status.json"
    status = json.loads(path.read_text()) if path.is_file() else {}
    state = status.get("status")
    if state == "completed":
        print(f"avs-dist train: run completed: {status['step']} steps, results in {run_dir / 'RESULTS.md'}",
              flush=True)
        return 0
    if state == "stopped":
        print(f"avs-dist train: run stopped at step {status['step']}/{status['total_steps']} with a checkpoint in "
              f"{run_dir / 'checkpoints'}; the same command resumes it", flush=True)
        return 0
    from avs_dist.train.checkpoint import resume_hint

    how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    print(f"avs-dist train: the run failed (torchrun ended with {how}); {resume_hint(run_dir)}",
          file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    from avs_dist.config import ConfigError
    from avs_dist.data.shards import ShardError

    args = _parser().parse_intermixed_args(argv)
    if args.nproc < 1 or args.max_restarts < 0:
        print(f"avs-dist train: --nproc must be >= 1 and --max-restarts >= 0 "
              f"(got {args.nproc}, {args.max_restarts})", file=sys.stderr)
        return 2
    from avs_dist.errors import UserError
    from avs_dist.train.runlock import RunDirBusy, RunLock

    run_dir = Path(args.run_dir)
    lock = None
    try:
        if run_dir.is_dir():  # it may be a live run's: refused before its checkpoints are read
            lock = RunLock.acquire(run_dir, "avs-dist train", warn=lambda m: print(f"WARNING: {m}", file=sys.stderr))
        import torch

        cfg = resolve_config(args)
        check_run(cfg, args.nproc, torch.cuda.is_available(), sha256=args.check_sha256, run_dir=args.run_dir,
                  resume=args.resume)
        if report_completed(args, cfg):
            if lock is not None:
                lock.release()
            return 0
        if lock is None:  # a new folder: made only once the checks passed
            lock = RunLock.acquire(run_dir, "avs-dist train", warn=lambda m: print(f"WARNING: {m}", file=sys.stderr))
    except (ConfigError, ShardError, RunDirBusy, OSError) as e:
        if lock is not None:
            lock.release()
        if isinstance(e, UserError) and not isinstance(e, (ConfigError, ShardError)):
            raise  # cli.main prints it as `avs-dist train: error: ...`
        print(f"avs-dist train: {e}", file=sys.stderr)
        return 2
    return _start(args, run_dir, lock)


def _start(args, run_dir: Path, lock) -> int:
    """Run the checked, locked run: in this process (one rank), else torchrun under supervise."""
    from avs_dist.train.stop import stop_file

    stop_file(run_dir).unlink(missing_ok=True)  # a request left from an earlier run is not for this one
    (run_dir / "status.json").unlink(missing_ok=True)
    try:
        if args.nproc == 1 and args.max_restarts == 0:
            from avs_dist.launch.rank import main as rank_main

            return rank_main(rank_args(args), lock_held=True)  # this process is the rank
        return supervise(torchrun_command(args.nproc, args.max_restarts, rank_args(args)), run_dir,
                         rank_threads(args.nproc), keep_fds=() if lock is None else (lock.fd,))
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
