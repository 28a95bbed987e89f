"""AVSS batching: the compute of data.avss_batching "pad" against "bucket" on the real train split.

Reads `bench model` JSONs with the `_avss` and `_avss_t10` variants of one batch size (cost per
clip at T = 5 and T = 10, measured side by side in each run; the steps of all runs pooled, median),
and also costs by FLOPs (the FlopCounterMode count of those variants), builds the loader's own TrainOrder
for the AVSBench-semantic train split's clip lengths (v1s + v1m: 5 frames, v2: 10;
/work/shared/avsbench-format.md), and counts, per epoch and per-rank micro-batch size b, the
frames each setting runs (a micro-batch is b consecutive positions of the epoch's sequence and
runs at its longest clip) and their cost at the measured per-clip times. Writes JSON.

    python docs/perf/avss_batching.py OUT.json BENCH_MODEL.json [...] [--v1s 3452 --v1m 296 --v2 4750]
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from avs_dist.data.loader import TrainOrder


def epoch_cost(order: TrainOrder, micro_batch: int, ms_per_clip: dict[int, float], epoch: int = 0) -> dict:
    """Frames run, frames that exist and the cost (ms at the measured per-clip times) of one epoch."""
    videos, _ = order.epoch(epoch)
    lengths = np.asarray(order.lengths)[videos].reshape(-1, micro_batch)
    t = lengths.max(axis=1)  # each micro-batch runs at its longest clip
    return {"steps": order.steps_per_epoch, "frames_run": int((t * micro_batch).sum()),
            "frames_existing": int(lengths.sum()),
            "cost_ms": float(sum(micro_batch * ms_per_clip[int(x)] for x in t))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("bench", nargs="+")
    ap.add_argument("--v1s", type=int, default=3452)
    ap.add_argument("--v1m", type=int, default=296)
    ap.add_argument("--v2", type=int, default=4750)
    ap.add_argument("--global-batches", default="4,8,16,32", help="G values (one rank: b = G)")
    a = ap.parse_args()
    benches = [json.load(open(f)) for f in a.bench]
    steps, by_name = {}, {}  # variant -> every timed step of every run (ms); one result of it
    for bench in benches:
        for r in bench["results"]:
            if "error" not in r:
                steps.setdefault(r["name"], []).extend(r["ms_per_step_all"])
                by_name[r["name"]] = r
    pairs, flops = {}, {}
    for name, r in by_name.items():
        if r["avss"] and r["frames"] == 5 and f"{name}_t10" in by_name:
            t10 = by_name[f"{name}_t10"]
            pairs[r["batch"]] = {5: statistics.median(steps[name]) / r["batch"],
                                 10: statistics.median(steps[t10["name"]]) / r["batch"]}
            flops[r["batch"]] = {5: r["gflop_per_frame"] * 5, 10: t10["gflop_per_frame"] * 10}  # GFLOP per clip
    if not pairs:
        raise SystemExit(f"{a.bench}: no _avss / _avss_t10 pair of one batch size")
    n5, n10 = a.v1s + a.v1m, a.v2
    lengths = (5,) * n5 + (10,) * n10
    refs = tuple(("-", str(i)) for i in range(len(lengths)))
    rows = []
    for g in (int(x) for x in a.global_batches.split(",")):
        for b in sorted({d for d in (1, 2, 4, 8, 16, 32) if g % d == 0}):
            near = min(pairs, key=lambda m: abs(m - b))  # the per-clip cost of the nearest measured batch
            orders = {k: TrainOrder(refs, 0, g, lengths=lengths, bucket=k == "bucket") for k in ("pad", "bucket")}
            cost = {k: epoch_cost(o, b, pairs[near]) for k, o in orders.items()}
            by_flops = {k: epoch_cost(o, b, flops[near])["cost_ms"] for k, o in orders.items()}
            rows.append({"global_batch": g, "micro_batch": b, "per_clip_cost_from_batch": near, **cost,
                         "pad_padded_frame_fraction": 1 - cost["pad"]["frames_existing"] / cost["pad"]["frames_run"],
                         "pad_over_bucket_cpu_time": cost["pad"]["cost_ms"] / cost["bucket"]["cost_ms"],
                         "pad_over_bucket_flops": by_flops["pad"] / by_flops["bucket"]})
    out = {"bench_model": a.bench, "device": benches[0]["device"], "dates": [b["date"] for b in benches],
           "train_clips": {"v1s": a.v1s, "v1m": a.v1m, "v2": a.v2, "5_frames": n5, "10_frames": n10},
           "ms_per_clip": {str(b): {str(t): v for t, v in p.items()} for b, p in pairs.items()},
           "t10_over_t5_per_clip_cpu_time": {str(b): p[10] / p[5] for b, p in pairs.items()},
           "gflop_per_clip": {str(b): {str(t): v for t, v in p.items()} for b, p in flops.items()},
           "reference_padded_frame_fraction": 1 - (5 * n5 + 10 * n10) / (10 * (n5 + n10)),
           "rows": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    for r in rows:
        print(f"G {r['global_batch']:3} b {r['micro_batch']:3}: pad runs {100 * r['pad_padded_frame_fraction']:.1f}% "
              f"padded frames; pad / bucket: CPU time {r['pad_over_bucket_cpu_time']:.3f}, "
              f"FLOPs {r['pad_over_bucket_flops']:.3f}")


if __name__ == "__main__":
    main()
