"""ADED on the family matrix beyond identity (which tests/test_conformance.py checks for every method): drafts get
accepted, logits processors that read the context, the static verify step under torch.compile."""

from __future__ import annotations

import pytest
import torch

import hf_accel
from hf_accel.data.trigram import TrigramStore

from conftest import FAMILIES, prompts, tiny_model


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
