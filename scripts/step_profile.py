"""Per-step cost profile of real ``generate`` calls on the static engine, by part, against HF's static decode step.

    python scripts/step_profile.py [--methods "aded(max_nodes=16)+static,clover+static"] [--batch 1]
        [--max-new-tokens 128] [--prompts 2] [--do-sample --temperature 0.7 --top-p 0.9] [--dtype bf16]
        [--device cuda] [--sync] [--budget-s 0] [--out FILE.md]

On the offline GPU machine (after scripts/gpu_bench.sh's stages; compile is the big cost, ~35-50 s per compiled
method, so pass the methods you need, or ``--compile-backend eager`` for the host parts of many methods at once):

    bash scripts/gpu_bench.sh run script scripts/step_profile.py --methods "clover+static,lud(lossless=True)+static" \
        --max-new-tokens 128 --prompts 2 --sync --budget-s 80 --out $OUT/step_profile.md

Methods are written as for ``hf-accel bench --methods`` (parsed by hf_accel.bench.methods, with the default model's
committed trained parts as defaults). Prompts: MT-Bench questions 60, 61, ... (held out), ``--batch`` per call,
``--prompts`` calls. Each method is warmed up once (compile + graph capture, untimed) on the first call's prompts,
then every call is profiled.

How the parts are measured (the wrap approach of scripts/hostprof.py, extended): the engine loop's parts are
wrapped with perf_counter timers *only around the profiled calls* (restored before the next warm-up, so no compiled
code ever sees a wrapper) and each part is charged its *exclusive* host time (time in a nested part is charged to
that part), so the parts of a step add up to the step's wall time exactly; ``other loop Python`` is the loop's own
code between parts (``_Steps.step`` itself). Parts:

* adapter.draft (host; a drafter's graph replay inside it, Clover / self_spec, is its own row, as is a host read
  of the draft), budget chooser, tree pack (``loop.pack``), verify_context / step program fill (host writes of a
  step program's buffers), H2D/staging (``StaticBackend.verify`` minus its graph replay: the slot tables and the
  step's inputs copied in, a layer plan's host logic), verify graph replay (host time of ``CUDAGraph.replay``;
  its GPU time from torch.cuda.Event pairs around the replay, summed after the call), device sampling (stage,
  host side, sampling graph replay), host read (sync wait: the ``tolist`` / ``item`` / ``bool`` of a CUDA tensor
  in the loop: the one read of the step; a plan's extra read is its own row), walk, commit (rows: tokens, stop
  checks), backend.commit (slot tables; compact graph replay its own row), adapter.verified, capture/compile
  (must be 0 after the warm-up: if not, a graph was captured inside a profiled call).

Without ``--sync`` the host times are what the loop sees: GPU work overlaps host work and the wait shows up in the
host read. With ``--sync`` a second profiled pass calls ``torch.cuda.synchronize()`` at every part boundary, so each
part is charged the GPU work it launched (the sync column); that pass's total is inflated by the syncs, so the
unsynchronised total is printed beside it.

The reference: HF ``generate(cache_implementation="static")`` with the run's fixed ``max_cache_len`` (compiled by
transformers on a GPU), greedy or with the same sampling settings: its decode step is timed from a streamer's
``put`` timestamps (one per token step; the ``.cpu()`` copy of the token HF makes for the streamer is included,
a few us); per token = step / batch. ``x HF`` = HF us/token / method us/token over the decode steps (prefill,
setup and output assembly excluded on both sides; they are printed per call).
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch

ROOT = "step"  # the label of _Steps.step: its exclusive time is the loop's own Python
CAPTURE = "capture/compile (one-off)"
READ = "host read (sync wait)"
# rows in the order of a step; others (unexpected) follow
ORDER = [
    "adapter.draft", "drafter graph replay", "adapter.draft host read", "budget chooser", "tree pack",
    "sampling stage (H2D)", "verify_context / step program fill", "H2D/staging (backend.verify)",
    "verify graph replay", "verify forward (eager)", "plan choice host read", "device sampling (host)",
    "sampling graph replay", "sampling step (eager)", READ, "accept loop Python", "walk", "commit (rows, stops)",
    "backend.commit (slot tables)", "compact graph replay", "compact (eager)", "adapter.verified", CAPTURE,
    "other loop Python",
]
REPLAY = {  # the part a CUDA graph replay is called from -> the replay's row
    "H2D/staging (backend.verify)": "verify graph replay",
    "backend.commit (slot tables)": "compact graph replay",
    "device sampling (host)": "sampling graph replay",
    "adapter.draft": "drafter graph replay",
}
READS = {  # the part a host read of a CUDA tensor happens in -> its row
    "accept loop Python": READ,
    "device sampling (host)": READ,
    "adapter.draft": "adapter.draft host read",
    "H2D/staging (backend.verify)": "plan choice host read",
}


class Parts:
    """Exclusive wall time per labelled part of the engine's steps (hostprof.py's perf_counter wraps, extended:
    nesting, restore, optional device sync at part boundaries, CUDA events around graph replays). Only time inside
    a ``step`` frame is recorded."""

    def __init__(self, sync: bool = False, cuda: bool = False):
        self.sync, self.cuda = sync and cuda, cuda
        self.ex = collections.defaultdict(float)  # label -> exclusive seconds
        self.calls = collections.Counter()
        self.stack: list = []  # [label, resumed at]
        self.events: list = []  # (label, start event, end event): GPU time of graph replays
        self.patches: list = []
        self.step_seconds = 0.0  # inclusive time of the step frames

    # -- accounting
    def _now(self) -> float:
        if self.sync and not torch.cuda.is_current_stream_capturing():  # never sync inside a graph capture
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, label, count: bool = True) -> bool:
        stack = self.stack
        if not stack and label != ROOT:
            return False  # outside the steps (prefill, setup, outputs): not a step's part
        if stack and (label is None or stack[-1][0] == CAPTURE):
            return False  # charged to the enclosing part
        now = self._now()
        if stack:
            top = stack[-1]
            self.ex[top[0]] += now - top[1]
        else:
            self._step_t0 = now
        stack.append([label, now])
        if count:
            self.calls[label] += 1
        return True

    def exit(self) -> None:
        now = self._now()
        label, t = self.stack.pop()
        self.ex[label] += now - t
        if self.stack:
            self.stack[-1][1] = now
        else:
            self.step_seconds += now - self._step_t0

    def parent(self):
        return self.stack[-1][0] if self.stack else None

    # -- wrapping
    def _patch(self, owner, name, new) -> None:
        own = name in vars(owner)
        self.patches.append((owner, name, vars(owner)[name] if own else None, own))
        setattr(owner, name, new)

    def wrap(self, owner, name, label, ctx: bool = False) -> None:
        """Time ``owner.name`` as ``label`` (a callable: label from the enclosing part). ``ctx``: the function
        returns a context manager: its ``__enter__`` / ``__exit__`` are timed under the label too."""
        fn = getattr(owner, name, None)
        if fn is None:
            return
        parts = self

        def timed(*a, **k):
            pushed = parts.enter(label(parts.parent()) if callable(label) else label)
            try:
                out = fn(*a, **k)
            finally:
                if pushed:
                    parts.exit()
            return _TimedContext(parts, out, label) if ctx else out

        timed.__wrapped__ = fn
        self._patch(owner, name, timed)

    def restore(self) -> None:
        for owner, name, orig, own in reversed(self.patches):
            if own:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)
        self.patches = []

    def replay_wrapper(self):
        """``CUDAGraph.replay``, timed on the host under the row of its caller and bracketed by CUDA events."""
        orig = torch.cuda.CUDAGraph.replay
        parts = self

        def replay(graph, *a, **k):
            label = REPLAY.get(parts.parent(), f"graph replay in {parts.parent()}")
            if not parts.stack or parts.parent() == CAPTURE:
                return orig(graph, *a, **k)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()  # the records (a few us) are charged to the calling part: the replay row is the replay's
            pushed = parts.enter(label)
            try:
                out = orig(graph, *a, **k)
            finally:
                if pushed:
                    parts.exit()
            e1.record()
            parts.events.append((label, e0, e1))
            return out

        return replay

    def read_wrapper(self, name: str):
        """A Tensor method that reads a CUDA tensor on the host (waits for the device): its own row."""
        orig = getattr(torch.Tensor, name)
        parts = self

        def read(t, *a, **k):
            if not parts.stack or "host read" in str(parts.parent()) or not t.is_cuda:
                return orig(t, *a, **k)
            pushed = parts.enter(READS.get(parts.parent(), f"host read in {parts.parent()}"))
            try:
                return orig(t, *a, **k)
            finally:
                if pushed:
                    parts.exit()

        return read

    def gpu_seconds(self) -> dict:
        """label -> GPU seconds of its replays (after the call: synchronizes)."""
        out = collections.defaultdict(float)
        if self.events:
            torch.cuda.synchronize()
        for label, e0, e1 in self.events:
            out[label] += e0.elapsed_time(e1) / 1e3
        return out


class _TimedContext:
    def __init__(self, parts: Parts, cm, label):
        self.parts, self.cm, self.label = parts, cm, label

    def _timed(self, fn, *a):
        p = self.parts
        pushed = p.enter(self.label(p.parent()) if callable(self.label) else self.label, count=False)
        try:
            return fn(*a)
        finally:
            if pushed:
                p.exit()

    def __enter__(self):
        return self._timed(self.cm.__enter__)

    def __exit__(self, *exc):
        return self._timed(self.cm.__exit__, *exc)


def instrument(parts: Parts, device_type: str) -> None:
    """Wrap the engine's per-step parts (restore with ``parts.restore()``)."""
    from hf_accel import registry
    from hf_accel.engine import backends, budget, capture, loop, sampling
    from hf_accel.engine.adapter import SpeculativeAdapter

    w = parts.wrap
    w(loop._Steps, "step", ROOT)
    w(loop._Steps, "accept", "accept loop Python")
    w(loop._Steps, "walk", "walk")
    w(loop._Commits, "commit", "commit (rows, stops)")
    w(loop, "pack", "tree pack")
    adapters = {SpeculativeAdapter, *(registry.get(n) for n in registry.available())}
    for cls in adapters:
        for name, label, ctx in (("draft", "adapter.draft", False), ("verified", "adapter.verified", False),
                                 ("verify_context", "verify_context / step program fill", True)):
            if name in vars(cls):
                w(cls, name, label, ctx=ctx)
    programs, todo = set(), [capture.StepProgram]
    while todo:
        c = todo.pop()
        for s in c.__subclasses__():
            programs.add(s)
            todo.append(s)
    for cls in programs:
        if "fill" in vars(cls):
            w(cls, "fill", "verify_context / step program fill")
    w(backends.StaticBackend, "step_context", "verify_context / step program fill", ctx=True)
    w(backends.DynamicBackend, "step_context", "verify_context / step program fill", ctx=True)
    w(backends.StaticBackend, "verify", "H2D/staging (backend.verify)")
    w(backends.DynamicBackend, "verify", "verify forward (eager)")
    w(backends._Workspace, "verify_step", "verify forward (eager)")
    w(backends.StaticBackend, "commit", "backend.commit (slot tables)")
    w(backends.DynamicBackend, "commit", "backend.commit (slot tables)")
    w(backends._Workspace, "compact_step", "compact (eager)")
    w(backends._Workspace, "capture", CAPTURE)
    w(backends._Workspace, "capture_compact", CAPTURE)
    w(capture, "record", CAPTURE)
    w(capture.Graphed, "_capture", CAPTURE)
    w(sampling._Entry, "capture", CAPTURE)
    w(sampling.DeviceSampler, "stage", "sampling stage (H2D)")
    w(sampling.DeviceSampler, "finish", "device sampling (host)")
    w(sampling.DeviceSampler, "committed", "device sampling (host)")
    w(sampling._Entry, "run", "sampling step (eager)")
    for name in ("choose", "observe", "timed", "draft_cap", "record"):
        w(budget.BudgetChooser, name, "budget chooser")
    w(budget, "cut", "budget chooser")
    if device_type == "cuda":
        parts._patch(torch.cuda.CUDAGraph, "replay", parts.replay_wrapper())
        for name in ("tolist", "item", "cpu", "__bool__"):
            parts._patch(torch.Tensor, name, parts.read_wrapper(name))


