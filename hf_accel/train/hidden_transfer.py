"""Hidden-transfer maps' loss: pseudo positions built exactly as at inference (scratch chains after anchor tokens,
layer-t output replaced by the transfer), KL to the target's own distribution at the matching real position."""

from __future__ import annotations

import torch

from .. import models
from .data import anchored_chains


def make_loss(maps, model, anchors: int = 32):
    layout = models.attention_layout(model)
    k = maps.k

    def loss_fn(ids, mask):
        b, t = ids.shape
        dev = ids.device
        lengths = mask.bool().sum(1)
        # held-out evaluation (module in eval mode) uses fixed anchors, so its numbers compare across evaluations
        gen = None if maps.training else torch.Generator(device=dev).manual_seed(0)
        tokens, pos, masks, a_k, j = anchored_chains(ids, mask, anchors, k, k + 1, layout,
                                                     next(model.parameters()).dtype, gen)
        rows = torch.arange(b, device=dev)[:, None].expand(-1, anchors * k).reshape(-1)
        dst = (t + torch.arange(anchors * k, device=dev))[None].expand(b, -1).reshape(-1)
        with maps.routed(rows, dst, a_k.reshape(-1), j.reshape(-1)):
            logits = model(input_ids=tokens, attention_mask=masks, position_ids=pos).logits.float()
        student = logits[:, t:]  # (B, A*k, V)
        teacher = logits[:, :t].detach().gather(1, (a_k + j + 1)[:, :, None].expand(-1, -1, logits.shape[-1]))
        valid = ((a_k + j + 1) < lengths[:, None]).float()
        n = valid.sum().clamp_min(1.0)
        ce = -(torch.softmax(teacher, -1) * torch.log_softmax(student, -1)).sum(-1)
        loss = (ce * valid).sum() / n
        agree = (student.argmax(-1) == teacher.argmax(-1)).float() * valid
        metrics = {"loss": loss.detach()}
        for i in range(k):
            sel = (j == i).float() * valid
            metrics[f"top1_pos{i + 1}"] = ((agree * sel).sum() / sel.sum().clamp_min(1.0)).detach()
        return loss, metrics

    return loss_fn


# ---- hf-accel train hidden_transfer (train/registry.py) ---------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--depth", type=int, default=3, help="pseudo positions (tokens drafted per step, default 3)")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose output is transferred (default: the adapter's choice)")
    p.add_argument("--anchors", type=int, default=32, help="pseudo chains per sequence")


def build(args, model, device, tok):
    from ..adapters.hidden_transfer import TransferMaps

    module = TransferMaps(model, layer=args.layer, k=args.depth).to(device)
    return module, make_loss(module, model, anchors=args.anchors), "hidden_transfer", "heads"
