"""Graphs captured by one request are replayed by the next on the static engine: LoRA-Drop's and M2R2 early exit's
layer plans (engine/plans.PlanSet, kept on the workspace) and the static followers' forwards (M2R2 self_spec, EAD,
quant_spec: engine/follower.StaticSlots, pooled per model and key).

CPU has no CUDA graphs, so these tests turn the static engine's graph path on and put an eager stand-in behind the
one capture entry point (engine/capture.record). The stand-in behaves like a captured graph where it matters: a
replay re-runs what was recorded, with the objects the *capture* saw, and writes into the outputs the capture
returned. A second request that filled other tensors than the ones the capture read (per-request state) would get
the first request's values, and its output would leave its eager reference."""

from __future__ import annotations

import threading

import pytest
import torch

import hf_accel
from hf_accel.adapters import lora_drop as ld
from hf_accel.adapters.m2r2 import RateResiduals
from hf_accel.engine import backends, plans
from hf_accel.engine.adapter import Row
from hf_accel.engine.follower import Follower

from conftest import eager_graphs, prompts, tiny_model


@pytest.fixture
def graphs(monkeypatch):
    """The static engine's graph path on CPU, captures counted (``graphs.records``); the prompt prefilled eagerly
    (its chunks' verify graph is tests/test_prefill_chunks.py's), so only plans and followers capture here."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)
    records = eager_graphs(monkeypatch)
    backends.release_workspaces()
    yield records
    backends.release_workspaces()


def _loras(model, seed=1, **kw):
    torch.manual_seed(seed)
    loras = ld.DropLoRAs(model, **kw)
    with torch.no_grad():
        for lin in loras.up.values():
            lin.weight.normal_(std=0.3)
    return loras


def _rr(model, seed=3, router=3.0):
    torch.manual_seed(seed)
    rr = RateResiduals(model, exit_layer=2, rank=4)
    with torch.no_grad():
        rr.up.normal_(std=0.2)
        rr.rate.normal_(std=0.2)
        rr.router.weight.normal_(std=router)  # exits on some steps: both plans run
    return rr


def _plan_sets(model):
    """Every plan set of the model's pooled workspaces, by (workspace key, plan key)."""
    return {(wk, k): v for wk, ws in backends._WORKSPACES.get(model, {}).items() if wk != "__weights__"
            and hasattr(ws, "plans") for k, v in ws.plans.items()}


def _gen(model, ids, attn, **kw):
    return model.generate(ids, attention_mask=attn, max_new_tokens=14, do_sample=False, **kw)


def test_lora_drop_plans_are_captured_once_per_workspace(graphs):
    model = tiny_model("llama", seed=0, layers=6)
    loras = _loras(model, period=4)
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": loras, "period": 3})
    (a, attn_a), (b, attn_b) = prompts((9,), seed=4), prompts((9,), seed=11)  # one shape, other tokens
    eager = {k: _gen(model, i, m, cache_implementation="static", disable_compile=True, **kw)
             for k, (i, m) in {"a": (a, attn_a), "b": (b, attn_b)}.items()}
    assert not graphs  # the eager static engine captures nothing

    first = _gen(model, a, attn_a, cache_implementation="static", **kw)
    st = hf_accel.stats(first)
    assert len(graphs) == 2 and st.extra["plan_captures"] == st.extra["plan_graphs"] == 2  # refresh, drop
    assert st.extra["compile_seconds"] > 0 and st.extra["drop_steps"] > 0
    sets = _plan_sets(model)
    assert len(sets) == 1
    (entry,) = sets.values()
    held, saved, recorded = entry.held, entry.bufs, dict(entry.graphs)

    second = _gen(model, b, attn_b, cache_implementation="static", **kw)
    st = hf_accel.stats(second)
    assert len(graphs) == 2, "the second request captured again"
    assert st.extra["plan_captures"] == 0 and st.extra["plan_graphs"] == 2 and st.extra["compile_seconds"] == 0
    assert _plan_sets(model) == sets and entry.held is held and entry.bufs is saved and entry.graphs == recorded
    assert sum(g.replays for g in graphs) > 2 * 13 - 2  # every step of both requests replayed a recorded plan
    # each request's own output: the replays read what this request filled in (held masks reset, saved updates)
    assert torch.equal(first, eager["a"]) and torch.equal(second, eager["b"])
    assert torch.equal(_gen(model, a, attn_a, cache_implementation="static", **kw), first)
    assert torch.equal(second, _gen(model, b, attn_b, **kw))  # the dynamic engine too
    assert len(graphs) == 2

    # other settings the plans read: another plan set (captured) on the same workspace; the period is not one
    _gen(model, a, attn_a, cache_implementation="static", accel="lora_drop",
         accel_kwargs={"adapter": loras, "period": 3, "reuse": "output"})
    assert len(graphs) == 4 and len(_plan_sets(model)) == 2
    _gen(model, a, attn_a, cache_implementation="static", accel="lora_drop",
         accel_kwargs={"adapter": loras, "period": 5})
    assert len(graphs) == 4
    # another batch size: another workspace, its own graphs
    c, attn_c = prompts((9, 5, 7), seed=5)
    out = _gen(model, c, attn_c, cache_implementation="static", **kw)
    assert len(graphs) == 6
    assert torch.equal(out, _gen(model, c, attn_c, cache_implementation="static", disable_compile=True, **kw))


