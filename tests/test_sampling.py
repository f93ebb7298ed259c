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
    [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.9, repetition_penalty=1.3)],
    ids=["plain", "temp-topk", "topp-reppen"],
)
def test_sampling_distribution_matches_vanilla(setup, processors):
    model, prompt, store = setup
    kw = dict(do_sample=True, **processors)
    ref = _generate(model, prompt, 123, **kw)
    out = _generate(model, prompt, 456, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8}, **kw)
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
