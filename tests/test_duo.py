"""DuoAttention inside generate(): identity with vanilla when the window covers everything, equality with a naive
full-cache reference when it does not (eviction keeps what is needed), KV bytes, composition with a speculative
method (lossless w.r.t. duo_attention alone), errors, and patterns from trained gates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, GenerationConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_accel
from hf_accel.adapters.duo_attention import (
    ATTN_NAME,
    DuoCache,
    DuoGates,
    StaticDuoCache,
    attention_switched,
    default_pattern,
)
from hf_accel.config import AccelConfig
from hf_accel.engine.adapter import SpeculativeAdapter
from hf_accel.engine.cache import cache_nbytes
from hf_accel.engine.tree import Tree

from conftest import FAMILIES, VOCAB, prompts, tiny_model

SMALL = {"sink": 2, "recent": 4, "slack": 2}  # far below the prompt: the Λ mask in prefill, eviction every few steps
WIDE = {"sink": 64, "recent": 256}


@pytest.fixture(scope="module")
def models_():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


def _impl(model):
    return model.config._attn_implementation


# ---- a naive reference: full cache, per-head streaming mask in eager math -------------------------------------------


def _reference_attention(pattern, sink, recent):
    def attn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        b, h, q, d = query.shape
        g = h // key.shape[1]
        k = key.repeat_interleave(g, dim=1)
        v = value.repeat_interleave(g, dim=1)
        allowed = attention_mask[:, 0].bool()  # (B, Q, S): padding, causality, windows
        rank = allowed.long().cumsum(-1)
        seen = rank[..., -1:]
        stream = allowed & ((rank <= sink) | (rank > seen - recent))
        retrieval = pattern[module.layer_idx].repeat_interleave(g).to(query.device)  # per query head
        visible = torch.where(retrieval[None, :, None, None], allowed[:, None], stream[:, None])
        w = torch.matmul(query, k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
        if softcap is not None:
            w = torch.tanh(w / softcap) * softcap
        w = w.masked_fill(~visible, float("-inf"))
        w = torch.softmax(w.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), None

    return attn


def _reference_generate(model, pattern, sink, recent, ids, mask, **kw):
    name = "hf_accel_test_duo_ref"
    AttentionInterface.register(name, _reference_attention(pattern, sink, recent))
    AttentionMaskInterface.register(name, lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False}))
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        return model.generate(ids, attention_mask=mask, **kw)
    finally:
        model.set_attn_implementation(before)


# ---- identity / reference ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(11,), (5, 13, 9)], ids=["batch1", "batch3"])
def test_window_covering_everything_is_vanilla(models_, family, lengths):
    model = models_(family)
    before = _impl(model)
    ids, mask = prompts(lengths, seed=len(lengths))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, accel="duo_attention",
                         accel_kwargs=WIDE)
    assert torch.equal(out, ref), f"{family}: duo_attention with sink+recent over everything differs from vanilla"
    st = hf_accel.stats(out)
    assert st.method == "duo_attention" and st.batch_size == len(lengths)
    assert st.extra["retrieval_share"] == 0.5
    assert _impl(model) == before  # switched for the call only


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "mistral", "gpt2", "opt"])
def test_small_window_matches_naive_reference(models_, family):
    """Streaming heads see only sink + recent of their visible slots, in prefill (Λ mask) and decode, per padded
    row; the DuoCache evicts (slack=2: every few steps) yet gives the full-cache reference's tokens and scores."""
    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=4)
    kw = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_scores=True)
    pattern = default_pattern(model, 0.5)
    ref = _reference_generate(model, pattern, SMALL["sink"], SMALL["recent"], ids, mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw)
    vanilla = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out.sequences, vanilla)  # the window really bites
    st = hf_accel.stats(out)
    assert st.extra["compactions"] > 0
    assert isinstance(out.past_key_values, DuoCache)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefill_in_query_chunks_matches_the_reference(models_, family, monkeypatch):
    """Long forwards run in query chunks (bounded masks and ranks): with a tiny chunk budget the prefill is split
    into many chunks, and the tokens and scores are still the full-cache reference's."""
    from hf_accel.adapters.duo_attention import cache as duo_cache

    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = _reference_generate(model, default_pattern(model, 0.5), SMALL["sink"], SMALL["recent"], ids, mask, **kw)
    monkeypatch.setattr(duo_cache, "_CHUNK", 3 * 20 * 4)  # 4 queries per chunk over 20 slots, batch 3
    out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pattern_all_retrieval_is_vanilla_and_all_streaming_matches_reference(models_):
    model = models_("qwen3")
    ids, mask = prompts((20, 9), seed=6)
    kw = dict(max_new_tokens=12, do_sample=False)
    ref = model.generate(ids, attention_mask=mask, **kw)
    d = (2, 2)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention",
                         accel_kwargs={"pattern": torch.ones(d, dtype=torch.bool), **SMALL}, **kw)
    assert torch.equal(out, ref)
    stream = torch.zeros(d, dtype=torch.bool)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs={"pattern": stream, **SMALL},
                         **kw)
    assert torch.equal(out, _reference_generate(model, stream, 2, 4, ids, mask, **kw))


# ---- the static cache (cache_implementation="static": HF compiles its decode step; eager on CPU) ------------------

