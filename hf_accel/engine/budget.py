"""Hardware-aware node budgets: the verify width of every step chosen from measured step costs.

A tree-drafting method whose node budget is ``"auto"`` (``adapter.auto_budget()``) hands the engine *scored*
trees: ``Tree.scores[i]`` is the probability that node i ends up on the accepted path (for ADED the product of the
conditional probabilities along its path), and the nodes are in best-first order, so the first w nodes of a tree are
its best w-node subtree and ``sum(scores[1:w])`` is the expected number of drafted tokens accepted from it.

Per step, :class:`BudgetChooser` picks the width w (from a handful of buckets, e.g. 1, 2, 4, ... 64) that maximises
the expected tokens per second of the batch::

    sum over rows of (1 + r * E_row(w))  /  (cost(w) + overhead)

``cost(w)``: the time of one engine step of width w (pack, the verify forward, or on the static engine with CUDA
graphs the replay of the width's captured graph, the argmax read, the walk, the commit) on this (model, device, dtype,
batch, engine): a :class:`CostTable` kept for the process. On the static engine every width (bucket) is captured and
its step timed (graph replays on CUDA, the eager forward on a CPU) when the process first runs that shape. On the
dynamic engine it is measured on real steps: an unmeasured width is scored at the cost of the widest measured width
below it (a lower bound), so it is tried, on a productive step, exactly when it could be the best, and widths that
can't pay on this device are never run. On both, later steps keep the costs current (a common scale that follows the
machine's load, and per width an exponential average, smoothed to be non-decreasing in w); a step that captured a
graph is not a sample. On the static engine with CUDA graphs the probed costs are those of the bare step
(back-to-back replays of dummy chains, nearly flat in w on a GPU), so real steps instead measure, per width, the host work beyond the probe
(the pack of (B, w, w) ancestors, the walk, the commit, the adapter's per-node work: ``host_seconds``), kept with the
table; an unmeasured width's host part is the nearest wider measured one's scaled by width (optimistic, so it gets
tried). ``overhead``: the request's drafting time per step, measured per draft cap: choosing w means the next steps
draft up to w nodes, so a wide choice also pays its wider drafts (a cap not yet measured: the nearest wider one's
time scaled by nodes). ``r``: the request's calibration, observed accepted tokens / expected accepted tokens so far
(starting at 1 with a prior of a few tokens), so that a draft source that is over- or under-confident is corrected by
what the target actually accepts. Its samples are the verified nodes, and also the drafted nodes the cut left out
whose parent is the accepted path's last node: the step's bonus token says whether each of them would have been
accepted. So a request that fell back to width 1 keeps learning what its drafts are worth (a ratio that only verified
trees updated could get stuck there: on the CPU demo, a few early misses kept ADED at width 1 for 117 of 126 steps,
0.97x vanilla, where a fixed 3-node tree ran 1.11x). Width 1 is
plain one-token decoding through the engine: when no tree pays on this device (a CPU where a 64-node forward costs
several one-token forwards), that is what the chooser picks, and ``stats.extra["budget"]`` says so.

Drafting is capped (``draft_cap``) at the last chosen width (at a request's first step: the largest width, or one
bucket above the width this shape's finished requests chose most), or at the next bucket above it when the wider tree
could pay: a method drafts no more nodes than might be used (drafting is host Python, per node), and the budget can
grow by one bucket per step. "Could pay" is decided from the tree just verified (:meth:`BudgetChooser._wider_pays`):
its nodes beyond the cut are known up to the cap; past the cap a best-first tree's next nodes each have a path
probability of at most its last node's, an upper bound on what the wider bucket adds. When even that bound does not
beat the chosen width at the measured costs, the next step drafts no wider (on the H200, drafting up to the next
bucket every step cost ADED's auto budget 6-23% against a fixed 16, benchmarks/results/h200-bf16-*-2026-12-02-r3).
The bound is loose, so a wider bucket that was drafted, scored and lost is drafted again only after 2, 4, ..., 32
steps (reset when a wider width is chosen).
"""

