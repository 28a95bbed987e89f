"""`avs-dist` command line: each subcommand lives in its own module and parses its own flags."""
from __future__ import annotations

import importlib
import sys

# name -> (module:function taking argv, one-line help). Imports are lazy so that
# `avs-dist synth` does not pay for torch.distributed, DeepSpeed or submitit.
COMMANDS = {
    "synth": ("avs_dist.data.synth:main", "write a synthetic dataset in the AVSBench layout"),
    "extract": ("avs_dist.extract:main", "AVSBench raw_videos/ -> frames, 16 kHz wav, log-mel, as the reference makes them"),
    "pack": ("avs_dist.data.pack:main", "pack an AVSBench download into WebDataset shards"),
    "inspect": ("avs_dist.data.inspect:main", "check a shard set against its manifest and show a sample"),
    "train": ("avs_dist.launch.local:main", "train (one process, or --nproc N local processes under torchrun)"),
    "eval": ("avs_dist.evaluate:main", "evaluate a checkpoint: AVSBench mIoU/F, batch-size-free, audio gap"),
    "predict": ("avs_dist.predict:main", "write mask PNGs and overlays for frames + audio or a shard set"),
    "submit": ("avs_dist.launch.submit:main", "submit a training run to Slurm with submitit"),
    "demo": ("avs_dist.demo:main", "synth -> pack -> 2-process training -> eval, on CPU"),
    "plot": ("avs_dist.plots:main", "write a run folder's loss and evaluation curves as PNGs"),
}
BENCH = {
    "data": ("avs_dist.data.bench:main", "shard loader vs per-file loader, videos/s per core"),
    "model": ("avs_dist.bench_model:main", "training-step throughput, memory and FLOPs of model variants"),
    "train": ("avs_dist.bench_train:main", "end-to-end trainer throughput from shards vs synthetic input"),
    "extract": ("avs_dist.video.bench:main", "avs-dist extract vs the reference recipe on the same clips, same output"),
}
STUDY = {
    "run": ("avs_dist.study.cli:run_main", "train a study's unfinished runs on this machine, then report"),
    "submit": ("avs_dist.study.cli:submit_main", "submit a study's unfinished runs as one Slurm job array"),
    "report": ("avs_dist.study.cli:report_main", "write and print a study folder's report"),
}
# Commands made of subcommands: name -> (their table, one-line help).
GROUPS = {
    "bench": (BENCH, "benchmarks: " + ", ".join(BENCH)),
    "study": (STUDY, "arms x seeds on this machine or one Slurm array, and their report"),
}


def _usage(table: dict, prog: str) -> str:
    width = max(len(k) for k in table)
    lines = [f"usage: {prog} [--version] <command> [args]" if prog == "avs-dist" else f"usage: {prog} <command> [args]",
             "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in table.items()]
    return "\n".join(lines)


def _run(target: str, argv: list[str], prog: str) -> int:
    """Run one command; a UserError (avs_dist/errors.py) from anywhere below is its one-line
    message, exit status 2, and no traceback."""
    from avs_dist.errors import UserError

    module, func = target.split(":")
    try:
        result = getattr(importlib.import_module(module), func)(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


def version() -> str:
    """The installed package's version (pyproject.toml), or "unknown" for a source tree that
    was never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("avs-dist")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = {**COMMANDS, **{name: ("", help_) for name, (_, help_) in GROUPS.items()}}
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(table, "avs-dist"))
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"avs-dist {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name in GROUPS:
        sub = GROUPS[name][0]
        if not rest or rest[0] in ("-h", "--help") or rest[0] not in sub:
            asked = not rest or rest[0] in ("-h", "--help")
            print(_usage(sub, f"avs-dist {name}"), file=sys.stdout if asked else sys.stderr)
            return 0 if asked else 2
        return _run(sub[rest[0]][0], rest[1:], f"avs-dist {name} {rest[0]}")
    if name not in COMMANDS:
        print(f"avs-dist: unknown command {name!r}\n\n{_usage(table, 'avs-dist')}", file=sys.stderr)
        return 2
    return _run(COMMANDS[name][0], rest, f"avs-dist {name}")


if __name__ == "__main__":
    sys.exit(main())
