"""Clover / Clover-2 heads (arXiv 2405.00263, 2408.00264): regressive draft heads on the target's hidden state.

Lossless: the heads draft a token tree, the engine verifies it with the target (greedy or sampling rules of
engine/verify.py), so the output is the target's own.

What runs (``CloverHeads``; trained by ``hf-accel train clover``, loaded with ``accel_kwargs={"heads": path}``):

* Input gate (Clover-2's attention decoder): for each committed position t, ``g_t = h_t + v(e) * cos(q(h_t), k(e))``
  per attention head, where ``h_t`` is the target's final (post-norm) hidden state at t and ``e`` the embedding of
  the token that followed it (x_{t+1}).
* Augmenting block: one decoder layer (causal self-attention with its own KV over the committed positions, then
  a feed-forward block), initialised from the target's last layer; its output ``C_t`` (after a norm) is what the
  heads read.
* Heads: depth 1 ``head_norm(W0 C_t)``; depth d > 1 is regressive: ``C^d = gate(C^{d-1}, e(x_d))`` and
  ``head_norm(W1 [C^d; e(x_d)])``, where x_d is the token drafted at depth d-1. Every head goes through the
  target's frozen LM head (models.logits_from_hidden).
* Tree: a dynamic top-k beam: depth 1 keeps the ``width`` most likely tokens; each deeper level expands every
  frontier node and keeps the ``width`` children with the highest path probability; nodes whose path
  probability falls below ``min_prob`` are dropped. All levels run on the device; the tree reaches the host once.

Choices that are ours:
* The augmenting block's feed-forward is the target's last-layer MLP itself (frozen, shared, not saved), so the
  artifact stays small (< 10 MB for the default model); its attention (q/k/v/o), norms and the gates train.
  Families whose last layer has no single ``mlp`` module (OPT) get a small trainable MLP instead.
* One set of regressive weights serves every depth > 1 (as in the Clover-2 code), so ``depth`` at inference can
  differ from the depth trained.
* Token embeddings are the target's input embeddings (frozen) through a trainable RMSNorm.
* Per-request state (the augmenting block's KV per row, the last ``C``) lives in the request's state object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine.adapter import Row, SpeculativeAdapter, StepOutput
from ..engine.tree import Tree
from ..integrations import artifacts
from ..registry import register

KIND = "clover"


# ---- modules ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SimilarityGate(nn.Module):
    """Clover-2's per-head gate: x + v(y) * cos(q(norm x), k(y)) per head."""

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.eps = heads, eps
        self.norm = RMSNorm(dim, eps)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        with torch.no_grad():
            for lin, scale in ((self.q, 1.0), (self.k, 1.0), (self.v, 0.0)):
                nn.init.uniform_(lin.weight, -0.01, 0.01)
                lin.weight.add_(torch.eye(dim) * scale)
                nn.init.zeros_(lin.bias)

    def forward(self, x, y):
        shape = x.shape[:-1] + (self.heads, -1)
        q = self.q(self.norm(x)).view(shape)
        k = self.k(y).view(shape)
        att = F.cosine_similarity(q, k, dim=-1, eps=self.eps)[..., None]
        return x + (self.v(y).view(shape) * att).reshape(x.shape)


def _rope(x, pos, theta: float):
    """Rotate-half RoPE on x (..., T, D) at integer positions pos (..., T)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[..., None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class AugmentAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
        self.q_proj = nn.Linear(hidden, heads * head_dim)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, hidden)

    def forward(self, x, pos, past=None, key_valid=None):
        """x (B, T, H), pos (B, T); past: (k, v) (B, kvh, S, D) or None; key_valid (B, S+T) bool or None.
        Causal over the T new positions. Returns (out, (k, v) including the new positions)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rope(q, pos[:, None], self.theta), _rope(k, pos[:, None], self.theta)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        s = k.shape[2]
        allowed = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)[None].expand(b, -1, -1)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, :]
        rep = self.heads // self.kv_heads
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)