def test_lora_drop_period_1_replays_are_greedy(graphs):
    model = tiny_model("qwen2", seed=0, layers=4)
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model), "period": 1}, cache_implementation="static")
    for seed in (4, 9):
        ids, attn = prompts((12, 5, 8), seed=seed)
        assert torch.equal(_gen(model, ids, attn, **kw), _gen(model, ids, attn))
    assert len(graphs) == 1  # the refresh plan, captured by the first request only


def test_m2r2_early_exit_plans_are_captured_once_per_workspace(graphs):
    model = tiny_model("llama", seed=0, layers=4)
    rr = _rr(model)
    kw = dict(accel="m2r2", accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.5})
    (a, attn_a), (b, attn_b) = prompts((9,), seed=9), prompts((9,), seed=12)
    eager = [_gen(model, i, m, cache_implementation="static", disable_compile=True, **kw)
             for i, m in ((a, attn_a), (b, attn_b))]
    first = _gen(model, a, attn_a, cache_implementation="static", **kw)
    st = hf_accel.stats(first)
    assert 0 < st.extra["exit_steps"] < st.extra["steps"]  # both plans ran
    assert len(graphs) == 2 and st.extra["plan_captures"] == 2 and st.extra["compile_seconds"] > 0
    second = _gen(model, b, attn_b, cache_implementation="static", **kw)
    st = hf_accel.stats(second)
    assert len(graphs) == 2 and st.extra["plan_captures"] == 0 and st.extra["compile_seconds"] == 0
    assert torch.equal(first, eager[0]) and torch.equal(second, eager[1])
    # the threshold is baked into the lower plan: another one is another plan set
    other = dict(accel="m2r2", accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.7})
    for i, m in ((a, attn_a), (b, attn_b)):
        assert torch.equal(_gen(model, i, m, cache_implementation="static", **other),
                           _gen(model, i, m, cache_implementation="static", disable_compile=True, **other))
    assert len(_plan_sets(model)) == 2 and len(graphs) in (3, 4)  # (the upper plan if some step ran it)
    # never exiting (router p = 0.5 < 1.0), replayed by a second request: the full model's tokens
    n = len(graphs)
    never = dict(accel="m2r2", accel_kwargs={"adapter": _rr(model, router=0.0), "mode": "early_exit",
                                             "threshold": 1.0}, cache_implementation="static")
    for i, m in ((a, attn_a), (b, attn_b)):
        assert torch.equal(_gen(model, i, m, **never), _gen(model, i, m))
    assert len(graphs) == n + 2 and len(_plan_sets(model)) == 3