# ---- running ---------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A streamer that only timestamps HF's per-step ``put`` (the first put is the prompt)."""

    def __init__(self):
        self.t = []

    def put(self, value) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def _calls(prompts: list, batch: int, n: int) -> list:
    return [prompts[i * batch : (i + 1) * batch] for i in range(n)]


def run_reference(model, calls, a, settings, pad, generate_kwargs, spec) -> dict:
    """HF static decode: us per step and per token (mean over the calls' decode steps), us per call outside them."""
    from hf_accel.bench.runner import left_pad

    kw = generate_kwargs(spec, None, settings)
    t = time.perf_counter()
    shapes = {(len(r), max(len(p) for p in r)): r for r in calls}
    for row in shapes.values():  # warm-up: compile, on every row shape the timed calls see (as the bench)
        x, mask = left_pad(row, pad, model.device)
        model.generate(x, attention_mask=mask, max_new_tokens=a.max_new_tokens, pad_token_id=pad,
                       **settings.sampling_kwargs(), **kw)
    _sync(model.device)
    warm = time.perf_counter() - t
    steps = secs = total = 0.0
    tokens = 0
    for i, row in enumerate(calls):
        x, mask = left_pad(row, pad, model.device)
        clock = _StepClock()
        if settings.do_sample:
            torch.manual_seed(settings.seed + i)
        _sync(model.device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=mask, max_new_tokens=a.max_new_tokens, pad_token_id=pad,
                             streamer=clock, **settings.sampling_kwargs(), **kw)
        _sync(model.device)
        total += time.perf_counter() - t0
        ts = clock.t[1:]  # token timestamps; ts[0] is the first token (after the prefill)
        steps += len(ts) - 1
        secs += ts[-1] - ts[0]
        tokens += (out.shape[1] - x.shape[1]) * x.shape[0]
    per_step = secs / max(steps, 1)
    return {"warm_s": warm, "us_step": 1e6 * per_step, "us_token": 1e6 * per_step / a.batch,
            "us_outside": 1e6 * (total - secs) / len(calls), "steps": steps, "tok_s": tokens / total}


