"""`avs-dist submit`: run `avs-dist train` as a Slurm job through submitit.

    avs-dist submit --config tiny --shards shards/s4 --run-dir runs/a [k=v ...] \\
        --nodes 1 --tasks-per-node 2 --time 60 [--wait]

One Slurm task per rank (per GPU, or per process on CPU); ranks, world size and the
rendezvous come from submitit's JobEnvironment (avs_dist/launch/slurm.py). The job asks Slurm for
SIGUSR2 `--signal-delay` seconds before its time limit; on that signal (or a preemption
notice sent the same way) every rank saves at the next step boundary and the job requeues
and resumes, at most `--max-requeues` times.

Sweeps: `--array SPEC [SPEC ...]` submits one Slurm job array, one task per SPEC. A SPEC is
a set of overrides separated by spaces ("optim.lr=1e-4 train.seed=2"), applied after the
common overrides; `@FILE` reads one SPEC per line (blank lines and # comments skipped).
Task i runs in RUN_DIR/<i>_<overrides>, and RUN_DIR/sweep.json maps them.
See docs/slurm.md.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from avs_dist.config import ConfigError, is_config_path, load_config
from avs_dist.launch.args import check_run, check_shards_fit, run_parser, stored_frame_size

DEFAULT_TIME_MIN = 60
DEFAULT_SIGNAL_DELAY_S = 120


def _parser() -> argparse.ArgumentParser:
    # The training flags are the rank entry's own (launch/args.py); requeued attempts always resume "auto",
    # and --run-dir must be on storage every node sees.
    from avs_dist.config import preset_names
    from avs_dist.helpformat import HelpFormatter

    p = argparse.ArgumentParser(prog="avs-dist submit", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, parents=[run_parser()],
                                epilog="presets (--config): " + ", ".join(preset_names()))
    s = slurm_arguments(p)
    s.add_argument("--array", nargs="+", default=None, metavar="SPEC",
                   help="sweep: one job per SPEC ('k=v k2=v2' or @FILE with one SPEC per line)")
    s.add_argument("--array-parallelism", type=int, default=256, help="array tasks running at once")
    r = p.add_argument_group("behaviour")
    r.add_argument("--wait", action="store_true", help="block until the job(s) end; exit 0 iff all completed")
    r.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and script, submit nothing")
    return p


def slurm_arguments(p: argparse.ArgumentParser):
    """The Slurm resource flags of `avs-dist submit` (also `avs-dist study submit`); returns the group."""
    s = p.add_argument_group("Slurm resources")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node: one per GPU (default: --gpus-per-node, or 1 without GPUs)")
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--cpus-per-task", type=int, default=None, help="also sets OMP_NUM_THREADS in each rank")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    s.add_argument("--partition", default=None)
    s.add_argument("--account", default=None)
    s.add_argument("--qos", default=None)
    s.add_argument("--constraint", default=None)
    s.add_argument("--time", type=int, default=DEFAULT_TIME_MIN, help="time limit per attempt, minutes")
    s.add_argument("--signal-delay", type=int, default=DEFAULT_SIGNAL_DELAY_S,
                   help="seconds before the time limit at which Slurm sends SIGUSR2 (save + requeue)")
    s.add_argument("--max-requeues", type=int, default=3,
                   help="requeues allowed (time limits and preemptions together)")
    s.add_argument("--sbatch-extra", action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other sbatch option, repeatable (e.g. exclusive, mail-type=END)")
    s.add_argument("--job-name", default=None, help="Slurm job name (default: avs-<config name>)")
    s.add_argument("--log-folder", default=None, help="submitit's scripts and logs (default RUN_DIR/slurm)")
    return s


# ----------------------------------------------------------------------------- sweep specs
def read_array_specs(items: list[str]) -> list[list[str]]:
    """--array items -> one override list per job (each validated later with the config)."""
    specs: list[list[str]] = []
    for item in items:
        if item.startswith("@"):
            path = Path(item[1:])
            if not path.is_file():
                raise ConfigError(f"--array {item}: file {path} not found")
            for n, line in enumerate(path.read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    specs.append(_spec(line, f"{path}:{n}"))
        else:
            specs.append(_spec(item, f"--array {item!r}"))
    if not specs:
        raise ConfigError("--array: no override sets given")
    return specs


def _spec(text: str, where: str) -> list[str]:
    try:
        parts = shlex.split(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    bad = [p for p in parts if "=" not in p]
    if bad:
        raise ConfigError(f"{where}: {bad} are not key=value overrides")
    return parts


def sweep_dir_name(index: int, overrides: list[str], width: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(overrides)).strip("_")[:80]
    return f"{index:0{width}d}_{slug}" if slug else f"{index:0{width}d}"


# ----------------------------------------------------------------------------- executor
def sbatch_extra(items: list[str]) -> dict:
    extra: dict = {"requeue": True}  # Slurm may requeue it on preemption / node failure too
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"--sbatch-extra {item!r}: expected KEY or KEY=VALUE")
        extra[key.replace("-", "_")] = value if sep else True
    return extra


def tasks_per_node(args) -> int:
    return args.tasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)


def slurm_parameters(args, n_jobs: int = 1) -> dict:
    """The SlurmExecutor.update_parameters() dict for these flags."""
    tasks = tasks_per_node(args)
    params = {
        "job_name": args.job_name or f"avs-{Path(args.config).stem}",
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "time": args.time,
        "signal_delay_s": args.signal_delay,
        "additional_parameters": sbatch_extra(args.sbatch_extra),
    }
    optional = {"gpus_per_node": args.gpus_per_node or None, "cpus_per_task": args.cpus_per_task,
                "partition": args.partition, "account": args.account, "qos": args.qos,
                "constraint": args.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.mem_gb is not None:
        params["mem"] = f"{int(args.mem_gb)}GB" if args.mem_gb == int(args.mem_gb) else f"{int(args.mem_gb * 1024)}MB"
    if n_jobs > 1:
        params["array_parallelism"] = args.array_parallelism
    return params


def make_executor(folder: Path, params: dict, max_requeues: int, dry_run: bool):
    import submitit

    cls = submitit.SlurmExecutor
    if dry_run:
        class _DryRunExecutor(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:  # no srun needed to render a script
                return 1
        cls = _DryRunExecutor
    executor = cls(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor, n_jobs: int) -> str:
    """The script submitit would write (its own renderer, so it is exactly what would run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = dict(executor.parameters)
    if n_jobs > 1:
        params["map_count"] = n_jobs
    return _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder, **params)


