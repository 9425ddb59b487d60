#!/usr/bin/env bash
# H200: plan then profile Llama-3.1-8B (from its committed traces: torch 2.11 cannot trace
# with symbolic request dims) into a copy of the committed H200 store; calibration runs of the
# same model served again (run-to-run and lease-to-lease spread); its paged|eager cells.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
model="meta-llama/Llama-3.1-8B"
out="$OUT"
mkdir -p "$out/db" "$out/reports" "$out/groundtruth"
cp -r data/h200/db/. "$out/db/"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/reports/gpu.txt"
pack() { tar -C "$out" -czf "$out/h200-call2.tar.gz" db reports groundtruth; }
for backend in 'paged|sdpa' 'paged|eager'; do
  tag="${backend/|/-}"
  trace="data/traces/Llama-3.1-8B.$tag.json"
  python3 -m dooly.cli plan "$trace" --store "$out/db" --attention "$backend" --output json > "$out/reports/plan.$tag.json" 2> "$out/reports/plan.$tag.log"
  start=$(date +%s.%N)
  python3 -m dooly.cli profile "$trace" --store "$out/db" --attention "$backend" --output json > "$out/reports/profile.$tag.json" 2> "$out/reports/profile.$tag.log"
  echo "profile $tag: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s wall" >> "$out/reports/wall.txt"
  pack
done
for repeat in 2 3; do
  for graphs in true false; do
    variant=$([ "$graphs" = true ] && echo graphs || echo default)
    python3 -m dooly.cli bench "$model" --attention 'paged|sdpa' --workload device/workloads/calib.json \
      --set use_cuda_graph="$graphs" --set max_batch_tokens=2048 --set num_blocks=1024 \
      --out "$out/groundtruth/r$repeat/Llama-3.1-8B.paged-sdpa.$variant.calib" --output json \
      > "$out/reports/bench.r$repeat.$variant.json" 2> "$out/reports/bench.r$repeat.$variant.log" || echo "r$repeat $variant failed"
    pack
  done
done
timeout 200 python3 device/device_bench.py --models "$model" --backends 'paged|eager' --workloads calib,heavy,light \
  --variants default --out "$out" > "$out/reports/bench-eager.log" 2>&1
pack
cat "$out/reports/wall.txt"; ls -R "$out/groundtruth" | head -30
for f in "$out"/reports/plan.*.json "$out"/reports/profile.*.json; do echo "$f"; head -c 400 "$f"; echo; done
