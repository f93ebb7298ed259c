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
  probability falls below ``min_prob`` are dropped. All levels of all rows run on the device; the trees reach the
  host once per step.

Choices that are ours:
* The augmenting block's feed-forward is the target's last-layer MLP itself (frozen, shared, not saved), so the
  artifact stays small (< 10 MB for the default model); its attention (q/k/v/o), norms and the gates train.
  Families whose last layer has no single ``mlp`` module (OPT) get a small trainable MLP instead.
* One set of regressive weights serves every depth > 1 (as in the Clover-2 code), so ``depth`` at inference can
  differ from the depth trained.
* Token embeddings are the target's input embeddings (frozen) through a trainable RMSNorm.
* Per-request state (the augmenting block's KV per row, the last ``C``) lives in the request's drafter
  (``_Drafter``): fixed-shape buffers and one step function (feed the committed positions, grow every row's beam)
  with one host read per step; with the static engine on a GPU that step is one CUDA graph, and captured drafters
  are kept per shape for later requests (one request at a time each, state reset on reuse).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine import capture
from ..engine.backends import compile_kwargs, compile_options
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
    part_option = "heads"  # also accepted as part= (AccelConfig.part_option)
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


class _Drafter:
    """One request's drafter as fixed-shape device work (engine/capture.py's ``Graphed``): the augmenting block's
    KV preallocated per row (slot = position), the last augmenting output ``c`` per row, and one step function that
    feeds the positions the last verify committed (at most ``depth + 1`` per row) and grows every row's top-k beam
    tree of ``width`` x ``depth``. No Python per value, one host read per step for all rows' trees; on CUDA (static
    engine, compile allowed) the step is one captured CUDA graph."""

    def __init__(self, heads: CloverHeads, batch: int, width: int, depth: int, nodes: int, max_length: int,
                 device, graphs: bool, compile_options: dict | None = None):
        d, attn = heads.dims, heads.attn
        self.heads, self.width, self.depth, self.batch = heads, width, depth, batch
        dt = heads.head0.weight.dtype
        self.feed_width = depth + 1  # a verify commits at most the root and depth drafted nodes
        self.slots = max_length + self.feed_width + 1
        kv = (batch, attn.kv_heads, self.slots, attn.head_dim)
        self.k = torch.zeros(kv, dtype=dt, device=device)
        self.v = torch.zeros(kv, dtype=dt, device=device)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)  # positions fed, per row
        self.c = torch.zeros(batch, d["hidden"], dtype=dt, device=device)
        # the step's inputs: the verify's hidden states, and per row which of them to feed with which next token
        self.hid = torch.zeros(batch, nodes, d["hidden"], dtype=dt, device=device)
        # (idx, nxt, n) of the step in one buffer (one host -> device copy), and its host mirror
        self.inputs = torch.zeros(3, batch, self.feed_width, dtype=torch.long, device=device)
        self.idx, self.nxt, self.n = self.inputs[0], self.inputs[1], self.inputs[2, :, 0]
        self.host = np.zeros((3, batch, self.feed_width), dtype=np.int64)
        self.staged = False  # the step's hidden states are in ``hid``
        self.in_use = True
        # compiled (when the static engine compiles its verify step) from this drafter's own copy of the step's code:
        # dynamo's recompile limit is per code object, and every drafter (its own tensors) is its own specialisation
        code = _Drafter._step.__code__.replace(co_name=f"_clover_step_{next(_DRAFTER_IDS)}")
        step = types.MethodType(types.FunctionType(code, _Drafter._step.__globals__, code.co_name), self)
        self.run = capture.Graphed(step, torch.device(device), graphs, quiet=self._quiet,
                                   compile_options=compile_options)

    @contextlib.contextmanager
    def _quiet(self):
        """Warm-up / capture with nothing fed: ``length`` and ``c`` stay (KV writes land on unfed slots)."""
        saved = self.n.clone()
        self.n.zero_()
        try:
            yield
        finally:
            self.n.copy_(saved)

    # -- device functions (fixed shapes) -------------------------------------------------------------------
    def feed(self, hidden, idx, nxt, n) -> None:
        """Row b feeds ``hidden[b, idx[b, i]]`` followed by token ``nxt[b, i]`` for i < n[b], at its next
        positions: writes their KV, moves ``length`` on and keeps the augmenting output of the last one in ``c``."""
        heads, attn = self.heads, self.heads.attn
        b, f = idx.shape
        h = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1])).to(self.c.dtype)
        pos = self.length[:, None] + torch.arange(f, device=idx.device)
        x = heads.gate_in(h, heads.embed(nxt))
        y = heads.attn_norm(x)
        q = attn.q_proj(y).view(b, f, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(y).view(b, f, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(y).view(b, f, attn.kv_heads, attn.head_dim).transpose(1, 2)
        q, k = _rope(q, pos[:, None], attn.theta), _rope(k, pos[:, None], attn.theta)
        slot = pos.clamp(max=self.slots - 1)[:, None, :, None].expand(-1, attn.kv_heads, -1, attn.head_dim)
        self.k.scatter_(2, slot, k)  # unfed entries (i >= n) land on slots no fed query can see
        self.v.scatter_(2, slot, v)
        allowed = torch.arange(self.slots, device=idx.device)[None, None, :] <= pos[:, :, None]  # (B, F, S)
        rep = attn.heads // attn.kv_heads
        out = F.scaled_dot_product_attention(q, self.k.repeat_interleave(rep, 1), self.v.repeat_interleave(rep, 1),
                                             attn_mask=allowed[:, None])
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, f, -1))
        x = x + heads.mlp(heads.mlp_norm(x))
        c = heads.out_norm(x)
        last = c.gather(1, (n - 1).clamp_min(0)[:, None, None].expand(-1, 1, c.shape[-1]))[:, 0]
        self.c.copy_(torch.where((n > 0)[:, None], last, self.c))
        self.length.add_(n)

    def trees(self):
        """Every row's beam from ``c``: (depth, 3, B, width) float64 of (token, parent within the level above,
        path log-probability)."""
        heads, w, b = self.heads, self.width, self.batch
        h, s = heads.first(self.c)
        logp = torch.log_softmax(heads.logits(h).float(), -1)  # (B, V)
        lp, tok = logp.topk(w, dim=-1)  # (B, w)
        state = s[:, None].expand(-1, w, -1).reshape(b * w, -1)
        levels = [torch.stack([tok.double(), torch.full_like(tok, -1).double(), lp.double()])]
        for _ in range(1, self.depth):  # a fixed count (the tree's depth), not a value read on the host
            h, state = heads.next(state, tok.reshape(-1))
            cand = torch.log_softmax(heads.logits(h).float(), -1).view(b, w, -1) + lp[:, :, None]  # (B, w, V)
            vocab = cand.shape[-1]
            lp, flat = cand.flatten(1).topk(w, dim=-1)
            parent, tok = flat // vocab, flat % vocab
            state = state.view(b, w, -1).gather(1, parent[:, :, None].expand(-1, -1, state.shape[-1]))
            state = state.reshape(b * w, -1)
            levels.append(torch.stack([tok.double(), parent.double(), lp.double()]))
        return torch.stack(levels)

    def _step(self):
        self.feed(self.hid, self.idx, self.nxt, self.n)
        return self.trees()

    # -- host side -----------------------------------------------------------------------------------------
    def stage(self, b: int, hidden, hidden_rows: list, next_tokens: list) -> None:
        """Row b feeds the verify's hidden rows ``hidden_rows`` with ``next_tokens`` at the next step."""
        if not self.staged:  # once per step: the verify's hidden states (its buffer is reused by the next one)
            self.hid[:, : hidden.shape[1]].copy_(hidden)
            self.staged = True
        m = len(hidden_rows)
        self.host[0, b, :m] = hidden_rows
        self.host[1, b, :m] = next_tokens
        self.host[2, b, 0] = m

    def step(self):
        """Feed what was staged, draft: the host copy of :meth:`trees` (the step's one device -> host read)."""
        self.inputs.copy_(torch.from_numpy(self.host))
        self.host[:] = 0
        self.staged = False
        return self.run().tolist()


