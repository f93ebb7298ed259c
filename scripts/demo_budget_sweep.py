"""The CPU demo's auto budget against fixed ones (default model, fp32, MT-Bench q00-q01): the chooser's measured step
costs by width and its choices per prompt (128 tokens), then ADED at fixed max_nodes 1 / 2 / 3 / 4 / 8 / 16 and vanilla
on q01 (64 tokens): whether any budget beats one-token decoding on this device.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/demo_budget_sweep.py
    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/demo_budget_sweep.py --forward-costs
        # instead: plain transformers (no hf_accel) forwards of 1 / 2 / 3 / 4 / 8 / 16 tokens after a 200-token
        # context (DynamicCache, median of 20) and the LM head's matmul alone at those widths: what one more token
        # in a forward costs on this device, whatever the drafting
"""

from __future__ import annotations

import json
import sys
import time

import torch

import hf_accel
from hf_accel.loading import ensure_default_datastore, load_model
from hf_accel.data import mtbench


def forward_costs(model) -> None:
    from transformers import DynamicCache

    def median_ms(fn, reps=20):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[reps // 2] * 1e3

    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 1000, (1, 200), generator=g)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ctx, past_key_values=cache, use_cache=True)
        base = None
        for w in (1, 2, 3, 4, 8, 16):
            x = torch.randint(100, 1000, (1, w), generator=g)
            pos = torch.arange(200, 200 + w)[None]

            def step():
                extra = cache.get_seq_length() - 200
                if extra:
                    cache.crop(-extra)
                model(x, past_key_values=cache, position_ids=pos, use_cache=True)

            ms = median_ms(step)
            base = base or ms
            h = torch.randn(w, head.shape[1], generator=g)
            head_ms = median_ms(lambda: torch.nn.functional.linear(h, head))
            gflops = 2 * w * head.numel() / head_ms / 1e6
            print(f"{w:2d} tokens: forward {ms:6.1f} ms ({ms / base:.2f}x one token); LM head {head_ms:5.1f} ms "
                  f"({gflops:.1f} GFLOP/s)")


def main() -> None:
    model, tok = load_model("default", "fp32", "cpu")
    if "--forward-costs" in sys.argv[1:]:
        return forward_costs(model)
    kw = {"datastore": str(ensure_default_datastore(model, tok))}
    prompts = list(mtbench.prompts(tok, start=0, limit=2))
    x = torch.tensor([prompts[0]])
    model.generate(x, max_new_tokens=16, do_sample=False, accel="aded", accel_kwargs=kw)
    for ids in prompts:
        x = torch.tensor([ids])
        out = model.generate(x, max_new_tokens=128, do_sample=False, accel="aded", accel_kwargs=kw)
        b = hf_accel.stats(out).extra.get("budget")
        print(json.dumps({k: b[k] for k in ("widths", "chosen", "calibration", "draft_seconds")}, default=str)[:600])
    x = torch.tensor([prompts[1]])
    for w in (1, 2, 3, 4, 8, 16):
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=64, do_sample=False, accel="aded", accel_kwargs={**kw, "max_nodes": w})
        dt = time.perf_counter() - t
        print(w, round(64 / dt, 1), "tok/s", round(hf_accel.stats(out).tokens_per_forward, 2))
    t = time.perf_counter()
    model.generate(x, max_new_tokens=64, do_sample=False)
    print("vanilla", round(64 / (time.perf_counter() - t), 1), "tok/s")


if __name__ == "__main__":
    main()
