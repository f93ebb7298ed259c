"""``hf-accel train <method>``: which train module trains which method, beside the method registry.

Each module named here declares, for the command line:

* ``DEFAULTS``: the shared options (``batch``, ``seq_len``, ``lr``) where it differs from :data:`COMMON_DEFAULTS`;
* ``add_arguments(parser)``: its own options (``--depth``, ``--rank``, ...), with their defaults and help;
* ``build(args, model, device, tok) -> (module, loss_fn, artifact kind, accel_kwargs key)``: its trainee, which the
  shared fit loop (train/loop.py) trains on self-distilled data; or ``run(args) -> int``: its own data and loop.

A new trained method is its train file and one line in :data:`TRAINERS`. Names are the method registry's
(``accel=`` names); ``draft`` trains the small model of ``ead`` / ``quant_spec``. The old command-line spellings are
kept as aliases. Importing this module imports nothing heavy (the command line's ``--help`` stays fast).
"""

from __future__ import annotations

import importlib

TRAINERS = {  # name -> module under hf_accel.train
    "clover": "clover",
    "hidden_transfer": "hidden_transfer",
    "lora_drop": "lora_drop",
    "m2r2": "m2r2",
    "lud": "lud",
    "duo_attention": "duo",
    "draft": "draft",
}
ALIASES = {"hidden-transfer": "hidden_transfer", "lora-drop": "lora_drop", "duo": "duo_attention",
           "duo-attention": "duo_attention"}
COMMON_DEFAULTS = {"batch": 8, "seq_len": 512, "lr": 1e-3}


def names() -> list:
    """Every accepted spelling: registry names first, then the aliases."""
    return list(TRAINERS) + list(ALIASES)


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TRAINERS:
        raise ValueError(f"no trainer for {name!r}: hf-accel train takes {', '.join(TRAINERS)}")
    return name


def module(name: str):
    """The train module of ``name`` (an alias works too)."""
    return importlib.import_module(f"{__package__}.{TRAINERS[canonical(name)]}")


def defaults(name: str) -> dict:
    return {**COMMON_DEFAULTS, **getattr(module(name), "DEFAULTS", {})}


__all__ = ["TRAINERS", "ALIASES", "COMMON_DEFAULTS", "names", "canonical", "module", "defaults"]
