"""A draft model of our own: a shallow model of the target's family and tokenizer, distilled from the target.

``shallow_copy(model, n)`` builds it: the target's config with n decoder layers (per-layer settings such as
``layer_types`` follow the layers kept), the target's embeddings, final norm and LM head, and n of the target's
layers, evenly spaced with the first and the last included. ``make_loss`` distils it: KL from the target's
next-token distribution to the draft's over every real position of self-distilled ShareGPT text; metrics held-out
KL and top-1 agreement with the target. ``hf-accel train draft`` runs it and saves with ``save_pretrained``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .. import models

def kept_layers(n_target: int, n: int) -> list:
    if not 1 <= n <= n_target:
        raise ValueError(f"a draft model needs 1..{n_target} layers for this {n_target}-layer target; got {n}")
    if n == 1:
        return [0]
    return sorted({round(i * (n_target - 1) / (n - 1)) for i in range(n)})


def shallow_copy(model, n: int):
    from transformers import AutoModelForCausalLM

    n_target = models.dims(model)["layers"]
    keep = kept_layers(n_target, n)
    cfg = models.config_with_layers(model, keep)
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    draft = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype, attn_implementation=attn)
    prefix = next(n_ for n_, m in model.named_modules() if m is models.layers(model)) + "."
    src = model.state_dict()
    state = {}
    for key in draft.state_dict():
        if key.startswith(prefix):
            j, rest = key[len(prefix):].split(".", 1)
            state[key] = src[f"{prefix}{keep[int(j)]}.{rest}"]
        else:
            state[key] = src[key]
    draft.load_state_dict(state)
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.to(model.device).eval()


def make_loss(draft, model):
    def loss_fn(ids, mask):
        valid = mask.bool()
        with torch.no_grad():
            teacher = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        student = torch.log_softmax(draft(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)
        n = valid.sum().clamp_min(1)
        loss = (kl * valid).sum() / n
        agree = ((student.argmax(-1) == teacher.argmax(-1)) & valid).sum() / n
        return loss, {"loss": loss.detach(), "top1": agree.detach()}

    return loss_fn


# ---- hf-accel train draft (train/registry.py) -------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the draft model")


def build(args, model, device, tok):
    module = shallow_copy(model, args.layers)
    module.requires_grad_(True)
    return module, make_loss(module, model), "draft", "small_model"


__all__ = ["shallow_copy", "kept_layers", "make_loss", "add_arguments", "build"]
