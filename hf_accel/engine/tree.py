"""Token trees: the draft structure every speculative method hands to the engine, and tree attention masks.

A draft is a tree whose node 0 is the *root*: the last committed token, whose KV is not in the cache yet.
``parents[i] < i`` for i > 0. A chain is a tree where ``parents[i] == i - 1``.

The first ``forced`` nodes after the root form a chain that is accepted without verification: tokens a lossy
method has already decided (LUD's confident placeholder predictions), fed through the forward so that their KV is
computed. They are committed like accepted drafts.

Nodes from ``n_real`` on are *scratch* nodes: they take part in the verify forward (a method computes
something there, e.g. hidden transfer's pseudo tokens) but are never accepted: the walk ignores them, their
logits are not scored, and their KV is dropped at commit like any rejected node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import models


@dataclass
class Tree:
    tokens: list  # token id of every node; node 0 = root (the pending token)
    parents: list  # parent node of every node; parents[0] == -1
    #: optional draft distributions for chains, one (V,) row per non-root node (speculative sampling)
    draft_probs: torch.Tensor | None = None
    n_real: int | None = None  # nodes [n_real, len) are scratch nodes (see the module docstring)
    forced: int = 0  # nodes 1..forced: a chain accepted without verification (lossy methods)
    #: optional, per node: the probability that it ends up accepted (node 0: 1.0), nodes in best-first order, so the
    #: first w nodes are the best w-node subtree; the engine's budget chooser (engine/budget.py) cuts trees by it
    scores: list | None = None
    _children: list | None = field(default=None, repr=False)

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a draft tree needs one parent per token and at least the root")
        if self.parents[0] != -1:
            raise ValueError("node 0 of a draft tree is the root and has parent -1")
        for i in range(1, len(self.parents)):
            if not 0 <= self.parents[i] < i:
                raise ValueError(f"draft tree node {i} has parent {self.parents[i]}; parents must precede children")
        if self.n_real is not None and not 1 <= self.n_real <= len(self.tokens):
            raise ValueError(f"n_real={self.n_real} must be in [1, {len(self.tokens)}]")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError("a draft tree's scores need one value per node")
        if self.forced and (self.forced >= self.real or any(self.parents[i] != i - 1 for i in range(1, self.forced + 1))
                            or self.draft_probs is not None):
            raise ValueError("forced nodes must be a chain of real nodes right after the root (no draft_probs)")

    @classmethod
    def chain(cls, root: int, draft: list, draft_probs=None) -> "Tree":
        return cls([int(root)] + [int(t) for t in draft], list(range(-1, len(draft))), draft_probs)

    @classmethod
    def root_only(cls, root: int) -> "Tree":
        return cls([int(root)], [-1])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def real(self) -> int:
        """Number of real (acceptable) nodes."""
        return len(self.tokens) if self.n_real is None else self.n_real

    @property
    def is_chain(self) -> bool:
        return self.n_real is None and all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self) -> list:
        """children()[i] maps token -> node for the real children of node i (first occurrence wins)."""
        if self._children is None:
            ch = [dict() for _ in self.tokens]
            for i in range(1, self.real):
                ch[self.parents[i]].setdefault(self.tokens[i], i)
            self._children = ch
        return self._children

    def depths(self) -> list:
        d = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            d[i] = d[self.parents[i]] + 1
        return d

    def path_to(self, node: int) -> list:
        """Nodes from the root to ``node``, root first."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


@dataclass
class PackedTrees:
    """A batch of trees padded to one node count, as tensors ready for a verify forward."""

    tokens: torch.Tensor  # (B, N) long
    depths: torch.Tensor  # (B, N) long
    valid: torch.Tensor  # (B, N) bool: real node (padding nodes are never accepted)
    ancestors: torch.Tensor  # (B, N, N) bool: [b, i, j] = j is i or an ancestor of i
    max_depth: int = 0  # the deepest node's depth (read on the host, no device sync)


def add_scratch_chains(tokens: list, parents: list, owners, length: int, fill) -> dict:
    """Append to a tree's ``tokens``/``parents`` (in place), for every node u in ``owners``, a chain of ``length``
    scratch nodes hanging from u whose input token is ``fill(u)``. Returns {u: [its chain's node indices]}."""
    chains = {}
    for u in owners:
        chain, prev = [], u
        for _ in range(length):
            chain.append(len(tokens))
            tokens.append(fill(u))
            parents.append(prev)
            prev = chain[-1]
        chains[u] = chain
    return chains


