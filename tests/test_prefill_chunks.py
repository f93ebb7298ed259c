"""The static engine's chunked prefill: the prompt fed through the verify step (its CUDA graph on a GPU) in chunks of
the node budget's width, instead of one eager forward (engine/backends.StaticBackend._prefill_chunked).

On CPU the chunks run eagerly through the same verify step (``backends.PREFILL_CHUNKS = True``), or through the
graph path with an eager stand-in behind the one capture entry point (the ``graphs`` fixture, as in
tests/test_plan_reuse.py). Either way: the same tokens as vanilla greedy and as the eager prefill, the first token's
logits equal to the eager prefill's (fp32 tolerance), on every family, batch 1 and 3 left-padded, prompts shorter than
a chunk, exactly one, and several; where the chunked prefill doesn't apply (a KV method, a step program that can't be
made neutral, too many chunks), the eager one runs; node budgets under PREFILL_MIN_WIDTH (layer plans, M2R2 self_spec)
chunk at PREFILL_NARROW_WIDTH, and ``stats.extra["prefill"]``
says which ran."""

from __future__ import annotations

import pytest
import torch

import hf_accel
from hf_accel import models
from hf_accel.engine import backends, capture

from conftest import FAMILIES, eager_graphs, prompts, tiny_model
from methods import METHODS, model_for

NEW = 10


@pytest.fixture
def chunks(monkeypatch):
    """The chunked prefill on the eager static engine."""
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", True)
    return True


@pytest.fixture
def graphs(monkeypatch):
    """The static engine's graph path on CPU (captures counted), the verify step not compiled."""
    records = eager_graphs(monkeypatch)
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: backends._verify)
    backends.release_workspaces()
    yield records
    backends.release_workspaces()


def _gen(model, ids, mask, static=True, eager=True, **kw):
    extra = {"cache_implementation": "static", "disable_compile": eager} if static else {}
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                          output_logits=True, **extra, **kw)


def _aded(width):
    return dict(accel="aded", accel_kwargs={"datastore": None, "max_nodes": width})


def _check(out, ref, eager_out):
    st = hf_accel.stats(out)
    assert torch.equal(out.sequences, ref.sequences), "the chunked prefill changed the tokens (vs vanilla greedy)"
    assert torch.equal(out.sequences, eager_out.sequences), "the chunked prefill changed the tokens (vs eager prefill)"
    # the first token's logits: the prefill's
    torch.testing.assert_close(out.logits[0], eager_out.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=1e-4, atol=1e-4)
    assert st.prefill_seconds > 0 and st.target_forwards == st.steps + 1  # the prefill counts one forward
    return st


W = 8  # ADED's node budget in these tests: the chunk width


