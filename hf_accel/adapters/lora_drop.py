"""LoRA-Drop (arXiv 2601.02569): a temporal schedule of layer skipping with low-rank corrections. Lossy.

``generate(..., accel="lora_drop", accel_kwargs={"adapter": path, "period": 4})``. Every decoding step is one
token forward through the shared engine (single-node "drafts", so HF's processors, sampling, stopping criteria,
streamer and return types behave as in vanilla generate). Steps 0, period, 2·period, ... after the prompt are
*refresh* steps: the whole model runs and each droppable layer remembers what it did. On the other (*drop*)
steps a droppable layer does not run — no attention, no MLP, no KV written — and returns

    h_out = h_in + (saved refresh update) + B·A·h_in          (reuse="delta", the default)
    h_out = (saved refresh output) + B·A·h_in                 (reuse="output", the literal form)

where the saved refresh update is the layer's ``h_out - h_in`` at the last refresh step and ``B·A`` a rank-r
LoRA of the layer (trained by ``hf-accel train lora-drop``; without an adapter the correction is zero).

KV: a droppable layer stores keys/values only for the prompt and refresh steps (45–55% less KV in the paper).
Layers then hold different tokens; engine/layers.py gives every layer a mask over exactly the slots it holds,
with each token at its own logical position (positions never come from a layer's cache length).

Choices that are ours: ``reuse="delta"`` by default (reusing the raw refresh *output* overwrites the current
token's residual stream, which a rank-8 correction can't restore; the paper's text reads as the raw output and
``reuse="output"`` gives it); the first decoding step after the prompt is a refresh step (prefill runs every
layer over the prompt); the default droppable set is the adapter's ``default_drop`` (a subset of the layers it has
LoRAs for, chosen by held-out agreement), else the layers it was trained for; without an adapter, every layer whose
index is not a multiple of 4 (layer 0 and every 4th layer always run: 24 of 32 droppable for a 32-layer model, as in
the paper); the schedule is shared by all rows of a batch.

On the static engine (``cache_implementation="static"``) the two step kinds are two layer plans (engine/plans.py),
each captured once per static workspace as a CUDA graph (a later request with the same adapter, droppable set and
reuse replays them): the droppable layers form one group whose slot mask drops the drop steps' slots, and their
saved refresh updates live in a device buffer of the workspace that the refresh plan writes and the drop plan
reads. The host only picks the plan (step % period).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine.adapter import SpeculativeAdapter
from ..engine.backends import StaticBackend
from ..engine.layers import HeldSlots, LayerControl, controlled
from ..engine.plans import LayerPlans, PlanControl, bind_static
from ..integrations import artifacts
from ..registry import register

KIND = "lora_drop"


def default_droppable(n_layers: int) -> list:
    return [i for i in range(n_layers) if i % 4 != 0]


def check_droppable(droppable, n_layers: int, method: str = "lora_drop") -> list:
    try:
        out = sorted({int(i) for i in droppable})
    except (TypeError, ValueError):
        raise ValueError(f"accel={method!r}: droppable must be a list of layer indices, got {droppable!r}") from None
    bad = [i for i in out if not 0 < i < n_layers]
    if bad:
        raise ValueError(
            f"accel={method!r}: droppable layers must be in 1..{n_layers - 1} (layer 0 always runs: the cache's "
            f"length is read from it); got {bad}"
        )
    if not out:
        raise ValueError(f"accel={method!r}: no droppable layers (the model has {n_layers}); pass droppable=[...]")
    return out


class DropLoRAs(artifacts.TrainedPart, nn.Module):
    """One rank-r LoRA (A: hidden -> r, B: r -> hidden, B zero-initialised) per droppable layer."""

    kind = KIND

    def __init__(self, model, droppable=None, period: int = 4, rank: int = 8, reuse: str = "delta",
                 default_drop=None):
        super().__init__()
        d = models.dims(model)
        self.droppable = check_droppable(default_droppable(d["layers"]) if droppable is None else droppable,
                                         d["layers"])
        # the layers the method drops when not told (accel_kwargs droppable=): a subset of the trained ones, picked
        # by held-out agreement (None: all of them)
        self.default_drop = None if default_drop is None else check_droppable(default_drop, d["layers"])
        if self.default_drop is not None and not set(self.default_drop) <= set(self.droppable):
            raise ValueError(f"lora_drop: default_drop {self.default_drop} must be among the trained droppable layers "
                             f"{self.droppable}")
        self.period, self.rank, self.reuse = int(period), int(rank), reuse
        h = d["hidden"]
        self.down = nn.ModuleDict({str(i): nn.Linear(h, self.rank, bias=False) for i in self.droppable})
        self.up = nn.ModuleDict({str(i): nn.Linear(self.rank, h, bias=False) for i in self.droppable})
        for i in self.droppable:
            nn.init.normal_(self.down[str(i)].weight, std=h ** -0.5)
            nn.init.zeros_(self.up[str(i)].weight)
        self.__dict__["base"] = model

    def correction(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.up[str(i)](self.down[str(i)](x))

    def settings(self) -> dict:
        out = {"droppable": self.droppable, "period": self.period, "rank": self.rank, "reuse": self.reuse}
        if self.default_drop is not None:
            out["default_drop"] = self.default_drop
        return out

    def init_from(self, tensors: dict) -> None:
        """Warm start (``hf-accel train lora_drop --init``) from an artifact whose droppable layers include these:
        its LoRAs for this module's layers are copied, the rest are not used (a subset of the committed 22 layers
        starts from their trained weights)."""
        own = self.state_dict()
        missing = sorted(k for k in own if k not in tensors)
        if missing:
            have = sorted({int(k.split(".")[1]) for k in tensors if k.count(".") >= 2 and k.split(".")[1].isdigit()})
            raise ValueError(f"lora_drop --init: the artifact has no LoRA for {len(missing)} of this run's tensors "
                             f"(e.g. {missing[0]!r}); its droppable layers are {have}, this run's {self.droppable}: "
                             "pass --droppable within the artifact's layers, or train without --init")
        bad = [k for k in own if tuple(tensors[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"lora_drop --init: {bad[0]!r} has shape {tuple(tensors[bad[0]].shape)} in the artifact, "
                             f"{tuple(own[bad[0]].shape)} here (rank {self.rank}): pass the artifact's --rank")
        self.load_state_dict({k: tensors[k].float() for k in own})


def drop_output(x, saved, loras, i: int, reuse: str):
    """A droppable layer's output on a drop step (``saved``: its refresh update or output, broadcastable to x)."""
    out = x + saved if reuse == "delta" else saved.expand_as(x)
    if loras is not None:
        out = out + loras.correction(i, x).to(x.dtype)
    return out


