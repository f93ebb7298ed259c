"""Hidden-transfer maps' loss: pseudo positions built exactly as at inference (scratch chains after anchor tokens,
layer-t output replaced by the transfer), KL to the target's own distribution at the matching real position."""

from __future__ import annotations

import torch

from .. import models
from ..engine.tree import _additive


def make_loss(maps, model, anchors: int = 32):
    layout = models.attention_layout(model)
    k = maps.k

    def loss_fn(ids, mask):
        b, t = ids.shape
        dev = ids.device
        mask = mask.bool()
        lengths = mask.sum(1)
        hi = (lengths - 1 - k).clamp_min(1)  # anchor a needs real positions a+1..a+k
        # held-out evaluation (module in eval mode) uses fixed anchors, so its numbers compare across evaluations
        gen = None if maps.training else torch.Generator(device=dev).manual_seed(0)
        anc = (torch.rand(b, anchors, device=dev, generator=gen) * hi[:, None]).long()  # (B, A)
        a_k = anc[:, :, None].expand(-1, -1, k).reshape(b, -1)  # (B, A*k): anchor of every pseudo slot
        j = torch.arange(k, device=dev).repeat(anchors)[None].expand(b, -1)  # (B, A*k) map index
        tokens = torch.cat([ids, ids.gather(1, a_k)], 1)
        pos = torch.cat([torch.arange(t, device=dev)[None].expand(b, -1), a_k + j + 1], 1)
        q = t + anchors * k
        vis = torch.zeros(b, q, q, dtype=torch.bool, device=dev)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        vis[:, :t, :t] = causal[None] & mask[:, None, :]
        real = torch.arange(t, device=dev)
        vis[:, t:, :t] = (real[None, None, :] <= a_k[:, :, None]) & mask[:, None, :]
        grp = torch.arange(anchors, device=dev).repeat_interleave(k)
        jj = torch.arange(k, device=dev).repeat(anchors)
        vis[:, t:, t:] = ((grp[:, None] == grp[None, :]) & (jj[None, :] <= jj[:, None]))[None]
        masks = _additive(layout, vis, pos, pos, next(model.parameters()).dtype)
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
