"""GPU check of the trained-part methods on the static engine (issue 17): Clover, hidden transfer and LUD (lossless
and lossy beta) with ``cache_implementation="static"`` (CUDA graphs; optionally torch.compile'd verify step)
against the same methods on the dynamic engine and against HF's own static+compiled greedy path
(``vanilla-static``), on the default model with the committed artifacts, MT-Bench prompts.

For every method it prints tok/s, tokens per forward, whether the tokens equal the dynamic engine's (and, for the
lossless ones, vanilla greedy's) and a profile of one step: draft (the adapter's host + drafter work, Clover's
captured drafter included), verify forward (synchronised around ``backend.verify``: mask build + forward +
argmax, the captured graph on the static engine) and the rest (walk, commit, ``verified`` hooks), in ms per step.
The first prompt warms everything up (capture, compile) and is not counted.

    python scripts/static_heads_check.py [--dtype fp32|bf16] [--prompts 3] [--max-new-tokens 256] [--batch 1]
        [--compile] [--methods clover,hidden_transfer,lud,lud-0.7] [--clover FOLDER]

What to look for: ``same-dyn=True`` on every row in fp32 (bf16: lossless rows must still equal vanilla greedy
unless bf16 rounding differs between engines, which the same flag shows); ``graphs=True``; the x-ratio column
against vanilla-static (targets in issue 17: hidden_transfer >= 2.0x, clover >= 1.8x, lud lossless >= 1.2x,
lud beta=0.7 >= 1.3x); and in the profile, which part dominates when a target is missed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import CompileConfig

import hf_accel
from hf_accel.loading import load_model as _load_model
from hf_accel.data import mtbench
from hf_accel.engine import backends

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m"


class StepTimer:
    """Times backend.verify (synchronised) on both engines while installed."""

    def __init__(self):
        self.verify = 0.0
        self._saved = {}

    def __enter__(self):
        timer = self
        for cls in (backends.StaticBackend, backends.DynamicBackend):
            orig = cls.verify
            self._saved[cls] = orig

            def timed(self_, packed, q_pos, _orig=orig):
                dev = self_.device
                backends.sync(dev)
                t = time.perf_counter()
                out = _orig(self_, packed, q_pos)
                backends.sync(dev)
                timer.verify += time.perf_counter() - t
                return out

            cls.verify = timed
        return self

    def __exit__(self, *exc):
        for cls, orig in self._saved.items():
            cls.verify = orig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="> 1: left-padded batches of consecutive prompts")
    p.add_argument("--compile", action="store_true", help="also run the static engine with a compiled verify step")
    p.add_argument("--methods", default="clover,hidden_transfer,lud,lud-0.7")
    p.add_argument("--start", type=int, default=60, help="first MT-Bench prompt (60+: not used in training)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (eager, no graphs)")
    p.add_argument("--clover", default=str(ARTIFACTS / "clover"), help="Clover heads folder (default: committed)")
    p.add_argument("--hidden-transfer", default=str(ARTIFACTS / "hidden_transfer"))
    p.add_argument("--lud", default=str(ARTIFACTS / "lud"))
    a = p.parse_args()
    model, tok = _load_model("default", a.dtype, a.device)
    dev = torch.device(a.device)
    kinds = {
        "clover": ("clover", {"heads": a.clover}),
        "hidden_transfer": ("hidden_transfer", {"heads": a.hidden_transfer}),
        "lud": ("lud", {"adapter": a.lud, "lossless": True, "beta": 0.3}),
        "lud-0.7": ("lud", {"adapter": a.lud, "beta": 0.7}),
    }
    runs = [("vanilla", {}), ("vanilla-static", {"cache_implementation": "static"})]
    for name in a.methods.split(","):
        method, kw = kinds[name]
        base = {"accel": method, "accel_kwargs": kw}
        runs.append((name, base))
        runs.append((f"{name}+static", {**base, "cache_implementation": "static"}))
        if a.compile:
            runs.append((f"{name}+static+compile", {**base, "cache_implementation": "static",
                                                    "compile_config": CompileConfig()}))
    rows = mtbench.prompts(tok, start=a.start, limit=(a.prompts + 1) * a.batch)
    totals = {label: dict(tokens=0, seconds=0.0, steps=0, draft=0.0, verify=0.0, rest=0.0, fwd=0, same_dyn=True,
                          same_ref=None, graphs=None) for label, _ in runs}
    for i in range(a.prompts + 1):
        chunk = rows[i * a.batch : (i + 1) * a.batch]
        batch = tok.pad([{"input_ids": r} for r in chunk], return_tensors="pt", padding=True).to(dev)
        outs = {}
        for label, kw in runs:
            with StepTimer() as timer:
                t = backends.clock(dev)
                out = model.generate(**batch, max_new_tokens=a.max_new_tokens, do_sample=False, **kw)
                dt = backends.clock(dev) - t
            outs[label] = out
            if i == 0:
                continue  # warm-up: compile, capture
            tt = totals[label]
            tt["tokens"] += int((out[:, batch["input_ids"].shape[1]:] != tok.pad_token_id).sum())
            tt["seconds"] += dt
            dyn = label.split("+")[0]
            if "+static" in label:
                tt["same_dyn"] &= torch.equal(out, outs[dyn])
            if "accel" in kw:
                st = hf_accel.stats(out)
                lossless = kw["accel"] != "lud" or kw["accel_kwargs"].get("lossless")
                if lossless:
                    tt["same_ref"] = (tt["same_ref"] is not False) and torch.equal(out, outs["vanilla"])
                tt["steps"] += st.steps
                tt["fwd"] += st.row_forwards
                tt["draft"] += st.draft_seconds
                tt["verify"] += timer.verify
                tt["rest"] += st.verify_seconds - timer.verify
                tt["graphs"] = st.extra.get("graphs")
    ref = totals["vanilla-static"]
    ref_rate = ref["tokens"] / ref["seconds"]
    print(f"dtype={a.dtype} batch={a.batch} prompts={a.prompts} (from MT-Bench q{a.start}) new={a.max_new_tokens}")
    for label, _ in runs:
        tt = totals[label]
        rate = tt["tokens"] / tt["seconds"] if tt["seconds"] else 0.0
        line = f"{label:28s} {rate:8.1f} tok/s  x{rate / ref_rate:5.2f} of vanilla-static"
        if tt["steps"]:
            s = tt["steps"]
            line += (f"  tpf {tt['tokens'] / tt['fwd']:.2f}  same-dyn={tt['same_dyn']} same-greedy={'-' if tt['same_ref'] is None else tt['same_ref']}"
                     f" graphs={tt['graphs']}  per step: draft {1e3 * tt['draft'] / s:.2f} ms, verify"
                     f" {1e3 * tt['verify'] / s:.2f} ms, rest {1e3 * tt['rest'] / s:.2f} ms")
        print(line)


if __name__ == "__main__":
    main()