@dataclass
class LoRADropConfig(AccelConfig):
    part_option = "adapter"  # also accepted as part= (AccelConfig.part_option)
    adapter: Any = None  # artifact folder (hf-accel train lora-drop) or a DropLoRAs; None: no correction
    period: int | None = option(None, min=1)  # a refresh step every `period` steps (1 = never drop; default: the
    # adapter's, else 4)
    droppable: Any = None  # layer indices (default: the adapter's default_drop, else the layers it was trained for,
    # else all but every 4th from layer 0). The default model's committed adapter drops [1, 2, 3, 5, 6, 7, 9] of its 22
    # trained layers by default: on an H200 (bf16, 2026-12-03, fifteenth run, held-out q60-64) 2.22x vanilla-static
    # at 0.873 greedy agreement, against 2.26x at 0.814 with 8 layers and 2.98x at 0.752 with all 22 (ninth run)
    reuse: Literal["delta", "output"] | None = None  # default: the adapter's, else "delta"


class _State:
    def __init__(self, n_layers: int, device):
        self.step = 0
        self.held = HeldSlots(n_layers, device)
        self.saved: dict = {}  # layer -> (B, 1, H) refresh update/output
        self.refresh_steps = 0
        self.drop_steps = 0
        self.plans = None  # static engine: the layer plans and the saved updates' buffer (n_droppable, B, 1, H)
        self.saved_buf = None
        self.refresh = True


class _DropControl(LayerControl):
    def __init__(self, adapter: "LoRADrop", state: _State, refresh: bool):
        self.a, self.s, self.refresh = adapter, state, refresh
        self.start = 0

    def layer(self, i, call):
        s, a = self.s, self.a
        x = call.hidden
        if i == 0:
            self.start = call.mask.shape[-1] - x.shape[1]
        if i not in a.droppable_set:
            return call.run()
        if self.refresh:
            out = call.run(cols=s.held.cols(i))
            s.held.ran(i, self.start, x.shape[1])
            h = models.layer_output_hidden(out)
            s.saved[i] = (h - x if a.reuse == "delta" else h)[:, -1:].detach()
            return out
        s.held.skipped(i, self.start)
        return call.skip(drop_output(x, s.saved[i], a.loras, i, a.reuse))


