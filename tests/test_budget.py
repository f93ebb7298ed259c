"""Hardware-aware node budgets (engine/budget.py): the width a hand-computed cost table says, identity to vanilla
greedy with max_nodes="auto" while the width switches between steps (both engines), sampling, stats."""

from __future__ import annotations

import itertools

import pytest
import torch

import hf_accel
from hf_accel.data.trigram import TrigramStore
from hf_accel.engine import backends, budget
from hf_accel.engine.tree import Tree

from conftest import FAMILIES, prompts, tiny_model
from test_sampling import ROWS, _chi2_pvalue, _counts, _generate


def _chain(scores):
    """A chain drafted best-first whose node i is accepted with probability scores[i]."""
    n = len(scores)
    return Tree(list(range(3, 3 + n)), list(range(-1, n - 1)), scores=list(scores))


# ---- the chooser, on injected costs (no wall clock) ----------------------------------------------------------------
COSTS = {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}
CHAIN = _chain([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])


def test_chooser_picks_the_width_a_hand_computed_table_says():
    ch = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    # tokens per second = (1 + expected accepted) / cost:  w=1: 1/1.0 = 1.0;  w=2: 1.9/1.1 = 1.73;
    # w=4: (1 + .9 + .8 + .7)/1.3 = 2.62;  w=8: (1 + 4.2)/2.0 = 2.60  ->  4
    assert ch.choose([CHAIN]) == 4
    # two rows: same ratios, same choice; a cheaper wide step flips it: w=8 at 1.5 gives 5.2/1.5 = 3.47
    assert ch.choose([CHAIN, CHAIN]) == 4
    assert budget.BudgetChooser({**COSTS, 8: 1.5}, [1, 2, 4, 8]).choose([CHAIN]) == 8
    # drafting time counts against every width: a 4-node tree picks 4 and, having ended below the cap, keeps the
    # next step's drafting at 4 nodes; 1.0 s of drafting measured there is at least as much at cap 8 (a lower
    # bound), so w=8 wins: 5.2/3.0 = 1.73 vs 3.4/2.3 = 1.48
    ch2 = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    assert ch2.choose([_chain([1.0, 0.9, 0.8, 0.7])]) == 4
    ch2.record(4)
    assert ch2.draft_cap() == 4
    ch2.timed(4, 1.0, None)
    assert ch2.choose([CHAIN]) == 8


def test_graphed_chooser_keeps_a_probed_cost_inversion():
    # H200, fp32, graphed verify (r9): 16 nodes cost more than 32, 64 a little more than 32. Pooled (as a noisy
    # real-step table is), the three are one flat cost (5.9 ms) and the 64-cut's extra nodes win: 3.30 vs 3.14
    # tokens; the probed table keeps the inversion: 3.14 / 4.8 = 0.654 vs 3.30 / 5.3 = 0.623 tokens/ms -> 32
    costs = {16: 7.6e-3, 32: 4.8e-3, 64: 5.3e-3}
    tree = _chain([1.0] + [0.1] * 15 + [0.04] * 16 + [0.005] * 32)  # expected accepted: 1.5 / 2.14 / 2.3 at 16/32/64
    assert budget.monotone(costs) == pytest.approx({16: 5.9e-3, 32: 5.9e-3, 64: 5.9e-3})
    assert budget.monotone(costs, budget.PROBE_INVERSION) == costs
    assert budget.monotone({16: 5.0, 32: 4.8, 64: 5.3}, budget.PROBE_INVERSION) == pytest.approx(
        {16: 4.9, 32: 4.9, 64: 5.3})  # an inversion within noise is still pooled
    assert budget.BudgetChooser(costs, [16, 32, 64]).choose([tree]) == 64
    assert budget.BudgetChooser(costs, [16, 32, 64], host=True).choose([tree]) == 32


