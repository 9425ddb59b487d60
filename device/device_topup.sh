#!/usr/bin/env bash
# Top up a campaign store after the default grid grew: for each backend in turn, every suite
# model (device/suite_models.txt, committed traces) in one `dooly profile` run against the store
# the previous backend left, so only the points the store lacks are measured (device/device_profile.sh).
# Each backend's store and reports land in $OUT/<backend>/db.tar.gz; the last one holds the whole store.
# Usage (on the device machine, from the repository root; DEADLINE_S bounds the whole call):
#   DOOLY_DB_SEED=data/h100/db device/device_topup.sh sdpa eager flex_attention
set -uo pipefail
out="${OUT:-out}"
seed="${DOOLY_DB_SEED:?set DOOLY_DB_SEED to the store to top up}"
deadline=$(( $(date +%s) + ${DEADLINE_S:-580} ))
for backend in "$@"; do
    traces=""
    while read -r _ short; do
        traces="${traces:+$traces,}data/traces/${short}.paged-${backend}.json"
    done < device/suite_models.txt
    started=$(date +%s)
    OUT="$out/$backend" DOOLY_DB_SEED="$seed" timeout $(( deadline - started )) \
        device/device_profile.sh "paged|$backend" "$traces" > "$out/$backend.log" 2>&1
    echo "paged|$backend: exit $?, $(( $(date +%s) - started )) s"
    seed="$out/$backend/db"
done
# Only the archives travel back (the store's keys are not names the device tool returns).
for backend in "$@"; do rm -rf "$out/$backend/db" "$out/$backend/reports"; done