from __future__ import annotations

import os
import threading
import weakref

from .tree import Tree

#: the verify widths the chooser picks from (capped by the method's largest budget)
WIDTHS = (1, 2, 3, 4, 8, 16, 32, 64)
#: the static engine's widths when its steps are compiled and captured as CUDA graphs: each width is one more
#: torch.compile + capture per process (tens of seconds on an H200), and on a GPU a verify replay costs about the same
#: at any width up to 64 (H200, 135M model: 1.7-2.7 ms, kernel-latency bound; benchmarks/results/
#: h200-bf16-step-profile-2026-12-02.md). Width 8 is left out: in every run where the chooser picked it (sampling b1,
#: greedy and sampling b8, second H200 run, 2026-12-02) a fixed 16 was 7-15% faster; a fixed 8 was the best budget at
#: sampling b8 in the fourth and fifth runs, though (HF_ACCEL_GRAPH_WIDTHS=8,16,32,64 puts it back, to measure).
GRAPH_WIDTHS = (16, 32, 64)
#: environment variable that replaces GRAPH_WIDTHS for the process (comma-separated widths, e.g. "8,16,32,64"): a
#: device where a narrower or wider captured width pays (each one more compile + capture per process)
GRAPH_WIDTHS_ENV = "HF_ACCEL_GRAPH_WIDTHS"
PRIOR_TOKENS = 2.0  # pseudo-count of the calibration ratio's prior (r = 1)
#: probed graph replays (min of 3, stable) whose narrower width costs more than this share above a wider one's are
#: kept as measured, not pooled (:func:`monotone`); real-step samples (noisy) are always pooled
PROBE_INVERSION = 0.10
OVERHEAD_EMA = 0.2
COST_EMA = 0.1
BACKOFF_MAX = 5  # a wider bucket that keeps losing is drafted again at most every 2**5 steps
SCALE_EMA = 0.3


def graph_widths() -> tuple:
    """The graphed static engine's widths: ``GRAPH_WIDTHS``, or the ones ``HF_ACCEL_GRAPH_WIDTHS`` lists."""
    text = os.environ.get(GRAPH_WIDTHS_ENV, "").strip()
    if not text:
        return GRAPH_WIDTHS
    try:
        widths = tuple(sorted({int(w) for w in text.split(",") if w.strip()}))
    except ValueError:
        widths = ()
    if not widths or widths[0] < 1:
        raise ValueError(f"{GRAPH_WIDTHS_ENV}={text!r}: expected comma-separated verify widths >= 1, e.g. "
                         f"\"8,16,32,64\" (unset it for the default {','.join(map(str, GRAPH_WIDTHS))})")
    return widths


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
    out = Tree(tree.tokens[:w], tree.parents[:w], scores=tree.scores[:w] if tree.scores is not None else None)
    if tree._depths is not None and tree._masks is not None:  # a prefix's depths and ancestors are the same
        out.with_layout(tree._depths[:w], tree._masks[:w])
    return out


