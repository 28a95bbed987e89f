#!/usr/bin/env bash
# Every GPU check of the perf issue in one command, for a lent GPU machine (device tool):
#   1. bench model: the reference configuration and our variants, side by side in one process;
#   2. the trainer on the GPU: exact resume under bf16 autocast + nccl, fp16 + GradScaler;
#   3. bench train: the real trainer from shards (s4_seed) against its own synthetic-input rate.
# Results go to $OUT (JSON + logs). SMOKE=1 runs the same steps tiny, on CPU, to check the script.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # the GPU image lacks webdataset/braceexpand/submitit: carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
D=/tmp/avs-gpu; rm -rf $D; mkdir -p $D

if [ "${SMOKE:-0}" = 1 ]; then
  PRESET=cpu; VARIANTS="reference_fp32_nchw_one_b2,factorized_fp32_nchw_one_b2_mmup"; STEPS=2; WARM=1
  VIDEOS=24; SIZE=64; CONFIG=tiny; TRAIN_STEPS=8; EXTRA="data.num_workers=1"; TT=120
else
  PRESET=full; STEPS=10; WARM=3; VIDEOS=120; SIZE=224; CONFIG=s4_seed; TRAIN_STEPS=24; TT=45
  VARIANTS="reference_fp32_nchw_one_b4,factorized_bf16_cl_one_b16,factorized_bf16_cl_two_b16,factorized_bf16_cl_two_b16_mmup,factorized_bf16_cl_two_b16_mmup_fadam,reference_fp32_nchw_one_b4_pvt,factorized_bf16_cl_one_b4_mmup_pvt,factorized_bf16_cl_two_b16_mmup_pvt"
  EXTRA="data.num_workers=8 data.batch_videos=16 ${BENCH_TRAIN_EXTRA:-}"
fi

if [ "${SKIP_MODEL:-0}" != 1 ]; then
echo "=== bench model"
timeout 240 $PY -m avs_dist bench model --preset $PRESET --steps $STEPS --warmup $WARM \
  --variants "$VARIANTS" --out "$OUT/bench_model.json" 2>&1 | tee "$OUT/bench_model.log"
fi

if [ "${SKIP_TRAINER:-0}" != 1 ]; then
echo "=== trainer on this device: exact resume, fp16 + GradScaler (tiny, 64 px)"
$PY -m avs_dist synth --out $D/small --videos 12 --size 64 --subset s4 --seed 0 --classes 3 >/dev/null &&
$PY -m avs_dist pack --data-root $D/small --subset s4 --out $D/small_shards --crop-size 32 --no-progress >/dev/null
C="--config tiny --shards $D/small_shards"
O="data.batch_videos=2 train.ckpt_every_steps=2 train.eval_every_steps=2 data.num_workers=1 optim.schedule=constant"
timeout $TT $PY -m avs_dist.launch.rank $C --run-dir $D/full $O train.max_steps=6 > "$OUT/t_full.log" 2>&1; echo "full rc=$?"
timeout $TT $PY -m avs_dist.launch.rank $C --run-dir $D/part $O train.max_steps=3 > "$OUT/t_part.log" 2>&1; echo "part rc=$?"
timeout $TT $PY -m avs_dist.launch.rank $C --run-dir $D/part $O train.max_steps=6 > "$OUT/t_part2.log" 2>&1; echo "resume rc=$?"
timeout $TT $PY -m avs_dist.launch.rank $C --run-dir $D/fp16 $O train.max_steps=3 train.precision=fp16 > "$OUT/t_fp16.log" 2>&1; echo "fp16 rc=$?"
$PY - "$D" <<'PY'
import json, sys
d = sys.argv[1]
def rows(r):
    try:
        return [(x["step"], x["total"]) for x in map(json.loads, open(f"{d}/{r}/metrics.jsonl"))]
    except OSError as e:
        return str(e)
full, part = rows("full"), rows("part")
print("full   ", full)
print("resumed", part)
print("resume identical:", full == part)
print("fp16   ", rows("fp16"))
PY
grep -h -E "Error|Traceback" "$OUT"/t_*.log | head -10
fi

echo "=== bench train ($CONFIG from shards at $SIZE px)"
$PY -m avs_dist synth --out $D/data --videos $VIDEOS --size $SIZE --subset s4 --seed 0 >/dev/null &&
$PY -m avs_dist pack --data-root $D/data --subset s4 --out $D/shards --workers 8 --no-progress \
  --crop-size $SIZE >"$OUT/pack.log" 2>&1 &&
timeout 150 $PY -m avs_dist bench train --config $CONFIG --shards $D/shards --steps $TRAIN_STEPS --warmup 4 \
  --out "$OUT/bench_train.json" $EXTRA 2>&1 | tail -25 | tee "$OUT/bench_train.log"
echo "=== done"
