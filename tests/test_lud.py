"""LUD on the family matrix: lossless mode identical to greedy, lossy placeholders equal the training construction,
forced chains in the engine, artifacts, training, errors."""

from __future__ import annotations

import json

import pytest
import torch

import hf_accel
from hf_accel import models
from hf_accel.integrations import artifacts
from hf_accel.adapters.lud import LUD, LUDLoRA
from hf_accel.engine.tree import Tree
from hf_accel.engine.verify import greedy_walk
from hf_accel.train import lud as lud_train
from hf_accel.train.data import anchored_chains
from hf_accel.train.loop import fit

from conftest import FAMILIES, PAD, prompts, tiny_model, train_seqs

PH = 3  # placeholder token of the tiny models


def _lora(model, seed=0, k=4, targets="layers"):
    torch.manual_seed(seed)
    lora = LUDLoRA(model, placeholder_id=PH, k=k, rank=4, targets=targets)
    with torch.no_grad():
        for b in lora.B:
            b.normal_(std=0.5)  # placeholder predictions that differ from the base model's
    return lora


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(9,), (12, 5, 8)], ids=["batch1", "batch3-padded"])
def test_lossless_mode_identical_to_greedy(family, lengths):
    model = tiny_model(family)
    ids, attn = prompts(lengths, seed=1)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lud",
                         accel_kwargs={"adapter": _lora(model), "lossless": True, "beta": 0.0})
    assert torch.equal(out, ref)
    assert hf_accel.stats(out).drafted_tokens > 0


@pytest.mark.parametrize("family,targets", [("llama", "layers"), ("qwen2", "layers"), ("gemma2", "layers"),
                                            ("gpt2", "layers"), ("opt", "layers"), ("llama", "projections"),
                                            ("gpt2", "projections"), ("opt", "projections")])
def test_lossy_placeholders_equal_the_training_construction(family, targets, monkeypatch):
    """Every step's accepted extra tokens are the argmax of placeholder chains built as in training (anchored at
    the step's root): positions, masks and the position-masked LoRA agree between decoding and training."""
    model = tiny_model(family)
    lora = _lora(model, targets=targets)
    steps = []
    orig = LUD.verified

    def spy(self, state, row, tree, path, new_tokens, step, b):
        orig(self, state, row, tree, path, new_tokens, step, b)
        steps.append((len(row.tokens) - 2, list(state[b].extra)))  # root's position, extras proposed

    monkeypatch.setattr(LUD, "verified", spy)
    ids, attn = prompts((10,), seed=2)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False, accel="lud",
                         accel_kwargs={"adapter": lora, "beta": 0.0, "guard": False})
    st = hf_accel.stats(out)
    assert st.tokens_per_forward > 2.0  # beta 0: all k-1 placeholder predictions are taken
    full = torch.ones_like(out)
    at = torch.tensor([[p for p, _ in steps]])
    tokens, pos, masks, _, _ = anchored_chains(out, full, at.shape[1], 3, 0, models.attention_layout(model),
                                               torch.float32, fill=PH, at=at)
    where = torch.zeros(tokens.shape, dtype=torch.bool)
    where[:, out.shape[1]:] = True
    with torch.no_grad(), lora.applied(where):
        pred = model(input_ids=tokens, attention_mask=masks, position_ids=pos).logits[0, out.shape[1]:].argmax(-1)
    pred = pred.view(len(steps), 3).tolist()
    assert sum(bool(e) for _, e in steps) >= len(steps) - 1  # only the step that ended the row proposes nothing
    for (p, extra), row in zip(steps, pred):
        if not extra:
            continue
        assert extra == row
        # the extras are committed right after the step's own token, in order
        n = min(len(extra), out.shape[1] - (p + 2))
        assert out[0, p + 2 : p + 2 + n].tolist() == extra[:n]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_projection_lora_lossless(family):
    model = tiny_model(family)
    ids, attn = prompts((12, 5, 8), seed=1)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lud",
                         accel_kwargs={"adapter": _lora(model, targets="projections"), "lossless": True, "beta": 0.0})
    assert torch.equal(out, ref)


def test_lossy_rows_of_a_batch_match_their_single_runs():
    model = tiny_model("llama")
    lora = _lora(model)
    ids, attn = prompts((12, 5, 8), seed=3)
    kw = dict(max_new_tokens=14, do_sample=False, accel="lud", accel_kwargs={"adapter": lora, "beta": 0.3})
    out = model.generate(ids, attention_mask=attn, **kw)
    for b in range(3):
        n = int(attn[b].sum())
        one = model.generate(ids[b : b + 1, -n:], attention_mask=attn[b : b + 1, -n:], **kw)
        assert out[b, ids.shape[1]:].tolist()[: one.shape[1] - n] == one[0, n:].tolist()


def test_high_beta_accepts_nothing_extra():
    model = tiny_model("qwen3")
    ids, attn = prompts((9, 6), seed=4)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False, accel="lud",
                         accel_kwargs={"adapter": _lora(model), "beta": 1.0})
    assert torch.equal(out, ref) and hf_accel.stats(out).accepted_tokens == 0


