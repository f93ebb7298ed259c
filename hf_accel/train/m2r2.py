"""M2R2 training: one forward of the frozen target per batch, the fast stream followed beside it.

The normal stream's layer updates don't depend on the fast stream, so one forward gives both the teacher (the
full model's next-token distribution) and the student (the exit logits of f_E, built by the same FastStream
control that runs at inference). Loss: KL from the teacher's distribution to the exit logits'
over every real position, plus the router's binary cross-entropy on "exit argmax == full argmax" (its inputs
detached, so it does not pull on the stream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters.m2r2 import FastStream, M2R2Config
from ..engine.layers import controlled


def make_loss(rr, model, threshold: float = M2R2Config.threshold):  # exit metrics at early exit's default
    def loss_fn(ids, mask):
        control = FastStream(rr, "capture")
        with controlled(model, control):
            teacher = model(input_ids=ids, attention_mask=mask).logits.float()
        f = control.f
        student = rr.exit_logits(f).float()
        valid = mask.bool()
        n = valid.sum().clamp_min(1)
        t_logp = torch.log_softmax(teacher, -1)
        kl = (t_logp.exp() * (t_logp - torch.log_softmax(student, -1))).sum(-1)
        kl_loss = (kl * valid).sum() / n
        agree = (student.argmax(-1) == teacher.argmax(-1))
        r = rr.router_logit(f.detach(), student.detach())
        bce = F.binary_cross_entropy_with_logits(r, agree.float(), reduction="none")
        router_loss = (bce * valid).sum() / n
        exits = (torch.sigmoid(r) >= threshold) & valid
        n_exit = exits.sum().clamp_min(1)
        metrics = {
            "loss": kl_loss.detach(),
            "top1": ((agree & valid).sum() / n).detach(),
            "router_loss": router_loss.detach(),
            f"exit_rate@{threshold}": (exits.sum() / n).detach(),
            f"exit_agree@{threshold}": ((agree & exits).sum() / n_exit).detach(),
        }
        return kl_loss + router_loss, metrics

    return loss_fn


# ---- hf-accel train m2r2 (train/registry.py) --------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--layer", type=int, default=None, help="exit layer E (layers run; default: the adapter's choice)")
    p.add_argument("--rank", type=int, default=32, help="adapter rank")


def build(args, model, device, tok):
    from ..adapters.m2r2 import RateResiduals

    module = RateResiduals(model, exit_layer=args.layer, rank=args.rank).to(device)
    return module, make_loss(module, model), "m2r2", "adapter"
