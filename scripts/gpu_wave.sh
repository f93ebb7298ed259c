#!/usr/bin/env bash
# The wave's GPU measurements (2026-12-01), after the gpu_bench.sh stages (and the ADED store carried in .carry/e):
#   bash scripts/gpu_wave.sh greedy|greedy2   # batch 1 greedy: every method on its static engine vs vanilla-static
#   bash scripts/gpu_wave.sh sample           # sampling T=0.7 top-p 0.9, batch 1 and batch 8
#   bash scripts/gpu_wave.sh b8               # batch 8 greedy, lossless methods
#   bash scripts/gpu_wave.sh duo              # DuoAttention on its static cache vs vanilla-static, 2k/4k/8k
#   bash scripts/gpu_wave.sh duo8k            # issue 24's rows only: static, 8k first, +aded at 8k, no passkey
#   bash scripts/gpu_wave.sh duo24            # duo alone on the static engine vs vanilla-static 8k/4k/2k (DUOM=rows)
#   bash scripts/gpu_wave.sh layers           # lora_drop, m2r2 early exit / self_spec on their static engines
#   [SAMPLE=1] bash scripts/gpu_wave.sh ead | nf4  # EAD with a 4-layer draft trained here; quant_spec on NF4 (sampling)
#   bash scripts/gpu_wave.sh layers2          # lora_drop / m2r2 early exit greedy and sampling, b1 (cold machine: no compile)
#   bash scripts/gpu_wave.sh budget1|budget8  # auto vs fixed budgets 8/16/32/64, greedy + sampling, b1 / b8
#   bash scripts/gpu_wave.sh sample2|heads|check  # sampling with top-p's top-K form; the trained heads b1/b8; GPU checks
#   bash scripts/gpu_wave.sh all1|all1s|all8|all8s  # every method in one run per cell (greedy/sampling x b1/b8)
#   bash scripts/gpu_wave.sh layers13|heads13|b813  # thirteenth run: LoRA-Drop subsets, self_spec k; LUD / Clover b1; b8
#   bash scripts/gpu_wave.sh layers14|train14|spec14  # fourteenth run: LoRA-Drop's 8-layer set; its LoRAs distilled; self_spec
#   bash scripts/gpu_wave.sh spec15   # fifteenth run: self_spec's deferred drafts and adopted prompt KV; LoRA-Drop default
#   bash scripts/gpu_wave.sh prewarm; CELLS="g1 s1" bash scripts/gpu_wave.sh cells  # sixth run: every method and
#                                             # ADED's fixed budgets per cell, compile caches filled side by side first
# Results packed under $OUT (one archive per run); held-out MT-Bench questions 60-64 (60-75, two rows, at batch 8);
# HF_ACCEL_GRAPH_WIDTHS=8,16,32,64 bash scripts/gpu_wave.sh budget8: the auto budget with width 8 among its graphed ones.
# TOKENS=N new tokens (default 128, as the first H200 run of this wave); DTYPE=fp32 for runs where every lossless
# configuration must give the same text (budget comparisons without bf16 near-tie divergence).
set -uo pipefail
cd "$(dirname "$0")/.."
R=/tmp/hfa/res; mkdir -p "$R" /tmp/hfa/cache/datastores
if [ -f .carry/e/store.gz ] && [ ! -f /tmp/hfa/cache/datastores/index.txt ]; then
  gunzip -c .carry/e/store.gz > /tmp/hfa/cache/datastores/sharegpt-trigram-ebab3b7e903b792d.safetensors
  sed 's#^/root/.cache/hf_accel/models/#/tmp/hfa/cache/models/#' .carry/e/index.txt > /tmp/hfa/cache/datastores/index.txt
