"""M2R2, mixture of multi-rate residuals (arXiv 2502.02040): an accelerated residual stream beside the normal one.

``generate(..., accel="m2r2", accel_kwargs={"adapter": path, "mode": "self_spec" | "early_exit"})``; the
adapter is trained by ``hf-accel train m2r2``.

The accelerated stream (``RateResiduals``). The normal residual stream runs the target's layers unchanged. Beside
it, a fast state ``f`` starts at the embeddings and, at each layer l < E (E = ``exit_layer``), takes the same layer
update ``d_l = h_{l+1} - h_l`` at a learned per-channel rate, plus a small learned correction:

    f_{l+1} = f_l + (1 + r_l) * d_l + U_l silu(D_l rms(f_l))          (r_l, U_l zero-initialised)

so after E layers f_E stands in for the final layer's state, read by the target's own final norm and LM head.
The fast stream adds no attention of its own: its updates come from the normal stream's layers, so it shares
their KV exactly (nothing extra is cached for it). Only r, D, U (and the router) train, with a KL to the full
model's next-token distribution on self-distilled ShareGPT data; the base model stays frozen.

Modes:

* ``self_spec`` (lossless): the target's layers < E plus the fast stream form a draft model
  (engine/follower.py keeps its own KV for those layers and catches up committed tokens in one forward); it
  drafts a chain of ``k`` tokens that the full model verifies through the engine (token-identical to greedy,
  distribution-preserving under sampling). Runs on the dynamic and static engines; on the static one the draft
  stream's KV is on static slots too and its forwards (one-token draft steps, short catch-ups) are CUDA graphs,
  its prompt KV is copied from the target's prefill (the same layers over the same tokens: no eager forward of the
  prompt per request), and the drafted chain never goes through the host on its own: it is written into the
  verify's inputs on the device and read with the verify's verdicts (``deferred_tokens``: one host read per step,
  and the host packs the verify while the draft forward runs).
* ``early_exit`` (lossy): every step runs layers < E; a router (logistic regression on the normalised f_E and
  the exit distribution's top probability, margin and entropy, trained to predict "the exit token is the full
  model's token") decides whether to stop there; if every active row's router probability is >= ``threshold``
  the step exits: layers >= E don't run and write no KV for that token (later tokens see, in those layers, only
  the tokens that went through them: engine/layers.py gives each layer a mask over the slots it holds).

On the static engine (``cache_implementation="static"``) early exit runs as two layer plans (engine/plans.py), each
captured once per static workspace as a CUDA graph (replayed by later requests with the same adapter and threshold):
*lower* runs layers < E, follows the fast stream, and gives the exit head's logits and the router's decision
(written to a device buffer; layers >= E write no KV); the host reads the decision (the step's one extra read) and, when any active row is not confident, replays *upper*: layers >= E from
the lower stack's saved output, masked to the slots they hold, and the full model's logits.

Choices that are ours (the paper has no public code): the update rule above (rate-scaled shared layer updates
plus a rank-``rank`` SiLU adapter, instead of separate accelerated attention); one exit layer E (default
``num_layers // 2``) rather than several; the router's features; in ``self_spec`` the draft's lower layers keep a
KV copy of their own instead of writing into the target's cache (sharing it would save FLOPs, not layer passes: per
step the draft runs the E lower layers k times (catch-up + k - 1 steps) and the verify all L layers once, k·E + L
layer passes; with a shared cache the draft still runs its k lower passes and the verify still needs the upper layers
for every node and the lower ones for the last drafted token, again k·E + L; what disappears is the verify's lower
layers over the other k nodes and the catch-up's width, compute that is nearly free at batch 1, where a decoding
forward is bound by reading the weights and launching kernels, while the shared cache would tie the draft's slots to
the verify's tree compaction); in ``early_exit`` the exit decision is shared by
the rows of a batch (a layer runs for all rows or none).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine.adapter import SpeculativeAdapter
from ..engine.backends import StaticBackend, _verify
from ..engine.follower import Follower, compile_for, graphs_for, static_slots_for
from ..engine.layers import HeldSlots, LayerControl, controlled
from ..engine.plans import LayerPlans, PlanControl, bind_static
from ..engine.tree import Tree
from ..integrations import artifacts
from ..registry import register

KIND = "m2r2"
MODES = ("self_spec", "early_exit")


class RateResiduals(artifacts.TrainedPart, nn.Module):
    kind = KIND

    def __init__(self, model, exit_layer: int | None = None, rank: int = 32):
        super().__init__()
        d = models.dims(model)
        n = d["layers"]
        if n < 2:
            raise ValueError(
                f"m2r2 needs a model with at least 2 decoder layers (its accelerated stream exits at a layer before "
                f"the last); this model has {n}: use another method (e.g. accel='aded') for it."
            )
        self.exit_layer = n // 2 if exit_layer is None else int(exit_layer)
        if not 1 <= self.exit_layer < n:
            raise ValueError(f"m2r2: exit_layer must be in 1..{n - 1} for a {n}-layer model; got {exit_layer}")
        self.rank = int(rank)
        h, e = d["hidden"], self.exit_layer
        self.eps = d["eps"]
        self.rate = nn.Parameter(torch.zeros(e, h))
        self.down = nn.Parameter(torch.randn(e, h, self.rank) * h ** -0.5)
        self.up = nn.Parameter(torch.zeros(e, self.rank, h))
        self.router = nn.Linear(h + 3, 1)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.__dict__["base"] = model

    def _rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def advance(self, layer: int, f, delta):
        """The fast state after layer ``layer`` (< exit_layer), given the normal stream's update there."""
        corr = F.silu(self._rms(f) @ self.down[layer].to(f.dtype)) @ self.up[layer].to(f.dtype)
        return f + (1 + self.rate[layer].to(f.dtype)) * delta + corr

    def exit_logits(self, f):
        norm = models.final_norm(self.base)
        return models.logits_from_hidden(self.base, norm(f) if norm is not None else f)

    def router_logit(self, f, logits):
        """Logit of "the exit token is the full model's token", per position."""
        logp = torch.log_softmax(logits.float(), -1)
        top2 = logp.topk(2, dim=-1).values
        ent = -(logp.exp() * logp).sum(-1, keepdim=True)
        feats = torch.cat([self._rms(f.float()), top2[..., :1].exp(), (top2[..., :1] - top2[..., 1:]), ent], -1)
        return self.router(feats.to(self.router.weight.dtype)).squeeze(-1).float()

    def settings(self) -> dict:
        return {"exit_layer": self.exit_layer, "rank": self.rank}


