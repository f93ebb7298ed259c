"""The user-facing integration: generate(accel=...), GenerationConfig, pipeline, HF options, errors, stats."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    StoppingCriteria,
    StoppingCriteriaList,
    pipeline,
)
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateDecoderOnlyOutput

import hf_accel
from hf_accel import hook
from hf_accel.config import AccelConfig
from hf_accel.engine import SpeculativeAdapter, Tree

from conftest import EOS, PAD, prompts, tiny_model

PROMPT_ONLY = {"datastore": None}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


# ---- no accel: vanilla untouched --------------------------------------------------------------------
def test_without_accel_is_vanilla(model):
    ids, mask = prompts((5, 9))
    wrapped = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    hf_accel.uninstall()
    try:
        assert not getattr(GenerationMixin.generate, "__hf_accel_wrapper__", False)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        plain_dict = model.generate(
            ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True, output_scores=True
        )
    finally:
        hf_accel.install()
    assert GenerationMixin.generate.__hf_accel_wrapper__
    assert torch.equal(wrapped, plain) and type(wrapped) is type(plain)
    wrapped_dict = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, return_dict_in_generate=True, output_scores=True
    )
    assert type(wrapped_dict) is type(plain_dict)
    assert torch.equal(wrapped_dict.sequences, plain_dict.sequences)
    assert not hasattr(wrapped_dict, "accel_stats")


def test_accel_vanilla_aliases(model):
    ids, mask = prompts((7,))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    for off in (False, "none", "vanilla"):
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, accel=off), ref)


# ---- return types and stats -------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_return_dict_scores_and_stats(model, cache):
    ids, mask = prompts((9,), seed=2)
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs=PROMPT_ONLY, **kw, **cache)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    st = hf_accel.stats(out)
    assert st is out.accel_stats
    assert st.method == "aded" and st.new_tokens == 12
    assert st.target_forwards >= 1 and st.tokens_per_forward == pytest.approx(12 / st.target_forwards)
    assert st.draft_seconds >= 0 and st.verify_seconds > 0
    d = st.as_dict()
    for key in ("target_forwards", "tokens_per_forward", "draft_seconds", "verify_seconds"):
        assert key in d


def test_stats_of_tensor_output_and_of_model(model):
    ids, mask = prompts((6,), seed=4)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, accel="aded", accel_kwargs=PROMPT_ONLY)
    assert hf_accel.stats(out).new_tokens == 6
    assert hf_accel.stats(model) is hf_accel.stats(out)
    with pytest.raises(ValueError, match="no hf_accel statistics"):
        hf_accel.stats(torch.zeros(3))


# ---- HF generation options -------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_several_eos_ids(model, cache):
    ids, mask = prompts((5, 11, 8), seed=6)
    ref_free = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    # make two tokens that greedy actually produces into eos ids, so rows stop at different points
    gen = ref_free[:, ids.shape[1] :]
    eos = [EOS, int(gen[0, 3]), int(gen[2, 6])]
    kw = dict(max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs=PROMPT_ONLY, **kw, **cache)
    assert ref.shape[1] < ref_free.shape[1]
    assert torch.equal(out, ref)


class _StopAfter(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids[:, -1] == self.token)


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_custom_stopping_criteria(model, cache):
    ids, mask = prompts((8,), seed=8)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    tok = int(free[0, ids.shape[1] + 5])
    crit = StoppingCriteriaList([_StopAfter(tok)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, stopping_criteria=crit)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, stopping_criteria=crit, accel="aded", accel_kwargs=PROMPT_ONLY,
        **cache,
    )
    assert torch.equal(out, ref) and out.shape[1] <= ids.shape[1] + 6


class _Collect(BaseStreamer):
    def __init__(self):
        self.puts = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_streamer_gets_tokens_as_accepted(model, cache):
    ids, mask = prompts((10,), seed=1)
    ref_s, out_s = _Collect(), _Collect()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, streamer=ref_s)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, streamer=out_s, accel="aded", **cache)
    assert torch.equal(out, ref) and ref_s.ended and out_s.ended
    flat = lambda s: [t for p in s.puts for t in p]  # noqa: E731
    assert flat(out_s) == flat(ref_s)  # prompt first, then every new token, in order
    assert out_s.puts[0] == ids[0].tolist()
    assert len(out_s.puts) == hf_accel.stats(out).target_forwards + 1  # one put per forward, not per token


# ---- GenerationConfig and pipeline -----------------------------------------------------------------
def test_generation_config_selects_method_and_survives_save(model, tmp_path):
    gc = GenerationConfig(max_new_tokens=9, do_sample=False, hf_accel={"method": "aded", "datastore": None})
    ids, mask = prompts((7,), seed=11)
    out = model.generate(ids, attention_mask=mask, generation_config=gc, pad_token_id=PAD)
    assert hf_accel.stats(out).method == "aded"
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False))
    gc.save_pretrained(tmp_path / "gc")
    assert GenerationConfig.from_pretrained(tmp_path / "gc").hf_accel == {"method": "aded", "datastore": None}


def test_model_generation_config_survives_model_save(tmp_path):
    m = tiny_model("qwen2", seed=2)
    m.generation_config._from_model_config = True  # as for models whose generation config came from config.json
    hf_accel.set_generation_config(m, "aded", datastore=None, max_nodes=16)
    m.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m2.generation_config.hf_accel == {"method": "aded", "datastore": None, "max_nodes": 16}
    ids, mask = prompts((6,), seed=1)
    out = m2.generate(ids, attention_mask=mask, max_new_tokens=7)
    assert hf_accel.stats(out).method == "aded"
    # accel=False overrides the saved setting for one call
    out2 = m2.generate(ids, attention_mask=mask, max_new_tokens=7, accel=False)
    assert torch.equal(out, out2)
    with pytest.raises(ValueError, match="JSON"):
        hf_accel.set_generation_config(m2, "aded", datastore=object())


def test_pipeline_at_construction_and_per_call(model, word_tokenizer):
    text = "w5 w6 w7 w5 w6 w7 w5"
    vanilla = pipeline("text-generation", model=model, tokenizer=word_tokenizer)
    ref = vanilla(text, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    built = pipeline(
        "text-generation", model=model, tokenizer=word_tokenizer, accel="aded", accel_kwargs=PROMPT_ONLY
    )
    assert built(text, max_new_tokens=12, do_sample=False)[0]["generated_text"] == ref
    assert hf_accel.stats(model).method == "aded"
    per_call = vanilla(text, max_new_tokens=12, do_sample=False, accel="aded", accel_kwargs=PROMPT_ONLY)
    assert per_call[0]["generated_text"] == ref


# ---- errors: one clear ValueError naming the fix, model untouched ----------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(accel="no_such_method"), r"unknown hf_accel method 'no_such_method'.*aded"),
        (dict(accel="aded", num_beams=2), r"num_beams"),
        (dict(accel="aded", cache_implementation="offloaded_static"), r"cache_implementation='static'"),
        (dict(accel="aded", accel_kwargs={"nodes": 3}), r"unknown accel_kwargs \['nodes'\]"),
        (dict(accel="aded", accel_kwargs={"search": "bfs"}), r"search must be"),
        (dict(accel="aded", accel_kwargs={"datastore": "/nonexistent/store.safetensors"}), r"datastore build"),
        (dict(accel_kwargs={"max_nodes": 3}), r"without accel"),
        (dict(accel={"max_nodes": 3}), r"names no method"),
        (dict(accel="aded", prompt_lookup_num_tokens=3), r"prompt_lookup"),
    ],
)
def test_errors_leave_model_unchanged(model, kwargs, match):
    ids, mask = prompts((6,), seed=12)
    before = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    sd, mods = _state(model)
    gc = copy.deepcopy(model.generation_config.to_dict())
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs)
    assert model.generation_config.to_dict() == gc
    sd2, mods2 = _state(model)
    assert mods2 == mods and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6), before)


def test_assistant_model_refused(model):
    ids, mask = prompts((6,))
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="aded", assistant_model=tiny_model("llama"))


def test_encoder_decoder_refused():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model(
        "t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    t5 = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="encoder-decoder"):
        t5.generate(ids, max_new_tokens=3, accel="aded")
    assert t5.generate(ids, max_new_tokens=3).shape[0] == 1


def test_missing_required_kwargs_named():
    from dataclasses import dataclass

    @dataclass
    class NeedsHeads(AccelConfig):
        heads: str

    class _Probe(SpeculativeAdapter):
        Config = NeedsHeads

        def draft(self, state, rows):
            return [None if r is None else Tree.root_only(r.tokens[-1]) for r in rows]

    hf_accel.register("_probe_required")(_Probe)
    try:
        m = tiny_model("gpt2")
        ids, mask = prompts((5,))
        with pytest.raises(ValueError, match=r"needs accel_kwargs \['heads'\]"):
            m.generate(ids, attention_mask=mask, max_new_tokens=3, accel="_probe_required")
        out = m.generate(
            ids, attention_mask=mask, max_new_tokens=5, accel="_probe_required", accel_kwargs={"heads": "x"}
        )
        assert torch.equal(out, m.generate(ids, attention_mask=mask, max_new_tokens=5))
        assert hf_accel.stats(out).tokens_per_forward == pytest.approx(1.0)
    finally:
        hf_accel.registry._ADAPTERS.pop("_probe_required", None)


def test_per_request_state_is_not_shared(model):
    """Two requests in a row give the same result as each alone: the overlay belongs to the request."""
    ids_a, mask_a = prompts((9,), seed=21)
    ids_b, mask_b = prompts((9,), seed=22)
    kw = dict(max_new_tokens=16, accel="aded", accel_kwargs=PROMPT_ONLY)
    b_alone = model.generate(ids_b, attention_mask=mask_b, **kw)
    st_alone = hf_accel.stats(b_alone).target_forwards
    model.generate(ids_a, attention_mask=mask_a, **kw)
    b_after = model.generate(ids_b, attention_mask=mask_b, **kw)
    assert torch.equal(b_alone, b_after)
    assert hf_accel.stats(b_after).target_forwards == st_alone
    assert not any(k.startswith("_hf_accel") for k in vars(model))
    assert hook._ORIGINAL is not None


def test_static_cache_object_refused(model):
    from transformers import StaticCache

    ids, mask = prompts((6,), seed=12)
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="cache_implementation='static' instead"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, past_key_values=cache, accel="aded")
    with pytest.raises(ValueError, match="cache_implementation='static' instead"):  # the name transformers 5.24 uses
        model.generate(ids, attention_mask=mask, max_new_tokens=4, cache=cache, accel="aded")


def test_static_workspaces_are_reused_never_shared(model):
    """Buffers/graphs are kept per shape for later calls, but a workspace in use is never handed out again,
    and a free one with more slots serves a smaller request."""
    from hf_accel import models
    from hf_accel.engine import backends

    layout = models.attention_layout(model)
    args = (layout, 1, 8)
    try:
        a = backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True)
        b = backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True)
        assert a is not b  # a is in use
        a.in_use = b.in_use = False
        assert backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True) is a
        a.in_use = False
        big = backends._acquire(model, *args, 1024, model.device, torch.float32, None, reuse=True)
        big.in_use = False
        a.in_use = b.in_use = True  # (b was kept too, as a copy of a's key: made while a was in use)
        assert backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True) is big
        big.in_use = a.in_use = b.in_use = False
        a.in_use = True  # a free copy of the key is preferred to a bigger workspace (fewer slots to attend over)
        assert backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True) is b
        a.in_use = b.in_use = False
        # weights replaced by new tensors: graphs captured on the old addresses must not be reused
        w = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(w.detach().clone())
        try:
            assert backends._acquire(model, *args, 512, model.device, torch.float32, None, reuse=True) is not a
        finally:
            model.lm_head.weight = w
    finally:
        hf_accel.release_workspaces(model)
    assert model not in backends._WORKSPACES


def test_static_workspaces_survive_interleaved_methods(model, monkeypatch):
    """Several +static methods interleaved per prompt (a benchmark: each its own workspace key) each find their
    workspace (and its captured graphs) again on the next prompt; least recently used is evicted first, and the
    byte cap on KV buffers holds."""
    from hf_accel import models
    from hf_accel.engine import backends

    layout = models.attention_layout(model)
    hf_accel.release_workspaces(model)
    try:
        def get(nodes):
            ws = backends._acquire(model, layout, 1, nodes, 512, model.device, torch.float32, None, reuse=True)
            ws.in_use = False
            return ws

        widths = list(range(1, 9))  # 8 methods, more than the old cap of 4
        first = {n: get(n) for n in widths}
        for _ in range(2):
            for n in widths:
                assert get(n) is first[n], f"workspace of node budget {n} was evicted between calls"
        monkeypatch.setattr(backends, "_KEEP", 3)
        get(1), get(2)  # 1 and 2 most recently used...
        get(9)  # ... so a new key evicts the least recently used (3..8), never 1, 2 or itself
        pool = {k[1] for k in backends._WORKSPACES[model] if k != "__weights__"}
        assert pool == {1, 2, 9}
        first[1].cache.layers[0].lazy_initialization(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))
        monkeypatch.setattr(backends, "_KEEP_BYTES", 1)  # over the byte cap: the one holding KV buffers goes
        get(10)
        assert {k[1] for k in backends._WORKSPACES[model] if k != "__weights__"} == {2, 9, 10}
    finally:
        hf_accel.release_workspaces(model)


def test_static_workspace_reserved_for_the_whole_request(model, monkeypatch):
    """The workspace stays in use from prefill to the last verify, and is freed when generate returns."""
    from hf_accel.engine import backends

    seen = []
    orig = backends.StaticBackend.verify

    def verify(self, packed, q_pos, **kw):
        seen.append(self.ws.in_use)
        seen_ws.append(self.ws)
        return orig(self, packed, q_pos, **kw)

    seen_ws = []
    monkeypatch.setattr(backends.StaticBackend, "verify", verify)
    ids, mask = prompts((7,), seed=3)
    model.generate(ids, attention_mask=mask, max_new_tokens=10, accel="aded", accel_kwargs=PROMPT_ONLY,
                   cache_implementation="static")
    assert seen and all(seen) and not seen_ws[-1].in_use
