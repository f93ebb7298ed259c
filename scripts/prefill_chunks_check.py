"""The static engine's chunked prefill on a GPU: prefill seconds and tokens, chunked (the default with CUDA graphs) vs
one eager forward (``backends.PREFILL_CHUNKS = False``), per method, same prompts, same process.

    bash scripts/gpu_bench.sh run script scripts/prefill_chunks_check.py \
        [--methods "aded(max_nodes=16)+static,clover+static,lud(lossless=True)+static,hidden_transfer+static"] \
        [--prompts 4] [--batch 1] [--max-new-tokens 128] [--dtype bf16] [--out FILE.md]

Prompts: MT-Bench questions 60, 61, ... (~150-250 tokens through the chat template). Each method is warmed up once
per mode on the first call (compile + graph capture: the chunked prefill captures the verify graph of the node
budget's width itself, which the steps replay), then every call is run in both modes, alternating. Per method: the
prefill mode the engine reports (``stats.extra["prefill"]``), mean prefill seconds (``stats.prefill_seconds``: from
the call's start, after a device sync, to the first token) and call seconds of each mode, and the share of calls
whose tokens are identical between the modes (bf16: the chunks' matmuls are shaped differently from the one
forward's, so a near-tie may flip; 1.0 expected on most prompts). What to look for: prefill ~0.06 s eager ->
~0.01-0.02 s chunked on the default 135M model; compile_seconds 0 in the timed calls.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="aded(max_nodes=16)+static,clover+static,lud(lossless=True)+static,"
                    "hidden_transfer+static")
    ap.add_argument("--prompts", type=int, default=4, help="calls per mode (each of --batch MT-Bench questions)")
    ap.add_argument("--start", type=int, default=60)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true", help="chunks without CUDA graphs too (a CPU dry run)")
    a = ap.parse_args()

    import hf_accel
    from hf_accel import loading, registry
    from hf_accel.bench import methods as bm
    from hf_accel.bench.runner import left_pad
    from hf_accel.data import mtbench
    from hf_accel.engine import backends

    model, tok = loading.load_model("default", a.dtype, a.device)
    defaults = {n: loading.default_accel_kwargs(n) for n in registry.available() if loading.default_accel_kwargs(n)}
    specs = []
    for entry in bm.split_top(a.methods):
        try:
            specs.append(bm.parse_one(entry, defaults, model))
        except bm.MissingPart as e:
            print(f"skipped {e.label}: {e.reason}", flush=True)
    if any(s.name == "aded" and "datastore" not in s.kwargs for s in specs):
        loading.ensure_default_datastore(model, tok, progress=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = mtbench.prompts(tok, start=a.start, limit=a.prompts * a.batch)
    calls = [prompts[i * a.batch : (i + 1) * a.batch] for i in range(a.prompts)]
    max_len = max(len(p) for p in prompts) + a.max_new_tokens
    lines = [f"## Chunked prefill vs eager prefill: default model, {a.dtype}, batch {a.batch}, "
             f"{a.max_new_tokens} new tokens, MT-Bench {a.start}-{a.start + len(prompts) - 1} "
             f"(prompt tokens {min(len(p) for p in prompts)}-{max(len(p) for p in prompts)}), "
             f"{torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}", "",
             "| method | prefill (chunked) | chunked prefill s | eager prefill s | chunked call s | eager call s "
             "| same tokens | compile s in timed calls |", "|---|---|---|---|---|---|---|---|"]

    def gen(row, kw, mode):
        backends.PREFILL_CHUNKS = (True if a.force else None) if mode == "chunked" else False
        x, mask = left_pad(row, pad, model.device)
        out = model.generate(x, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=False,
                             pad_token_id=pad, **kw)
        return out, hf_accel.stats(out)

    for spec in specs:
        kw = bm.generate_kwargs(spec, None)
        t0 = time.perf_counter()
        for mode in ("chunked", "eager"):
            gen(calls[0], kw, mode)  # warm-up: compile and capture
        print(f"{spec.label}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
        res = {"chunked": [], "eager": []}
        for row in calls:
            for mode in ("chunked", "eager"):
                out, st = gen(row, kw, mode)
                res[mode].append((out.cpu(), st))
        backends.PREFILL_CHUNKS = None
        same = sum(torch.equal(c[0], e[0]) for c, e in zip(res["chunked"], res["eager"])) / len(calls)

        def mean(mode, key):
            return sum(getattr(st, key) for _, st in res[mode]) / len(calls)

        comp = sum(st.extra.get("compile_seconds", 0.0) for m in res for _, st in res[m])
        modes = sorted({st.extra.get("prefill") for _, st in res["chunked"]})
        lines.append(f"| {spec.label} | {', '.join(map(str, modes))} | {mean('chunked', 'prefill_seconds'):.4f} | "
                     f"{mean('eager', 'prefill_seconds'):.4f} | {mean('chunked', 'total_seconds'):.3f} | "
                     f"{mean('eager', 'total_seconds'):.3f} | {same:.2f} | {comp:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