STATIC = {"cache_implementation": "static", "disable_compile": True}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(11,), (5, 13, 9)], ids=["batch1", "batch3"])
def test_static_window_covering_everything_is_vanilla(models_, family, lengths):
    model = models_(family)
    before = _impl(model)
    ids, mask = prompts(lengths, seed=len(lengths))
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = model.generate(ids, **kw)
    out = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=WIDE, **STATIC)
    assert torch.equal(out, ref), f"{family}: static duo_attention over everything differs from vanilla"
    st = hf_accel.stats(out)
    assert st.extra["cache"] == "StaticDuoCache" and st.extra["static"]
    assert _impl(model) == before


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "mistral", "gpt2", "opt", "phi3", "qwen3"])
def test_static_small_window_matches_reference_and_dynamic(models_, family):
    """sink 2 + recent 4 rings, far below the prompt: the ring wraps many times in prefill and decode, per padded row;
    tokens and scores are the naive reference's, and the dynamic DuoCache's token for token."""
    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=4)
    kw = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = _reference_generate(model, default_pattern(model, 0.5), SMALL["sink"], SMALL["recent"], ids, mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw, **STATIC)
    dyn = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.sequences, dyn.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    cache = out.past_key_values
    assert isinstance(cache, StaticDuoCache) and cache.is_compileable
    full = [layer for layer in cache.layers if layer.window is None]
    if full:  # full-attention layers: rings of sink + recent, every entry filled, wrapped around
        assert all(layer.ring and layer.sk.shape[2] == 6 and bool((layer.spos >= 0).all()) for layer in full)
        assert all(int(layer.seen.min()) > 6 for layer in full)


@pytest.mark.parametrize("sink,recent,kernel", [(0, 3, "math"), (5, 1, "math"), (30, 2, "math"), (2, 4, "sdpa")])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_edge_windows_match_reference(models_, family, sink, recent, kernel):
    """No sink, a one-slot ring, a sink longer than the shortest row's prompt (decode fills it); both decode kernels."""
    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=8)
    kw = dict(max_new_tokens=20, do_sample=False)
    ref = _reference_generate(model, default_pattern(model, 0.5), sink, recent, ids, mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention",
                         accel_kwargs={"sink": sink, "recent": recent, "static_kernel": kernel}, **kw, **STATIC)
    assert torch.equal(out, ref)


def test_static_chunked_prefill_and_sampling(models_):
    """HF's chunked prefill (eager forwards of several tokens on a filled ring) and sampling with
    num_return_sequences (same seed: the dynamic DuoCache's draws)."""
    model = models_("llama")
    ids, mask = prompts((20, 14, 17), seed=4)
    kw = dict(max_new_tokens=12, do_sample=False)
    ref = _reference_generate(model, default_pattern(model, 0.5), SMALL["sink"], SMALL["recent"], ids, mask, **kw)
    for chunk in (5, 1):  # 1: one-token forwards over padding too (a padding query sees nothing)
        out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL,
                             prefill_chunk_size=chunk, **kw, **STATIC)
        assert torch.equal(out, ref)
    draws = []
    for extra in (STATIC, {}):
        torch.manual_seed(3)
        draws.append(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=20,
                                    num_return_sequences=2, accel="duo_attention", accel_kwargs=SMALL, **extra))
    assert draws[0].shape[0] == 6 and torch.equal(draws[0], draws[1])


def test_static_kv_bytes_and_compile_criteria():
    """KV bytes are the fixed buffers' (retrieval heads: max_cache_len slots; streaming: sink + recent); HF's
    generate would compile the decode step on this cache exactly as on its own StaticCache."""
    model = tiny_model("llama")
    ids, mask = prompts((24, 17, 20), seed=2)
    sink, recent, new = 3, 8, 30
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, accel="duo_attention",
                         accel_kwargs={"sink": sink, "recent": recent}, **STATIC)
    cache = out.past_key_values
    slots, b, dh = ids.shape[1] + new, 3, 8
    expected = sum(2 * 4 * b * dh * (layer.n_ret * slots + layer.n_str * (sink + recent)) for layer in cache.layers)
    st = hf_accel.stats(out)
    assert st.kv_cache_bytes == cache.nbytes() == expected
    assert st.extra["full_kv_bytes"] == 2 * 4 * b * dh * 2 * 2 * slots  # HF's StaticCache of the same length
    assert st.extra["max_cache_len"] == slots and st.new_tokens == 3 * new
    gc = GenerationConfig(compile_config=None)
    assert cache.is_compileable
    kwargs = {"past_key_values": cache, "cache": cache}  # the name generate's model_kwargs use: <= 5.23 / >= 5.24
    assert not model._valid_auto_compile_criteria(kwargs, gc)  # CPU: HF compiles on GPUs only
    from transformers import CompileConfig

    gc.compile_config = CompileConfig()
    gc.compile_config._compile_all_devices = True
    assert model._valid_auto_compile_criteria(kwargs, gc)


def test_static_decode_step_is_one_graph(models_):
    """The decode step traces as one graph (fullgraph, no recompile over steps) under torch.compile; checked with
    the eager backend (no C++ compiler needed) through HF's own compile path."""
    from transformers import CompileConfig

    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    model = models_("qwen2")
    ids, mask = prompts((20, 14, 17), seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, accel="duo_attention", accel_kwargs=SMALL)
    dyn = model.generate(ids, **kw)
    cc = CompileConfig(fullgraph=True, backend="eager", mode=None)
    cc._compile_all_devices = True
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # the counters are process-wide: earlier compiles in the session must not count here
    try:
        out = model.generate(ids, **kw, cache_implementation="static", compile_config=cc)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        model.__dict__.pop("_compiled_call", None)
        model.__dict__.pop("_last_compile_config", None)
        torch._dynamo.reset()
    assert torch.equal(out, dyn)
    assert graphs == 1


# ---- KV bytes ---------------------------------------------------------------------------------------------------