@pytest.mark.parametrize("method", ["lora_drop", "m2r2"])
def test_sampling_on_layer_plans_captures_one_step_per_plan_buffer(graphs, method):
    """Sampling with layer plans: each plan's graph writes the logits to its own buffer, and the plan switches between
    steps; the device sampler keeps one captured step per buffer and replays it (recapturing on every switch cost
    LoRA-Drop +2.7 ms a step on an H200), with the eager static engine's tokens for each seed."""
    model = tiny_model("llama", seed=0, layers=4)
    if method == "lora_drop":
        kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model, period=4), "period": 3})
    else:
        kw = dict(accel="m2r2", accel_kwargs={"adapter": _rr(model), "mode": "early_exit", "threshold": 0.5})
    kw.update(cache_implementation="static", do_sample=True, temperature=0.9, top_p=0.95)
    ids, attn = prompts((9,), seed=4)

    def run(seed, **extra):
        torch.manual_seed(seed)
        return model.generate(ids, attention_mask=attn, max_new_tokens=14, **kw, **extra)

    want = {s: run(s, disable_compile=True) for s in (1, 2)}
    assert not graphs and not torch.equal(want[1], want[2])
    for s in (1, 2, 1):
        out = run(s)
        st = hf_accel.stats(out)
        assert torch.equal(out, want[s]), s
        assert st.extra["sampling_path"] == "device" and st.extra.get("sampling_graph") is True
    steps = [g for g in graphs if isinstance(g.out, tuple) and len(g.out) == 2 and g.out[0].dim() == 3]
    assert len(graphs) - len(steps) == 2  # the two plans
    assert len(steps) == 2  # one sampling step per plan's logits buffer, captured by the first request only
    assert all(g.replays > 0 for g in steps)


@pytest.mark.parametrize("method", ["aded", "lora_drop"])
def test_the_sampling_step_is_compiled_before_its_capture(monkeypatch, method):
    """The device sampler's step (processing + keyed draws) goes through torch.compile before its capture (aot_eager,
    fullgraph here: no graph break), one code object per captured entry, with temperature / top-k / top-p and a
    repetition penalty; the tokens are the eager static engine's for each seed, batch 1 and 3 padded."""
    from hf_accel.engine import sampling

    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)
    eager_graphs(monkeypatch, compile_backend="aot_eager")
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)  # the verify's own compile: elsewhere
    backends.release_workspaces()
    names = []
    real = sampling.compiled_copy
    monkeypatch.setattr(sampling, "compiled_copy", lambda fn, o, name: names.append(name) or real(fn, o, name))
    model = tiny_model("llama", seed=0, layers=4)
    kw = dict(accel=method) if method == "aded" else dict(
        accel="lora_drop", accel_kwargs={"adapter": _loras(model, period=4), "period": 3})
    kw.update(cache_implementation="static", do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
              repetition_penalty=1.3)
    try:
        for lengths in ((9,), (12, 5, 8)):
            ids, attn = prompts(lengths, seed=4)
            for seed in (1, 2):
                torch.manual_seed(seed)
                want = model.generate(ids, attention_mask=attn, max_new_tokens=14, disable_compile=True, **kw)
                torch.manual_seed(seed)
                out = model.generate(ids, attention_mask=attn, max_new_tokens=14, **kw)
                st = hf_accel.stats(out).extra
                assert torch.equal(out, want), (lengths, seed)
                assert st["sampling_path"] == "device" and st["sampling_graph"] is True
                assert st["sampling_compiled"] == 1 and "sampling_compile_error" not in st
    finally:
        backends.release_workspaces()
    assert names and len(names) == len(set(names))


