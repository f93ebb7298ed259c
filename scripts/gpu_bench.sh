#!/usr/bin/env bash
# Runs on the offline GPU machine, in the repo root (the device tool's working copy).
#   bash scripts/gpu_bench.sh stage-a          # call 1, carrying .carry/a: keeps part a in /tmp/hfa
#   bash scripts/gpu_bench.sh stage-b          # call 2 (within the machine's warm window), carrying .carry/b
#   bash scripts/gpu_bench.sh stage-c          # call 3, carrying .carry/c
#   bash scripts/gpu_bench.sh stage-c2         # call 4, carrying .carry/c2 (not in a LITE=1 bundle: no c2)
#   bash scripts/gpu_bench.sh stage-d          # call 5, carrying .carry/d: joins the parts, installs the
#                                              # wheels into /tmp/site
#   bash scripts/gpu_bench.sh run ARGS...      # hf-accel ARGS with the installed wheels (same or later call)
#   bash scripts/gpu_bench.sh run script F.py ARGS   # a repo script with the same environment
#   bash scripts/gpu_bench.sh pack DIR NAME.tgz      # DIR as one archive (a device call brings back 8 files)
#   bash scripts/gpu_bench.sh cache-save             # the session's torch.compile caches (inductor's FX graphs,
#                                              # AOT autograd, triton kernels under /tmp/torchinductor_root) into
#                                              # $OUT as compile-cache.part-* (15 MiB each, at most 8): bring them back
#                                              # and keep them in .carry/cc (git-ignored) for the next session
#   bash scripts/gpu_bench.sh cache-load             # carrying .carry/cc: unpack them before the first bench, so
#                                              # that its warm-ups hit the cache instead of compiling cold (~400 s)
# Caches (dequantized model, datastore) live in /tmp/hfa/cache while the machine stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage-a | stage-b | stage-c | stage-c2 | stage-d | run | pack | cache-save | cache-load}
shift
mkdir -p /tmp/hfa
case "$stage" in
  stage-a)
    cp .carry/a/bundle.part /tmp/hfa/part0
    ls -l /tmp/hfa ;;
  stage-b)
    cp .carry/b/bundle.part /tmp/hfa/part1
    ls -l /tmp/hfa ;;
  stage-c)
    cp .carry/c/bundle.part /tmp/hfa/part2
    ls -l /tmp/hfa ;;
  stage-c2)
    cp .carry/c2/bundle.part /tmp/hfa/part3
    ls -l /tmp/hfa ;;
  stage-d)
    cat /tmp/hfa/part? .carry/d/bundle.part > /tmp/hfa/bundle.tar  # the parts staged (four or three: LITE bundle)
    echo "$(cat .carry/d/bundle.sha256)  /tmp/hfa/bundle.tar" | sha256sum -c -
    mkdir -p /tmp/hfa/wheels && tar -C /tmp/hfa/wheels -xf /tmp/hfa/bundle.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        /tmp/hfa/wheels/*.whl
    rm -f /tmp/hfa/part? /tmp/hfa/bundle.tar ;;
  run)
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_ACCEL_CACHE=/tmp/hfa/cache PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
    if [ "${1:-}" = "script" ]; then shift; python3 "$@"; else python3 -m hf_accel.cli "$@"; fi ;;
  pack)
    tar -czf "${2:?archive path}" -C "${1:?folder}" . && ls -l "$2" ;;
  cache-save)
    d=/tmp/torchinductor_$(whoami)
    du -sh "$d"
    tar -C /tmp -czf /tmp/hfa/compile-cache.tgz "$(basename "$d")"
    ls -l /tmp/hfa/compile-cache.tgz
    split -b 15M -d -a 1 /tmp/hfa/compile-cache.tgz "${OUT:?}/compile-cache.part-"
    n=$(ls "$OUT"/compile-cache.part-* | wc -l)
    [ "$n" -le 8 ] || echo "compile cache: $n parts, only 8 files come back from a call: keep fewer" >&2
    ls -l "$OUT" ;;
  cache-load)
    if ls .carry/cc/compile-cache.part-* >/dev/null 2>&1; then
      cat .carry/cc/compile-cache.part-* | tar -C /tmp -xzf - && du -sh /tmp/torchinductor_$(whoami)
    else
      echo "no .carry/cc/compile-cache.part-*: the first bench compiles cold" >&2
    fi ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
