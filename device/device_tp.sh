#!/usr/bin/env bash
# Tensor-parallel validation, one call on a machine with 2 GPUs (nvidia-h200-x2), ~5-7 minutes:
#   1. profile the tp=2 trace of Llama-3.1-8B (one rank's compute ops on GPU 0, then its
#      collectives on 2 spawned NCCL ranks) into a local store;
#   2. measure real tp=2 engine steps of the same model (random weights, transformers' own TP
#      loading) for prefill-only, decode-only and mixed batch compositions;
#   3. (control, while time remains) the same for tp=1: profile the tp=1 trace, measure steps.
# Everything lands in $OUT (<= 8 files): db.tar.gz, steps_tp2.json, steps_tp1.json,
# topology.json, logs.tar.gz, summary.txt. Then, on a CPU machine with polars:
#   device/validate_tp.sh DIR_WITH_THOSE_FILES
#
# Usage (repository root):
#   device/device_tp.sh             the GPU run: traces from data/traces (made with torch 2.13)
#   device/device_tp.sh --dry-run   the same stages on this CPU: gloo ranks, a tiny model traced
#                                  here, tiny grids (checks the whole path before the GPU shot)
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; fi
# NVLink multicast stays off in this shell and every process it starts (shared GPUs).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
out="${OUT:-out/device_tp}"
budget="${DOOLY_TP_BUDGET_S:-460}"   # seconds for all stages; stages that no longer fit are skipped
mkdir -p "$out"
work="$(mktemp -d)"
logs="$work/logs"
mkdir -p "$logs" "$work/db"
started=$(date +%s)

if [ "$dry" = 1 ]; then
    export OMP_NUM_THREADS=1   # a shared CPU: one thread per process keeps timings sane
    cat > "$work/tiny.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
 "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
 "max_position_embeddings": 4096, "tie_word_embeddings": false}
JSON
    "$python" -m dooly.cli trace "$work/tiny.json" --tp 2 --out "$work/tp2.json" > "$logs/trace_tp2.json" 2>&1
    "$python" -m dooly.cli trace "$work/tiny.json" --out "$work/tp1.json" > "$logs/trace_tp1.json" 2>&1
    trace_tp2="$work/tp2.json"; trace_tp1="$work/tp1.json"
    grid=(--max-tokens 16 --max-seqs 4 --max-kv 512 --max-context 128 --samples 3 --device cpu)
    steps=(--compositions small --samples 3 --device cpu)
else
    trace_tp2="data/traces/Llama-3.1-8B.tp2.paged-sdpa.json"; trace_tp1="data/traces/Llama-3.1-8B.paged-sdpa.json"
    grid=(--device cuda)
    steps=(--compositions default --samples 10 --device cuda)
fi

{
    echo "dry_run=$dry"
    env | grep -E '^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS)=' | sort
    "$python" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    nvidia-smi topo -m 2>/dev/null || true
    nvidia-smi nvlink -s 2>/dev/null || true
} > "$logs/env.txt" 2>&1
"$python" - "$dry" > "$out/topology.json" 2> "$logs/topology.log" <<'PY'
import json, sys
from dooly.distributed import detect_topology
print(json.dumps(detect_topology("cpu" if sys.argv[1] == "1" else "cuda", 2).to_dict(), indent=2))
PY

# stage NAME MIN_S MAX_S COMMAND...: runs COMMAND under a timeout that fits the remaining budget.
stage() {
    local name="$1" least="$2" most="$3"; shift 3
    local left=$((budget - ($(date +%s) - started)))
    local limit=$(( left < most ? left : most ))
    if [ "$limit" -lt "$least" ]; then
        echo "$name: skipped (${left}s left of ${budget}s)" | tee -a "$logs/summary.txt"
        return 0
    fi
    local t0=$(date +%s)
    timeout --kill-after=20 "$limit" "$@" > "$logs/$name.out" 2> "$logs/$name.err"
    local rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - t0 ))s (limit ${limit}s)" | tee -a "$logs/summary.txt"
}

stage profile_tp2 60 260 "$python" -m dooly.cli profile "$trace_tp2" --store "$work/db" "${grid[@]}" --output json
stage steps_tp2 40 200 "$python" -m dooly.cli -v measure-steps "$trace_tp2" "${steps[@]}" --out "$out/steps_tp2.json" --output json
stage profile_tp1 40 120 "$python" -m dooly.cli profile "$trace_tp1" --store "$work/db" "${grid[@]}" --output json
stage steps_tp1 30 100 "$python" -m dooly.cli -v measure-steps "$trace_tp1" "${steps[@]}" --out "$out/steps_tp1.json" --output json

echo "total: $(( $(date +%s) - started ))s" | tee -a "$logs/summary.txt"
cp "$logs/summary.txt" "$out/summary.txt"
# Shard keys hold '=' and '~', which the device tool does not bring back as names: one archive each.
tar -C "$work" -czf "$out/db.tar.gz" db
tar -C "$work" -czf "$out/logs.tar.gz" logs
rm -rf "$work"
ls -la "$out"
