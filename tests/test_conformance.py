"""The conformance suite: every registered method (tests/methods.py) x family x batch {1, 3 left-padded} x
{dynamic cache, static cache (eager: disable_compile=True)}.

Lossless settings are token-identical to vanilla greedy; a lossy method's identity setting too; other lossy
settings run and return the right shape. After every call, error or not, the model (weights, config, attention
implementation, hooks, generation_config) is unchanged. Unknown options are rejected, ``missing_artifacts`` agrees
with what generate accepts, ``accel=<the method's Config>`` works, and the static engine refuses a method with one
clear ValueError where the method says it can't run there."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import hf_accel
from hf_accel import registry

from conftest import EOS, FAMILIES, prompts
from methods import METHODS, MISSING, cases, model_for

NEW = 10
LENGTHS = {"batch1": (11,), "batch3": (5, 13, 9)}
CASES = cases()
# drafts only from the text itself: a short greedy output may repeat nothing, so nothing gets drafted
CONTEXT_ONLY = {("aded", "prompt")}
CASE_IDS = [f"{m}-{label}" for m, label, _, _ in CASES]


def _snapshot(model) -> dict:
    return dict(
        params={k: v.clone() for k, v in model.state_dict().items()},
        config=model.config.to_dict(),
        attn=model.config._attn_implementation,
        generation=copy.deepcopy(model.generation_config.to_dict()),
        training=model.training,
    )


@functools.lru_cache(maxsize=None)
def _before(family: str) -> dict:
    return _snapshot(model_for(family))


def assert_unchanged(model, family: str) -> None:
    before, now = _before(family), _snapshot(model)
    assert now["attn"] == before["attn"], "the attention implementation was left switched"
    assert now["config"] == before["config"], "model.config changed"
    assert now["generation"] == before["generation"], "model.generation_config changed"
    assert now["training"] == before["training"]
    assert now["params"].keys() == before["params"].keys()
    assert all(torch.equal(now["params"][k], v) for k, v in before["params"].items()), "weights changed"
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"a hook was left on {name or 'the model'}"
        assert "forward" not in m.__dict__, f"forward was left patched on {name or 'the model'}"


@functools.lru_cache(maxsize=None)
def _greedy(family: str, batch: str):
    model = model_for(family)
    ids, mask = prompts(LENGTHS[batch], seed=len(LENGTHS[batch]))
    return ids, mask, model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


def _run(model, ids, mask, method, kwargs, cache):
    extra = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, accel=method,
                          accel_kwargs=kwargs, **extra)


def test_every_registered_method_has_a_table_entry():
    missing = sorted(set(registry.available()) - set(METHODS))
    assert not missing, f"registered methods without an entry in tests/methods.py: {missing}"
    assert not sorted(set(METHODS) - set(registry.available())), "tests/methods.py names unregistered methods"
    for name, entry in METHODS.items():
        kinds = {kind for _, kind, _ in entry}
        cls = registry.get(name)
        if getattr(cls, "lossless", False) and not getattr(cls, "kv_method", False):
            assert "lossless" in kinds, f"{name} is lossless: its entry needs a 'lossless' case"
        else:
            assert kinds & {"lossless", "identity"}, f"{name}: its entry needs a case identical to greedy"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("batch", list(LENGTHS))
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,label,kind,build", CASES, ids=CASE_IDS)
def test_conformance(method, label, kind, build, family, batch, cache):
    model = model_for(family)
    _before(family)
    kwargs = build(model, family)
    ids, mask, ref = _greedy(family, batch)
    refusal = registry.get(method).static_refusal(kwargs) if cache == "static" else None
    if refusal:
        with pytest.raises(ValueError, match="static") as err:  # one clear error that names the fix
            _run(model, ids, mask, method, kwargs, cache)
        assert "Leave cache_implementation unset" in str(err.value) or "leave cache_implementation unset" in str(err.value)
        assert_unchanged(model, family)
        pytest.skip(f"{method} declares it can't run on the static engine: {refusal}")
    out = _run(model, ids, mask, method, kwargs, cache)
    assert_unchanged(model, family)
    st = hf_accel.stats(out)
    assert st.method == method and st.batch_size == ids.shape[0]
    if not getattr(registry.get(method), "kv_method", False):
        assert st.extra["cache"] == cache  # the engine ran on the cache asked for
    if kind == "lossless":
        assert st.steps > 0  # the engine ran its verify loop
        if (method, label) not in CONTEXT_ONLY or batch == "batch3":
            assert st.drafted_tokens > 0  # and verified drafts
    if kind in ("lossless", "identity"):
        assert out.shape == ref.shape and torch.equal(out, ref), f"{method} ({label}) differs from vanilla greedy"
    else:
        p = ids.shape[1]
        assert out.shape[0] == ids.shape[0] and p < out.shape[1] <= p + NEW
        assert torch.equal(out[:, :p], ids)
        if not (out[:, p:] == EOS).any():
            assert out.shape[1] == p + NEW


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_options_are_rejected(method):
    model = model_for("llama")
    _before("llama")
    ids, mask, _ = _greedy("llama", "batch3")
    kwargs = METHODS[method][0][2](model, "llama")
    with pytest.raises(ValueError, match=r"unknown accel_kwargs \['no_such_option'\]"):
        _run(model, ids, mask, method, {**kwargs, "no_such_option": 1}, "dynamic")
    assert_unchanged(model, "llama")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_missing_artifacts_agrees_with_validation(method):
    model = model_for("llama")
    _before("llama")
    cls = registry.get(method)
    ids, mask, _ = _greedy("llama", "batch1")
    for label, _, build in METHODS[method]:
        assert cls.missing_artifacts(model, build(model, "llama")) is None, label  # and every case runs (above)
    if method not in MISSING:  # nothing a request could lack: the bare method runs
        assert cls.missing_artifacts(model, {}) is None
        _run(model, ids, mask, method, {}, "dynamic")
        return
    kwargs = MISSING[method](model, "llama")
    why = cls.missing_artifacts(model, kwargs)
    assert isinstance(why, str) and why
    with pytest.raises(ValueError):
        _run(model, ids, mask, method, kwargs, "dynamic")
    assert_unchanged(model, "llama")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_accel_takes_the_methods_config(method):
    """``generate(accel=<Method>Config(...))`` is ``accel=name, accel_kwargs=...`` (a model or trained part in the
    config is passed on as is)."""
    model = model_for("qwen2")
    cls = registry.get(method)
    ids, mask, _ = _greedy("qwen2", "batch3")
    kwargs = METHODS[method][0][2](model, "qwen2")
    cfg = cls.Config(**kwargs)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, accel=cfg)
    assert torch.equal(out, _run(model, ids, mask, method, kwargs, "dynamic"))
    assert hf_accel.stats(out).method == method


def test_documented_aded_config():
    from hf_accel.adapters.aded import ADEDConfig

    model = model_for("llama")
    ids, mask, ref = _greedy("llama", "batch3")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                         accel=ADEDConfig(datastore=None, max_nodes=16))
    assert torch.equal(out, ref)
    # options of the call override the config's
    with pytest.raises(ValueError, match="max_nodes"):
        model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                       accel=ADEDConfig(max_nodes=16), accel_kwargs={"datastore": None, "max_nodes": 0})


def test_a_config_of_no_method_is_refused():
    from dataclasses import dataclass

    from hf_accel import AccelConfig

    @dataclass
    class Orphan(AccelConfig):
        x: int = 1

    model = model_for("llama")
    ids, mask, _ = _greedy("llama", "batch1")
    with pytest.raises(ValueError, match="no registered method takes this config"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, accel=Orphan())