# ----------------------------------------------------------------------------- waiting
def _tail(text: str, lines: int = 25) -> str:
    rows = text.strip().splitlines()
    return "\n".join(("    " + r) for r in rows[-lines:])


def _pending_reason(job_id: str) -> str:
    """squeue's reason, e.g. ' (Resources)', or ' (PartitionConfig)' for a request no node can meet."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    reason = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return f" ({reason})" if reason and reason != "None" else ""


# The line every rank of TrainJob logs first (launch/slurm.py), in its own stderr log.
RANK_HOST = re.compile(r"\] rank (\d+) of \d+ on host (\S+)")


def lost_ranks(job, run_dir: Path) -> str:
    """The ranks that wrote no result, by host, and the checkpoint to resume from; '' if none.

    A rank without a result was killed (its node failed, or every process there died): the
    message names those nodes, which the other ranks' errors (a peer's address) do not."""
    from avs_dist.train.checkpoint import latest_valid

    missing = [i for i in range(job.num_tasks) if not job.task(i).paths.result_pickle.exists()]
    if not missing:
        return ""
    hosts: dict[int, str] = {}
    for i in range(job.num_tasks):
        try:
            hosts.update((int(r), h) for r, h in RANK_HOST.findall(job.task(i).paths.stderr.read_text(errors="replace")))
        except OSError:
            pass
    by_host: dict[str, list[str]] = {}
    for i in missing:
        by_host.setdefault(hosts.get(i, "a host it never named"), []).append(str(i))
    where = "; ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(r)} on {h}" for h, r in by_host.items())
    last = latest_valid(run_dir, warn=lambda m: None)
    resume = (f"resubmit with the same --run-dir to resume from {last}" if last is not None
              else "no checkpoint was saved yet")
    return f"  {where}: ended without a result (killed, or the node failed); {resume}\n"


# Slurm states after which a job may still come back: it requeues on a node failure or a
# preemption (--requeue). They count as the end only once they have lasted REQUEUE_SETTLE_S.
REQUEUABLE = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "DEADLINE"} | REQUEUABLE
REQUEUE_SETTLE_S = 45


def _slurm(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def job_state(job_id: str) -> tuple[str, str]:
    """(state, node list) of the job's current attempt: slurmctld's view (squeue) while it
    knows the job, then accounting's (sacct); ("UNKNOWN", "") before either has it."""
    out = _slurm("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%N").strip().splitlines()
    if not out:
        out = _slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,NodeList").strip().splitlines()
    if not out:
        return "UNKNOWN", ""
    state, _, nodes = out[-1].partition("|")
    return state.split()[0] if state else "UNKNOWN", nodes.strip()


