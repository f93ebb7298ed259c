"""GPU profile of sampling on the engine's device path (engine/sampling.py), on the default model.

Part 1 (micro): one sampling step alone over fixed (B, N, V) logits, for several processor sets: the captured
step (replay + its one host read) against the same step run eagerly, and the parts (the per-node keyed uniforms,
processing, the inverse-CDF draw). Prints whether the step was captured as a CUDA graph (it must be: "graph=True").

Part 2 (end to end, MT-Bench prompts, same run): tok/s of vanilla static sampling, aded+static sampling on the
device path, aded+static sampling forced onto the host path (an identity processor the device path doesn't know),
and aded+static greedy; with tokens per forward and stats.extra["sampling_path"].

    python scripts/sampling_step_profile.py [--dtype bf16] [--nodes 64] [--batch 1] [--prompts 4]
        [--max-new-tokens 256] [--temperature 0.7] [--top-p 0.9]
    python scripts/sampling_step_profile.py --skip-e2e --vocab 49152 --nodes 1 --compiled --topp-k 64,256,1024 \
        --sets temp+top_p --kernels      # part 1 only, no model: the step as the static engine captures it (compiled
                                         # with the verify's options), per top-p candidate count, and its kernels
"""

import argparse
import time
from types import SimpleNamespace

import torch
from transformers.generation import logits_process as lp

import hf_accel  # noqa: F401  (adds accel= to generate)
from hf_accel.loading import ensure_default_datastore, load_model as _load_model
from hf_accel.data import mtbench
from hf_accel.engine import sampling
from hf_accel.engine.tree import Tree, pack


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, iters=100):
    for _ in range(5):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t) / iters * 1e6  # us


def micro(a, vocab, device, dtype):
    b, n = a.batch, a.nodes
    torch.manual_seed(0)
    trees = []
    for _ in range(b):  # a random tree of n nodes
        parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, n)]
        trees.append(Tree(torch.randint(0, vocab, (n,)).tolist(), parents))
    packed = pack(trees, [True] * b, 0, "cpu", nodes=n)
    raw = (torch.randn(b, n, vocab, device=device) * 3).to(dtype)
    prompt = torch.randint(0, vocab, (b, 300), device=device)
    sets = {
        "greedy+rep_penalty": (False, [lp.RepetitionPenaltyLogitsProcessor(1.2)]),
        "sample": (True, []),
        "temp+top_p": (True, [lp.TemperatureLogitsWarper(a.temperature), lp.TopPLogitsWarper(a.top_p)]),
        "temp+top_k+top_p": (True, [lp.TemperatureLogitsWarper(a.temperature), lp.TopKLogitsWarper(50),
                                    lp.TopPLogitsWarper(a.top_p)]),
        "temp+top_p+rep_penalty": (True, [lp.RepetitionPenaltyLogitsProcessor(1.2),
                                          lp.TemperatureLogitsWarper(a.temperature), lp.TopPLogitsWarper(a.top_p)]),
        "temp+min_p+no_repeat_3": (True, [lp.NoRepeatNGramLogitsProcessor(3), lp.TemperatureLogitsWarper(a.temperature),
                                          lp.MinPLogitsWarper(0.05)]),
    }
    if a.sets:
        sets = {k: v for k, v in sets.items() if k in a.sets.split(",")}
    for k in [int(x) for x in a.topp_k.split(",")] if a.topp_k else [sampling.TOPP_K]:
        sampling.TOPP_K = sampling.TOPP_K_ONE = k
        _micro_sets(a, sets, trees, packed, raw, prompt, vocab, device, dtype)


