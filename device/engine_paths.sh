#!/usr/bin/env bash
# One device call, most needed first; every finished cell is packed at once (a call cut short keeps
# them). The model and exploration follow the GPU: on an H200 the unseen-model exploration of
# Llama-3.1-8B on the H200 store, on an H100 the committed exploration of the H100 store.
#   1. the configuration `dooly explore` chose, served at its predicted capacity, then at 1.25x;
#   2. the engine paths without a calibration: async batching (graphs on, beside graphs without it),
#      paged|eager with graphs;
#   3. the chosen configuration's light and heavy cells through the HTTP client, when the serving
#      wheels travelled (.whl: carried and installed into /tmp/site here, docs/engine-paths.md);
#   4. repeats of the async and graphs light/heavy cells (the engine's run-to-run floor).
# A further step, pairs (not in the default), serves the paged|sdpa graphs light and heavy cells
# through the HTTP client and in-process back to back, with the same `dooly bench` flags: the pairs
# `dooly server-costs` reads (HTTP cells under groundtruth/http, in-process ones under groundtruth/pairs).
# Usage (on the device, repository root): bash device/engine_paths.sh [STEPS [MODEL [WORKLOADS]]] with
# STEPS a comma-separated subset of explore,paths,http,repeat,pairs (default: explore,paths,http,repeat),
# MODEL the model of the paths, http, repeat and pairs steps (default: the exploration's) and WORKLOADS
# those of the http and pairs steps (default: light,heavy).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The HTTP cells' served models (random weights + tokenizer) saved once per model, reused by every
# later cell of the call (docs/simulate.md: an 8B in bfloat16 is 16 GB of it).
export DOOLY_MODEL_CACHE="${DOOLY_MODEL_CACHE:-/tmp/dooly-model-cache}"
# transformers serve's extras (fastapi, uvicorn, openai, ...) are not in the image: carried as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH#"$PWD"}"
fi
steps=",${1:-explore,paths,http,repeat},"
cell_workloads=${3:-light,heavy}
out="$OUT"
mkdir -p "$out/groundtruth" "$out/reports"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/reports/gpu.txt"
case "$gpu" in
  *H200*) explore=docs/explore/h200-llama/explore.json ;;
  *) explore=docs/explore/explore.json ;;
esac
model=${2:-$(python3 -c "import json; print(json.load(open('$explore'))['best']['candidate']['model'])")}
echo "$gpu: $explore, $model" | tee -a "$out/reports/plan.txt"
pack() { tar -C "$out" -czf "$out/engine-paths.tar.gz" groundtruth reports; }
grid() {  # REPEAT LIMIT_S device_bench ARGS...
  repeat=$1; limit=$2; shift 2
  timeout "$limit" python3 device/device_bench.py --models "$model" --out "$out/$repeat" "$@" >> "$out/reports/grid.$repeat.log" 2>&1
  mkdir -p "$out/groundtruth/$repeat"; cp -r "$out/$repeat/groundtruth/." "$out/groundtruth/$repeat/"; rm -rf "${out:?}/$repeat"; pack
}
if [[ $steps == *,explore,* ]]; then
  for scale in 1.0 1.25; do
    timeout 200 python3 device/serve_explore_choice.py "$explore" --scale "$scale" --out "$out/groundtruth/explore/x$scale" \
      > "$out/reports/explore.x$scale.json" 2> "$out/reports/explore.x$scale.log" || echo "explore x$scale failed"
    pack
  done
fi
if [[ $steps == *,paths,* ]]; then
  grid r1 200 --backends 'paged|sdpa' --workloads calib,light,heavy --variants async,graphs
  grid r1 130 --backends 'paged|eager' --workloads calib,light,heavy --variants graphs
fi
cell() {  # CLIENT DIR WORKLOAD: one paged|sdpa graphs cell, the same engine flags for both clients
  client=$1; dir=$2; workload=$3
  timeout 150 python3 -m dooly.cli bench "$model" --client "$client" --attention 'paged|sdpa' \
    --workload "device/workloads/$workload.json" --set use_cuda_graph=true --set num_blocks=1024 --set max_batch_tokens=2048 \
    --out "$out/groundtruth/$dir/${model##*/}.paged-sdpa.graphs.$workload" --output json \
    > "$out/reports/$dir.${model##*/}.$workload.json" 2> "$out/reports/$dir.${model##*/}.$workload.log" \
    || echo "$dir $workload failed: $(tail -1 "$out/reports/$dir.${model##*/}.$workload.log")"
  pack
}
if [[ $steps == *,http,* ]]; then
  for workload in ${cell_workloads//,/ }; do cell http http "$workload"; done
fi
if [[ $steps == *,pairs,* ]]; then
  for workload in ${cell_workloads//,/ }; do cell http http "$workload"; cell inprocess pairs "$workload"; done
fi
if [[ $steps == *,repeat,* ]]; then
  grid r2 150 --backends 'paged|sdpa' --workloads light,heavy --variants async,graphs
fi
ls -R "$out/groundtruth" | grep -v parquet | head -60