def failed_nodes(nodes: str, start: str = "", end: str = "") -> str:
    """Which of the job's nodes Slurm marks down, with its reason (e.g. 'avsn2: Not responding').
    A node that is back up by now is found in accounting's node events (sacctmgr show event)
    that began between the attempt's `start` and `end` (sacct's times); else the node list."""
    names = set(_slurm("scontrol", "show", "hostnames", nodes).split()) if nodes else set()
    down = [line.split("|", 1) for line in _slurm("sinfo", "-h", "-R", "-N", "-o", "%N|%E").splitlines() if "|" in line]
    if start and not any(n in names for n, _ in down):
        events = _slurm("sacctmgr", "-n", "-P", "show", "event", f"Start={start}", f"Nodes={nodes}",
                        "format=NodeName,Start,Reason").splitlines()
        down = [(n, why) for n, began, why in (e.split("|", 2) for e in events if e.count("|") >= 2)
                if _within(began, start, end, slack_s=120)]
    return ", ".join(f"{n}: {why}" for n, why in down if n in names) or nodes


def _within(time_: str, start: str, end: str, slack_s: float) -> bool:
    """Whether Slurm time `time_` lies in [start, end + slack_s]; an unparsable end is open."""
    try:
        t, t0 = datetime.fromisoformat(time_), datetime.fromisoformat(start)
    except ValueError:
        return False
    try:
        return t0 <= t <= datetime.fromisoformat(end) + timedelta(seconds=slack_s)
    except ValueError:
        return t0 <= t


def ended_attempt(job_id: str) -> tuple[str, str, str, str]:
    """(state, node list, start, end) of the job's latest attempt that has ended (sacct -D),
    or four empty strings."""
    rows = _slurm("sacct", "-n", "-X", "-D", "-P", "-j", job_id, "-o", "State,NodeList,Start,End").strip().splitlines()
    for row in reversed(rows):
        state, nodes, start, end = (row.split("|") + ["", "", ""])[:4]
        if state and state.split()[0] not in ("PENDING", "RUNNING", "COMPLETING"):
            return state.split()[0], nodes.strip(), start.strip(), end.strip()
    return "", "", "", ""


def _note(job_id: str, state: str, nodes: str, before: str | None) -> str:
    """What to say beside a state: why it waits, and why a running job went back to the queue."""
    if state in REQUEUABLE:
        _, _, start, end = ended_attempt(job_id)
        return f" on {failed_nodes(nodes, start, end)}: Slurm requeues the job (--requeue); its next attempt resumes"
    if state == "PENDING" and before in ("RUNNING", "COMPLETING", *REQUEUABLE):
        ended, where, start, end = ended_attempt(job_id)
        why = f"after {ended} on {failed_nodes(where, start, end)}" if ended in REQUEUABLE else f"after {ended or 'a stop'}"
        return f" (requeued {why}; the next attempt resumes from the last checkpoint)"
    return _pending_reason(job_id) if state == "PENDING" else ""


