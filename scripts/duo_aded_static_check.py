"""GPU check of duo_attention composed with ADED on hf_accel's static engine (issue 24, EngineDuoCache).

1. fp32, each --check-lengths context (passkey prompts, default 2048): accel=["duo_attention", "aded"] with
   cache_implementation="static" (the engine: compiled verify step captured as a CUDA graph, ring append in the
   captured compaction) must give duo_attention alone's tokens: dynamic (eager DuoCache) and static (HF's compiled
   StaticDuoCache). The default recent window (256) is far below the context, so the rings wrap at every commit.
   Two calls each (the second reuses the workspace and its graphs: no capture, no recompile).
2. bf16, each --lengths context: decode ms per new token of vanilla-static (HF StaticCache, compiled),
   duo_attention-static (HF compiled on StaticDuoCache), aded-static (engine, full KV) and
   duo_attention+aded-static (engine, duo rings), same prompt, warm first; tokens per forward; KV bytes.
Usage: python scripts/duo_aded_static_check.py [--check-lengths 2048] [--lengths 2048,4096,8192] [--new 128]
       [--pattern DIR]
Look for: "equal to duo dynamic: True / equal to duo static: True" on both calls, graphs True, compile_seconds 0.0
on call 2, dynamo graph_break {} ; then duo_attention+aded-static's speedup vs vanilla-static at 8k (target >= 1.5x)
and vs aded-static (what the rings buy under the engine).
"""

import argparse
import time

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

import hf_accel
from hf_accel.data import passkey
from hf_accel.default_model import load_default
from hf_accel.default_model import default_artifact


def prompt(tok, length, device):
    s = passkey.make_sample(tok, length, 0.5, seed=10_000)
    return torch.tensor([s.prompt], device=device)


def variants(model, length, duo, aded):
    return {
        "vanilla-static": lambda: dict(past_key_values=StaticCache(config=model.config, max_cache_len=length)),
        "duo_attention-static": lambda: dict(accel="duo_attention", cache_implementation="static",
                                             accel_kwargs={**duo, "max_cache_len": length}),
        "aded-static": lambda: dict(accel="aded", cache_implementation="static", accel_kwargs=dict(aded)),
        # max_cache_len: the engine's fixed length, so the warm, 1-token and N-token calls share one workspace
        "duo_attention+aded-static": lambda: dict(accel=["duo_attention", "aded"], cache_implementation="static",
                                                  accel_kwargs={"duo_attention": {**duo, "max_cache_len": length},
                                                                "aded": dict(aded)}),
    }


def gen(model, ids, n, pad, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=pad, **kw)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model, ids, n, pad, **kw):
    sync()
    t = time.perf_counter()
    out = gen(model, ids, n, pad, **kw)
    sync()
    return time.perf_counter() - t, out


def first_diff(a, b, plen):
    d = (a[0] != b[0]).nonzero()
    return "" if len(d) == 0 else f" (first difference at new token {int(d[0]) - plen})"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-lengths", default="2048")
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of part 1 (eager, no graphs)")
    a = ap.parse_args()
    dev = a.device
    torch._dynamo.config.recompile_limit = 64
    pattern = a.pattern or default_artifact("duo_attention")
    duo = {"pattern": str(pattern) if pattern is not None else None, "sparsity": 0.5}
    aded = {}  # ADED's defaults (datastore "auto", max_nodes "auto")
    print(f"pattern: {pattern}", flush=True)

    model, tok = load_default(dtype=torch.float32, device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for length in [int(x) for x in a.check_lengths.split(",")]:
        ids = prompt(tok, length, dev)
        plen, cache_len = ids.shape[1], ids.shape[1] + a.new
        dyn = gen(model, ids, a.new, pad, accel="duo_attention", accel_kwargs=duo)
        st_kw = variants(model, cache_len, duo, aded)
        static = gen(model, ids, a.new, pad, **st_kw["duo_attention-static"]())
        print(f"fp32 {plen} tokens: duo static == duo dynamic: {torch.equal(static, dyn)}"
              f"{first_diff(static, dyn, plen)}", flush=True)
        for call in (1, 2):
            t, out = timed(model, ids, a.new, pad, **st_kw["duo_attention+aded-static"]())
            st = hf_accel.stats(out)
            print(f"  duo+aded static call {call}: {t:.1f}s, equal to duo dynamic: {torch.equal(out, dyn)}"
                  f"{first_diff(out, dyn, plen)}, equal to duo static: {torch.equal(out, static)}; graphs "
                  f"{st.extra.get('graphs')}, compile_seconds {st.extra.get('compile_seconds', 0):.1f}, tokens/forward "
                  f"{st.tokens_per_forward:.2f}, defrags {st.extra.get('defragmentations')}, kv "
                  f"{st.kv_cache_bytes / 2**20:.1f} MiB of {st.extra['full_kv_bytes'] / 2**20:.1f}; dynamo "
                  f"{dict(counters['stats'])}, graph_break {dict(counters['graph_break'])}", flush=True)
    del model
    if dev != "cuda" or not a.lengths:
        raise SystemExit(0)
    torch.cuda.empty_cache()

    model, tok = load_default(dtype=torch.bfloat16, device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = a.new
    for length in [int(x) for x in a.lengths.split(",")]:
        ids = prompt(tok, length, dev)
        cache_len = ids.shape[1] + n + 1
        res, tpf = {}, {}
        for name, make in variants(model, cache_len, duo, aded).items():
            t = time.perf_counter()
            gen(model, ids, 8, pad, **make())  # compile + capture
            warm = time.perf_counter() - t
            steps = []
            for _ in range(3):
                tn, out = timed(model, ids, n + 1, pad, **make())
                t1, _ = timed(model, ids, 1, pad, **make())
                steps.append((tn - t1) / n)
            res[name] = sorted(steps)[1]
            st = hf_accel.stats(out) if name != "vanilla-static" else None
            tpf[name] = st.tokens_per_forward if st is not None and st.steps else 1.0
            kv = f", kv {st.kv_cache_bytes / 2**20:.0f} MiB" if st is not None else ""
            print(f"bf16 context {ids.shape[1]}: {name}: {res[name] * 1e3:.2f} ms/token, tokens/forward "
                  f"{tpf[name]:.2f}{kv} (warm call {warm:.0f}s)", flush=True)
        base = res["vanilla-static"]
        print(f"  speedup vs vanilla-static at {ids.shape[1]}: "
              + ", ".join(f"{k} {base / v:.2f}x" for k, v in res.items())
              + f"; duo+aded vs aded-static {res['aded-static'] / res['duo_attention+aded-static']:.2f}x", flush=True)
