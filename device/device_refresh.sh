#!/usr/bin/env bash
# Re-measure what a store holds as failed (the planner re-plans every point not held), for the given
# traces and backends, continuing the committed H100 store. Everything lands in $OUT/refresh.tar.gz.
# Usage (on the device machine, from the repository root):
#   device/device_refresh.sh STORE TRACE_STEM [TRACE_STEM...]
set -uo pipefail
seed="$1"; shift
out="${OUT:-out}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out/refresh"
cp -r "$seed" "$out/refresh/db"
for stem in "$@"; do
    for backend in 'paged|sdpa' 'paged|eager'; do
        python3 -m dooly.cli profile "data/traces/${stem}.${backend//|/-}.json" --store "$out/refresh/db" --attention "$backend" \
            --output json > "$out/refresh/${stem}.${backend//|/-}.json" 2> "$out/refresh/${stem}.${backend//|/-}.log" \
            || echo "profile ${stem} ${backend} failed" >&2
    done
done
tar -C "$out" -czf "$out/refresh.tar.gz" refresh
rm -rf "$out/refresh"
