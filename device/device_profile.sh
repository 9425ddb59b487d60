#!/usr/bin/env bash
# Profile bundled models on a GPU machine into $OUT/db, one JSON report per step, timed.
# Usage (on the device machine, from the repository root):
#   device/device_profile.sh BACKEND MODEL [MODEL...]
# Each MODEL argument may list several models separated by commas: they are profiled in one run,
# against the store as it stands, so reuse between them is counted.
set -euo pipefail
backend="$1"; shift
out="${OUT:-out}"
mkdir -p "$out/db" "$out/reports"
# Continue a store a previous call brought back (device machines start bare).
if [ -n "${DOOLY_DB_SEED:-}" ]; then cp -r "$DOOLY_DB_SEED/." "$out/db/"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/reports/gpu.txt" || true
python3 -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)' \
    > "$out/reports/versions.txt"
step=0
for group in "$@"; do
    step=$((step + 1))
    IFS=',' read -r -a models <<< "$group"
    start=$(date +%s.%N)
    python3 -m dooly.cli profile "${models[@]}" --store "$out/db" --attention "$backend" --output json \
        > "$out/reports/step${step}.json" 2> "$out/reports/step${step}.log" || echo "step $step failed" >&2
    end=$(date +%s.%N)
    echo "step $step (${models[*]}): $(python3 -c "print(round($end - $start, 1))") s wall" | tee -a "$out/reports/wall.txt"
    # Shard keys hold '=' and '~', which the device tool does not bring back as names: ship one
    # archive, refreshed after every step so a call cut short by its time limit keeps what it did.
    tar -C "$out" -czf "$out/db.tar.gz" db reports
done
