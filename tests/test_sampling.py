"""Under sampling, accel preserves vanilla's distribution (two-sample chi-square over many seeded rows)."""

from __future__ import annotations

import pytest
import torch

import hf_accel
from hf_accel.data.trigram import TrigramStore

from conftest import tiny_model

V = 12
ROWS = 1200


def _chi2_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square test of homogeneity on category counts a, b (same support)."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = (((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def _counts(seqs: torch.Tensor, plen: int, steps: int) -> list:
    gen = seqs[:, plen : plen + steps]
    marg = [torch.bincount(gen[:, i], minlength=V) for i in range(steps)]
    pair = torch.bincount(gen[:, 0] * V + gen[:, 1], minlength=V * V)
    return marg + [pair]


def _generate(model, prompt, seed, **kw):
    torch.manual_seed(seed)
    ids = prompt.expand(ROWS, -1).contiguous()
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, **kw)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    # a datastore from the model's own samples makes many drafts right, so the tree walk is exercised
    torch.manual_seed(0)
    sample = model.generate(prompt.expand(40, -1), do_sample=True, max_new_tokens=8, min_new_tokens=8)
    store = TrigramStore.from_token_docs([r.tolist() for r in sample], vocab_size=V)
    return model, prompt, store


@pytest.mark.parametrize(
    "processors",
    [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.9, repetition_penalty=1.3),
     dict(temperature=0.7, top_k=6, cache_implementation="static")],
    ids=["plain", "temp-topk", "topp-reppen", "temp-topk-static-cache"],
)
def test_sampling_distribution_matches_vanilla(setup, processors):
    model, prompt, store = setup
    kw = dict(do_sample=True, **processors)
    cache = {"cache_implementation": kw.pop("cache_implementation")} if "cache_implementation" in kw else {}
    ref = _generate(model, prompt, 123, **kw)
    out = _generate(model, prompt, 456, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8}, **kw, **cache)
    st = hf_accel.stats(out)
    assert st.accepted_tokens > ROWS // 4  # drafts were accepted often enough to matter
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def test_chi_square_detects_a_different_distribution(setup):
    """The check above has power: a different temperature is rejected."""
    model, prompt, store = setup
    ref = _generate(model, prompt, 1, do_sample=True)
    hot = _generate(model, prompt, 2, do_sample=True, temperature=1.6, accel="aded", accel_kwargs={"datastore": store})
    pvals = [_chi2_pvalue(a, b) for a, b in zip(_counts(ref, 8, 3), _counts(hot, 8, 3))]
    assert min(pvals) < 1e-3


class _RandomChain(hf_accel.SpeculativeAdapter):
    """Drafts a 3-token chain sampled from a fixed distribution q and hands q to the engine."""

    from dataclasses import dataclass as _dc

    @_dc
    class Config(hf_accel.AccelConfig):
        pass

    def draft(self, state, rows):
        q = torch.softmax(torch.arange(V, dtype=torch.float32) / 4.0, dim=0)
        out = []
        for r in rows:
            if r is None:
                out.append(None)
                continue
            toks = torch.multinomial(q, 3, replacement=True).tolist()
            out.append(hf_accel.Tree.chain(r.tokens[-1], toks, draft_probs=q.expand(3, -1)))
        return out


def test_speculative_sampling_of_chains_with_draft_probs(setup):
    """Chains that carry draft distributions go through speculative sampling: distribution preserved."""
    model, prompt, _ = setup
    hf_accel.register("_random_chain")(_RandomChain)
    try:
        ref = _generate(model, prompt, 11, do_sample=True)
        out = _generate(model, prompt, 12, do_sample=True, accel="_random_chain")
        st = hf_accel.stats(out)
        assert 0 < st.accepted_tokens < st.drafted_tokens  # some drafts accepted, some rejected
        for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
            assert _chi2_pvalue(ca, cb) > 1e-3
    finally:
        hf_accel.registry._ADAPTERS.pop("_random_chain", None)


@pytest.mark.parametrize("method", ["clover", "hidden_transfer", "m2r2", "lud"])
def test_trained_heads_sampling_distribution(setup, method):
    """Clover / hidden-transfer trees and M2R2 self-speculative chains (random parts) under sampling with
    processors: distribution preserved."""
    from hf_accel.adapters.clover import CloverHeads
    from hf_accel.adapters.hidden_transfer import TransferMaps
    from hf_accel.adapters.lud import LUDLoRA
    from hf_accel.adapters.m2r2 import RateResiduals

    model, prompt, _ = setup
    torch.manual_seed(0)
    extra = {}
    if method == "m2r2":
        part, key = RateResiduals(model, exit_layer=1, rank=4), "adapter"
    elif method == "lud":  # lossless mode: the placeholder drafts are verified
        part, key, extra = LUDLoRA(model, placeholder_id=0, k=3, rank=4), "adapter", {"lossless": True, "beta": 0.0}
    else:
        part, key = (CloverHeads(model, depth=2) if method == "clover" else TransferMaps(model, k=2)), "heads"
    kw = dict(do_sample=True, temperature=0.8, top_k=8)
    ref = _generate(model, prompt, 21, **kw)
    out = _generate(model, prompt, 22, accel=method, accel_kwargs={key: part, **extra}, **kw)
    st = hf_accel.stats(out)
    # random parts: drafts are accepted often enough to exercise the acceptance path (LUD's untrained
    # placeholders less often: 3 tokens leave it one drafting step)
    assert st.accepted_tokens > (ROWS // 40 if method == "lud" else ROWS // 10)
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3