def test_kv_bytes():
    model = tiny_model("llama")
    ids, mask = prompts((24, 17, 20), seed=2)
    sink, recent, slack = 3, 8, 8
    kw = dict(max_new_tokens=60, min_new_tokens=60, do_sample=False, return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=mask, accel="duo_attention",
                         accel_kwargs={"sink": sink, "recent": recent, "slack": slack}, **kw)
    vanilla = model.generate(ids, attention_mask=mask, **kw)
    cache = out.past_key_values
    slots = ids.shape[1] + 60 - 1  # the last token's KV is never written
    b, dh = 3, 8
    expected = 0
    for layer in cache.layers:
        assert layer.length == slots
        assert tuple(layer.rk.shape) == (b, layer.n_ret, slots, dh)  # retrieval heads: every slot
        width = layer.sk.shape[2]
        assert width <= sink + recent + slack  # streaming heads: sink + recent (+ slack before a compaction)
        assert (layer.sid >= 0).sum(1).max() <= width
        expected += 2 * 4 * b * dh * (layer.n_ret * slots + layer.n_str * width)
    st = hf_accel.stats(out)
    assert st.kv_cache_bytes == cache.nbytes() == expected
    assert st.extra["full_kv_bytes"] == 2 * 4 * b * dh * 2 * 2 * slots == cache_nbytes(vanilla.past_key_values)
    assert st.kv_cache_bytes < 0.7 * st.extra["full_kv_bytes"]
    assert st.new_tokens == 3 * 60


# ---- composition with a speculative method --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2", "gpt2"])
@pytest.mark.parametrize("lengths", [(18,), (20, 14, 17)], ids=["batch1", "batch3"])
def test_composition_is_lossless_wrt_duo(models_, family, lengths):
    model = models_(family)
    before = _impl(model)
    ids, mask = prompts(lengths, seed=5)
    kw = dict(max_new_tokens=20, do_sample=False)
    duo = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw)
    both = model.generate(ids, attention_mask=mask, accel=["duo_attention", "aded"],
                          accel_kwargs={"duo_attention": SMALL, "aded": {"datastore": None}}, **kw)
    assert torch.equal(both, duo)
    st = hf_accel.stats(both)
    assert st.method == "duo_attention+aded" and st.steps > 0
    assert st.extra["compactions"] > 0 and st.kv_cache_bytes < st.extra["full_kv_bytes"]
    assert _impl(model) == before


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["clover", "hidden_transfer", "m2r2", "quant_spec"])
def test_composition_with_other_lossless_methods(models_, family, method):
    """Trained-head, self-speculative and two-model methods on a DuoCache: duo_attention's own greedy tokens."""
    from hf_accel.adapters.clover import CloverHeads
    from hf_accel.adapters.hidden_transfer import TransferMaps
    from hf_accel.adapters.m2r2 import RateResiduals

    model = models_(family)
    torch.manual_seed(0)
    kwargs = {
        "clover": lambda: {"heads": CloverHeads(model, depth=2)},
        "hidden_transfer": lambda: {"heads": TransferMaps(model, k=2)},
        "m2r2": lambda: {"adapter": RateResiduals(model, exit_layer=1, rank=4)},
        "quant_spec": lambda: {"intermediate": model, "aded": {"datastore": None}, "k": 3},
    }[method]()
    ids, mask = prompts((20, 14, 17), seed=5)
    kw = dict(max_new_tokens=16, do_sample=False)
    duo = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, **kw)
    both = model.generate(ids, attention_mask=mask, accel=["duo_attention", method],
                          accel_kwargs={"duo_attention": SMALL, method: kwargs}, **kw)
    assert torch.equal(both, duo)
    st = hf_accel.stats(both)
    assert st.method == f"duo_attention+{method}" and st.extra["compactions"] > 0


def test_composition_from_generation_config_and_sampling(models_):
    model = models_("llama")
    ids, mask = prompts((20, 11), seed=7)
    entry = {"method": ["duo_attention", "aded"], "duo_attention": SMALL, "aded": {"datastore": None}}
    gc = GenerationConfig(max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=1, hf_accel=entry)
    out = model.generate(ids, attention_mask=mask, generation_config=gc)
    duo = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, accel="duo_attention",
                         accel_kwargs=SMALL)
    assert torch.equal(out, duo)
    assert hf_accel.stats(out).method == "duo_attention+aded"
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=10,
                             accel=["duo_attention", "aded"], accel_kwargs={"duo_attention": SMALL, "aded": {"datastore": None}})
    assert sampled.shape[0] == 2 and hf_accel.stats(sampled).new_tokens > 0
    torch.manual_seed(0)
    alone = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=True, top_k=10,
                           accel="duo_attention", accel_kwargs=SMALL)
    assert alone.shape[0] == 2


def test_composition_with_a_layer_skipping_method(models_):
    """LoRA-Drop skips layers (they hold fewer slots): each DuoLayer covers its own slots, the narrowed masks match."""
    model = models_("llama")
    ids, mask = prompts((20, 12), seed=9)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, accel=["duo_attention", "lora_drop"],
                         accel_kwargs={"duo_attention": SMALL})
    st = hf_accel.stats(out)
    assert st.method == "duo_attention+lora_drop" and st.extra["drop_steps"] > 0 and st.extra["compactions"] > 0
    # with a refresh every step nothing is dropped: duo_attention's own tokens
    every = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                           accel=["duo_attention", "lora_drop"], accel_kwargs={"duo_attention": SMALL, "lora_drop": {"period": 1}})
    duo = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, accel="duo_attention",
                         accel_kwargs=SMALL)
    assert torch.equal(every, duo)


# ---- composition on the static engine (cache_implementation="static": tree verify over the rings) ----------------


@dataclass
class _OracleConfig(AccelConfig):
    truth: Any = None  # per row: the tokens the target generates (the draft follows them, a wrong branch beside)
    depths: Any = (1, 6, 3, 0, 5, 2)  # chain length per step, cycled (offset by row): varied accepted paths