# ---- measured step costs, per process -----------------------------------------------------------------------------
class CostTable:
    """Measured seconds of one engine step (pack, the verify forward or its graph replay, the argmax read, the walk and
    the commit) by verify width, for one (model, device, dtype, batch, engine). Filled by the requests' own steps and
    kept for the process; ``frozen`` tables (given with :func:`set_costs`) are not updated.

    A cost is held as ``scale * shape[w]``: every sample updates the common ``scale`` quickly (the machine's load moves
    all widths together: other jobs on a shared CPU, clocks) and its own width's ``shape`` slowly, so a width that has
    not run for a while is not left at the cost of another load level."""

    def __init__(self, costs: dict | None = None, frozen: bool = False):
        self.shape = {int(w): float(c) for w, c in (costs or {}).items()}
        self.samples = {w: 1 for w in self.shape}
        self.scale = 1.0
        self.frozen = frozen
        self.lock = threading.Lock()
        self.version = 0  # bumped by every sample (add): a chooser's smoothed costs are recomputed only then
        # static engine: the host part of a real step by width (the step's time minus the probed cost, see
        # BudgetChooser.timed); kept with the device costs so that later requests start from it
        self.host: dict = {}
        # steps per width chosen by the finished requests of this shape (BudgetChooser.done): a later request's
        # first step drafts up to one bucket above the usual width, not the largest
        self.usual: dict = {}

    def usual_width(self):
        """The width the finished requests chose most often (None before the first one finished)."""
        with self.lock:
            return max(self.usual, key=lambda w: (self.usual[w], -w)) if self.usual else None

    def get(self) -> dict:
        with self.lock:
            return {w: self.scale * c for w, c in self.shape.items()}

    def add(self, w: int, seconds: float) -> None:
        """One measured step of width ``w``."""
        if self.frozen or seconds <= 0:
            return
        with self.lock:
            n = self.samples.get(w, 0)
            if n:
                self.scale *= (seconds / (self.scale * self.shape[w])) ** SCALE_EMA
                a = max(COST_EMA, 1.0 / (n + 1))  # the running mean of the first few, then an exponential average
                self.shape[w] = (1 - a) * self.shape[w] + a * seconds / self.scale
            else:
                self.shape[w] = seconds / self.scale
            self.samples[w] = n + 1
            self.version += 1


# model -> {(device, dtype, batch, engine, ...): CostTable}; step costs only, no request state
_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def table_key(model, batch: int, engine: str, extra=()) -> tuple:
    device = getattr(model, "device", None)
    return (str(device), str(getattr(model, "dtype", None)), int(batch), engine) + tuple(extra)


def cost_table(model, key: tuple) -> CostTable:
    with _LOCK:
        per = _TABLES.setdefault(model, {})
        t = per.get(key)
        if t is None:
            t = per[key] = CostTable()
        return t


def set_costs(model, costs: dict, batch: int = 1, engine: str = "dynamic", extra=()) -> None:
    """Fix the step costs ({width: seconds}, every width) of ``model`` at ``batch`` on ``engine`` ("dynamic", or
    "static" with ``extra=(use_graphs, slots)``), instead of measuring them: a known device, or a test."""
    with _LOCK:
        _TABLES.setdefault(model, {})[table_key(model, batch, engine, extra)] = CostTable(costs, frozen=True)


def clear_costs(model=None) -> None:
    with _LOCK:
        if model is None:
            _TABLES.clear()
        else:
            _TABLES.pop(model, None)


def _pools(narrow: float, wide: float, tolerance: float) -> bool:
    """Whether :func:`monotone` pools a narrower width's mean cost with a wider one's."""
    return narrow > wide and (tolerance <= 0.0 or narrow <= (1 + tolerance) * wide)


def monotone(costs: dict, tolerance: float = 0.0) -> dict:
    """The least-squares non-decreasing fit of costs by width (pool adjacent violators): a wider verify never
    costs less, so a noisy sample can't make a wide width look cheap. With ``tolerance`` t > 0, only inversions
    within noise are pooled (a narrower width's mean at most (1 + t) times the wider one's): a larger inversion is
    taken as measured — the kernels a width gets differ (H200, fp32, graphed verify: 16 nodes 7.6 ms, 32 nodes
    4.8 ms, benchmarks/results/h200-fp32-cell-f1-2026-12-02-r9), and pooling it made 64 look as cheap as 32."""
    blocks = []  # [sum, count, widths]
    for w in sorted(costs):
        blocks.append([costs[w], 1, [w]])
        while len(blocks) > 1 and _pools(blocks[-2][0] / blocks[-2][1], blocks[-1][0] / blocks[-1][1], tolerance):
            s, n, ws = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
            blocks[-1][2] += ws
    return {w: s / n for s, n, ws in blocks for w in ws}