class CloverHeads(artifacts.TrainedPart, nn.Module):
    """The trained part of Clover for one base model (see the module docstring)."""

    kind = KIND

    def __init__(self, model, depth: int = 4, init_from_model: bool = True):
        super().__init__()
        d = models.dims(model)
        self.dims, self.depth = d, depth
        h = d["hidden"]
        self.gate_in = SimilarityGate(h, d["heads"], d["eps"])
        self.emb_norm = RMSNorm(h, d["eps"])
        self.attn_norm = RMSNorm(h, d["eps"])
        self.attn = AugmentAttention(h, d["heads"], d["kv_heads"], d["head_dim"], d["rope_theta"])
        self.mlp_norm = RMSNorm(h, d["eps"])
        last = models.layers(model)[-1]
        shared = models.layer_mlp(last)
        if shared is not None:
            self.__dict__["shared_mlp"] = shared  # the target's own module: frozen, not a parameter of ours
            self.own_mlp = None
        else:
            self.own_mlp = nn.Sequential(nn.Linear(h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h))
        self.out_norm = RMSNorm(h, d["eps"])
        self.head_norm = RMSNorm(h, d["eps"])
        self.head0 = nn.Linear(h, h)
        self.head_rest = nn.Linear(2 * h, h)
        self.gate_rnn = SimilarityGate(h, d["heads"], d["eps"])
        self.__dict__["base"] = model  # embeddings and LM head of the target (frozen, not ours)
        with torch.no_grad():
            for lin, cols in ((self.head0, h), (self.head_rest, h)):
                nn.init.uniform_(lin.weight, -0.01, 0.01)
                lin.weight[:, :cols] += torch.eye(h)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.attn.o_proj.bias)
            if init_from_model:
                fn = models.final_norm(model)
                with models.weights_loaded(last), models.weights_loaded(fn if fn is not None else nn.Identity()):
                    self._init_from(model, last)

    def _init_from(self, model, last) -> None:
        d = self.dims
        lin = models.attention_weights(last, d["heads"], d["kv_heads"], d["head_dim"], d["hidden"])
        if lin is not None:
            for mine, theirs in zip((self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj), lin):
                mine.weight.copy_(theirs.weight.float())
                mine.bias.copy_(theirs.bias.float() if theirs.bias is not None else torch.zeros_like(mine.bias))
        for mine, name in ((self.attn_norm, "input_layernorm"), (self.mlp_norm, "post_attention_layernorm")):
            w = getattr(getattr(last, name, None), "weight", None)
            if w is not None and w.shape == mine.weight.shape and models.norm_weight_is_plain(model):
                mine.weight.copy_(w.float())
        fn = models.final_norm(model)
        w = getattr(fn, "weight", None)
        if w is not None and w.shape == self.out_norm.weight.shape and models.norm_weight_is_plain(model):
            self.out_norm.weight.copy_(w.float())
            self.head_norm.weight.copy_(w.float())

    # -- pieces ---------------------------------------------------------------------------------------------
    def embed(self, ids):
        e = models.embed_tokens(self.base)(ids)
        return self.emb_norm(e.to(self.head0.weight.dtype))

    def mlp(self, x):
        return self.own_mlp(x) if self.own_mlp is not None else self.shared_mlp(x)

    def augment(self, hidden, next_ids, pos, past=None, key_valid=None):
        """hidden (B, T, H) of committed positions, next_ids (B, T) the tokens after them -> (C (B, T, H), kv)."""
        x = self.gate_in(hidden.to(self.head0.weight.dtype), self.embed(next_ids))
        a, kv = self.attn(self.attn_norm(x), pos, past, key_valid)
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return self.out_norm(x), kv

    def first(self, c):
        """Depth-1 head: hidden for the LM head, and the recurrent state passed on."""
        return self.head_norm(self.head0(c)), c

    def next(self, state, ids):
        """Depth > 1: the state after drafting ``ids``, and the hidden for the LM head."""
        e = self.embed(ids)
        state = self.gate_rnn(state, e)
        return self.head_norm(self.head_rest(torch.cat([state, e], -1))), state

    def logits(self, h):
        return models.logits_from_hidden(self.base, h.to(self.base.dtype))

    # -- artifact -------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        return {"depth": self.depth, "own_mlp": self.own_mlp is not None}

    @classmethod
    def from_settings(cls, model, settings: dict):
        return cls(model, depth=int(settings.get("depth", 4)), init_from_model=False)


# ---- adapter ---------------------------------------------------------------------------------------------


