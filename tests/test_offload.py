"""accelerate dispatch with hooks on CPU: a device_map that puts layers on "cpu" and offloads one to "disk".
Every lossless method stays token-identical to vanilla greedy, on the dynamic and the static engine."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import prompts, tiny_model
from hf_accel import models


def _device_map(model) -> dict:
    """Every decoder layer on "cpu" except the last, which goes to "disk"; the rest on "cpu"."""
    names = {id(m): n for n, m in model.named_modules()}
    layer_names = [names[id(layer)] for layer in models.layers(model)]
    dm = {}
    for p in model.state_dict():
        owner = next((n for n in layer_names if p.startswith(n + ".")), p.rsplit(".", 1)[0])
        dm[owner] = "disk" if owner == layer_names[-1] else "cpu"
    return dm


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2", "gpt2"])
def offloaded(request, tmp_path_factory):
    family = request.param
    model = tiny_model(family)
    d = tmp_path_factory.mktemp(f"offload-{family}")
    model.save_pretrained(d / "m")
    kw = {"attn_implementation": "eager"} if family == "gemma2" else {}
    off = AutoModelForCausalLM.from_pretrained(
        d / "m", device_map=_device_map(model), offload_folder=str(d / "off"), dtype=torch.float32, **kw
    ).eval()
    off.generation_config = model.generation_config
    return family, model, off


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_lossless_under_cpu_and_disk_offload(offloaded, cache):
    family, model, off = offloaded
    assert "disk" in set(off.hf_device_map.values()) and hasattr(models.layers(off)[-1], "_hf_hook")
    assert models.is_dispatched(off) and not models.is_dispatched(model)  # no CUDA graphs through its hooks
    ids, mask = prompts((5, 12, 9), seed=2)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(off.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False), ref)
    out = off.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, accel="aded",
        accel_kwargs={"datastore": None, "max_nodes": 12}, **cache,
    )
    assert torch.equal(out, ref), f"{family}: accel under offload differs from vanilla greedy"
    assert hasattr(models.layers(off)[-1], "_hf_hook")  # accelerate's hooks are still in place
