#!/usr/bin/env bash
# The same training on GPUs: Ray Train workers on CUDA devices, NCCL; DeepSpeed ZeRO 0/2/3, then the row-sharded
# item table (train.strategy=sharded: TorchRec over NCCL, fbgemm's fused Adam on the table's rows). Prints each
# run's examples/s (all workers) and, sharded, the rows gathered per step. Each run once per train.precision
# (fp32, bf16: autocast) and train.compile (off, on: its compile_seconds printed too). Needs a CUDA build of torch in
# .venv (GPU clusters install the pinned stack with the CUDA wheels, see cluster/) and the dataset in EIMF_DATA_DIR.
#
#   benchmarks/gpu_train.sh [dataset] [steps]          e.g. benchmarks/gpu_train.sh ml-1m 2000
#   PRECISIONS="fp32 bf16" COMPILES="false true" (the defaults) choose the settings, e.g. PRECISIONS=bf16 COMPILES=true
#   EIMF_DATASET_ARGS="..." overrides the dataset selection, e.g. a synthetic catalogue from `eimf data synth`:
#   EIMF_DATASET_ARGS="data.dataset=custom data.interactions=/data/synth/interactions \
#       data.items=/data/synth/items.parquet data.text_cols=[title] data.min_count=1" benchmarks/gpu_train.sh - 2000
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET="${1:-ml-1m}"
STEPS="${2:-2000}"
PY="${PYTHON:-.venv/bin/python}"
GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -lt 1 ]; then echo "no CUDA device visible to torch" >&2; exit 2; fi
export RAY_USAGE_STATS_ENABLED=0
WORKER_COUNTS="1"; [ "$GPUS" -gt 1 ] && WORKER_COUNTS="1 $GPUS"
# shellcheck disable=SC2206
DATA_ARGS=(${EIMF_DATASET_ARGS:-data.dataset=$DATASET})
PRECISIONS="${PRECISIONS:-fp32 bf16}"
COMPILES="${COMPILES:-false true}"
# The run's final metrics line: examples/s, and compile_seconds where train.compile=true.
metrics() { grep -E '"examples_per_s"' | tail -1 | grep -oE '"(examples_per_s|gathered_rows_per_step|compile_seconds|compile_fell_back)": [0-9.e+-]+' \
  | tr '\n' ' '; echo; }
for WORKERS in $WORKER_COUNTS; do
  for PRECISION in $PRECISIONS; do
    for COMPILE in $COMPILES; do
      SETTING="precision=${PRECISION} compile=${COMPILE}"
      RUN="p${PRECISION}-c${COMPILE}"
      for STAGE in 0 2 3; do
        "$PY" jobs/train.py "${DATA_ARGS[@]}" train.scaling.use_gpu=true train.scaling.num_workers="$WORKERS" \
          train.strategy=deepspeed train.deepspeed.zero_stage="$STAGE" train.max_steps="$STEPS" \
          train.eval_every=1000000 train.precision="$PRECISION" train.compile="$COMPILE" \
          train.batch_size=$((128 * WORKERS)) tracking.experiment=gpu-bench \
          train.run_name="gpu-${WORKERS}w-z${STAGE}-${RUN}-$(date +%s)" 2>&1 | metrics \
          | sed "s/^/workers=${WORKERS} zero=${STAGE} ${SETTING} (per-worker batch 128): /"
      done
      # The sharded table (one worker too: the fused sparse update alone, no all-to-all); its rows stay fp32.
      "$PY" jobs/train.py "${DATA_ARGS[@]}" train.scaling.use_gpu=true train.scaling.num_workers="$WORKERS" \
        train.strategy=sharded train.max_steps="$STEPS" train.eval_every=1000000 train.precision="$PRECISION" \
        train.compile="$COMPILE" train.batch_size=$((128 * WORKERS)) tracking.experiment=gpu-bench \
        train.run_name="gpu-${WORKERS}w-sharded-${RUN}-$(date +%s)" 2>&1 | metrics \
        | sed "s/^/workers=${WORKERS} sharded ${SETTING} (per-worker batch 128): /"
    done
  done
done
