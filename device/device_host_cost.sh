#!/usr/bin/env bash
# Where a warm engine's extra host time goes: the GPU's clocks and power sampled every 100 ms
# while cells run (nvidia-smi), each step's garbage-collection seconds recorded by `dooly bench`
# (`gc_s`). Runs the cells given as device_bench.py argument groups separated by `--`, each group
# in a fresh process. Everything lands in $OUT/host_cost.tar.gz.
# Usage (on the device machine, from the repository root):
#   device/device_host_cost.sh --models Qwen/Qwen2.5-7B --workloads heavy --variants graphs,warm -- \
#       --models meta-llama/Llama-3.2-1B --workloads calib --variants warm
set -uo pipefail
out="${OUT:-out}/host_cost"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 100 > "$out/smi.csv" 2> "$out/smi.err" &
sampler=$!
group=0
args=()
run_group() {
    group=$((group + 1))
    python3 device/device_bench.py --backends 'paged|sdpa' --out "$out" "${args[@]}" > "$out/group${group}.log" 2>&1 \
        || echo "group $group failed" >&2
    tar -C "${OUT:-out}" -czf "${OUT:-out}/host_cost.tar.gz" host_cost
    args=()
}
for arg in "$@"; do
    if [ "$arg" = "--" ]; then run_group; else args+=("$arg"); fi
done
[ "${#args[@]}" -gt 0 ] && run_group
kill "$sampler" 2>/dev/null
tar -C "${OUT:-out}" -czf "${OUT:-out}/host_cost.tar.gz" host_cost
rm -rf "$out"
