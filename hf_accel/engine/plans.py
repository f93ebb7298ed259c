"""Layer plans on the static engine: steps that run some decoder layers and replace others, one CUDA graph per plan.

A *plan* is what a step does with each decoder layer: run it, or replace its output without running it (no KV
written). LoRA-Drop has two plans (refresh: every layer runs; drop: the droppable layers are replaced), M2R2's early
exit two (the lower stack + exit head + router; the upper stack from the lower stack's saved output). Which plan a
step runs is host logic between replays; each plan is captured once per request as a CUDA graph over the static
engine's buffers (engine/backends.StaticBackend) and replayed (on CPU, or with ``disable_compile=True``, the same
code runs eagerly). Plans are run through the layer control of engine/layers.py.

Per-layer slot validity. The static engine keeps one slot layout for all layers: ``slot_valid`` (B, L) and
``slot_pos``. A layer that was replaced on some steps holds no KV at those steps' slots. Layers that run and are
replaced on the same steps form a *group*; :class:`LayerPlans` keeps, per group, a device mask ``held`` (G, B, L)
of fixed shape: the slots whose KV the group's layers wrote. A group's layers attend through the engine's mask with
the columns they don't hold hidden (``LayerCall.run(hide=...)``). Every planned forward first marks its own slots
(``region``) held by every group, and a plan that replaces a group marks them not held again: both are device ops
inside the graph, so nothing about a slot's layout is read on the host. Layers in no group always run (they hold
every valid slot, as on the plain engine).

Plan graphs are eager forwards captured as CUDA graphs (not torch.compile'd: the layer control is Python that a
graph capture records once, while the compiler would trace it again for every plan and control object).
"""

from __future__ import annotations

import torch

from .backends import clock
from .layers import LayerCall, LayerControl, controlled


class PlanControl(LayerControl):
    """A layer control run inside a plan. Subclasses implement :meth:`layer` with :meth:`run` (a layer of
    ``group``, masked to the slots the group holds) and :meth:`replaced` (the group's layers write no KV for this
    step). Everything a plan reads or writes between steps must live in device buffers allocated outside it."""

    def __init__(self, plans: "LayerPlans"):
        self.plans = plans
        self._hide: dict = {}
        self._marked: set = set()

    def _call(self, index, layer, args, kwargs):
        if index == 0:
            self._hide, self._marked = {}, set()
            self.plans.held.index_fill_(2, self.plans.region, True)  # this step's slots: held until replaced
            self._template = self.plans.template  # a plan that replaces layer 0 returns what the layers return
        out = self.layer(index, LayerCall(index, layer, args, kwargs, self))
        if index == 0 and self.plans.template is None:
            self.plans.template = self._template = out
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


class LayerPlans:
    """Per request: the plan graphs and the per-group slot masks over one :class:`StaticBackend`'s workspace.

    ``run(key, make_control)`` runs the backend's verify step (mask build, forward, argmax, over the inputs the
    backend has just copied in) under the plan ``key``; ``make_control()`` builds that plan's :class:`PlanControl`
    (called once per plan when graphs are used, every step when not)."""

    def __init__(self, backend, groups: int):
        ws = backend.ws
        self.backend, self.ws = backend, ws
        self.region = ws.region
        self.held = torch.ones(max(1, groups), ws.batch, ws.max_slots, dtype=torch.bool, device=backend.device)
        self._graphs: dict = {}
        self.captures = 0
        self.template = None  # a layer 0 output of this request (its structure: tensor or tuple)

    @property
    def model(self):
        return self.ws.model_ref()

    def run(self, key, make_control, fn=None):
        """``fn``: the step function in place of the engine's (backends._verify's signature and outputs), e.g. to
        compute a router from the logits inside the same graph."""
        b = self.backend
        if not b.use_graphs:
            with controlled(self.model, make_control()):
                return self.ws.verify_step(fn)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(make_control(), fn)
        entry[0].replay()
        return entry[1]

    def _capture(self, control, fn=None):
        b, ws, dev = self.backend, self.ws, self.backend.device
        t = clock(dev)
        side = torch.cuda.Stream(dev)
        with controlled(self.model, control):
            # warm-up on the step's real inputs: a plan's writes (KV at the step's slots, held masks, saved states)
            # are the ones its replay makes again
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    ws.verify_step(fn)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = ws.verify_step(fn)
        b.compile_seconds += clock(dev) - t
        self.captures += 1
        return graph, out

    def defragment(self, order: torch.Tensor) -> None:
        """The backend moved each row's slots (``order`` (B, L): new slot j holds old slot order[b, j])."""
        self.held.copy_(self.held.gather(2, order[None].expand(self.held.shape[0], -1, -1)))


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


__all__ = ["LayerPlans", "PlanControl", "bind_static"]
