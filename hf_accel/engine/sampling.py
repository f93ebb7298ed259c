"""Sampling and logits processing on the device: every node's processed scores and its token drawn in one
batched step, so a sampling step costs one host read, as a greedy one does.

**Why drawing at every node is exact.** The lazy walk (``verify.sample_walk``) draws x ~ p_i at a node i only
when it visits i, descends to the child carrying x, and stops at the first miss (x is the bonus token). Draw
instead x_i ~ p_i independently at *every* node up front, then walk with those draws (``greedy_walk`` with x_i in
place of the argmax). For any path i_0 -> i_1 -> ... -> i_k and bonus t, the event "the walk takes that path and
emits t" is {x_{i_0} = tok(i_1), ..., x_{i_{k-1}} = tok(i_k), x_{i_k} = t}: it involves only the draws at the
visited nodes, which are independent with laws p_{i_0}, ..., p_{i_k}, so its probability is
p_{i_0}(tok i_1) ... p_{i_k}(t), exactly the lazy walk's (which draws the same laws at the same nodes in
the same order). The draws at nodes the walk never visits are independent of that event and discarded. The
emitted tokens are therefore exact draws from the target's processed conditionals, i.e. vanilla sampling's
distribution. (Draft trees here are deterministic given the context: no dependence of the tree on the draws.)

Each draw inverts the cumulative distribution: x = the first token v (in vocabulary order) whose cumulative
probability C(v) exceeds u * C(V), u ~ U(0, 1) — a draw from p (token v is picked for u in [C(v-1), C(v)) / C(V), an
interval of length p(v) / sum p), never a token of probability 0; the cumulative sum is taken in float64 and u has 53
random bits. (This replaced an exponential race, argmax p(v) / E_v, which needs V noise values per node: for
temperature + top-p over (8, 16, 49152) logits on a 2-core CPU, 2026-12-02, `scripts/sampling_draw_cost.py`, its
noise took 245 of the step's 572 ms; one uniform per node and this draw take 40 ms, the step 343 ms, most of it
transformers' top-p sort.)
**The uniform is keyed by position**: the draw of the token at position t of row b uses u_{b,t} = hash(seed, b, t)
(a counter-based generator, :func:`keyed_uniform`), whatever node, tree, step or verify width it happens in. A walk
visits one node per position, so the draws along the emitted path use independent uniforms, and the uniform at
position t is independent of the prefix (which depends on positions < t only): the emitted tokens are exact draws,
as above. And the output no longer depends on how the positions were grouped into steps: with a fixed seed, any
draft tree, any node budget (the budget chooser's widths vary with measured timings) and either engine give the same
tokens. ``seed`` is drawn from torch's default generator at request start, so ``torch.manual_seed(s)`` reproduces a
run.

**Chains with draft distributions** (speculative sampling): at chain node j (producing node j+1's token
x = tok(j+1), drafted from q_j): accept iff q_j(x) > 0 and u_j q_j(x) <= p_j(x) (u_j ~ U[0,1)); at the first
rejection j the bonus is a draw from norm(max(p_j - q_j, 0)) (p_j if that is all zero); when all are accepted
the bonus is a draw from p at the last node. All three (accept bits, residual draws, plain draws) are computed
for every node at once; the host picks the first rejection. At one node the residual draw and the plain draw
are never both used (a rejection at j uses the residual, the plain draw is used only at the last node, which has
no test), so they share one uniform; the acceptance uniforms are separate (another salt of the key).

**Processors.** The processors transformers builds are recognised by exact type (:func:`plan`) and applied to
all nodes and rows at once, each node with the context vanilla generate would give it (the row's ``input_ids``,
padding included, + its generated tokens + the node's path tokens): pure warpers (temperature, top-k, top-p,
min-p, typical-p, epsilon, suppress-tokens, single-token bad words / sequence bias, inf-nan removal, log-softmax)
run transformers' own code on the (B*N, V) scores, except top-p, which runs from each node's top ``TOPP_K`` scores
(``TOPP_K_ONE`` in a step of one node per row; :func:`top_p_candidates`; the draw is then over those candidates,
:func:`_step`) and falls back to transformers' own call for a step it can't decide; length-dependent ones
(min-length, min-new-tokens, begin-suppress, forced BOS/EOS) use each node's context length; the repetition penalty
uses each node's token presence (the row's committed tokens after its ``prompt_ignore_length``, kept on the device,
+ the node's path tokens); the no-repeat-n-gram ban matches each node's own context suffix against all windows of
its context.
Any other processor in the list (or a subclass) sends the whole request to the host path (``process_tree_scores``
+ ``sample_walk``); ``stats.extra["sampling_path"]`` says which path a request took.

**Static engine.** With CUDA graphs the step (processing + draws, over the fixed (B, N, V) verify logits) is
compiled (the workspace's verify options: fused kernels, ~100 small ones uncompiled for one node's temperature +
top-p + draw) and captured once per (processor set, workspace logits buffer: a layer plan's graph has its own) and
replayed right after the verify graph (a failed compile: captured from the eager code, ``sampling_compile_error``); the
position-keyed uniforms are computed inside it from the request's seed (a device scalar) and each node's position,
so the host writes no noise; the per-request state (row lengths,
token presence, contexts) lives in the captured entry's buffers and is rewritten by each request.
"""

