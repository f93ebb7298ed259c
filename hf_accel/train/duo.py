"""DuoAttention gate training (arXiv 2410.10819): which KV heads need the whole context.

Every (layer, KV head) gets a gate g in [0, 1] (:class:`~hf_accel.adapters.duo_attention.DuoGates`, init 1). The
model stays frozen. Per batch of synthetic passkey samples (:mod:`hf_accel.data.passkey`):

* teacher: the model's own forward, full attention, no grad;
* student: the same forward where every attention head outputs ``g * full + (1 - g) * streaming``, ``g`` the gate of
  its KV head (GQA: the query heads of a group share it) and ``streaming`` attention restricted, among the slots
  the layer's own mask lets a query see (causality, padding, sliding window), to the first ``sink`` and the last
  ``recent`` (the Λ mask; the same rule as ``accel="duo_attention"`` at inference);
* loss = MSE of the final hidden states (the decoder's output, after the final norm) at the positions that predict
  the answer tokens + ``l1 * mean(|gates|)``; after each optimizer step the gates are clamped to [0, 1].

The mixing runs as an attention function registered with transformers' ``AttentionInterface`` (and the matching
mask function with ``AttentionMaskInterface``): :func:`mixing` switches the model's ``_attn_implementation`` to it
for the duration of one forward and restores it afterwards; the gates travel as a forward keyword argument, so
nothing per-batch lives on the model. The base attention the mix calls twice is the model's own: its family's eager
function for an eager model (Gemma2's logit softcap included), transformers' SDPA otherwise.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models
from ..adapters.duo_attention import DuoGates, default_pattern, pattern_from_scores
from ..patches.attention import implementation
from ..data import passkey

MIX_SDPA = "hf_accel_duo_train_sdpa"
MIX_EAGER = "hf_accel_duo_train_eager"
KWARG = "hf_accel_duo_mix"


@dataclass(frozen=True)
class Mix:
    """What the mixing attention needs for one forward: gates (layers, kv_heads) and the streaming window."""

    gates: torch.Tensor
    sink: int
    recent: int


# ---- the mixing attention ----------------------------------------------------------------------------------------


def streaming_keep(q_len: int, kv_len: int, sink: int, recent: int, device) -> torch.Tensor:
    """(q_len, kv_len) bool, the Λ mask of plain causal attention: query i (column kv_len - q_len + i) keeps the
    first ``sink`` columns and the ``recent`` latest ones up to itself."""
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    k = torch.arange(kv_len, device=device)[None, :]
    return (k <= qpos) & ((k < sink) | (qpos - k < recent))


def streaming_allowed(allowed: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """A streaming head's view of a bool ``allowed`` mask (..., kv): among the slots a query may see, only the
    first ``sink`` and the last ``recent`` in slot order. The rule DuoAttention's inference applies
    (adapters/duo_attention/), so padding is never counted and a sliding layer's sink slides with its window."""
    rank = allowed.to(torch.int32).cumsum(-1)  # 1-based rank of each visible slot in its query's row
    total = rank[..., -1:]
    return allowed & ((rank <= sink) | (rank > total - recent))


def streaming_mask(mask, q_len: int, kv_len: int, sink: int, recent: int, device):
    """The base attention mask restricted to the streaming view, in the base mask's format: a bool mask (SDPA: True
    = attend), an additive float mask (eager: 0 / dtype min), or None (pure causal; given back as bool)."""
    if mask is None:
        return streaming_keep(q_len, kv_len, sink, recent, device)[None, None]
    mask = mask[:, :, :, :kv_len]
    if mask.dtype == torch.bool:
        return streaming_allowed(mask, sink, recent)
    keep = streaming_allowed(mask > torch.finfo(mask.dtype).min / 2, sink, recent)
    return torch.where(keep, mask, torch.finfo(mask.dtype).min)


def _base_function(module, base: str):
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = models.eager_attention_of(module)
    if fn is None:
        raise models.UnsupportedModelError(
            f"duo training: {type(module).__module__} has no eager_attention_forward to mix; load the model with "
            "attn_implementation='sdpa'"
        )
    return fn


