"""LUD training: lexical units marked by a teacher-forced pass, placeholder predictions trained inside them.

One forward per batch: the real tokens (base model: the LoRA is off at real positions, so their logits are the
teacher-forced pass that marks lexical units — maximal runs of tokens whose probability under the model is
>= ``alpha``) plus, after random anchors a, chains of k−1 placeholder positions (``train/data.anchored_chains``,
built as at inference). Placeholder j of anchor a stands for token a+1+j and is trained to predict x_{a+j+2} when
x_{a+2} .. x_{a+j+2} all belong to the unit that continues after x_{a+1} (tokens after a unit's first, predicted from
placeholder inputs, as the paper's rewritten data); other targets are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import models
from .data import anchored_chains


def make_loss(lora, model, alpha: float = 0.6, anchors: int = 32):
    layout = models.attention_layout(model)
    m = lora.k - 1

    def loss_fn(ids, mask):
        b, t = ids.shape
        dev = ids.device
        lengths = mask.bool().sum(1)
        gen = None if lora.training else torch.Generator(device=dev).manual_seed(0)
        tokens, pos, masks, a_k, j = anchored_chains(ids, mask, anchors, m, m + 2, layout,
                                                     next(model.parameters()).dtype, gen, fill=lora.placeholder_id)
        where = torch.zeros(tokens.shape, dtype=torch.bool, device=dev)
        where[:, t:] = True
        with lora.applied(where):
            logits = model(input_ids=tokens, attention_mask=masks, position_ids=pos).logits.float()
        with torch.no_grad():
            p_next = torch.softmax(logits[:, : t - 1], -1).gather(2, ids[:, 1:, None]).squeeze(-1)  # p(x_{i+1})
            high = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=dev), p_next >= alpha], 1)  # per token
            tgt_idx = (a_k + j + 2).clamp(max=t - 1)
            inside = high.gather(1, tgt_idx) & ((a_k + j + 2) < lengths[:, None])
            valid = inside.view(b, anchors, m).long().cumprod(-1).view(b, -1).bool()
        target = ids.gather(1, tgt_idx)
        student = logits[:, t:]
        ce = F.cross_entropy(student.transpose(1, 2), target, reduction="none")
        n = valid.sum().clamp_min(1)
        loss = (ce * valid).sum() / n
        hit = (student.argmax(-1) == target) & valid
        metrics = {"loss": loss.detach(), "unit_tokens": (valid.sum() / valid.numel()).detach()}
        for i in range(m):
            sel = valid & (j == i)
            metrics[f"top1_ph{i + 1}"] = (hit[sel].sum() / sel.sum().clamp_min(1)).detach()
        return loss, metrics

    return loss_fn
