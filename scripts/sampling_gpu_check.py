"""GPU correctness check of the device sampling path where CPU tests can't reach: the static engine's steps
captured as CUDA graphs (engine/sampling.py). Run from the repository root:

    python scripts/sampling_gpu_check.py

1. every supported processor: the captured step's processed scores equal the host path's (tests/test_sampling's
   tree with per-node contexts), and a second request served by the same captured step;
2. the default model in float32: greedy with processors (repetition penalty, no-repeat-n-gram, min-new-tokens) on
   aded+static (graphs) token-identical to vanilla greedy, batch 1 and batch 3 left-padded;
3. a fixed seed reproduces aded+static sampling across two requests (the second replays the first's capture);
4. chi-square: a tiny model's sampling distribution (top-p + repetition penalty; and chains with draft q) on
   the static engine with graphs vs vanilla;
5. top-p from each node's top K scores (engine/sampling.py ``TOPP_K``): the captured step = the host path with a K
   that decides every node and with one that sends the step to the sort; on the default model the same tokens as
   transformers' sort for every step, for one seed.
Prints PASS/FAIL lines and whether each step ran as a captured graph ("graph=True" is the point).
"""

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, "tests")

import hf_accel  # noqa: E402
from hf_accel.loading import ensure_default_datastore, load_model as _load_model  # noqa: E402
from hf_accel.data import mtbench  # noqa: E402
from hf_accel.engine import backends, sampling  # noqa: E402
from transformers.generation import logits_process as lp  # noqa: E402

import test_sampling as ts  # noqa: E402

FAILS = []
DEV = os.environ.get("SAMPLING_CHECK_DEVICE", "cuda")  # "cpu": a smoke run of this script (no graphs)
NEW = 64 if DEV == "cuda" else 12


def check(name, cond, info=""):
    print(("PASS " if cond else "FAIL ") + name + (f"  {info}" if info else ""))
    if not cond:
        FAILS.append(name)


def captured(model) -> str:
    pools = backends._WORKSPACES.get(model, {})
    es = [e for k, ws in pools.items() if k != "__weights__" for e in ws.sampling.values()]
    errs = [e.compile_error for e in es if e.compile_error]
    return (f"sampling steps captured: {[bool(e.graph) for e in es]} compiled: {[e.compiled for e in es]}"
            + (f" compile error: {errs[0][:200]}" if errs else ""))


def _captured_vs_host(label, procs, case, compiled=None):
    """One processor set through a workspace's step twice (the second call replays the first's capture) against the
    host path; ``compiled``: the workspace's compile options (None: captured from the eager step)."""
    prompt, gen, trees = case
    ws, raw = SimpleNamespace(sampling={}, compiled=compiled), torch.empty(2, 8, ts.SV, device=DEV)
    try:
        for _ in range(2):
            ts._check_device_vs_host(lp.LogitsProcessorList(procs), prompt, gen, trees, workspace=ws, raw=raw,
                                     device=DEV)
        e = next(iter(ws.sampling.values()))
        check(label, True, f"graph={bool(e.graph)}" + (f" compiled={e.compiled} error={e.compile_error}"
                                                       if compiled is not None else ""))
    except AssertionError as err:
        check(label, False, str(err)[:300])


def processors_on_cuda():
    case = prompt, gen, trees = ts._tree_case()
    base_len = max(prompt.shape[1] + len(g) for g in gen)
    procs = ts._procs(base_len)
    for name in procs:
        _captured_vs_host(f"processor {name}: captured step = host path", procs[name], case)
    for k in (3, 16):  # top-p from the top k scores (the fast form; k=3 makes the step fall back to the sort)
        saved = sampling.TOPP_K
        sampling.TOPP_K = k
        try:
            for name in ("top_p", "reppen+temp+top_p"):
                _captured_vs_host(f"processor {name}, top-p from the top {k}: captured step = host path", procs[name],
                                  case)
        finally:
            sampling.TOPP_K = saved
    # the static engine compiles the step before capturing it (engine/sampling.py _Entry): the same scores
    opts = backends.compile_options(None) if DEV == "cuda" else None
    for name in ("top_k", "min_p", "rep_penalty_ignore", "no_repeat_3", "forced_eos", "reppen+temp+top_p"):
        _captured_vs_host(f"processor {name}: compiled captured step = host path", procs[name], case, opts)
    ws, raw = SimpleNamespace(sampling={}), torch.empty(2, 8, ts.SV, device=DEV)
    try:
        for shift, gen_b in [(0, gen), (2, [[7, 3, 5, 6, 6], [6, 3]])]:
            bl = max(prompt.shape[1] + len(g) for g in gen_b)
            procs = lp.LogitsProcessorList([
                ts._rep(1.5, torch.tensor([3 + shift, shift])),
                lp.MinNewTokensLengthLogitsProcessor(bl - 3 - shift, 5, torch.tensor([ts.EOS])),
                lp.NoRepeatNGramLogitsProcessor(2), lp.TemperatureLogitsWarper(0.7),
            ])
            trees_b = [ts.Tree([gen_b[b][-1]] + t.tokens[1:], t.parents) for b, t in enumerate(trees)]
            ts._check_device_vs_host(procs, prompt, gen_b, trees_b, workspace=ws, raw=raw, device=DEV)
        check("one captured step serves two requests", len(ws.sampling) == 1,
              f"graph={bool(next(iter(ws.sampling.values())).graph)}")
    except AssertionError as e:
        check("one captured step serves two requests", False, str(e)[:300])