fi
[ -d .carry/ld ] && cp -r .carry/ld/. /tmp/hfa/  # LoRA-Drop artifacts trained by an earlier call (ninth run)
lim=${LIMIT:-520}
bench() { name=$1; shift; timeout "$lim" bash scripts/gpu_bench.sh run bench --device cuda --dtype ${DTYPE:-bf16} --no-progress \
            --out "$R/$name" "$@" > "$R/$name.log" 2>&1; echo "rc=$?" >> "$R/$name.log"
          # a run cut by the timeout packs what it left: results.json/.md of the rows done (rewritten after the
          # warm-ups and every row, "partial: k of n rows"), and the log (a "row i/n: ... tok/s" line per row)
          mkdir -p "$R/$name"; cp "$R/$name.log" "$R/$name/"
          bash scripts/gpu_bench.sh pack "$R/$name" "${OUT:-/tmp}/$name.tgz" >/dev/null 2>&1
          grep -E "^\| |^row |partial|rc=|Skipped|skipped|Error|compile fallback" "$R/$name.log" | cut -c1-260 | tail -24; }
Q1=60-64; Q8=60-75; N=${TOKENS:-128}; SAMPLING="--do-sample --temperature 0.7 --top-p 0.9 --seed 0"
case "${1:-}" in
  greedy)   # issue 17/18/20/23 rows, batch 1 (two runs: a call's 10 minutes hold ~6 compiled methods)
    bench greedy-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla,vanilla-static,aded+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static,clover+static" ;;
  greedy2)  # the trained-head methods on their static engines
    bench greedy2-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla-static,hidden_transfer+static,lud(lossless=True)+static,lud(beta=0.7)+static" ;;
  layers)   # the layer-plan methods (issue 18)
    bench layers-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla-static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=self_spec)+static" ;;
  sample)   # issue 19/23: sampling b1 and b8
    bench sample-b1 --questions $Q1 --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 --seed 0 \
      --methods "vanilla-static,aded+static,aded(max_nodes=16)+static,clover+static"
    bench sample-b8 --questions $Q8 --batch 8 --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 --seed 0 \
      --methods "vanilla-static,aded+static,aded(max_nodes=16)+static" ;;
  b8)       # issue 17/19/23: greedy b8, two rows of 8 padded prompts
    bench greedy-b8 --questions $Q8 --batch 8 --max-new-tokens $N \
      --methods "vanilla-static,aded+static,aded(max_nodes=16)+static,clover+static,hidden_transfer+static,lud(lossless=True)+static" ;;
  duo)      # issue 24: DuoAttention static (alone and + ADED on the engine) vs vanilla-static at 2k/4k/8k
    bench duo-static duo --pattern artifacts/smollm2-135m/duo_attention --static --lengths 2048,4096,8192 \
      --depths 0.5 --samples 2 --reps 2 --max-new-tokens $N ;;
  duo8k)    # issue 24's targets: the compiled rows only (7 compiles), 8k first, duo+aded at 8k only, no passkey grid;
            # results.md / the log's table rows are rewritten / printed after every cell
    bench duo-static8k duo --pattern artifacts/smollm2-135m/duo_attention --lengths 2048,4096,8192 --no-passkey \
      --duo-methods vanilla-static,duo_attention-static,duo_attention+aded-static@8192 --reps 2 --max-new-tokens $N ;;
  duo24)    # issue 24: duo_attention alone on the static engine (its default runner on a GPU) vs vanilla-static at
            # 8k / 4k / 2k (the crossover), HF's compiled runner at 8k beside it; each cell from the weights alone
    bench duo-static24 duo --pattern artifacts/smollm2-135m/duo_attention --lengths 2048,4096,8192 --no-passkey \
      --duo-methods "${DUOM:-vanilla-static,duo_attention-static,duo_attention-hf-static@8192}" --reps 2 --max-new-tokens $N ;;
  profile)  # one step's cost per part (scripts/step_profile.py), compiled verify, 2 prompts; PROFILE_ARGS="--do-sample
            # --sync" for the sampling step, each part charged its GPU work
    timeout "$lim" bash scripts/gpu_bench.sh run script scripts/step_profile.py --methods "${METHODS:-aded+static,aded(max_nodes=16)+static,clover+static,hidden_transfer+static,lud(lossless=True)+static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static}" \
      --max-new-tokens $N --prompts 2 --budget-s $((lim - 60)) ${PROFILE_ARGS:-} --out "${OUT:-/tmp}/step_profile.md" > "${OUT:-/tmp}/step_profile.log" 2>&1
    tail -c 6000 "${OUT:-/tmp}/step_profile.log" ;;
  project)  # issue 20: the projection to an 8B shape from the greedy run's timings (random weights; Hopper capture fix)
    bench project-llama3-8b --project-from "$R/greedy-b1/results.json" --project-shape llama3-8b ;;
  ead)      # issue 18: EAD on the static engine with a 4-layer draft of the default model (trained here, ~2 min, once
            # per warm machine), and quant_spec on the NF4 target vs vanilla / vanilla-static NF4
    D=/tmp/hfa/draft4
    [ -f $D/config.json ] || timeout 200 bash scripts/gpu_bench.sh run train draft --layers 4 --out $D --minutes 2 \
        --lr 3e-4 --samples 1024 --gen-batch 256 --batch 16 --seq-len 384 --eval-every 100 --no-progress > "$R/draft.log" 2>&1
    # SAMPLE=1 (ead and nf4): the same under sampling, T 0.7 / top-p 0.9 (issue 19's "greedy ratio - 10%" for them)
    bench ead-b1${SAMPLE:+-sample} --questions $Q1 --max-new-tokens $N ${SAMPLE:+$SAMPLING} \
      --methods "vanilla-static,ead(small_model=$D,threshold=2.0)+static,ead(small_model=$D,threshold=3.0)+static" ;;
  nf4)
    bench nf4-b1${SAMPLE:+-sample} --quantize nf4 --questions $Q1 --max-new-tokens $N --draft-model /tmp/hfa/draft4 \
      ${SAMPLE:+$SAMPLING} \
      --methods "vanilla,vanilla-static,aded+static,quant_spec+static,quant_spec(intermediate=full_precision)+static" ;;
  budget1)  # issue 23/19 (fourth run): the auto budget against every fixed budget, greedy and sampling, batch 1,
            # ten held-out prompts; sampling also for the trained-head methods (issue 19's "greedy ratio - 10%")
    Q=60-69; A="aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    lim=${LIMIT1:-330} bench greedy-b1 --questions $Q --max-new-tokens $N --methods "vanilla-static,$A,aded(max_nodes=64)+static,clover+static,hidden_transfer+static"
    lim=${LIMIT2:-240} bench sample-b1 --questions $Q --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 --seed 0 \
      --methods "vanilla-static,$A,clover+static,hidden_transfer+static" ;;
  budget8)  # the same at batch 8 (two rows of 8 padded prompts)
    A="aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    lim=${LIMIT1:-300} bench greedy-b8 --questions $Q8 --batch 8 --max-new-tokens $N --methods "vanilla-static,$A,aded(max_nodes=64)+static"
    lim=${LIMIT2:-270} bench sample-b8 --questions $Q8 --batch 8 --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 --seed 0 \
      --methods "vanilla-static,$A" ;;
  sample2)  # after the fourth run: top-p from the top 1024 (issue 19), ten prompts b1 and two rows of 8, with the
            # trained-head methods (issue 19's "greedy ratio - 10%") and Clover's compiled drafter (issue 17)
    A="aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static"
    lim=${LIMIT1:-330} bench sample-b1 --questions 60-69 --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 \
      --seed 0 --methods "vanilla-static,$A,clover+static,hidden_transfer+static"
    lim=${LIMIT2:-240} bench sample-b8 --questions $Q8 --batch 8 --max-new-tokens $N --do-sample --temperature 0.7 \
      --top-p 0.9 --seed 0 --methods "vanilla-static,$A" ;;
  heads)    # issue 17: the trained-head methods greedy, b1 and b8, hidden transfer also with 8 real nodes (width 32);
            # ADED auto and fixed 16 beside them (issue 23)
    lim=${LIMIT1:-300} bench greedy-b1 --questions 60-69 --max-new-tokens $N --methods \
      "vanilla-static,aded+static,aded(max_nodes=16)+static,clover+static,hidden_transfer+static,hidden_transfer(max_nodes=8)+static"
    lim=${LIMIT2:-260} bench greedy-b8 --questions $Q8 --batch 8 --max-new-tokens $N --methods \
      "vanilla-static,aded+static,aded(max_nodes=16)+static,clover+static,hidden_transfer+static,hidden_transfer(max_nodes=8)+static" ;;
  all1|all1s|all8|all8s)  # issue 20: every method in one bench run per cell (greedy / sampling x batch 1 / 8), five held-out
            # prompts (two rows of 8 at batch 8); EAD needs the 4-layer draft (`ead` trains it, ~2 min, once per warm
            # machine); cold, the warm-ups alone take most of a call: load a compile cache first (gpu_bench.sh cache-load)
    D=/tmp/hfa/draft4; M="vanilla-static,aded+static,clover+static,hidden_transfer+static,lud(lossless=True)+static"
    M="$M,lud(beta=0.7)+static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=self_spec)+static"
    [ -f $D/config.json ] && M="$M,ead(small_model=$D,threshold=2.0)+static"
    S=$SAMPLING
    case "$1" in
      all1)  bench all-greedy-b1 --questions $Q1 --max-new-tokens $N --methods "$M" ;;
      all1s) bench all-sample-b1 --questions $Q1 --max-new-tokens $N $S --methods "$M" ;;
      all8)  bench all-greedy-b8 --questions $Q8 --batch 8 --max-new-tokens $N --methods "$M" ;;
      all8s) bench all-sample-b8 --questions $Q8 --batch 8 --max-new-tokens $N $S --methods "$M" ;;
    esac ;;
  prewarm|cells)  # sixth run (issue 20 + 23 in one): four cells (greedy / sampling x batch 1 / 8), each with every method
            # and ADED's fixed budgets beside its auto one. `prewarm` runs the cells' warm-ups side by side
            # (--warmup-only: torch's on-disk compile cache filled in parallel on the machine's 16 cores) and the GPU
            # correctness checks beside them (not timings); `cells` then times CELLS (default all four) one at a time.
            # Batch 1 takes CELLQ (default 60-64: the sixth run's 60-69 left each cell cut after 5 rows, ~20 s a row
            # with 14 methods); after a prewarm, each cell needs ~180 s of warm-ups (cached) plus its rows.
            # Seventh run: PCELLS picks the cells to prewarm (default all four); cells l1 / ls1 are the layer-plan
            # methods alone at batch 1 (greedy / sampling; their compiled plans and draft stream), e1 EAD with the
            # 4-layer draft that `prewarm` trains beside the warm-ups when EAD=1 (~2 min of the GPU, once per machine),
            # m1 M2R2 early exit at thresholds 0.9 / 0.95 / 0.98 (its agreement / speed frontier)
    M="vanilla-static,aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    M="$M,aded(max_nodes=64)+static,clover+static,hidden_transfer+static,lud(lossless=True)+static,lud(beta=0.7)+static"
    M="$M,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=self_spec)+static"
    L="vanilla-static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=self_spec)+static"
    D=/tmp/hfa/draft4; E="vanilla-static,ead(small_model=$D,threshold=2.0)+static,ead(small_model=$D,threshold=3.0)+static"
    # m1: M2R2 early exit's thresholds (on CPU, fp32, 2026-12-02: agreement 0.86 / 0.87 / 0.95 at 0.9 / 0.95 / 0.98)
    T="vanilla-static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=early_exit,threshold=0.95)+static"
    T="$T,m2r2(mode=early_exit,threshold=0.98)+static"
    # g8a / g8b: cell g8's methods in two halves, for `prewarm` only (two processes compile side by side; the seventh
    # run's prewarm of g8 whole was cut at LoRA-Drop's warm-ups after 500 s)
    G8A="vanilla-static,aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    G8A="$G8A,aded(max_nodes=64)+static"
    G8B="vanilla-static,clover+static,hidden_transfer+static,lud(lossless=True)+static,lud(beta=0.7)+static"
    G8B="$G8B,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,m2r2(mode=self_spec)+static"
    # ninth run: l2 / ls2 the LoRA-Drop artifacts that `prewarm` trains when LD=1 (ld_kl: the committed set of 22
    # droppable layers, distilled from the committed weights; ld_half: the 15 odd layers, rank 16) beside the committed
    # one, greedy and sampling in one run (issue 18's agreement, issue 19's "greedy ratio - 10%"); f1: ADED's auto
    # budget vs every fixed one in fp32 (issue 23: no bf16 near-tie between configurations)
    L2="vanilla-static,lora_drop(period=4)+static,lora_drop(period=4,adapter=/tmp/hfa/ld_kl)+static"
    L2="$L2,lora_drop(period=4,adapter=/tmp/hfa/ld_half)+static"
    L2=${L2M:-$L2}  # tenth run: L2M / LS2 another method list for the l2 / ls2 cells
    F="vanilla-static,aded+static,aded(max_nodes=8)+static,aded(max_nodes=16)+static,aded(max_nodes=32)+static"
    F="$F,aded(max_nodes=64)+static"
    S=$SAMPLING
    cell() { case "$1" in
        l2) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N --methods $L2" ;;
        ls2) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N $S --methods ${LS2:-$L2}" ;;
        f1) echo "--dtype fp32 --questions ${CELLQ:-60-64} --max-new-tokens $N --methods $F" ;;
        g1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N --methods $M" ;;
        s1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N $S --methods $M" ;;
        g8) echo "--questions $Q8 --batch 8 --max-new-tokens $N --methods $M" ;;
        s8) echo "--questions $Q8 --batch 8 --max-new-tokens $N $S --methods $M" ;;
        l1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N --methods $L" ;;
        ls1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N $S --methods $L" ;;
        e1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N --methods $E" ;;
        m1) echo "--questions ${CELLQ:-60-64} --max-new-tokens $N --methods $T" ;;
        g8a) echo "--questions $Q8 --batch 8 --max-new-tokens $N --methods $G8A" ;;
        g8b) echo "--questions $Q8 --batch 8 --max-new-tokens $N --methods $G8B" ;; esac; }
    if [ "$1" = prewarm ]; then  # the dequantized model written once, before four processes would all write it
      bash scripts/gpu_bench.sh run script -c "from hf_accel import loading; loading.load_model('default', 'bf16', 'cuda')" \
          > "${OUT:-/tmp}/prewarm-model.log" 2>&1
      for c in ${PCELLS:-g1 s1 g8 s8}; do
        timeout "$lim" bash scripts/gpu_bench.sh run bench --device cuda --dtype ${DTYPE:-bf16} --no-progress --warmup-only \
          --out "$R/prewarm-$c" $(cell $c) > "${OUT:-/tmp}/prewarm-$c.log" 2>&1 &
      done
      if [ "${EAD:-0}" = 1 ] && [ ! -f $D/config.json ]; then
        timeout "$lim" bash scripts/gpu_bench.sh run train draft --layers 4 --out $D --minutes 2 --lr 3e-4 --samples 1024 \
          --gen-batch 256 --batch 16 --seq-len 384 --eval-every 100 --no-progress > "${OUT:-/tmp}/draft.log" 2>&1 &
      fi
      if [ "${LD:-0}" = 1 ]; then  # two LoRA-Drop artifacts with the distillation loss, side by side (~7 min each)
        T="--model default --period 4 --minutes ${LD_MIN:-6.5} --lr 1e-3 --samples 2048 --gen-batch 256 --batch 16"
        T="$T --seq-len 384 --eval-every 100 --no-progress"
        timeout "$lim" bash scripts/gpu_bench.sh run train lora_drop $T --out /tmp/hfa/ld_kl \
            --init artifacts/smollm2-135m/lora_drop > "${OUT:-/tmp}/train-ld_kl.log" 2>&1 &
        timeout "$lim" bash scripts/gpu_bench.sh run train lora_drop $T --out /tmp/hfa/ld_half --rank 16 \
            --droppable 1,3,5,7,9,11,13,15,17,19,21,23,25,27,29 > "${OUT:-/tmp}/train-ld_half.log" 2>&1 &
      fi
      [ "${CHECKS:-1}" = 1 ] && timeout "$lim" bash scripts/gpu_bench.sh run script scripts/sampling_gpu_check.py > "${OUT:-/tmp}/sampling_gpu_check.log" 2>&1 &
      [ "${CHECKS:-1}" = 1 ] && timeout "$lim" bash scripts/gpu_bench.sh run script scripts/upload_gpu_check.py > "${OUT:-/tmp}/upload_gpu_check.log" 2>&1 &
      wait
      grep -hE "^warm-up|rc=|Error|PASS|FAIL|skipped|compile fallback" "${OUT:-/tmp}"/*.log | cut -c1-200 | tail -80
      tail -3 "${OUT:-/tmp}/draft.log" 2>/dev/null
      if [ "${LD:-0}" = 1 ]; then  # the artifacts come back as one archive
        tail -n 3 "${OUT:-/tmp}"/train-ld_*.log; tar -czf "${OUT:-/tmp}/lora_drop_artifacts.tgz" -C /tmp/hfa ld_kl ld_half
      fi
    else
      for c in ${CELLS:-g1 s1 g8 s8}; do
        LV=LIMIT_$c; lim=${!LV:-$lim} bench "cell-$c" $(cell $c)
      done
    fi ;;
  layers2)  # after the sixth run: the layer-plan methods greedy and sampling (one captured sampling step per plan's
            # logits buffer; no torch.compile of ours, so cheap on a cold machine), batch 1, five held-out prompts
    L="vanilla-static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static"
    lim=${LIMIT1:-200} bench layers-g1 --questions 60-64 --max-new-tokens $N --methods "$L"
    lim=${LIMIT2:-200} bench layers-s1 --questions 60-64 --max-new-tokens $N --do-sample --temperature 0.7 --top-p 0.9 \
      --seed 0 --methods "$L" ;;
  train12)  # twelfth run (issues 17-19): the self-distilled data once (SAMPLES ShareGPT prompts answered by the target,
            # default 8192: four to eight times what the committed artifacts saw), then side by side on the one GPU for
            # TRAIN_MIN minutes each: Clover, hidden transfer and LUD from the committed artifacts (warm start), EAD's
            # 4-layer draft (for `ead` / `nf4`), and the batch-8 sampling step's compile check (no model); the new
            # artifacts come back as one archive (/tmp/hfa/new/*)
    S=${SAMPLES:-8192}; MIN=${TRAIN_MIN:-6}; A=artifacts/smollm2-135m; O=${OUT:-/tmp}
    bash scripts/gpu_bench.sh run script -c "import torch; torch.backends.cuda.matmul.allow_tf32 = True
from hf_accel import loading; from hf_accel.train import data
m, t = loading.load_model('default', 'fp32', 'cuda')
print(len(data.self_distilled(m, t, samples=$S, max_new_tokens=256, prompt_max=256, batch=512, progress=False)))" \
        > "$O/data.log" 2>&1; tail -2 "$O/data.log"
    C="--samples $S --gen-batch 512 --eval-every 250 --no-progress --minutes $MIN"
    trn() { n=$1; shift; timeout "$lim" bash scripts/gpu_bench.sh run train "$@" $C --out /tmp/hfa/new/$n > "$O/train-$n.log" 2>&1; }
    trn clover clover --batch 16 --init $A/clover &
    trn hidden_transfer hidden-transfer --batch 8 --init $A/hidden_transfer &
    trn lud lud --batch 16 --seq-len 384 --lr 2e-3 --init $A/lud &
    [ -f /tmp/hfa/draft4/config.json ] || timeout "$lim" bash scripts/gpu_bench.sh run train draft --layers 4 --out /tmp/hfa/draft4 \
        --minutes 2 --lr 3e-4 --samples $S --gen-batch 512 --batch 16 --seq-len 384 --eval-every 100 --no-progress > "$O/draft.log" 2>&1 &
    timeout "$lim" bash scripts/gpu_bench.sh run script scripts/sampling_step_profile.py --skip-e2e --vocab 49152 --nodes 16 \
        --batch 8 --compiled --topp-k 1024 --sets temp+top_p > "$O/b8-compile-check.log" 2>&1 &
    wait
    grep -E "graph=|compile error" "$O/b8-compile-check.log" | cut -c1-300
    for f in "$O"/train-*.log "$O/draft.log"; do echo "== $f"; grep -E '"top1|"steps"|saved|Error' "$f" | tail -8; done
    mkdir -p /tmp/hfa/pack && for d in /tmp/hfa/new/*; do mkdir -p /tmp/hfa/pack/$(basename $d)
      cp $d/config.json $d/log.jsonl $d/model.safetensors /tmp/hfa/pack/$(basename $d)/ 2>/dev/null; done
    tar -czf "$O/artifacts12.tgz" -C /tmp/hfa/pack . && ls -l "$O" ;;
  heads12)  # twelfth run (issue 17): the retrained heads (train12) greedy b1, held-out q60-64, on their static engines
    N1=/tmp/hfa/new
    bench heads12-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla-static,clover(part=$N1/clover)+static,hidden_transfer(part=$N1/hidden_transfer)+static,lud(part=$N1/lud,lossless=True)+static,lud(part=$N1/lud,beta=0.7)+static" ;;
  sample12) # twelfth run (issue 19): sampling b8 with the step compiled (keyed_uniform's fix), then quant_spec on the
            # NF4 target greedy and sampling (draft4 from train12)
    lim=${LIMIT1:-220} bench sample-b8 --questions $Q8 --batch 8 --max-new-tokens $N $SAMPLING \
      --methods "vanilla-static,aded+static,aded(max_nodes=16)+static"
    for smp in "" 1; do
      lim=${LIMIT2:-150} bench nf4-b1${smp:+-sample} --quantize nf4 --questions $Q1 --max-new-tokens $N \
        --draft-model /tmp/hfa/draft4 ${smp:+$SAMPLING} --methods "vanilla-static,quant_spec+static"
    done ;;
  layers13) # thirteenth run (issue 18): LoRA-Drop on subsets of the committed adapter's 22 droppable layers (8: the
            # set whose CPU agreement reached 0.862; 12: layers 1-15, 0.822), M2R2 self_spec at k = 3 and k = 1
    D8="[1,2,3,5,6,7,9,10]"; D12="[1,2,3,5,6,7,9,10,11,13,14,15]"
    bench layers13-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla-static,lora_drop(period=4,droppable=$D8)+static,lora_drop(period=4,droppable=$D12)+static,m2r2(mode=self_spec)+static,m2r2(mode=self_spec,k=1)+static" ;;
  layers14) # fourteenth run (issue 18): LoRA-Drop with the 8-layer droppable set alone (the committed adapter's LoRAs
            # for those layers; CPU agreement 0.862): its speed and held-out agreement
    D8="[1,2,3,5,6,7,9,10]"
    bench layers14-b1 --questions $Q1 --max-new-tokens $N --methods "${M1:-vanilla-static,lora_drop(period=4,droppable=$D8)+static}" ;;
  train14)  # fourteenth run (issue 18): LoRA-Drop LoRAs for the 8-layer set distilled (KL) from the committed adapter's
            # weights for those layers (TRAIN_MIN minutes, SAMPLES self-distilled sequences), then the same bench as
            # layers14 with the new artifact; the artifact comes back as ld8.tgz
    D8="[1,2,3,5,6,7,9,10]"; O=${OUT:-/tmp}
    timeout "${TLIM:-330}" bash scripts/gpu_bench.sh run train lora_drop --model default --period 4 --droppable 1,2,3,5,6,7,9,10 \
        --init artifacts/smollm2-135m/lora_drop --distill kl --minutes ${TRAIN_MIN:-4} --lr 1e-3 --samples ${SAMPLES:-2048} \
        --gen-batch 256 --batch 16 --seq-len 384 --eval-every 100 --no-progress --out /tmp/hfa/ld8 > "$O/train-ld8.log" 2>&1
    grep -E "held-out|\"steps\"|Error" "$O/train-ld8.log" | tail -6
    [ -f /tmp/hfa/ld8/config.json ] && tar -czf "$O/ld8.tgz" -C /tmp/hfa ld8/config.json ld8/log.jsonl ld8/model.safetensors
    bench train14-b1 --questions $Q1 --max-new-tokens $N --methods "vanilla-static,lora_drop(period=4,adapter=/tmp/hfa/ld8)+static" ;;
  spec14|spec15)  # fourteenth run (issue 18): the static follower's forwards with one host-to-device copy of packed
            # inputs (its slot bookkeeping inside the captured step): fp32 identity of M2R2 self_spec / EAD / quant_spec
            # with the model as its own drafter (batch 1 and 3 padded), then M2R2 self_spec k = 1 / 2 vs vanilla-static
            # (one step's profile: METHODS="m2r2(mode=self_spec,k=1)+static" bash scripts/gpu_wave.sh profile).
            # spec15 (fifteenth run): the same after self_spec's drafts became deferred tokens (fed to the verify on
            # the device, read with its verdicts) and its prompt KV adopted from the target's prefill; its bench adds
            # LoRA-Drop at its new default (the committed adapter's default_drop)
    O=${OUT:-/tmp}
    for bs in 1 3; do
      timeout "${CLIM:-150}" bash scripts/gpu_bench.sh run script scripts/layer_plans_check.py --dtype fp32 --prompts 1 \
          --max-new-tokens 48 --batch $bs --only "spec,ead,quant_spec" > "$O/follower-check-b$bs.log" 2>&1
      grep -E "same-as|TOTAL|MISMATCHES|Error" "$O/follower-check-b$bs.log" | cut -c1-220 | tail -14
    done
    if [ "$1" = spec15 ]; then M=${M1:-vanilla-static,m2r2(mode=self_spec,k=1)+static,lora_drop(period=4)+static}
    else M=${M1:-vanilla-static,m2r2(mode=self_spec,k=1)+static,m2r2(mode=self_spec,k=2)+static}; fi
    bench $1-b1 --questions $Q1 --max-new-tokens $N --methods "$M" ;;
  heads13)  # thirteenth run (issue 17): the committed (twelfth-run) heads; LUD lossless at its new default beta 0.2,
            # Clover at width 8 (default) and 16
    bench heads13-b1 --questions $Q1 --max-new-tokens $N --methods "${M1:-vanilla-static,lud(lossless=True)+static,clover+static,clover(width=16)+static}" ;;
  b813)     # thirteenth run (issue 17): batch 8 (two rows of 8 padded prompts), the lossless trained-head methods
    bench heads13-b8 --questions $Q8 --batch 8 --max-new-tokens $N --methods "${M8:-vanilla-static,clover+static,hidden_transfer+static,hidden_transfer(max_nodes=8)+static,lud(lossless=True)+static}" ;;
  check)    # the device sampling path's GPU checks (captured steps = host path, top-p's top-K form, chi-square)
    timeout "$lim" bash scripts/gpu_bench.sh run script scripts/sampling_gpu_check.py > "${OUT:-/tmp}/sampling_gpu_check.log" 2>&1
    grep -E "PASS|FAIL" "${OUT:-/tmp}/sampling_gpu_check.log" | cut -c1-200 | tail -45 ;;
  *) echo "layers14 | train14 | spec14 | layers13 | heads13 | b813 | train12 | heads12 | sample12 | greedy | greedy2 | layers | ead | nf4 | sample | b8 | budget1 | budget8 | sample2 | heads | all1 | all1s | all8 | all8s | prewarm | cells | layers2 | check | duo | duo8k | duo24 | profile | project" >&2; exit 2 ;;
esac