class FastStream(LayerControl):
    """Runs layers < E and follows the fast state. ``mode``: "exit" (always stop at E: the draft model and the
    training student), "capture" (run every layer; keep f_E in ``self.f``), "decide" (early exit: stop at E when the
    router is confident for every active row)."""

    def __init__(self, rr: RateResiduals, mode: str, held: HeldSlots | None = None, active=None,
                 threshold: float = 0.8):
        self.rr, self.mode, self.held, self.active, self.threshold = rr, mode, held, active, threshold
        self.f = None
        self.exited = False
        self.start = 0

    def layer(self, i, call):
        x = call.hidden
        e = self.rr.exit_layer
        if i == 0:
            self.f, self.exited = x, False
            if self.held is not None:
                self.start = call.mask.shape[-1] - x.shape[1]
        if self.exited:
            self.held is not None and self.held.skipped(i, self.start)
            return call.skip(x)
        if i >= e:
            out = call.run(cols=self.held.cols(i) if self.held is not None else None)
            if self.held is not None:
                self.held.ran(i, self.start, x.shape[1])
            return out
        out = call.run()
        self.f = self.rr.advance(i, self.f, models.layer_output_hidden(out) - x)
        if i < e - 1 or self.mode == "capture":
            return out
        if self.mode == "decide":
            f_last = self.f[:, -1]
            p = torch.sigmoid(self.rr.router_logit(f_last, self.rr.exit_logits(f_last)))
            confident = (p >= self.threshold) | ~self.active
            self.exited = bool(confident.all())  # the step's one extra host sync
            if not self.exited:
                return out
        self.exited = True
        return models.replace_layer_output(out, self.f)


class _ExitBuffers:
    """Device buffers of early exit on the static engine (filled by the lower plan, read by the upper plan / host)."""

    def __init__(self, batch: int, hidden: int, dtype, device):
        self.h = torch.zeros(batch, 1, hidden, dtype=dtype, device=device)  # the normal stream after layer E - 1
        self.f = torch.zeros(batch, 1, hidden, dtype=dtype, device=device)  # the fast stream f_E
        self.exit = torch.zeros(batch, dtype=torch.bool, device=device)  # confident (or inactive) rows
        self.active = torch.zeros(batch, dtype=torch.bool, device=device)