def _failing_compiles(monkeypatch):
    """The graph stand-in with compiling on (aot_eager), the verify's own compile off, and ``broken``: a
    ``compiled_copy`` whose step raises when called (each call's name appended to ``tried``)."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)
    eager_graphs(monkeypatch, compile_backend="aot_eager")
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)
    tried = []

    def broken(fn, options, name):
        def step(*a, **k):
            tried.append(name)
            raise RuntimeError(f"no compiler for {name}")
        return step

    return tried, broken


def test_a_failed_sampling_compile_captures_the_eager_step_and_says_why(monkeypatch):
    """The sampler's compile fails: its step is captured from the eager code (same tokens), the compile is not tried
    again for that entry, and AccelStats says why (``sampling_compile_error``, which the bench logs)."""
    from hf_accel.engine import sampling

    tried, broken = _failing_compiles(monkeypatch)
    monkeypatch.setattr(sampling, "compiled_copy", broken)
    backends.release_workspaces()
    model = tiny_model("llama", seed=0, layers=4)
    ids, attn = prompts((9,), seed=4)
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model, period=4), "period": 3},
              cache_implementation="static", do_sample=True, temperature=0.9, top_p=0.95)
    try:
        torch.manual_seed(3)
        want = model.generate(ids, attention_mask=attn, max_new_tokens=14, disable_compile=True, **kw)
        for _ in range(2):
            torch.manual_seed(3)
            out = model.generate(ids, attention_mask=attn, max_new_tokens=14, **kw)
            st = hf_accel.stats(out).extra
            assert torch.equal(out, want)
            assert st["sampling_graph"] is True and st["sampling_compiled"] == 0
            assert "RuntimeError: no compiler for _sample_step_" in st["sampling_compile_error"]
        assert len(tried) == 1  # the entry's second plan buffer and the next request: captured eagerly, no retry
    finally:
        backends.release_workspaces()


@pytest.mark.parametrize("method", ["lora_drop", "m2r2"])
def test_each_plan_is_compiled_as_one_graph_of_its_own(monkeypatch, method):
    """Each plan's step goes through torch.compile before its capture (aot_eager, fullgraph here: the layer control's
    Python traces with no graph break), each capture on its own code object, and gives the eager engine's tokens,
    batch 1 and 3 padded."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)  # only plans / followers capture (as in ``graphs``)
    records = eager_graphs(monkeypatch, compile_backend="aot_eager")
    backends.release_workspaces()
    names = []
    real = plans.compiled_copy
    monkeypatch.setattr(plans, "compiled_copy", lambda fn, o, name: names.append(name) or real(fn, o, name))
    model = tiny_model("llama", seed=0, layers=4)
    if method == "lora_drop":
        kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model, period=4), "period": 3})
    else:
        kw = dict(accel="m2r2", accel_kwargs={"adapter": _rr(model), "mode": "early_exit", "threshold": 0.5})
    try:
        for lengths in ((9,), (12, 5, 8)):
            ids, attn = prompts(lengths, seed=4)
            want = _gen(model, ids, attn, cache_implementation="static", disable_compile=True, **kw)
            out = _gen(model, ids, attn, cache_implementation="static", **kw)
            st = hf_accel.stats(out)
            assert torch.equal(out, want), lengths
            (entry,) = _plan_sets(model).values() if len(lengths) == 1 else [
                v for (wk, _), v in _plan_sets(model).items() if v.ws.batch == 3]
            assert entry.compile_error is None and entry.compiled == len(entry.graphs) == st.extra["plan_graphs"] == 2
    finally:
        backends.release_workspaces()
    assert len(names) == len(set(names)) + 2 and len(records) == 4  # a (plan, width) name per workspace: 2 + 2


def test_a_failed_compile_falls_back_to_eager_captures_and_is_reported(monkeypatch):
    """A plan's or a follower's compile that fails: the step is captured eagerly (the eager engine's tokens), the
    compile is not tried again for that set / those slots, AccelStats says why (``plan_compile_error``,
    ``draft_compile_error``) and the bench logs it in the warm-up and keeps it in the record (``compile_errors``)."""
    from hf_accel.bench import methods as bm
    from hf_accel.bench.runner import run_bench
    from hf_accel.engine import follower

    tried, broken = _failing_compiles(monkeypatch)
    monkeypatch.setattr(plans, "compiled_copy", broken)
    monkeypatch.setattr(follower, "compiled_copy", broken)
    backends.release_workspaces()
    model = tiny_model("llama", seed=0, layers=4)
    ids, attn = prompts((9,), seed=4)
    try:
        kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model), "period": 2},
                  cache_implementation="static")
        out = _gen(model, ids, attn, **kw)
        st = hf_accel.stats(out).extra
        assert torch.equal(out, _gen(model, ids, attn, **kw, disable_compile=True))
        assert "RuntimeError: no compiler for _plan_" in st["plan_compile_error"] and st["plan_compiled"] == 0
        assert st["plan_graphs"] == 2 and len(tried) == 1  # the set's second plan did not try to compile again
        kw = dict(accel="m2r2", accel_kwargs=_follower_kwargs(model, "m2r2", small_layers=4),
                  cache_implementation="static")
        out = _gen(model, ids, attn, **kw)
        st = hf_accel.stats(out).extra
        assert torch.equal(out, _gen(model, ids, attn))  # lossless
        assert "no compiler for _follower_w" in st["draft_compile_error"] and st["draft_compiled"] == 0
        logged = []
        specs = [bm.MethodSpec("vanilla", "vanilla"),
                 bm.MethodSpec("m2r2", "m2r2", dict(_follower_kwargs(model, "m2r2", small_layers=4)), static=True)]
        backends.release_workspaces()
        run = run_bench(model, [ids[0].tolist()], specs, max_new_tokens=12, pad_token_id=0, progress=False,
                        with_nll=False, log=logged.append)
        assert any(line.startswith("compile fallback m2r2: draft_compile_error: RuntimeError") for line in logged)
        assert "no compiler" in run["records"]["m2r2"][0].compile_errors["draft_compile_error"]
    finally:
        backends.release_workspaces()