from __future__ import annotations

import itertools
import math

import torch

from . import capture
from .backends import compiled_copy
from .tree import Tree

#: top-p from the top ``TOPP_K`` scores of each node (:func:`top_p_candidates`) instead of a sort of the vocabulary;
#: a node whose nucleus lies past them, or with a token whose cumulative mass is within ``TOPP_MARGIN`` of the top-p
#: threshold, sends the step to transformers' own call. Default model, T 0.7 / top-p 0.9, 1327 positions of MT-Bench
#: q60-67 prompts and sampled answers (2026-12-02, `scripts/sampling_draw_cost.py --nucleus`): nucleus median 2, p99
#: 58, at most 682 tokens; transformers' float32 cumulative sum within 2.4e-7 of a float64 one; margin 1e-4 flagged
#: 15 positions, 1e-5 one, 2e-6 none; nucleus (+ margin) past the top 64 / 128 / 256 / 512 / 1024: 7 / 1 / 1 / 1 / 0
#: positions.
TOPP_K = 1024
#: ... and from the top ``TOPP_K_ONE`` in a step of one node per row (LoRA-Drop, M2R2 early exit: every position a real
#: next token, whose nucleus statistics are the ones above). The captured step of one node (bf16, H200, 2026-12-02,
#: `scripts/sampling_step_profile.py --skip-e2e --vocab 49152 --nodes 1 --compiled --topp-k 32,64,128,256,1024
#: --kernels`): 57 us of GPU kernels with the top 128 (32, 64: 56-57), 72 with 256, 102 with 1024 (whose radix sorts of
#: the 1024 values and ids take 44 us); LoRA-Drop's sampling replay 126 -> 74 us. Not for trees: drafted nodes'
#: contexts are not the model's own text and their nuclei are wider (ADED at batch 8, 16 nodes, the top 128: 24
#: steps of a request's ~70 went to the sort, tenth H200 run).
TOPP_K_ONE = 128
TOPP_MARGIN = 2e-6


def topp_k(nodes: int) -> int:
    """How many top scores per node top-p's top-K form reads in a step of ``nodes`` nodes per row."""
    return TOPP_K if nodes > 1 else min(TOPP_K, TOPP_K_ONE)


# ---- which processors run on the device ---------------------------------------------------------------------


def _processor_types():
    from transformers.generation import logits_process as lp

    pure = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
            "TypicalLogitsWarper", "EpsilonLogitsWarper", "InfNanRemoveLogitsProcessor", "LogitNormalization"]
    return {name: getattr(lp, name) for name in pure + [
        "RepetitionPenaltyLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
        "NoRepeatNGramLogitsProcessor", "SequenceBiasLogitsProcessor", "NoBadWordsLogitsProcessor",
        "SuppressTokensLogitsProcessor",
    ] if hasattr(lp, name)}, set(pure)


def plan(logits_processor) -> list | None:
    """The processor list as device ops [(kind, processor)], or None when some processor is not supported (the
    request then runs on the host path). Exact types only: a subclass may change what ``__call__`` does."""
    types, pure = _processor_types()
    by_type = {t: name for name, t in types.items()}
    ops = []
    for proc in logits_processor or []:
        name = by_type.get(type(proc))
        if name is None:
            return None
        if name == "TopPLogitsWarper":
            ops.append(("topp", proc))  # transformers' own call, or its top-K form (:func:`top_p_candidates`)
        elif name in pure:
            ops.append(("pure", proc))
        elif name == "RepetitionPenaltyLogitsProcessor":
            if getattr(proc, "logits_indices", None) is not None:
                return None
            ops.append(("rep", proc))
        elif name in ("SequenceBiasLogitsProcessor", "NoBadWordsLogitsProcessor"):
            bias = getattr(proc, "sequence_bias", None)
            if not isinstance(bias, dict) or any(len(k) != 1 for k in bias):
                return None  # multi-token sequences depend on the context: host path
            ops.append(("pure", proc))
        elif name == "MinLengthLogitsProcessor":
            ops.append(("minlen", proc))
        elif name == "MinNewTokensLengthLogitsProcessor":
            ops.append(("minnew", proc))
        elif name == "SuppressTokensLogitsProcessor":
            ops.append(("suppress", proc))  # a constant mask (transformers' isin per call is kept out of the step)
        elif name == "SuppressTokensAtBeginLogitsProcessor":
            ops.append(("begin", proc))
        elif name == "ForcedBOSTokenLogitsProcessor":
            ops.append(("bos", proc))
        elif name == "ForcedEOSTokenLogitsProcessor":
            ops.append(("eos", proc))
        elif name == "NoRepeatNGramLogitsProcessor":
            ops.append(("ngram", proc))
    return ops


# per-request values (read from the step's state, not baked into a captured step) and derived caches
_DERIVED = {"length_1_bias", "multi_token_biases", "prepared_bias_variables", "prompt_ignore_length",
            "logits_indices", "cu_seq_lens_q", "min_length", "prompt_length_to_skip", "min_new_tokens", "begin_index",
            "max_length"}
