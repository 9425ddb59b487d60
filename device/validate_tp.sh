#!/usr/bin/env bash
# The CPU side of device/device_tp.sh: merge and fit the store it brought back, then compare the
# composed step predictions (one rank's ops + collectives) with the measured engine steps.
# Usage: device/validate_tp.sh DIR [WORK]
#   DIR holds db.tar.gz and steps_tp2.json (maybe steps_tp1.json); it may be read-only.
#   WORK (default DIR/validation) receives the extracted store, fit.txt, validate_tp{2,1}_{graph,eager}.json
#   and report.txt.
set -euo pipefail
dir="${1:?usage: device/validate_tp.sh DIR [WORK]}"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
work="${2:-$dir/validation}"
rm -rf "$work"
mkdir -p "$work"
tar -C "$work" -xzf "$dir/db.tar.gz"
"$python" -m dooly.cli merge --store "$work/db" --output json > "$work/merge.json"
"$python" -m dooly.cli fit --store "$work/db" > "$work/fit.txt"
report="$work/report.txt"
: > "$report"
for tp in 2 1; do
    steps="$dir/steps_tp$tp.json"
    [ -f "$steps" ] || { echo "tp=$tp: no $steps" >> "$report"; continue; }
    for timing in graph eager; do
        echo "== tp=$tp, measured $timing steps" >> "$report"
        "$python" -m dooly.cli validate-steps "$steps" --store "$work/db" --timing "$timing" \
            --out "$work/validate_tp${tp}_${timing}.json" >> "$report" 2>&1 || echo "(failed)" >> "$report"
        echo >> "$report"
    done
done
cat "$report"