def _at_once(run) -> dict:
    """``{j: run(j)}`` for j = 0, 1, the two calls made from two threads released together; a thread's error fails."""
    got, errors = {}, []
    barrier = threading.Barrier(2)

    def work(j):
        try:
            barrier.wait()
            got[j] = run(j)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors, errors
    return got


@pytest.mark.parametrize("method", ["lora_drop", "m2r2-self-spec", "m2r2-sampling"])
def test_two_threads_with_compiled_plans_and_followers(monkeypatch, method):
    """Two requests on one model from two threads while plans / follower forwards are compiled (aot_eager here) and
    captured: each gets its single-threaded eager output (greedy; and M2R2 early exit through the device sampler's
    captured steps, with top-k 1 so that the draws don't depend on which thread took torch's global seed first)."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)
    eager_graphs(monkeypatch, compile_backend="aot_eager")
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)
    backends.release_workspaces()
    model = tiny_model("llama", seed=0, layers=4)
    sample = {}
    if method == "lora_drop":
        kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model), "period": 2})
    elif method == "m2r2-self-spec":
        kw = dict(accel="m2r2", accel_kwargs=_follower_kwargs(model, "m2r2", small_layers=4))
    else:
        kw = dict(accel="m2r2", accel_kwargs={"adapter": _rr(model), "mode": "early_exit", "threshold": 0.5})
        sample = dict(do_sample=True, temperature=0.9, top_k=1)
    kw.update(cache_implementation="static")
    inputs = [prompts((9,), seed=s) for s in (4, 6)]

    def run(j, **extra):
        if sample:
            return model.generate(inputs[j][0], attention_mask=inputs[j][1], max_new_tokens=14, **sample, **kw,
                                  **extra)
        return _gen(model, *inputs[j], **kw, **extra)

    try:
        want = [run(j, disable_compile=True) for j in range(2)]
        got = _at_once(run)
        assert all(torch.equal(got[j], want[j]) for j in range(2))
        if sample:
            assert all(hf_accel.stats(got[j]).extra.get("sampling_graph") is True for j in range(2))
    finally:
        backends.release_workspaces()


def test_two_threads_each_replay_their_own_workspace(graphs):
    """Two requests at once with equal keys take two workspaces (one request per workspace), each with its own
    plan set; both give their single-threaded output, and later requests replay the pooled one's graphs."""
    model = tiny_model("llama", seed=0, layers=4)
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model), "period": 2}, cache_implementation="static")
    inputs = [prompts((9,), seed=s) for s in (4, 6)]
    want = [_gen(model, i, m, **{**kw, "disable_compile": True}) for i, m in inputs]
    for _ in range(2):
        got = _at_once(lambda j: _gen(model, *inputs[j], **kw))
        assert all(torch.equal(got[j], want[j]) for j in range(2))
    sets = len(_plan_sets(model))  # one per workspace: 2 if the requests ran at once, else 1
    assert sets in (1, 2) and len(graphs) == 2 * sets  # captured once per workspace, not per request
    n = len(graphs)
    for j in range(2):  # one at a time: a pooled workspace, nothing captured
        assert torch.equal(_gen(model, *inputs[j], **kw), want[j])
    assert len(graphs) == n


