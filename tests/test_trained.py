"""Clover and hidden transfer on the family matrix (random trained parts: identity doesn't depend on them), their
artifacts, and the training harness on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

import hf_accel
from hf_accel.integrations import artifacts
from hf_accel.adapters.clover import CloverHeads
from hf_accel.adapters.hidden_transfer import TransferMaps
from hf_accel.train import clover as clover_train
from hf_accel.train import hidden_transfer as ht_train
from hf_accel.train.loop import fit

from conftest import FAMILIES, PAD, prompts, tiny_model, train_seqs


def _parts(model, seed=0):
    torch.manual_seed(seed)
    heads = CloverHeads(model, depth=3)
    torch.manual_seed(seed)
    maps = TransferMaps(model, k=3)
    with torch.no_grad():  # random, not identity: drafts vary and are sometimes right
        maps.weight.add_(torch.randn_like(maps.weight) * 0.3)
    return heads, maps


CASES = [("clover", None), ("clover", "static"), ("hidden_transfer", None)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(9,), (12, 5, 8)], ids=["batch1", "batch3-padded"])
def test_identical_to_greedy(family, lengths):
    model = tiny_model(family, seed=3)
    heads, maps = _parts(model)
    ids, attn = prompts(list(lengths), seed=5)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False)
    for method, cache in CASES:
        kw = {"heads": heads if method == "clover" else maps}
        out = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False, accel=method,
                             accel_kwargs=kw, cache_implementation=cache)
        assert torch.equal(out, ref), (method, cache)
        st = hf_accel.stats(out)
        assert st.method == method and st.steps < st.new_tokens  # some drafts were accepted
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # no hook left


def test_scores_and_processors_match_vanilla():
    model = tiny_model("qwen2", seed=2)
    heads, maps = _parts(model)
    ids, attn = prompts([10, 6], seed=1)
    kw = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.3, return_dict_in_generate=True,
              output_scores=True)
    ref = model.generate(ids, attention_mask=attn, **kw)
    for method, k in (("clover", {"heads": heads}), ("hidden_transfer", {"heads": maps})):
        out = model.generate(ids, attention_mask=attn, accel=method, accel_kwargs=k, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.scores, ref.scores):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_hidden_transfer_hook_changes_only_scratch_nodes():
    """The transfer hook must leave real positions alone: with maps that would wreck any position they touched,
    the output is still identical, and the hook is gone after an error inside generate."""
    model = tiny_model("llama", seed=1)
    maps = TransferMaps(model, k=2)
    with torch.no_grad():
        maps.weight.mul_(50.0)
    ids, attn = prompts([8], seed=2)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=10, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=10, do_sample=False, accel="hidden_transfer",
                         accel_kwargs={"heads": maps})
    assert torch.equal(out, ref)

    def boom(*a, **k):
        raise RuntimeError("boom")

    handle = hf_accel.models.layers(model)[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(ids, attention_mask=attn, max_new_tokens=4, accel="hidden_transfer",
                           accel_kwargs={"heads": maps})
    finally:
        handle.remove()
    layer = hf_accel.models.layers(model)[maps.layer]
    assert not layer._forward_hooks


def test_errors_name_the_fix(tmp_path):
    model = tiny_model("llama")
    ids, attn = prompts([6])
    with pytest.raises(ValueError, match="hf-accel train clover"):
        model.generate(ids, attention_mask=attn, accel="clover")
    with pytest.raises(artifacts.ArtifactError, match="config.json missing"):
        model.generate(ids, attention_mask=attn, accel="clover", accel_kwargs={"heads": str(tmp_path / "nope")})
    _, maps = _parts(model)
    with pytest.raises(ValueError, match="static engine"):
        model.generate(ids, attention_mask=attn, accel="hidden_transfer", accel_kwargs={"heads": maps},
                       cache_implementation="static")
    # an artifact for another base model
    other = tiny_model("qwen2")
    heads, _ = _parts(other)
    heads.save_pretrained(tmp_path / "h")
    with pytest.raises(artifacts.ArtifactError, match="another base model"):
        model.generate(ids, attention_mask=attn, accel="clover", accel_kwargs={"heads": str(tmp_path / "h")})
    with pytest.raises(artifacts.ArtifactError, match="not 'hidden_transfer'"):
        model.generate(ids, attention_mask=attn, accel="hidden_transfer", accel_kwargs={"heads": str(tmp_path / "h")})


@pytest.mark.parametrize("kind", ["clover", "hidden_transfer"])
def test_artifact_round_trip(tmp_path, kind):
    model = tiny_model("gemma2", seed=7)
    heads, maps = _parts(model, seed=3)
    part = heads if kind == "clover" else maps
    part.save_pretrained(tmp_path / kind, metrics={"x": 1}, command="test")
    meta = json.loads((tmp_path / kind / "config.json").read_text())
    assert meta["kind"] == kind and meta["base_hash"] == artifacts.config_hash(model) and meta["command"] == "test"
    cls = CloverHeads if kind == "clover" else TransferMaps
    loaded = cls.from_pretrained(tmp_path / kind, model)
    saved = {k: v.to(torch.bfloat16).float() for k, v in part.state_dict().items()}  # stored in bf16
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert cls.from_pretrained(tmp_path / kind, model) is loaded  # loaded once per model and file version
    ids, attn = prompts([7, 11], seed=3)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False, accel=kind,
                         accel_kwargs={"heads": str(tmp_path / kind)})
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", ["clover", "hidden_transfer"])
def test_training_learns_and_resumes(tmp_path, kind):
    """A few steps lower the held-out loss; a resumed run continues the step count."""
    model = tiny_model("llama", seed=0).requires_grad_(False)
    torch.manual_seed(0)
    if kind == "clover":
        part = CloverHeads(model, depth=2)
        loss_fn = clover_train.make_loss(part, model, depth=2)
        key = "top1_head1"
    else:
        part = TransferMaps(model, k=2)
        loss_fn = ht_train.make_loss(part, model, anchors=6)
        key = "top1_pos1"
    seqs = train_seqs()
    train, held = seqs[:20], seqs[:4]  # evaluated on training rows: this checks the optimisation, not generalisation
    before = fit(part, loss_fn, train, held, tmp_path, max_steps=0, batch=4, seq_len=64, progress=False, pad=PAD)
    lr = 3e-3 if kind == "clover" else 3e-2
    r1 = fit(part, loss_fn, train, held, tmp_path, max_steps=40, batch=4, seq_len=64, lr=lr, eval_every=20,
             progress=False, pad=PAD)
    assert r1["steps"] == 40 and (tmp_path / "checkpoint.pt").exists()
    assert r1["heldout"]["loss"] < 0.97 * before["heldout"]["loss"]
    r2 = fit(part, loss_fn, train, held, tmp_path, max_steps=45, batch=4, seq_len=64, lr=lr, eval_every=20,
             resume=True, progress=False, pad=PAD)
    assert r2["steps"] == 45
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log][-1] == 45 and all(0 <= r[key] <= 1 for r in log)


def test_hidden_transfer_training_mask_keeps_real_positions_causal():
    """Pseudo positions appended in training must not change the real positions' logits (the teacher)."""
    model = tiny_model("mistral", seed=2).requires_grad_(False)
    maps = TransferMaps(model, k=2)
    captured = {}
    real_forward = model.forward

    def spy(*a, **k):
        out = real_forward(*a, **k)
        captured["logits"] = out.logits
        return out

    model.forward = spy
    try:
        ids = torch.tensor([train_seqs(1, 30, seed=4)[0]])
        mask = torch.ones_like(ids)
        ht_train.make_loss(maps, model, anchors=5)(ids, mask)
    finally:
        del model.forward
    plain = model(input_ids=ids).logits
    torch.testing.assert_close(captured["logits"][:, : ids.shape[1]], plain, rtol=1e-4, atol=1e-4)
