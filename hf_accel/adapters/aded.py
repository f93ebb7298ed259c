"""ADED: adaptive draft-verification with a trigram datastore (arXiv 2407.12021). Training-free, lossless.

Drafting reads P(next | previous two tokens) from a read-only corpus datastore (data/trigram.py) mixed with
a per-request *overlay* of the trigrams this request has seen (its prompt and everything generated so far),
grows a token tree, and hands it to the engine, which verifies it in one forward with tree attention.

Choices that are ours (the paper and its code differ or are silent):
* The overlay belongs to the request (one per row), so requests never contaminate each other; the reference
  code adds +0.04 boosts into the shared table in place. We mix instead of adding:
  ``P(c|a,b) = (1-l) P_store(c|a,b) + l P_ctx(c|a,b)`` with ``l = n / (n + overlay_strength)``, n the
  number of times the request has seen the pair (a, b). Unseen pairs back off to bigrams (store, then context).
* ``search="best_first"`` (default) grows the tree by path probability: repeatedly add the frontier node
  with the highest product of conditional probabilities, up to ``max_nodes``. ``max_nodes="auto"`` (default): the
  engine chooses each step's size from measured verify costs and the tree's path probabilities (engine/budget.py),
  up to 64 nodes; a number fixes it. ``search="mcts"`` runs the
  paper's MCTS-style search (PUCT selection, ``mcts_iterations`` rollouts to ``max_depth``, value = path
  probability) and keeps the most visited nodes. Both give a tree; the engine is the same.
* ``datastore``: a path, a TrigramStore, ``"auto"`` (the store built by ``hf-accel datastore build`` for
  this tokenizer, if one is in the cache; otherwise prompt-only) or None (prompt-only: the overlay alone).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..config import AccelConfig
from ..data.trigram import TrigramStore, cache_dir
from ..engine.adapter import Row, SpeculativeAdapter
from ..engine.tree import Tree
from ..registry import register

logger = logging.getLogger(__name__)


@dataclass
class ADEDConfig(AccelConfig):
    datastore: Any = "auto"
    max_nodes: Any = "auto"  # tree size including the root; "auto": chosen per step by the engine (up to AUTO_MAX)
    max_depth: int = 8
    max_children: int = 8  # successors considered per node
    search: str = "best_first"  # or "mcts"
    mcts_iterations: int = 150
    overlay_strength: float = 1.0
    min_prob: float = 1e-4  # drop tree nodes whose path probability falls below this

    def validate(self, method: str) -> None:
        if self.max_nodes != "auto" and (isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int)
                                         or self.max_nodes < 1):
            raise ValueError(f"accel={method!r}: max_nodes must be 'auto' or an integer >= 1, got {self.max_nodes!r}")
        if self.max_depth < 1 or self.max_children < 1:
            raise ValueError(f"accel={method!r}: max_depth and max_children must be >= 1")
        if self.search not in ("best_first", "mcts"):
            raise ValueError(f"accel={method!r}: search must be 'best_first' or 'mcts', got {self.search!r}")
        if self.overlay_strength <= 0:
            raise ValueError(f"accel={method!r}: overlay_strength must be > 0")


AUTO_MAX = 64  # max_nodes="auto": the largest tree the engine's budget chooser may pick


@lru_cache(maxsize=4)
def _load_store(path: str) -> TrigramStore:
    return TrigramStore.load(path)


def _auto_store(model):
    """The cached ShareGPT store whose vocabulary size matches this model, if exactly one exists."""
    d = cache_dir() / "datastores"
    if not d.exists():
        return None
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    index = d / "index.txt"  # lines: "<model name_or_path>\t<file>"
    name = str(getattr(model.config, "_name_or_path", ""))
    if index.exists():
        for line in index.read_text().splitlines():
            key, _, fname = line.partition("\t")
            if key == name and (d / fname).exists():
                store = _load_store(str(d / fname))
                if store.vocab_size >= (vocab or 0):
                    return store
    return None


class _RowState:
    __slots__ = ("tri", "bi", "memo")

    def __init__(self):
        self.tri: dict = {}  # (a, b) -> {c: count}
        self.bi: dict = {}  # b -> {c: count}
        self.memo: dict = {}  # (a, b) -> successors, invalidated when the overlay changes for (a, b)

    def add(self, tokens: list, start: int) -> None:
        """Count the trigrams/bigrams that end at positions >= start."""
        for i in range(max(start, 1), len(tokens)):
            b, c = tokens[i - 1], tokens[i]
            d = self.bi.setdefault(b, {})
            d[c] = d.get(c, 0) + 1
            if i >= 2:
                key = (tokens[i - 2], b)
                d = self.tri.setdefault(key, {})
                d[c] = d.get(c, 0) + 1
                self.memo.pop(key, None)


@register("aded")
class ADED(SpeculativeAdapter):
    Config = ADEDConfig
    lossless = True

    def __init__(self, model, config: ADEDConfig):
        super().__init__(model, config)
        ds = config.datastore
        vocab = getattr(model.config.get_text_config(), "vocab_size", None)
        if isinstance(ds, TrigramStore):
            self.store = ds
        elif ds is None:
            self.store = None
        elif ds == "auto":
            self.store = _auto_store(model)
        else:
            self.store = _load_store(str(ds))
        if self.store is not None and vocab is not None and self.store.vocab_size < vocab:
            raise ValueError(
                f"accel='aded': the datastore was built for a vocabulary of {self.store.vocab_size} tokens but the "
                f"model has {vocab}; build one with this model's tokenizer (hf-accel datastore build)."
            )

    def max_tree_nodes(self) -> int:
        return AUTO_MAX if self.config.max_nodes == "auto" else self.config.max_nodes

    def auto_budget(self) -> bool:
        return self.config.max_nodes == "auto"

    # ---- per request -----------------------------------------------------------------------------
    def prepare(self, model, rows, generation_config):
        states = []
        for row in rows:
            st = _RowState()
            st.add(row.tokens, 0)
            states.append(st)
        return states

    def observe(self, state, row: Row, new_tokens: list) -> None:
        if new_tokens:
            state[row.index].add(row.tokens, len(row.tokens) - len(new_tokens))

    # ---- drafting ----------------------------------------------------------------------------------
    def successors(self, st: _RowState, a: int, b: int) -> list:
        """[(token, prob)] for the context (a, b), most likely first, at most max_children."""
        key = (a, b)
        hit = st.memo.get(key)
        if hit is not None:
            return hit
        probs: dict = {}
        ctx = st.tri.get(key)
        store_part = self.store.trigram(a, b) if self.store is not None else None
        if store_part is None and ctx is None:
            # back off to bigrams: the store's, else the request's own
            store_part = self.store.bigram(b) if self.store is not None else None
            ctx = None if store_part is not None else st.bi.get(b)
        n = sum(ctx.values()) if ctx else 0
        lam = n / (n + self.config.overlay_strength) if store_part is not None else 1.0
        if store_part is not None:
            for t, p in zip(*store_part):
                probs[t] = (1.0 - lam) * p
        if ctx:
            for t, c in ctx.items():
                probs[t] = probs.get(t, 0.0) + lam * c / n
        out = sorted(probs.items(), key=lambda kv: -kv[1])[: self.config.max_children]
        st.memo[key] = out
        return out

    def draft(self, state, rows: list) -> list:
        grow = self._best_first if self.config.search == "best_first" else self._mcts
        top = self.max_tree_nodes()
        return [None if row is None else grow(state[row.index], row.tokens, min(top, row.max_nodes or top))
                for row in rows]

    def _best_first(self, st: _RowState, tokens: list, max_nodes: int) -> Tree:
        """Nodes are added in decreasing path probability (``score``), so every prefix is the best subtree of its
        size and ``score`` is each node's chance of being accepted under the drafter's model (Tree.scores)."""
        cfg = self.config
        root = tokens[-1]
        prev = tokens[-2] if len(tokens) > 1 else -1
        toks, parents, depth, score = [root], [-1], [0], [1.0]
        heap: list = []
        tick = 0

        def expand(node: int, a: int) -> None:
            nonlocal tick
            if depth[node] >= cfg.max_depth:
                return
            for t, p in self.successors(st, a, toks[node]):
                s = score[node] * p
                if s >= cfg.min_prob:
                    tick += 1
                    heapq.heappush(heap, (-s, tick, node, t))

        expand(0, prev)
        while heap and len(toks) < max_nodes:
            neg, _, parent, t = heapq.heappop(heap)
            toks.append(t)
            parents.append(parent)
            depth.append(depth[parent] + 1)
            score.append(-neg)
            expand(len(toks) - 1, toks[parent])
        return Tree(toks, parents, scores=score)

    def _mcts(self, st: _RowState, tokens: list, max_nodes: int) -> Tree:
        """MCTS-style search (PUCT): value of a rollout = probability of its path; keep the most visited."""
        cfg = self.config
        root = tokens[-1]
        prev = tokens[-2] if len(tokens) > 1 else -1
        # node: [token, parent, prior, visits, value_sum, children(list) or None, prev_token]
        nodes = [[root, -1, 1.0, 0, 0.0, None, prev]]
        c_puct = 1.0
        for _ in range(cfg.mcts_iterations):
            node, path_p, d = 0, 1.0, 0
            while True:
                nd = nodes[node]
                if nd[5] is None:
                    nd[5] = []
                    if d < cfg.max_depth:
                        for t, p in self.successors(st, nd[6], nd[0]):
                            nodes.append([t, node, p, 0, 0.0, None, nd[0]])
                            nd[5].append(len(nodes) - 1)
                    break
                if not nd[5]:
                    break
                sq = math.sqrt(nd[3] + 1)
                best, best_u = None, -1.0
                for ch in nd[5]:
                    c = nodes[ch]
                    q = c[4] / c[3] if c[3] else 0.0
                    u = q + c_puct * c[2] * sq / (1 + c[3])
                    if u > best_u:
                        best, best_u = ch, u
                node = best
                path_p *= nodes[node][2]
                d += 1
            # backpropagate the path probability
            n = node
            while n >= 0:
                nodes[n][3] += 1
                nodes[n][4] += path_p
                n = nodes[n][1]
        # keep the most visited nodes (a node's visits never exceed its parent's, so the set is a tree)
        ranked = sorted(range(1, len(nodes)), key=lambda i: (-nodes[i][3], i))
        keep = [i for i in ranked if nodes[i][3] > 0][: max_nodes - 1]
        keep.sort()
        remap = {0: 0}
        toks, parents, prob = [root], [-1], [1.0]
        for i in keep:
            if nodes[i][1] in remap:
                remap[i] = len(toks)
                toks.append(nodes[i][0])
                parents.append(remap[nodes[i][1]])
                prob.append(prob[parents[-1]] * nodes[i][2])
        return Tree(toks, parents, scores=prob)
