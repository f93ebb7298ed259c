"""Layer plans on the static engine: steps that run some decoder layers and replace others, one CUDA graph per plan.

A *plan* is what a step does with each decoder layer: run it, or replace its output without running it (no KV
written). LoRA-Drop has two plans (refresh: every layer runs; drop: the droppable layers are replaced), M2R2's early
exit two (the lower stack + exit head + router; the upper stack from the lower stack's saved output). Which plan a
step runs is host logic between replays; each plan is captured once per static workspace as a CUDA graph over the
engine's buffers (engine/backends.StaticBackend) and replayed, by this request and by every later one on that
workspace with the same plan key (:class:`PlanSet`: the slot masks and saved states the graphs read belong to the
workspace and are filled in place; a second identical request captures nothing). On CPU, or with
``disable_compile=True``, the same code runs eagerly. Plans are run through the layer control of engine/layers.py.

Per-layer slot validity. The static engine keeps one slot layout for all layers: ``slot_valid`` (B, L) and
``slot_pos``. A layer that was replaced on some steps holds no KV at those steps' slots. Layers that run and are
replaced on the same steps form a *group*; the :class:`PlanSet` keeps, per group, a device mask ``held`` (G, B, L)
of fixed shape: the slots whose KV the group's layers wrote. A group's layers attend through the engine's mask with
the columns they don't hold hidden (``LayerCall.run(hide=...)``). Every planned forward first marks its own slots
(``region``) held by every group, and a plan that replaces a group marks them not held again: both are device ops
inside the graph, so nothing about a slot's layout is read on the host. Layers in no group always run (they hold
every valid slot, as on the plain engine).

Each plan's step is compiled (``torch.compile``, the engine's verify options) before its capture, as the plain static
engine's verify step is: dynamo traces the layer control's Python (which layers run, the slot masks, the adapter's
replacement) into one graph per plan, with no graph break. Every capture compiles its own copy of the step function
(backends.compiled_copy): dynamo does not guard on the layer control, so code traced under one plan must never be
found again by another. Eager-captured plans cost about as much per half model as a compiled full verify (H200, bf16,
default model: 1.85 ms per M2R2 half-stack replay against 1.7 ms for ADED's compiled 16-node verify,
benchmarks/results/h200-bf16-step-profile-2026-12-02.md). If compiling or its warm-up fails, the plan is captured
from the eager step instead, and so are the set's later plans (``PlanSet.compile_error`` says why).
"""

from __future__ import annotations

import torch

from . import capture
from .backends import _verify, clock, compiled_copy
from .layers import LayerCall, LayerControl, controlled


class PlanControl(LayerControl):
    """A layer control run inside a plan. Subclasses implement :meth:`layer` with :meth:`run` (a layer of
    ``group``, masked to the slots the group holds) and :meth:`replaced` (the group's layers write no KV for this
    step). Everything a plan reads or writes between steps must live in device buffers allocated outside it: the
    :class:`PlanSet`'s (``held``, ``bufs``), which outlive the request (a captured plan is replayed by later ones)."""

    def __init__(self, plans: "LayerPlans"):
        self.plans = plans.set if isinstance(plans, LayerPlans) else plans  # the workspace's PlanSet
        self._hide: dict = {}
        self._marked: set = set()

    def _call(self, index, layer, args, kwargs):
        plans = self.plans
        if index == 0:
            self._hide, self._marked = {}, set()
            plans.held.index_fill_(2, plans.region, True)  # this step's slots: held until replaced
            self._template = plans.template  # a plan that replaces layer 0 returns what the layers return
        out = self.layer(index, LayerCall(index, layer, args, kwargs, self))
        if index == 0 and plans.template is None:
            plans.template = self._template = out
        return out

    def run(self, call, group: int | None = None):
        """Run the layer; a layer of ``group`` sees only the slots its group holds."""
        if group is None:
            return call.run()
        hide = self._hide.get(group)
        if hide is None:
            hide = self._hide[group] = ~self.plans.held[group]
        return call.run(hide=hide)

    def replaced(self, group: int) -> None:
        """``group``'s layers are replaced on this step: they hold nothing at its slots."""
        if group not in self._marked:
            self._marked.add(group)
            self.plans.held[group].index_fill_(1, self.plans.region, False)


