"""GPU check of duo_attention on the static compiled cache (issue 24).

1. fp32, --check-length context: HF's generate compiles the decode step on the StaticDuoCache (default CompileConfig:
   inductor, reduce-overhead = CUDA graphs); the tokens must be the eager dynamic DuoCache's, with no graph break,
   no CUDA-graph skip, and no recompile on a second call.
2. bf16, --length context: decode ms/step of vanilla-static (HF StaticCache) and duo_attention-static with each
   decode kernel (static_kernel="math" | "sdpa"), same fixed cache length, warm first.
Usage: python scripts/duo_static_check.py [--check-length 2048] [--length 8000] [--new 64] [--pattern DIR]
Look for: "tokens equal: True" on both calls, graph_break {} and no cudagraph skips, unique_graphs unchanged by
call 2; then which kernel is faster (the bench uses static_kernel="math", the default).
"""

import argparse
import time

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

import hf_accel
from hf_accel.default_model import load_default


def timed(model, ids, n, **kw):
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-length", type=int, default=2048)
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--pattern", default=None)
    a = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64
    duo = {"pattern": a.pattern, "sparsity": 0.5}

    model, tok = load_default(dtype=torch.float32, device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (1, a.check_length), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
              accel="duo_attention", accel_kwargs=duo)
    dyn = model.generate(ids, **kw)
    for call in (1, 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw, cache_implementation="static")
        torch.cuda.synchronize()
        same = torch.equal(out, dyn)
        diff = (out[0] != dyn[0]).nonzero()
        st = hf_accel.stats(out)
        print(f"fp32 call {call}: {time.perf_counter() - t:.1f}s, tokens equal: {same}"
              + ("" if same else f" (first difference at new token {int(diff[0]) - a.check_length})"), flush=True)
        print(f"  compiled: {hasattr(model, '_compiled_call')}, cache {st.extra['cache']}, kv "
              f"{st.kv_cache_bytes / 2**20:.1f} MiB of {st.extra['full_kv_bytes'] / 2**20:.1f}; dynamo "
              f"{dict(counters['stats'])}, graph_break {dict(counters['graph_break'])}, inductor "
              f"{ {k: v for k, v in counters['inductor'].items() if 'cudagraph' in k} }", flush=True)
    del model
    torch.cuda.empty_cache()

    model, tok = load_default(dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(100, 20000, (1, a.length), device="cuda")
    n = a.new
    length = a.length + n
    variants = {
        "vanilla-static": lambda: dict(past_key_values=StaticCache(config=model.config, max_cache_len=length)),
        "duo-static math": lambda: dict(accel="duo_attention", cache_implementation="static",
                                        accel_kwargs={**duo, "max_cache_len": length, "static_kernel": "math"}),
        "duo-static sdpa": lambda: dict(accel="duo_attention", cache_implementation="static",
                                        accel_kwargs={**duo, "max_cache_len": length, "static_kernel": "sdpa"}),
    }
    res = {}
    for name, make in variants.items():
        t = time.perf_counter()
        timed(model, ids, 8, **make())  # compile + capture
        warm = time.perf_counter() - t
        steps = []
        for _ in range(3):
            steps.append((timed(model, ids, n + 1, **make()) - timed(model, ids, 1, **make())) / n)
        res[name] = sorted(steps)[1]
        print(f"bf16 context {a.length}: {name}: {res[name] * 1e3:.2f} ms/step (warm call {warm:.0f}s)", flush=True)
    base = res["vanilla-static"]
    print("speedup vs vanilla-static: " + ", ".join(f"{k} {base / v:.2f}x" for k, v in res.items()))