class BudgetChooser:
    """Per request: chooses each step's verify width (see the module docstring).

    ``table``: the process's :class:`CostTable` for this request's shape (or a dict of {width: seconds}, fixed).
    Widths it has not measured yet are scored optimistically (:meth:`costs`); a step that runs one measures it."""

    def __init__(self, table, widths: list, host: bool = False):
        """``host``: the table holds probed costs of the bare step (the static engine's :func:`measure_static`:
        back-to-back replays of dummy chains), without the host work a real step adds and that grows with the width
        (the pack of (B, N, N) ancestors, the walk, the commit's compaction, the adapter's per-node work): real steps
        then measure that part per width (``host_seconds``) instead of rescaling the probed costs."""
        self.table = table if isinstance(table, CostTable) else CostTable(table, frozen=True)
        self.widths = sorted(widths)
        self.host_model = host
        self.host = self.table.host if not self.table.frozen else {}  # width -> seconds of host work (EMA)
        self.drafts: dict = {}  # draft cap -> seconds of drafting at that cap (EMA)
        self._cap = None  # the cap of the step being drafted (draft_cap)
        self._grow = None  # (width chosen, whether the next bucket could pay): the next step's cap (choose)
        self._steps = 0  # choose() calls
        # width w -> (times the bucket above w was drafted, scored and lost in a row, the step from which drafting it
        # again is allowed): a loose upper bound on what it adds would otherwise draft it every other step
        self._backoff: dict = {}
        self.overhead = None  # seconds of drafting per step (EMA)
        self.obs = 0.0  # accepted drafted tokens observed
        self.exp = 0.0  # accepted drafted tokens expected for the trees verified
        self.last = None  # width chosen at the previous step
        self.explored: list = []  # widths this request measured because the table had no cost for them
        self._measured = (None, {})  # (table version, its costs at this request's widths, smoothed non-decreasing)
        self.chosen: dict = {}

    @property
    def ratio(self) -> float:
        return (self.obs + PRIOR_TOKENS) / (self.exp + PRIOR_TOKENS)

    def draft_cap(self) -> int:
        """The most nodes worth drafting this step: at first the largest, or once requests of this shape have
        finished one bucket above the width they chose most (a request's first step drafting the largest tree for
        every row cost ~3.5 ms at batch 8 on a CPU, cold lookups); then the last choice, or one bucket above it when
        the last step's tree said the wider bucket could pay (:meth:`_wider_pays`)."""
        if self.last is None:  # the first step: one bucket above the width this shape's requests usually chose
            usual = self.table.usual_width()
            self._cap = self.cap_after(usual) if usual in self.widths else self.widths[-1]
        elif self._grow is not None and self._grow[0] == self.last:
            self._cap = self.cap_after(self.last) if self._grow[1] else self.last
        else:  # a width recorded without choose(): one bucket above it
            self._cap = self.cap_after(self.last)
        if self._cap == 1 and len(self.widths) > 1:
            # width 1 drafts nothing, so nothing would say when a tree pays again: the root's first children are
            # still drafted (cheap), scored and, through the bonus token, calibrated (observe)
            self._cap = self.widths[1]
        return self._cap

    def cap_after(self, w: int) -> int:
        """The draft cap of the step after one of width ``w``: the next bucket."""
        i = self.widths.index(w)
        return self.widths[min(i + 1, len(self.widths) - 1)]

    @staticmethod
    def _estimate(measured: dict, w: int) -> float:
        """A per-width host time (drafting by cap, or the step's host part) at ``w`` from the widths measured: its own;
        else the nearest measured above scaled by w/m (work per node: optimistic for a smaller w, so it gets tried);
        else the nearest below (a lower bound); 0 with nothing measured."""
        if w in measured:
            return measured[w]
        above = [m for m in measured if m > w]
        if above:
            m = min(above)
            return measured[m] * w / m
        below = [m for m in measured if m < w]
        return measured[max(below)] if below else 0.0

    def draft_seconds(self, w: int) -> float:
        """Drafting time per step when width ``w`` is chosen (the steps after it draft up to ``w`` nodes)."""
        if not self.drafts:
            return self.overhead or 0.0
        return self._estimate(self.drafts, w)

    def measured(self) -> dict:
        """The table's costs at this request's widths, smoothed non-decreasing (:func:`monotone`; on the graphed
        static engine an inversion beyond ``PROBE_INVERSION`` is kept as probed); recomputed when
        the table has new samples (on the graphed static engine only when a width is probed: real steps measure
        the host part instead)."""
        version = self.table.version
        if self._measured[0] != version:
            widths = set(self.widths)
            self._measured = (version, monotone({w: c for w, c in self.table.get().items() if w in widths},
                                                 PROBE_INVERSION if self.host_model else 0.0))
        return self._measured[1]

    def costs(self) -> dict:
        """{width: seconds} for every width: measured ones smoothed non-decreasing; an unmeasured width gets the
        cost of the widest measured width m below it plus (w - m) times the smallest per-node increase between
        measured widths (a lower bound where a node costs no less than the cheapest measured one did: optimism, so
        that it is tried when it could win, but a 2-core CPU where each node adds ~3 ms no longer tries 64 nodes
        at the cost of 4). Flat costs (a GPU) give the widest measured width's cost, as before."""
        measured = self.measured()
        ws = sorted(measured)
        slope = max(0.0, min(((measured[b] - measured[a]) / (b - a) for a, b in zip(ws, ws[1:])), default=0.0))
        out, floor, at = {}, 0.0, None
        for w in self.widths:
            if w in measured:
                floor, at = measured[w], w
                out[w] = floor
            else:
                out[w] = floor + (slope * (w - at) if at is not None else 0.0)
        if self.host_model and self.host:
            host = monotone({w: self._estimate(self.host, w) for w in self.widths})
            out = {w: c + host[w] for w, c in out.items()}
        return out

    @staticmethod
    def _sums(trees: list, ws: list) -> list:
        """Per tree, {w: sum of its path probabilities of nodes 1..w-1} for each width of ``ws`` (ascending): the
        expected accepted drafted tokens of its cut to w, uncalibrated. Sums of slices, each continuing the last
        (the same additions in the same order as a running sum): a step's choice touches a few widths, not every
        node's prefix."""
        out = []
        for t in trees:
            sc = t.scores
            if sc is None:
                raise ValueError("the budget chooser needs scored trees (Tree.scores)")
            n, s, at, d = len(sc), 0.0, 1, {}
            for w in ws:
                end = min(w, n)
                if end > at:
                    s = sum(sc[at:end], s)
                    at = end
                d[w] = s
            out.append(d)
        return out

    def score(self, trees: list, w: int, costs: dict, cums: list | None = None) -> float:
        """Expected tokens per second of the batch at width w (``trees``: the active rows' scored trees; ``cums``:
        their :meth:`_sums` at w or more widths, computed here if not given)."""
        if cums is None:
            cums = self._sums(trees, [w])
        r = self.ratio
        tokens = sum(1.0 + r * c[w] for c in cums)
        seconds = costs[w] + self.draft_seconds(w)
        return tokens / seconds if seconds > 0 else float("inf")

    def choose(self, trees: list) -> int:
        """The width for this step (``trees``: the active rows' scored trees, drafted up to ``draft_cap``). An
        unmeasured width is chosen when its optimistic score is the best: that step measures it."""
        widths = self.widths
        longest = max((len(t) for t in trees), default=1)
        top = bucket_for(min(longest, widths[-1]), widths)  # wider buckets add cost, not nodes
        self._steps += 1
        if top == widths[0] and (len(widths) == 1 or self._steps < self._backoff.get(top, (0, 0))[1]):
            # one width to choose from and the next bucket's drafting still backed off: nothing to score (the
            # common step of a GPU's narrowest graphed width, whose draft cap it is)
            self._grow = (top, False)
            return top
        costs = self.costs()
        i_top = widths.index(top)
        ws = widths[: i_top + 2]  # the candidates and the bucket above them (what growing would add)
        cums = self._sums(trees, ws)
        best, best_s, scored = widths[0], -1.0, {}
        for w in ws[: i_top + 1]:
            s = scored[w] = self.score(trees, w, costs, cums)
            if s > best_s * (1 + 1e-9):  # ties go to the smaller width
                best, best_s = w, s
        for w in [w for w in self._backoff if w < best]:  # a wider choice: the narrower ones' backoff is over
            del self._backoff[w]
        i = widths.index(best)
        w2 = widths[i + 1] if i + 1 < len(widths) else None
        if w2 in scored and scored[w2] < best_s < float("inf"):  # the next bucket was drafted, scored and lost:
            fails = min(self._backoff.get(best, (0, 0))[0] + 1, BACKOFF_MAX)  # draft it again after 2, 4, .. steps
            self._backoff[best] = (fails, self._steps + (1 << fails))
        grow = (w2 is not None and self._steps >= self._backoff.get(best, (0, 0))[1]
                and self._wider_pays(trees, best, w2, best_s, costs, cums, self.ratio))
        self._grow = (best, grow)
        return best

    def _wider_pays(self, trees: list, w: int, w2: int, score_w: float, costs: dict, cums: list, r: float) -> bool:
        """Whether ``w2``, the bucket above ``w``, could beat ``w`` (expected tokens per second ``score_w``) on trees
        like these: the next step drafts up to it only then. Per tree, what the wider bucket adds is its nodes [w, w2):
        those drafted are known; when the drafter stopped at the cap, each further node of a best-first tree has a
        path probability of at most its last drafted node's (an upper bound); a tree that ended below the cap has no
        more nodes. An unmeasured wider width (cost 0) always could. ``cums``: the trees' :meth:`_sums` at w and w2."""
        cap = self._cap if self._cap is not None else self.widths[-1]
        gain = 0.0  # expected accepted nodes the wider bucket adds (calibrated below)
        for t, c in zip(trees, cums):
            n, sc = len(t), t.scores
            if n > w:
                gain += c[w2] - c[w]
            if n >= cap and n < w2:  # cut by the cap: nodes [max(n, w), w2) unknown, each at most sc[n - 1]
                gain += (w2 - max(n, w)) * sc[n - 1]
        gain *= r
        if gain <= 0.0:
            return False
        seconds_w2 = costs[w2] + self.draft_seconds(w2)
        if seconds_w2 <= 0.0:
            return True
        tokens_w = score_w * (costs[w] + self.draft_seconds(w))
        return (tokens_w + gain) / seconds_w2 > score_w

    def done(self) -> None:
        """The request finished: its choices join the table's (:meth:`CostTable.usual_width`)."""
        if self.table.frozen:
            return
        with self.table.lock:
            for w, n in self.chosen.items():
                self.table.usual[w] = self.table.usual.get(w, 0) + n

    def record(self, w: int) -> None:
        self.last = w
        self.chosen[w] = self.chosen.get(w, 0) + 1

    def observe(self, tree: Tree, accepted: int, full: Tree | None = None, end: int = 0,
                bonus: int | None = None) -> None:
        """Calibration: a row's verified tree (as cut) and how many of its drafted tokens were accepted. With the
        tree as drafted (``full``, before the cut), the accepted path's last node ``end`` and the step's ``bonus``
        token, also the drafted nodes the cut left out whose parent is ``end``: each would have been accepted
        exactly when its token is the bonus token."""
        self.exp += expected_accepted(tree, len(tree))
        self.obs += accepted
        if full is None or bonus is None or len(full) <= len(tree) or full.scores is None:
            return
        toks, parents, sc = full.tokens, full.parents, full.scores
        for i in range(len(tree), len(full)):
            if parents[i] == end:
                self.exp += sc[i]
                if toks[i] == bonus:
                    self.obs += 1.0

    def timed(self, w: int, draft_seconds: float, step_seconds: float | None) -> None:
        """A step's drafting time and the rest of its time at width w (None: not a clean sample, e.g. the step
        captured a CUDA graph)."""
        d = max(0.0, draft_seconds)
        self.overhead = d if self.overhead is None else (1 - OVERHEAD_EMA) * self.overhead + OVERHEAD_EMA * d
        cap = self._cap if self._cap is not None else self.widths[-1]
        old = self.drafts.get(cap)
        self.drafts[cap] = d if old is None else (1 - OVERHEAD_EMA) * old + OVERHEAD_EMA * d
        if step_seconds is None:
            return
        probed = self.measured() if self.host_model else {}
        if w in probed:
            # the probed cost is the bare step; what a real step takes beyond it is host work of this width
            extra = max(0.0, step_seconds - probed[w])
            with self.table.lock:
                old = self.host.get(w)
                self.host[w] = extra if old is None else (1 - COST_EMA * 3) * old + COST_EMA * 3 * extra
            return
        if w not in self.table.get():
            self.explored.append(w)
        self.table.add(w, step_seconds)

    def report(self) -> dict:
        steps = sum(self.chosen.values())
        out = {
            "widths": dict(sorted(self.table.get().items())),  # seconds per step by width
            "chosen": dict(sorted(self.chosen.items())),  # steps per width
            "explored": list(self.explored),
            "calibration": self.ratio,
            "draft_seconds": self.overhead or 0.0,
        }
        if self.host_model:
            out["host_seconds"] = dict(sorted(self.host.items()))  # a real step's time beyond the probed one
            out["draft_by_cap"] = dict(sorted(self.drafts.items()))
        ones = self.chosen.get(1, 0)
        if steps and ones * 2 > steps:
            out["fallback"] = (
                f"width 1 (one-token decoding through the engine) in {ones}/{steps} steps: on this device no draft "
                "tree paid for its verify cost"
            )
        return out