def test_chooser_calibrates_to_observed_acceptance():
    ch = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    # the drafter promised 3.9 accepted tokens four times and none were accepted: r = (0 + 2) / (4 * 3.9 + 2)
    for _ in range(4):
        ch.observe(_chain([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), 0)
    assert ch.ratio == pytest.approx(2 / (4 * 3.9 + 2))
    # r = 0.1136: w=2: (1 + .102)/1.1 = 1.002 > w=1: 1.0 > w=4: (1 + .273)/1.3 = 0.98  ->  2, the smallest chain that pays
    assert ch.choose([CHAIN]) == 2
    ch.observe(_chain([1.0, 0.9, 0.8, 0.7]), 0)
    assert ch.choose([CHAIN]) == 1  # now nothing pays: one-token decoding
    ch.record(1)
    rep = ch.report()
    assert "fallback" in rep and rep["chosen"] == {1: 1}
    # the 2-node cut was scored (CHAIN has 8 nodes) and lost: the next step drafts no wider than its choice, but at
    # width 1 still the 2-node tree (else nothing would be scored or calibrated while the request runs at width 1)
    assert ch.draft_cap() == 2


def test_calibration_learns_from_the_nodes_the_cut_left_out():
    """At width 1 nothing drafted is verified, but the bonus token says which of the root's drafted children would
    have been accepted: the ratio keeps learning (it could otherwise stay stuck at a low value after a few misses)."""
    ch = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    full = Tree([7, 11, 12, 13], [-1, 0, 0, 1], scores=[1.0, 0.6, 0.3, 0.5])  # root's children 11 (0.6), 12 (0.3)
    root = budget.cut(full, 1)
    ch.observe(root, 0, full, 0, 11)  # the target's token was 11: node 1 would have been accepted, node 2 not
    assert ch.exp == pytest.approx(0.9) and ch.obs == 1.0  # node 3 (a grandchild) is not known: left out
    assert ch.ratio == pytest.approx(3.0 / 2.9)
    # a 2-node cut whose node 1 was accepted: its children beyond the cut (node 3) are known from the bonus
    ch2 = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    ch2.observe(budget.cut(full, 2), 1, full, 1, 99)
    assert ch2.exp == pytest.approx(0.6 + 0.5) and ch2.obs == 1.0
    # without the drafted tree, only the verified nodes count (as before)
    ch3 = budget.BudgetChooser(COSTS, [1, 2, 4, 8])
    ch3.observe(budget.cut(full, 2), 1)
    assert ch3.exp == pytest.approx(0.6) and ch3.obs == 1.0


def test_drafting_cap_follows_what_the_wider_bucket_could_add():
    """The next step drafts up to the bucket above the chosen width only when the tree just seen says it could pay:
    nodes drafted past the cut are known; past the cap, a best-first tree's next nodes are each at most as likely
    as its last one. A wider bucket that was drafted and lost is drafted again after 2, then 4, ... steps."""
    ch = budget.BudgetChooser({16: 1.0, 32: 1.2, 64: 1.6}, [16, 32, 64])
    assert ch.draft_cap() == 64  # the first step drafts the largest tree
    # E(16) = 15 * 0.8 = 12, E(32) = 12.8, E(64) = 14.4:  13/1.0 = 13  vs  13.8/1.2 = 11.5  vs  15.4/1.6 = 9.6
    assert ch.choose([_chain([1.0] + [0.8] * 15 + [0.05] * 48)]) == 16
    ch.record(16)
    assert ch.draft_cap() == 16  # nodes 16..31 were drafted, scored and lost: draft no wider (for 2 steps)
    # a 16-node tree cut by that cap, last node 0.8: nodes 16..31 could add up to 16 * 0.8 = 12.8, and
    # (13 + 12.8)/1.2 = 21.5 > 13: it could pay; held back one more step, then the step after drafts 32 nodes, to see
    high = _chain([1.0] + [0.8] * 15)
    for cap in (16, 32):
        assert ch.choose([high]) == 16
        ch.record(16)
        assert ch.draft_cap() == cap
    assert ch.choose([_chain([1.0] + [0.8] * 15 + [0.01] * 16)]) == 16  # drafted, scored, lost again: 4 steps
    ch.record(16)
    caps = []
    for _ in range(5):
        ch.choose([high])
        ch.record(16)
        caps.append(ch.draft_cap())
    # 4 steps held back, then 32; a 16-node tree drafted under that 32 cap ended below it: nothing more to add
    assert caps == [16, 16, 16, 32, 16]
    # cut by the cap with a last node of 0.01: at most 16 * 0.01 = 0.16 more, (13 + 0.16)/1.2 < 13: stay at 16
    fresh = budget.BudgetChooser({16: 1.0, 32: 1.2, 64: 1.6}, [16, 32, 64])
    fresh.draft_cap()
    assert fresh.choose([_chain([1.0] + [0.8] * 14 + [0.01])]) == 16
    fresh.record(16)
    assert fresh.draft_cap() == 16
    # a tree that ended below the cap (the drafter ran out of likely nodes) has nothing more to add
    assert fresh.choose([_chain([1.0] + [0.9] * 9)]) == 16
    fresh.record(16)
    assert fresh.draft_cap() == 16
    # a wider choice ends the backoff of the narrower width
    assert ch.choose([_chain([1.0] + [0.95] * 40)]) == 32 and 16 not in ch._backoff


def test_first_step_drafts_one_bucket_above_what_earlier_requests_chose():
    """A request's first step drafts the largest tree only until requests of its shape have finished; then one bucket
    above the width they chose most (at batch 8, every row's 64-node first tree was a ~3.5 ms step on a CPU)."""
    table = budget.CostTable({16: 1.0, 32: 1.2, 64: 1.6})
    first = budget.BudgetChooser(table, [16, 32, 64])
    assert first.draft_cap() == 64 and table.usual_width() is None
    for w in (16, 16, 32, 16):
        first.record(w)
    first.done()
    assert table.usual == {16: 3, 32: 1} and table.usual_width() == 16
    assert budget.BudgetChooser(table, [16, 32, 64]).draft_cap() == 32
    second = budget.BudgetChooser(table, [16, 32, 64])
    for w in (64, 64, 64, 64):
        second.record(w)
    second.done()  # 64 now chosen most (4 steps vs 3): the largest, which has no bucket above it
    assert table.usual_width() == 64 and budget.BudgetChooser(table, [16, 32, 64]).draft_cap() == 64
    frozen = budget.BudgetChooser({16: 1.0, 32: 1.2, 64: 1.6}, [16, 32, 64])  # given costs: nothing is recorded
    frozen.record(16)
    frozen.done()
    assert frozen.table.usual == {} and budget.BudgetChooser(frozen.table, [16, 32, 64]).draft_cap() == 64


def test_chooser_explores_unmeasured_widths_and_caps_drafts():
    table = budget.CostTable({1: 1.0, 2: 1.1})
    ch = budget.BudgetChooser(table, [1, 2, 4, 8])
    assert ch.draft_cap() == 8  # the first step drafts the largest tree
    # an unmeasured width costs at least the widest measured below (1.1) plus 0.1 (the measured increase per node)
    # per extra node: w=8 could give 5.2/1.7 = 3.1, the best: measure it
    assert ch.costs() == pytest.approx({1: 1.0, 2: 1.1, 4: 1.3, 8: 1.7})
    assert ch.choose([CHAIN]) == 8
    assert ch.choose([_chain([1.0, 0.9, 0.8])]) == 4  # a 3-node tree fills no more than the 4-node bucket
    ch.record(8)
    ch.timed(8, 0.01, None)  # a step that captured a graph is no sample
    assert ch.choose([CHAIN]) == 8
    ch.timed(8, 0.01, 2.0)
    ch.timed(4, 0.01, 1.3)
    assert ch.report()["explored"] == [8, 4] and table.get() == {1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}
    assert ch.choose([CHAIN]) == 4
    # an unmeasured width is tried only when it could win at that lower bound: w=8 at >= 4.0 + 4 * 0.1 gives at
    # most 5.2/4.4 = 1.2 < w=2's 1.73, so it is not explored
    pruned = budget.BudgetChooser(budget.CostTable({1: 1.0, 2: 1.1, 4: 4.0}), [1, 2, 4, 8])
    assert pruned.choose([CHAIN]) == 2 and pruned.costs()[8] == pytest.approx(4.4)
    # a 2-core CPU (ms): each node adds >= 3 ms, so 64 nodes cost >= 63 + 60 * 3, not 63 (it was explored, at 190)
    cpu = budget.BudgetChooser(budget.CostTable({1: 41.0, 2: 44.5, 3: 47.5, 4: 63.0}), budget.buckets(64))
    assert cpu.costs()[8] == pytest.approx(75.0) and cpu.costs()[64] == pytest.approx(243.0)
    # flat costs (a GPU): the widest measured width's cost, as before
    flat = budget.BudgetChooser(budget.CostTable({16: 2.0, 32: 2.0}), [16, 32, 64])
    assert flat.costs()[64] == pytest.approx(2.0)
    fresh = budget.BudgetChooser(budget.CostTable(), [1, 2, 4, 8])
    assert fresh.choose([CHAIN]) == 1  # nothing measured: the smallest width first, then one bucket more per step
    fresh.record(1)
    assert fresh.draft_cap() == 2
    frozen = budget.CostTable(COSTS, frozen=True)
    frozen.add(8, 0.1)
    assert frozen.get() == COSTS


def test_static_chooser_counts_host_work_and_drafting_by_width():
    """Static engine on a GPU: the probed (graph replay) costs are flat in the width, but a real step's host work
    (pack, walk, commit, per-node adapter work) and the drafting up to the next cap grow with it. Both are measured
    on real steps, per width / cap, and added: a wide tree that adds few expected tokens no longer wins."""
    flat = {8: 1.0, 16: 1.0, 32: 1.0, 64: 1.0}
    tree = _chain([1.0] + [0.8] * 15 + [0.05] * 48)  # E(16) = 12, E(32) = 12.8, E(64) = 14.4
    ch = budget.BudgetChooser(budget.CostTable(flat), [8, 16, 32, 64], host=True)
    assert ch.choose([tree]) == 64  # probed costs only: the widest tree wins
    ch.draft_cap()
    ch.record(64)
    ch.timed(64, 0.0, 3.0)  # a real step of width 64: 2.0 s beyond its probe
    assert ch.host == {64: pytest.approx(2.0)} and ch.table.get() == flat  # probes kept, host part apart
    # host(16) estimated at 2.0 * 16/64 = 0.5: 13/1.5 = 8.7 beats 64's 15.4/3.0 = 5.1
    assert ch.choose([tree]) == 16
    assert ch.report()["host_seconds"] == {64: pytest.approx(2.0)}
    # drafting by cap: a step drafted up to 64 nodes took 2.0 s; choosing 16 drafts up to 16 (estimated 0.5 s)
    dr = budget.BudgetChooser(budget.CostTable(flat), [8, 16, 32, 64], host=True)
    assert dr.draft_cap() == 64
    dr.record(64)
    dr.timed(64, 2.0, None)
    # 8: 6.6/1.25 = 5.3;  16: 13/1.5 = 8.7;  32: 13.8/2.0 = 6.9;  64: 15.4/3.0 = 5.1
    assert dr.draft_seconds(16) == pytest.approx(0.5) and dr.choose([tree]) == 16
    # a frozen (injected) table learns no host part
    fz = budget.BudgetChooser(budget.CostTable(flat, frozen=True), [8, 16, 32, 64], host=True)
    fz.timed(64, 0.0, 3.0)
    assert fz.table.host == {}


def test_cost_table_follows_the_load_on_every_width():
    """A step twice as slow as its width's cost (the shared machine got busier) raises every width's cost, not only
    its own: widths that did not run keep their ratios to the others."""
    table = budget.CostTable({1: 1.0, 2: 1.1, 4: 1.3})
    table.add(2, 2.2)
    c = table.get()
    assert c[1] == pytest.approx(2 ** budget.SCALE_EMA) and c[4] / c[1] == pytest.approx(1.3)
    assert c[2] > 2 ** budget.SCALE_EMA * 1.1  # its own width moved more
    for _ in range(40):
        table.add(2, 2.2)
    c = table.get()  # width 2 converges to its new cost; how much was load is shared between scale and shape
    assert c[2] == pytest.approx(2.2, rel=0.02) and 1.2 < c[1] < 2.0 and c[4] / c[1] == pytest.approx(1.3)


def test_monotone_fit_of_noisy_costs():
    assert budget.monotone({1: 1.0, 2: 0.8, 4: 1.5, 8: 1.2, 16: 3.0}) == pytest.approx(
        {1: 0.9, 2: 0.9, 4: 1.35, 8: 1.35, 16: 3.0})
    assert budget.buckets(64) == [1, 2, 3, 4, 8, 16, 32, 64]
    assert budget.buckets(12) == [1, 2, 3, 4, 8, 12]
    assert budget.bucket_for(5, [1, 2, 4, 8]) == 8
    cut = budget.cut(CHAIN, 3)
    assert cut.tokens == CHAIN.tokens[:3] and cut.scores == CHAIN.scores[:3]


# ---- the engine: identity while the width switches between steps ---------------------------------------------------
SWITCH = [1, 8, 2, 64, 4, 16, 32, 3]
_CYCLE = {"widths": SWITCH}


@pytest.fixture
def forced_widths(monkeypatch):
    """Every request's chooser cycles through SWITCH (a width above the trees' bucket falls back to the bucket);
    records the widths the engine verified."""
    seen = []
    orig = budget.BudgetChooser.choose

    def choose(self, trees):
        it = self.__dict__.setdefault("_cycle", itertools.cycle(_CYCLE["widths"]))
        want = next(it)
        orig(self, trees)  # the real choice runs too (its arithmetic on real trees)
        top = budget.bucket_for(max(len(t) for t in trees), self.widths)
        w = min(budget.bucket_for(want, self.widths), top)
        seen.append(w)
        return w

    monkeypatch.setattr(budget.BudgetChooser, "choose", choose)
    monkeypatch.setattr(budget.BudgetChooser, "draft_cap", lambda self: self.widths[-1])
    return seen


def _own_store(model, ids, mask):
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    return ref, TrigramStore.from_token_docs([r.tolist() for r in ref], vocab_size=model.config.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [(11,), (5, 13, 9)], ids=["batch1", "batch3"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_auto_identical_to_greedy_with_width_switches(family, lengths, cache, forced_widths, monkeypatch):
    model = tiny_model(family)
    ids, mask = prompts(lengths, seed=len(lengths))
    ref, store = _own_store(model, ids, mask)  # drafts partly right: paths of every length get compacted
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    workspaces = []
    if cache == "static":
        orig = backends.StaticBackend.verify

        def verify(self, packed, q_pos, **kw):
            workspaces.append((self.ws, packed.tokens.shape[1]))
            return orig(self, packed, q_pos, **kw)

        monkeypatch.setattr(backends.StaticBackend, "verify", verify)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store, "max_nodes": "auto"}, **extra)
    assert torch.equal(out, ref), f"{family}: auto budget output differs from vanilla greedy"
    st = hf_accel.stats(out)
    assert st.tokens_per_forward > 1.2  # drafts were accepted
    assert len(set(forced_widths)) >= min(3, st.steps)  # the width really switched
    assert sum(st.extra["budget"]["chosen"].values()) == st.steps
    if cache == "static":
        assert set(forced_widths) <= {w for _, w in workspaces}  # each step ran its width's bucket (+ the probes)
        (ws,) = {id(ws) for ws, _ in workspaces}  # ... in one workspace: one set of KV buffers
        ws = workspaces[0][0]
        assert set(ws.widths) >= set(forced_widths)


def test_auto_budget_mcts_search_identical():
    model = tiny_model("qwen2")
    ids, mask = prompts((5, 13, 9), seed=3)
    ref, store = _own_store(model, ids, mask)
    for extra in ({}, {"cache_implementation": "static"}):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                             accel_kwargs={"datastore": store, "search": "mcts", "mcts_iterations": 40}, **extra)
        assert torch.equal(out, ref)
        assert "budget" in hf_accel.stats(out).extra


