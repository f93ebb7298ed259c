"""quant_spec: hierarchical speculative decoding (drafter -> intermediate -> target), and the Follower's tree
verification it is built on. Lossless: token-identical to the target's own greedy output on every family, batch 1
and 3 padded, on unquantized targets and on a bitsandbytes 4-bit (NF4) target on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import hf_accel
import hf_accel.integrations.quantization
from hf_accel.engine.adapter import Row
from hf_accel.engine.follower import Follower
from hf_accel.engine.tree import Tree

from conftest import FAMILIES, prompts, tiny_model

NEW = 16
NO_STORE = {"datastore": None}


def _modes(fam):
    """(name, accel_kwargs) of every hierarchy shape; the intermediate 'copy' is the target's twin (same weights:
    long sequences get accepted) and 'draft' a 1-layer model of another seed (most get rejected)."""
    twin = tiny_model(fam, seed=0, layers=3)
    draft = tiny_model(fam, seed=1, layers=1)
    return [
        ("aded>draft>target", dict(draft_model=draft, aded=NO_STORE)),
        ("draft>target (single level)", dict(draft_model=draft, drafter="model", intermediate="none")),
        ("draft>copy>target", dict(draft_model=draft, drafter="model", intermediate=twin, width=3)),
        ("aded>copy>target", dict(intermediate=twin, aded=NO_STORE, k=4)),
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [[11], [12, 7, 9]], ids=["batch1", "batch3-padded"])
def test_token_identical_to_target_greedy(family, lengths):
    target = tiny_model(family, seed=0, layers=3)
    ids, mask = prompts(lengths)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for name, kw in _modes(family):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, accel="quant_spec",
                              accel_kwargs=kw)
        assert torch.equal(out, ref), name
        st = hf_accel.stats(out)
        if "copy" in name:  # the twin intermediate's sequences are the target's own tokens: all accepted
            assert st.tokens_per_forward > 3.0, (name, st.tokens_per_forward)
            assert st.extra["sequence_len"] >= kw.get("k", 6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [[11], [12, 7, 9]], ids=["batch1", "batch3-padded"])
def test_static_engine(family, lengths):
    target = tiny_model(family, seed=0, layers=3)
    ids, mask = prompts(lengths)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    for name, kw in _modes(family):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, accel="quant_spec",
                              accel_kwargs=kw, cache_implementation="static", disable_compile=True)
        assert torch.equal(out, ref), name
        st = hf_accel.stats(out)
        assert st.extra["cache"] == "static" and st.extra["follower_cache"] == "static", name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("lengths", [[11], [12, 7, 9]], ids=["batch1", "batch3-padded"])
def test_bnb_nf4_target_on_cpu(tmp_path, lengths):
    """A 4-bit NF4 target (bitsandbytes, CPU): identical to its own greedy output, with the full-precision copy
    rebuilt from its checkpoint as the intermediate, and with single-level speculation."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_model("llama", seed=0, layers=3, hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    target = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu").eval()
    assert hf_accel.integrations.quantization.is_quantized(target)
    assert type(target.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids, mask = prompts(lengths)
    ref = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    # the quantized target differs from its full-precision self (else the test could not tell them apart)
    full = base.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert not torch.equal(full, ref)
    draft = tiny_model("llama", seed=1, layers=1, hidden_size=64, intermediate_size=128)
    for kw in (dict(aded=NO_STORE, intermediate="full_precision"),
               dict(draft_model=draft, drafter="model"),  # auto: the full-precision copy on a quantized target
               dict(draft_model=draft, drafter="model", intermediate="none")):
        out = target.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, accel="quant_spec",
                              accel_kwargs=kw)
        assert torch.equal(out, ref), kw
    st = hf_accel.stats(out)
    assert st.extra["drafter_forwards"] > 0


