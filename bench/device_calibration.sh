#!/usr/bin/env bash
# Confirm on a GPU what docs/calibration.md and docs/profile.md claim from committed data.
# Usage (on the device machine, from the repository root; each step fits in one 10-minute call):
#   bench/device_calibration.sh plan     # plan, then profile Llama-3.1-8B into a copy of data/h200/db
#   bench/device_calibration.sh repeats N  # calib workload, repeat N (run N = 1, 2, 3: one call each,
#                                          # ideally on two leases), 2 models, graphs off and on
# plan: $OUT/reports/plan.json (missing_points, expected_refinement_points, estimated_device_seconds)
#   against $OUT/reports/profile.json (planned_points, refinement_points, device_seconds): the
#   counts must agree exactly, the device-seconds within 25%.
# repeats: $OUT/calib/r{1,2,3}/<model>.paged-sdpa.<default|graphs>.calib, each from a fresh process;
#   fit them here with `dooly calibrate --dry-run` per repeat and per pair of models (docs/calibration.md).
# Shard and calibration keys hold '=' and '~', which the device tool does not bring back as names:
# everything ships as one archive, refreshed after every run.
set -euo pipefail
step="$1"
out="${OUT:-out}"
mkdir -p "$out/reports"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/reports/gpu.txt" || true
case "$step" in
  plan)
    rm -rf "$out/db" && cp -r data/h200/db "$out/db"
    python3 -m dooly.cli plan meta-llama/Llama-3.1-8B --store "$out/db" --attention 'paged|sdpa' --output json \
        > "$out/reports/plan.json"
    python3 -m dooly.cli profile meta-llama/Llama-3.1-8B --store "$out/db" --attention 'paged|sdpa' --output json \
        > "$out/reports/profile.json" 2> "$out/reports/profile.log"
    python3 - "$out/reports" <<'PY'
import json, sys
plan = json.load(open(f"{sys.argv[1]}/plan.json")); spent = json.load(open(f"{sys.argv[1]}/profile.json"))
print(f"points: plan {plan['missing_points']} (+{plan['expected_refinement_points']} expected) / "
      f"profile {spent['planned_points']} (+{spent['refinement_points']})")
print(f"device-s: plan {plan['estimated_device_seconds']} / profile {spent['device_seconds']} "
      f"({100 * (plan['estimated_device_seconds'] / spent['device_seconds'] - 1):+.1f}%)")
PY
    tar -C "$out" -czf "$out/plan.tar.gz" db reports
    ;;
  repeats)
    for repeat in "${2:?repeat number}"; do
      for model in meta-llama/Llama-3.2-1B meta-llama/Llama-3.2-3B; do
        for graphs in false true; do
          variant=$([ "$graphs" = true ] && echo graphs || echo default)
          cell="$out/calib/r$repeat/${model#*/}.paged-sdpa.$variant.calib"
          python3 -m dooly.cli bench "$model" --attention 'paged|sdpa' --workload device/workloads/calib.json \
              --set use_cuda_graph="$graphs" --set max_batch_tokens=2048 --set num_blocks=1024 --out "$cell" \
              --output json > "$out/reports/bench.r$repeat.${model#*/}.$variant.json" || echo "$cell failed" >&2
          tar -C "$out" -czf "$out/calib.r$repeat.tar.gz" calib reports
        done
      done
    done
    ;;
  *) echo "usage: $0 plan|repeats" >&2; exit 2 ;;
esac