def test_auto_is_the_default_and_reports_its_choices():
    model = tiny_model("llama")
    ids, mask = prompts((5, 13, 9), seed=3)
    ref, store = _own_store(model, ids, mask)
    budget.clear_costs(model)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store})
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    b = st.extra["budget"]
    assert set(b) >= {"widths", "chosen", "explored", "calibration", "draft_seconds"}
    assert set(b["chosen"]) <= set(budget.buckets(64)) and sum(b["chosen"].values()) == st.steps
    assert b["explored"] and set(b["explored"]) <= set(b["widths"])  # the first request measured widths ...
    assert all(s > 0 for s in b["widths"].values())
    out2 = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                          accel_kwargs={"datastore": store})
    b2 = hf_accel.stats(out2).extra["budget"]
    assert set(b2["explored"]).isdisjoint(b["explored"])  # ... and the process kept them
    assert b2["calibration"] > 0


def test_injected_costs_decide_and_fallback_is_reported():
    """A cost table where only one-token steps pay: every step runs width 1 and the stats say so."""
    model = tiny_model("llama")
    ids, mask = prompts((11,), seed=1)
    ref, store = _own_store(model, ids, mask)
    budget.set_costs(model, {w: 1.0 if w == 1 else 1.5 * w for w in budget.buckets(64)}, batch=1, engine="dynamic")
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                             accel_kwargs={"datastore": store})
        assert torch.equal(out, ref)
        st = hf_accel.stats(out)
        assert st.extra["budget"]["chosen"] == {1: st.steps} and st.drafted_tokens == 0
        assert "fallback" in st.extra["budget"]
        # flat costs: the widest tree the drafts fill wins
        budget.set_costs(model, {w: 1.0 for w in budget.buckets(64)}, batch=1, engine="dynamic")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                             accel_kwargs={"datastore": store})
        assert torch.equal(out, ref)
        st = hf_accel.stats(out)
        assert 1 not in st.extra["budget"]["chosen"] and "fallback" not in st.extra["budget"]
    finally:
        budget.clear_costs(model)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_number_fixes_the_width(cache, monkeypatch):
    model = tiny_model("gemma2")
    ids, mask = prompts((5, 13, 9), seed=3)
    ref, store = _own_store(model, ids, mask)
    widths = []
    orig = backends.StaticBackend.verify if cache == "static" else backends.DynamicBackend.verify
    target = backends.StaticBackend if cache == "static" else backends.DynamicBackend

    def verify(self, packed, q_pos, **kw):
        widths.append(packed.tokens.shape[1])
        return orig(self, packed, q_pos, **kw)

    monkeypatch.setattr(target, "verify", verify)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store, "max_nodes": 6}, **extra)
    assert torch.equal(out, ref)
    st = hf_accel.stats(out)
    assert "budget" not in st.extra
    assert max(widths) <= 6 and (cache == "dynamic" or set(widths) == {6})