_LENGTH_OPS = ("minlen", "minnew", "begin", "bos", "eos")


def _length_limit(kind: str, p) -> int:
    """The context length a length-dependent op compares each node's context length with."""
    if kind == "minlen":
        return p.min_length  # eos banned while cur_len < limit
    if kind == "minnew":
        return p.prompt_length_to_skip + p.min_new_tokens  # eos banned while cur_len < limit
    if kind == "begin":
        return p.begin_index  # suppressed when cur_len == limit
    if kind == "bos":
        return 1  # forced when cur_len == limit
    return p.max_length - 1  # eos forced when cur_len == limit


def _freeze(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.reshape(-1).tolist()))
    if isinstance(v, dict):
        return tuple(sorted((repr(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    return repr(v)


def signature(ops: list) -> tuple:
    """What a captured step bakes in: the processors' types and constants (not per-request data)."""
    return tuple(
        (kind, type(p).__name__, tuple(sorted((k, _freeze(v)) for k, v in vars(p).items() if k not in _DERIVED)))
        for kind, p in ops
    )


def _eos_mask(ids, vocab: int, device) -> torch.Tensor:
    ids = torch.as_tensor(ids).reshape(-1).to(device)
    return torch.isin(torch.arange(vocab, device=device), ids)


# ---- per-request device state -------------------------------------------------------------------------------


class _State:
    """Device tensors the step reads: row context lengths, presence of committed tokens per repetition penalty,
    and (for the n-gram ban) the rows' committed sequences. Fixed shapes; rewritten by each request."""

    def __init__(self, ops, batch: int, vocab: int, ctx_len: int, device):
        self.base_len = torch.zeros(batch, dtype=torch.long, device=device)
        self.ignore = [torch.zeros(batch, dtype=torch.long, device=device) for k, _ in ops if k == "rep"]
        # last column: a spare that absorbs ids >= vocab and ignored positions (written, never read)
        self.seen = [torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device) for k, _ in ops if k == "rep"]
        self.has_seq = any(k == "ngram" for k, _ in ops)
        # the rows' sequences (n-gram ban); last column: a spare for positions past ctx_len
        self.seq = torch.zeros(batch, ctx_len + 1 if self.has_seq else 0, dtype=torch.long, device=device)
        self.limits = torch.zeros(max(1, len(ops)), dtype=torch.long, device=device)  # length ops' thresholds

    def tensors(self) -> list:
        return [self.base_len, *self.ignore, *self.seen, self.seq, self.limits]

    def copy_from(self, other: "_State") -> None:
        for a, b in zip(self.tensors(), other.tensors()):
            a.copy_(b)


class _Consts:
    """Per-op constant device tensors (eos masks ...), built once per plan."""

    def __init__(self, ops, vocab: int, device):
        self.gold = torch.tensor(_GOLD, dtype=torch.long, device=device)  # keyed_uniform's increment, read by the step
        self.masks = []
        for kind, p in ops:
            if kind in ("minlen", "minnew"):
                self.masks.append(_eos_mask(p.eos_token_id, vocab, device))
            elif kind == "begin":
                self.masks.append(_eos_mask(p.begin_suppress_tokens, vocab, device))
            elif kind == "suppress":
                self.masks.append(_eos_mask(p.suppress_tokens, vocab, device))
            elif kind == "eos":
                self.masks.append(_eos_mask(p.eos_token_id, vocab, device))
            elif kind == "bos":
                self.masks.append(torch.arange(vocab, device=device) == p.bos_token_id)
            else:
                self.masks.append(None)


def top_p_candidates(p, scores: torch.Tensor, k: int) -> tuple:
    """transformers' ``TopPLogitsWarper`` on (M, V) float32 scores from their top ``k`` alone (no sort of the whole
    vocabulary): -> (processed scores, the top-k token ids (M, k), ``short`` (M,) bool).

    transformers sorts ascending and removes a token when the probability mass at or below it (cumulative, in that
    order) is <= 1 - top_p, keeping the ``min_tokens_to_keep`` most likely. For the token of descending rank j that
    mass is 1 - (the mass of the j tokens above it), so within the top k the rule needs only their probabilities;
    every token outside them is removed iff the largest of them is, i.e. iff the top k hold >= top_p of the mass.
    ``short`` marks rows where that fails, or where a top-k token's mass lies within ``TOPP_MARGIN`` of the
    threshold (float32 rounding of transformers' own cumulative sum could decide it either way): the caller then runs
    transformers' call for the step instead (:meth:`DeviceSampler.finish`), so the result is always transformers'."""
    vals, idx = scores.topk(k, dim=-1)  # descending
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = (vals - lse).exp().to(torch.float64)
    above = probs.cumsum(-1) - probs  # mass of the tokens ranked above each
    top_p = float(p.top_p)
    keep_n = int(p.min_tokens_to_keep)
    remove = above >= top_p
    remove[:, :keep_n] = False
    short = (probs.sum(-1) < top_p + TOPP_MARGIN) | ((above - top_p).abs() < TOPP_MARGIN).any(-1)
    short |= ~torch.isfinite(lse[:, 0])
    out = torch.full_like(scores, -math.inf).scatter_(-1, idx, vals.masked_fill(remove, -math.inf))
    return out, idx, short


def _fast_top_p(p, v: int, k: int) -> bool:
    return TOPP_K < v and p.min_tokens_to_keep <= k and p.filter_value == -math.inf


def process(ops, consts: _Consts, state: _State, raw: torch.Tensor, tokens: torch.Tensor, anc: torch.Tensor,
            fast: bool = True):
    """Processed float32 scores (B, N, V) of every node. ``tokens`` (B, N) the nodes' tokens, ``anc`` (B, N, N)
    ancestry (self included; node 0 is the root, whose token is already committed). No host reads.
    Returns (scores, candidate ids, short): with ``fast`` a top-p op runs in its top-K form
    (:func:`top_p_candidates`) and the last two are its candidate ids (B, N, K) and where its result may differ from
    transformers' (B, N); else both None."""
    b, n, v = raw.shape
    scores = raw.to(torch.float32)
    depth = anc.sum(-1) - 1  # (B, N)
    cur_len = state.base_len[:, None] + depth  # each node's context length, as vanilla's input_ids width
    dummy = None
    rep_i = 0
    cand = short = None
    k = topp_k(n)
    for i, ((kind, p), mask) in enumerate(zip(ops, consts.masks)):
        if kind == "topp" and fast and _fast_top_p(p, v, k):
            scores, idx, sh = top_p_candidates(p, scores.reshape(b * n, v), k)
            scores = scores.reshape(b, n, v)
            cand = idx.reshape(b, n, -1)  # a later top-p (two in one list) narrows further: its own ids
            short = sh.reshape(b, n) if short is None else short | sh.reshape(b, n)
        elif kind in ("pure", "topp"):
            if dummy is None:
                dummy = tokens.reshape(b * n, 1)
            scores = p(dummy, scores.reshape(b * n, v)).reshape(b, n, v)
        elif kind == "rep":
            present = _presence(state, rep_i, tokens, anc, depth, v)
            rep_i += 1
            pen = torch.where(scores < 0, scores * p.penalty, scores / p.penalty)
            scores = torch.where(present, pen, scores)
        elif kind == "suppress":
            scores = torch.where(mask, -math.inf, scores)
        elif kind in ("minlen", "minnew"):
            scores = torch.where(mask & (cur_len < state.limits[i])[..., None], -math.inf, scores)
        elif kind == "begin":
            scores = torch.where(mask & (cur_len == state.limits[i])[..., None], -math.inf, scores)
        elif kind in ("bos", "eos"):
            hit, keep = cur_len == state.limits[i], mask
            forced = torch.where(keep, 0.0, -math.inf).to(scores.dtype)
            scores = torch.where(hit[..., None], forced, scores)
        elif kind == "ngram":
            scores = _no_repeat_ngram(p.ngram_size, state, tokens, anc, depth, cur_len, scores)
    return scores, cand, short


def _presence(state: _State, k: int, tokens, anc, depth, vocab: int) -> torch.Tensor:
    """(B, N, V) bool: the token occurs in node i's context at a position >= the row's prompt_ignore_length."""
    b, n = tokens.shape
    # node j's token sits at position base_len + depth_j - 1 of the context of its descendants
    ok = (depth > 0) & (state.base_len[:, None] + depth - 1 >= state.ignore[k][:, None])  # (B, N)
    contrib = (anc & ok[:, None, :]).to(torch.int32)  # [b, i, j]: node j's token is in node i's path
    counts = torch.zeros(b, n, vocab + 1, dtype=torch.int32, device=tokens.device)  # ids >= vocab: spare column
    counts.scatter_add_(2, tokens.clamp(max=vocab)[:, None, :].expand(b, n, n), contrib)
    return (counts[..., :vocab] > 0) | state.seen[k][:, None, :vocab]


def _no_repeat_ngram(size: int, state: _State, tokens, anc, depth, cur_len, scores):
    """NoRepeatNGramLogitsProcessor per node: windows of the node's own context (row sequence + path tokens)
    whose first size-1 tokens equal the context's last size-1 tokens ban their last token."""
    b, n, v = scores.shape
    seq_len = state.seq.shape[1] - 1
    width = seq_len + n
    ctx = torch.full((b, n, width), -1, dtype=torch.long, device=scores.device)
    ctx[:, :, :seq_len] = state.seq[:, None, :seq_len]
    pos_t = torch.arange(seq_len, device=scores.device)
    ctx[:, :, :seq_len].masked_fill_(pos_t[None, None, :] >= state.base_len[:, None, None], -1)
    # node j's token at position base_len + depth_j - 1 in the context of every node that has j on its path
    pos = (state.base_len[:, None] + depth - 1).clamp_min(0)  # (B, N)
    put = anc & (depth > 0)[:, None, :]  # [b, i, j]
    idx = torch.where(put, pos[:, None, :].expand(b, n, n), width)  # off-path nodes write to a spare column
    spare = torch.cat([ctx, torch.full((b, n, 1), -1, dtype=torch.long, device=scores.device)], dim=2)
    spare.scatter_(2, idx, torch.where(put, tokens[:, None, :].expand(b, n, n), -1))
    ctx = spare[:, :, :width]
    # the node's suffix of size-1 tokens
    offs = torch.arange(size - 1, device=scores.device)
    suf_pos = (cur_len[..., None] - (size - 1) + offs).clamp_min(0)  # (B, N, size-1)
    suffix = ctx.gather(2, suf_pos)
    windows = ctx.unfold(2, size, 1)  # (B, N, W, size)
    last = windows[..., -1]
    match = (windows[..., :-1] == suffix[:, :, None, :]).all(-1) & (last >= 0) & (last < v)
    match &= (cur_len >= size)[..., None]
    banned = torch.zeros(b, n, v + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(2, torch.where(match, last, v), True)
    return scores.masked_fill(banned[..., :v], -math.inf)


_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers as signed int64
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLD = 0x9E3779B97F4A7C15 - (1 << 64)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiplication, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _M1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_uniform(seed: int, rows: torch.Tensor, pos: torch.Tensor, width: int, salt: int = 0,
                  dtype: torch.dtype = torch.float32, gold: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms in (0, 1) (..., width), float32 (or ``dtype``: float64 keeps all 53 bits): a function of (seed, row,
    position, column, salt) only. ``rows`` and ``pos`` (same shape, int64, on the device) say where each draw is; a
    counter-based generator (splitmix64 over the key), so the same position gets the same noise in any step, tree or
    batch layout.

    ``gold``: splitmix64's increment as an int64 device scalar (:class:`_Consts`), for a compiled step: inductor folds
    ``arange * constant`` into an index expression of int32 indices, and triton then rejects the 64-bit literal
    (``Scalar -7046029254386353131 is out of range for type int32``: the batch-8 sampling step's compile failure of
    the seventh to eleventh H200 runs); multiplied by a tensor, the product stays int64 arithmetic. Same values."""
    g = _GOLD if gold is None else gold
    key = _mix(rows * g + seed) ^ _mix(pos * _M2 + salt * _M1 + 1)
    cols = torch.arange(width, device=pos.device, dtype=torch.long) * g
    x = _mix(key[..., None] + cols)
    u = ((x >> 11) & ((1 << 53) - 1)).to(torch.float64).add_(0.5).mul_(2.0 ** -53)
    if dtype == torch.float64:
        return u
    return u.to(dtype).clamp_(1e-30, 1 - 2 ** -24)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per node (..., V) -> (...): the first token v whose cumulative probability exceeds u * the total, for ``u``
    (...) uniform in (0, 1): a draw from probs / probs.sum(-1); never a token of probability 0 (float64 sums)."""
    c = probs.to(torch.float64).cumsum(-1)
    x = (u.to(torch.float64) * c[..., -1])[..., None]
    idx = torch.searchsorted(c, x, right=True)[..., 0].clamp_max(probs.shape[-1] - 1)
    ok = probs.gather(-1, idx[..., None])[..., 0] > 0  # u * total rounded up to the total: the last token kept
    return torch.where(ok, idx, probs.argmax(-1))


def draw(scores: torch.Tensor, u0: torch.Tensor | None, tokens, u=None, q=None):
    """Per-node tokens (B, N, K) long: [..., 0] the draw from softmax(scores) with the per-node uniforms ``u0``
    (B, N) (the argmax when ``u0`` is None); with ``q`` (speculative chains) also [..., 1] the acceptance bit of the
    next node's token (uniforms ``u``) and [..., 2] the residual draw (with ``u0``)."""
    if u0 is None:
        return scores.argmax(-1)[..., None]
    probs = torch.softmax(scores, dim=-1)
    plain = inverse_cdf(probs, u0)
    if q is None:
        return plain[..., None]
    nxt = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)[..., None]  # node j+1's token (last: unused)
    px, qx = probs.gather(-1, nxt)[..., 0], q.gather(-1, nxt)[..., 0]
    acc = (qx > 0) & (u * qx <= px)
    resid = (probs - q).clamp_min(0)
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, probs)
    rdraw = inverse_cdf(resid, u0)
    return torch.stack([plain, acc.long(), rdraw], dim=-1)


def _step(ops, consts, state, raw, tokens, anc, seed, q, fast: bool = True):
    """Processing and draws of every node. ``seed``: the request's seed as a device scalar (None: greedy); the
    position-keyed uniforms are made here, inside the captured step: node j of row b draws with the uniform of
    position base_len[b] + depth_j (module docstring), so no noise is written by the host.

    ``fast``: top-p in its top-K form, and the draw over those K candidates when every token the processors left
    possible is one of them (the same token as the draw over the whole vocabulary: the same probabilities summed in
    the same vocabulary order, the zeros left out). Where that can't be guaranteed for some node (``short``), every
    draw of the step is -1: :meth:`DeviceSampler.finish` then runs the step again with ``fast=False``."""
    scores, cand, short = process(ops, consts, state, raw, tokens, anc, fast)
    if seed is None:
        out = draw(scores, None, tokens)
    else:
        b, n, v = raw.shape
        pos = state.base_len[:, None] + (anc.sum(-1) - 1)  # the position each node's draw fills
        rows = torch.arange(b, device=raw.device)[:, None].expand(b, n)
        u0 = keyed_uniform(seed, rows, pos, 1, dtype=torch.float64, gold=consts.gold)[..., 0]  # (B, N): one per draw
        u = None if q is None else keyed_uniform(seed, rows, pos, 1, salt=1, gold=consts.gold)[..., 0]
        if cand is not None and q is None:
            ids = cand.sort(-1).values  # vocabulary order
            sub = scores.gather(-1, ids)
            short = short | (torch.isfinite(sub).sum(-1) != torch.isfinite(scores).sum(-1))
            pick = inverse_cdf(torch.softmax(sub, dim=-1), u0)
            out = ids.gather(-1, pick[..., None])
        else:
            out = draw(scores, u0, tokens, u, q)
    if short is not None:
        out = torch.where(short.any(), torch.full_like(out, -1), out)
    return scores, out


# ---- the per-request sampler ---------------------------------------------------------------------------------


_REQUESTS = itertools.count()  # request numbers (no request state: a counter)
_COPIES = itertools.count()  # names of the compiled copies of the step (one code object per captured entry)


class _Entry:
    """Everything one captured (or eager) step reads and writes, at fixed addresses."""

    def __init__(self, ops, batch, nodes, vocab, ctx_len, device, sample: bool, spec: bool,
                 compile_options: tuple | None = None):
        self.ops = ops  # the processors the step bakes in (kept alive with the graph)
        self.consts = _Consts(ops, vocab, device)
        self.state = _State(ops, batch, vocab, ctx_len, device)
        self.tokens = torch.zeros(batch, nodes, dtype=torch.long, device=device)
        self.anc = torch.zeros(batch, nodes, nodes, dtype=torch.bool, device=device)
        self.seed = torch.zeros((), dtype=torch.long, device=device) if sample else None  # the request's seed
        self.seed_of = None  # the request whose seed ``seed`` holds
        self.q = torch.zeros(batch, nodes, vocab, device=device) if spec else None
        # (logits buffer address, dtype, shape, strides) -> (captured graph, its outputs), or False where capture
        # failed: one graph per buffer the step reads. A layer-plan method's plans (LoRA-Drop's refresh / drop, M2R2's lower / upper
        # stack) each write logits to their own graph's buffer, and the step alternates between them: one graph per
        # buffer is replayed, where recapturing on every switch cost LoRA-Drop +2.7 ms a sampled step on an H200
        # (0.71x vs 1.55x greedy, benchmarks/results/h200-bf16-cell-s1-2026-12-02-r6).
        self.graphs: dict = {}
        # The captured step is compiled first (the workspace's verify options; None: eager), as the verify and the
        # layer plans are: uncompiled, temperature + top-p + the keyed draw of one node is ~100 small kernels
        # (scripts/sampling_op_count.py), about 0.3 ms of a 1.2 ms LoRA-Drop step on an H200 (2026-12-02, seventh
        # run: sampling 2.29x against greedy 3.12x).
        # Its own code object (compiled_copy): dynamo's guards and recompile limit are then this entry's alone.
        # A compile that fails is not tried again: the entry's buffers are captured from the eager step.
        self.compile_options = compile_options
        self._compiled = None
        self.compiled = 0  # buffers captured from the compiled step
        self.compile_error = None

    def run(self, raw, fast: bool = True):
        return _step(self.ops, self.consts, self.state, raw, self.tokens, self.anc, self.seed, self.q, fast)

    def _run_compiled(self, raw):
        if self._compiled is None:
            self._compiled = compiled_copy(_step, self.compile_options, f"_sample_step_{next(_COPIES)}")
        return self._compiled(self.ops, self.consts, self.state, raw, self.tokens, self.anc, self.seed, self.q, True)

    MAX_BUFFERS = 4  # logits buffers an entry captures for; another one (not a fixed buffer) runs eagerly

    @property
    def graph(self) -> bool:
        """Whether any step of this entry ran as a captured graph."""
        return any(bool(g) for g in self.graphs.values())

    def replayed(self, raw):
        """This step on ``raw``: the graph captured for its buffer (captured now if new), or None (eager)."""
        key = (raw.data_ptr(), raw.dtype, tuple(raw.shape), raw.stride())  # what the captured kernels read
        g = self.graphs.get(key)
        if g is None:
            if not capture.graphs_supported(raw.device) or len(self.graphs) >= self.MAX_BUFFERS:
                return None
            self.graphs[key] = False
            if self.compile_options is not None and self.compile_error is None:
                try:
                    g = self.graphs[key] = capture.record(lambda: self._run_compiled(raw), raw.device)
                    self.compiled += 1
                except Exception as e:  # noqa: BLE001 - any compile failure: the eager step is captured instead
                    if raw.is_cuda:
                        torch.cuda.synchronize(raw.device)
                    self.compile_error = f"{type(e).__name__}: {e}"[:500]
            if not g:
                try:
                    g = self.graphs[key] = capture.record(lambda: self.run(raw), raw.device)
                except Exception:  # a processor that can't be captured: this buffer's steps run eagerly
                    if raw.is_cuda:
                        torch.cuda.synchronize(raw.device)
                    return None
        if not g:
            return None
        g[0].replay()
        return g[1]


class DeviceSampler:
    """One request's device-side processing and draws. Build with :meth:`build` (None: host path)."""

    MAX_GRAPHS = 8  # captured steps kept per workspace

    def __init__(self, ops, input_ids: torch.Tensor, first: list, do_sample: bool, vocab: int, max_length: int,
                 workspace=None):
        self.ops, self.do_sample, self.vocab = ops, do_sample, vocab
        self.device = input_ids.device
        self.batch, self.plen = input_ids.shape
        self.ctx_len = max_length
        self.sig = signature(ops)
        self.workspace = workspace  # the static engine's workspace when its steps are captured as graphs
        self.seed = None
        if do_sample:  # drawn from torch's default generator: torch.manual_seed(s) reproduces the request
            self.seed = int(torch.randint(0, 2**62, (1,)).item())
        self.request = next(_REQUESTS)  # tells a (shared, captured) entry whose seed it holds
        self.ignore = []
        for kind, p in ops:
            if kind == "rep":
                ig = getattr(p, "prompt_ignore_length", None)  # transformers < 5.2x: none
                ig = ig.reshape(-1).tolist() if isinstance(ig, torch.Tensor) else [int(ig or 0)] * self.batch
                self.ignore.append(ig)
        self.lengths = [self.plen] * self.batch
        self._input_ids = input_ids
        self._pending: list = [[] for _ in range(self.batch)]  # committed tokens not yet in the device state
        self._entry = None  # eager entries (no workspace): the last one used, and all by (node count, spec)
        self._entries: dict = {}
        self._loaded = None
        self._staged = None
        self._host = self._dev = None  # _flush's staging buffers (pinned on a GPU) and their device copy
        self.fallbacks = 0  # steps whose top-p needed transformers' sort (finish)
        for b, t in enumerate(first):
            self.committed(b, [t])

    @classmethod
    def build(cls, logits_processor, do_sample, input_ids, first, vocab, max_length, workspace=None):
        if not do_sample and not logits_processor:
            return None  # plain greedy: the engine's fast path
        ops = plan(logits_processor)
        if ops is None:
            return None
        return cls(ops, input_ids, first, do_sample, vocab, max_length, workspace)

    def committed(self, b: int, tokens: list) -> None:
        self._pending[b].extend(tokens)

    # -- state upload
    def _load(self, entry: _Entry) -> None:
        """Write the request's initial state into ``entry`` (a captured entry serves many requests)."""
        st = entry.state
        ids = self._input_ids
        pos = torch.arange(self.plen, device=self.device)
        for k, ig in enumerate(self.ignore):
            ig_t = torch.tensor(ig, dtype=torch.long).to(self.device)
            st.ignore[k].copy_(ig_t)
            keep = pos[None, :] >= ig_t[:, None]
            # ids the LM head can't produce (>= vocab) and ignored positions go to the spare column, as in HF
            st.seen[k].zero_()
            st.seen[k].scatter_(1, torch.where(keep, ids.clamp(max=self.vocab), self.vocab), True)
        if st.has_seq:
            st.seq.zero_()
            st.seq[:, : self.plen] = ids
        limits = [_length_limit(k, p) if k in _LENGTH_OPS else 0 for k, p in self.ops]
        st.limits[: len(limits)].copy_(torch.tensor(limits, dtype=torch.long))
        self._loaded = entry

    def _flush(self, entry: _Entry) -> None:
        """The tokens committed since the last step into the device state: one host->device copy, no sync."""
        st = entry.state
        rows, toks, poss = [], [], []
        for b in range(self.batch):
            for t in self._pending[b]:
                rows.append(b)
                toks.append(t)
                poss.append(self.lengths[b])
                self.lengths[b] += 1
            self._pending[b] = []
        bsz, k = self.batch, len(rows)
        vals = self.lengths + rows + toks + poss
        m = len(vals)
        if self._host is None or self._host.numel() < m:  # grown rarely (a step's committed tokens)
            cap = max(m, 4 * bsz + 64)
            self._host = torch.zeros(cap, dtype=torch.long)
            if self.device.type == "cuda":  # pinned: the copy below is asynchronous, queued behind the forward
                self._host = self._host.pin_memory()
            self._dev = torch.zeros(cap, dtype=torch.long, device=self.device)
        # rewritten next step only after the step's host read, which comes after this copy has run
        self._host.numpy()[:m] = vals
        buf = self._dev[:m]
        buf.copy_(self._host[:m], non_blocking=True)
        st.base_len.copy_(buf[:bsz])
        if not k:
            return
        r, t, p = buf[bsz : bsz + k], buf[bsz + k : bsz + 2 * k], buf[bsz + 2 * k :]
        for i in range(len(self.ignore)):  # positions before the row's prompt_ignore_length, ids >= vocab: spare
            keep = (p >= st.ignore[i][r]) & (t < self.vocab)
            st.seen[i].index_put_((r, torch.where(keep, t, self.vocab)), torch.ones((), dtype=torch.bool,
                                                                                   device=self.device))
        if st.has_seq:
            last = st.seq.shape[1] - 1
            st.seq.index_put_((r, p.clamp(max=last)), t)

    # -- the step
    def _entry_for(self, b: int, n: int, spec: bool) -> _Entry:
        if self.workspace is None:  # eager: one entry per node count (the dynamic engine's N varies), one state
            e = self._entries.get((n, spec))
            if e is None:
                e = self._entries[(n, spec)] = _Entry(self.ops, b, n, self.vocab, self.ctx_len, self.device,
                                                      self.do_sample, spec)
                if self._entry is not None:  # the request's state and constants are shared by its entries
                    e.state, e.consts = self._entry.state, self._entry.consts
                else:
                    self._load(e)
            self._entry = e
            return e
        cache = self.workspace.sampling
        key = (self.sig, self.do_sample, spec, b, n, self.ctx_len)
        e = cache.get(key)
        if e is None:
            if len(cache) >= self.MAX_GRAPHS:
                cache.pop(next(iter(cache)))
            e = cache[key] = _Entry(self.ops, b, n, self.vocab, self.ctx_len, self.device, self.do_sample, spec,
                                    getattr(self.workspace, "compiled", None))
        if self._loaded is not e:
            if self._loaded is None:
                self._load(e)
            else:  # another captured step of this request (e.g. chains with q this step): carry the state over
                e.state.copy_from(self._loaded.state)
                self._loaded = e
        return e

    def stage(self, trees: list, packed) -> None:
        """Queue this step's inputs (committed tokens, the trees, draft distributions) for :meth:`finish`. The
        engine calls it right after launching the verify forward, with ``packed`` the verify's own device copies of
        the trees (``backend.device_inputs``): every copy here is device-to-device or from pinned memory, so it is
        queued behind the forward without waiting for it, and this host work overlaps the forward."""
        spec = self.do_sample and any(t.draft_probs is not None and t.is_chain for t in trees)
        b, n = packed.tokens.shape
        e = self._entry_for(b, n, spec)
        self._flush(e)
        e.tokens.copy_(packed.tokens, non_blocking=True)
        e.anc.copy_(packed.ancestors, non_blocking=True)
        if e.seed is not None:  # the noise itself is made inside the step (_step), keyed by position
            if e.seed_of != self.request:  # once per request and entry, not per step
                e.seed.fill_(self.seed)
                e.seed_of = self.request
            for r, t in enumerate(trees):
                if t.draft_probs is not None and t.is_chain and len(t) > 1:
                    e.q[r, : len(t) - 1].copy_(t.draft_probs, non_blocking=True)
        self._staged = e

    def finish(self, raw: torch.Tensor) -> tuple:
        """After the verify forward: raw (B, N, V) its logits. Returns (per-row host lists of per-node
        [draw(, accept, residual)], processed scores (B, N, V) on the device: valid until the next step)."""
        lst, scores, _ = self.finish_with(raw, None)
        return lst, scores

    def finish_with(self, raw: torch.Tensor, also) -> tuple:
        """:meth:`finish`, reading ``also`` (a (B, m) integer device tensor, e.g. the draft's deferred tokens; or
        None) in the same host transfer: (draws, scores, ``also``'s rows as lists or None)."""
        e, self._staged = self._staged, None
        got = e.replayed(raw) if self.workspace is not None else None
        scores, out = got if got is not None else e.run(raw)
        lst, extra = _read(out, also)  # the step's one host read
        if lst and lst[0] and lst[0][0][0] < 0:  # top-p's top-K form could not decide some node: exact call
            self.fallbacks += 1
            scores, out = e.run(raw, fast=False)
            lst = out.tolist()
        return lst, scores, extra

    def captured(self) -> bool | None:
        """Whether this request's steps ran as captured CUDA graphs (None: no workspace, eager by design)."""
        if self.workspace is None or self._loaded is None:
            return None
        return bool(self._loaded.graph)

    def compile_state(self) -> tuple:
        """(whether this request's last captured step was captured from the compiled step, why not or None)."""
        e = self._loaded
        if self.workspace is None or e is None:
            return False, None
        return e.compiled > 0, e.compile_error

    def step(self, raw: torch.Tensor, trees: list, packed) -> tuple:
        """:meth:`stage` then :meth:`finish` (when the logits are already there)."""
        self.stage(trees, packed)
        return self.finish(raw)


def _read(out: torch.Tensor, also) -> tuple:
    """``out`` (B, N, C) as per-row lists of per-node lists, and ``also`` (B, m) as per-row lists (None if None), in
    one host transfer."""
    if also is None:
        return out.tolist(), None
    b, n, c = out.shape
    flat = torch.cat([out.reshape(b, n * c), also.to(out.dtype)], 1).tolist()
    return [[r[i * c : (i + 1) * c] for i in range(n)] for r in flat], [r[n * c :] for r in flat]


def walk(tree: Tree, node_out: list) -> tuple:
    """The accepted path and bonus token from a step's per-node draws (see the module docstring)."""
    from .verify import greedy_walk

    if len(node_out[0]) == 3 and tree.draft_probs is not None and tree.is_chain:
        path = [0]
        for j in range(len(tree) - 1):
            if not node_out[j][1]:
                return path, node_out[j][2]
            path.append(j + 1)
        return path, node_out[len(tree) - 1][0]
    return greedy_walk(tree, [o[0] for o in node_out])
