"""GPU check of duo_attention on the static compiled cache (issue 24): HF's generate compiles the decode step on the
StaticDuoCache (default CompileConfig: inductor, reduce-overhead = CUDA graphs); the tokens must be the eager
dynamic DuoCache's (fp32), with no graph break, no CUDA-graph skip, and no recompile on a second call.
Usage: python scripts/duo_static_check.py [--length 2048] [--new 64] [--pattern DIR]
Look for: "tokens equal: True" on both calls, graph_break {} and no cudagraph_skips, unique_graphs 1 after call 2.
"""

import argparse
import time

import torch
from torch._dynamo.utils import counters

import hf_accel
from hf_accel.default_model import load_default

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--pattern", default=None)
    a = ap.parse_args()
    model, tok = load_default(dtype=torch.float32, device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (1, a.length), device="cuda")
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
              accel="duo_attention", accel_kwargs={"pattern": a.pattern, "sparsity": 0.5})
    dyn = model.generate(ids, **kw)
    for call in (1, 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw, cache_implementation="static")
        torch.cuda.synchronize()
        same = torch.equal(out, dyn)
        diff = (out[0] != dyn[0]).nonzero()
        print(f"call {call}: {time.perf_counter() - t:.1f}s, tokens equal: {same}"
              + ("" if same else f" (first difference at new token {int(diff[0]) - a.length})"))
        print(f"  compiled: {hasattr(model, '_compiled_call')}, cache: {hf_accel.stats(out).extra['cache']}, "
              f"kv bytes {hf_accel.stats(out).kv_cache_bytes / 2**20:.1f} MiB of "
              f"{hf_accel.stats(out).extra['full_kv_bytes'] / 2**20:.1f}")
        print(f"  dynamo stats {dict(counters['stats'])}, graph_break {dict(counters['graph_break'])}, "
              f"inductor {({k: v for k, v in counters['inductor'].items() if 'cudagraph' in k})}")
