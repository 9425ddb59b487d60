#!/usr/bin/env bash
# The H100 campaign for one attention backend: every suite model in the fixed order of
# device/suite_models.txt, one model per step, against one growing store (device/device_profile.sh;
# continue a store with DOOLY_DB_SEED). Uses the committed traces (data/traces/), so the device's
# time goes to measurement.
# Usage (on the device machine, from the repository root):
#   device/device_campaign.sh 'paged|sdpa'
set -euo pipefail
backend="$1"
suffix="${backend//|/-}"
traces=()
while read -r _ short; do
    traces+=("data/traces/${short}.${suffix}.json")
done < device/suite_models.txt
exec device/device_profile.sh "$backend" "${traces[@]}"