class _Oracle(SpeculativeAdapter):
    """Drafts the known continuation as a chain (of a depth cycled per step and row) with a wrong sibling and a
    wrong grandchild beside every chain node: non-chain trees, and accepted paths longer than the ring's ``recent``
    in one commit, so that the rings wrap within a commit and per-node ring masks differ."""

    Config = _OracleConfig

    def max_tree_nodes(self) -> int:
        return 1 + 3 * max(self.config.depths)

    def prepare(self, model, rows, generation_config):
        return {"step": 0}

    def draft(self, state, rows):
        state["step"] += 1
        trees = []
        for r in rows:
            if r is None:
                trees.append(None)
                continue
            truth = self.config.truth[r.index]
            done = len(r.generated)
            depths = self.config.depths
            chain = truth[done: done + depths[(state["step"] + r.index) % len(depths)]]
            tokens, parents, prev = [r.tokens[-1]], [-1], 0
            for tok in chain:
                wrong = (tok + 1) % VOCAB
                tokens += [wrong, (wrong + 7) % VOCAB]
                parents += [prev, len(tokens) - 2]
                tokens.append(tok)
                parents.append(prev)
                prev = len(tokens) - 1
            trees.append(Tree(tokens, parents))
        return trees


@pytest.fixture(scope="module")
def oracle():
    hf_accel.register("_duo_oracle")(_Oracle)
    yield "_duo_oracle"
    hf_accel.registry._ADAPTERS.pop("_duo_oracle", None)


def _truth(out, ids):
    return [row[ids.shape[1]:].tolist() for row in out]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(11,), (5, 13, 9)], ids=["batch1", "batch3"])
def test_static_engine_composition_window_covering_everything_is_vanilla(models_, family, lengths, oracle):
    """duo_attention + a speculative method on the static engine, with sink + recent over everything: vanilla's
    greedy tokens (ADED's drafts, and the oracle's deep trees)."""
    model = models_(family)
    before = _impl(model)
    ids, mask = prompts(lengths, seed=len(lengths))
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    ref = model.generate(ids, **kw)
    for method, opts in (("aded", {"datastore": None}), (oracle, {"truth": _truth(ref, ids)})):
        out = model.generate(ids, **kw, accel=["duo_attention", method],
                             accel_kwargs={"duo_attention": WIDE, method: opts}, **STATIC)
        assert torch.equal(out, ref), f"{family}: static duo_attention+{method} over everything differs from vanilla"
        st = hf_accel.stats(out)
        assert st.method == f"duo_attention+{method}" and st.extra["cache"] == "static" and st.extra["static"]
    assert st.tokens_per_forward > 2  # the oracle's paths were accepted
    out = model.generate(ids, **kw, accel="duo_attention", accel_kwargs={**WIDE, "runner": "engine"}, **STATIC)
    assert torch.equal(out, ref), f"{family}: duo_attention alone on the static engine over everything differs"
    st = hf_accel.stats(out)
    assert (st.method, st.extra["runner"], st.tokens_per_forward) == ("duo_attention", "engine", 1.0)
    assert _impl(model) == before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(18,), (20, 14, 17)], ids=["batch1", "batch3"])
def test_static_engine_composition_is_lossless_wrt_duo(models_, family, lengths, oracle):
    """Small rings (sink 2 + recent 4) that wrap in prefill, in every commit and within one commit (the oracle's
    accepted paths reach 7 tokens): duo_attention + a speculative method on the static engine gives duo_attention
    alone's tokens, dynamic and static, per padded row."""
    model = models_(family)
    ids, mask = prompts(lengths, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    duo_static = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL, **STATIC)
    assert torch.equal(duo, duo_static)
    assert not torch.equal(duo, model.generate(ids, **kw))  # the window really bites
    for method, opts in (("aded", {"datastore": None}), (oracle, {"truth": _truth(duo, ids)})):
        out = model.generate(ids, **kw, accel=["duo_attention", method],
                             accel_kwargs={"duo_attention": SMALL, method: opts}, **STATIC)
        assert torch.equal(out, duo), f"{family}: static duo_attention+{method} differs from duo_attention alone"
        st = hf_accel.stats(out)
        assert st.extra["static"] and st.extra["max_cache_len"] >= ids.shape[1] + 24
        if any(w is None for w in hf_accel.models.layer_windows(model)):  # full-attention layers hold rings
            assert st.kv_cache_bytes < st.extra["full_kv_bytes"]
    assert st.tokens_per_forward > 2
    alone = model.generate(ids, **kw, accel="duo_attention", accel_kwargs={**SMALL, "runner": "engine"}, **STATIC)
    assert torch.equal(alone, duo), f"{family}: duo_attention alone on the static engine differs from HF's runner"
    assert hf_accel.stats(alone).extra["runner"] == "engine"


@pytest.mark.parametrize("sink,recent", [(0, 3), (5, 1), (30, 2), (0, 9)])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_engine_composition_edge_windows(models_, family, sink, recent, oracle):
    """No sink, a one-entry ring, a sink longer than the shortest prompt (commits fill it), a ring longer than the
    deepest path: duo_attention alone's tokens."""
    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=8)
    win = {"sink": sink, "recent": recent}
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=win)
    for method, opts in (("aded", {"datastore": None}), (oracle, {"truth": _truth(duo, ids)})):
        out = model.generate(ids, **kw, accel=["duo_attention", method], accel_kwargs={"duo_attention": win,
                             method: opts}, **STATIC)
        assert torch.equal(out, duo), f"{family} sink={sink} recent={recent}: +{method} differs from duo alone"


