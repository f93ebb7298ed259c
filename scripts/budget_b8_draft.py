"""Drafting time per step of ADED's auto budget against fixed budgets at batch 8, on a CPU, with the static engine's
GPU-shaped chooser: where the auto budget's extra host time goes (first-step cap, wider trial drafts, the garbage
collector).

    OMP_NUM_THREADS=2 python scripts/budget_b8_draft.py [--batch 8] [--sample] [--tokens 128] [--reps 2]

The default model (fp32, the CPU's dynamic engine) on MT-Bench q60.. as one left-padded row of ``--batch`` prompts.
The auto budget's chooser gets the graphed static engine's widths (16 / 32 / 64) and the H200's probed step costs
(2.3 / 2.6 / 3.2 ms at batch 8) plus a host part per width (0.6 / 0.9 / 1.5 ms) in place of this CPU's step times, so
it makes a GPU's choices; the cost table (and what the finished requests chose) is kept across repetitions, as in one
process. Every call starts with the datastore's lookup cache empty (as `hf-accel bench` does). Prints per call the
drafting time per step (the loop's whole draft phase: the adapter, the chooser, the cut; mean, median, p90, max),
the draft caps, the widths chosen and the garbage collector's passes (generation: count, ms)."""
import argparse
import collections
import gc
import statistics
import time

import torch
from budget_draft_cost import gc_recorder

import hf_accel
from hf_accel import loading
from hf_accel.bench.runner import left_pad
from hf_accel.data import mtbench
from hf_accel.data.trigram import clear_lookup_caches
from hf_accel.engine import budget, loop

PROBE = {16: 2.3e-3, 32: 2.6e-3, 64: 3.2e-3}
HOST = {16: 6.0e-4, 32: 9.0e-4, 64: 1.5e-3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sample", action="store_true", help="T 0.7, top-p 0.9, seed 0")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    model, tok = loading.load_model("default", "fp32", "cpu")
    store = loading.ensure_default_datastore(model, tok)
    x, mask = left_pad(mtbench.prompts(tok, start=60, limit=a.batch), tok.pad_token_id or 0, "cpu")
    tables = {}

    def for_request(adapter, model, batch, engine, key_extra=(), backend=None, n_valid=None, pad=0):
        if not adapter.auto_budget():
            return None
        return budget.BudgetChooser(tables.setdefault(batch, budget.CostTable(dict(PROBE))), [16, 32, 64], host=True)

    loop.budgets.for_request = for_request
    timed = budget.BudgetChooser.timed
    budget.BudgetChooser.timed = lambda self, w, d, s: timed(self, w, d, PROBE[w] + HOST[w])
    step_times, caps = [], collections.Counter()
    draft = loop._Steps.draft

    def timed_draft(self, active):
        t = time.perf_counter()
        out = draft(self, active)
        step_times.append(time.perf_counter() - t)
        if self.chooser is not None:
            caps[self.chooser._cap] += 1
        return out

    loop._Steps.draft = timed_draft
    kw = dict(attention_mask=mask, max_new_tokens=a.tokens, pad_token_id=tok.pad_token_id)
    kw.update(dict(do_sample=True, temperature=0.7, top_p=0.9) if a.sample else dict(do_sample=False))
    for rep in range(a.reps):
        for mn in ("auto", 16, 8):
            passes, on_gc = gc_recorder()
            clear_lookup_caches()
            step_times.clear()
            caps.clear()
            torch.manual_seed(0)
            gc.callbacks.append(on_gc)
            out = model.generate(x, accel="aded", accel_kwargs={"datastore": str(store), "max_nodes": mn}, **kw)
            gc.callbacks.remove(on_gc)
            st = hf_accel.stats(out)
            ts = sorted(step_times)
            print(f"rep {rep} max_nodes={mn}: {st.steps} steps, {st.tokens_per_forward:.2f} tokens/forward; drafting "
                  f"per step mean {statistics.mean(ts) * 1e6:.0f} us, median {ts[len(ts) // 2] * 1e6:.0f}, p90 "
                  f"{ts[int(len(ts) * 0.9)] * 1e6:.0f}, max {ts[-1] * 1e6:.0f}; caps {dict(caps)}; chosen "
                  f"{st.extra.get('budget', {}).get('chosen')}; gc {({k: round(v, 1) for k, v in passes.items()})}",
                  flush=True)


if __name__ == "__main__":
    main()
