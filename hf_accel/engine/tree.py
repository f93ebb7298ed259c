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
    #: per node: its depth, and its ancestors as a bit mask (bit j: node j is the node or an ancestor of it); computed
    #: on first use, or given by a drafter that knows them (:meth:`with_layout`)
    _depths: list | None = field(default=None, repr=False, compare=False)
    _masks: list | None = field(default=None, repr=False, compare=False)

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

    def fill(self, tokens: list) -> None:
        """Nodes 1..len(tokens) get these tokens (a draft whose tokens arrived after the tree was built: the
        engine's deferred tokens)."""
        self.tokens[1 : 1 + len(tokens)] = [int(t) for t in tokens]
        self._children = None

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
        """Each node's depth (the root's 0). Shared: callers must not change it."""
        if self._depths is None:
            d = [0] * len(self.tokens)
            par = self.parents
            for i in range(1, len(d)):
                d[i] = d[par[i]] + 1
            self._depths = d
        return self._depths

    def ancestor_masks(self) -> list:
        """Per node, the int whose bit j says node j is the node itself or one of its ancestors (what
        :func:`pack` turns into the ancestry matrix). Shared: callers must not change it."""
        if self._masks is None:
            m = [1] * len(self.tokens)
            par = self.parents
            for i in range(1, len(m)):
                m[i] = m[par[i]] | (1 << i)
            self._masks = m
        return self._masks

    @classmethod
    def grown(cls, tokens: list, parents: list, scores: list | None, depths: list, masks: list) -> "Tree":
        """A tree from a drafter that grew it node by node, so that it holds the invariants :meth:`__post_init__`
        checks by construction (parents precede children, one parent and one score per node, no scratch or forced
        nodes), with the depths and ancestor masks it computed along the way: no checking pass over the nodes."""
        t = cls.__new__(cls)
        t.__dict__.update(_tree_defaults())
        t.tokens, t.parents, t.scores, t._depths, t._masks = tokens, parents, scores, depths, masks
        return t

    def with_layout(self, depths: list, masks: list) -> "Tree":
        """Give the tree the depths and ancestor masks its drafter computed while growing it (they must be what
        :meth:`depths` and :meth:`ancestor_masks` would compute); returns the tree."""
        self._depths, self._masks = depths, masks
        return self

    def path_to(self, node: int) -> list:
        """Nodes from the root to ``node``, root first."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def _tree_defaults() -> dict:
    """Every Tree field's default (for :meth:`Tree.grown`)."""
    global _TREE_DEFAULTS
    if _TREE_DEFAULTS is None:
        import dataclasses

        _TREE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Tree) if f.default is not dataclasses.MISSING}
    return _TREE_DEFAULTS


_TREE_DEFAULTS = None


@dataclass
class PackedTrees:
    """A batch of trees padded to one node count, as tensors ready for a verify forward."""

    tokens: torch.Tensor  # (B, N) long
    depths: torch.Tensor  # (B, N) long
    valid: torch.Tensor  # (B, N) bool: real node (padding nodes are never accepted)
    ancestors: torch.Tensor  # (B, N, N) bool: [b, i, j] = j is i or an ancestor of i
    max_depth: int = 0  # the deepest node's depth (read on the host, no device sync)
    q_pos: torch.Tensor | None = None  # (B, N) long: each node's logical position (when pack() was given ``base``)


class PackBuffers:
    """Host buffers that :func:`pack` writes one width's tensors into, reused step after step (pinned on a CUDA
    device, so that the copies into the device's buffers are asynchronous). Reusing them is safe because a step reads
    the device once (its verdicts) after its forward, which waits for the copies queued before it."""

    def __init__(self, batch: int, n: int, pin: bool = False):
        def host(*shape, dtype):
            t = torch.zeros(shape, dtype=dtype)
            return t.pin_memory() if pin else t

        self.tokens = host(batch, n, dtype=torch.long)
        self.depths = host(batch, n, dtype=torch.long)
        self.valid = host(batch, n, dtype=torch.bool)
        self.ancestors = host(batch, n, n, dtype=torch.bool)
        self.q_pos = host(batch, n, dtype=torch.long)
        self.np = {k: getattr(self, k).numpy() for k in ("tokens", "depths", "valid", "ancestors", "q_pos")}