@pytest.mark.parametrize("queries", [1, 7])
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_static_engine_prefill_in_query_chunks(models_, family, queries, monkeypatch, oracle):
    """The static engine prefills a KV method's cache in chunks of queries (bounded 4D masks): chunks of one query
    (padding-only chunks too) and of seven, the rings filled and wrapped across chunks; duo_attention alone on the
    engine (tokens and scores) and + the oracle's deep trees (tokens) give duo_attention alone's (dynamic, HF)."""
    from hf_accel.engine import backends

    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=6)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    slots = ids.shape[1] + 16 + 2  # the engine's slots for duo alone on CPU (prompt + new tokens + 1 node + 1)
    monkeypatch.setattr(backends, "KV_PREFILL_ENTRIES", queries * ids.shape[0] * slots)
    runs = [model.generate(ids, **kw, accel="duo_attention", accel_kwargs={**SMALL, "runner": "engine"}, **STATIC),
            model.generate(ids, **kw, accel=["duo_attention", oracle],
                           accel_kwargs={"duo_attention": SMALL, oracle: {"truth": _truth(duo.sequences, ids)}},
                           **STATIC)]
    for out in runs:
        assert torch.equal(out.sequences, duo.sequences), f"{family}: chunks of {queries} change the tokens"
    for a, b in zip(runs[0].scores, duo.scores):
        live = a.abs().amax(-1) > 0  # the engine's scores of a row after its eos are zeros (HF's are not)
        torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4)
    assert hf_accel.stats(runs[1]).tokens_per_forward > 2


def test_duo_alone_static_runner_choice(models_, monkeypatch):
    """``runner``: "auto" runs duo_attention alone (cache_implementation="static") on the static engine where its
    steps are CUDA graphs and the call asks nothing the engine refuses, else on HF's compiled generate; "engine"
    refuses what the engine can't honour with one clear error; "hf" is HF's generate on a StaticDuoCache."""
    from hf_accel import hook
    from hf_accel.engine import capture

    model = models_("llama")
    ids, mask = prompts((11,), seed=1)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")

    def runner(**duo):
        out = model.generate(ids, **kw, accel="duo_attention", accel_kwargs={**SMALL, **duo})
        return hf_accel.stats(out).extra["runner"]

    assert runner() == "hf"  # CPU: no CUDA graphs (HF compiles only on a GPU too)
    assert runner(runner="engine") == "engine"
    calls = []
    monkeypatch.setattr(capture, "graphs_supported", lambda device: True)
    monkeypatch.setattr(hook, "_run_engine", lambda *a, **k: calls.append(a[-1]) or "engine-ran")
    out = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    assert out == "engine-ran" and type(calls[-1]).__name__ == "DuoAttention"
    for refused in ({"guidance_scale": 1.5}, {"disable_compile": True}):  # CFG: the engine refuses; no compile: HF
        n = len(calls)
        model.generate(ids, **{**kw, **refused}, accel="duo_attention", accel_kwargs=SMALL)
        assert len(calls) == n
    monkeypatch.undo()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        model.generate(ids, **kw, guidance_scale=1.5, accel="duo_attention", accel_kwargs={**SMALL, "runner": "engine"})
    with pytest.raises(ValueError, match="runner must be"):
        model.generate(ids, **kw, accel="duo_attention", accel_kwargs={**SMALL, "runner": "fast"})


