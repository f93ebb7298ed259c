"""engine/loop.py's public surface after its split into named steps, and the adapter hook it calls per row."""

from __future__ import annotations

import inspect

import pytest

from hf_accel.engine import loop
from hf_accel.engine.adapter import SpeculativeAdapter


def test_run_signature_unchanged():
    params = list(inspect.signature(loop.run).parameters)
    assert params == ["model", "input_ids", "logits_processor", "stopping_criteria", "generation_config",
                      "accel_adapter", "accel_streamer", "accel_stats_sink", "accel_kv", "model_kwargs"]


def test_observe_hook_is_refused_with_the_fix():
    with pytest.raises(TypeError, match="folded into verified"):
        class Old(SpeculativeAdapter):
            def observe(self, state, row, new_tokens):
                return None


@pytest.mark.parametrize("cache", [None, "static"])
def test_verified_gets_every_committed_token(monkeypatch, cache):
    """ADED learns from ``verified``'s new_tokens (once ``observe``): per row they add up to what the row generated."""
    from conftest import PAD, prompts, tiny_model

    import hf_accel  # noqa: F401
    from hf_accel import registry

    seen = {}
    ADEDAdapter = registry.get("aded")
    inner = ADEDAdapter.verified

    def record(self, state, row, tree, path, new_tokens, step, b):
        assert row.index == b and row.tokens[len(row.tokens) - len(new_tokens):] == new_tokens
        assert 1 <= len(new_tokens) <= len(path)
        seen.setdefault(b, []).extend(new_tokens)
        return inner(self, state, row, tree, path, new_tokens, step, b)

    monkeypatch.setattr(ADEDAdapter, "verified", record)
    model = tiny_model("llama")
    ids, mask = prompts((5, 13, 9))
    kw = {"cache_implementation": "static", "disable_compile": True} if cache else {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, accel="aded", **kw)
    for b in range(ids.shape[0]):
        gen, got = out[b, ids.shape[1]:].tolist(), seen.get(b, [])
        # the first token comes from the prefill; a row that stopped early is padded
        assert got and gen[1:1 + len(got)] == got and all(t == PAD for t in gen[1 + len(got):])