def test_forced_chain_is_accepted_whatever_the_model_says():
    tree = Tree([5, 6, 7, 3, 3], [-1, 0, 1, 2, 3], n_real=3, forced=2)
    path, bonus = greedy_walk(tree, [9, 9, 4, 8, 8])
    assert path == [0, 1, 2] and bonus == 4
    with pytest.raises(ValueError, match="forced nodes must be a chain"):
        Tree([5, 6, 7], [-1, 0, 0], forced=2)


def test_lud_errors_name_the_fix(tmp_path):
    model = tiny_model("llama")
    ids, attn = prompts([6])
    with pytest.raises(ValueError, match="hf-accel train lud"):
        model.generate(ids, attention_mask=attn, accel="lud")
    lora = _lora(model)
    with pytest.raises(ValueError, match="static engine"):
        model.generate(ids, attention_mask=attn, accel="lud", accel_kwargs={"adapter": lora},
                       cache_implementation="static")
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        model.generate(ids, attention_mask=attn, accel="lud", accel_kwargs={"adapter": lora, "k": 1})
    _lora(tiny_model("phi3")).save_pretrained(tmp_path / "other")
    with pytest.raises(artifacts.ArtifactError, match="another base model"):
        model.generate(ids, attention_mask=attn, accel="lud", accel_kwargs={"adapter": str(tmp_path / "other")})
    # the LoRA hooks are gone after a request, and after an error
    assert not any(m._forward_hooks for _, m in models.projections(model))


def test_artifact_round_trip(tmp_path):
    model = tiny_model("gemma2", seed=3)
    lora = _lora(model, seed=2)
    lora.save_pretrained(tmp_path / "lud", metrics={"x": 1}, command="test")
    meta = json.loads((tmp_path / "lud" / "config.json").read_text())
    assert meta["kind"] == "lud" and meta["settings"]["placeholder_id"] == PH and meta["settings"]["k"] == 4
    loaded = LUDLoRA.from_pretrained(tmp_path / "lud", model)
    saved = {k: v.to(torch.bfloat16).float() for k, v in lora.state_dict().items()}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    ids, attn = prompts((7, 11), seed=3)
    kw = dict(attention_mask=attn, max_new_tokens=12, do_sample=False, accel="lud")
    a = model.generate(ids, accel_kwargs={"adapter": loaded, "beta": 0.2}, **kw)
    b = model.generate(ids, accel_kwargs={"adapter": str(tmp_path / "lud"), "beta": 0.2}, **kw)
    assert torch.equal(a, b)


def test_training_learns_unit_continuations(tmp_path):
    """Repetitive sequences are all lexical units for a model that has seen them: the placeholder loss falls."""
    model = tiny_model("llama").requires_grad_(False)
    torch.manual_seed(0)
    lora = LUDLoRA(model, placeholder_id=PH, k=3, rank=16)
    loss_fn = lud_train.make_loss(lora, model, alpha=0.0, anchors=6)  # alpha 0: every target counts
    seqs = train_seqs()
    before = fit(lora, loss_fn, seqs[:20], seqs[:4], tmp_path, max_steps=0, batch=4, seq_len=64, progress=False,
                 pad=PAD)
    after = fit(lora, loss_fn, seqs[:20], seqs[:4], tmp_path, max_steps=60, batch=4, seq_len=64, lr=3e-2,
                eval_every=20, progress=False, pad=PAD)
    assert after["heldout"]["loss"] < 0.8 * before["heldout"]["loss"]
    assert after["heldout"]["unit_tokens"] > 0.9


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_trained_projection_lora_exports_to_the_same_adapter(family, tmp_path):
    """`hf-accel train lud --targets projections` trains peft LoRA layers (masked to placeholders); the exported
    LUDLoRA gives the same logits through its own hooks, on a clean model, and decodes losslessly."""
    pytest.importorskip("peft")
    from hf_accel.train.lud import PeftLUD

    model = tiny_model(family).requires_grad_(False)
    clean = tiny_model(family)
    torch.manual_seed(0)
    peft_part = PeftLUD(model, placeholder_id=PH, k=3, rank=4)
    loss_fn = lud_train.make_loss(peft_part, model, alpha=0.0, anchors=4)
    fit(peft_part, loss_fn, train_seqs()[:8], train_seqs()[:2], tmp_path, max_steps=5, batch=4, seq_len=48, lr=1e-2,
        progress=False, pad=PAD)
    assert any(float(b.weight.detach().abs().sum()) > 0 for _, b in peft_part.pairs)  # it trained
    peft_part.save_pretrained(tmp_path / "lud")
    exported = LUDLoRA.from_pretrained(tmp_path / "lud", clean)
    assert exported.targets == "projections"
    ids = torch.tensor([[5, 9, 11, 7, 5, 9, 11, PH, PH]])
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[:, -2:] = True
    with torch.no_grad(), peft_part.applied(where):
        a = model(ids).logits
    with torch.no_grad(), exported.applied(where):
        b = clean(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=5e-2)  # the artifact is stored in bf16
    with torch.no_grad():
        torch.testing.assert_close(a[:, :-2], clean(ids).logits[:, :-2])  # real positions: the base model
    x, attn = prompts((9, 6), seed=5)
    ref = clean.generate(x, attention_mask=attn, max_new_tokens=10, do_sample=False)
    out = clean.generate(x, attention_mask=attn, max_new_tokens=10, do_sample=False, accel="lud",
                         accel_kwargs={"adapter": exported, "lossless": True, "beta": 0.0})
    assert torch.equal(out, ref)
