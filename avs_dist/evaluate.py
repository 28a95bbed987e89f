"""`avs-dist eval`: AVSBench mIoU / F of a checkpoint, batch-size-free figures, and the audio gap
(how they are computed: evaluation.py; AVSS: avss/evaluation.py, with a per-class table and
`per_class` in the JSON).

    avs-dist eval --checkpoint RUN_OR_CHECKPOINT --shards DIR [--split test] [--out result.json]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from avs_dist.evaluation import evaluate_loaded, load_with_source
from avs_dist.fileio import write_json
from avs_dist.helpformat import HelpFormatter
from avs_dist.precision import PRECISIONS

# The AVSS result's rows of the first table (the other figures are under the per-class table).
_AVSS_SHOWN = ("miou_avsbench", "f_avsbench", "miou", "f", "audio_gap", "miou_mismatched", "f_mismatched",
               "videos", "frames")


def print_result(result: dict, title: str) -> None:
    """The figures as a table; an AVSS result (it has `per_class`): its headline figures, then
    the per-class table with the summary figures under it (avss/report.py)."""
    from rich.console import Console
    from rich.table import Table

    semantic = isinstance(result.get("per_class"), list)
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if semantic and key not in _AVSS_SHOWN:
            continue
        if value is None:
            table.add_row(key, "n/a")
        elif isinstance(value, (int, float)):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if semantic:
        from avs_dist.avss.report import format_per_class

        names = [e.get("name", str(e["index"])) for e in result["per_class"]]
        print(format_per_class(result, names))


def _gap_chart(per_class: dict | None, args, semantic: bool = False) -> None:
    """The per-class audio gap: a table on the terminal and, with --plot or --out, a bar chart."""
    if not per_class:
        return
    print("audio gap per class: " + ", ".join(f"{k} {v:+.3f}" for k, v in per_class.items()))
    path = args.plot or (str(Path(args.out).with_name(Path(args.out).stem + "_audio_gap.png")) if args.out else None)
    if path is None:
        return
    try:
        from avs_dist.plots import plot_audio_gap
    except ImportError as e:  # matplotlib is optional where only training runs (the GPU machine's image)
        print(f"WARNING: no audio gap chart: {e} (pip install matplotlib)", file=sys.stderr)
        return
    xlabel = ("IoU (frame level) with the clip's own audio - with another clip's audio" if semantic
              else None)
    plot_audio_gap(per_class, path, f"audio gap per class: {args.split} of {args.checkpoint}", xlabel=xlabel)
    print(f"wrote {path}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avs-dist eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint folder, its model.pt, a run/checkpoints folder, or an AVSBench .pth")
    p.add_argument("--shards", required=True, help="shard set written by `avs-dist pack`")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-videos", type=int, default=None,
                   help="AVSBench test batch in videos for the batch-dependent figures (default: config, 4)")
    p.add_argument("--vggish-weights", default=None, help="vggish-10086976.pth (for AVSBench reference checkpoints)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-audio-gap", action="store_true", help="skip the mismatched-audio pass")
    p.add_argument("--plot", default=None,
                   help="write the audio gap per class as a bar chart PNG here (default: beside --out, "
                        "<out>_audio_gap.png; none without --out)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--num-workers", type=int, default=None, help="loader processes (default: config)")
    p.add_argument("--check-sha256", action="store_true",
                   help="also check the split's shards' sha256 against the manifest (always: present, right size)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. data.image_size=224)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    from avs_dist import distributed
    from avs_dist.data.shards import ShardError, check_shards
    from avs_dist.provenance import describe

    try:  # before any model is built or process group joined
        check_shards(args.shards, [args.split], sha256=args.check_sha256)
    except ShardError as e:
        print(f"avs-dist eval: error: {e}", file=sys.stderr)
        return 2

    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = distributed.setup() if world > 1 else None
    if d is not None:
        device = d.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = d.rank if d else 0
    try:
        try:
            model, cfg, source = load_with_source(args.checkpoint, device, args.vggish_weights, args.overrides)
        except (OSError, ValueError) as e:  # a checkpoint that cannot be evaluated: one line (WeightsError too)
            print(f"avs-dist eval: error: {e}", file=sys.stderr)
            return 2
        result = evaluate_loaded(model, cfg, source, args.shards, args.split, device, d,
                                 batch_videos=args.batch_videos, num_workers=args.num_workers,
                                 audio_gap=not args.no_audio_gap, precision=args.precision)
        result["checkpoint"] = str(Path(args.checkpoint).resolve())
        if rank == 0:
            # the source on its own line: a table title is wrapped to the table's narrow width
            print(f"{args.split}, {describe(source)}: {source['checkpoint']}", flush=True)
            print_result(result, args.split)
            if args.out:
                write_json(args.out, result)
            _gap_chart(result.get("audio_gap_per_class"), args, isinstance(result.get("per_class"), list))
    finally:
        if d is not None:
            distributed.teardown()
    if d is not None:
        distributed.hard_exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