class _StaticLower(PlanControl):
    """Layers < E and the fast stream; layers >= E (group 0) replaced by f_E, so the model's head reads f_E."""

    def __init__(self, plans, rr: RateResiduals, bufs: _ExitBuffers):
        super().__init__(plans)
        self.rr, self.bufs = rr, bufs
        self.f = None

    def layer(self, i, call):
        x, e = call.hidden, self.rr.exit_layer
        if i >= e:
            self.replaced(0)
            return call.skip(x)
        if i == 0:
            self.f = x
        out = self.run(call)
        h = models.layer_output_hidden(out)
        self.f = self.rr.advance(i, self.f, h - x)
        if i < e - 1:
            return out
        self.bufs.h.copy_(h)
        self.bufs.f.copy_(self.f)
        return models.replace_layer_output(out, self.f)


class _StaticUpper(PlanControl):
    """Layers >= E (group 0) from the lower plan's saved normal stream; layers < E already ran this step."""

    def __init__(self, plans, rr: RateResiduals, bufs: _ExitBuffers):
        super().__init__(plans)
        self.rr, self.bufs = rr, bufs

    def layer(self, i, call):
        e = self.rr.exit_layer
        if i < e - 1:
            return call.skip(call.hidden)
        if i == e - 1:
            return call.skip(self.bufs.h)
        return self.run(call, 0)


@dataclass
class M2R2Config(AccelConfig):
    part_option = "adapter"  # also accepted as part= (AccelConfig.part_option)
    adapter: Any = None  # artifact folder (hf-accel train m2r2) or a RateResiduals
    mode: Literal["self_spec", "early_exit"] = "self_spec"  # lossless / lossy
    # self_spec: tokens drafted per step. 1: on an H200 (bf16, 2026-12-03, fourteenth run, default model's committed
    # adapter, held-out q60-64) 1.20x vanilla-static, against 1.10x for k 2 (k 3: 0.67x, thirteenth run): each drafted
    # token costs a 15-layer forward (~0.9 ms, half a verify) and the fast stream agrees with the model on ~40%. With
    # deferred drafts and the adopted prompt KV (fifteenth run) k 1 gives 1.45x (q60-64) / 1.38x (q65-69)
    k: int = option(1, min=1)
    # early_exit: router probability needed to exit. 0.98: on an H200 (bf16, 2026-12-02, eighth run, default model's
    # committed adapter) 1.52x vanilla-static at 0.931 greedy agreement, against 1.58x at 0.848 for 0.9 (0.8 before)
    threshold: float = option(0.98, min=0, max=1)

    def validate(self, method: str) -> None:
        if self.adapter is None:
            raise ValueError(
                f"accel={method!r} needs a trained accelerated stream: pass accel_kwargs={{'adapter': path}} (a "
                "folder written by `hf-accel train m2r2`)."
            )


class _State:
    def __init__(self):
        self.follower = None
        self.held = None
        self.active = None
        self.exits = 0
        self.steps = 0
        self.plans = None  # static early exit: the layer plans and their buffers
        self.bufs = None
        self.fed = None  # self_spec: the last draft's chains on the device (deferred_tokens)
        self.backend = None  # self_spec, static engine: the request's backend until its prompt KV is adopted
        self.adopted = False