def test_static_engine_composition_other_methods_and_refusals(models_):
    """Clover (a step program and hidden states) composes on the static engine; sampling runs; a layer-skipping
    method (layer plans) is refused with a clear message."""
    from hf_accel.adapters.clover import CloverHeads

    model = models_("llama")
    ids, mask = prompts((20, 14, 17), seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    torch.manual_seed(0)
    heads = CloverHeads(model, depth=2)
    out = model.generate(ids, **kw, accel=["duo_attention", "clover"],
                         accel_kwargs={"duo_attention": SMALL, "clover": {"heads": heads}}, **STATIC)
    assert torch.equal(out, duo)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=10,
                             accel=["duo_attention", "aded"],
                             accel_kwargs={"duo_attention": SMALL, "aded": {"datastore": None}}, **STATIC)
    assert sampled.shape[0] == 3 and hf_accel.stats(sampled).new_tokens > 0
    with pytest.raises(ValueError, match="layer-skipping method on the static engine"):
        model.generate(ids, **kw, accel=["duo_attention", "lora_drop"], accel_kwargs={"duo_attention": SMALL},
                       **STATIC)
    assert _impl(model) == "sdpa"
    # max_cache_len: the engine's fixed length (one workspace across calls); shorter than the call needs: refused
    fixed = model.generate(ids, **kw, accel=["duo_attention", "aded"], **STATIC,
                           accel_kwargs={"duo_attention": {**SMALL, "max_cache_len": 64}, "aded": {"datastore": None}})
    assert torch.equal(fixed, duo) and hf_accel.stats(fixed).extra["max_cache_len"] > 64
    with pytest.raises(ValueError, match="max_cache_len=30 is shorter"):
        model.generate(ids, **kw, accel=["duo_attention", "aded"], **STATIC,
                       accel_kwargs={"duo_attention": {**SMALL, "max_cache_len": 30}, "aded": {"datastore": None}})


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_static_engine_composition_steps_trace_as_single_graphs(models_, family, monkeypatch):
    """The composed verify step (tree verify over the rings) and the compaction (ring append) go through torch.compile
    with fullgraph=True (dynamo + AOT, no inductor on CPU) as one graph each, with no recompile across steps, and give
    duo_attention alone's tokens: what the GPU path compiles and captures has no graph break, no host read and no
    data-dependent shape."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from hf_accel.engine import backends

    fn = backends._compiled_verify(backends.compile_options(CompileConfig(backend="aot_eager", fullgraph=True)),
                                   None, ("test_duo", family))
    orig = backends._Workspace.verify_step
    monkeypatch.setattr(backends._Workspace, "verify_step", lambda self, f=None: orig(self, fn))
    # the commit's compaction (the ring append; captured eagerly on a GPU) traces as one graph too
    compact = torch.compile(backends._Workspace.compact_step, fullgraph=True, backend="aot_eager")
    monkeypatch.setattr(backends._Workspace, "compact_step", compact)
    model = models_(family)
    ids, mask = prompts((20, 14, 17), seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    counters.clear()
    out = model.generate(ids, **kw, accel=["duo_attention", "aded"], cache_implementation="static",
                         accel_kwargs={"duo_attention": SMALL, "aded": {"datastore": None, "max_nodes": 8}})
    assert torch.equal(out, duo)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # the verify, the compaction
    assert hf_accel.stats(out).steps > 1


def _table_entries():
    import methods as table

    return [(name, label) for name, entries in table.METHODS.items() if name != "duo_attention"
            for label, kind, _ in entries if kind in ("lossless", "identity")]


@pytest.mark.parametrize("method,label", _table_entries())
def test_static_engine_composition_with_every_method(method, label):
    """Every lossless entry of the conformance table composed with duo_attention on the static engine (step
    programs, hidden states, followers, layer plans): duo_attention alone's tokens, or, for a layer-skipping method
    (layer plans), one clear error and the model as it was."""
    import methods as table

    model = table.model_for("llama")
    make = {lb: mk for lb, _, mk in table.METHODS[method]}[label]
    ids, mask = prompts((20, 14, 17), seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    duo = model.generate(ids, **kw, accel="duo_attention", accel_kwargs=SMALL)
    call = dict(accel=["duo_attention", method], accel_kwargs={"duo_attention": SMALL, method: make(model, "llama")})
    if method == "lora_drop" or label == "never-exit":
        with pytest.raises(ValueError, match="layer-skipping method on the static engine"):
            model.generate(ids, **kw, **call, **STATIC)
        assert _impl(model) == "sdpa"
        return
    out = model.generate(ids, **kw, **call, **STATIC)
    assert torch.equal(out, duo), f"static duo_attention+{method} ({label}) differs from duo_attention alone"
    assert hf_accel.stats(out).extra["static"]


# ---- HF features under the KV method alone ----------------------------------------------------------------------------


def test_hf_features_streamer_and_dict(models_):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    model = models_("llama")
    ids, mask = prompts((12,), seed=1)
    streamer = Collect()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, accel="duo_attention",
                         accel_kwargs=SMALL, streamer=streamer, return_dict_in_generate=True, output_scores=True)
    assert streamer.ended and len(streamer.puts) == 1 + 8
    assert len(out.scores) == 8 and out.accel_stats is hf_accel.stats(out) is hf_accel.stats(model)
    assert out.accel_stats.new_tokens == 8


def test_plain_tensors_get_ordinary_attention(models_):
    """While a model runs under hf_accel_duo, a forward on an ordinary cache (another thread, HF's CFG pass) gets
    ordinary attention: same logits as the model's own implementation."""
    for family in ("llama", "gemma2", "qwen2", "gpt2"):
        model = models_(family)
        ids, mask = prompts((9, 14), seed=3)
        ref = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        with attention_switched(model):
            assert _impl(model) == ATTN_NAME
            got = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        valid = mask.bool()
        torch.testing.assert_close(got[valid], ref[valid], rtol=1e-4, atol=1e-4)


# ---- errors ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sink": -1}, "sink must be"),
        ({"recent": 0}, "recent must be"),
        ({"sparsity": 1.5}, "sparsity must be"),
        ({"window": 3}, "unknown accel_kwargs"),
        ({"pattern": torch.ones(3, 2, dtype=torch.bool)}, r"pattern has shape \(3, 2\).*\(2, 2\)"),
        ({"pattern": torch.ones(2, 2)}, "must be bool"),
        ({"pattern": object()}, "pattern must be"),
        ({"static_kernel": "flash"}, "static_kernel must be"),
        ({"max_cache_len": 0}, "max_cache_len must be"),
    ],
)
def test_bad_kwargs(models_, kwargs, match):
    model = models_("llama")
    ids, mask = prompts((7,))
    with pytest.raises(ValueError, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention", accel_kwargs=kwargs)
    assert _impl(model) == "sdpa"


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"cache_implementation": "offloaded"}, "cache_implementation='offloaded'"),
        ({"cache_implementation": "sliding_window"}, "cache_implementation='sliding_window'"),
        ({"cache_implementation": "static", "accel_kwargs": {"max_cache_len": 8}}, "max_cache_len=8 is shorter"),
        ({"num_beams": 2}, "beam search"),
        ({"past_key_values": "cache"}, "past_key_values"),
        ({"prompt_lookup_num_tokens": 3}, "assisted decoding"),
        ({"use_cache": False}, "use_cache=False"),
    ],
)
def test_refusals(models_, extra, match):
    model = models_("llama")
    ids, mask = prompts((7,))
    if extra.get("past_key_values") == "cache":
        extra = {"past_key_values": DynamicCache()}
    with pytest.raises(ValueError, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention", **extra)
    assert _impl(model) == "sdpa"


def test_composition_errors(models_):
    model = models_("llama")
    ids, mask = prompts((7,))
    gen = dict(attention_mask=mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="one KV method"):
        model.generate(ids, **gen, accel=["aded", "clover"])
    with pytest.raises(ValueError, match="twice"):
        model.generate(ids, **gen, accel=["duo_attention", "duo_attention"])
    with pytest.raises(ValueError, match="keyed by the method's name"):
        model.generate(ids, **gen, accel=["duo_attention", "aded"], accel_kwargs={"sink": 4})
    with pytest.raises(ValueError, match="sink must be"):
        model.generate(ids, **gen, accel=["duo_attention", "aded"], accel_kwargs={"duo_attention": {"sink": -2}})
    assert _impl(model) == "sdpa"


def test_model_unchanged_after_error_inside_generate_and_after_success(models_):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            assert _impl(model) == ATTN_NAME  # switched while generate runs
            raise RuntimeError("boom")

    model = models_("gemma2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = prompts((9,))
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention",
                       stopping_criteria=StoppingCriteriaList([Boom()]))
    assert _impl(model) == "eager"
    model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention")
    model.generate(ids, attention_mask=mask, max_new_tokens=4, accel=["duo_attention", "aded"],
                   accel_kwargs={"aded": {"datastore": None}})
    assert _impl(model) == "eager"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_unsupported_models_are_refused(monkeypatch):
    model = tiny_model("llama", seed=1)
    ids, mask = prompts((7,))
    model.model.layers[1].self_attn.sinks = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="attention sinks"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention")
    del model.model.layers[1].self_attn.sinks
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    for extra in ({}, {"cache_implementation": "static", "disable_compile": True}):
        with pytest.raises(ValueError, match="AttentionInterface"):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="duo_attention", **extra)
    assert _impl(model) == "sdpa"