def test_a_workspace_made_while_the_first_was_busy_is_kept_too(graphs):
    """Requests of one shape at once (a server's threads): the second gets its own workspace, kept as a copy of the
    key, so later requests replay either one's graphs."""
    model = tiny_model("llama", seed=0, layers=4)
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": _loras(model), "period": 2}, cache_implementation="static")
    ids, attn = prompts((9,), seed=4)
    want = _gen(model, ids, attn, **{**kw, "disable_compile": True})
    assert torch.equal(_gen(model, ids, attn, **kw), want) and len(graphs) == 2
    (first,) = [w for k, w in backends._WORKSPACES[model].items() if k != "__weights__"]
    first.in_use = True  # as while another thread's request runs on it
    try:
        assert torch.equal(_gen(model, ids, attn, **kw), want) and len(graphs) == 4  # a second workspace
        assert torch.equal(_gen(model, ids, attn, **kw), want) and len(graphs) == 4  # found again
    finally:
        first.in_use = False
    assert torch.equal(_gen(model, ids, attn, **kw), want) and len(graphs) == 4
    assert len([k for k in backends._WORKSPACES[model] if k != "__weights__"]) == 2


@pytest.mark.parametrize("context", [False, True], ids=["no-context", "m2r2-stream"])
def test_static_follower_graphs_are_reused_by_the_next_request(graphs, context):
    model = tiny_model("llama", seed=0, layers=4)
    from hf_accel.adapters.m2r2 import FastStream
    from hf_accel.engine.layers import controlled

    rr = _rr(model, router=0.0)
    extra = dict(context=lambda: controlled(model, FastStream(rr, "exit")), key=("m2r2", id(rr)), owner=rr) \
        if context else {}

    def drafts(seed, **kw):
        f = Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=64, **{**extra, **kw})
        ids, _ = prompts((7, 7), seed=seed)
        rows = [Row(b, ids[b].tolist(), 7) for b in range(2)]
        out = []
        for step in range(4):
            chains = f.draft(rows, 3)
            out.append(chains)
            for b in range(2):
                rows[b].tokens.append(chains[b][step % 3])
        return f, out

    eager = {s: drafts(s, graphs=False)[1] for s in (1, 2)}
    f1, out1 = drafts(1, graphs=True)
    assert f1.captures > 0 and out1 == eager[1]
    n = len(graphs)
    assert n == f1.captures
    f1.close()
    f2, out2 = drafts(2, graphs=True)
    assert f2.slots is f1.slots and f2.reused and f2.captures == 0 and len(graphs) == n
    assert out2 == eager[2]  # the replays read this request's slots and inputs
    # while one follower holds the slots, another request's gets its own
    f3, out3 = drafts(1, graphs=True)
    assert f3.slots is not f2.slots and out3 == eager[1]
    del f2  # collected without close(): its slots are free again
    f4, _ = drafts(2, graphs=True)
    assert f4.slots is f1.slots and f4.captures == 0
    f4.close()
    # another batch size, slot count or context key: other slots (and graphs)
    others = [Follower(model, 3, torch.device("cpu"), torch.float32, static_slots=64, graphs=True, **extra),
              Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=128, graphs=True, **extra)]
    if context:
        rr2 = _rr(model, seed=5, router=0.0)
        others.append(Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=64, graphs=True,
                               context=lambda: controlled(model, FastStream(rr2, "exit")), key=("m2r2", id(rr2))))
    else:  # a context without a key: not pooled (its reads are unknown)
        others.append(Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=64, graphs=True,
                               context=lambda: controlled(model, FastStream(rr, "exit"))))
    assert all(f.slots is not f1.slots and not f.reused for f in others)
    assert Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=64, graphs=True, **extra).slots \
        is f1.slots


