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
from typing import Any, Literal

from ..config import AccelConfig, option
from ..data import trigram
from ..data.trigram import TrigramStore
from ..engine.adapter import Row, SpeculativeAdapter
from ..engine.tree import Tree
from ..models import config_fingerprint
from ..registry import register

logger = logging.getLogger(__name__)


@dataclass
class ADEDConfig(AccelConfig):
    datastore: Any = "auto"
    max_nodes: int | Literal["auto"] = option("auto", min=1)  # tree size incl. the root; "auto": chosen per step
    max_depth: int = option(8, min=1)
    max_children: int = option(8, min=1)  # successors considered per node
    search: Literal["best_first", "mcts"] = "best_first"
    mcts_iterations: int = option(150, min=1)
    overlay_strength: float = option(1.0, gt=0)
    min_prob: float = option(1e-4, min=0, max=1)  # drop tree nodes whose path probability falls below this


AUTO_MAX = 64  # max_nodes="auto": the largest tree the engine's budget chooser may pick


@lru_cache(maxsize=4)
def _load_store(path: str) -> TrigramStore:
    return TrigramStore.load(path)


def _auto_store(model) -> tuple:
    """(store, how it was found) for ``datastore="auto"``, or (None, why not). Stores are built under the hash of
    the tokenizer (data/trigram.py): the tokenizer saved with the model (its name_or_path folder, or a Hub id in
    the local cache) is hashed and its store taken; a model that carries no tokenizer (e.g. saved without it)
    is looked up in the datastore index, by name_or_path, then by its architecture fingerprint, and last takes
    the only cached store built for exactly its vocabulary size, if there is one. A wrong store would only
    draft worse: ADED's output is the model's greedy output whatever the store."""
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or 0
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    tok_hash = trigram.saved_tokenizer_hash(name)
    found = []
    if tok_hash is not None:
        found.append((trigram.default_path(tok_hash), "tokenizer hash"))
    if name:
        found.append((trigram.indexed(name), "datastore index (model name)"))
    try:
        shape_key = trigram.config_key(config_fingerprint(model))
    except Exception:  # a family models.dims can't read: no shape key
        shape_key = None
    if shape_key:
        found.append((trigram.indexed(shape_key), "datastore index (model shape)"))
    if tok_hash is None and vocab:  # last resort: the only cached store built for exactly this vocabulary size
        same = [f for f, meta in trigram.stores() if int(meta.get("vocab_size", -1)) == vocab]
        found.append((same[0] if len(same) == 1 else None, "the only store of this vocabulary size"))
    for path, how in found:
        if path is None or not path.exists():
            continue
        store = _load_store(str(path))
        same_tokenizer = tok_hash is None or store.meta.get("tokenizer_hash") in (None, tok_hash)
        if store.vocab_size >= vocab and same_tokenizer:
            return store, how
    why = (f"no ShareGPT datastore for this model in {trigram.store_dir()}: drafting from the request's own tokens "
           "only (build one with `hf-accel datastore build --model NAME_OR_PATH`, or pass datastore=None)")
    _warn_once(name, why)
    return None, why