def default_model():
    model, tok = _load_model("default", "fp32", DEV)
    ensure_default_datastore(model, tok)
    prompts = mtbench.prompts(tok, limit=3)
    kw = dict(max_new_tokens=NEW, do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=4, min_new_tokens=10)
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], device=DEV)
        ref = model.generate(x, **kw)
        out = model.generate(x, accel="aded", cache_implementation="static", return_dict_in_generate=True, **kw)
        st = hf_accel.stats(out)
        check(f"default model greedy+processors prompt {i}", torch.equal(out.sequences, ref),
              f"path={st.extra.get('sampling_path')} tokens/forward={st.tokens_per_forward:.2f} {captured(model)}")
    tok.padding_side = "left"
    texts = [tok.decode(p) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True).to(DEV)
    ref = model.generate(**enc, **kw)
    out = model.generate(**enc, accel="aded", cache_implementation="static", **kw)
    check("default model greedy+processors batch 3 padded", torch.equal(out, ref))
    x = torch.tensor([prompts[0]], device=DEV)
    samp = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_p=0.9)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(model.generate(x, accel="aded", cache_implementation="static", **samp))
    check("fixed seed reproduces (aded+static sampling)", torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2]),
          captured(model))
    torch.manual_seed(3)  # the compiled sampling step against the eager one (disable_compile): the same tokens
    eager = model.generate(x, accel="aded", cache_implementation="static", disable_compile=True, **samp)
    st = hf_accel.stats(model.generate(x, accel="aded", cache_implementation="static", return_dict_in_generate=True,
                                       **samp))  # (stats only)
    check("compiled sampling step = eager step (aded+static, same seed, same tokens)", torch.equal(outs[0], eager),
          f"sampling_compiled={st.extra.get('sampling_compiled')} {st.extra.get('sampling_compile_error', '')}")
    # top-p from the top TOPP_K (default) against transformers' sort for every step (TOPP_K = vocabulary): same tokens
    runs = []
    for k in (sampling.TOPP_K, model.config.vocab_size):
        saved, sampling.TOPP_K = sampling.TOPP_K, k
        try:
            torch.manual_seed(3)
            out = model.generate(x, accel="aded", cache_implementation="static", return_dict_in_generate=True, **samp)
            runs.append((out.sequences, hf_accel.stats(out)))
        finally:
            sampling.TOPP_K = saved
    (a, sa), (b, sb) = runs
    check(f"top-p from the top {sampling.TOPP_K} = transformers' sort (same seed, same tokens)", torch.equal(a, b),
          f"fallback steps {sa.extra.get('sampling_topp_fallbacks')} of {sa.steps}")


def distributions():
    from hf_accel.data.trigram import TrigramStore
    from conftest import tiny_model

    ts.ROWS = 4000 if DEV == "cuda" else ts.ROWS  # more rows: fewer chance failures at p < 1e-3
    model = tiny_model("llama", seed=4, vocab=ts.V, initializer_range=0.6).to(DEV)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]], device=DEV)
    torch.manual_seed(0)
    sample = model.generate(prompt.expand(40, -1), do_sample=True, max_new_tokens=8, min_new_tokens=8)
    store = TrigramStore.from_token_docs([r.tolist() for r in sample.cpu()], vocab_size=ts.V)
    for name, kw in [("top-p + repetition penalty", dict(top_p=0.9, repetition_penalty=1.3)),
                     ("temperature + top-k", dict(temperature=0.7, top_k=6))]:
        ref = ts._generate(model, prompt, 61, do_sample=True, **kw).cpu()
        out = ts._generate(model, prompt, 62, do_sample=True, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8},
                           cache_implementation="static", **kw)
        st = hf_accel.stats(out)
        p = min(ts._chi2_pvalue(a, b) for a, b in zip(ts._counts(ref, 8, 3), ts._counts(out.cpu(), 8, 3)))
        check(f"chi-square static+graphs {name}", p > 1e-3 and st.accepted_tokens > ts.ROWS // 4,
              f"min p={p:.3g} accepted={st.accepted_tokens} {captured(model)}")
    hf_accel.register("_random_chain")(ts._RandomChain)
    try:
        ref = ts._generate(model, prompt, 81, do_sample=True).cpu()
        out = ts._generate(model, prompt, 82, do_sample=True, accel="_random_chain", cache_implementation="static")
        st = hf_accel.stats(out)
        p = min(ts._chi2_pvalue(a, b) for a, b in zip(ts._counts(ref, 8, 3), ts._counts(out.cpu(), 8, 3)))
        check("chi-square static+graphs chains with q", p > 1e-3 and 0 < st.accepted_tokens < st.drafted_tokens,
              f"min p={p:.3g} {captured(model)}")
    finally:
        hf_accel.registry._ADAPTERS.pop("_random_chain", None)


if __name__ == "__main__":
    processors_on_cuda()
    default_model()
    distributions()
    print("\nALL PASS" if not FAILS else f"\n{len(FAILS)} FAILED: {FAILS}")
