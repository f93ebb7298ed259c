"""One name for the trained part: every trained method takes ``part=`` (``AccelConfig.part_option`` names the
method's own key, kept as an alias); both with different values is one clear ValueError."""

from __future__ import annotations

import pytest
import torch
from conftest import prompts
from methods import METHODS, MISSING, NOWHERE, model_for

import hf_accel
from hf_accel import registry
from hf_accel.bench import methods as bm
from hf_accel.config import PART, check, resolve, split_methods
from hf_accel.default_model import ARTIFACT_KEYS

TRAINED = {"clover": "heads", "hidden_transfer": "heads", "lud": "adapter", "lora_drop": "adapter",
           "m2r2": "adapter", "duo_attention": "pattern"}


def _part_of(name):
    return registry.get(name).Config.part_option


def test_every_trained_method_declares_its_part_option():
    declared = {n: _part_of(n) for n in registry.available() if _part_of(n)}
    assert declared == TRAINED
    assert ARTIFACT_KEYS == {n: k for n, k in declared.items() if n in ARTIFACT_KEYS}  # the CLI's defaults agree
    for name, key in declared.items():
        assert key in registry.get(name).Config.__dataclass_fields__


def _first_case_with_part(name):
    model = model_for("llama")
    for _, _, build in METHODS[name]:
        kwargs = build(model, "llama")
        if _part_of(name) in kwargs:
            return model, kwargs
    raise AssertionError(f"tests/methods.py has no case of {name} with its trained part")


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_part_is_the_methods_own_key(name):
    model, kwargs = _first_case_with_part(name)
    own = _part_of(name)
    ids, mask = prompts((5, 9), seed=2)
    run = lambda kw: model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, accel=name,
                                    accel_kwargs=kw)
    by_own = run(kwargs)
    renamed = {PART if k == own else k: v for k, v in kwargs.items()}
    assert torch.equal(run(renamed), by_own)
    assert torch.equal(run({**kwargs, PART: kwargs[own]}), by_own)  # both names, one value: fine
    cfg = registry.get(name).Config.from_kwargs(name, renamed)
    assert getattr(cfg, own) is kwargs[own] and PART not in cfg.to_dict()


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_both_names_with_different_values_is_one_clear_error(name):
    own = _part_of(name)
    with pytest.raises(ValueError, match=rf"part='/a' and {own}='/b'.*pass one of them"):
        check(name, {PART: "/a", own: "/b"})
    model = model_for("llama")
    ids, mask = prompts((5,), seed=2)
    with pytest.raises(ValueError, match="pass one of them"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, accel=name,
                       accel_kwargs={PART: torch.zeros(1), own: torch.zeros(1)})  # two objects: never "the same"


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_missing_artifacts_reads_part(name):
    cls = registry.get(name)
    model = model_for("llama")
    own_kwargs = MISSING[name](model, "llama")
    assert own_kwargs == {_part_of(name): NOWHERE}
    why = cls.missing_artifacts(model, {PART: NOWHERE})
    assert why and why == cls.missing_artifacts(model, own_kwargs)


def test_methods_without_a_trained_part_refuse_part():
    for name in sorted(set(registry.available()) - set(TRAINED)):
        with pytest.raises(ValueError, match=rf"accel='{name}' has no trained part.*clover"):
            check(name, {PART: "/a"})


def test_part_in_compositions_generation_config_and_bench(tmp_path):
    (kv, _, kv_kw), (spec, _, spec_kw) = split_methods(
        resolve(None, ["duo_attention", "aded"], {"duo_attention": {PART: "/g"}, "aded": {}}, None))
    assert (kv, spec, kv_kw, spec_kw) == ("duo_attention", "aded", {"pattern": "/g"}, {})
    model = model_for("llama")
    gc = hf_accel.set_generation_config(model.generation_config.__class__(), "clover", part=str(tmp_path))
    assert gc.hf_accel == {"method": "clover", "part": str(tmp_path)}
    [(_, _, kw)] = [r for r in split_methods(resolve(None, None, None, gc)) if r]
    assert kw == {"heads": str(tmp_path)}
    # the bench: part= overrides the default part (given under the method's own name)
    s = bm.parse_one("clover(part=/mine)", defaults={"clover": {"heads": "/default"}})
    assert s.kwargs == {"heads": "/mine"}
