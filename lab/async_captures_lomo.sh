#!/usr/bin/env bash
# Leave-one-model-out check of `dooly calibrate --async-captures single|split` on the H200 grid
# (docs/calibration.md, "Async batching's light-load TTFT"): for each of the three models, an async
# calibration is fitted on the OTHER two models' async runs (r1/r2 calib, light, heavy: several
# layer counts, which one calib run cannot give) in a copy of a fitted H200 store, in each form,
# and the held-out model's async light and heavy cells are validated against it.
# Usage (repository root): bash lab/async_captures_lomo.sh FITTED_H200_STORE OUT_DIR
set -euo pipefail
fitted=$1; out=$2
grid=data/h200/experiments/engine_grid
models="Llama-3.2-1B Llama-3.2-3B Llama-3.1-8B"
mkdir -p "$out"
for held in $models; do
  runs=()
  for m in $models; do
    [ "$m" = "$held" ] && continue
    for d in "$grid"/r*/"$m".paged-sdpa.async.*; do runs+=(--ground-truth "$d"); done
  done
  for mode in single split; do
    store="$out/store.$held.$mode"
    rm -rf "$store"; cp -r "$fitted" "$store"
    dooly calibrate --store "$store" --async-captures "$mode" "${runs[@]}" --output json > "$out/calibration.$held.$mode.json"
    for workload in light heavy; do
      cells=()
      for d in "$grid"/r*/"$held".paged-sdpa.async."$workload"; do cells+=(--ground-truth "$d"); done
      dooly validate "meta-llama/$held" --store "$store" --platform NVIDIA-H200 --backend 'paged|sdpa' "${cells[@]}" \
        --output json > "$out/validate.$held.$mode.$workload.json"
    done
    rm -rf "$store"
  done
done