@register("m2r2")
class M2R2(SpeculativeAdapter):
    Config = M2R2Config

    def __init__(self, model, config: M2R2Config):
        super().__init__(model, config)
        self.rr = artifacts.part_from(config.adapter, RateResiduals, model, self.name)
        self.lossless = config.mode == "self_spec"

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        return artifacts.missing(kwargs.get("adapter"), RateResiduals,
                                 "trained accelerated stream (accel_kwargs adapter=...; `hf-accel train m2r2`)")

    def max_tree_nodes(self) -> int:
        return 1 + self.config.k if self.lossless else 1

    def prepare(self, model, rows, generation_config):
        st = _State()
        dev = model.device
        if self.lossless:
            dtype = model.dtype if model.dtype.is_floating_point else torch.float32
            st.follower = Follower(model, len(rows), dev, dtype,
                                   context=lambda: controlled(model, FastStream(self.rr, "exit")),
                                   static_slots=static_slots_for(rows, generation_config, self.config.k + 1),
                                   graphs=graphs_for(model, generation_config), compiled=compile_for(generation_config),
                                   static_room=2 * self.config.k + 2, pad_to=self.config.k + 1,
                                   key=(KIND, "exit_stream", id(self.rr)), owner=self.rr)  # what the context reads
        else:
            st.held = HeldSlots(models.dims(model)["layers"], dev)
        return st

    def plan_key(self) -> tuple:
        """What the static early-exit plans read besides their buffers (the threshold is baked into the lower
        plan's graph): a request with an equal key replays another's graphs on the same workspace."""
        return (KIND, "early_exit", id(self.rr), float(self.config.threshold))

    def bind(self, state: _State, backend) -> None:
        if self.lossless:
            state.backend = backend if isinstance(backend, StaticBackend) else None
            return
        if not isinstance(backend, StaticBackend):
            return
        hidden = models.dims(self.model)["hidden"]
        plans = LayerPlans(backend, groups=1, key=self.plan_key(), owner=self.rr,  # group 0: layers >= E
                           buffers=lambda ws: _ExitBuffers(ws.batch, hidden, ws.mask_dtype, ws.device))
        bufs = state.bufs = plans.bufs  # the workspace's: the graphs captured by an earlier request read these
        rr, threshold = self.rr, float(self.config.threshold)

        def lower(*args):  # backends._verify, then the router on the exit head's logits, in the same graph
            logits, argmax, hidden = _verify(*args)
            p = torch.sigmoid(rr.router_logit(bufs.f[:, -1], logits[:, -1]))
            bufs.exit.copy_((p >= threshold) | ~bufs.active)
            return logits, argmax, hidden

        def step(_backend):
            out = plans.run("lower", lambda: _StaticLower(plans, rr, bufs), fn=lower)
            state.steps += 1
            if bool(bufs.exit.all()):  # the step's one extra host read
                state.exits += 1
                return out
            return plans.run("upper", lambda: _StaticUpper(plans, rr, bufs))

        state.plans = plans
        bind_static(backend, plans, step)

    def draft(self, state: _State, rows: list) -> list:
        if not self.lossless:
            active = torch.tensor([r is not None for r in rows], dtype=torch.bool)
            if state.bufs is not None:
                state.bufs.active.copy_(active, non_blocking=True)
            state.active = active.to(self.model.device)
            return [None] * len(rows)
        k = self.config.k
        state.fed = state.follower.draft(rows, k, read=False)  # (B, k) on the device: the engine reads it later
        return [Tree.chain(r.tokens[-1], [0] * k) if r is not None else None for r in rows]

    def prefilled(self, state: _State, step) -> None:
        """self_spec on the static engine: the draft stream's layers < E are the target's own, so its prompt KV is
        the target's prefill's (copied on the device), not an eager catch-up forward of the prompt."""
        if self.lossless and state.backend is not None:
            got = state.backend.prompt_kv(self.rr.exit_layer)
            state.adopted = got is not None and state.follower.adopt(*got)
            state.backend = None

    def deferred_tokens(self, state: _State):
        fed, state.fed = state.fed, None
        return fed

    def verify_context(self, state: _State, trees: list):
        if self.lossless or state.plans is not None:  # static early exit: the backend runs the plans (bind)
            return contextlib.nullcontext()
        return self._early_exit(state)

    @contextlib.contextmanager
    def _early_exit(self, state: _State):
        control = FastStream(self.rr, "decide", state.held, state.active, float(self.config.threshold))
        with controlled(self.model, control):
            yield
        state.steps += 1
        state.exits += int(control.exited)

    def finished(self, state: _State, stats) -> None:
        stats.extra.update(mode=self.config.mode, exit_layer=self.rr.exit_layer,
                           layers=models.dims(self.model)["layers"])
        if self.lossless:
            f = state.follower
            stats.extra.update(draft_forwards=f.forwards, draft_cache="static" if f.static else "dynamic",
                               draft_prompt_adopted=state.adopted,
                               draft_graphs=len(f._graphs), draft_captures=f.captures, draft_compiled=f.compiled,
                               draft_compile_error=f.compile_error,
                               draft_capture_seconds=f.capture_seconds)
            if "compile_seconds" in stats.extra:  # the request's capture time includes its draft stream's
                stats.extra["compile_seconds"] += f.capture_seconds
            f.close()
        else:
            stats.extra.update(exit_steps=state.exits, steps=state.steps,
                               exit_rate=state.exits / state.steps if state.steps else 0.0)
            if state.plans is not None:  # graphs the workspace holds for these plans; captured by this request
                stats.extra.update(plan_graphs=state.plans.graphs, plan_captures=state.plans.captures,
                                   plan_compiled=state.plans.set.compiled,
                                   plan_compile_error=state.plans.set.compile_error)


__all__ = ["M2R2", "M2R2Config", "RateResiduals", "FastStream"]
