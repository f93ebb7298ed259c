"""LoRA-Drop training: the drop schedule simulated in one parallel forward, next-token loss, only the LoRAs train.

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


def simulate(model, ids, mask, start: int, period: int, droppable, loras=None, reuse: str = "delta"):
    """Logits (B, T, V) of LoRA-Drop decoding replayed over ``ids`` (left or right padded, ``mask`` 1 = real),
    decoding starting at column ``start``."""
    b, t = ids.shape
    dev = ids.device
    mask = mask.bool()
    col = torch.arange(t, device=dev)
    step = col - start
    drop = (step >= 0) & (step % period != 0)
    refresh_of = torch.where(step >= 0, start + (step.clamp_min(0) // period) * period, col)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    vis = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & mask[:, None, :]
    vis = vis | torch.eye(t, dtype=torch.bool, device=dev)[None]  # padding queries see themselves (no NaN rows)
    masks = _additive(models.attention_layout(model), vis, pos, pos, next(model.parameters()).dtype)
    control = _Simulated(frozenset(droppable), drop, refresh_of, loras, reuse)
    with controlled(model, control):
        return model(input_ids=ids, attention_mask=masks, position_ids=pos).logits


def make_loss(loras, model):
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
        ce = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")
        n = valid.sum().clamp_min(1)
        loss = (ce * valid).sum() / n
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


def build(args, model, device, tok):
    from ..adapters.lora_drop import DropLoRAs

    module = DropLoRAs(model, droppable=args.droppable, period=args.period, rank=args.rank,
                       reuse=args.reuse).to(device)
    return module, make_loss(module, model), "lora_drop", "adapter"
