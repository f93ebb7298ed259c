"""Host time of ADED's drafting per step under the auto node budget, with a GPU-shaped cost table, on a CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=<worktree> python scripts/budget_draft_cost.py [--costs 2.85e-3,3.3e-3,4.2e-3]
        [--max-nodes 16] [--prompts 4] [--tokens 64]

On the H200 the graphed static engine offers widths 16 / 32 / 64 and a replay costs about the same at each; the
chooser's extra host work (drafting wider trees than it verifies, choosing) is what separated ``max_nodes="auto"``
from a fixed 16 there. This runs the default model on the CPU's dynamic engine with the chooser's widths set to
(16, 32, 64) and a frozen cost table of those seconds (``--costs``), so the choices are the GPU's, and reports the
thread CPU time per step of ADED's drafting, the chooser's choose(), the cut and the loop's whole draft phase, the
widths chosen, and the garbage collector's passes during the run (a full pass over the ~350k objects torch and
transformers create costs ~130 ms here and lands in whichever part is running: ``gc.freeze()`` before the timed
requests keeps it out). ``--max-nodes N``: a fixed budget instead of "auto", for reference. Run it against two
worktrees (PYTHONPATH) to compare commits."""

from __future__ import annotations

import argparse
import collections
import gc
import time

import torch

import hf_accel
from hf_accel import loading
from hf_accel.adapters import aded
from hf_accel.data import mtbench
from hf_accel.engine import budget, loop


def gc_recorder():
    """(passes, callback): a ``gc.callbacks`` entry counting the collector's passes and their milliseconds by
    generation into ``passes``."""
    passes, start = collections.Counter(), [0.0]

    def on_gc(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            passes[f"gen{info['generation']}"] += 1
            passes[f"gen{info['generation']} ms"] += (time.perf_counter() - start[0]) * 1e3

    return passes, on_gc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--costs", default="2.85e-3,3.3e-3,4.2e-3", help="seconds of a step at widths 16,32,64")
    ap.add_argument("--max-nodes", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    times = collections.defaultdict(float)

    def wrap(owner, name):
        fn = getattr(owner, name)

        def timed(*args, **kw):
            t = time.thread_time()
            out = fn(*args, **kw)
            times[f"{owner.__name__}.{name}"] += time.thread_time() - t
            return out

        setattr(owner, name, timed)

    for owner, name in [(budget.BudgetChooser, "choose"), (aded.ADED, "draft"), (budget, "cut"),
                        (budget.BudgetChooser, "draft_cap"), (loop._Steps, "draft")]:
        wrap(owner, name)
    passes, on_gc = gc_recorder()
    model, tok = loading.load_model("default", "fp32", "cpu")
    store = loading.ensure_default_datastore(model, tok)
    prompts = mtbench.prompts(tok, start=60, limit=a.prompts)
    budget.WIDTHS = (16, 32, 64)  # the graphed static engine's buckets
    costs = dict(zip((16, 32, 64), (float(c) for c in a.costs.split(","))))
    budget.set_costs(model, costs, batch=1, engine="dynamic")
    kw = {"datastore": str(store)}
    if a.max_nodes is not None:
        kw["max_nodes"] = a.max_nodes
    gc.collect()
    gc.freeze()
    gc.callbacks.append(on_gc)
    steps, chosen, tpf = 0, collections.Counter(), []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=a.tokens, do_sample=False, accel="aded",
                             accel_kwargs=kw)
        st = hf_accel.stats(out)
        steps += st.steps
        tpf.append(st.tokens_per_forward)
        chosen.update(st.extra.get("budget", {}).get("chosen", {}))
    gc.callbacks.remove(on_gc)
    print(f"hf_accel {hf_accel.__file__}  max_nodes={a.max_nodes or 'auto'}  costs={costs}  steps={steps}  "
          f"tokens/forward={sum(tpf) / len(tpf):.2f}  chosen={dict(chosen)}  gc={dict(passes)}")
    for k, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"{k:28s} {v / steps * 1e6:8.0f} us/step (thread CPU time)")


if __name__ == "__main__":
    main()
