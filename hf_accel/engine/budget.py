"""Hardware-aware node budgets: the verify width of every step chosen from measured step costs.

A tree-drafting method whose node budget is ``"auto"`` (``adapter.auto_budget()``) hands the engine *scored*
trees: ``Tree.scores[i]`` is the probability that node i ends up on the accepted path (for ADED the product of the
conditional probabilities along its path), and the nodes are in best-first order, so the first w nodes of a tree are
its best w-node subtree and ``sum(scores[1:w])`` is the expected number of drafted tokens accepted from it.

Per step, :class:`BudgetChooser` picks the width w (from a handful of buckets, e.g. 1, 2, 4, ... 64) that maximises
the expected tokens per second of the batch::

    sum over rows of (1 + r * E_row(w))  /  (cost(w) + overhead)

``cost(w)``: the measured time of one verify step of width w on this (model, device, dtype, batch, engine): a
:class:`CostTable`, timed once per process through the request's own backend (on the static engine that is the
captured CUDA graph's replay, on a CPU the eager forward) and cached. ``overhead``: the rest of a step (drafting,
packing, the walk, the commit), measured on the request's own steps. ``r``: the request's calibration, observed
accepted tokens / expected accepted tokens so far (starting at 1 with a prior of a few tokens), so that a draft source
that is over- or under-confident is corrected by what the target actually accepts. Width 1 is plain one-token
decoding through the engine: when no tree pays on this device (a CPU where a 64-node forward costs several one-token
forwards), that is what the chooser picks, and ``stats.extra["budget"]`` says so.

Drafting is capped at the next bucket above the last chosen width (``draft_cap``): a method drafts no more nodes
than might be used, and the budget can grow by one bucket per step when the larger tree pays.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .backends import clock
from .tree import Tree, pack

#: the verify widths the chooser picks from (capped by the method's largest budget)
WIDTHS = (1, 2, 4, 8, 16, 32, 64)
PRIOR_TOKENS = 2.0  # pseudo-count of the calibration ratio's prior (r = 1)
OVERHEAD_EMA = 0.2


def buckets(max_nodes: int, widths=WIDTHS) -> list:
    """The widths <= ``max_nodes``, with ``max_nodes`` itself as the largest bucket."""
    out = [w for w in widths if w < max_nodes]
    return out + [max_nodes]


def bucket_for(n: int, widths: list) -> int:
    """The smallest width >= n."""
    for w in widths:
        if w >= n:
            return w
    raise ValueError(f"a draft of {n} nodes exceeds the largest verify width {widths[-1]}")


def expected_accepted(tree: Tree, w: int) -> float:
    """Expected accepted drafted tokens of ``tree`` cut to its first ``w`` nodes (sum of their path probabilities)."""
    if tree.scores is None:
        raise ValueError("the budget chooser needs scored trees (Tree.scores)")
    return float(sum(tree.scores[1 : min(w, len(tree))]))


def cut(tree: Tree, w: int) -> Tree:
    """The tree's first ``w`` nodes (a subtree: parents precede children)."""
    if len(tree) <= w:
        return tree
    return Tree(tree.tokens[:w], tree.parents[:w], scores=tree.scores[:w] if tree.scores is not None else None)


# ---- measured step costs, per process -----------------------------------------------------------------------------
# model -> {(device, dtype, batch, engine, ...): {width: seconds}}; costs only, no request state
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def table_key(model, device, batch: int, engine: str, extra=()) -> tuple:
    dtype = getattr(model, "dtype", None)
    return (str(device), str(dtype), int(batch), engine) + tuple(extra)


def cached_costs(model, key: tuple) -> dict:
    with _LOCK:
        return dict(_TABLES.get(model, {}).get(key, {}))


def store_costs(model, key: tuple, costs: dict) -> None:
    """Record (or inject: tests, a known device) the cost table of ``key``."""
    with _LOCK:
        _TABLES.setdefault(model, {}).setdefault(key, {}).update({int(w): float(s) for w, s in costs.items()})


def clear_costs(model=None) -> None:
    with _LOCK:
        if model is None:
            _TABLES.clear()
        else:
            _TABLES.pop(model, None)