@pytest.mark.parametrize("bad", [0, -3, "big", 2.5, True])
def test_bad_max_nodes_is_one_clear_error(bad):
    model = tiny_model("llama")
    ids, mask = prompts((6,))
    with pytest.raises(ValueError, match=r"max_nodes must be an integer >= 1 or one of 'auto'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, accel="aded",
                       accel_kwargs={"datastore": None, "max_nodes": bad})


# ---- sampling ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_sampling_distribution_with_auto_budget(cache, forced_widths, monkeypatch):
    """Under sampling the width switching between steps keeps vanilla's distribution."""
    monkeypatch.setitem(_CYCLE, "widths", [8, 2, 4])  # three new tokens: two steps, both with drafts
    V = 12
    model = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    torch.manual_seed(0)
    sample = model.generate(prompt.expand(40, -1), do_sample=True, max_new_tokens=8, min_new_tokens=8)
    store = TrigramStore.from_token_docs([r.tolist() for r in sample], vocab_size=V)
    kw = dict(do_sample=True, temperature=0.7, top_k=6)
    ref = _generate(model, prompt, 123, **kw)
    out = _generate(model, prompt, 456, accel="aded", accel_kwargs={"datastore": store, "max_nodes": "auto"},
                    **kw, **cache)
    st = hf_accel.stats(out)
    assert st.accepted_tokens > ROWS // 4 and len(set(forced_widths)) >= 2
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def test_static_widths_trace_under_torch_compile_each_on_its_own_code(forced_widths, monkeypatch):
    """Each width's verify step goes through torch.compile (aot_eager on CPU) as its own function, so the widths
    don't share dynamo's per-code recompile limit; output identical while the width switches."""
    from transformers import CompileConfig

    opts = backends.compile_options(CompileConfig(backend="aot_eager"))
    orig = backends._Workspace.verify_step
    monkeypatch.setattr(backends._Workspace, "verify_step",
                        lambda self, f=None: orig(self, backends._compiled_verify(opts, self.cur.n)))
    monkeypatch.setitem(_CYCLE, "widths", [4, 2, 8])
    model = tiny_model("llama")
    ids, mask = prompts((5, 12), seed=7)
    ref, store = _own_store(model, ids, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store}, cache_implementation="static")
    assert torch.equal(out, ref)
    used = set(forced_widths)
    assert len(used) >= 2
    fns = {backends._compiled_verify(opts, w) for w in used}
    assert len(fns) == len(used)
    assert len({f._torchdynamo_orig_callable.__code__ for f in fns}) == len(used)