def pack(trees: list, active: list, pad_token: int, device, nodes: int | None = None) -> PackedTrees:
    """Trees -> padded tensors; ``nodes`` fixes the node count (the static engine's budget)."""
    n = max(len(t) for t in trees) if nodes is None else nodes
    b = len(trees)
    tokens = np.full((b, n), pad_token, dtype=np.int64)
    depths = np.zeros((b, n), dtype=np.int64)
    valid = np.zeros((b, n), dtype=bool)
    anc = np.zeros((b, n, n), dtype=bool)
    idx = np.arange(n)
    anc[:, idx, idx] = True
    parents = np.tile(idx, (b, 1))  # padding nodes (and the root) are their own parent: no ancestor added
    total = deepest = 0
    for r, tree in enumerate(trees):
        m = len(tree)
        tokens[r, :m] = tree.tokens
        valid[r, :m] = active[r]
        par = tree.parents
        d = [0] * m
        for i in range(1, m):
            d[i] = d[par[i]] + 1
        depths[r, :m] = d
        parents[r, 1:m] = par[1:]
        total += m - 1
        deepest = max(deepest, max(d))
    if total <= 24:  # few nodes: one numpy op per node
        for r, tree in enumerate(trees):
            a = anc[r]
            for i in range(1, len(tree)):
                a[i] |= a[tree.parents[i]]
    elif deepest:  # pointer doubling: numpy work per log2(tree depth), not per node
        rows = np.arange(b)[:, None]
        jump = parents
        anc[rows, idx[None, :], jump] = True  # distance <= 1
        reach = 1
        while reach < deepest:  # anc[i]: ancestors within distance `reach`; jump[i]: the one `reach` up
            anc |= anc[rows, jump]
            jump = jump[rows, jump]
            reach *= 2
    return PackedTrees(
        torch.from_numpy(tokens).to(device),
        torch.from_numpy(depths).to(device),
        torch.from_numpy(valid).to(device),
        torch.from_numpy(anc).to(device),
        int(depths.max()),
    )


def attention_masks(
    layout: models.AttentionLayout,
    cache_valid: torch.Tensor,
    cache_pos: torch.Tensor,
    q_pos: torch.Tensor,
    q_valid: torch.Tensor,
    q_visible: torch.Tensor,
    dtype: torch.dtype,
):
    """Additive 4D masks (B, 1, N, S + N) for a forward of N new tokens over S cached slots.

    A query sees a cached slot when the slot is valid (not padding, not a rejected draft) and inside the
    sliding window by *logical* position; it sees a new token when ``q_visible`` says so (tree ancestry
    or causal order) and that token is valid. Windows follow transformers' rule: visible iff
    ``q_pos - kv_pos < window``. Returns one mask or a {layer_type: mask} dict, as the family wants.
    """
    kv_valid = torch.cat([cache_valid, q_valid], dim=1)  # (B, S+N)
    kv_pos = torch.cat([cache_pos, q_pos], dim=1)
    s = cache_valid.shape[1]
    base = kv_valid[:, None, :].expand(-1, q_pos.shape[1], -1).clone()  # (B, N, S+N)
    base[:, :, s:] &= q_visible
    return _additive(layout, base, q_pos, kv_pos, dtype)


def static_attention_masks(
    layout: models.AttentionLayout,
    slot_valid: torch.Tensor,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    q_visible: torch.Tensor,
    region: torch.Tensor,
    dtype: torch.dtype,
):
    """Additive 4D masks (B, 1, N, L) for a forward whose N tokens are written at the slots ``region`` of a
    fixed buffer of L slots. Outside the region a query sees the valid slots (``slot_valid``); inside it, the
    tokens ``q_visible`` allows. ``slot_pos`` must already hold ``q_pos`` at the region (windows use it).
    Every shape is fixed and no value is read on the host, so this can live inside a CUDA graph."""
    b, n = q_pos.shape
    base = slot_valid[:, None, :].expand(-1, n, -1).clone()  # (B, N, L)
    base.scatter_(2, region[None, None, :].expand(b, n, -1), q_visible)
    return _additive(layout, base, q_pos, slot_pos, dtype)


def _additive(layout, base: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor, dtype):
    """Boolean visibility (B, N, K) -> additive mask(s), with each layer kind's sliding window applied."""
    neg = torch.finfo(dtype).min
    out = {}
    for kind, window in layout.kinds.items():
        allowed = base
        if window is not None:
            allowed = base & ((q_pos[:, :, None] - kv_pos[:, None, :]) < window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, neg)
        out[kind] = mask[:, None]
    if layout.mode == "dict":
        return out
    (only,) = out.values()
    return only
