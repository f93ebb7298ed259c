"""Every lossless method x family x {batch 1, batch 3 padded} x {dynamic cache, static cache (graphs off on CPU)}:
token-identical to vanilla greedy in float32."""

from __future__ import annotations

import pytest
import torch

import hf_accel
from hf_accel.data.trigram import TrigramStore

from conftest import FAMILIES, prompts, tiny_model

# (method, accel_kwargs) for every lossless method; datastore-backed and prompt-only ADED, both searches
LOSSLESS = [
    ("aded", {"datastore": None}),
    ("aded", {"datastore": "store", "search": "mcts", "mcts_iterations": 40, "max_nodes": 12}),
]


def _store_for(model):
    """A small datastore from the model's own sampled text: realistic drafts, partly right, partly wrong."""
    torch.manual_seed(1)
    ids, mask = prompts([6, 9], seed=5)
    out = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=40, top_k=8)
    return TrigramStore.from_token_docs([r.tolist() for r in out], vocab_size=model.config.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(11,), (5, 13, 9)], ids=["batch1", "batch3"])
@pytest.mark.parametrize("method,kwargs", LOSSLESS, ids=["aded-prompt", "aded-store-mcts"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_identical_to_greedy(family, lengths, method, kwargs, cache):
    model = tiny_model(family)
    kwargs = dict(kwargs)
    if kwargs.get("datastore") == "store":
        kwargs["datastore"] = _store_for(model)
    ids, mask = prompts(lengths, seed=len(lengths))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, accel=method, accel_kwargs=kwargs, **extra
    )
    assert out.shape == ref.shape
    assert torch.equal(out, ref), f"{family}: accel output differs from vanilla greedy"
    st = hf_accel.stats(out)
    assert st.method == method and st.steps > 0  # the engine ran its verify loop
    assert st.extra["cache"] == cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_drafts_get_accepted(family, cache):
    """A datastore built from the model's own greedy output makes drafts right: > 1 token per forward. (A fixed
    budget: the "auto" default chooses from this machine's timings, and may rightly pick one-token steps here.)"""
    model = tiny_model(family)
    ids, mask = prompts((5, 13, 9), seed=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    store = TrigramStore.from_token_docs([r.tolist() for r in ref], vocab_size=model.config.vocab_size)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, accel="aded",
        accel_kwargs={"datastore": store, "max_nodes": 64}, **extra,
    )
    assert torch.equal(out, ref)
    assert hf_accel.stats(out).tokens_per_forward > 1.5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_greedy_with_logits_processors(family, cache):
    """Processors that read the context (repetition penalty, no-repeat n-grams) see each tree node's context."""
    model = tiny_model(family)
    ids, mask = prompts((5, 12), seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=3)
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs={"datastore": None}, **kw, **cache)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_static_verify_step_traces_under_torch_compile(family, monkeypatch):
    """The static engine's verify step goes through torch.compile (dynamo + AOT, no inductor on CPU) and stays
    identical: what the GPU path compiles and captures is traceable on this transformers version."""
    from transformers import CompileConfig

    from hf_accel.engine import backends

    fn = backends._compiled_verify(backends.compile_options(CompileConfig(backend="aot_eager")))
    orig = backends._Workspace.verify_step
    monkeypatch.setattr(backends._Workspace, "verify_step", lambda self, f=None: orig(self, fn))
    model = tiny_model(family)
    ids, mask = prompts((5, 12), seed=7)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": None, "max_nodes": 8}, cache_implementation="static")
    assert torch.equal(out, ref)
