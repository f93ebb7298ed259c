"""EAD on the family matrix: the switching rule against a step-by-step reference, catch-up through forced chains
(identical output when the small model is the large one), errors."""

from __future__ import annotations

from collections import deque

import pytest
import torch

import hf_accel
from hf_accel.adapters.ead import entropy_bits

from conftest import EOS, FAMILIES, prompts, tiny_model


def _entropy_quantile(model, ids, q):
    """A threshold at quantile q of the model's next-token entropies along its own greedy output (so that both
    switching directions happen in a short test)."""
    seq = model.generate(ids[:1], max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        logits = model(seq).logits[0, ids.shape[1] - 1 :]
    return float(torch.tensor([entropy_bits(x) for x in logits]).quantile(q))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(9,), (12, 5, 8)], ids=["batch1", "batch3-padded"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_small_model_equal_to_large_gives_greedy(family, lengths, cache):
    """Both models' KV caches follow the tokens the other produced (follower catch-up, forced chains in the
    engine): with the large model as its own small model the output is vanilla greedy, whoever produced each token.
    On the static engine both models run on static slots (the small one through the static follower)."""
    model = tiny_model(family)
    ids, attn = prompts(lengths, seed=1)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False)
    tau = _entropy_quantile(model, ids[-1:], 0.5)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False, accel="ead",
                         accel_kwargs={"small_model": model, "threshold": tau, "min_run": 2, "window": 2,
                                       "max_small_run": 8}, cache_implementation=cache)
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert st.extra["cache"] == st.extra["small_cache"] == (cache or "dynamic")
    assert st.extra["switches"] >= 2 and 0 < st.extra["large_share"] < 1 and st.extra["small_forwards"] > 0
    # the small model is the large one here (parameter ratio 1): its tokens cost as much, so nothing is saved
    assert st.extra["small_param_ratio"] == 1.0
    assert st.extra["est_flops_saved"] < 1 - st.extra["large_compute_ratio"] and st.extra["est_flops_saved"] <= 0


def _reference(large, small, prompt, n, tau, window, min_run):
    """EAD step by step, every forward over the whole sequence (no cache)."""
    seq, small_on, run, win, out = list(prompt), False, 0, deque(maxlen=window), []
    for _ in range(n):
        with torch.no_grad():
            logits = (small if small_on else large)(torch.tensor([seq])).logits[0, -1]
        tok = int(logits.argmax())
        seq.append(tok)
        out.append(tok)
        if tok == EOS:
            break
        if not out[:-1]:  # the first token: the large model's prefill, no entropy recorded
            run = 1
            continue
        win.append(entropy_bits(logits))
        run += 1
        mean = sum(win) / len(win)
        if small_on and run >= min_run and mean > tau:
            small_on, run = False, 0
        elif not small_on and run >= min_run and mean <= tau:
            small_on, run = True, 0
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("q", [0.3, 0.6])
def test_switching_follows_the_rule(family, q):
    large = tiny_model(family, seed=0)
    small = tiny_model(family, seed=7)
    ids, attn = prompts((10,), seed=2)
    tau = _entropy_quantile(large, ids, q)
    kw = {"small_model": small, "threshold": tau, "window": 3, "min_run": 2}
    out = large.generate(ids, attention_mask=attn, max_new_tokens=24, do_sample=False, accel="ead", accel_kwargs=kw)
    ref = _reference(large, small, ids[0].tolist(), 24, tau, 3, 2)
    assert out[0, ids.shape[1]:].tolist()[: len(ref)] == ref
    static = large.generate(ids, attention_mask=attn, max_new_tokens=24, do_sample=False, accel="ead",
                            accel_kwargs=kw, cache_implementation="static")
    assert torch.equal(static, out)
    st = hf_accel.stats(out)
    assert st.extra["switches"] >= 1


def test_never_handing_over_is_the_large_model():
    model = tiny_model("qwen3")
    ids, attn = prompts((9, 6), seed=3)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False, accel="ead",
                         accel_kwargs={"small_model": tiny_model("qwen3", seed=4), "threshold": -1.0})
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert st.extra["large_share"] == 1.0 and st.extra["small_forwards"] == 0
    assert st.extra["est_flops_saved"] == pytest.approx(1 - st.extra["large_compute_ratio"])


def test_ead_errors_name_the_fix():
    model = tiny_model("llama")
    ids, attn = prompts([6])
    with pytest.raises(ValueError, match="needs a small model"):
        model.generate(ids, attention_mask=attn, accel="ead")
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids, attention_mask=attn, accel="ead", accel_kwargs={"small_model": tiny_model("llama", vocab=64)})
    with pytest.raises(ValueError, match="min_run must be an integer >= 1"):
        model.generate(ids, attention_mask=attn, accel="ead", accel_kwargs={"small_model": model, "min_run": 0})
