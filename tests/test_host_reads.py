"""One device->host read per engine step on the static engine's greedy and device-sampling paths.

On a CPU there is no device, so this counts what would be a read on a GPU: every conversion of a tensor's data to
Python (tolist, item, bool/int/float/index, cpu) made inside a step. The step's host-side inputs are numpy (pack's
buffers, the slot-table mirrors), so the only one left is the verdicts' read (the argmax, or the sampler's draws)."""

from __future__ import annotations

import pytest
import torch

from conftest import prompts, tiny_model
from hf_accel.adapters.m2r2 import RateResiduals
from hf_accel.engine import loop

READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu")


@pytest.mark.parametrize("method", ["aded", "m2r2"])
@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("lengths", [(9,), (9, 5, 12)])
def test_one_host_read_per_static_step(monkeypatch, sample, lengths, method):
    """m2r2 (self_spec): its draft forward's chains stay on the device (deferred tokens) and are read with the
    verdicts."""
    model = tiny_model("llama")
    ids, mask = prompts(lengths, seed=3)
    inside = [False]
    counts = {"reads": 0, "steps": 0}
    for name in READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            if inside[0]:
                counts["reads"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = loop._Steps.step

    def timed_step(self):
        inside[0] = True
        try:
            step(self)
        finally:
            inside[0] = False
        counts["steps"] += 1

    monkeypatch.setattr(loop._Steps, "step", timed_step)
    kw = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
    accel_kwargs = {"datastore": None, "max_nodes": 8} if method == "aded" else \
        {"adapter": RateResiduals(model, exit_layer=1, rank=4), "k": 2}
    model.generate(ids, attention_mask=mask, max_new_tokens=12, accel=method, cache_implementation="static",
                   accel_kwargs=accel_kwargs, disable_compile=True, **kw)
    assert counts["steps"] > 0
    assert counts["reads"] == counts["steps"]
