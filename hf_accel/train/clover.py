"""Clover heads' loss: per depth i, soft cross-entropy to the target's next-token distribution plus smooth-L1 to
the target's hidden state, weighted 0.7^i (Clover-2); inputs teacher-forced on self-distilled text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import models

DECAY = 0.7
HIDDEN_WEIGHT = 0.5  # smooth-L1 on hidden states, beside the soft cross-entropy (weight 1)


def make_loss(heads, model, depth: int):
    def loss_fn(ids, mask):
        mask = mask.bool()
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            hid = models.decoder(model)(input_ids=ids, attention_mask=mask.long(), position_ids=pos).last_hidden_state
            teacher = models.logits_from_hidden(model, hid).float()
        t = ids.shape[1]
        c, _ = heads.augment(hid[:, :-1], ids[:, 1:], pos[:, :-1], key_valid=mask[:, :-1])
        total = 0.0
        metrics = {}
        state = c
        for i in range(min(depth, t - 1)):
            if i == 0:
                h, state = heads.first(state)
            else:
                h, state = heads.next(state[:, : t - 1 - i], ids[:, 1 + i : t])
            tgt_h = hid[:, 1 + i : t]
            tgt = teacher[:, 1 + i : t]
            valid = (mask[:, 1 + i : t] & mask[:, : t - 1 - i]).float()
            n = valid.sum().clamp_min(1.0)
            logits = heads.logits(h).float()
            ce = -(torch.softmax(tgt, -1) * torch.log_softmax(logits, -1)).sum(-1)
            sl1 = F.smooth_l1_loss(h.float(), tgt_h.float(), reduction="none").mean(-1)
            total = total + DECAY**i * (((ce + HIDDEN_WEIGHT * sl1) * valid).sum() / n)
            agree = ((logits.argmax(-1) == tgt.argmax(-1)).float() * valid).sum() / n
            metrics[f"top1_head{i + 1}"] = agree.detach()
        metrics["loss"] = total.detach()
        return total, metrics

    return loss_fn


# ---- hf-accel train clover (train/registry.py) ------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--depth", type=int, default=4, help="heads: tokens drafted per step (default 4)")


def build(args, model, device, tok):
    from ..adapters.clover import CloverHeads

    module = CloverHeads(model, depth=args.depth).to(device)
    return module, make_loss(module, model, args.depth), "clover", "heads"
