#!/usr/bin/env bash
# Chosen cells of issue #24's engine-path grid in one device call, in the order given, under one
# deadline: the top-up of a grid whose models are already profiled in the committed store (repeats,
# a model's missing round, calib runs of one path). Every finished group of cells is packed at once
# (grid.tar.gz: groundtruth/ROUND/CELL and reports/), so a call cut short keeps them.
# Usage (on the device, repository root): bash device/grid_cells.sh DEADLINE_S GROUP [GROUP ...]
#   GROUP: ROUND:MODEL:BACKEND:VARIANTS:WORKLOADS[:CLIENT], e.g. r2:meta-llama/Llama-3.1-8B:paged|sdpa:graphs,async:light,heavy
#   (VARIANTS and WORKLOADS comma-separated, as device/device_bench.py takes them; CLIENT inprocess, the
#   default, or http: the cells behind transformers' HTTP server, its extras carried as wheels in .whl).
#   @FILE:PART[,PART...] stands for FILE's groups of those parts, in the file's order (lines
#   "PART GROUP [WALL_S]", # comments; device/campaigns/engine_paths_http.txt).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The HTTP cells' served models (random weights + tokenizer) saved once per model, reused by every
# later cell of the call (docs/simulate.md: an 8B in bfloat16 is 16 GB of it).
export DOOLY_MODEL_CACHE="${DOOLY_MODEL_CACHE:-/tmp/dooly-model-cache}"
deadline=$1; shift
groups=()
for arg in "$@"; do
  if [[ $arg == @* ]]; then
    file=${arg#@}; file=${file%:*}; parts=",${arg##*:},"
    [[ -f $file ]] || { echo "error: $arg: no such campaign file $file" >&2; exit 2; }
    mapfile -t found < <(awk -v parts="$parts" '!/^#/ && NF >= 2 && index(parts, "," $1 ",") { print $2 }' "$file")
    (( ${#found[@]} )) || { echo "error: $arg: no group of part(s) ${parts:1:-1} in $file" >&2; exit 2; }
    groups+=("${found[@]}")
  else
    groups+=("$arg")
  fi
done
# transformers serve's extras (fastapi, uvicorn, openai, ...) are not in the image: carried as wheels.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH#"$PWD"}"
fi
out="$OUT/grid"
mkdir -p "$out/groundtruth" "$out/reports"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$out/reports/gpu.txt"
pack() { tar -C "$out" -czf "$OUT/grid.tar.gz" groundtruth reports; }
# A group starts only with at least MIN_GROUP_S left, and never runs past the deadline.
MIN_GROUP_S=30
for group in "${groups[@]}"; do
  IFS=: read -r round model backend variants workloads client <<< "$group"
  left=$((deadline - SECONDS))
  (( left < MIN_GROUP_S )) && { echo "skipped $group: deadline"; continue; }
  name="$round.${model##*/}.${backend/|/-}.${variants//,/+}.${workloads//,/+}"
  start=$SECONDS
  timeout "$left" python3 device/device_bench.py --models "$model" --backends "$backend" --variants "$variants" \
    --workloads "$workloads" --client "${client:-inprocess}" --out "$out/$round.work" >> "$out/reports/$name.log" 2>&1 \
    || echo "$name: exit $? after $((SECONDS - start)) s"
  echo "$name: $((SECONDS - start)) s" >> "$out/reports/walls.txt"
  mkdir -p "$out/groundtruth/$round"
  cp -r "$out/$round.work/groundtruth/." "$out/groundtruth/$round/" 2>/dev/null
  rm -rf "${out:?}/$round.work"
  pack
done
cat "$out/reports/walls.txt"
