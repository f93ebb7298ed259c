"""Host time per engine step of a static-engine method, split by part (CPU, eager: disable_compile=True).

    OMP_NUM_THREADS=1 PYTHONPATH=<worktree> python scripts/hostprof.py [--layers 1] [--tokens 128] [--reps 3]
        [--batch 8] [--max-nodes 16] [--sample] [--cpu-time] [--device cuda --graphs]

With ``--device cuda --graphs`` the step is compiled and replayed as CUDA graphs, and every part's time is its host
time (launches and copies are asynchronous; ``model forward`` is then the graph replay's launch, and the wait for the
device lands in the part that reads it: the walk's argmax read, inside ``other``, or ``sampler.finish``).

Wraps the loop's parts (adapter.draft, pack, backend.verify and inside it the model forward, backend.commit,
greedy_walk, adapter.verified/observe/verify_context, backend.step_context, the budget chooser) with perf_counter
timers and prints microseconds per step. Runs against whatever hf_accel PYTHONPATH imports (compare commits with two
worktrees). The rest of the step (the loop's own Python: tree checks, the argmax read, the commit closure, stats)
is `other` = step time - the parts."""
import argparse
import hashlib
import collections
import sys
import time

import torch

sys.path.insert(0, "tests")
from conftest import prompts, tiny_model  # noqa: E402

import hf_accel  # noqa: E402
from hf_accel.adapters import aded  # noqa: E402
from hf_accel.data.trigram import TrigramStore  # noqa: E402
from hf_accel.engine import backends, loop  # noqa: E402

T = collections.defaultdict(float)
CLOCK = [time.perf_counter]  # --cpu-time: time.thread_time (the process's own CPU time: steadier on a shared machine)
N = collections.Counter()


def wrap(owner, name, label):
    fn = getattr(owner, name, None)
    if fn is None:
        return

    def timed(*a, **k):
        clock = CLOCK[0]
        t = clock()
        try:
            return fn(*a, **k)
        finally:
            T[label] += clock() - t
            N[label] += 1

    setattr(owner, name, timed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-nodes", default="16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--partial", action="store_true", help="a store from every other token (fewer accepted)")
    ap.add_argument("--device", default="cpu", help="cuda: the parts' host time around asynchronous device work")
    ap.add_argument("--graphs", action="store_true", help="compile and capture the step (CUDA graphs; needs --device cuda)")
    ap.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time, not the wall clock")
    ap.add_argument("--sample", action="store_true", help="do_sample=True, temperature 0.7, top-p 0.9 (device path)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.cpu_time:
        CLOCK[0] = time.thread_time
    model = tiny_model("llama", layers=a.layers).to(a.device)
    ids, mask = prompts([13] * a.batch, seed=1)
    ids, mask = ids.to(a.device), mask.to(a.device)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=a.tokens, do_sample=False)
    store = TrigramStore.from_token_docs([r.tolist()[:: 2 if a.partial else 1] for r in ref],
                                         vocab_size=model.config.vocab_size)
    mn = a.max_nodes if a.max_nodes == "auto" else int(a.max_nodes)
    samp = dict(do_sample=True, temperature=0.7, top_p=0.9) if a.sample else dict(do_sample=False)
    kw = dict(attention_mask=mask, max_new_tokens=a.tokens, **samp, accel="aded",
              accel_kwargs={"datastore": store, "max_nodes": mn}, cache_implementation="static", disable_compile=not a.graphs)
    torch.manual_seed(0)
    first = model.generate(ids, **kw)  # warm
    if a.sample:  # the reference: this seed's output (same before/after a change: compare the digest)
        ref = first
    wrap(aded.ADED, "draft", "draft")
    wrap(aded.ADED, "verified", "adapter.verified")
    wrap(aded.ADED, "observe", "adapter.observe")
    wrap(aded.ADED, "verify_context", "adapter.verify_context")
    wrap(loop, "pack", "pack")
    wrap(loop, "greedy_walk", "walk")
    wrap(backends.StaticBackend, "verify", "backend.verify")
    wrap(backends, "_forward", "  model forward (in verify)")
    wrap(backends.StaticBackend, "commit", "backend.commit")
    wrap(backends._Workspace, "compact_step", "  compaction (in commit; a graph replay on a GPU)")
    wrap(backends.StaticBackend, "step_context", "backend.step_context")
    wrap(loop._Commits, "commit", "commits.commit")
    wrap(loop.DeviceSampler, "stage", "sampler.stage")
    wrap(loop.DeviceSampler, "finish", "sampler.finish")
    wrap(loop, "walk", "walk (device draws)")
    if hasattr(loop, "budgets"):
        wrap(loop.budgets, "for_request", "budget.for_request")
        wrap(loop.budgets.BudgetChooser, "choose", "chooser.choose")
        wrap(loop.budgets.BudgetChooser, "observe", "chooser.observe")
        wrap(loop.budgets.BudgetChooser, "timed", "chooser.timed")
        wrap(loop.budgets, "cut", "budget.cut")
    steps = 0
    total = 0.0
    for _ in range(a.reps):
        torch.manual_seed(0)
        if a.device != "cpu":
            torch.cuda.synchronize()
        t = CLOCK[0]()
        out = model.generate(ids, **kw)
        total += CLOCK[0]() - t
        st = hf_accel.stats(out)
        steps += st.steps
        assert torch.equal(out, ref)
    digest = hashlib.sha1(ref.cpu().numpy().tobytes()).hexdigest()[:10]
    print(f"hf_accel {hf_accel.__file__}  layers={a.layers} batch={a.batch} max_nodes={a.max_nodes} "
          f"sample={a.sample} output={digest} clock={'thread CPU time' if a.cpu_time else 'wall'} "
          f"steps/call={steps / a.reps:.1f} tokens/forward={st.tokens_per_forward:.2f}")
    print(f"{'part':32s} {'us/step':>9s}")
    parts = 0.0
    for k in sorted(T, key=lambda k: -T[k]):
        print(f"{k:32s} {1e6 * T[k] / steps:9.1f}")
        if not k.startswith(" "):
            parts += T[k]
    print(f"{'generate() total':32s} {1e6 * total / steps:9.1f}")
    print(f"{'other (total - parts)':32s} {1e6 * (total - parts) / steps:9.1f}")


main()