def test_static_engine_times_every_width_before_the_first_step(monkeypatch):
    """The static engine's widths are its buckets: all timed through the backend (the eager step here; graph
    replays on CUDA) before the first step, the request unchanged by the probes."""
    model = tiny_model("phi3")
    ids, mask = prompts((5, 13, 9), seed=3)
    ref, store = _own_store(model, ids, mask)
    probes = []
    orig = budget.measure_static

    def spy(backend, table, widths, n_valid, pad, reps=3):
        probes.append(dict(table.get()))
        orig(backend, table, widths, n_valid, pad, reps)
        probes.append(dict(table.get()))

    monkeypatch.setattr(budget, "measure_static", spy)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store}, cache_implementation="static")
    assert torch.equal(out, ref)
    b = hf_accel.stats(out).extra["budget"]
    assert probes[0] == {} and set(probes[1]) == set(budget.buckets(64))
    assert b["explored"] == [] and set(b["widths"]) == set(budget.buckets(64))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, accel="aded",
                         accel_kwargs={"datastore": store}, cache_implementation="static")
    assert torch.equal(out, ref) and set(probes[2]) == set(budget.buckets(64))  # the process kept them


class _Reference(budget.BudgetChooser):
    """The chooser's decisions written plainly (every node's running sum, every candidate width scored, costs
    smoothed afresh each call): the fast path, the sums at bucket boundaries and the cached costs must not change a
    single choice or draft cap."""

    def costs(self):
        measured = budget.monotone({w: c for w, c in self.table.get().items() if w in self.widths},
                                   budget.PROBE_INVERSION if self.host_model else 0.0)
        self._measured = (self.table.version, measured)  # what measured() would return
        return super().costs()

    def choose(self, trees):
        from itertools import accumulate

        top = budget.bucket_for(min(max(len(t) for t in trees), self.widths[-1]), self.widths)
        costs, r = self.costs(), self.ratio
        cums = [[r * c for c in accumulate(t.scores[1:], initial=0.0)] for t in trees]
        best, best_s, scored = self.widths[0], -1.0, {}
        for w in [w for w in self.widths if w <= top]:
            s = scored[w] = sum(1.0 + c[min(w, len(c)) - 1] for c in cums) / (costs[w] + self.draft_seconds(w))
            if s > best_s * (1 + 1e-9):
                best, best_s = w, s
        self._steps += 1
        for w in [w for w in self._backoff if w < best]:
            del self._backoff[w]
        i = self.widths.index(best)
        w2 = self.widths[i + 1] if i + 1 < len(self.widths) else None
        if w2 in scored and scored[w2] < best_s:
            fails = min(self._backoff.get(best, (0, 0))[0] + 1, budget.BACKOFF_MAX)
            self._backoff[best] = (fails, self._steps + (1 << fails))
        grow = False
        if w2 is not None and self._steps >= self._backoff.get(best, (0, 0))[1]:
            cap = self._cap if self._cap is not None else self.widths[-1]
            gain = 0.0
            for t, c in zip(trees, cums):
                n = len(t)
                if n > best:
                    gain += c[min(n, w2) - 1] - c[best - 1]
                if cap <= n < w2:
                    gain += r * (w2 - max(n, best)) * t.scores[n - 1]
            tokens_w = best_s * (costs[best] + self.draft_seconds(best))
            grow = gain > 0 and (tokens_w + gain) / (costs[w2] + self.draft_seconds(w2)) > best_s
        self._grow = (best, grow)
        return best