def _follow(job_ids: list[str]) -> None:
    """Print every state change of the jobs until each one ended for good (see REQUEUABLE)."""
    last: dict[str, str] = {}
    since: dict[str, float] = {}
    pending = list(job_ids)
    while pending:
        for job_id in list(pending):
            state, nodes = job_state(job_id)
            if last.get(job_id) != state and state != "UNKNOWN":
                print(f"  job {job_id}: {state}{_note(job_id, state, nodes, last.get(job_id))}", flush=True)
                last[job_id] = state
            if state not in FINAL:
                since.pop(job_id, None)
            elif state not in REQUEUABLE or time.time() - since.setdefault(job_id, time.time()) > REQUEUE_SETTLE_S:
                pending.remove(job_id)
        if pending:
            time.sleep(2)


def wait_for(jobs: list, run_dirs: list[Path]) -> int:
    """Follow the jobs in Slurm until they end (a requeued job: until its last attempt ends),
    then print each one's outcome from its tasks' results. 0 iff all completed."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        _follow([job.job_id for job in jobs])
    except KeyboardInterrupt:
        print("stopped waiting; the job(s) keep running (scancel to stop them)", file=sys.stderr)
        return 130
    for job in jobs:
        job.watcher.clear()  # its cached states may be an earlier attempt's

    rc = 0
    for job, run_dir in zip(jobs, run_dirs):
        try:
            results = job.results()
        except FailedJobError as e:  # a subclass of UncompletedJobError: first
            state = job.get_info(mode="force").get("State", job.state)
            print(f"avs-dist submit: job {job.job_id} failed (Slurm state {state}).\n{lost_ranks(job, run_dir)}"
                  f"  run dir: {run_dir}\n{_tail(str(e), 40)}", file=sys.stderr)
            rc = 1
            continue
        except UncompletedJobError as e:
            state = job.get_info(mode="force").get("State", job.state)
            print(f"avs-dist submit: job {job.job_id} ended without a result (Slurm state {state}): it was "
                  f"cancelled, killed or ran out of time before finishing.\n{lost_ranks(job, run_dir)}"
                  f"  run dir: {run_dir}\n  last log lines:\n{_tail(str(e))}", file=sys.stderr)
            rc = 1
            continue
        result = results[0]  # every rank returns the same metrics; rank 0 wrote them
        status = result.get("status") if isinstance(result, dict) else None
        summary = {k: result[k] for k in ("status", "step", "total_steps", "best_val_miou") if k in result}
        for split in ("val", "test"):
            metrics = result.get(split) or {}
            summary.update({f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        print(f"job {job.job_id} {status}: {json.dumps(summary)}")
        if status != "completed":
            rc = 1
    return rc


# ----------------------------------------------------------------------------- main
def _abs_config(config: str) -> str:
    return str(Path(config).resolve()) if is_config_path(config) else config


def check_resources(args) -> None:
    """ConfigError for a Slurm resource flag that cannot be right."""
    for name, value in (("--nodes", args.nodes), ("--time", args.time), ("--max-requeues", args.max_requeues + 1),
                        ("--tasks-per-node", args.tasks_per_node or 1), ("--signal-delay", args.signal_delay)):
        if value < 1:
            raise ConfigError(f"{name} must be positive")


def check_request(args, config: str, base: list[str]) -> list[list[str]]:
    """Every check before anything is submitted; returns the override list of each job.

    Every job's config, and once each shard set (not with --dry-run), are checked for a world of
    --nodes x --tasks-per-node ranks (launch/args.py check_run). ConfigError / ShardError / OSError."""
    check_resources(args)
    specs = read_array_specs(args.array) if args.array else [[]]
    checked: dict[str, dict] = {}  # shard set -> its manifest, read and checked once
    for spec, run_dir in zip(specs, job_run_dirs(args, specs)):
        cfg = load_config(config, [*base, *spec])
        seen = checked.get(cfg.data.shards)
        manifest = check_run(cfg, args.nodes * tasks_per_node(args), args.gpus_per_node > 0,
                             sha256=args.check_sha256, shards=not args.dry_run and seen is None, run_dir=run_dir,
                             resume=args.resume)
        if seen is not None:  # the files were checked for an earlier job; this job's config still must fit them
            check_shards_fit(cfg, seen, stored_frame_size(cfg.data.shards, seen))
        elif not args.dry_run:
            checked[cfg.data.shards] = manifest
    return specs


def job_run_dirs(args, specs: list[list[str]]) -> list[Path]:
    """The run directory of each job: --run-dir, or one folder in it per --array line."""
    run_dir = Path(args.run_dir).resolve()
    width = len(str(len(specs) - 1))
    return [run_dir / sweep_dir_name(i, spec, width) for i, spec in enumerate(specs)] if args.array else [run_dir]


def print_dry_run(executor, folder: Path, max_requeues: int, jobs_fn: list, n_jobs: int) -> None:
    print("# sbatch parameters (submitit SlurmExecutor.update_parameters)")
    print(json.dumps(executor.parameters, indent=2, default=str))
    print(f"# max requeues: {max_requeues}; log folder: {folder}")
    for fn in jobs_fn:
        print(f"# job: config {fn.config}, run dir {fn.run_dir}, overrides {' '.join(fn.overrides)}")
    print("# sbatch script")
    print(sbatch_script(executor, n_jobs))


def print_submitted(jobs: list, specs: list, run_dir: Path, run_dirs: list[Path], params: dict) -> None:
    """Job ids, log paths, the sweep map (an array) and how to follow the run."""
    tasks = params["nodes"] * params["ntasks_per_node"]
    for job, rd in zip(jobs, run_dirs):
        paths = job.task(0).paths
        print(f"submitted job {job.job_id} ({tasks} task(s) on {params['nodes']} node(s)), run dir {rd}")
        print(f"  logs: {paths.stdout}  {paths.stderr}  (rank r: {job.job_id}_<r>_log.out/.err)")
    if len(jobs) > 1:
        (run_dir / "sweep.json").write_text(json.dumps(
            [{"index": i, "job_id": j.job_id, "overrides": s, "run_dir": str(rd)}
             for i, (j, s, rd) in enumerate(zip(jobs, specs, run_dirs))], indent=2) + "\n")
        print(f"  sweep: {run_dir / 'sweep.json'}")
    first = jobs[0].job_id.split("_")[0]
    print(f"  status: squeue -j {first}; sacct -j {first}")
    print(f"  tensorboard --logdir {run_dir if len(jobs) > 1 else run_dir / 'tb'}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from avs_dist.launch.slurm import TrainJob

    run_dir = Path(args.run_dir).resolve()
    config = _abs_config(args.config)
    base = [*args.overrides, f"data.shards={json.dumps(str(Path(args.shards).resolve()))}"]
    try:
        specs = check_request(args, config, base)
    except (ConfigError, RuntimeError, ValueError, OSError) as e:
        print(f"avs-dist submit: {e}", file=sys.stderr)
        return 2
    run_dirs = job_run_dirs(args, specs)
    folder = Path(args.log_folder).resolve() if args.log_folder else run_dir / "slurm"
    params = slurm_parameters(args, len(specs))
    try:
        executor = make_executor(folder, params, args.max_requeues, args.dry_run)
    except (RuntimeError, ValueError) as e:  # no srun on this machine; an option submitit rejects
        print(f"avs-dist submit: {e}", file=sys.stderr)
        return 2
    jobs_fn = [TrainJob(config, [*base, *spec], str(rd), args.max_requeues, resume=args.resume)
               for spec, rd in zip(specs, run_dirs)]
    if args.dry_run:
        print_dry_run(executor, folder, args.max_requeues, jobs_fn, len(specs))
        return 0

    from submitit.core.utils import FailedSubmissionError

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        jobs = executor.submit_array(jobs_fn)  # one function: submitit sends a plain (non-array) job
    except (FailedSubmissionError, OSError, RuntimeError) as e:
        print(f"avs-dist submit: sbatch failed: {e}", file=sys.stderr)
        return 1
    print_submitted(jobs, specs, run_dir, run_dirs, params)
    return wait_for(jobs, run_dirs) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
