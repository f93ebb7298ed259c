"""The conformance table: one entry per registered method, read by tests/test_conformance.py.

An entry is a list of cases. A case is ``(label, kind, build)``: ``build(model, family)`` returns the method's
accel_kwargs for ``model`` (building a tiny trained part where the method needs one: random weights, not trained,
since the properties checked here hold for any weights), and ``kind`` says what the suite asserts:

* ``"lossless"``: token-identical to vanilla greedy;
* ``"identity"``: a lossy method's setting that makes it vanilla (LoRA-Drop refreshing every step, M2R2 never
  exiting, EAD's small model = the large one, DuoAttention's window over everything, LUD accepting nothing extra);
* ``"runs"``: a lossy setting; it runs and returns the right shape.

``MISSING[method]`` (optional) builds options whose trained part can't be found: ``missing_artifacts`` must say so
and generate must refuse them.

Trained parts and second models are built once per (case, family) and reused (the suite checks the model is left
unchanged by every call, so sharing is safe)."""

from __future__ import annotations

import functools

import torch

from conftest import prompts, tiny_model

LAYERS = 4  # conformance models: 4 layers (layer methods need a few to skip / exit between)
NOWHERE = "/nonexistent/hf_accel-artifact"


@functools.lru_cache(maxsize=None)
def model_for(family: str):
    return tiny_model(family, seed=0, layers=LAYERS)


def _once(fn):
    """Cache a builder per family (the model is model_for(family), so one part per model object)."""
    cached = functools.lru_cache(maxsize=None)(lambda family: fn(model_for(family), family))
    return lambda model, family: cached(family)


# ---- trained parts (random weights) ---------------------------------------------------------------------------


@_once
def _store(model, family):
    """A small datastore from the model's own sampled text: drafts partly right, partly wrong."""
    from hf_accel.data.trigram import TrigramStore

    torch.manual_seed(1)
    ids, mask = prompts([6, 9], seed=5)
    out = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=30, top_k=8)
    return TrigramStore.from_token_docs([r.tolist() for r in out], vocab_size=model.config.vocab_size)


@_once
def _clover(model, family):
    from hf_accel.adapters.clover import CloverHeads

    torch.manual_seed(0)
    return CloverHeads(model, depth=3)


@_once
def _maps(model, family):
    from hf_accel.adapters.hidden_transfer import TransferMaps

    torch.manual_seed(0)
    maps = TransferMaps(model, k=3)
    with torch.no_grad():
        maps.weight.add_(torch.randn_like(maps.weight) * 0.3)
    return maps


@_once
def _gates(model, family):
    from hf_accel.adapters.duo_attention import DuoGates

    torch.manual_seed(0)
    gates = DuoGates(model)
    with torch.no_grad():
        gates.gates.uniform_()
    return gates


@_once
def _small(model, family):
    return tiny_model(family, seed=4, layers=1)


@_once
def _loras(model, family):
    from hf_accel.adapters.lora_drop import DropLoRAs

    torch.manual_seed(1)
    loras = DropLoRAs(model)
    with torch.no_grad():
        for lin in loras.up.values():
            lin.weight.normal_(std=0.3)
    return loras


@_once
def _lud(model, family):
    from hf_accel.adapters.lud import LUDLoRA

    torch.manual_seed(0)
    lora = LUDLoRA(model, placeholder_id=3, k=4, rank=4)
    with torch.no_grad():
        for b in lora.B:
            b.normal_(std=0.5)
    return lora


@_once
def _rr(model, family):
    from hf_accel.adapters.m2r2 import RateResiduals

    torch.manual_seed(1)
    rr = RateResiduals(model, exit_layer=2, rank=4)
    with torch.no_grad():
        rr.up.normal_(std=0.2)
        rr.rate.normal_(std=0.2)
    return rr


