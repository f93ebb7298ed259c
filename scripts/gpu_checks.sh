#!/usr/bin/env bash
# GPU correctness checks of the captured paths (static heads, layer plans, device sampling, NF4 capture), each
# under its own time limit, logs under $OUT. Run after the gpu_bench.sh stages, in the same warm machine:
#   bash scripts/gpu_checks.sh [seconds per check, default 140]
set -uo pipefail
cd "$(dirname "$0")/.."
lim=${1:-140}
out=${OUT:-/tmp/hfa/out}
mkdir -p "$out"
run() { name=$1; shift; echo "=== $name"; timeout "$lim" bash scripts/gpu_bench.sh run script "$@" > "$out/$name.log" 2>&1;
        echo "rc=$?" >> "$out/$name.log"; grep -E "PASS|FAIL|MISMATCH|same|graph|capture|x vanilla|tok/s|rc=|Error|error" "$out/$name.log" | tail -25; }
run static_heads scripts/static_heads_check.py --dtype fp32 --prompts 2 --max-new-tokens 96
run layer_plans scripts/layer_plans_check.py --dtype fp32 --prompts 2 --max-new-tokens 96
run plan_reuse scripts/layer_plans_check.py --reuse --dtype bf16 --max-new-tokens 128
run sampling scripts/sampling_gpu_check.py
run bnb scripts/bnb_capture_check.py --dtype bf16 --prompts 1 --max-new-tokens 64