def profile_method(model, spec, calls, a, settings, pad, generate_kwargs) -> dict:
    from hf_accel.bench.runner import left_pad

    device = model.device
    kw = generate_kwargs(spec, None, settings)
    if a.compile_backend != "inductor":
        from transformers import CompileConfig

        kw["compile_config"] = CompileConfig(backend=a.compile_backend)
    x, mask = left_pad(calls[0], pad, device)
    t = time.perf_counter()
    model.generate(x, attention_mask=mask, max_new_tokens=a.max_new_tokens, pad_token_id=pad,
                   **settings.sampling_kwargs(), **kw)  # warm-up: compile + capture, untimed
    _sync(device)
    warm = time.perf_counter() - t
    res = {"warm_s": warm}
    for sync in ([False, True] if a.sync and device.type == "cuda" else [False]):
        parts = Parts(sync=sync, cuda=device.type == "cuda")
        total = 0.0
        st_all = []
        instrument(parts, device.type)
        try:
            for i, row in enumerate(calls):
                x, mask = left_pad(row, pad, device)
                if settings.do_sample:
                    torch.manual_seed(settings.seed + i)
                _sync(device)
                t0 = time.perf_counter()
                out = model.generate(x, attention_mask=mask, max_new_tokens=a.max_new_tokens, pad_token_id=pad,
                                     return_dict_in_generate=True, **settings.sampling_kwargs(), **kw)
                _sync(device)
                total += time.perf_counter() - t0
                st_all.append(out.accel_stats)
        finally:
            parts.restore()
        steps = sum(s.steps for s in st_all)
        res["sync" if sync else "async"] = {
            "ex": dict(parts.ex), "gpu": parts.gpu_seconds() if not sync else {}, "steps": steps,
            "step_s": parts.step_seconds, "total_s": total, "calls": dict(parts.calls),
        }
        if not sync:
            new = sum(s.new_tokens for s in st_all)
            res.update(steps=steps, new_in_steps=new - a.batch * len(calls),
                       tpf=new / max(sum(s.row_forwards for s in st_all), 1),
                       extra={k: v for k, v in st_all[-1].extra.items() if k in (
                           "graphs", "verify_width", "sampling_path", "sampling_graph", "plan_graphs",
                           "plan_captures", "draft_graphs", "draft_captures")})
    return res