# heads -> {(batch, width, depth, nodes, slots): [drafters]}: captured drafters kept for later requests (as the
# static engine keeps its workspaces), each serving one request at a time
_DRAFTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_DRAFTERS_LOCK = threading.Lock()
_KEEP = 4


_DRAFTER_IDS = itertools.count()


def _acquire_drafter(heads, batch, width, depth, nodes, max_length, device, compile_options=None) -> _Drafter:
    """A free captured drafter of this shape (its state reset), or a new one. Slot counts are rounded up to a power
    of two (>= 512) so that requests of similar lengths share one graph."""
    need = max_length + depth + 2
    slots_for = max(512, 1 << (need - 1).bit_length()) - depth - 2
    key = (batch, width, depth, nodes, slots_for, str(device), repr(compile_options))
    with _DRAFTERS_LOCK:
        pool = _DRAFTERS.setdefault(heads, {})
        for d in pool.get(key, []):
            if not d.in_use:
                d.in_use = True
                d.length.zero_()
                d.c.zero_()
                d.host[:] = 0
                d.staged = False
                return d
        d = _Drafter(heads, batch, width, depth, nodes, slots_for, device, True, compile_options)
        pool.setdefault(key, []).append(d)
        if sum(len(v) for v in pool.values()) > _KEEP:  # forget the oldest (a request using it keeps its own ref)
            first = next(iter(pool))
            pool[first].pop(0)
            if not pool[first]:
                del pool[first]
        return d


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
        gc = generation_config
        plen = max(r.prompt_len for r in rows)
        max_length = max(int(gc.max_length if gc.max_length is not None else plen + (gc.max_new_tokens or 20)),
                         plen + 1)
        # the drafter's CUDA graph goes with the static engine's (same switches as the engine's graphs)
        graphs = gc.cache_implementation == "static" and not gc.disable_compile and not models.is_dispatched(model)
        device = self.heads.head0.weight.device
        graphs = graphs and device.type == "cuda"
        if not graphs:
            return _Drafter(self.heads, len(rows), self.config.width, self.depth, self.max_tree_nodes(), max_length,
                            device, False)
        opts = compile_kwargs(compile_options(gc.compile_config))
        return _acquire_drafter(self.heads, len(rows), self.config.width, self.depth, self.max_tree_nodes(),
                                max_length, device, opts)

    def finished(self, drafter: _Drafter, stats) -> None:
        stats.extra["drafter_graph"] = drafter.run.enabled
        if drafter.run.compile_options is not None:
            stats.extra["drafter_compiled"] = drafter.run.compiled  # False: compiling failed (compile_error), eager
            if drafter.run.compile_error:
                stats.extra["drafter_compile_error"] = drafter.run.compile_error
        stats.extra["drafter_capture_seconds"] = drafter.run.capture_seconds
        drafter.run.capture_seconds = 0.0
        drafter.in_use = False  # a pooled drafter serves the next request (its graph is kept)

    @torch.no_grad()
    def prefilled(self, drafter: _Drafter, step: StepOutput) -> None:
        """Feed every row's prompt (left padding: row b's prompt is its last ``lens[b]`` positions), each
        position with the token after it (the first generated token after the last)."""
        ids = step.input_ids
        p = ids.shape[1]
        lens = step.attn.long().sum(1)
        i = torch.arange(p, device=ids.device)
        idx = (i[None] + (p - lens)[:, None]).clamp(max=p - 1)
        nxt = torch.cat([ids, step.tokens[:, None].to(ids.dtype)], 1).gather(1, idx + 1)
        drafter.feed(step.hidden, idx, nxt, lens)

    def verified(self, drafter: _Drafter, row: Row, tree: Tree, path: list, new_tokens: list, step: StepOutput,
                 b: int) -> None:
        n = min(len(path), len(new_tokens))
        drafter.stage(b, step.hidden, path[:n], new_tokens[:n])

    @torch.no_grad()
    def draft(self, drafter: _Drafter, rows: list) -> list:
        levels = drafter.step()  # (depth, 3, B, width), on the host
        return [None if row is None else self._tree(levels, b, row.tokens[-1]) for b, row in enumerate(rows)]

    def _tree(self, levels: list, b: int, root: int) -> Tree:
        tokens, parents = [root], [-1]
        prev = None
        floor = math.log(self.config.min_prob) if self.config.min_prob > 0 else -math.inf
        for d, level in enumerate(levels):
            toks, pars, logps = level[0][b], level[1][b], level[2][b]
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
