#!/usr/bin/env bash
# The wave's GPU measurements (2026-12-01), after the gpu_bench.sh stages (and the ADED store carried in .carry/e):
#   bash scripts/gpu_wave.sh greedy     # batch 1 greedy: every method on its static engine vs vanilla-static
#   bash scripts/gpu_wave.sh sample     # batch 1 sampling T=0.7 top-p 0.9, then batch 8 greedy: ADED auto vs fixed
# Results packed under $OUT (one archive per run); held-out MT-Bench questions 60-64 (60-67 for batch 8).
set -uo pipefail
cd "$(dirname "$0")/.."
R=/tmp/hfa/res; mkdir -p "$R" /tmp/hfa/cache/datastores
if [ -f .carry/e/store.gz ] && [ ! -f /tmp/hfa/cache/datastores/index.txt ]; then
  gunzip -c .carry/e/store.gz > /tmp/hfa/cache/datastores/sharegpt-trigram-ebab3b7e903b792d.safetensors
  sed 's#^/root/.cache/hf_accel/models/#/tmp/hfa/cache/models/#' .carry/e/index.txt > /tmp/hfa/cache/datastores/index.txt
fi
lim=${LIMIT:-520}
bench() { name=$1; shift; timeout "$lim" bash scripts/gpu_bench.sh run bench --device cuda --dtype bf16 --no-progress \
            --out "$R/$name" "$@" > "$R/$name.log" 2>&1; echo "rc=$?" >> "$R/$name.log"; cp "$R/$name.log" "$R/$name/" 2>/dev/null
          bash scripts/gpu_bench.sh pack "$R/$name" "${OUT:-/tmp}/$name.tgz" >/dev/null 2>&1
          grep -E "^\| |rc=|Skipped|skipped|Error" "$R/$name.log" | cut -c1-260 | tail -24; }
case "${1:-}" in
  greedy)
    bench greedy-b1 --questions 60-64 --max-new-tokens 128 --methods "vanilla,vanilla-static,aded+static,aded(max_nodes=16)+static,clover+static,hidden_transfer+static,lud(lossless=True)+static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static" ;;
  sample)
    bench sample-b1 --questions 60-64 --max-new-tokens 128 --do-sample --temperature 0.7 --top-p 0.9 --seed 0 \
      --methods "vanilla,vanilla-static,aded+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    bench greedy-b8 --questions 60-67 --batch 8 --max-new-tokens 128 \
      --methods "vanilla,vanilla-static,aded+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static" ;;
  *) echo "greedy | sample" >&2; exit 2 ;;
esac