def test_follower_catch_ups_padded_to_one_width(graphs):
    """``pad_to``: catch-ups of 2 .. pad_to tokens run at one width (4 for pad_to 3), so a request captures the
    widths 1 and 4 only, where unpadded ones meet 2 and 4 as well; the chains are the eager follower's."""
    model = tiny_model("llama", seed=0, layers=4)

    def drafts(**kw):
        f = Follower(model, 2, torch.device("cpu"), torch.float32, static_slots=96, static_room=8, **kw)
        ids, _ = prompts((7, 7), seed=3)
        rows = [Row(b, ids[b].tolist(), 7) for b in range(2)]
        out = []
        for step in range(6):  # 1, 2 or 3 of the chain accepted: catch-ups of 2, 3 and 4 tokens
            chains = f.draft(rows, 3)
            out.append(chains)
            for b in range(2):
                rows[b].tokens.extend(chains[b][: 1 + (step + b) % 3])
        widths = sorted({key[0] for key in f._graphs})
        f.close()
        return out, widths

    eager, _ = drafts(graphs=False)
    backends.release_workspaces()
    padded, widths = drafts(graphs=True, pad_to=3)
    backends.release_workspaces()
    plain, plain_widths = drafts(graphs=True)
    assert padded == eager == plain
    assert widths == [1, 4] and plain_widths == [1, 2, 4]


def test_ead_catch_ups_run_at_one_captured_width(graphs, monkeypatch):
    """EAD's small model catches up whatever the large model produced since it last ran (any length): with graphs
    every catch-up of 2 .. 64 tokens runs at width 64, so its captured forwards are widths 1 and 64 only (a width met
    first in a timed request stalled it on its capture on an H200), and the output is the eager engine's."""
    from hf_accel.engine import follower

    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)
    widths = []
    real = follower.Follower._capture
    monkeypatch.setattr(follower.Follower, "_capture", lambda self, g: widths.append(g.tokens.shape[1]) or real(self, g))
    model = tiny_model("llama", seed=0, layers=4)
    small = tiny_model("llama", seed=1, layers=2)  # not the model: the large model takes over now and then
    kw = dict(accel="ead", accel_kwargs={"small_model": small, "threshold": 5.5, "min_run": 2, "max_small_run": 4},
              cache_implementation="static")
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(lengths, seed=5)
        out = model.generate(ids, attention_mask=attn, max_new_tokens=40, do_sample=False, **kw)
        st = hf_accel.stats(out).extra
        want = model.generate(ids, attention_mask=attn, max_new_tokens=40, do_sample=False, disable_compile=True, **kw)
        assert torch.equal(out, want), lengths
        assert st["switches"] > 2  # the small and the large model took turns
    assert widths and set(widths) <= {1, 64}, widths


def test_quant_spec_rounds_verify_at_one_captured_shape(graphs, monkeypatch):
    """quant_spec's intermediate checks a round's ADED tree (16 nodes by default) with its catch-up in one forward:
    with graphs, forwards of 2 .. 32 tokens run at width 32 and read 16 picks, so rounds of every size replay one
    captured shape (width 1: a round with no draft) (at ADED's 64-node trees every round ran eagerly, 128 wide, on an H200); output = greedy's."""
    from hf_accel.engine import follower

    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)
    shapes = []
    real = follower.Follower._capture
    monkeypatch.setattr(follower.Follower, "_capture",
                        lambda self, g: shapes.append((g.tokens.shape[1], tuple(g.last.shape))) or real(self, g))
    model = tiny_model("llama", seed=0, layers=4)
    kw = dict(accel="quant_spec", accel_kwargs=_follower_kwargs(model, "quant_spec", small_layers=2),
              cache_implementation="static")
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(lengths, seed=6)
        out = _gen(model, ids, attn, **kw)
        assert torch.equal(out, _gen(model, ids, attn)), lengths
        assert hf_accel.stats(out).extra["rounds"] >= 1
    trees = [s for s in shapes if len(s[1]) == 2]  # verify_tree forwards: (B, picks)
    assert trees and {w for w, _ in trees} <= {1, 32} and {p[1] for _, p in trees} == {16}, shapes
    assert len(trees) == len(set(trees)) <= 4  # widths 1 and 32, at batch 1 and 3: each captured once


