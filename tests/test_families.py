"""Every lossless method x family x {batch 1, batch 3 padded}: token-identical to vanilla greedy in float32."""

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
def test_identical_to_greedy(family, lengths, method, kwargs):
    model = tiny_model(family)
    kwargs = dict(kwargs)
    if kwargs.get("datastore") == "store":
        kwargs["datastore"] = _store_for(model)
    ids, mask = prompts(lengths, seed=len(lengths))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, accel=method, accel_kwargs=kwargs)
    assert out.shape == ref.shape
    assert torch.equal(out, ref), f"{family}: accel output differs from vanilla greedy"
    st = hf_accel.stats(out)
    assert st.method == method and st.steps > 0  # the engine ran its verify loop


@pytest.mark.parametrize("family", FAMILIES)
def test_drafts_get_accepted(family):
    """A datastore built from the model's own greedy output makes drafts right: > 1 token per forward."""
    model = tiny_model(family)
    ids, mask = prompts((5, 13, 9), seed=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    store = TrigramStore.from_token_docs([r.tolist() for r in ref], vocab_size=model.config.vocab_size)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, accel="aded", accel_kwargs={"datastore": store}
    )
    assert torch.equal(out, ref)
    assert hf_accel.stats(out).tokens_per_forward > 1.5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_greedy_with_logits_processors(family):
    """Processors that read the context (repetition penalty, no-repeat n-grams) see each tree node's context."""
    model = tiny_model(family)
    ids, mask = prompts((5, 12), seed=7)
    kw = dict(max_new_tokens=25, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=3)
    ref = model.generate(ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs={"datastore": None}, **kw)
    assert torch.equal(out, ref)
