"""GPU check of the layer plans (engine/plans.py): LoRA-Drop and M2R2 early exit on the static engine, with each
plan captured as a CUDA graph. For every prompt it prints, per configuration, tok/s and whether the output equals
its reference:

* ``graphs`` (cache_implementation="static", the plans captured and replayed) against ``eager`` (the same static
  engine code run eagerly, generation_config.disable_compile=True): must be identical (same kernels);
* the static engine against the dynamic engine (same method): identical in fp32 (bf16 may differ in a late token);
* LoRA-Drop period 1 and M2R2 never-exit (threshold 1.0) on the static engine against vanilla greedy: identical (fp32);
* M2R2 self_spec, EAD with the model as its own small model and quant_spec with the model as its own intermediate,
  on the static engine (their followers on static slots, CUDA graphs per forward width): identical to greedy (fp32).

The first prompt warms up (capture), later prompts are timed; the last lines give tok/s summed over the timed
prompts against vanilla-static (HF's static cache + torch.compile).

    python scripts/layer_plans_check.py [--dtype fp32|bf16] [--prompts 3] [--max-new-tokens 128] [--batch 1]
        [--only "spec,ead,quant_spec"]

``--reuse``: instead, the graph reuse check. Each +static configuration (LoRA-Drop period 4, M2R2 early exit,
M2R2 self_spec, EAD and quant_spec with the model as their small model / intermediate) runs the same prompt twice
in a row: the second call must capture nothing (``capture`` = stats compile_seconds, which includes the followers'
capture, ~0; ``captured`` = graphs captured by that call: 0) and give the first call's tokens. Then a second prompt
(same shape class), once: new follower widths may be captured there, never the plans. Prints ``PASS graph reuse``
or ``FAIL graph reuse`` at the end.

    python scripts/layer_plans_check.py --reuse [--dtype bf16] [--max-new-tokens 128] [--batch 1]
"""

import argparse
import time

import torch

import hf_accel
from hf_accel.loading import load_model as _load_model
from hf_accel.data import mtbench

LORA = "artifacts/smollm2-135m/lora_drop"
M2R2 = "artifacts/smollm2-135m/m2r2"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1, help="> 1: left-padded batches of prompts")
    p.add_argument("--reuse", action="store_true", help="the graph reuse check (see the module docstring)")
    p.add_argument("--only", default=None, help="comma list of label substrings: only those configurations (and "
                   "vanilla and the references they need; 'vanilla-static' to time against it)")
    a = p.parse_args()
    model, tok = _load_model("default", a.dtype, a.device)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if a.reuse:
        return reuse_check(model, tok, a)
    ld4 = {"accel": "lora_drop", "accel_kwargs": {"adapter": LORA, "period": 4}}
    ld1 = {"accel": "lora_drop", "accel_kwargs": {"adapter": LORA, "period": 1}}
    ee = {"accel": "m2r2", "accel_kwargs": {"adapter": M2R2, "mode": "early_exit", "threshold": 0.9}}
    ee1 = {"accel": "m2r2", "accel_kwargs": {"adapter": M2R2, "mode": "early_exit", "threshold": 1.0}}
    spec = {"accel": "m2r2", "accel_kwargs": {"adapter": M2R2, "mode": "self_spec", "k": 3}}
    # the model as its own small model / intermediate: outputs must be greedy's (fp32)
    ead = {"accel": "ead", "accel_kwargs": {"small_model": model, "threshold": 4.0, "max_small_run": 16}}
    qs = {"accel": "quant_spec", "accel_kwargs": {"intermediate": model, "aded": {"datastore": None}, "k": 4}}
    st, eager = {"cache_implementation": "static"}, {"cache_implementation": "static", "disable_compile": True}
    # (label, generate kwargs, label of the reference it must equal)
    runs = [
        ("vanilla", {}, None),
        ("vanilla-static", {"cache_implementation": "static"}, None),
        ("lora_drop p1 graphs", {**ld1, **st}, "vanilla"),
        ("lora_drop p4 dynamic", ld4, None),
        ("lora_drop p4 eager", {**ld4, **eager}, "lora_drop p4 dynamic"),
        ("lora_drop p4 graphs", {**ld4, **st}, "lora_drop p4 eager"),
        ("m2r2 never graphs", {**ee1, **st}, "vanilla"),
        ("m2r2 exit0.9 dynamic", ee, None),
        ("m2r2 exit0.9 eager", {**ee, **eager}, "m2r2 exit0.9 dynamic"),
        ("m2r2 exit0.9 graphs", {**ee, **st}, "m2r2 exit0.9 eager"),
        # static followers (draft stream / small model / intermediate on static slots, CUDA graphs per width)
        ("m2r2 spec dynamic", spec, "vanilla"),
        ("m2r2 spec eager", {**spec, **eager}, "vanilla"),
        ("m2r2 spec graphs", {**spec, **st}, "vanilla"),
        ("m2r2 spec k1 graphs", {**spec, "accel_kwargs": {**spec["accel_kwargs"], "k": 1}, **st}, "vanilla"),
        ("ead self dynamic", ead, "vanilla"),
        ("ead self graphs", {**ead, **st}, "vanilla"),
        ("quant_spec self graphs", {**qs, **st}, "vanilla"),
    ]
    if a.only:
        keep = {r[0] for r in runs if r[0] == "vanilla"  # (vanilla-static, a compile, only where asked for)
                or any(x in r[0] for x in a.only.split(","))}
        while any(r[2] and r[2] not in keep for r in runs if r[0] in keep):  # the references they are compared to
            keep |= {r[2] for r in runs if r[0] in keep and r[2]}
        runs = [r for r in runs if r[0] in keep]
    totals = {r[0]: [0, 0.0] for r in runs}
    texts = mtbench.prompts(tok, limit=(a.prompts + 1) * a.batch)
    bad = 0
    for i in range(a.prompts + 1):
        ids, attn = _batch(model, tok, texts[i * a.batch : (i + 1) * a.batch])
        outs = {}
        for label, kw, ref in runs:
            sync()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=attn, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw)
            sync()
            dt = time.perf_counter() - t
            outs[label] = out
            n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
            same = "" if ref is None else f" same-as[{ref}]={torch.equal(out, outs[ref])}"
            if ref is not None and not torch.equal(out, outs[ref]):
                bad += 1
                diff = (out[:, ids.shape[1]:] != outs[ref][:, ids.shape[1]:]).int().argmax(-1).tolist()
                same += f" first-diff-at={diff}"
            extra = ""
            if "accel" in kw:
                s = hf_accel.stats(out)
                extra = (f" steps {s.steps} draft {s.draft_seconds:.3f}s verify {s.verify_seconds:.3f}s"
                         f" capture {s.extra.get('compile_seconds', 0):.2f}s graphs {s.extra.get('graphs')}"
                         f" exit_rate {s.extra.get('exit_rate', '-')} tpf {s.tokens_per_forward:.2f}"
                         f" draft_graphs {s.extra.get('draft_graphs', '-')} plan_graphs {s.extra.get('plan_graphs', '-')}")
            print(f"prompt {i} {label}: {n / dt:.1f} tok/s{same}{extra}", flush=True)
            if i > 0:
                totals[label][0] += n
                totals[label][1] += dt
    ref = "vanilla-static" if totals.get("vanilla-static", [0, 0.0])[1] else "vanilla"
    base = totals[ref][0] / max(totals[ref][1], 1e-9)
    for label, (n, dt) in totals.items():
        if not dt:
            continue
        print(f"TOTAL {label}: {n / dt:.1f} tok/s = {n / dt / base:.2f}x {ref}")
    print("MISMATCHES", bad)