# ---- patterns from trained gates ----------------------------------------------------------------------------------


def test_pattern_from_gates_round_trip(models_, tmp_path):
    model = models_("llama")
    gates = DuoGates(model, sink=2, recent=4, sparsity=0.5)
    with torch.no_grad():
        gates.gates.copy_(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    expected = torch.tensor([[True, False], [False, True]])
    assert torch.equal(gates.retrieval(), expected)
    gates.save_pretrained(tmp_path / "gates")
    ids, mask = prompts((20, 13), seed=8)
    kw = dict(max_new_tokens=12, do_sample=False)
    by_path = model.generate(ids, attention_mask=mask, accel="duo_attention",
                             accel_kwargs={"pattern": str(tmp_path / "gates"), "slack": 2}, **kw)
    by_gates = model.generate(ids, attention_mask=mask, accel="duo_attention",
                              accel_kwargs={"pattern": gates, "slack": 2}, **kw)
    by_tensor = model.generate(ids, attention_mask=mask, accel="duo_attention",
                               accel_kwargs={"pattern": expected, **SMALL}, **kw)
    assert torch.equal(by_path, by_tensor) and torch.equal(by_gates, by_tensor)
    st = hf_accel.stats(by_path)
    assert (st.extra["sink"], st.extra["recent"]) == (2, 4)  # the gates' own window when not given
    everything = model.generate(ids, attention_mask=mask, accel="duo_attention",
                                accel_kwargs={"pattern": gates, "sparsity": 0.0}, **kw)
    assert torch.equal(everything, model.generate(ids, attention_mask=mask, **kw))  # no streaming head
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="another model"):
        other.generate(ids, attention_mask=mask, max_new_tokens=2, accel="duo_attention",
                       accel_kwargs={"pattern": gates})


def test_set_generation_config_composition_round_trip(tmp_path):
    model = tiny_model("llama")
    ids, mask = prompts((20, 11), seed=7)
    hf_accel.set_generation_config(model, ["duo_attention", "aded"], duo_attention=SMALL, aded={"datastore": None})
    model.generation_config.save_pretrained(tmp_path)
    gc = GenerationConfig.from_pretrained(tmp_path)
    assert gc.hf_accel == {"method": ["duo_attention", "aded"], "duo_attention": SMALL, "aded": {"datastore": None}}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert hf_accel.stats(out).method == "duo_attention+aded"
    hf_accel.set_generation_config(model, None)
    duo = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, accel="duo_attention",
                         accel_kwargs=SMALL)
    assert torch.equal(out, duo)


def test_slot_cache_delegates_to_duo_layers():
    """The engine's tree compaction (keep) and row selection reach the per-head layers."""
    from hf_accel.engine.cache import SlotCache

    pattern = torch.tensor([[True, False]])
    cache = DuoCache(pattern, sink=1, recent=2, slack=1)
    b, d = 3, 4
    keys = torch.randn(b, 2, 6, d)
    values = torch.randn(b, 2, 6, d)
    cache.update(keys, values, 0)
    slots = SlotCache(cache, b, "cpu")
    slots.append(torch.ones(b, 6, dtype=torch.bool), torch.arange(6).expand(b, -1))
    layer = cache.layers[0]
    # rows keep different paths among the 4 slots appended from slot 2 (row 2 keeps nothing)
    index = torch.tensor([[0, 2, 3], [0, 1, 0], [0, 0, 0]])
    keep_valid = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    slots.keep(2, index, keep_valid)
    assert layer.length == slots.length == 5
    assert torch.equal(layer.rk[0, 0], keys[0, 0, [0, 1, 2, 4, 5]])
    assert layer.sid.tolist()[0] == [0, 1, 2, -1, 3, 4]  # slot 3 (node 1) dropped, nodes 2, 3 now slots 3, 4
    assert layer.sid.tolist()[1] == [0, 1, 2, 3, -1, -1]
    assert layer.sid.tolist()[2] == [0, 1, -1, -1, -1, -1]
    assert cache_nbytes(cache) == layer.nbytes() == 4 * d * (2 * b * 5 + 2 * b * 6)
    slots.select_rows(torch.tensor([2, 0]))
    assert layer.rk.shape[0] == layer.sk.shape[0] == layer.sid.shape[0] == 2
    assert layer.sid.tolist()[1] == [0, 1, 2, -1, 3, 4]
    assert torch.equal(layer.sk[1, 0], keys[0, 1])  # row 0: its streaming keys, all 6 entries kept in order


# ---- two requests on one model from two threads -------------------------------------------------------------------