@lru_cache(maxsize=64)
def _warn_once(name: str, why: str) -> None:
    logger.warning("accel='aded' datastore='auto' (%s): %s", name or "model", why)


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
        self.datastore_found = "given"  # how the store was chosen (stats.extra["datastore_found"])
        if isinstance(ds, TrigramStore):
            self.store = ds
        elif ds is None:
            self.store, self.datastore_found = None, "datastore=None: the request's own tokens only"
        elif ds == "auto":
            self.store, self.datastore_found = _auto_store(model)
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

    def finished(self, state, stats) -> None:
        # which store drafted (a file, an in-memory store, or None: prompt-only) and how it was found
        stats.extra["datastore"] = None if self.store is None else (self.store.path or "TrigramStore (in memory)")
        stats.extra["datastore_found"] = self.datastore_found

    # ---- per request -----------------------------------------------------------------------------
    def prepare(self, model, rows, generation_config):
        states = []
        for row in rows:
            st = _RowState()
            st.add(row.tokens, 0)
            states.append(st)
        return states

    def verified(self, state, row: Row, tree, path, new_tokens: list, step, b: int) -> None:
        if new_tokens:
            state[row.index].add(row.tokens, len(row.tokens) - len(new_tokens))

    # ---- drafting ----------------------------------------------------------------------------------
    def successors(self, st: _RowState, a: int, b: int) -> list:
        """[(token, prob)] for the context (a, b), most likely first, at most max_children. The returned list is
        memoised (shared): callers must not change it."""
        key = (a, b)
        hit = st.memo.get(key)
        if hit is not None:
            return hit
        store = self.store
        ctx = st.tri.get(key)
        store_part = store.trigram_pairs(a, b) if store is not None else None
        if store_part is None and ctx is None:
            # back off to bigrams: the store's, else the request's own
            store_part = store.bigram_pairs(b) if store is not None else None
            ctx = None if store_part is not None else st.bi.get(b)
        k = self.config.max_children
        if not ctx:  # the store's alone (its weight is 1 - 0): its own order
            out = [] if store_part is None else store_part[1][:k]
        elif store_part is None:  # the request's own counts alone (weight 1)
            n = sum(ctx.values())
            out = sorted([(t, c / n) for t, c in ctx.items()], key=lambda kv: -kv[1])[:k]
        else:
            n = sum(ctx.values())
            lam = n / (n + self.config.overlay_strength)
            probs = {t: (1.0 - lam) * p for t, p in store_part[0]}
            for t, c in ctx.items():
                probs[t] = probs.get(t, 0.0) + lam * c / n
            out = sorted(probs.items(), key=lambda kv: -kv[1])[:k]
        st.memo[key] = out
        return out

    def draft(self, state, rows: list) -> list:
        grow = self._best_first if self.config.search == "best_first" else self._mcts
        top = self.max_tree_nodes()
        return [None if row is None else grow(state[row.index], row.tokens, min(top, row.max_nodes or top))
                for row in rows]

    def _best_first(self, st: _RowState, tokens: list, max_nodes: int) -> Tree:
        """Nodes are added in decreasing path probability (``score``), so every prefix is the best subtree of its
        size and ``score`` is each node's chance of being accepted under the drafter's model (Tree.scores).

        Lazily: a node's successors come most likely first, so of each sibling list only the best one not yet in
        the tree can be the next node; the heap holds that one per list (at most one per node) instead of every
        candidate. Ties in score go to the earlier parent, then the earlier sibling: the order of pushing every
        candidate at once (the tree is the same as that eager search's, tests/test_aded_draft.py)."""
        cfg = self.config
        max_depth, min_prob, successors, memo = cfg.max_depth, cfg.min_prob, self.successors, st.memo
        root = tokens[-1]
        prev = tokens[-2] if len(tokens) > 1 else -1
        toks, parents, depth, score, masks = [root], [-1], [0], [1.0], [1]
        heap: list = []  # (-score, parent, sibling rank, token, the parent's successor list)
        push, pop = heapq.heappush, heapq.heappop
        if max_depth > 0:
            succ = successors(st, prev, root)
            if succ and succ[0][1] >= min_prob:
                push(heap, (-succ[0][1], 0, 0, succ[0][0], succ))
        while heap and len(toks) < max_nodes:
            neg, parent, j, t, succ = pop(heap)
            node = len(toks)
            toks.append(t)
            parents.append(parent)
            d = depth[parent] + 1
            depth.append(d)
            masks.append(masks[parent] | (1 << node))
            s = -neg
            score.append(s)
            j += 1
            if j < len(succ):  # the parent's next candidate
                s2 = score[parent] * succ[j][1]
                if s2 >= min_prob:
                    push(heap, (-s2, parent, j, succ[j][0], succ))
            if d < max_depth and node + 1 < max_nodes:  # the new node's best candidate (none after the last node:
                # the tree is full, and a lookup of a context the next steps may never reach is most of a cold draft)
                a = toks[parent]
                sub = memo.get((a, t))  # successors() memoised, looked up inline
                if sub is None:
                    sub = successors(st, a, t)
                if sub:
                    s2 = s * sub[0][1]
                    if s2 >= min_prob:
                        push(heap, (-s2, node, 0, sub[0][0], sub))
        return Tree.grown(toks, parents, score, depth, masks)

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
