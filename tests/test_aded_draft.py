"""ADED's best-first drafting gives the tree of the plain search (every candidate pushed at once): same tokens,
parents and scores, including ties in score, min_prob cuts and the depth limit."""

from __future__ import annotations

import heapq
import random

import numpy as np
import pytest

from hf_accel.adapters.aded import ADED, ADEDConfig, _RowState
from hf_accel.data.trigram import TrigramStore
from hf_accel.engine.tree import Tree


def _ref_successors(adapter, st, a, b):
    """The successor lookup as it was first written (the store's arrays read per lookup), memoised on ``st``."""
    key = (a, b)
    hit = st.memo.get(key)
    if hit is not None:
        return hit
    probs = {}
    ctx = st.tri.get(key)
    store = adapter.store
    store_part = store.trigram(a, b) if store is not None else None
    if store_part is None and ctx is None:
        store_part = store.bigram(b) if store is not None else None
        ctx = None if store_part is not None else st.bi.get(b)
    n = sum(ctx.values()) if ctx else 0
    lam = n / (n + adapter.config.overlay_strength) if store_part is not None else 1.0
    if store_part is not None:
        for t, p in zip(*store_part):
            probs[t] = (1.0 - lam) * p
    if ctx:
        for t, c in ctx.items():
            probs[t] = probs.get(t, 0.0) + lam * c / n
    out = sorted(probs.items(), key=lambda kv: -kv[1])[: adapter.config.max_children]
    st.memo[key] = out
    return out


def _eager_best_first(adapter, st, tokens, max_nodes):
    """The search as it was first written: every successor of an expanded node pushed, ties by push order."""
    cfg = adapter.config
    root = tokens[-1]
    prev = tokens[-2] if len(tokens) > 1 else -1
    toks, parents, depth, score = [root], [-1], [0], [1.0]
    heap, tick = [], 0

    def expand(node, a):
        nonlocal tick
        if depth[node] >= cfg.max_depth:
            return
        for t, p in _ref_successors(adapter, st, a, toks[node]):
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


def _adapter(store, **cfg):
    a = ADED.__new__(ADED)  # the drafting only reads config and store
    a.config = ADEDConfig(datastore=None, **cfg)
    a.store = store
    return a


@pytest.mark.parametrize("with_store", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(max_depth=2, max_children=3), dict(min_prob=0.02), dict(max_children=1)])
def test_best_first_is_the_eager_search(with_store, cfg):
    rng = random.Random(0)
    vocab = 12  # a small vocabulary: many repeated contexts, many equal counts (ties in score)
    docs = [[rng.randrange(vocab) for _ in range(rng.randrange(5, 60))] for _ in range(30)]
    store = TrigramStore.from_token_docs(docs, vocab_size=vocab) if with_store else None
    fast, slow = _adapter(store, **cfg), _adapter(store, **cfg)
    for trial in range(40):
        ctx = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        st_fast, st_slow = _RowState(), _RowState()
        st_fast.add(ctx, 0)
        st_slow.add(ctx, 0)
        for step in range(6):  # the overlay grows between drafts, as in a request (memo invalidation included)
            n = rng.choice([1, 2, 5, 16, 32, 64])
            got = fast._best_first(st_fast, ctx, n)
            want = _eager_best_first(slow, st_slow, ctx, n)
            assert (got.tokens, got.parents, got.scores) == (want.tokens, want.parents, want.scores), (trial, step)
            ctx = ctx + [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]
            start = len(ctx) - 3
            st_fast.add(ctx, start)
            st_slow.add(ctx, start)
            # the same lookups, but for the full tree's last node (the eager search expands it; best-first stops)
            assert st_fast.memo.items() <= st_slow.memo.items()


