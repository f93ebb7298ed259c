"""Replays ADED's drafted trees under node-budget policies, offline: how much of the auto budget's gap to a fixed
width is its choices, and how much is everything else (drafting cost, bf16 divergence between configurations).

    OMP_NUM_THREADS=1 python scripts/budget_replay.py [--prompts 12] [--tokens 96] [--costs 2.05e-3,2.15e-3,2.45e-3]
        [--per-node 8e-6] [--trees /tmp/aded_trees.json]

1. Runs ADED with a fixed 64-node budget on the default model (CPU, fp32, greedy, MT-Bench questions 0..N-1 — not the
   held-out ones) and records every verified tree (best-first path probabilities, parents) and its accepted path.
2. Replays each request under fixed widths 16 / 32 / 64 and under the real BudgetChooser (engine/budget.py: draft
   cap, choice, calibration with the cut-off nodes, backoff), with a frozen per-width step cost (``--costs``, a GPU's
   graphed widths) plus ``--per-node`` seconds of drafting per node drafted. A tree cut at w accepts exactly the
   accepted path's nodes below w (best-first: a node's ancestors come before it), so every policy sees the tokens the
   model would have given it; only the budget differs. Prints tokens per second and per step, and the widths chosen.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hf_accel.adapters import aded
from hf_accel.data import mtbench
from hf_accel.default_model import load_default
from hf_accel.engine import budget
from hf_accel.engine.tree import Tree


def collect(n_prompts: int, tokens: int) -> list:
    model, tok = load_default()
    reqs, cur = [], []
    orig = aded.ADED.verified

    def spy(self, state, row, tree, path, new_tokens, step, b):
        cur.append((list(tree.scores), list(tree.parents), list(path)))
        return orig(self, state, row, tree, path, new_tokens, step, b)

    aded.ADED.verified = spy
    try:
        for ids in mtbench.prompts(tok, start=0, limit=n_prompts):
            model.generate(torch.tensor([ids]), max_new_tokens=tokens, accel="aded", accel_kwargs={"max_nodes": 64})
            reqs.append(list(cur))
            cur.clear()
    finally:
        aded.ADED.verified = orig
    return reqs


def replay(reqs: list, policy, costs: dict, per_node: float) -> tuple:
    toks = seconds = 0.0
    chosen: dict = {}
    for req in reqs:
        # host=True: the graphed static engine's chooser (probed replay costs; their inversions kept, PROBE_INVERSION)
        ch = budget.BudgetChooser(dict(costs), sorted(costs), host=True) if policy == "auto" else None
        for scores, parents, path in req:
            full = Tree(list(range(len(scores))), parents, scores=scores)
            if ch is None:
                w = cap = policy
                accepted = [i for i in path if i < w]
            else:
                cap = ch.draft_cap()
                drafted = budget.cut(full, min(cap, len(full)))
                w = ch.choose([drafted])
                ch.record(w)
                verified = budget.cut(drafted, min(w, len(drafted)))
                accepted = [i for i in path if i < len(verified)]
                later = [i for i in path if i >= len(verified)]  # node ids are tokens here: the bonus is the next one
                ch.observe(verified, len(accepted) - 1, drafted, accepted[-1], later[0] if later else -1)
                ch.timed(w, per_node * cap, None)
            chosen[w] = chosen.get(w, 0) + 1
            toks += len(accepted)  # the accepted drafted nodes + the bonus token (the root's slot)
            seconds += costs[w] + per_node * cap
    return toks / seconds, toks / sum(len(r) for r in reqs), chosen


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--costs", default="2.05e-3,2.15e-3,2.45e-3", help="seconds of a step at widths 16,32,64")
    ap.add_argument("--per-node", type=float, default=8e-6, help="seconds of drafting per drafted node")
    ap.add_argument("--trees", default=None, help="a JSON file of the recorded trees: read when it exists (same "
                    "--prompts / --tokens), else written after the run, so other --costs replay in seconds")
    a = ap.parse_args()
    costs = dict(zip((16, 32, 64), (float(x) for x in a.costs.split(","))))
    if a.trees and os.path.exists(a.trees):
        with open(a.trees) as f:
            saved = json.load(f)
        if (saved["prompts"], saved["tokens"]) != (a.prompts, a.tokens):
            raise SystemExit(f"{a.trees} holds --prompts {saved['prompts']} --tokens {saved['tokens']}")
        reqs = saved["requests"]
    else:
        reqs = collect(a.prompts, a.tokens)
        if a.trees:
            with open(a.trees, "w") as f:
                json.dump({"prompts": a.prompts, "tokens": a.tokens, "requests": reqs}, f)
    print(f"{sum(len(r) for r in reqs)} steps of {len(reqs)} requests; costs {costs}, drafting {a.per_node} s/node")
    for policy in (16, 32, 64, "auto"):
        tps, per_step, chosen = replay(reqs, policy, costs, a.per_node)
        print(f"{str(policy):5s} {tps:8.1f} tok/s  {per_step:.3f} tok/step  widths {dict(sorted(chosen.items()))}")


if __name__ == "__main__":
    main()
