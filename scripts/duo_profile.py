"""Where a duo_attention decode step spends its time (GPU): per-step seconds of vanilla vs duo_attention at one
context length, then a torch.profiler table of a few duo decode steps (CPU ops, CUDA kernels, host syncs).
Usage: python scripts/duo_profile.py [--length 2048] [--steps 32] [--pattern DIR]
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hf_accel
from hf_accel.loading import load_default


def per_step(model, ids, steps, **kw):
    def timed(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    return (timed(steps + 1) - timed(1)) / steps


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--pattern", default=None)
    a = ap.parse_args()
    model, tok = load_default(dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(100, 20000, (1, a.length), device="cuda")
    duo = dict(accel="duo_attention", accel_kwargs={"pattern": a.pattern, "sparsity": 0.5})
    v, d = per_step(model, ids, a.steps), per_step(model, ids, a.steps, **duo)
    print(f"context {a.length}: vanilla {v * 1e3:.1f} ms/step, duo_attention {d * 1e3:.1f} ms/step ({v / d:.2f}x)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False, **duo)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