@dataclass
class CloverConfig(AccelConfig):
    heads: Any = None  # artifact folder (hf-accel train clover) or a CloverHeads
    depth: int | None = option(None, min=1)  # tree depth (default: the depth the heads were trained for)
    width: int = option(8, min=1)  # nodes kept per depth
    min_prob: float = option(0.0, min=0, max=1)  # drop nodes whose path probability falls below this

    def validate(self, method: str) -> None:
        if self.heads is None:
            raise ValueError(
                f"accel={method!r} needs trained heads: pass accel_kwargs={{'heads': path}} (a folder written by "
                "`hf-accel train clover`)."
            )


class _RowState:
    __slots__ = ("kv", "length", "c")

    def __init__(self):
        self.kv = None  # augmenting block (k, v), (1, kvh, S, D)
        self.length = 0  # committed positions fed so far
        self.c = None  # augmenting output at the last committed position (H,)


@register("clover")
class Clover(SpeculativeAdapter):
    Config = CloverConfig
    hidden = True

    def __init__(self, model, config: CloverConfig):
        super().__init__(model, config)
        self.heads = artifacts.part_from(config.heads, CloverHeads, model, self.name)
        self.depth = config.depth or self.heads.depth

    def max_tree_nodes(self) -> int:
        return 1 + self.config.width * self.depth

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        return artifacts.missing(kwargs.get("heads"), CloverHeads,
                                 "trained heads (accel_kwargs heads=...; `hf-accel train clover`)")

    def prepare(self, model, rows, generation_config):
        return [_RowState() for _ in rows]

    def _feed(self, st: _RowState, hidden, next_ids: list) -> None:
        """Run the augmenting block over newly committed positions of one row."""
        t = hidden.shape[0]
        dev = hidden.device
        pos = torch.arange(st.length, st.length + t, device=dev)[None]
        ids = torch.tensor(next_ids, device=dev)[None]
        c, st.kv = self.heads.augment(hidden[None], ids, pos, st.kv)
        st.length += t
        st.c = c[0, -1]

    def prefilled(self, state, step: StepOutput) -> None:
        first = step.tokens.tolist()
        for b, st in enumerate(state):
            keep = step.attn[b]
            prompt = step.input_ids[b][keep].tolist()
            self._feed(st, step.hidden[b][keep], prompt[1:] + [first[b]])

    def verified(self, state, row: Row, tree: Tree, path: list, new_tokens: list, step: StepOutput, b: int) -> None:
        n = min(len(path), len(new_tokens))
        if n == 0:
            return
        idx = torch.tensor(path[:n], device=step.hidden.device)
        self._feed(state[b], step.hidden[b].index_select(0, idx), new_tokens[:n])

    @torch.no_grad()
    def draft(self, state, rows: list) -> list:
        out = []
        for b, row in enumerate(rows):
            out.append(None if row is None else self._tree(state[b], row.tokens[-1]))
        return out

    def _tree(self, st: _RowState, root: int) -> Tree:
        heads, w = self.heads, self.config.width
        h, s = heads.first(st.c[None])
        logp = torch.log_softmax(heads.logits(h).float(), -1)[0]  # (V,)
        top = logp.topk(w)
        lp, tok = top.values, top.indices  # (w,)
        state = s.expand(w, -1)
        levels = [(tok, torch.full_like(tok, -1), lp)]
        for _ in range(1, self.depth):
            h, state = heads.next(state, tok)
            cand = torch.log_softmax(heads.logits(h).float(), -1) + lp[:, None]  # (w, V)
            top = cand.flatten().topk(w)
            parent = top.indices // cand.shape[1]
            tok, lp = top.indices % cand.shape[1], top.values
            state = state.index_select(0, parent)
            levels.append((tok, parent, lp))
        # one host transfer for the whole tree (float64 holds token ids exactly)
        host = torch.stack([torch.stack([t.double(), p.double(), v.double()]) for t, p, v in levels]).tolist()
        tokens, parents = [root], [-1]
        prev = None
        floor = math.log(self.config.min_prob) if self.config.min_prob > 0 else -math.inf
        for d, (toks, pars, logps) in enumerate(host):
            idx = []
            for j in range(len(toks)):
                par = 0 if d == 0 else prev[int(pars[j])]
                if par is None or logps[j] < floor:
                    idx.append(None)
                    continue
                idx.append(len(tokens))
                tokens.append(int(toks[j]))
                parents.append(par)
            prev = idx
        return Tree(tokens, parents)

