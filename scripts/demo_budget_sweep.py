"""The CPU demo's auto budget against fixed ones (default model, fp32, MT-Bench q00-q01): the chooser's measured step
costs by width and its choices per prompt (128 tokens), then ADED at fixed max_nodes 1 / 2 / 3 / 4 / 8 / 16 and vanilla
on q01 (64 tokens): whether any budget beats one-token decoding on this device.

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/demo_budget_sweep.py
"""

from __future__ import annotations

import json
import time

import torch

import hf_accel
from hf_accel.loading import ensure_default_datastore, load_model
from hf_accel.data import mtbench


def main() -> None:
    model, tok = load_model("default", "fp32", "cpu")
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