def test_sampling_distribution_preserved():
    """Under sampling with processors the target's distribution is kept (two-sample chi-square, as
    test_sampling.py does for the other methods)."""
    from test_sampling import ROWS, V, _chi2_pvalue, _counts, _generate

    model = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    twin = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    draft = tiny_model("llama", seed=5, vocab=V, initializer_range=0.6, layers=1)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    kw = dict(do_sample=True, temperature=0.8, top_k=8)
    ref = _generate(model, prompt, 31, **kw)
    out = _generate(model, prompt, 32, accel="quant_spec",
                    accel_kwargs=dict(draft_model=draft, drafter="model", intermediate=twin, k=3), **kw)
    assert hf_accel.stats(out).accepted_tokens > ROWS // 10
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def _greedy(model, tokens, n):
    """The model's own greedy continuation (full forwards, no cache)."""
    out = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(tokens):]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_follower_verify_tree_is_greedy_continuation(family):
    """verify_tree returns the model's own greedy tokens as far as the tree holds them, plus its next token, for
    rows with different catch-up lengths; a closed section leaves the cache as if nothing was drafted."""
    model = tiny_model(family, seed=0)
    ids, mask = prompts([10, 6])
    rows = [Row(b, ids[b][mask[b].bool()].tolist(), int(mask[b].sum())) for b in range(2)]
    g0, g1 = (_greedy(model, r.tokens, 6) for r in rows)
    other = lambda t: (t + 1) % 90 + 3  # noqa: E731  a token that is not t
    f = Follower(model, 2, torch.device("cpu"), torch.float32)
    # row 0: a wrong sibling first, then the right chain ending in a wrong leaf; row 1: a wrong first child
    t0 = Tree([rows[0].tokens[-1], other(g0[0]), g0[0], g0[1], other(g0[2])], [-1, 0, 0, 2, 3])
    t1 = Tree([rows[1].tokens[-1], other(g1[0]), g1[0]], [-1, 0, 0])
    f.open_section()
    got = f.verify_tree(rows, [t0, t1])
    assert got == [g0[:3], g1[:2]]
    # a second round on top of the uncommitted tokens, then close: back to the committed prompt
    ctx = [Row(b, rows[b].tokens + got[b], rows[b].prompt_len) for b in range(2)]
    got2 = f.verify_tree(ctx, [Tree.root_only(c.tokens[-1]) for c in ctx])
    assert got2 == [g0[3:4], g1[2:3]]
    f.close_section()
    assert f.done == [len(r.tokens) - 1 for r in rows]  # as after run(): the root is fed by the next call
    assert int(f.slots.valid.sum()) == sum(f.done)
    # from the closed section, drafting again gives the same tokens
    assert f.draft(rows, 4) == [g0[:4], g1[:4]]


def test_errors_and_refusals():
    target = tiny_model("llama", seed=0, layers=2)
    other_vocab = tiny_model("llama", seed=1, vocab=50, layers=1)
    ids, mask = prompts([8])
    cases = [
        (dict(drafter="model"), "needs accel_kwargs draft_model"),
        (dict(drafter="tree"), "drafter must be one of"),
        (dict(intermediate="bf16"), "intermediate must be one of"),
        (dict(intermediate="draft_model"), "needs accel_kwargs draft_model"),
        (dict(draft_model=target, drafter="model", intermediate="draft_model"), "can't check its own drafts"),
        (dict(aded=NO_STORE, intermediate="none"), "use accel='aded'"),
        (dict(aded=NO_STORE, intermediate="full_precision"), "not quantized"),
        (dict(aded=NO_STORE), "not quantized"),  # auto without a draft model -> full precision copy
        (dict(draft_model=other_vocab, aded=NO_STORE), "vocabulary"),
        (dict(draft_model=target, k=0), "k must be an integer >= 1"),
        (dict(draft_model=target, aded={"max_nodes": 0}), "max_nodes"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            target.generate(ids, attention_mask=mask, max_new_tokens=4, accel="quant_spec", accel_kwargs=kw)