class PlanSet:
    """What the plans of one plan key read and write on one static workspace (engine/backends._Workspace, which
    fixes the batch, slot count, dtype and device): the per-group slot masks ``held`` (G, B, L), the adapter's
    device buffers ``bufs`` (its saved states), the captured graphs (per plan and verify width) and layer 0's output
    template. Kept on the workspace (``ws.plans``) and reused by every later request with the same key, which fills
    the same buffers in place, so each plan is captured once per workspace, not once per request. A workspace
    serves one request at a time, so its plan sets do too. ``owner``: what the key names by identity (a trained
    part): kept alive with the set, so the identity can't be reused by another object."""

    def __init__(self, ws, groups: int, bufs=None, owner=None):
        self.ws = ws
        self.held = torch.ones(max(1, groups), ws.batch, ws.max_slots, dtype=torch.bool, device=ws.device)
        self.bufs, self.owner = bufs, owner
        self.graphs: dict = {}  # (plan, width) -> (graph, outputs)
        self.compiled = 0  # of those, captured from a compiled step
        self.compile_error = None  # why a plan's compiled step was not used (then captured eagerly)
        self.template = None  # a layer 0 output (its structure: tensor or tuple)

    @property
    def region(self) -> torch.Tensor:
        return self.ws.region  # the slots the current verify width writes

    def reset(self) -> None:
        """A new request: every slot held by every group (prefill ran all layers; slots it didn't write are invalid
        in the engine's slot table anyway)."""
        self.held.fill_(True)


class LayerPlans:
    """Per request: runs plans over one :class:`StaticBackend`'s workspace, with the :class:`PlanSet` of ``key``.

    ``key``: everything the plans' code reads besides the set's buffers and the workspace (method, trained part's
    identity, settings the controls branch on or bake in); requests with equal keys on one workspace share the set
    and its graphs. ``buffers(ws)``: the adapter's device buffers, allocated once per set (``self.bufs``).
    ``run(plan, make_control)`` runs the backend's verify step (mask build, forward, argmax, over the inputs the
    backend has just copied in) under ``plan``; ``make_control()`` builds that plan's :class:`PlanControl` (called
    once per plan and width per workspace when graphs are used, every step when not)."""

    def __init__(self, backend, groups: int, key=(), buffers=None, owner=None):
        ws = backend.ws
        self.backend, self.ws = backend, ws
        full = (key, max(1, groups))
        entry = ws.plans.get(full)
        self.reused = entry is not None
        if entry is None:
            entry = ws.plans[full] = PlanSet(ws, groups, buffers(ws) if buffers is not None else None, owner)
        entry.reset()
        self.set = entry
        self.bufs = entry.bufs
        self.captures = 0  # plan graphs captured by this request

    @property
    def held(self) -> torch.Tensor:
        return self.set.held

    @property
    def region(self) -> torch.Tensor:
        return self.set.region

    @property
    def template(self):
        return self.set.template

    @property
    def graphs(self) -> int:
        """Plan graphs the workspace holds for this key."""
        return len(self.set.graphs)

    @property
    def model(self):
        return self.ws.model_ref()

    def run(self, key, make_control, fn=None):
        """``fn``: the step function in place of the engine's (backends._verify's signature and outputs), e.g. to
        compute a router from the logits inside the same graph; like ``make_control``, it may only read and write
        the set's buffers and the workspace's (it is captured with the plan)."""
        b = self.backend
        if not b.use_graphs:
            with controlled(self.model, make_control()):
                return self.ws.verify_step(fn)
        graphs = self.set.graphs
        gk = (key, self.ws.cur.n)
        entry = graphs.get(gk)
        if entry is None:
            entry = graphs[gk] = self._capture(make_control(), fn, f"_plan_{key}_w{gk[1]}")
        entry[0].replay()
        return entry[1]

    def _capture(self, control, fn=None, name="_plan"):
        b, ws, dev = self.backend, self.ws, self.backend.device
        t = clock(dev)
        model = self.model

        def forward(step):  # a plan's writes (KV at the step's slots, held masks, saved states) are its replay's again
            with controlled(model, control):
                return ws.verify_step(step)

        out = None
        if ws.compiled is not None and self.set.compile_error is None:  # a failed compile is not tried again
            try:
                step = compiled_copy(fn or _verify, ws.compiled, name)
                out = capture.record(lambda: forward(step), dev, warmup=3)
                self.set.compiled += 1
            except Exception as e:  # noqa: BLE001 - any compile failure: the eager step is captured instead
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                self.set.compile_error = f"{type(e).__name__}: {e}"[:500]
        if out is None:
            out = capture.record(lambda: forward(fn), dev)  # warm-up on the step's real inputs, then the capture
        b.compile_seconds += clock(dev) - t
        self.captures += 1
        return out

    def defragment(self, order: torch.Tensor) -> None:
        """The backend moved each row's slots (``order`` (B, L): new slot j holds old slot order[b, j])."""
        held = self.set.held
        held.copy_(held.gather(2, order[None].expand(held.shape[0], -1, -1)))


def bind_static(backend, plans: LayerPlans, step) -> None:
    """Make ``step(backend)`` run in place of the backend's plain verify forward for this request."""
    kv = getattr(backend, "kv", None)
    if kv is not None:
        raise ValueError(
            f"{kv.name} can't be composed with a layer-skipping method on the static engine (a replaced layer "
            "writes no KV, while the streaming rings append every accepted token); leave cache_implementation unset "
            "(the dynamic engine runs this composition)."
        )
    backend.step = step
    backend.plans = plans


__all__ = ["LayerPlans", "PlanControl", "PlanSet", "bind_static"]