def measure(backend, widths: list, batch: int, n_valid: list, pad: int, static: bool, device, reps: int = 2) -> dict:
    """Time one verify step of every width through the request's own backend: pack, the (captured) forward, the
    argmax read. The probe's KV is discarded (``backend.discard``). The first call of a width is not timed (graph
    capture / compilation, first-use allocations)."""
    costs = {}
    qbase = torch.tensor(n_valid)[:, None]
    for w in widths:
        times = []
        for i in range(reps + 1):
            t = clock(device)
            trees = [Tree.chain(pad, [pad] * (w - 1)) for _ in range(batch)]
            packed = pack(trees, [True] * batch, pad, "cpu" if static else device, nodes=w if static else None)
            q_pos = (qbase + packed.depths.cpu()).to(packed.depths.device)
            _, argmax, _ = backend.verify(packed, q_pos)
            argmax.tolist()
            backend.discard()
            if i:
                times.append(clock(device) - t)
        costs[w] = min(times)
    return costs


class BudgetChooser:
    """Per request: chooses each step's verify width (see the module docstring). ``costs``: {width: seconds}."""

    def __init__(self, costs: dict, widths: list | None = None, measured: bool = True):
        self.widths = sorted(widths if widths is not None else costs)
        missing = [w for w in self.widths if w not in costs]
        if missing:
            raise ValueError(f"no measured cost for verify widths {missing}")
        self.costs = {w: float(costs[w]) for w in self.widths}
        self.measured = measured
        self.overhead = None  # seconds of a step outside the verify (EMA)
        self.obs = 0.0  # accepted drafted tokens observed
        self.exp = 0.0  # accepted drafted tokens expected for the trees verified
        self.last = None  # width chosen at the previous step
        self.chosen: dict = {}

    @property
    def ratio(self) -> float:
        return (self.obs + PRIOR_TOKENS) / (self.exp + PRIOR_TOKENS)

    def draft_cap(self) -> int:
        """The most nodes worth drafting this step: one bucket above the last choice (the largest at first)."""
        if self.last is None:
            return self.widths[-1]
        i = self.widths.index(self.last)
        return self.widths[min(i + 1, len(self.widths) - 1)]

    def score(self, trees: list, w: int) -> float:
        """Expected tokens per second of the batch at width w (``trees``: the active rows' scored trees)."""
        r = self.ratio
        tokens = sum(1.0 + r * expected_accepted(t, w) for t in trees)
        return tokens / (self.costs[w] + (self.overhead or 0.0))

    def choose(self, trees: list) -> int:
        """The width for this step (``trees``: the active rows' scored trees, drafted up to ``draft_cap``)."""
        longest = max((len(t) for t in trees), default=1)
        best, best_s = self.widths[0], -1.0
        for w in self.widths:
            s = self.score(trees, w)
            if s > best_s * (1 + 1e-9):  # ties go to the smaller width
                best, best_s = w, s
            if w >= longest:  # wider buckets add cost, not nodes
                break
        return best

    def record(self, w: int) -> None:
        self.last = w
        self.chosen[w] = self.chosen.get(w, 0) + 1

    def observe(self, tree: Tree, accepted: int) -> None:
        """Calibration: a row's verified tree (as cut) and how many of its drafted tokens were accepted."""
        self.exp += expected_accepted(tree, len(tree))
        self.obs += accepted

    def step_time(self, w: int, seconds: float) -> None:
        """A whole step's wall time (draft to commit) at width w: updates the overhead estimate."""
        over = max(0.0, seconds - self.costs[w])
        self.overhead = over if self.overhead is None else (1 - OVERHEAD_EMA) * self.overhead + OVERHEAD_EMA * over

    def report(self) -> dict:
        steps = sum(self.chosen.values())
        out = {
            "widths": {w: self.costs[w] for w in self.widths},
            "measured": self.measured,
            "chosen": dict(sorted(self.chosen.items())),
            "calibration": self.ratio,
            "overhead_seconds": self.overhead or 0.0,
        }
        ones = self.chosen.get(1, 0)
        if steps and ones * 2 > steps:
            out["fallback"] = (
                f"width 1 (one-token decoding through the engine) in {ones}/{steps} steps: no draft tree paid for its "
                "verify cost on this device"
            )
        return out


def for_request(adapter, model, backend, batch: int, n_valid: list, pad: int, static: bool, device, engine: str,
                key_extra=()) -> BudgetChooser | None:
    """The request's chooser when the adapter's node budget is ``"auto"`` (else None); measures the cost table of
    this (model, device, dtype, batch, engine) on first use."""
    if not adapter.auto_budget():
        return None
    widths = buckets(adapter.max_tree_nodes())
    key = table_key(model, device, batch, engine, key_extra)
    costs = cached_costs(model, key)
    todo = [w for w in widths if w not in costs]
    if todo:
        store_costs(model, key, measure(backend, todo, batch, n_valid, pad, static, device))
        costs = cached_costs(model, key)
    return BudgetChooser(costs, widths)