class _StaticDrop(PlanControl):
    """A step of LoRA-Drop on the static engine (group 0: the droppable layers)."""

    def __init__(self, plans, adapter: "LoRADrop", saved, refresh: bool):
        super().__init__(plans)
        self.a, self.saved, self.refresh = adapter, saved, refresh

    def layer(self, i, call):
        a = self.a
        j = a.slot_of.get(i)
        if j is None:
            return self.run(call)
        x = call.hidden
        if self.refresh:
            out = self.run(call, 0)
            h = models.layer_output_hidden(out)
            self.saved[j].copy_((h - x if a.reuse == "delta" else h)[:, -1:])
            return out
        self.replaced(0)
        return call.skip(drop_output(x, self.saved[j], a.loras, i, a.reuse))


@register("lora_drop")
class LoRADrop(SpeculativeAdapter):
    Config = LoRADropConfig
    lossless = False

    def __init__(self, model, config: LoRADropConfig):
        super().__init__(model, config)
        self.loras = artifacts.part_from(config.adapter, DropLoRAs, model, self.name) if config.adapter is not None \
            else None
        n = models.dims(model)["layers"]
        base = (self.loras.default_drop or self.loras.droppable) if self.loras is not None else default_droppable(n)
        self.droppable = check_droppable(base if config.droppable is None else config.droppable, n, self.name)
        if self.loras is not None:
            extra = sorted(set(self.droppable) - set(self.loras.droppable))
            if extra:
                raise ValueError(
                    f"accel='lora_drop': the adapter has no LoRA for layers {extra}; drop only layers it was trained "
                    f"for ({self.loras.droppable}) or train one with --droppable"
                )
        self.droppable_set = frozenset(self.droppable)
        self.slot_of = {i: j for j, i in enumerate(self.droppable)}  # layer -> its row of the static saved buffer
        self.period = config.period or (self.loras.period if self.loras is not None else 4)
        self.reuse = config.reuse or (self.loras.reuse if self.loras is not None else "delta")
        self.n_layers = n

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        # it runs without one (no correction), but that is not the method a benchmark should report
        return artifacts.missing(kwargs.get("adapter"), DropLoRAs,
                                 "trained LoRAs (accel_kwargs adapter=...; `hf-accel train lora-drop`)")

    def max_tree_nodes(self) -> int:
        return 1

    def prepare(self, model, rows, generation_config):
        return _State(self.n_layers, model.device)

    def plan_key(self) -> tuple:
        """What the static plans read besides their buffers: a request with an equal key replays the graphs another
        request captured on the same workspace (engine/plans.PlanSet). The period is host logic: not part of it."""
        return (KIND, id(self.loras) if self.loras is not None else None, tuple(self.droppable), self.reuse)

    def bind(self, state: _State, backend) -> None:
        if not isinstance(backend, StaticBackend):
            return
        hidden, n = models.dims(self.model)["hidden"], len(self.droppable)
        plans = state.plans = LayerPlans(
            backend, groups=1, key=self.plan_key(), owner=self.loras,
            buffers=lambda ws: torch.zeros(n, ws.batch, 1, hidden, dtype=ws.mask_dtype, device=ws.device),
        )
        state.saved_buf = plans.bufs  # the saved refresh updates: the workspace's (a refresh step writes them first)

        def step(_backend):
            refresh = state.refresh
            return plans.run(refresh, lambda: _StaticDrop(plans, self, plans.bufs, refresh))

        bind_static(backend, plans, step)

    def draft(self, state, rows: list) -> list:
        return [None] * len(rows)  # one token per step: the engine verifies the root alone

    @contextlib.contextmanager
    def verify_context(self, state: _State, trees: list):
        refresh = state.step % self.period == 0
        if state.plans is not None:  # static engine: the backend runs the plan (see bind)
            state.refresh = refresh
            yield
        else:
            with controlled(self.model, _DropControl(self, state, refresh)):
                yield
        state.step += 1
        if refresh:
            state.refresh_steps += 1
        else:
            state.drop_steps += 1

    def finished(self, state: _State, stats) -> None:
        stats.extra.update(refresh_steps=state.refresh_steps, drop_steps=state.drop_steps, period=self.period,
                           droppable_layers=len(self.droppable), layers=self.n_layers)
        if state.plans is not None:  # graphs the workspace holds for these plans; captured by this request
            stats.extra.update(plan_graphs=state.plans.graphs, plan_captures=state.plans.captures,
                               plan_compiled=state.plans.set.compiled, plan_compile_error=state.plans.set.compile_error)


__all__ = ["DropLoRAs", "LoRADrop", "LoRADropConfig", "default_droppable", "drop_output"]