def test_ties_follow_parent_then_sibling_order():
    # a context whose successors all have equal probability, at every depth: scores tie across parents
    st = _RowState()
    st.add([1, 2, 3, 1, 2, 4, 2, 3, 1, 2, 3, 4, 1, 3, 2, 4, 3, 2, 1, 4, 3, 1], 0)
    a = _adapter(None)
    for n in range(1, 40):
        got = a._best_first(st, [3, 1], n)
        want = _eager_best_first(_adapter(None), st, [3, 1], n)
        assert (got.tokens, got.parents, got.scores) == (want.tokens, want.parents, want.scores)
    assert len(set(np.round(got.scores, 12))) < len(got.scores)  # the case has ties


def test_drafted_layout_is_the_trees_own():
    """The depths and ancestor masks the search hands the engine are what the tree's parents give."""
    rng = random.Random(3)
    docs = [[rng.randrange(20) for _ in range(80)] for _ in range(10)]
    a = _adapter(TrigramStore.from_token_docs(docs, vocab_size=20), max_depth=4)
    for trial in range(30):
        ctx = [rng.randrange(20) for _ in range(30)]
        st = _RowState()
        st.add(ctx, 0)
        got = a._best_first(st, ctx, rng.choice([1, 8, 64]))
        plain = Tree(got.tokens, got.parents)
        assert got.depths() == plain.depths() and got.ancestor_masks() == plain.ancestor_masks()


def test_grown_tree_equals_a_checked_one():
    t = Tree.grown([5, 6, 7], [-1, 0, 0], [1.0, 0.5, 0.25], [0, 1, 1], [1, 3, 5])
    plain = Tree([5, 6, 7], [-1, 0, 0], scores=[1.0, 0.5, 0.25])
    assert t == plain and t.real == 3 and t.forced == 0 and t.draft_probs is None and t.n_real is None
    assert t.children() == plain.children() and t.depths() == plain.depths()
    assert t.ancestor_masks() == plain.ancestor_masks()


def _store(pair_prob, uni_prob):
    V = 10
    arrays = {
        "pair_keys": np.array([1 * V + 2, 3 * V + 4], dtype=np.int64), "pair_off": np.array([0, 2, 5]),
        "pair_tok": np.array([5, 6, 7, 8, 9]), "pair_prob": np.array(pair_prob, dtype=np.float32),
        "uni_keys": np.array([2, 4], dtype=np.int64), "uni_off": np.array([0, 1, 3]),
        "uni_tok": np.array([1, 2, 3]), "uni_prob": np.array(uni_prob, dtype=np.float32),
    }
    return TrigramStore(arrays, {"vocab_size": V})


def test_store_lookups_skip_the_sort_only_for_lists_stored_most_likely_first():
    """A store whose successor lists are all non-increasing (the builder's order; a rise between one list and the next
    is allowed) gives them as they are; one with a list out of order still gets it ranked (stable), as before."""
    ranked = _store([0.6, 0.4, 0.5, 0.5, 0.2], [1.0, 0.7, 0.3])
    assert ranked._ranked == (True, True)
    pairs, order = ranked.trigram_pairs(3, 4)
    assert order is pairs and [t for t, _ in pairs] == [7, 8, 9]
    assert list(zip(*ranked.trigram(3, 4))) == pairs
    assert ranked.trigram_pairs(3, 4)[0] is pairs  # cached: the same lists
    assert ranked.trigram_pairs(3, 5) is None and ranked.trigram_pairs(-1, 4) is None and ranked.bigram_pairs(7) is None
    assert [t for t, _ in ranked.bigram_pairs(4)[1]] == [2, 3]
    unranked = _store([0.6, 0.4, 0.2, 0.5, 0.5], [1.0, 0.3, 0.7])
    assert unranked._ranked == (False, False)
    pairs, order = unranked.trigram_pairs(3, 4)
    assert [t for t, _ in pairs] == [7, 8, 9] and [t for t, _ in order] == [8, 9, 7]  # ties keep the store's order
    assert [t for t, _ in unranked.bigram_pairs(4)[1]] == [3, 2]
