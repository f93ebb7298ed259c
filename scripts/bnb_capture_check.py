"""Can bitsandbytes 4-bit (NF4) forwards be captured as CUDA graphs / compiled? (GPU only, not in CI.)

Loads the default model in NF4 (compute dtype --dtype) and, for a one-token decoding forward on the static engine's
slot cache (the unit the static engine captures), tries in turn:

1. eager (the reference logits);
2. a CUDA graph capture of that forward, replayed: does it capture, and are the replayed logits equal to eager's;
3. torch.compile of it (dynamo graph breaks are counted with torch._dynamo.explain);
4. end to end: vanilla NF4 greedy (dynamic cache), HF's static+compiled NF4 path, quant_spec on the NF4 target on
   the dynamic engine and on the static engine (target verify captured, intermediate = the full-precision copy on a
   static follower), with tok/s and whether each equals vanilla NF4 greedy.

    python scripts/bnb_capture_check.py [--dtype bf16] [--max-new-tokens 128] [--prompts 2]

What to look for: "capture: OK ... same=True" means the static engine's CUDA graphs work on NF4 (then quant_spec+static
is the comparison to make against vanilla NF4 on the same engine kind); "capture: FAILED <error>" is the measured
reason it can't, printed with the error bitsandbytes raises (e.g. a host sync or an allocation inside its dequantize).
"""

import argparse
import time
import traceback

import torch

import hf_accel
from hf_accel import models
from hf_accel.integrations import quantization
from hf_accel.loading import load_model as _load_model
from hf_accel.data import mtbench
from hf_accel.engine.backends import StaticBackend


def timed(fn, reps=20):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - t) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2)
    a = p.parse_args()
    model, tok = _load_model("default", a.dtype, "cuda", quantize="nf4")
    print("quantized:", quantization.is_quantized(model), type(models.layers(model)[0].self_attn.q_proj).__name__)
    prompts = mtbench.prompts(tok, limit=a.prompts + 1)
    ids = torch.tensor([prompts[0]], device="cuda")
    layout, dev = models.attention_layout(model), torch.device("cuda")
    mdtype = model.dtype if model.dtype.is_floating_point else torch.bfloat16

    # one static-engine request, driven by hand: prefill, then the one-token verify step
    be = StaticBackend(model, layout, 1, dev, mdtype, ids.shape[1] + 64, 1, use_graphs=False, fwd_extra={})
    try:
        attn = torch.ones_like(ids, dtype=torch.bool)
        pos = torch.arange(ids.shape[1], device=dev)[None]
        logits, _ = be.prefill(ids, attn, pos)
        first = logits.argmax(-1)
        ws, s = be.ws, be.start
        ws.tokens.copy_(first[:, None])
        ws.q_pos.fill_(ids.shape[1])
        ws.q_visible.fill_(True)
        ws.region.fill_(s)
        be.pos[:, s] = ids.shape[1]
        ws.slot_valid.copy_(be.valid)
        ws.slot_pos.copy_(be.pos)
        (ref, _, _), t_eager = timed(lambda: ws.verify_step())
        ref = ref.clone()
        print(f"eager one-token forward: {t_eager * 1e3:.2f} ms")

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    ws.verify_step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = ws.verify_step()
            _, t_graph = timed(lambda: g.replay())
            same = torch.equal(out[0], ref)
            print(f"capture: OK, replay {t_graph * 1e3:.2f} ms/forward, same={same}, "
                  f"max|diff|={(out[0].float() - ref.float()).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 - the point of the check
            print(f"capture: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=6)

        try:
            from hf_accel.engine.backends import _verify

            args = (model, ws.cache, layout, mdtype, ws.slot_valid, ws.slot_pos, ws.tokens, ws.q_pos, ws.q_visible,
                    ws.region)
            ex = torch._dynamo.explain(_verify)(*args)
            print(f"compile: {ex.graph_count} graphs, {ex.graph_break_count} breaks; first reasons:")
            for r in ex.break_reasons[:5]:
                print("   ", str(r.reason)[:200])
        except Exception as e:  # noqa: BLE001
            print(f"compile: FAILED {type(e).__name__}: {e}")
    finally:
        be.close()

    runs = [
        ("vanilla nf4", {}),
        ("vanilla-static nf4 (HF compile)", {"cache_implementation": "static"}),
        ("quant_spec nf4 dynamic", {"accel": "quant_spec"}),
        ("quant_spec nf4 static", {"accel": "quant_spec", "cache_implementation": "static"}),
    ]
    for i, prompt in enumerate(prompts):
        x = torch.tensor([prompt], device="cuda")
        ref = None
        for label, kw in runs:
            try:
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(x, max_new_tokens=a.max_new_tokens, do_sample=False, **kw)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001
                print(f"prompt {i} {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            ref = out if ref is None else ref
            n = out.shape[1] - x.shape[1]
            extra = ""
            if "accel" in kw:
                st = hf_accel.stats(out)
                extra = (f" tpf {st.tokens_per_forward:.2f} draft {st.draft_seconds:.2f}s verify {st.verify_seconds:.2f}s"
                         f" graphs {st.extra.get('graphs')} follower {st.extra.get('follower_cache')}")
            print(f"prompt {i} {label}: {n / dt:.1f} tok/s same-as-vanilla={torch.equal(out, ref)}{extra}"
                  + (" (warm-up)" if i == 0 else ""), flush=True)


if __name__ == "__main__":
    main()