def _micro_sets(a, sets, trees, packed, raw, prompt, vocab, device, dtype):
    from hf_accel.engine.backends import compile_options

    b, n = a.batch, a.nodes
    print(f"\n== one sampling step, B={b} N={n} V={vocab} {dtype}, top-p from the top {sampling.topp_k(n)} "
          f"({'compiled as the static engine does' if a.compiled else 'eager kernels'}; us per step, host read "
          "included)")
    for name, (do_sample, procs) in sets.items():
        ops = sampling.plan(lp.LogitsProcessorList(procs))
        ws = SimpleNamespace(sampling={}, compiled=compile_options(None) if a.compiled else None)
        s_graph = sampling.DeviceSampler(ops, prompt, [1] * b, do_sample, vocab, 1024, workspace=ws)
        s_eager = sampling.DeviceSampler(ops, prompt, [1] * b, do_sample, vocab, 1024)
        t_graph = _timed(lambda: s_graph.step(raw, trees, packed))
        entry = next(iter(ws.sampling.values()))
        t_eager = _timed(lambda: s_eager.step(raw, trees, packed))
        e = s_eager._entry
        rows = torch.arange(b, device=device)[:, None].expand(b, n)
        pos = e.state.base_len[:, None] + (e.anc.sum(-1) - 1)
        u0 = sampling.keyed_uniform(1, rows, pos, 1, dtype=torch.float64)[..., 0] if do_sample else None
        t_noise = _timed(lambda: sampling.keyed_uniform(1, rows, pos, 1, dtype=torch.float64)) if do_sample else 0.0
        t_proc = _timed(lambda: sampling.process(e.ops, e.consts, e.state, raw, e.tokens, e.anc))
        scores = sampling.process(e.ops, e.consts, e.state, raw, e.tokens, e.anc)[0]
        t_draw = _timed(lambda: sampling.draw(scores, u0, e.tokens))
        print(f"{name:26s} graph={bool(entry.graph)!s:5s} compiled={entry.compiled > 0!s:5s} captured {t_graph:7.1f}"
              f"  eager {t_eager:7.1f}  [noise {t_noise:6.1f} process {t_proc:7.1f} draw {t_draw:6.1f}]"
              f"{'  compile error: ' + entry.compile_error[:200] if entry.compile_error else ''}")
        if a.kernels and device.type == "cuda":  # the kernels one step launches (compiled when --compiled), by time
            fn = entry._run_compiled if entry._compiled is not None else entry.run
            for _ in range(3):
                fn(raw)
            _sync()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn(raw)
                _sync()
            rows = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                          key=lambda e: -e.device_time_total)
            tot = sum(e.device_time_total for e in rows) / 10
            print(f"   kernels: {sum(e.count for e in rows) / 10:.0f} per step, {tot:.1f} us of GPU per step; top:")
            for e in rows[:12]:
                print(f"   {e.device_time_total / 10:7.1f} us  x{e.count / 10:4.1f}  {e.key[:110]}")


class _Identity(lp.LogitsProcessor):
    """Unknown to the device path: sends a request to the host path without changing the distribution."""

    def __call__(self, input_ids, scores):
        return scores


def end_to_end(a, model, tok):
    aded = {"accel": "aded", "accel_kwargs": {"max_nodes": a.nodes}, "cache_implementation": "static"}
    samp = {"do_sample": True, "temperature": a.temperature, "top_p": a.top_p}
    methods = [
        ("vanilla-static sample", {"cache_implementation": "static", **samp}),
        ("aded+static sample/device", {**aded, **samp}),
        ("aded+static sample/host", {**aded, **samp, "logits_processor": lp.LogitsProcessorList([_Identity()])}),
        ("aded+static greedy", {**aded, "do_sample": False}),
    ]
    totals = {m: [0, 0.0, 0, 0] for m, _ in methods}
    prompts = mtbench.prompts(tok, limit=a.prompts + 1)
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids] * a.batch, device=model.device)
        for label, kw in methods:
            torch.manual_seed(i)
            _sync()
            t = time.perf_counter()
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.max_new_tokens,
                                 return_dict_in_generate=True, **kw)  # no min_new_tokens: greedy stays on its fast path
            _sync()
            dt = time.perf_counter() - t
            if i == 0:
                continue  # warm-up (compile, capture)
            st = getattr(out, "accel_stats", None)
            tot = totals[label]
            tot[0] += (out.sequences.shape[1] - x.shape[1]) * a.batch
            tot[1] += dt
            if st is not None:
                tot[2] += st.new_tokens
                tot[3] += st.row_forwards
                path = st.extra.get("sampling_path", "-")
                print(f"prompt {i} {label:28s} {dt:6.2f}s path={path} tokens/forward={st.tokens_per_forward:.2f}")
    base = totals[methods[0][0]]
    print(f"\n== end to end, batch {a.batch}, {a.max_new_tokens} tokens, T={a.temperature} top-p={a.top_p}")
    for label, (ntok, secs, new, fwd) in totals.items():
        tps = ntok / secs
        extra = f"  tokens/forward {new / fwd:.2f}" if fwd else ""
        print(f"{label:28s} {tps:8.1f} tok/s  {tps / (base[0] / base[1]):5.2f}x{extra}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of the code (timings meaningless)")
    p.add_argument("--vocab", type=int, default=0, help="part 1 without loading the model (with --skip-e2e)")
    p.add_argument("--compiled", action="store_true", help="compile the step with the verify's options, as the "
                   "static engine does")
    p.add_argument("--topp-k", default="", help="comma-separated top-p candidate counts to time (sampling.TOPP_K)")
    p.add_argument("--sets", default="", help="comma-separated processor sets (default: all)")
    p.add_argument("--kernels", action="store_true", help="list each set's CUDA kernels by time")
    a = p.parse_args()
    if a.vocab and a.skip_e2e:
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        return micro(a, a.vocab, torch.device(a.device), dtypes[a.dtype])
    model, tok = _load_model("default", a.dtype, a.device)
    micro(a, model.config.vocab_size, model.device, model.dtype)
    if not a.skip_e2e:
        ensure_default_datastore(model, tok)
        end_to_end(a, model, tok)


if __name__ == "__main__":
    main()
