"""Quick GPU check of the static-cache engine on the default model: identity to vanilla greedy and speed of
vanilla (eager), vanilla static+compiled, ADED eager, ADED on the static engine (CUDA graphs) and ADED on the
static engine with torch.compile'd verify step. The first prompt warms everything up (compile, capture).

    python scripts/static_check.py [--dtype fp32|bf16] [--prompts 3] [--max-new-tokens 128]
"""

import argparse
import time

import torch
from transformers import CompileConfig

import hf_accel
from hf_accel.loading import ensure_default_datastore, load_model as _load_model
from hf_accel.data import mtbench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="> 1: left-padded batches, identity only")
    a = p.parse_args()
    model, tok = _load_model("default", a.dtype, a.device)
    ensure_default_datastore(model, tok)
    if a.batch > 1:
        return check_batches(model, tok, a)
    aded = {"accel": "aded", "accel_kwargs": {"max_nodes": a.nodes}}
    methods = [
        ("vanilla", {}),
        ("vanilla-static", {"cache_implementation": "static"}),
        ("aded", aded),
        ("aded+static", {**aded, "cache_implementation": "static"}),
        ("aded+static+compile", {**aded, "cache_implementation": "static", "compile_config": CompileConfig()}),
    ]
    totals = {m: [0, 0.0] for m, _ in methods}
    prompts = mtbench.prompts(tok, limit=a.prompts + 1)
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], device=model.device)
        row, ref = [], None
        for label, kw in methods:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(x, max_new_tokens=a.max_new_tokens, do_sample=False, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            n = out.shape[1] - x.shape[1]
            ref = out if ref is None else ref
            st = hf_accel.stats(out) if "accel" in kw else None
            extra = ""
            if st:
                extra = f" tpf {st.tokens_per_forward:.2f} draft {st.draft_seconds:.3f}s verify {st.verify_seconds:.3f}s"
                extra += f" compile {st.extra.get('compile_seconds', 0):.2f}s"
            row.append(f"{label}: {n / dt:.1f} tok/s same={torch.equal(out, ref)}{extra}")
            if i > 0:
                totals[label][0] += n
                totals[label][1] += dt
        print(f"q{i}{' (warm-up)' if i == 0 else ''}: " + " | ".join(row), flush=True)
    base = totals["vanilla-static"][0] / totals["vanilla-static"][1]
    for m, (n, dt) in totals.items():
        print(f"== {m}: {n / dt:.1f} tok/s, {n / dt / base:.2f}x vanilla-static")


def check_batches(model, tok, a):
    """Left-padded batches of MT-Bench prompts: the static engine (graphs, compiled) vs vanilla greedy, and a
    sampled run (must simply finish with sane lengths)."""
    qs = [q["turns"][0] for q in mtbench.questions()[: a.prompts * a.batch]]
    for i in range(0, len(qs), a.batch):
        msgs = [[{"role": "user", "content": q}] for q in qs[i : i + a.batch]]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True).to(model.device)
        kw = dict(max_new_tokens=a.max_new_tokens, do_sample=False)
        ref = model.generate(**enc, **kw)
        row = []
        for nodes in (a.nodes, 16):
            out = model.generate(**enc, **kw, accel="aded", accel_kwargs={"max_nodes": nodes},
                                 cache_implementation="static")
            st = hf_accel.stats(out)
            same = [bool(torch.equal(out[r], ref[r])) for r in range(out.shape[0])]
            row.append(f"nodes {nodes}: rows identical {same} tpf {st.tokens_per_forward:.2f} {st.extra}")
        torch.manual_seed(0)
        s = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=True, temperature=0.8, accel="aded",
                           cache_implementation="static")
        row.append(f"sampled: shape {tuple(s.shape)}")
        print(f"batch {i // a.batch}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
