#!/usr/bin/env bash
# Issue #24's engine-path grid for several models in one device call, most needed first, under one
# deadline: every finished cell is packed at once (grid.tar.gz), so a call cut short keeps them.
# For each model, round by round (r1, r2, ...: the engine's run-to-run floor comes from the rounds):
#   paged|sdpa with CUDA graphs, with async batching, and without graphs; paged|eager with graphs;
#   each on the light and heavy workloads (device/workloads).
# Round 1 adds each path's calib run, so every lease carries its own calibration inputs (the engine's
# host time per step differs between leases of one platform). On an H200 the models are first
# profiled into a copy of the committed H200 store (with the Llama-3.1-8B rows of
# data/h200/experiments/unseen_llama) from their committed traces (torch 2.11 cannot trace with
# symbolic request dims).
# Usage (on the device, repository root): bash device/engine_grid.sh MODELS [ROUNDS [DEADLINE_S [R1_WORKLOADS]]]
#   MODELS: comma-separated model ids; ROUNDS: default 2; DEADLINE_S: seconds for the whole grid;
#   R1_WORKLOADS: round 1's workloads, default calib,light,heavy (light,heavy where another model
#   already ran this lease's calib cells: a path's calibration serves every model).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
models=$1; rounds=${2:-2}; deadline=${3:-540}; workloads_r1=${4:-calib,light,heavy}
out="$OUT/grid"
mkdir -p "$out/groundtruth" "$out/reports"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/reports/gpu.txt"
pack() { tar -C "$out" -czf "$OUT/grid.tar.gz" groundtruth reports $([ -d "$out/db" ] && echo db); }
left() { echo $((deadline - SECONDS)); }
# A step runs only with at least MIN_STEP_S left, and never past the deadline.
MIN_STEP_S=30
step() {  # NAME LIMIT_S COMMAND...: log to reports/NAME.log, pack after
  name=$1; limit=$2; shift 2
  (( $(left) < MIN_STEP_S )) && { echo "skipped $name: deadline"; return; }
  (( limit > $(left) )) && limit=$(left)
  start=$SECONDS
  timeout "$limit" "$@" >> "$out/reports/$name.log" 2>&1 || echo "$name: exit $? after $((SECONDS - start)) s"
  echo "$name: $((SECONDS - start)) s" >> "$out/reports/walls.txt"
  pack
}
if [[ $gpu == *H200* ]]; then
  mkdir -p "$out/db" && cp -r data/h200/db/. data/h200/experiments/unseen_llama/store/. "$out/db/"
  for model in ${models//,/ }; do
    for backend in 'paged|sdpa' 'paged|eager'; do
      trace="data/traces/${model##*/}.${backend/|/-}.json"
      step "profile.${model##*/}.${backend/|/-}" 180 python3 -m dooly.cli profile "$trace" --store "$out/db" --attention "$backend" --output json
    done
  done
fi
bench() {  # ROUND MODEL WORKLOADS BACKEND VARIANTS LIMIT_S
  step "$1.${2##*/}.${4/|/-}" "$6" python3 device/device_bench.py --models "$2" --backends "$4" --variants "$5" \
    --workloads "$3" --out "$out/$1"
  mkdir -p "$out/groundtruth/$1"; cp -r "$out/$1/groundtruth/." "$out/groundtruth/$1/" 2>/dev/null; rm -rf "${out:?}/$1"; pack
}
for model in ${models//,/ }; do
  for round in $(seq 1 "$rounds"); do
    workloads=$([ "$round" = 1 ] && echo "$workloads_r1" || echo light,heavy)
    bench "r$round" "$model" "$workloads" 'paged|sdpa' graphs,async,default 300
    bench "r$round" "$model" "$workloads" 'paged|eager' graphs 200
  done
done
cat "$out/reports/walls.txt"; ls -R "$out/groundtruth" | grep -v parquet | grep -v json | head -80
