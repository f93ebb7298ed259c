"""Per-request layer edits that other threads never see, and the fixed-shape step programs built on them.

**Layer edits.** A method that changes what a module of the target outputs during its own forwards (hidden
transfer's maps at layer t, LUD's placeholder-only adapters) must not touch a forward another thread runs on the
same model at the same time. ``layer_edits([(module, fn), ...])`` runs ``fn(module, args, kwargs, output) ->
output`` after each forward of ``module`` *in the current context only* (a ``contextvars`` table: each thread has
its own, so does each asyncio task). The forward hooks that dispatch on that table are installed once per module
and reference-counted across requests (removed when the last request using the module leaves), so a model no
request is using carries none of our hooks. The hook takes ``(module, *rest)``: a thread that meets it half
registered or half removed (torch records the ``with_kwargs`` flag apart from the hook) gets a no-op, never a
``TypeError``.

**Step programs.** A :class:`StepProgram` is how an adapter hands the engine per-step device work that must run
inside the verify forward, in a form the static engine can capture in its CUDA graph:

* ``buffers(batch, nodes, device)``: fixed-shape device tensors the step reads, allocated once per static
  workspace (per step on the dynamic engine, at the step's width);
* ``fill(state, trees, bufs)``: host side, before each verify: write this step's values into ``bufs`` in place
  (``copy_`` / ``zero_``; never rebind a tensor: a captured graph reads the original storage);
* ``edits(bufs)``: the layer edits of the step, as functions of device tensors only (no host reads, no Python
  branching on tensor values), so the same code runs eagerly, under ``torch.compile`` and inside a captured graph;
* ``key()``: what the step reads besides ``bufs`` (method name + the identity of the trained part); the static
  engine keys its workspaces on it, so a graph captured for one method/artifact is never replayed for another.
  The workspace keeps the program (hence the trained part) alive, so the identity can't be reused.

Both engines run ``edits`` through ``layer_edits`` around the verify forward, so the dynamic engine exercises the
very code the static engine captures.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref

import torch
from torch import nn

# id(module) -> tuple of edit functions, for forwards of the current context
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("hf_accel_layer_edits", default=None)
_LOCK = threading.Lock()
_INSTALLED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> [handle, requests using it]


def _dispatch(module, *rest):
    table = _ACTIVE.get()
    if not table or len(rest) != 3:  # no edit in this context (or a hook met mid-(un)registration: no-op)
        return None
    fns = table.get(id(module))
    if not fns:
        return None
    args, kwargs, output = rest
    for fn in fns:
        output = fn(module, args, kwargs, output)
    return output


def _install(modules: list) -> None:
    with _LOCK:
        for m in modules:
            entry = _INSTALLED.get(m)
            if entry is None:
                entry = _INSTALLED[m] = [m.register_forward_hook(_dispatch, with_kwargs=True), 0]
            entry[1] += 1


def _uninstall(modules: list) -> None:
    with _LOCK:
        for m in modules:
            entry = _INSTALLED.get(m)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] <= 0:
                entry[0].remove()
                del _INSTALLED[m]


@contextlib.contextmanager
def layer_edits(edits):
    """While active, ``fn(module, args, kwargs, output)`` replaces ``module``'s output, for forwards run from this
    context (thread / task) only; ``edits``: (module, fn) pairs, several per module apply in order. Nothing is left
    on the modules on exit, error or not (once no other request uses them)."""
    edits = list(edits)
    if not edits:
        yield
        return
    modules = list({id(m): m for m, _ in edits}.values())
    _install(modules)
    try:
        table = dict(_ACTIVE.get() or {})
        for m, fn in edits:
            table[id(m)] = table.get(id(m), ()) + (fn,)
        token = _ACTIVE.set(table)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
    finally:
        _uninstall(modules)


class StepProgram:
    """Fixed-shape per-step device work of an adapter, run inside the verify forward (see the module docstring).
    Subclasses define ``key``, ``buffers``, ``fill`` and ``edits``."""

    def key(self) -> tuple:  # pragma: no cover - interface
        raise NotImplementedError

    def buffers(self, batch: int, nodes: int, device) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def fill(self, state, trees: list, bufs: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def edits(self, bufs: dict) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def neutral(self, bufs: dict) -> bool:
        """Write ``bufs`` (in place, device ops only) so that the edits change nothing in the forward, and return
        True: the static engine then feeds the prompt through the verify step (its captured graph, which replays
        the edits) in chunks. False (default): the program can't; nothing is written and the prompt is prefilled
        by one eager forward."""
        return False


def upload(dst: torch.Tensor, src) -> None:
    """``dst.copy_(src)`` for a step program's ``fill`` (``src``: a CPU tensor or numpy array of ``dst``'s shape).
    On CUDA through a pinned host mirror of ``dst`` and asynchronously: a copy from pageable memory first waits for
    everything queued on the stream (the previous step's compaction, say), where this one is queued behind it and
    the host goes on. The mirror is rewritten only once its last copy has finished (an event; by then the step's
    own host read has long waited for it)."""
    if not torch.is_tensor(src):
        src = torch.from_numpy(src)
    if dst.device.type != "cuda":
        dst.copy_(src)
        return
    # (pinned mirror, event of the last copy), kept on the buffer itself: a buffer belongs to one workspace, which
    # serves one request at a time, and so does its mirror
    entry = getattr(dst, "_hf_accel_mirror", None)
    if entry is None:
        entry = dst._hf_accel_mirror = (torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True), torch.cuda.Event())
    mirror, done = entry
    done.synchronize()  # the last copy from the mirror (returns at once when none was recorded yet)
    mirror.copy_(src)
    dst.copy_(mirror, non_blocking=True)
    done.record(torch.cuda.current_stream(dst.device))


def part_key(name: str, part: nn.Module) -> tuple:
    """``StepProgram.key`` for a program that reads one trained part: the method and the part's identity (the
    workspace holds the program, so the part outlives the key)."""
    return (name, id(part))


@contextlib.contextmanager
def step(program: StepProgram, bufs: dict, state, trees: list, live: bool = True):
    """One verify step of ``program``: ``bufs`` filled for ``trees``, then (``live``) its edits active around the
    forward. ``live=False``: fill only (a captured graph replays the edits)."""
    program.fill(state, trees, bufs)
    if not live:
        yield
        return
    with layer_edits(program.edits(bufs)):
        yield


def graphs_supported(device) -> bool:
    """Whether steps on ``device`` are captured as CUDA graphs (else they run eagerly)."""
    return torch.device(device).type == "cuda"


# One capture at a time in the process (warm-ups included). A compiled step's warm-ups check dynamo's guards; with two
# requests compiling and warming their steps side by side, each thread's guards failed call after call while the other
# compiled (dynamo: "runtime guards failed even though they passed during recompilation-reason analysis"), up to
# torch's recompile limit, then the eager fallback; serialized, none did. A replay checks no guard: not serialized.
CAPTURE_LOCK = threading.RLock()


def record(fn, device, warmup: int = 2, pool=None):
    """Capture ``fn()`` as a CUDA graph -> ``(graph, out)``: ``warmup`` eager runs on a side stream first (they must
    write only what a replay writes again), then the capture; ``out`` is what ``fn`` returned inside it (the graph's
    own buffers, rewritten by every ``graph.replay()``). ``fn`` must read and write only tensors that keep their
    storage between replays. Every capture of the engine goes through here (tests count and simulate it on CPU),
    under :data:`CAPTURE_LOCK`."""
    with CAPTURE_LOCK:
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out


class Graphed:
    """A fixed-shape device step outside the target's forward (a drafter): ``fn()`` reads and writes only tensors
    that keep their storage between calls, and returns tensors. Eager when ``enabled`` is false or off CUDA; on
    CUDA it is captured as one CUDA graph on the first call and replayed after (the outputs are the graph's own
    buffers, overwritten by the next call). ``quiet()``: a context under which a call changes no state that must
    persist (the warm-up runs and the capture's bookkeeping happen under it; e.g. a feed of zero tokens).

    ``compile_options`` (a dict of ``torch.compile`` arguments, or None): the captured step is ``torch.compile(fn)``
    (fused kernels: fewer, shorter launches in the graph), as the static engine's verify step is. If compiling or the
    compiled warm-up fails, the step is captured from ``fn`` itself (``compiled`` says which; ``compile_error`` why)."""

    def __init__(self, fn, device, enabled: bool, quiet=contextlib.nullcontext, compile_options: dict | None = None):
        self.fn, self.device, self.quiet = fn, device, quiet
        self.enabled = bool(enabled) and device.type == "cuda"
        self.compile_options = compile_options
        self.compiled = False
        self.compile_error = None
        self.graph = self.out = None
        self.capture_seconds = 0.0

    def __call__(self):
        if not self.enabled:
            return self.fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out

    def _warm(self, fn, current) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        current.wait_stream(side)

    def _capture(self) -> None:
        import time

        t = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        fn = self.fn
        with CAPTURE_LOCK, self.quiet():
            if self.compile_options is not None:
                try:
                    compiled = torch.compile(self.fn, dynamic=False, **self.compile_options)
                    self._warm(compiled, current)
                    fn, self.compiled = compiled, True
                except Exception as e:  # noqa: BLE001 - any compile failure: the eager step is captured instead
                    torch.cuda.synchronize(self.device)
                    self.compile_error = f"{type(e).__name__}: {e}"[:500]
            if not self.compiled:
                self._warm(fn, current)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = fn()
        self.graph = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - t


__all__ = ["Graphed", "StepProgram", "graphs_supported", "layer_edits", "part_key", "record", "step"]