def test_forwards_outside_a_duo_request_run_the_original_implementation(models_, monkeypatch):
    """While the model is switched for a duo request, a forward that is not part of one (another thread's request,
    here this thread outside the request) runs the model's own attention function, not duo's."""
    from hf_accel.adapters.duo_attention import SWITCH, duo_request

    calls = []
    original = SWITCH.attention
    monkeypatch.setattr(SWITCH, "attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    for family in ("llama", "gemma2"):  # sdpa and eager originals
        model = models_(family)
        ids, mask = prompts((9, 14), seed=3)
        ref = model(input_ids=ids, attention_mask=mask).logits
        with attention_switched(model):
            assert _impl(model) == ATTN_NAME
            got = model(input_ids=ids, attention_mask=mask).logits
            assert not calls
            with duo_request(model):
                model(input_ids=ids, attention_mask=mask)
            assert calls
        assert torch.equal(got, ref)
        calls.clear()


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager")])
def test_concurrent_requests_match_their_single_threaded_outputs(family, impl):
    """Issue 21 item 1: duo requests next to a plain generate, a plain forward, an engine method and another duo
    request on the same model, each in its own thread, several times over (duo alone on the static engine and composed
    there among them): every output equals the one it gives alone (the plain forward's logits bit for bit, padded
    positions included)."""
    import threading

    model = tiny_model(family)
    model.set_attn_implementation(impl)
    ids, mask = prompts((9, 14), seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    jobs = {
        "plain": lambda: model.generate(ids, **kw),
        "duo-small": lambda: model.generate(ids, accel="duo_attention", accel_kwargs=SMALL, **kw),
        "duo-wide": lambda: model.generate(ids, accel="duo_attention", accel_kwargs=WIDE, **kw),
        "aded": lambda: model.generate(ids, accel="aded", accel_kwargs={"datastore": None}, **kw),
        "forward": lambda: model(input_ids=ids, attention_mask=mask).logits,
        # duo alone on the static engine (the runner a GPU picks) and composed there: each request its own workspace
        "duo-engine": lambda: model.generate(ids, accel="duo_attention", accel_kwargs={**SMALL, "runner": "engine"},
                                             **kw, **STATIC),
        "duo+aded-static": lambda: model.generate(ids, accel=["duo_attention", "aded"], **kw, **STATIC,
                                                  accel_kwargs={"duo_attention": SMALL, "aded": {"datastore": None}}),
    }
    alone = {name: job() for name, job in jobs.items()}
    results = {name: [] for name in jobs}
    errors = []
    start = threading.Barrier(len(jobs))

    def worker(name):
        try:
            start.wait()
            for _ in range(3):
                results[name].append(jobs[name]())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((name, e))

    threads = [threading.Thread(target=worker, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        assert all(torch.equal(o, alone[name]) for o in outs), f"{name} changed next to the other requests"
    assert _impl(model) != ATTN_NAME


# ---- hf-accel bench duo --static ------------------------------------------------------------------------------------


def test_bench_duo_static_variants(tmp_path, word_tokenizer):
    """The cost part times vanilla-static (HF's StaticCache) and duo_attention-static at one fixed cache length per
    context, and duo_attention+aded on the static engine; KV bytes are the fixed buffers' and the ratios against
    vanilla-static are reported."""
    from hf_accel.bench import duo as bench_duo

    texts = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40)) for i in range(6)]
    model = tiny_model("llama")
    sink, recent, new = 4, 8, 6
    res = bench_duo.run(model, word_tokenizer, lengths=(96, 160), depths=(0.5,), samples=1, answer_tokens=3,
                        decode_tokens=new, reps=1, texts=texts, progress=False, with_duo=True, sink=sink,
                        recent=recent, static=True, command="hf-accel bench duo --static test",
                        compose_kwargs={"aded": {"datastore": None}})
    files = bench_duo.write(res, tmp_path)
    assert res["config"]["cost_methods"] == ["vanilla", "duo_attention", "vanilla-static", "duo_attention-static",
                                             "duo_attention+aded-static"]
    assert set(res["retrieval"]["accuracy"]) == {"vanilla", "duo_attention"}
    rows = {(r["length"], r["method"]): r for r in res["cost"]["rows"]}
    d = hf_accel.models.dims(model)
    for length in (96, 160):
        vs, ds = rows[(length, "vanilla-static")], rows[(length, "duo_attention-static")]
        slots = length + new  # the fixed cache length of this context length
        full = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * slots * 4
        assert vs["kv_cache_bytes"] == full
        # default pattern, sparsity 0.5: one retrieval head (all slots) and one streaming head (sink + recent) a layer
        assert ds["kv_cache_bytes"] == 2 * d["layers"] * d["head_dim"] * (slots + sink + recent) * 4
        assert ds["kv_ratio_vs_vanilla_static"] == ds["kv_cache_bytes"] / full < 0.6
        assert vs["decode_speedup_vs_vanilla_static"] == 1.0
        cs = rows[(length, "duo_attention+aded-static")]  # the engine's buffers: prompt + new + its node budget
        assert cs["new_tokens"] == new and cs["kv_cache_bytes"] < cs["full_kv_bytes"]
        assert (vs["runner"], ds["runner"], cs["runner"]) == ("hf", "hf", "engine")  # CPU: duo alone on HF's
        assert "decode_speedup_vs_vanilla_static" in cs  # (a timing: may be None on a tiny CPU run)
    md = (tmp_path / "results.md").read_text()
    assert "decode vs vanilla-static" in md and "duo_attention-static" in md and "duo_attention+aded-static" in md
    assert {f.name for f in files} >= {"results.md", "decode_tok_s.png", "kv_bytes.png"}


def test_static_compiled_chunked_prefill_matches_reference(models_):
    """HF compiles a chunked prefill's forwards too: the cache's allocation and the several-token ring writes stay
    eager inside them (torch.compiler.disable), and the tokens are the reference's."""
    from transformers import CompileConfig

    model = models_("llama")
    ids, mask = prompts((20, 14, 17), seed=4)
    kw = dict(max_new_tokens=8, do_sample=False)
    ref = _reference_generate(model, default_pattern(model, 0.5), SMALL["sink"], SMALL["recent"], ids, mask, **kw)
    cc = CompileConfig(backend="eager", mode=None)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    try:
        out = model.generate(ids, attention_mask=mask, accel="duo_attention", accel_kwargs=SMALL, prefill_chunk_size=6,
                             cache_implementation="static", compile_config=cc, **kw)
    finally:
        model.__dict__.pop("_compiled_call", None)
        model.__dict__.pop("_last_compile_config", None)
        torch._dynamo.reset()
    assert torch.equal(out, ref)
