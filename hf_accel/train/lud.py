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

import contextlib
import threading

from torch import nn

from .. import models
from ..adapters.lud import LUDLoRA
from .data import anchored_chains


class PeftLUD(nn.Module):
    """LUD's per-projection LoRA trained through peft: ``inject_adapter_in_model`` puts peft LoRA layers on every
    projection of the decoder layers (same rank, alpha and targets as ``LUDLoRA(targets="projections")``), and a
    hook on each ``lora_B`` keeps its contribution to placeholder positions only. ``save_pretrained`` exports the
    weights into a LUDLoRA artifact (decoding never needs peft). The peft layers stay in this (training) model."""

    def __init__(self, model, placeholder_id: int, k: int = 4, rank: int = 16, alpha: float = 32.0):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model
        from transformers.pytorch_utils import Conv1D

        self.spec = LUDLoRA(model, placeholder_id, k=k, rank=rank, alpha=alpha, targets="projections")
        self.spec.requires_grad_(False)
        projections = models.projections(model)
        names = [n for n, _ in projections]
        conv = any(isinstance(m, Conv1D) for _, m in projections)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names,
                         fan_in_fan_out=conv)
        inject_adapter_in_model(cfg, model)
        mods = dict(model.named_modules())
        self.pairs = nn.ModuleList(nn.ModuleList([mods[n].lora_A["default"], mods[n].lora_B["default"]]) for n in names)
        for a, b in self.pairs:
            a.weight.requires_grad_(True)
            b.weight.requires_grad_(True)
        self.placeholder_id, self.k = self.spec.placeholder_id, self.spec.k
        self.__dict__["base"] = model

    @contextlib.contextmanager
    def applied(self, where):
        owner = threading.get_ident()
        w = where[..., None].to(self.pairs[0][1].weight.dtype)
        handles = []

        def hook(module, args, output):
            if threading.get_ident() != owner:
                return None
            return output * w.reshape(*output.shape[:-1], 1).to(output.dtype)

        try:
            for _, b in self.pairs:
                handles.append(b.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()

    def init_from(self, tensors: dict) -> None:
        """Start from a LUDLoRA(targets="projections") artifact's tensors (``hf-accel train lud --init``)."""
        self.spec.load_state_dict({k: v.float() for k, v in tensors.items()})
        with torch.no_grad():
            for i, (a, b) in enumerate(self.pairs):
                a.weight.copy_(self.spec.A[i])
                b.weight.copy_(self.spec.B[i])

    def export(self) -> LUDLoRA:
        with torch.no_grad():
            for i, (a, b) in enumerate(self.pairs):
                self.spec.A[i].copy_(a.weight)
                self.spec.B[i].copy_(b.weight)
        return self.spec

    def save_pretrained(self, path, metrics=None, command=None):
        return self.export().save_pretrained(path, metrics, command)


def make_loss(lora, model, alpha: float = 0.6, anchors: int = 32):
    """``lora``: a LUDLoRA, or a PeftLUD (the same adapters as peft LoRA layers inside the model)."""
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


# ---- hf-accel train lud (train/registry.py) ---------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--depth", type=int, default=4, help="k: predictions per forward (default 4)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank (default 32; 16 with --targets projections)")
    p.add_argument("--alpha", type=float, default=0.6, help="probability that marks lexical-unit tokens")
    p.add_argument("--anchors", type=int, default=32, help="placeholder chains per sequence")
    p.add_argument("--targets", choices=("layers", "projections"), default="layers",
                   help="one adapter per decoder layer, or a LoRA on every projection (trained through peft)")
    p.add_argument("--placeholder-id", type=int, default=None,
                   help="token id used as placeholder (default: an unused special token of the tokenizer)")


def build(args, model, device, tok):
    from ..adapters.lud import placeholder_from_tokenizer

    ph = args.placeholder_id if args.placeholder_id is not None else placeholder_from_tokenizer(tok)
    if args.targets == "projections":  # a LoRA on every projection, trained through peft
        module = PeftLUD(model, placeholder_id=ph, k=args.depth, rank=args.rank or 16).to(device)
    else:
        module = LUDLoRA(model, placeholder_id=ph, k=args.depth, rank=args.rank or 32).to(device)
    return module, make_loss(module, model, alpha=args.alpha, anchors=args.anchors), "lud", "adapter"