def _follower_kwargs(model, method: str, small_layers: int) -> dict:
    """accel_kwargs of a method that runs a static follower: M2R2 self_spec's stream, EAD's small model (lossless
    when it is the model itself: 4 layers, seed 0), quant_spec's intermediate."""
    if method == "m2r2":
        return {"adapter": _rr(model, router=0.0), "k": 2}
    small = tiny_model("llama", seed=0, layers=small_layers)
    if method == "ead":
        return {"small_model": small, "threshold": 9.0, "min_run": 2, "max_small_run": 4}
    return {"intermediate": small, "aded": {"datastore": None}, "k": 3}


@pytest.mark.parametrize("method", ["m2r2", "ead", "quant_spec"])
def test_static_follower_methods_capture_nothing_on_a_second_call(graphs, method, monkeypatch):
    """End to end: the engine's own verify graph (workspace) and the follower's graphs are both found again; the
    second call reports no capture time and the output is greedy's."""
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)  # the eager step under the graph stand-in
    model = tiny_model("llama", seed=0, layers=4)
    kw = dict(accel=method, accel_kwargs=_follower_kwargs(model, method, small_layers=4), cache_implementation="static")
    outs = []
    for seed in (4, 4, 8, 8):  # a new prompt may meet a follower width the first did not (captured then, once)
        ids, attn = prompts((9,), seed=seed)
        n = len(graphs)
        out = _gen(model, ids, attn, **kw)
        assert torch.equal(out, _gen(model, ids, attn))
        outs.append((len(graphs) - n, hf_accel.stats(out).extra["compile_seconds"]))
    assert outs[0][0] > 0 and outs[0][1] > 0
    assert outs[1] == outs[3] == (0, 0.0), f"identical calls captured {outs[1][0]}, {outs[3][0]} graphs"


@pytest.mark.parametrize("method", ["m2r2", "ead", "quant_spec"])
def test_static_follower_forwards_are_compiled_each_on_its_own_code(monkeypatch, method):
    """The followers' captured forwards go through torch.compile (aot_eager, fullgraph: no graph break, also under
    M2R2's fast-stream context) on their own code objects, the eager static engine's output, batch 1 and 3 padded."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)  # only plans / followers capture (as in ``graphs``)
    records = eager_graphs(monkeypatch, compile_backend="aot_eager")
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: None)  # the engine's own step: not here
    backends.release_workspaces()
    from hf_accel.engine import follower

    names = []
    real = follower.compiled_copy
    monkeypatch.setattr(follower, "compiled_copy", lambda fn, o, name: names.append(name) or real(fn, o, name))
    model = tiny_model("llama", seed=0, layers=4)
    accel_kwargs = _follower_kwargs(model, method, small_layers=2)
    try:
        for lengths in ((9,), (12, 5, 8)):
            ids, attn = prompts(lengths, seed=4)
            kw = dict(accel=method, accel_kwargs=accel_kwargs, cache_implementation="static")
            out = _gen(model, ids, attn, **kw)
            assert torch.equal(out, _gen(model, ids, attn, **kw, disable_compile=True)), lengths  # EAD: lossy
            if method == "m2r2":
                st = hf_accel.stats(out).extra
                assert st["draft_compiled"] == st["draft_captures"] > 0
    finally:
        backends.release_workspaces()
    assert names and all(n.startswith("_follower_w") for n in names) and len(records) >= len(names)


def test_a_trained_part_given_by_path_is_found_again(graphs, tmp_path):
    """An artifact folder loads to the same part object on every call (artifacts.cached_module), so the plan key
    (which names the part by identity) is equal and the second call replays."""
    model = tiny_model("llama", seed=0, layers=4)
    _loras(model).save_pretrained(tmp_path / "ld")
    kw = dict(accel="lora_drop", accel_kwargs={"adapter": str(tmp_path / "ld"), "period": 2},
              cache_implementation="static")
    ids, attn = prompts((9,), seed=3)
    first, second = _gen(model, ids, attn, **kw), _gen(model, ids, attn, **kw)
    assert torch.equal(first, second)
    assert hf_accel.stats(first).extra["plan_captures"] == 2 and hf_accel.stats(second).extra["plan_captures"] == 0
    assert len(graphs) == 2
