"""LoRA-Drop training: the drop schedule simulated in one parallel forward, distilled from the model's own
next-token distribution (or next-token loss on the data, ``--distill ce``), only the LoRAs train.

:func:`simulate` is the parallel twin of the step-by-step decoding in adapters/lora_drop.py: columns before
``start`` are the prompt (every layer runs), column ``start + s`` is decoding step s, a refresh step when
``s % period == 0``. A droppable layer hides the keys of drop columns (it stores no KV for them at inference),
and its output at a drop column is rebuilt from its refresh update at the step's refresh column plus the LoRA
correction, exactly as ``drop_output`` does at inference. Tests check the two agree token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import models
from ..adapters.lora_drop import drop_output
from ..engine.layers import LayerControl, controlled
from ..engine.tree import _additive


class _Simulated(LayerControl):
    def __init__(self, droppable, drop_cols, refresh_of, loras, reuse):
        self.droppable, self.drop, self.refresh_of, self.loras, self.reuse = droppable, drop_cols, refresh_of, loras, reuse

    def layer(self, i, call):
        if i not in self.droppable:
            return call.run()
        x = call.hidden
        hide = self.drop[None, :].expand(x.shape[0], -1)
        out = call.run(hide=hide)
        h = models.layer_output_hidden(out)
        saved = (h - x if self.reuse == "delta" else h)[:, self.refresh_of]  # (B, T, H): the step's refresh column
        dropped = drop_output(x, saved, self.loras, i, self.reuse)
        return models.replace_layer_output(out, torch.where(self.drop[None, :, None], dropped, h))


def _causal_inputs(model, ids, mask) -> tuple:
    """(additive masks, position ids) of one causal forward over ``ids`` (left or right padded, ``mask`` 1 = real)."""
    t, dev = ids.shape[1], ids.device
    mask = mask.bool()
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    vis = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & mask[:, None, :]
    vis = vis | torch.eye(t, dtype=torch.bool, device=dev)[None]  # padding queries see themselves (no NaN rows)
    return _additive(models.attention_layout(model), vis, pos, pos, next(model.parameters()).dtype), pos


def simulate(model, ids, mask, start: int, period: int, droppable, loras=None, reuse: str = "delta"):
    """Logits (B, T, V) of LoRA-Drop decoding replayed over ``ids`` (left or right padded, ``mask`` 1 = real),
    decoding starting at column ``start``."""
    t, dev = ids.shape[1], ids.device
    col = torch.arange(t, device=dev)
    step = col - start
    drop = (step >= 0) & (step % period != 0)
    refresh_of = torch.where(step >= 0, start + (step.clamp_min(0) // period) * period, col)
    masks, pos = _causal_inputs(model, ids, mask)
    control = _Simulated(frozenset(droppable), drop, refresh_of, loras, reuse)
    with controlled(model, control):
        return model(input_ids=ids, attention_mask=masks, position_ids=pos).logits


def full_logits(model, ids, mask):
    """The model's own logits (B, T, V) over ``ids`` (every layer at every column), same masks as :func:`simulate`."""
    masks, pos = _causal_inputs(model, ids, mask)
    return model(input_ids=ids, attention_mask=masks, position_ids=pos).logits


def make_loss(loras, model, distill: str = "kl"):
    """``distill="kl"`` (default): the loss at every decoding column is KL(model || LoRA-Drop) against the model's
    own next-token distribution (one more forward, no gradient), and ``top1`` is the greedy agreement with the model
    (its argmax), the figure the bench reports; the decoding columns may fall in a human-written prompt, where the
    data's next token is not what the model would say. ``"ce"``: next-token cross-entropy on the data and ``top1``
    against the data (the trainer before 2026-12-02)."""
    if distill not in ("kl", "ce"):
        raise ValueError(f"lora_drop training: distill must be 'kl' or 'ce', got {distill!r}")

    def loss_fn(ids, mask):
        t = ids.shape[1]
        lo, hi = max(1, t // 8), max(2, t // 2)
        if loras.training:
            start = int(torch.randint(lo, hi, ()).item())
        else:
            start = (lo + hi) // 2  # held-out: a fixed split, comparable across evaluations
        logits = simulate(model, ids, mask, start, loras.period, loras.droppable, loras, loras.reuse).float()
        pred, target = logits[:, start - 1 : -1], ids[:, start:]
        valid = mask[:, start:].bool()
        n = valid.sum().clamp_min(1)
        if distill == "kl":
            with torch.no_grad():
                teacher = full_logits(model, ids, mask).float()[:, start - 1 : -1].log_softmax(-1)
            per = (teacher.exp() * (teacher - pred.log_softmax(-1))).sum(-1)
            target = teacher.argmax(-1)
        else:
            per = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")
        loss = (per * valid).sum() / n
        agree = ((pred.argmax(-1) == target) & valid).sum() / n
        return loss, {"loss": loss.detach(), "top1": agree.detach()}

    return loss_fn


# ---- hf-accel train lora_drop (train/registry.py) ---------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--period", type=int, default=4, help="a refresh step every N steps")
    p.add_argument("--droppable", type=lambda t: [int(x) for x in t.split(",") if x], default=None,
                   help="comma list of droppable layers (default: all but every 4th from layer 0)")
    p.add_argument("--reuse", choices=("delta", "output"), default="delta", help="what drop steps reuse")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--distill", choices=("kl", "ce"), default="kl",
                   help="kl: match the model's own next-token distribution (top1 = greedy agreement); ce: the data's")


def build(args, model, device, tok):
    from ..adapters.lora_drop import DropLoRAs

    module = DropLoRAs(model, droppable=args.droppable, period=args.period, rank=args.rank,
                       reuse=args.reuse).to(device)
    return module, make_loss(module, model, distill=getattr(args, "distill", "kl")), "lora_drop", "adapter"