def _batch(model, tok, batch):
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, x in enumerate(batch):
        ids[b, width - len(x) :] = torch.tensor(x)
        attn[b, width - len(x) :] = 1
    return ids.to(model.device), attn.to(model.device)


def _captured(extra: dict) -> int:
    """Graphs captured by the call (plans, followers; the engine's own verify graph shows in compile_seconds)."""
    return sum(int(extra.get(k, 0)) for k in ("plan_captures", "draft_captures", "small_captures",
                                             "follower_captures"))


def reuse_check(model, tok, a):
    st = {"cache_implementation": "static"}
    configs = [
        ("lora_drop p4", {"accel": "lora_drop", "accel_kwargs": {"adapter": LORA, "period": 4}}),
        ("m2r2 exit0.9", {"accel": "m2r2", "accel_kwargs": {"adapter": M2R2, "mode": "early_exit", "threshold": 0.9}}),
        ("m2r2 spec", {"accel": "m2r2", "accel_kwargs": {"adapter": M2R2, "mode": "self_spec", "k": 3}}),
        ("ead self", {"accel": "ead", "accel_kwargs": {"small_model": model, "threshold": 4.0, "max_small_run": 16}}),
        ("quant_spec self", {"accel": "quant_spec", "accel_kwargs": {"intermediate": model, "aded": {"datastore": None},
                                                                    "k": 4}}),
    ]
    texts = mtbench.prompts(tok, limit=2 * a.batch)
    inputs = [_batch(model, tok, texts[i * a.batch : (i + 1) * a.batch]) for i in range(2)]
    bad = 0
    for label, kw in configs:
        first = None
        for call, (ids, attn) in enumerate([inputs[0], inputs[0], inputs[1]], 1):
            sync()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=attn, max_new_tokens=a.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw, **st)
            sync()
            dt = time.perf_counter() - t
            e = hf_accel.stats(out).extra
            cap, n = e.get("compile_seconds", 0.0), _captured(e)
            line = f"{label} call {call}: {dt:.3f}s capture {cap:.4f}s captured {n} graphs {e.get('graphs')}"
            if call == 1:
                first = out
                if model.device.type == "cuda" and not (e.get("graphs") and cap > 0):
                    bad += 1
                    line += " FAILED (the first call should capture: graphs off?)"
            elif call == 2:
                same = torch.equal(out, first)
                ok = same and n == 0 and cap < 0.005
                bad += not ok
                line += f" same-as-call-1={same} {'ok' if ok else 'FAILED (must capture nothing)'}"
            else:
                line += f" (another prompt: plan_captures {e.get('plan_captures', '-')} must be 0 or '-')"
                if e.get("plan_captures", 0):
                    bad += 1
            print(line, flush=True)
    print("PASS graph reuse" if not bad else f"FAIL graph reuse ({bad} checks)")


if __name__ == "__main__":
    main()
