#!/usr/bin/env bash
# Issue #24's large token budget on one GPU, in one device call under one deadline, in this order:
# Llama-3.1-8B's heavy cell (`paged|sdpa`, CUDA graphs, in-process) served at max_batch_tokens 8192;
# the 8B's missing points of an 8192-token budget profiled into a copy of the committed store of this
# platform (`dooly profile --token-budget 8192`: only what the store lacks); the cell at the grid's
# 2048 (the same lease's reference) and at 8192 again (its floor); last the 8192 cell's steps kernel
# by kernel (lab/engine_step_profile.py) while time is left. Everything finished is packed at once
# (budget.tar.gz: groundtruth/<run>/<cell>, db/ as profiled, steps.json, reports/).
# Usage (on the device, repository root): bash device/token_budget.sh DEADLINE_S SEED_STORE
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
deadline=$1 seed=$2
model=meta-llama/Llama-3.1-8B
out="$OUT/budget"
mkdir -p "$out/groundtruth" "$out/reports" "$out/db"
cp -r "$seed/." "$out/db/"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/reports/gpu.txt"
pack() { tar -C "$out" -czf "$OUT/budget.tar.gz" groundtruth reports db $(cd "$out" && ls steps.json 2>/dev/null); }
# A step starts only with at least MIN_STEP_S left, and never runs past the deadline.
MIN_STEP_S=30
step() {
  local name=$1; shift
  local left=$((deadline - SECONDS))
  (( left < MIN_STEP_S )) && { echo "skipped $name: deadline" | tee -a "$out/reports/walls.txt"; return; }
  local start=$SECONDS
  # timeout runs programs, not this script's functions: a function runs in a child bash that has it.
  declare -F "$1" > /dev/null && set -- bash -c '"$@"' _ "$@"
  timeout "$left" "$@" >> "$out/reports/$name.log" 2>&1 || echo "$name: exit $? after $((SECONDS - start)) s"
  echo "$name: $((SECONDS - start)) s" >> "$out/reports/walls.txt"
  pack
}
cell() {  # RUN BUDGET: the heavy graphs cell at that max_batch_tokens, into groundtruth/RUN
  python3 device/device_bench.py --models "$model" --backends 'paged|sdpa' --variants graphs --workloads heavy \
    --set "max_batch_tokens=$2" --out "$out/$1.work" \
    && mkdir -p "$out/groundtruth/$1" && cp -r "$out/$1.work/groundtruth/." "$out/groundtruth/$1/"
}
export model out
export -f cell
step mbt8192_r1 cell mbt8192_r1 8192
# From the committed trace: torch 2.11 (the device's) specialises the request dims while tracing.
step profile python3 -m dooly.cli profile data/traces/Llama-3.1-8B.paged-sdpa.json --store "$out/db" \
  --attention 'paged|sdpa' --token-budget 8192 --output json
step mbt2048 cell mbt2048 2048
step mbt8192_r2 cell mbt8192_r2 8192
step steps python3 lab/engine_step_profile.py --ground-truth "$out/groundtruth/mbt8192_r1/Llama-3.1-8B.paged-sdpa.graphs.heavy" \
  --model "$model" --out "$out/steps.json"
cat "$out/reports/walls.txt"
