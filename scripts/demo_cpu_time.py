"""`hf-accel demo`'s comparison (vanilla greedy vs ADED with its defaults, MT-Bench prompts, fp32) timed two ways:
wall clock (what the demo prints) and CPU time of this process (time.process_time), which a machine shared with
other jobs disturbs far less. Vanilla and ADED alternate per prompt, ``--reps`` rounds.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/demo_cpu_time.py --prompts 3 --max-new-tokens 64 --reps 2
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_accel
from hf_accel.loading import ensure_default_datastore, load_model as _load_model
from hf_accel.data import mtbench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--accel-kwargs", default="{}", help="JSON accel_kwargs for aded (default: its defaults)")
    args = p.parse_args()
    import json

    model, tok = _load_model("default", "fp32", "cpu")
    kw = {"datastore": str(ensure_default_datastore(model, tok)), **json.loads(args.accel_kwargs)}
    prompts = mtbench.prompts(tok, start=0, limit=args.prompts)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} aded kwargs {kw}")
    tot = {"vw": 0.0, "vc": 0.0, "aw": 0.0, "ac": 0.0, "vn": 0, "an": 0}
    for rep in range(args.reps):
        for qi, ids in enumerate(prompts):
            x = torch.tensor([ids])
            w, c = time.perf_counter(), time.process_time()
            ref = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False)
            vw, vc = time.perf_counter() - w, time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            out = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False, accel="aded", accel_kwargs=kw)
            aw, ac = time.perf_counter() - w, time.process_time() - c
            n = ref.shape[1] - x.shape[1]
            st = hf_accel.stats(out)
            b = st.extra.get("budget", {})
            for k, v in (("vw", vw), ("vc", vc), ("aw", aw), ("ac", ac), ("vn", n), ("an", st.new_tokens)):
                tot[k] += v
            print(f"rep {rep} q{qi:02d}: wall vanilla {n / vw:5.1f} aded {st.new_tokens / aw:5.1f} tok/s "
                  f"({vw / aw * st.new_tokens / n:.2f}x) | cpu-time vanilla {n / vc:5.1f} aded {st.new_tokens / ac:5.1f} "
                  f"tok/s ({vc / ac * st.new_tokens / n:.2f}x) | {st.tokens_per_forward:.2f} tok/forward | identical "
                  f"{torch.equal(out, ref)} | widths {b.get('chosen')} calibration {b.get('calibration', 0):.2f}"
                  + (f" | {b['fallback']}" if "fallback" in b else ""), flush=True)
    print(f"== wall: vanilla {tot['vn'] / tot['vw']:.1f} tok/s, aded {tot['an'] / tot['aw']:.1f} tok/s "
          f"({tot['an'] / tot['aw'] / (tot['vn'] / tot['vw']):.2f}x); cpu-time: vanilla {tot['vn'] / tot['vc']:.1f}, "
          f"aded {tot['an'] / tot['ac']:.1f} ({tot['an'] / tot['ac'] / (tot['vn'] / tot['vc']):.2f}x)")
    print("cost table (seconds per step by width):", {w: round(s, 4) for w, s in b.get("widths", {}).items()})


if __name__ == "__main__":
    main()
