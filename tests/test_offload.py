"""accelerate dispatch with hooks on CPU: a device_map that puts layers on "cpu" and offloads one to "disk".
Every lossless method stays token-identical to vanilla greedy, on the dynamic and the static engine (ADED here and
the trained methods below; layer-wrapping methods in tests/test_layers.py)."""

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


@pytest.mark.parametrize("method", ["clover", "clover-static", "hidden_transfer", "lud"])
def test_trained_lossless_methods_under_cpu_and_disk_offload(offloaded, method):
    """Trained parts built on the offloaded model itself (Clover reads the last layer's weights, which live on
    disk) and lossless decoding through accelerate's hooks."""
    from hf_accel.adapters.clover import CloverHeads
    from hf_accel.adapters.hidden_transfer import TransferMaps
    from hf_accel.adapters.lud import LUDLoRA

    family, model, off = offloaded
    ids, mask = prompts((5, 12, 9), seed=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    torch.manual_seed(0)
    name, cache = method.replace("-static", ""), ({"cache_implementation": "static"} if "static" in method else {})
    if name == "clover":
        kw = {"heads": CloverHeads(off, depth=2)}
        # initialised from the disk-offloaded last layer: its weights were read for real
        assert not any(p.is_meta for p in kw["heads"].parameters())
        if family in ("llama", "qwen2"):  # Llama-style attention: copied from the target's last layer
            assert torch.equal(kw["heads"].attn.q_proj.weight, models.layers(model)[-1].self_attn.q_proj.weight)
    elif name == "hidden_transfer":
        kw = {"heads": TransferMaps(off, k=2)}
    else:
        kw = {"adapter": LUDLoRA(off, placeholder_id=3, k=3, rank=4), "lossless": True, "beta": 0.0}
    out = off.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, accel=name, accel_kwargs=kw,
                       **cache)
    assert torch.equal(out, ref), f"{family} {method}: differs from vanilla greedy under offload"
    assert hasattr(models.layers(off)[-1], "_hf_hook")
    assert all(p.is_meta for p in models.layers(off)[-1].parameters())  # still offloaded afterwards


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_quant_spec_under_cpu_and_disk_offload(offloaded, cache):
    """quant_spec with the offloaded model as the target and as its own intermediate (ADED tree -> model -> target)
    and single-level speculation with a draft model: identical to vanilla greedy, hooks intact."""
    family, model, off = offloaded
    ids, mask = prompts((5, 12, 9), seed=2)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    draft = tiny_model(family, seed=3, layers=1)
    for kw in (dict(intermediate=off, aded={"datastore": None, "max_nodes": 12}, k=4),
               dict(draft_model=draft, drafter="model", intermediate="none")):
        out = off.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, accel="quant_spec",
                           accel_kwargs=kw, **cache)
        assert torch.equal(out, ref), f"{family}: quant_spec under offload differs from vanilla greedy"
    assert hasattr(models.layers(off)[-1], "_hf_hook")
