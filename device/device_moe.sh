#!/usr/bin/env bash
# The MoE cells on a GPU with room for Mixtral-8x7B in bf16 (93 GB of weights: an H200, not an
# H100 80GB): profile it from an empty store for the given backends, then record its ground truth
# (device/device_bench.py, workloads calib, light, heavy). Everything lands in $OUT/moe.tar.gz.
# Usage (on the device machine, from the repository root):
#   device/device_moe.sh 'paged|sdpa' [PROFILE_SECONDS BENCH_SECONDS]
set -uo pipefail
backend="$1"
profile_s="${2:-200}"
bench_s="${3:-330}"
out="${OUT:-out}"
model=mistralai/Mixtral-8x7B-v0.1
trace="data/traces/Mixtral-8x7B-v0.1.${backend//|/-}.json"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out/moe"
if [ -n "${DOOLY_DB_SEED:-}" ]; then mkdir -p "$out/moe/db" && cp -r "$DOOLY_DB_SEED/." "$out/moe/db/"; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/moe/gpu.txt" || true
timeout "$profile_s" python3 -m dooly.cli profile "$trace" --store "$out/moe/db" --attention "$backend" --output json \
    > "$out/moe/profile.${backend//|/-}.json" 2> "$out/moe/profile.${backend//|/-}.log" || echo "profile stopped: $?" >&2
timeout "$bench_s" python3 device/device_bench.py --models "$model" --backends "$backend" --workloads calib,light,heavy \
    --variants default --out "$out/moe" ${MOE_SETTINGS:-} > "$out/moe/bench.${backend//|/-}.log" 2>&1 || echo "bench stopped: $?" >&2
tar -C "$out" -czf "$out/moe.tar.gz" moe
rm -rf "$out/moe"