@_once
def _rr_mixed(model, family):
    from hf_accel.adapters.m2r2 import RateResiduals

    torch.manual_seed(3)
    rr = RateResiduals(model, exit_layer=2, rank=4)
    with torch.no_grad():
        rr.up.normal_(std=0.2)
        rr.rate.normal_(std=0.2)
        rr.router.weight.normal_(std=3.0)  # exits on some steps, not others
    return rr


@_once
def _draft(model, family):
    return tiny_model(family, seed=1, layers=1)


# ---- the table ----------------------------------------------------------------------------------------------------

METHODS = {
    "aded": [
        ("prompt", "lossless", lambda m, f: {"datastore": None, "max_nodes": 12}),
        ("store-mcts", "lossless", lambda m, f: {"datastore": _store(m, f), "search": "mcts", "mcts_iterations": 40,
                                                 "max_nodes": 12}),
    ],
    "clover": [("heads", "lossless", lambda m, f: {"heads": _clover(m, f)})],
    "duo_attention": [
        ("small-window", "runs", lambda m, f: {"pattern": _gates(m, f), "sink": 2, "recent": 4, "slack": 2}),
        ("full-window", "identity", lambda m, f: {"pattern": _gates(m, f), "sink": 64, "recent": 256}),
    ],
    "ead": [
        ("small", "runs", lambda m, f: {"small_model": _small(m, f), "threshold": 2.0, "min_run": 2, "window": 2}),
        ("small-is-large", "identity", lambda m, f: {"small_model": m, "threshold": 2.0, "min_run": 2, "window": 2}),
    ],
    "hidden_transfer": [("maps", "lossless", lambda m, f: {"heads": _maps(m, f)})],
    "lora_drop": [
        ("period-4", "runs", lambda m, f: {"adapter": _loras(m, f)}),
        ("period-1", "identity", lambda m, f: {"adapter": _loras(m, f), "period": 1}),
    ],
    "lud": [
        ("lossless", "lossless", lambda m, f: {"adapter": _lud(m, f), "lossless": True, "beta": 0.0}),
        ("lossy", "runs", lambda m, f: {"adapter": _lud(m, f), "beta": 0.5}),
        ("beta-1", "identity", lambda m, f: {"adapter": _lud(m, f), "beta": 1.0}),
    ],
    "m2r2": [
        ("self-spec", "lossless", lambda m, f: {"adapter": _rr(m, f), "k": 3}),
        ("early-exit", "runs", lambda m, f: {"adapter": _rr_mixed(m, f), "mode": "early_exit", "threshold": 0.5}),
        ("never-exit", "identity", lambda m, f: {"adapter": _rr(m, f), "mode": "early_exit", "threshold": 1.0}),
    ],
    "quant_spec": [
        ("aded>draft>target", "lossless", lambda m, f: {"draft_model": _draft(m, f), "aded": {"datastore": None}}),
        ("draft>copy>target", "lossless", lambda m, f: {"draft_model": _draft(m, f), "drafter": "model",
                                                          "intermediate": _twin(m, f), "width": 3}),
    ],
}


@_once
def _twin(model, family):
    """The target's twin (same weights): quant_spec's intermediate that gets long sequences accepted."""
    return tiny_model(family, seed=0, layers=LAYERS)


MISSING = {
    "clover": lambda m, f: {"heads": NOWHERE},
    "hidden_transfer": lambda m, f: {"heads": NOWHERE},
    "duo_attention": lambda m, f: {"pattern": NOWHERE},
    "ead": lambda m, f: {},
    "lora_drop": lambda m, f: {"adapter": NOWHERE},
    "lud": lambda m, f: {"adapter": NOWHERE},
    "m2r2": lambda m, f: {"adapter": NOWHERE},
    "quant_spec": lambda m, f: {"drafter": "model"},
}


def cases() -> list:
    """(method, label, kind, build) of every case in the table."""
    return [(name, label, kind, build) for name, entry in METHODS.items() for label, kind, build in entry]