@pytest.mark.parametrize("host", [True, False], ids=["graphed-static", "dynamic"])
@pytest.mark.parametrize("batch", [1, 4])
def test_chooser_decisions_equal_the_plain_computation(host, batch):
    import random

    rng = random.Random(7 + batch + host)
    widths = [16, 32, 64] if host else [1, 2, 4, 8, 16, 32, 64]
    costs = {16: 2.05e-3, 32: 2.15e-3, 64: 2.45e-3} if host else {1: 1e-3, 2: 1.1e-3, 4: 1.3e-3}
    fast = budget.BudgetChooser(budget.CostTable(dict(costs)), widths, host=host)
    ref = _Reference(budget.CostTable(dict(costs)), widths, host=host)
    for step in range(400):
        caps = fast.draft_cap(), ref.draft_cap()
        assert caps[0] == caps[1], step
        trees = []
        for _ in range(batch):  # best-first path probabilities: non-increasing, some trees ending below the cap
            n = rng.randint(1, caps[0]) if rng.random() < 0.4 else caps[0]
            p, sc = 1.0, [1.0]
            for _ in range(n - 1):
                p *= rng.uniform(0.6, 1.0) if rng.random() < 0.7 else rng.uniform(0.05, 0.6)
                sc.append(p)
            trees.append(_chain(sc))
        w = fast.choose(trees)
        assert w == ref.choose(trees) and fast._grow == ref._grow, step
        cuts = [budget.cut(t, w) for t in trees]
        accepted = [min(len(c) - 1, rng.randint(0, 3)) for c in cuts]
        for ch in (fast, ref):
            ch.record(w)
            for c, a in zip(cuts, accepted):
                ch.observe(c, a)
        d, s = rng.uniform(1e-4, 5e-4), costs.get(w, 3e-3) * rng.uniform(1.0, 1.5) + 4e-4
        fast.timed(w, d, s)
        ref.timed(w, d, s)
    assert len(fast.chosen) > 1  # the sequence exercised more than one width


def test_graph_widths_from_the_environment(monkeypatch):
    monkeypatch.delenv(budget.GRAPH_WIDTHS_ENV, raising=False)
    assert budget.graph_widths() == budget.GRAPH_WIDTHS == (16, 32, 64)
    monkeypatch.setenv(budget.GRAPH_WIDTHS_ENV, "64, 8,16,32,16")
    assert budget.graph_widths() == (8, 16, 32, 64)
    assert budget.buckets(64, budget.graph_widths()) == [8, 16, 32, 64]
    for bad in ("8;16", "0,16", "wide"):
        monkeypatch.setenv(budget.GRAPH_WIDTHS_ENV, bad)
        with pytest.raises(ValueError, match="HF_ACCEL_GRAPH_WIDTHS=.*comma-separated verify widths"):
            budget.graph_widths()