def _mix_function(base: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        mix = kwargs.pop(KWARG, None)
        fn = _base_function(module, base)
        if mix is None:  # a forward without gates (the teacher, or anyone else while training runs): plain attention
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise models.UnsupportedModelError(
                f"duo training: {type(module).__name__} has no layer_idx, so its gates can't be found"
            )
        full, weights = fn(module, query, key, value, attention_mask, *args, **kwargs)
        q_len, kv_len = query.shape[-2], key.shape[-2]
        smask = streaming_mask(attention_mask, q_len, kv_len, mix.sink, mix.recent, query.device)
        stream, _ = fn(module, query, key, value, smask, *args, **kwargs)
        heads = query.shape[1]
        g = mix.gates[layer]
        if heads % g.numel():
            raise models.UnsupportedModelError(
                f"duo training: {heads} query heads don't group evenly over {g.numel()} KV heads"
            )
        g = g.repeat_interleave(heads // g.numel()).to(full.dtype)
        # attention functions give (B, q_len, heads, head_dim)
        shape = (1, 1, heads, 1) if full.shape[2] == heads else (1, heads, 1, 1)
        g = g.view(shape)
        return g * full + (1 - g) * stream, weights

    attention.__name__ = f"duo_mix_{base}"
    return attention


_REGISTERED = False


def register() -> None:
    """Register the two mixing attention functions (SDPA- and eager-based) and their mask functions, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(MIX_SDPA, _mix_function("sdpa"))
    AttentionInterface.register(MIX_EAGER, _mix_function("eager"))
    AttentionMaskInterface.register(MIX_SDPA, sdpa_mask)
    AttentionMaskInterface.register(MIX_EAGER, eager_mask)
    _REGISTERED = True


@contextlib.contextmanager
def mixing(model):
    """Inside the block, the model's attention is the mixing function (plain attention for forwards that pass no
    gates): eager-based for an eager model, SDPA-based otherwise. The previous implementation comes back after."""
    register()
    orig = model.config._attn_implementation
    name = MIX_EAGER if orig == "eager" else MIX_SDPA
    with implementation(model, name):
        yield


def final_hidden(model, ids, mask, mix: Mix | None = None) -> torch.Tensor:
    """(B, T, hidden) output of the decoder (after its final norm): full attention, or mixed with ``mix``."""
    dec = models.decoder(model)
    kw = {} if mix is None else {KWARG: mix}
    with mixing(model):
        out = dec(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


# ---- data ----------------------------------------------------------------------------------------------------------


def collate(chunk: list, pad: int, device):
    """Right-padded (ids, mask, target) for passkey samples; ``target`` marks the positions whose hidden state
    predicts an answer token (answer_start - 1 .. answer_end - 2)."""
    width = max(len(s.ids) for s in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    target = torch.zeros((len(chunk), width), dtype=torch.bool)
    for r, s in enumerate(chunk):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        mask[r, : len(s.ids)] = 1
        target[r, s.answer_start - 1 : s.answer_end - 1] = True
    return ids.to(device), mask.to(device), target.to(device)


def length_range(seq_len: int, sink: int, recent: int) -> tuple:
    """Training prompt lengths: from twice the streaming window (where streaming starts to lose context) to seq_len."""
    return (min(seq_len, max(2 * (sink + recent), seq_len // 4)), seq_len)


def _answer_room(tokenizer) -> int:
    return len(tokenizer("The pass key is 12345.", add_special_tokens=False)["input_ids"]) + 2


# ---- loss ------------------------------------------------------------------------------------------------------


def make_loss(gates: DuoGates, model, l1: float = 0.05):
    """``loss_fn(ids, mask, target, gates_override=None, teacher=None) -> (loss, metrics)``: hidden-state MSE on the
    target positions between the full model (``teacher``: its final hidden states, computed when not given) and the
    gated mix, + l1 * mean(|gates|). In evaluation (gates not training) the metrics add ``mse_pattern``: the MSE of
    the gates binarised at their sparsity, as deployed."""

    def mse_of(ids, mask, target, g, teacher):
        student = final_hidden(model, ids, mask, Mix(g, gates.sink, gates.recent)).float()
        diff = (student - teacher)[target]  # (N, hidden)
        return (diff ** 2).mean() if diff.numel() else student.sum() * 0

    def loss_fn(ids, mask, target, gates_override=None, teacher=None):
        g = gates.gates if gates_override is None else gates_override
        if teacher is None:
            with torch.no_grad():
                teacher = final_hidden(model, ids, mask).float()
        mse = mse_of(ids, mask, target, g, teacher)
        reg = g.abs().mean()
        loss = mse + l1 * reg
        metrics = {"loss": loss.detach(), "mse": mse.detach(), "gate_mean": reg.detach()}
        if not gates.training and gates_override is None:
            binary = gates.retrieval().to(g.device, torch.float32)
            metrics["mse_pattern"] = mse_of(ids, mask, target, binary, teacher).detach()
        return loss, metrics

    return loss_fn


# ---- training loop -------------------------------------------------------------------------------------------------


def new_gates(model, sink: int = 64, recent: int = 256, sparsity: float = 0.5) -> DuoGates:
    """Fresh gates (all 1, float32, on the model's device) holding only their own parameter."""
    return DuoGates(model, sink=sink, recent=recent, sparsity=sparsity).to(device=model.device, dtype=torch.float32)


def load_gates(path, model) -> DuoGates:
    """Gates saved by :func:`train` (checked against ``model`` like any artifact), as a :class:`DuoGates` holding only
    its own parameter, in float32 on the model's device: pass it as ``accel_kwargs={"pattern": gates}``."""
    from ..integrations import artifacts

    tensors, meta = artifacts.load(path, DuoGates.kind, model)
    part = new_gates(model, **meta["settings"])
    with torch.no_grad():
        part.gates.copy_(tensors["gates"].float())
    return part.eval().requires_grad_(False)


def train(model, tokenizer, out, *, minutes: float = 10.0, max_steps: int | None = None, seq_len: int = 2048,
          batch: int = 1, sink: int = 64, recent: int = 256, l1: float = 0.05, lr: float = 0.02,
          sparsity: float = 0.5, eval_every: int = 100, heldout: int = 8, seed: int = 0, resume: bool = False,
          progress: bool = True, texts=None, chat: bool = True, command: str | None = None,
          min_len: int | None = None) -> tuple:
    """Train DuoAttention gates for ``model`` (frozen) on fresh passkey samples until ``minutes`` of training time
    or ``max_steps``; held-out metrics every ``eval_every`` steps and at the end (``out/log.jsonl``), a checkpoint
    (``out/checkpoint.pt``) at each evaluation, picked up by ``resume``. Saves the gates to ``out`` with
    ``DuoGates.save_pretrained``. Returns (gates, metrics)."""
    from .loop import fit

    out = Path(out)
    model.requires_grad_(False).eval()
    device = model.device
    torch.manual_seed(seed)
    gates = new_gates(model, sink, recent, sparsity)
    loss_fn = make_loss(gates, model, l1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lo, hi = length_range(seq_len, sink, recent) if min_len is None else (min_len, seq_len)
    hi = hi - _answer_room(tokenizer)
    shortest = passkey.min_length(tokenizer, chat) + 16
    if hi < shortest:
        raise ValueError(f"duo training: --seq-len {seq_len} is too short for a passkey sample with this tokenizer "
                         f"(at least {shortest + _answer_room(tokenizer)} tokens)")
    lo = min(max(lo, shortest), hi)
    held = passkey.samples(tokenizer, heldout, (lo, hi), seed=seed + 1_000_003, chat=chat, texts=texts)
    eval_set = [collate(held[i : i + batch], pad, device) for i in range(0, len(held), batch)]

    def batch_at(step):  # fresh passkey samples, a function of the step (so --resume continues the stream)
        chunk = passkey.samples(tokenizer, batch, (lo, hi), seed=seed * 1_000_003 + step, chat=chat, texts=texts)
        return collate(chunk, pad, device)

    def clamp():
        gates.gates.clamp_(0.0, 1.0)

    def baselines():  # the deterministic default pattern and all heads streaming, on the same held-out batches
        sums: dict = {}
        default = default_pattern(model, sparsity).to(device, torch.float32)
        for ids, mask, target in eval_set:
            teacher = final_hidden(model, ids, mask).float()
            for key, g in (("mse_default_pattern", default), ("mse_all_streaming", torch.zeros_like(default))):
                _, m = loss_fn(ids, mask, target, gates_override=g, teacher=teacher)
                sums[key] = sums.get(key, 0.0) + float(m["mse"]) / len(eval_set)
        return sums

    fitted = fit(gates, loss_fn, batch_at, eval_set, out, minutes=minutes, max_steps=max_steps, lr=lr, seed=seed,
                 eval_every=eval_every, eval_batches=len(eval_set), resume=resume, progress=progress,
                 warmup=min(50, max(1, (max_steps or 1000) // 10)), clip=None, after_step=clamp,
                 final_metrics=baselines, desc="train duo gates")
    g = gates.gates.detach().float().cpu()
    result = {
        **fitted,
        "gates": {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max()),
                  "below_half": float((g < 0.5).float().mean()),
                  "streaming_heads_at_sparsity": int((~pattern_from_scores(g, sparsity)).sum()),
                  "heads": int(g.numel())},
        "data": {"source": ("passkey retrieval (ShareGPT assistant-text filler)" if texts is None
                            else "passkey (given texts)"),
                 "lengths": [lo, hi], "depths": [0.05, 0.95], "batch": batch, "heldout_samples": heldout,
                 "chat_template": bool(chat and getattr(tokenizer, "chat_template", None))},
        "settings": {"sink": sink, "recent": recent, "l1": l1, "lr": lr, "sparsity": sparsity, "seq_len": seq_len,
                     "seed": seed},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    gates.eval()
    gates.save_pretrained(out, metrics=result, command=command)
    return gates, result


def cli(args) -> int:
    """``hf-accel train duo``: the model frozen in fp32, passkey data made on the fly."""
    from ..loading import load_model

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, tok = load_model(args.model, "fp32", args.device)
    command = "hf-accel " + " ".join(args.argv)
    _, result = train(
        model, tok, args.out, minutes=args.minutes, max_steps=args.steps, seq_len=args.seq_len, batch=args.batch,
        sink=args.sink, recent=args.recent, l1=args.l1, lr=args.lr, sparsity=args.sparsity,
        eval_every=args.eval_every, seed=args.seed, resume=args.resume, progress=not args.no_progress,
        command=command,
    )
    print(json.dumps(result, indent=2, default=float))
    print(f"saved duo_attention gates to {args.out}: use accel='duo_attention', "
          f"accel_kwargs={{'pattern': {args.out!r}, 'sparsity': {args.sparsity}}}")
    return 0


# ---- hf-accel train duo_attention (train/registry.py): its own data and loop ----------------------------------

DEFAULTS = {"batch": 1, "seq_len": 2048, "lr": 0.02}


def add_arguments(p) -> None:
    p.add_argument("--sink", type=int, default=64, help="sink tokens a streaming head keeps")
    p.add_argument("--recent", type=int, default=256, help="recent tokens a streaming head keeps")
    p.add_argument("--l1", type=float, default=0.05, help="weight of the L1 penalty on the gates")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="share of streaming heads the saved pattern deploys with by default")


run = cli


__all__ = ["load_gates", "Mix", "streaming_keep", "streaming_allowed", "streaming_mask", "register", "mixing",
           "final_hidden", "collate", "make_loss", "new_gates", "train", "cli", "run", "add_arguments", "DEFAULTS"]