def measure_static(backend, table: CostTable, widths: list, n_valid: list, pad: int, reps: int = 3) -> None:
    """Capture (CUDA graphs) and time every width of a static backend that ``table`` has no cost for: a step of
    dummy chains (pack, the graph replay or the eager forward, the argmax read, an empty commit). The dummy tokens go
    to the scratch region after ``start``, which the next step overwrites, and the empty commit keeps nothing, so the
    request is unchanged. The first call of a width (its capture) is not timed."""
    import torch

    from .backends import clock
    from .tree import pack

    batch = len(n_valid)
    todo = [w for w in widths if w not in table.get()]
    for w in todo:
        trees = [Tree.chain(pad, [pad] * (w - 1)) for _ in range(batch)]
        times = []
        for i in range(reps + 1 if backend.use_graphs else reps):
            t = clock(backend.device)
            packed = pack(trees, [True] * batch, pad, "cpu", nodes=w)
            # every dummy node at its row's root position (as padding): timing only, and never past a learned
            # position table (a prompt near GPT-2's n_positions has no room for a 64-deep chain)
            _, argmax, _ = backend.verify(packed, torch.tensor(n_valid)[:, None].expand(batch, w).contiguous())
            argmax.tolist()
            backend.commit([[] for _ in range(batch)])
            times.append(clock(backend.device) - t)
        table.add(w, min(times[1:] if backend.use_graphs else times))


def for_request(adapter, model, batch: int, engine: str, key_extra=(), backend=None, n_valid=None,
                pad: int = 0) -> BudgetChooser | None:
    """The request's chooser when the adapter's node budget is ``"auto"`` (else None). With a static ``backend``
    (``engine="static"``), the widths the process has no cost for are captured and timed now (:func:`measure_static`);
    on the dynamic engine they are measured on the request's first steps."""
    if not adapter.auto_budget():
        return None
    graphed = engine == "static" and backend is not None and getattr(backend, "use_graphs", False)
    widths = buckets(adapter.max_tree_nodes(), graph_widths() if graphed else WIDTHS)
    table = cost_table(model, table_key(model, batch, engine, key_extra))
    if engine == "static" and backend is not None:
        measure_static(backend, table, widths, n_valid, pad)
    # graph replays are the device's time only (nearly flat in w on a GPU): the host part of real steps is measured
    # apart; an eager static step's probe already runs the host side of the forward, and follows the load as before
    return BudgetChooser(table, widths, host=graphed)