@pytest.mark.parametrize("lengths", [(5,), (W,), (3 * W + 3,), (2 * W, 9, 3), (3 * W + 3, 13, W)],
                         ids=["b1-short", "b1-one-chunk", "b1-four-chunks", "b3-two-chunks", "b3-four-chunks"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_is_the_eager_prefill(family, lengths, monkeypatch):
    model = tiny_model(family, seed=0, layers=2)
    ids, mask = prompts(lengths, seed=len(lengths) + lengths[0])
    ref = _gen(model, ids, mask, static=False)
    eager = _gen(model, ids, mask, **_aded(W))
    assert hf_accel.stats(eager).extra["prefill"] == "eager"
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", True)
    out = _gen(model, ids, mask, **_aded(W))
    n = -(-ids.shape[1] // W)
    st = _check(out, ref, eager)
    assert st.extra["prefill"] == f"eager chunks {n}" and st.extra["prefill_chunks"] == n
    assert hf_accel.stats(eager).extra["prefill_chunks"] == 0


def _width(model, ids, mask, method, kwargs) -> int:
    out = _gen(model, ids[:, -2:], mask[:, -2:], accel=method, accel_kwargs=kwargs)
    return int(hf_accel.stats(out).extra["verify_width"])  # the node budget: the chunk width


METHOD_CASES = [("aded", "prompt"), ("lud", "lossless"), ("hidden_transfer", "maps"), ("clover", "heads")]


def _build(method, label, family):
    (build,) = [b for lab, _, b in METHODS[method] if lab == label]
    model = model_for(family)
    return model, build(model, family)


@pytest.mark.parametrize("batch", ["b1", "b3"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt", "phi3"])
@pytest.mark.parametrize("method,label", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_methods_with_chunked_prefill(method, label, family, batch, monkeypatch):
    """Lossless methods (a step program made neutral: LUD, hidden transfer; prompt hidden states from the chunks:
    clover) give vanilla's tokens with the chunked prefill, over several chunks."""
    model, kwargs = _build(method, label, family)
    probe, probe_mask = prompts((4,) if batch == "b1" else (4, 4, 4), seed=1)  # a budget may depend on the batch
    w = _width(model, probe, probe_mask, method, kwargs)
    lengths = (2 * w + 3,) if batch == "b1" else (2 * w + 3, w, 5)
    ids, mask = prompts(lengths, seed=7)
    ref = _gen(model, ids, mask, static=False)
    eager = _gen(model, ids, mask, accel=method, accel_kwargs=kwargs)
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", True)
    out = _gen(model, ids, mask, accel=method, accel_kwargs=kwargs)
    st = _check(out, ref, eager)
    assert st.extra["prefill"] == "eager chunks 3"
    assert st.drafted_tokens > 0 or method == "aded"


@pytest.mark.parametrize("method,label", METHOD_CASES, ids=[m for m, _ in METHOD_CASES])
def test_graphed_prefill_replays_the_verify_graph(method, label, graphs):
    """The graph path (captures through an eager stand-in): the prompt goes through the verify graph of the node
    budget's width, captured by the prefill and replayed by the steps; a second request captures nothing."""
    family = "llama"
    model, kwargs = _build(method, label, family)
    probe, probe_mask = prompts((4, 4, 4), seed=1)  # the budget at this test's batch (3 rows)
    w = _width(model, probe, probe_mask, method, kwargs)
    ids, mask = prompts((3 * w + 1, 2 * w, 6), seed=3)
    ref = _gen(model, ids, mask, static=False)
    eager = _gen(model, ids, mask, accel=method, accel_kwargs=kwargs)  # disable_compile: no graph
    assert not graphs
    out = _gen(model, ids, mask, eager=False, accel=method, accel_kwargs=kwargs)
    st = _check(out, ref, eager)
    assert st.extra["graphs"] is True and st.extra["prefill"] == "graphed chunks 4"
    captured = len(graphs)
    assert captured >= 2  # the verify graph of width w (captured by the prefill) and its compaction
    again = _gen(model, ids, mask, eager=False, accel=method, accel_kwargs=kwargs)
    assert len(graphs) == captured, "the second request captured again"
    assert torch.equal(again.sequences, out.sequences)
    assert hf_accel.stats(again).extra["compile_seconds"] == 0


def test_graphed_prefill_default_limits(graphs, monkeypatch):
    """Without the test switch the chunked prefill needs a graph, a width of at least PREFILL_MIN_WIDTH and at most
    PREFILL_MAX_CHUNKS chunks reading at most PREFILL_MAX_WEIGHT_BYTES of weights together (one chunk always); else the
    eager forward runs."""
    model = tiny_model("llama", seed=0, layers=2)
    ids, mask = prompts((20, 7), seed=2)
    ref = _gen(model, ids, mask, static=False)
    assert hf_accel.stats(_gen(model, ids, mask, **_aded(8))).extra["prefill"] == "eager"  # no graphs
    assert hf_accel.stats(_gen(model, ids, mask, eager=False, **_aded(8))).extra["prefill"] == "graphed chunks 3"
    # a node budget under PREFILL_MIN_WIDTH: chunks of PREFILL_NARROW_WIDTH (16) through that width's verify graph
    narrow = _gen(model, ids, mask, eager=False, **_aded(4))
    assert hf_accel.stats(narrow).extra["prefill"] == "graphed chunks 2" and torch.equal(narrow.sequences, ref.sequences)
    monkeypatch.setattr(backends, "PREFILL_NARROW_WIDTH", 4)
    narrow = _gen(model, ids, mask, eager=False, **_aded(4))
    assert hf_accel.stats(narrow).extra["prefill"] == "eager" and torch.equal(narrow.sequences, ref.sequences)
    monkeypatch.setattr(backends, "PREFILL_MAX_CHUNKS", 2)
    many = _gen(model, ids, mask, eager=False, **_aded(8))
    assert hf_accel.stats(many).extra["prefill"] == "eager" and torch.equal(many.sequences, ref.sequences)
    monkeypatch.setattr(backends, "PREFILL_MAX_CHUNKS", 32)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(backends, "PREFILL_MAX_WEIGHT_BYTES", 3 * weights)  # 3 chunks read 3x the weights: fits
    assert hf_accel.stats(_gen(model, ids, mask, eager=False, **_aded(8))).extra["prefill"] == "graphed chunks 3"
    monkeypatch.setattr(backends, "PREFILL_MAX_WEIGHT_BYTES", 3 * weights - 1)
    big = _gen(model, ids, mask, eager=False, **_aded(8))
    assert hf_accel.stats(big).extra["prefill"] == "eager" and torch.equal(big.sequences, ref.sequences)
    one = _gen(model, ids, mask, eager=False, **_aded(24))  # one chunk: always (it reads the weights once)
    assert hf_accel.stats(one).extra["prefill"] == "graphed chunks 1" and torch.equal(one.sequences, ref.sequences)
    monkeypatch.setattr(backends, "PREFILL_CHUNKS", False)
    off = _gen(model, ids, mask, eager=False, **_aded(8))
    assert hf_accel.stats(off).extra["prefill"] == "eager" and torch.equal(off.sequences, ref.sequences)


NARROW_CASES = [("lora_drop", "period-1"), ("m2r2", "never-exit"), ("m2r2", "self-spec"), ("ead", "small-is-large"),
                ("quant_spec", "aded>draft>target")]


@pytest.mark.parametrize("family", FAMILIES)
def test_narrow_budgets_prefill_in_chunks_and_kv_methods_eagerly(chunks, family):
    """Node budgets under PREFILL_MIN_WIDTH — LoRA-Drop and M2R2 early exit (layer plans, budget 1), M2R2 self_spec
    (k + 1), EAD, quant_spec — prefill in chunks (of PREFILL_NARROW_WIDTH where the budget is narrower) through the
    plain verify step, every layer, then run their steps: vanilla greedy's tokens and first logits, batch 1 and 3
    left-padded, every family of the matrix; a KV method (DuoAttention) keeps the eager prefill."""
    model = model_for(family)
    w = backends.PREFILL_NARROW_WIDTH
    for lengths in ((w + 5,), (w + 5, 9, w)):
        ids, mask = prompts(lengths, seed=5)
        ref = _gen(model, ids, mask, static=False)
        for method, label in NARROW_CASES:
            (build,) = [b for lab, _, b in METHODS[method] if lab == label]
            out = _gen(model, ids, mask, accel=method, accel_kwargs=build(model, family))
            prefill = hf_accel.stats(out).extra["prefill"]
            assert prefill == "eager chunks 2" if method == "lora_drop" else prefill.startswith("eager chunks ")
            assert torch.equal(out.sequences, ref.sequences), (method, label, lengths)
            torch.testing.assert_close(out.logits[0], ref.logits[0], rtol=1e-4, atol=1e-4)
    (duo,) = [b for lab, _, b in METHODS["duo_attention"] if lab == "full-window"]
    out = _gen(model, ids, mask, accel=["duo_attention", "aded"],
               accel_kwargs={"duo_attention": duo(model, family), "aded": {"datastore": None, "max_nodes": 8}})
    assert hf_accel.stats(out).extra["prefill"] == "eager"


def test_layer_plan_prefill_replays_the_narrow_verify_graph(graphs):
    """On the graph path a layer-plan method's prompt goes through the width-16 verify graph (captured once per
    workspace, with its compaction), then its plans: greedy's tokens; a second request captures nothing."""
    model = model_for("llama")
    (build,) = [b for lab, _, b in METHODS["lora_drop"] if lab == "period-1"]
    kw = dict(accel="lora_drop", accel_kwargs=build(model, "llama"))
    ids, mask = prompts((2 * backends.PREFILL_NARROW_WIDTH + 3, 7), seed=3)
    ref = _gen(model, ids, mask, static=False)
    out = _gen(model, ids, mask, eager=False, **kw)
    st = hf_accel.stats(out)
    assert st.extra["prefill"] == "graphed chunks 3" and torch.equal(out.sequences, ref.sequences)
    assert st.extra["plan_captures"] == 1 and len(graphs) == 3  # the refresh plan + the chunks' verify, compaction
    again = _gen(model, ids, mask, eager=False, **kw)
    assert len(graphs) == 3 and torch.equal(again.sequences, ref.sequences)


@pytest.mark.parametrize("mode", ["eager", "graphed"])
def test_prompt_hidden_states_are_the_eager_prefills(mode, request, monkeypatch):
    """Clover's ``prefilled`` gets the prompt's hidden states (B, P, H): the chunks' together, equal to the eager
    prefill's at every real position (through graph replays too, whose output buffers each chunk rewrites)."""
    from hf_accel.adapters.clover import Clover

    model, kwargs = _build("clover", "heads", "llama")
    probe, probe_mask = prompts((4,), seed=1)
    w = _width(model, probe, probe_mask, "clover", kwargs)
    ids, mask = prompts((2 * w + 5, w, 6), seed=8)
    seen = []
    orig = Clover.prefilled

    def prefilled(self, state, step):
        seen.append(step.hidden.clone())
        return orig(self, state, step)

    monkeypatch.setattr(Clover, "prefilled", prefilled)
    _gen(model, ids, mask, accel="clover", accel_kwargs=kwargs)
    if mode == "graphed":
        request.getfixturevalue("graphs")
        out = _gen(model, ids, mask, eager=False, accel="clover", accel_kwargs=kwargs)
    else:
        monkeypatch.setattr(backends, "PREFILL_CHUNKS", True)
        out = _gen(model, ids, mask, accel="clover", accel_kwargs=kwargs)
    st = hf_accel.stats(out)
    assert st.extra["prefill"] == f"{mode} chunks 3"
    eager, chunked = seen
    assert chunked.shape == eager.shape == (3, ids.shape[1], model.config.hidden_size)
    real = mask.bool()
    torch.testing.assert_close(chunked[real], eager[real], rtol=1e-5, atol=1e-5)


def test_a_program_that_cant_be_neutral_prefills_eagerly(chunks, monkeypatch):
    from hf_accel.adapters.hidden_transfer import _TransferStep

    model, kwargs = _build("hidden_transfer", "maps", "llama")
    ids, mask = prompts((30, 11), seed=6)
    monkeypatch.setattr(_TransferStep, "neutral", capture.StepProgram.neutral)
    out = _gen(model, ids, mask, accel="hidden_transfer", accel_kwargs=kwargs)
    assert hf_accel.stats(out).extra["prefill"] == "eager"
    assert torch.equal(out.sequences, _gen(model, ids, mask, static=False).sequences)


def test_a_prompt_longer_than_the_slots_is_refused_as_before(chunks):
    model = tiny_model("llama", seed=0, layers=2)
    layout = models.attention_layout(model)
    backend = backends.StaticBackend(model, layout, 1, torch.device("cpu"), torch.float32, max_length=10, nodes=8,
                                     use_graphs=False, fwd_extra={})
    try:
        ids = torch.arange(3, 23)[None]
        attn = torch.ones_like(ids, dtype=torch.bool)
        with pytest.raises(RuntimeError, match="static cache smaller than the prompt"):
            backend.prefill(ids, attn, torch.arange(20)[None])
    finally:
        backend.close()


def test_graphed_prefill_under_sampling(graphs, monkeypatch):
    """Sampling (the device sampler's graphs on the same workspace): the chunked prefill gives the first token's
    distribution of the eager one, so with one seed the same draws."""
    model = tiny_model("qwen2", seed=0, layers=2)
    ids, mask = prompts((19, 8, 12), seed=9)
    kw = dict(_aded(8), do_sample=True, temperature=0.8, top_k=20)
    runs = {}
    for mode in (None, False):
        monkeypatch.setattr(backends, "PREFILL_CHUNKS", mode)
        torch.manual_seed(5)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static", **kw)
        runs[mode] = (out, hf_accel.stats(out).extra)
    assert runs[None][1]["prefill"] == "graphed chunks 3" and runs[False][1]["prefill"] == "eager"
    assert runs[None][1]["sampling_path"] == "device"
    assert torch.equal(runs[None][0], runs[False][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_follower_forwards_on_the_graph_path_are_greedy(graphs, family):
    """With graphs the followers pad their forwards (M2R2 self_spec's catch-ups to k + 1, EAD's to 64, quant_spec's
    to 32 with a fixed pick count): vanilla greedy's tokens on every family, batch 1 and 3 left-padded."""
    model = model_for(family)
    for lengths in ((9,), (12, 5, 8)):
        ids, mask = prompts(lengths, seed=7)
        ref = _gen(model, ids, mask, static=False)
        for method, label in [("m2r2", "self-spec"), ("ead", "small-is-large"), ("quant_spec", "aded>draft>target")]:
            (build,) = [b for lab, _, b in METHODS[method] if lab == label]
            out = _gen(model, ids, mask, eager=False, accel=method, accel_kwargs=build(model, family))
            assert torch.equal(out.sequences, ref.sequences), (method, lengths)
    assert graphs  # the followers' forwards ran on (the CPU stand-in of) captured graphs




def _gpt2_40(layers):
    return tiny_model("gpt2", seed=0, layers=layers, n_positions=40)


@pytest.mark.parametrize("method", ["aded", "m2r2", "ead"])
def test_generation_up_to_a_learned_position_tables_end(graphs, method):
    """GPT-2 (a learned position table, n_positions 40) generating up to position 39: no token of a forward sits past
    the table — a tree's nodes past it sit at its last position (ADED's deep drafts near the end; they are past
    max_length), the cost probe's dummy chains at the root's position, a follower's padding at the row's last
    position and its drafts past the end at the table's last (M2R2 self_spec), a finished row's tokens at 0 (EAD's
    catch-ups) — where each indexed past the table (IndexError). Lossless methods give vanilla's tokens, EAD (lossy)
    the eager engine's; dynamic and static engines, batch 1 and 3 left-padded. (Every method of the conformance
    matrix was checked the same way on a 512-position GPT-2, prompts of ~500 tokens.)"""
    from hf_accel.adapters.m2r2 import RateResiduals

    model = _gpt2_40(4)
    if method == "aded":
        kw = {"datastore": None}
    elif method == "m2r2":
        torch.manual_seed(1)
        kw = {"adapter": RateResiduals(model, exit_layer=2, rank=4), "k": 3}
    else:
        kw = {"small_model": _gpt2_40(1), "threshold": 5.0, "min_run": 2, "max_small_run": 4}
    for lengths in ((9,), (12, 5, 8)):
        ids, mask = prompts(lengths, seed=7)
        gen = dict(attention_mask=mask, max_new_tokens=40 - ids.shape[1], do_sample=False)
        ref = model.generate(ids, **gen) if method != "ead" else model.generate(
            ids, **gen, accel=method, accel_kwargs=kw, cache_implementation="static", disable_compile=True)
        for extra in ({}, {"cache_implementation": "static"}):
            out = model.generate(ids, **gen, accel=method, accel_kwargs=kw, **extra)
            assert out.shape[1] == 40 and torch.equal(out, ref), (lengths, extra)
    assert graphs  # the static runs' verify and follower forwards ran on (the CPU stand-in of) captured graphs


@pytest.mark.parametrize("family", ["gpt2", "opt"])
@pytest.mark.parametrize("method,label", [("aded", "store-mcts"), ("hidden_transfer", "maps"), ("lud", "lossless"),
                                          ("quant_spec", "aded>draft>target")])
def test_scratch_and_follower_methods_up_to_a_learned_position_tables_end(graphs, method, label, family):
    """As above for the methods whose trees carry scratch nodes (hidden transfer's pseudo-position chains, LUD's
    placeholders: past max_length near the end, at the table's last position) and quant_spec's two followers, on the
    conformance GPT-2 and OPT (learned tables of 512 positions; OPT's with an offset of 2) from prompts of ~500
    tokens to position 511: vanilla's tokens."""
    model = model_for(family)
    (build,) = [b for lab, _, b in METHODS[method] if lab == label]
    for lengths in ((500,), (498, 490, 495)):
        ids, mask = prompts(lengths, seed=7)
        gen = dict(attention_mask=mask, max_new_tokens=512 - ids.shape[1], do_sample=False)
        ref = model.generate(ids, **gen)
        for extra in ({}, {"cache_implementation": "static"}):
            out = model.generate(ids, **gen, accel=method, accel_kwargs=build(model, family), **extra)
            assert out.shape[1] == 512 and torch.equal(out, ref), (lengths, extra)
    assert graphs