_SELF_BITS: dict = {}  # n -> [1 << i for i in range(n)]: padding nodes see themselves only


def _self_bits(n: int) -> list:
    bits = _SELF_BITS.get(n)
    if bits is None:
        bits = _SELF_BITS[n] = [1 << i for i in range(n)]
    return bits


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


def pack(trees: list, active: list, pad_token: int, device, nodes: int | None = None, base: list | None = None,
         out: PackBuffers | None = None, last_position: int | None = None) -> PackedTrees:
    """Trees -> padded tensors; ``nodes`` fixes the node count (the static engine's budget). ``base``: each row's
    logical position of its root (then ``q_pos`` = base + depth); ``out``: host buffers of this batch and node count
    to write into (the returned tensors are then those buffers, on the host: ``device`` must be "cpu").
    ``last_position``: a learned position table's last (GPT-2's n_positions - 1): no node sits past it (a node there
    is past max_length — deep drafts and scratch nodes near the end — and only must not index past the table).

    Per row a few list operations (the trees' cached depths and ancestor masks, :meth:`Tree.ancestor_masks`), then
    numpy over the whole batch: no numpy call per node or per row."""
    n = max(len(t) for t in trees) if nodes is None else nodes
    b = len(trees)
    tok, dep, msk, lens = [], [], [], []
    bits = _self_bits(n)
    for tree in trees:
        m = len(tree)
        if m > n:
            raise ValueError(f"a draft tree of {m} nodes does not fit a verify of {n} nodes")
        tok += tree.tokens
        dep += tree.depths()
        msk += tree.ancestor_masks()
        if m < n:
            tok += [pad_token] * (n - m)
            dep += [0] * (n - m)
            msk += bits[m:]
        lens.append(m)
    if out is not None:
        o = out.np
        tokens, depths, valid, anc, qpos = o["tokens"], o["depths"], o["valid"], o["ancestors"], o["q_pos"]
        tokens.reshape(-1)[:] = tok
        depths.reshape(-1)[:] = dep
    else:
        tokens = np.array(tok, dtype=np.int64).reshape(b, n)
        depths = np.array(dep, dtype=np.int64).reshape(b, n)
        valid = anc = qpos = None
    real = (np.arange(n)[None, :] < np.array(lens)[:, None]) & np.array(active, dtype=bool)[:, None]
    if valid is not None:
        np.copyto(valid, real)
    else:
        valid = real
    if n <= 64:  # one little-endian uint64 per node, its bits unpacked: bit j of node i -> anc[b, i, j]
        words = np.array(msk, dtype="<u8").view(np.uint8).reshape(b, n, 8)
        unpacked = np.unpackbits(words, axis=-1, count=n, bitorder="little")
    else:
        nb = (n + 7) // 8
        raw = b"".join(x.to_bytes(nb, "little") for x in msk)
        unpacked = np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(b, n, nb), axis=-1, count=n,
                                 bitorder="little")
    if anc is not None:
        np.copyto(anc, unpacked.view(bool))
    else:
        anc = unpacked.view(bool)
    if base is not None:
        if qpos is not None:
            np.add(np.array(base, dtype=np.int64)[:, None], depths, out=qpos)
        else:
            qpos = np.array(base, dtype=np.int64)[:, None] + depths
        if not all(active):  # a finished row's root-only tree, seen by none: at position 0, not past its end
            qpos[~np.array(active, dtype=bool)] = 0
        if last_position is not None:
            np.minimum(qpos, last_position, out=qpos)
    deepest = max(dep) if dep else 0
    if out is not None:
        return PackedTrees(out.tokens, out.depths, out.valid, out.ancestors, deepest,
                           out.q_pos if base is not None else None)
    q = torch.from_numpy(qpos).to(device) if qpos is not None else None
    return PackedTrees(
        torch.from_numpy(tokens).to(device),
        torch.from_numpy(depths).to(device),
        torch.from_numpy(valid).to(device),
        torch.from_numpy(np.ascontiguousarray(anc)).to(device),
        deepest,
        q,
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
