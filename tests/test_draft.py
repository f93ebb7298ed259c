"""`hf-accel train draft`: the shallow draft model builder and its distillation loss, on the family matrix."""

from __future__ import annotations

import json

import pytest
import torch

import hf_accel
from hf_accel import models
from hf_accel.train import draft as draft_train
from hf_accel.train.loop import fit

from conftest import FAMILIES, PAD, prompts, tiny_model, train_seqs


def _model(family, seed=0, layers=4):
    return tiny_model(family, seed=seed, layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_layer_rebuilds_the_target(family):
    """With all layers kept the copy is the target (weights, per-layer types, masks): the builder maps every
    tensor to the right place."""
    model = _model(family)
    ids, attn = prompts((12, 5, 8), seed=1)
    copy = draft_train.shallow_copy(model, 4)
    with torch.no_grad():
        torch.testing.assert_close(copy(ids, attention_mask=attn).logits, model(ids, attention_mask=attn).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt"])
def test_shallow_copy_keeps_first_and_last_layers(family):
    model = _model(family, layers=6)
    small = draft_train.shallow_copy(model, 3)
    assert len(models.layers(small)) == 3 and draft_train.kept_layers(6, 3) == [0, 2, 5]
    big, mine = models.layers(model), models.layers(small)
    keep = draft_train.kept_layers(6, 3)
    for j, i in enumerate(keep):
        for (_, a), (_, b) in zip(mine[j].state_dict().items(), big[i].state_dict().items()):
            assert torch.equal(a, b)
    ids, attn = prompts((9, 6), seed=2)
    out = small.generate(ids, attention_mask=attn, max_new_tokens=5, do_sample=False)  # a working model
    assert out.shape[1] == ids.shape[1] + 5
    with pytest.raises(ValueError, match="needs 1..6 layers"):
        draft_train.shallow_copy(model, 7)


def test_distillation_raises_agreement(tmp_path):
    model = _model("llama").requires_grad_(False)
    torch.manual_seed(0)
    small = draft_train.shallow_copy(model, 1).requires_grad_(True)
    loss_fn = draft_train.make_loss(small, model)
    seqs = train_seqs()
    before = fit(small, loss_fn, seqs[:20], seqs[:4], tmp_path, max_steps=0, batch=4, seq_len=64, progress=False,
                 pad=PAD)
    after = fit(small, loss_fn, seqs[:20], seqs[:4], tmp_path, max_steps=30, batch=4, seq_len=64, lr=3e-3,
                eval_every=15, progress=False, pad=PAD)
    assert after["heldout"]["loss"] < 0.7 * before["heldout"]["loss"]
    assert after["heldout"]["top1"] > before["heldout"]["top1"]
    # usable right away as EAD's small model
    ids, attn = prompts((9,), seed=3)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=8, do_sample=False, accel="ead",
                         accel_kwargs={"small_model": small, "threshold": 100.0, "min_run": 1})
    assert hf_accel.stats(out).extra["small_forwards"] > 0
