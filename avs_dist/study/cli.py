"""`avs-dist study`: arms x seeds, trained on this machine or as one Slurm array, and a report.

    avs-dist study run seed_ablation --shards shards/s4 --out studies/abl [--nproc 4] [--gpus 0,1,2,3,4,5,6,7]
    avs-dist study submit seed_ablation --shards shards/s4 --out studies/abl --gpus-per-node 4 [--wait]
    avs-dist study report studies/abl

STUDY is a shipped study (avs_dist/studies: seed_ablation, seed_ablation_pvt, tiny_demo) or a
.toml path (format: avs_dist/study/plan.py). Each (arm, seed) is one run folder in
OUT/runs/<arm>/seed<seed>; OUT/plan.json holds the plan, and an OUT made from another plan is
refused. Running or submitting again continues the study: finished runs are skipped, stopped
and preempted ones resume, failed ones are reported (--retry-failed runs them again).
Every run's config, the shards and any checkpoint a run would resume are checked before
anything starts. The report (OUT/report.md, report.json, runs.csv, plots/) is written and
printed when a study ends; `study report` rewrites it at any time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from avs_dist.helpformat import HelpFormatter


def _common(p: argparse.ArgumentParser) -> None:
    from avs_dist.study.plan import study_names

    p.add_argument("study", help=f"shipped study ({', '.join(study_names())}) or a study .toml path")
    p.add_argument("--shards", required=True, help="shard set written by `avs-dist pack` (every run's data.shards)")
    p.add_argument("--out", required=True, help="the study folder: plan.json, runs/<arm>/seed<seed>, the report")
    p.add_argument("--seeds", default=None, help="comma-separated seeds instead of the study file's, e.g. 1,2,3,4,5")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of every run (after the study's common)")


def _parser(cmd: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"avs-dist study {cmd}", description=description, formatter_class=HelpFormatter)


def _plan(args, world_size: int, cuda: bool) -> dict:
    """The checked plan, saved in --out (StudyError / ConfigError / ShardError otherwise)."""
    from avs_dist.study.plan import StudyError, check_runs, load_study, make_plan, save_plan

    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise StudyError(f"--seeds {args.seeds}: expected comma-separated integers, e.g. 1,2,3") from None
    plan = make_plan(load_study(args.study), args.shards, args.overrides, seeds)
    check_runs(plan, args.out, world_size, cuda)
    save_plan(args.out, plan)
    return plan


def report(study_dir) -> None:
    """Write the study's report files and print the report."""
    from avs_dist.study.report import format_text, write_report

    print(format_text(write_report(study_dir)), flush=True)


def run_main(argv: list[str]) -> int:
    """`avs-dist study run`: train the unfinished runs on this machine, then report."""
    import torch

    from avs_dist.study.plan import StudyError
    from avs_dist.study.run import LocalStudy, slot_envs

    p = _parser("run", "train the study's unfinished runs on this machine, then write and print the report")
    _common(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (avs-dist train --nproc)")
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU ids: runs go at once on disjoint sets of --nproc of them")
    p.add_argument("--parallel", type=int, default=1, help="without --gpus: runs at once, sharing the CPU cores")
    args = p.parse_intermixed_args(argv)
    if args.nproc < 1 or args.parallel < 1:
        raise StudyError("--nproc and --parallel must be >= 1")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    plan = _plan(args, args.nproc, bool(gpus) or torch.cuda.is_available())
    try:
        slots = slot_envs(args.nproc, gpus, args.parallel)
    except ValueError as e:
        raise StudyError(str(e)) from None
    out = Path(args.out).resolve()
    print(f"study {plan['study']}: {len(plan['arms'])} arms x {len(plan['seeds'])} seeds = {len(plan['runs'])} runs "
          f"in {out} ({len(slots)} at a time)", flush=True)
    rc = LocalStudy(out, plan, args.nproc, slots, args.retry_failed,
                    say=lambda m: print(m, flush=True)).run()
    report(out)
    return rc


def submit_main(argv: list[str]) -> int:
    """`avs-dist study submit`: the unfinished runs as one Slurm job array (one task per run)."""
    from avs_dist.launch.submit import (check_resources, make_executor, slurm_arguments, slurm_parameters,
                                        tasks_per_node, wait_for)
    from avs_dist.study.plan import run_dir
    from avs_dist.study.state import ERROR_FILE, run_state
    from avs_dist.study.slurm_job import StudyJob

    p = _parser("submit", "submit the study's unfinished runs as one Slurm job array (one task per run)")
    _common(p)
    slurm_arguments(p)
    p.add_argument("--array-parallelism", type=int, default=256, help="array tasks running at once")
    p.add_argument("--wait", action="store_true", help="block until the jobs end, then report; exit 0 iff all finished")
    args = p.parse_intermixed_args(argv)
    check_resources(args)
    plan = _plan(args, args.nodes * tasks_per_node(args), args.gpus_per_node > 0)
    out = Path(args.out).resolve()
    todo = [r for r in plan["runs"] if run_state(run_dir(out, r))["state"] not in
            ("finished", *(() if args.retry_failed else ("failed",)))]
    if not todo:
        print(f"study {plan['study']}: nothing to submit (every run finished or failed; --retry-failed)")
        report(out)
        return 0
    shards = plan["shards"]
    jobs_fn = []
    for run in todo:
        (run_dir(out, run) / ERROR_FILE).unlink(missing_ok=True)
        jobs_fn.append(StudyJob(run["preset"], [*run["overrides"], f"data.shards={json.dumps(shards)}"],
                                str(run_dir(out, run)), args.max_requeues, resume="auto", shards=shards))
    args.config = plan["study"]  # the default job name: avs-<study>
    params = slurm_parameters(args, len(jobs_fn))
    executor = make_executor(Path(args.log_folder).resolve() if args.log_folder else out / "slurm", params,
                             args.max_requeues, dry_run=False)
    jobs = executor.submit_array(jobs_fn)
    from avs_dist.fileio import write_json

    write_json(out / "jobs.json", [{"arm": r["arm"], "seed": r["seed"], "job_id": j.job_id, "run_dir": r["run_dir"]}
                                   for r, j in zip(todo, jobs)])
    print(f"study {plan['study']}: submitted {len(jobs)} of {len(plan['runs'])} runs as one array "
          f"(job {jobs[0].job_id.split('_')[0]}; map in {out / 'jobs.json'})", flush=True)
    if not args.wait:
        print(f"  when they end: avs-dist study report {out}")
        return 0
    rc = wait_for(jobs, [Path(j.run_dir) for j in jobs_fn])
    for run, job in zip(todo, jobs):
        state = run_state(run_dir(out, run))["state"]
        if state not in ("finished", "failed"):  # killed or cancelled: nothing wrote an error
            error = run_dir(out, run) / ERROR_FILE
            error.parent.mkdir(parents=True, exist_ok=True)
            error.write_text(f"Slurm job {job.job_id} ended {job.state} without a result (its log: "
                             f"{job.paths.stderr})\n")
    report(out)
    return rc


def report_main(argv: list[str]) -> int:
    """`avs-dist study report DIR`: write and print a study folder's report."""
    from avs_dist.study.plan import read_plan

    p = _parser("report", "write (report.md, report.json, runs.csv, plots/) and print a study folder's report")
    p.add_argument("dir", help="the study folder (--out of study run / submit)")
    args = p.parse_args(argv)
    read_plan(args.dir)  # StudyError for a folder that is not a study's
    report(Path(args.dir).resolve())
    return 0