# ---- report ----------------------------------------------------------------------------------------------------
def table(spec_label: str, res: dict, ref: dict | None, a) -> str:
    asy = res["async"]
    steps = max(asy["steps"], 1)
    syn = res.get("sync")

    def us(s, n=steps):
        return 1e6 * s / n

    ex = dict(asy["ex"])
    ex["other loop Python"] = ex.pop(ROOT, 0.0)
    sex = dict(syn["ex"]) if syn else {}
    if syn:
        sex["other loop Python"] = sex.pop(ROOT, 0.0)
    labels = [k for k in ORDER if k in ex or k in sex] + sorted((set(ex) | set(sex)) - set(ORDER))
    tokens_per_step = res["new_in_steps"] / steps
    step_us = us(asy["step_s"])
    lines = [f"### {spec_label}", "",
             f"{steps} steps over {a.prompts} call(s), tokens/forward {res['tpf']:.2f}, "
             f"{tokens_per_step:.2f} new tokens per step (all rows); warm-up {res['warm_s']:.1f} s; "
             + ", ".join(f"{k}={v}" for k, v in res["extra"].items()), ""]
    head = "| part | us/step (host) | GPU us/step (events) | calls/step |"
    sep = "|---|---:|---:|---:|"
    if syn:
        head += " us/step (--sync) |"
        sep += "---:|"
    lines += [head, sep]
    for k in labels:
        g = asy["gpu"].get(k)
        row = (f"| {k} | {us(ex.get(k, 0.0)):.1f} | {'' if g is None else f'{us(g):.1f}'} | "
               f"{asy['calls'].get(k if k != 'other loop Python' else ROOT, 0) / steps:.2f} |")
        if syn:
            row += f" {us(sex.get(k, 0.0), max(syn['steps'], 1)):.1f} |"
        lines.append(row)
    parts_sum = sum(ex.values())
    gpu_total = f"{us(sum(asy['gpu'].values())):.1f} (replays)" if a.device.startswith("cuda") else ""
    total_row = f"| **step total** (parts sum {us(parts_sum):.1f}) | **{step_us:.1f}** | {gpu_total} | |"
    if syn:
        total_row += f" {us(syn['step_s'], max(syn['steps'], 1)):.1f} (inflated by the syncs) |"
    lines.append(total_row)
    outside = 1e6 * (asy["total_s"] - asy["step_s"]) / max(a.prompts, 1)
    us_token = step_us / max(tokens_per_step, 1e-9)
    lines += ["", (f"- decode: {us_token:.1f} us per token ({step_us:.1f} us/step / {tokens_per_step:.2f} "
                   f"tokens/step); per call outside the steps (prefill, setup, outputs): {outside / 1e3:.1f} ms; "
                   f"generate total {asy['total_s'] / max(a.prompts, 1):.3f} s/call")]
    if asy["gpu"]:
        g = us(sum(asy["gpu"].values()))
        lines.append(f"- GPU time of the graph replays: {g:.1f} us/step = {100 * g / max(step_us, 1e-9):.0f}% of the "
                     f"step; the other {step_us - g:.1f} us/step the device idles on host work (or on work outside "
                     "the graphs)")
    cap = ex.get(CAPTURE, 0.0)
    if cap:
        lines.append(f"- **note**: {asy['calls'].get(CAPTURE, 0)} graph capture(s) inside the profiled calls (the "
                     f"warm-up did not cover them): {us(cap):.1f} us/step of the step total is that one-off cost; "
                     f"without it {step_us - us(cap):.1f} us/step, {(step_us - us(cap)) / max(tokens_per_step, 1e-9):.1f} "
                     "us per token")
    if ref is not None:
        lines.append(f"- HF static decode: {ref['us_token']:.1f} us per token ({ref['us_step']:.1f} us/step at batch "
                     f"{a.batch}) -> **{ref['us_token'] / us_token:.2f}x HF** on decode steps; break-even step time "
                     f"at these tokens/step: {ref['us_token'] * tokens_per_step:.1f} us")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="aded(max_nodes=16)+static,clover+static,hidden_transfer+static,"
                    "lud(lossless=True)+static,lora_drop(period=4)+static,m2r2(mode=early_exit,threshold=0.9)+static,"
                    "m2r2(mode=self_spec)+static")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=2, help="profiled calls (each of --batch MT-Bench questions 60+)")
    ap.add_argument("--start", type=int, default=60, help="first MT-Bench question")
    ap.add_argument("--do-sample", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the methods' verify step (eager: seconds to trace instead of "
                         "~40 s to compile; the graph still captures it, but its GPU time is not the inductor one's)")
    ap.add_argument("--sync", action="store_true", help="a second pass with a device sync at every part boundary")
    ap.add_argument("--no-reference", action="store_true", help="skip HF's static decode reference")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no further method once this many seconds have passed (0: no limit)")
    ap.add_argument("--out", default=None, help="markdown report (rewritten after each method)")
    a = ap.parse_args()
    t_start = time.perf_counter()

    import hf_accel  # noqa: F401  (accel= on generate)
    from hf_accel import loading, registry
    from hf_accel.bench import methods as bm
    from hf_accel.data import mtbench

    model, tok = loading.load_model("default", a.dtype, a.device)
    device = model.device
    defaults = {n: loading.default_accel_kwargs(n) for n in registry.available() if loading.default_accel_kwargs(n)}
    specs, skipped = [], []
    for entry in bm.split_top(a.methods):
        try:
            s = bm.parse_one(entry, defaults, model)
        except bm.MissingPart as e:
            skipped.append((e.label, e.reason))
            continue
        if s.name not in registry.available():
            raise SystemExit(f"{entry}: profile hf_accel methods (the HF static reference is always run)")
        specs.append(s)
    if any(s.name == "aded" and "datastore" not in s.kwargs for s in specs):
        loading.ensure_default_datastore(model, tok, progress=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = mtbench.prompts(tok, start=a.start, limit=a.prompts * a.batch)
    if len(prompts) < a.prompts * a.batch:
        raise SystemExit(f"MT-Bench has {len(prompts)} questions from {a.start}: lower --prompts or --batch")
    calls = _calls(prompts, a.batch, a.prompts)
    settings = bm.Settings(do_sample=a.do_sample, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                           max_cache_len=max(len(p) for p in prompts) + a.max_new_tokens)
    env = (f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
           f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    head = [f"## Step profile: default model, {a.dtype} on {device.type} ({env})", "",
            f"batch {a.batch}, {a.max_new_tokens} new tokens, {a.prompts} profiled call(s) on MT-Bench questions "
            f"{a.start}-{a.start + len(prompts) - 1}, {settings.describe()}, methods' verify compiled with "
            f"{a.compile_backend}. Host times are exclusive (a nested part "
            "is charged to itself), so the parts add up to the step total; GPU times are CUDA events around each "
            "graph replay." + (" The --sync column: a second pass with torch.cuda.synchronize() at every part "
                               "boundary (each part charged the GPU work it launched; its total is inflated by the "
                               "syncs, the unsynchronised total is the host column's)." if a.sync and device.type == "cuda" else ""), ""]
    for label, why in skipped:
        head.append(f"- skipped {label}: {why}")
    sections = []

    def emit(text: str) -> None:
        print(text, flush=True)
        sections.append(text)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as fh:
                fh.write("\n".join(head) + "\n\n" + "\n".join(sections))

    print("\n".join(head), flush=True)
    ref = None
    if not a.no_reference:
        print(f"[{time.perf_counter() - t_start:.0f} s] HF vanilla static: warm-up (compile), then {a.prompts} "
              "timed call(s)", flush=True)
        ref = run_reference(model, calls, a, settings, pad, bm.generate_kwargs, bm.parse_one("vanilla-static"))
        emit(f"### HF vanilla static (reference)\n\n- decode step {ref['us_step']:.1f} us, {ref['us_token']:.1f} us "
             f"per token ({ref['steps']:.0f} steps timed by streamer puts); outside the decode steps "
             f"{ref['us_outside'] / 1e3:.1f} ms per call (prefill, setup); {ref['tok_s']:.1f} tok/s end to end; "
             f"warm-up {ref['warm_s']:.1f} s\n")
    for spec in specs:
        if a.budget_s and time.perf_counter() - t_start > a.budget_s:
            emit(f"### {spec.label}\n\nnot run: --budget-s {a.budget_s:g} spent "
                 f"({time.perf_counter() - t_start:.0f} s)\n")
            continue
        print(f"[{time.perf_counter() - t_start:.0f} s] {spec.label}: warm-up (compile + capture), then "
              f"{a.prompts} profiled call(s)", flush=True)
        try:
            res = profile_method(model, spec, calls, a, settings, pad, bm.generate_kwargs)
        except Exception as e:  # noqa: BLE001 - one method's failure must not cost the others' profiles
            emit(f"### {spec.label}\n\nfailed: {type(e).__name__}: {e}\n")
            continue
        emit(table(spec.label, res, ref, a))
    print(f"elapsed {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
