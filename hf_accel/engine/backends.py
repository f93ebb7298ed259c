"""Where the engine's target forwards run: on a growing DynamicCache, or on a static cache with CUDA graphs.

Both backends expose the same three steps to the loop (engine/loop.py):

* ``prefill(input_ids, attn, pos) -> (logits of the last position (B, V), hidden (B, P, H) or None)``
* ``verify(packed, q_pos) -> (logits (B, N, V), argmax (B, N), hidden (B, N, H) or None)``: one forward over the
  packed trees (all on the device; the loop reads the argmax only on its greedy fast path)

``hidden``: the final (post-norm) hidden states, when the adapter asks for them (``want_hidden``); the
forward then runs the decoder and the LM head apart (:func:`run_model`), which gives the same logits.
* ``commit(paths)``: keep, per row, the accepted path's KV (tree compaction) and drop the rest.

:class:`DynamicBackend` appends to a DynamicCache and compacts / crops it (engine/cache.py's SlotCache).

:class:`StaticBackend` (``generate(..., cache_implementation="static", accel=...)``) preallocates every layer's
KV as one buffer of ``L = max_length + N`` slots and never changes a shape: each verify forward writes its N
tree nodes at slots ``[start, start + N)`` (N = the adapter's node budget; trees are padded to it), attends over
all L slots through a 4D mask built from per-slot validity and logical positions, and rollback is by position:
the accepted path is gathered to ``[start, start + len(path))`` and ``start`` moves on; the rest of the region
is marked invalid and overwritten by the next forward. Because every shape is fixed, the mask build + verify
forward + argmax, and the compaction, are each captured once per request as a CUDA graph and replayed
(``generation_config.disable_compile=True`` or a CPU model runs the same code eagerly). The only host<->device
sync in a step is reading the argmax (and the logits when sampling or logits processors need them).
The prompt's prefill goes through the same verify step (its captured graph) in chunks of the node budget's width W,
each a causal chain written at the slots of its columns, where that applies (graphs, no KV method nor layer plan, a
step program that can be made neutral, W >= PREFILL_MIN_WIDTH, at most PREFILL_MAX_CHUNKS chunks): a few graph
replays instead of one eager forward's host dispatch (``StaticBackend._prefill_chunked``; ``stats.extra["prefill"]``).
Batch > 1: rows share ``start``, so a row that accepted fewer tokens than the longest leaves invalid slots; when
the buffer would overflow, rows are defragmented (valid slots moved to the front, order kept).

A KV method composed with the speculative method (``kv``: DuoAttention) brings its own cache in place of the plain
slot buffers (``kv.engine_cache(workspace)``, e.g. adapters/duo_attention/engine_cache.py): it reads the workspace's
``write_idx`` / ``slot_pos`` / ``prefilling``, and implements ``compact(src, region, n_keep)`` (run, and captured, at
every commit that keeps something: ``n_keep`` holds each row's path length on the device), ``defragment(idx)`` and
``reset_request()``. Its workspaces, compiled steps and budget cost tables are keyed by ``kv.engine_key()``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import types
import weakref

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import models
from . import capture
from .cache import SlotCache, cache_nbytes
from .tree import PackBuffers, attention_masks, static_attention_masks


def run_model(model, want_hidden: bool, last_only: bool = False, cache_kw: str = "past_key_values", **kwargs):
    """One target forward -> (logits, final hidden states or None). ``last_only``: logits of the last position
    only. With ``want_hidden`` the decoder and the LM head run apart (models.logits_from_hidden applies the
    family's logit post-processing), which is what the CausalLM forward does itself. ``cache_kw``: the name the
    forward takes the cache under (``models.cache_kwarg``); callers pass the cache as ``past_key_values``."""
    if cache_kw != "past_key_values" and "past_key_values" in kwargs:
        kwargs[cache_kw] = kwargs.pop("past_key_values")
    if not want_hidden:
        if last_only and "logits_to_keep" not in kwargs and models.accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = 1
        return model(**kwargs).logits, None
    kwargs.pop("logits_to_keep", None)
    hidden = models.decoder(model)(**kwargs).last_hidden_state
    return models.logits_from_hidden(model, hidden[:, -1:] if last_only else hidden), hidden


def sync(device) -> None:
    """Wait for the device's queued work (timing on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device) -> float:
    """A timestamp after the device's queued work has finished."""
    sync(device)
    return time.perf_counter()


class DynamicBackend:
    def __init__(self, model, layout, batch: int, device, mask_dtype, fwd_extra: dict, want_hidden: bool = False,
                 cache=None, program=None):
        """``cache``: the transformers Cache to run on (a KV method's, e.g. DuoCache); default a fresh DynamicCache.
        ``program``: the adapter's :class:`~hf_accel.engine.capture.StepProgram` (None: none)."""
        self.model, self.layout, self.device, self.mask_dtype = model, layout, device, mask_dtype
        self.batch, self.program = batch, program
        self.fwd_extra = fwd_extra
        self.want_hidden = want_hidden
        self.cache_kw = models.cache_kwarg(model)  # 'cache' from transformers 5.24, else 'past_key_values'
        self.cache = DynamicCache() if cache is None else cache  # every layer full: windows go through masks
        self.slots = SlotCache(self.cache, batch, device)
        self.compile_seconds = 0.0
        self._start = 0

    def prefill(self, input_ids, attn, pos):
        b, plen = input_ids.shape
        causal = torch.ones(plen, plen, dtype=torch.bool, device=self.device).tril()
        masks = attention_masks(
            self.layout, self.slots.valid, self.slots.pos, pos, attn, causal.expand(b, -1, -1), self.mask_dtype
        )
        logits, hidden = run_model(
            self.model, self.want_hidden, last_only=True, cache_kw=self.cache_kw, input_ids=input_ids,
            attention_mask=masks, position_ids=pos, past_key_values=self.cache, use_cache=True, **self.fwd_extra,
        )
        self.slots.append(attn, pos)
        return logits[:, -1, :].float(), hidden

    def verify(self, packed, q_pos, fed=None):
        if fed is not None:  # deferred draft tokens (SpeculativeAdapter.deferred_tokens): nodes 1..m on the device
            m = min(fed.shape[1], packed.tokens.shape[1] - 1)
            packed.tokens[:, 1 : 1 + m] = fed[:, :m]
        masks = attention_masks(
            self.layout, self.slots.valid, self.slots.pos, q_pos, packed.valid, packed.ancestors, self.mask_dtype
        )
        self._start = self.slots.length
        logits, hidden = run_model(
            self.model, self.want_hidden, cache_kw=self.cache_kw, input_ids=packed.tokens, attention_mask=masks,
            position_ids=q_pos, past_key_values=self.cache, use_cache=True,
        )
        self.slots.append(packed.valid, q_pos)
        return logits, logits.argmax(-1), hidden

    def commit(self, paths: list) -> None:
        keep = max((len(p) for p in paths), default=0)
        if not keep:
            return
        appended = self.slots.length - self._start
        if keep == appended and all(p == list(range(appended)) for p in paths if p):
            # every row kept all it appended, in order (e.g. single-token steps): nothing to move. Layer-level
            # methods rely on this: a layer that skipped the step holds fewer slots than the engine recorded.
            self.slots.drop_rows_of_step(self._start, [not p for p in paths])
            return
        batch = len(paths)
        index = torch.zeros(batch, keep, dtype=torch.long)
        keep_valid = torch.zeros(batch, keep, dtype=torch.bool)
        for b, p in enumerate(paths):
            if p:
                index[b, : len(p)] = torch.tensor(p)
                keep_valid[b, : len(p)] = True
        self.slots.keep(self._start, index.to(self.device), keep_valid.to(self.device))

    def device_inputs(self, packed):
        """The last verify's trees on the device (``tokens``, ``ancestors``): pack() put them there."""
        return packed

    def step_context(self, state, trees: list):
        """Around a verify: the program's buffers (at this step's width) filled, its layer edits active."""
        if self.program is None:
            return contextlib.nullcontext()
        bufs = self.program.buffers(self.batch, max(len(t) for t in trees), self.device)
        return capture.step(self.program, bufs, state, trees)

    def nbytes(self) -> int:
        return self.slots.nbytes()

    def close(self) -> None:
        pass


class _SlotBufferLayer(CacheLayerMixin):
    """One layer's preallocated KV: writes the forward's keys/values at the slots ``owner.write_idx`` and
    returns the whole buffer (attention is restricted by the engine's mask)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "_Workspace"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, dk = key_states.shape
        n = self.owner.max_slots
        self.keys = torch.zeros(b, h, n, dk, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(b, h, n, value_states.shape[-1], dtype=value_states.dtype, device=key_states.device)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        idx = self.owner.write_idx
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs):
        return self.owner.max_slots, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0  # positions and masks are always given explicitly; nothing may depend on this

    def get_max_length(self) -> int:
        return self.owner.max_slots

    def get_max_cache_shape(self) -> int:
        return self.owner.max_slots


class _Width:
    """One verify width of a workspace: the step's input buffers and its captured graphs."""

    def __init__(self, batch: int, n: int, device):
        self.n = n
        self.tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.q_pos = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.q_visible = torch.zeros(batch, n, n, dtype=torch.bool, device=device)
        self.region = torch.zeros(n, dtype=torch.long, device=device)
        self.src = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.verify_graph = self.compact_graph = None
        self.verify_out = None
        # host side, reused by every step (pinned on a GPU: the copies into the buffers above are asynchronous; a
        # step's one device read, after its forward, comes after them, so the next step may rewrite these)
        pin = device.type == "cuda"
        self.host = PackBuffers(batch, n, pin=pin)  # what pack() writes
        self.region_host = torch.zeros(n, dtype=torch.long)
        self.src_host = torch.zeros(batch, n, dtype=torch.long)
        if pin:
            self.region_host, self.src_host = self.region_host.pin_memory(), self.src_host.pin_memory()
        self.region_np, self.src_np = self.region_host.numpy(), self.src_host.numpy()


def _per_width(name: str):
    return property(lambda self: getattr(self.cur, name), lambda self, v: setattr(self.cur, name, v))


class _Workspace:
    """Device buffers of the static engine for one (model, batch, node budget, slot count, dtype): the KV
    buffers, and per verify width (<= the node budget, see ``use``) the step's input buffers and captured CUDA graphs.
    It holds no request state: each request rewrites the slot tables it reads, and slots a request has not written
    are never visible to it. A workspace serves one request at a time (``in_use``); it is kept for the next request of the same shape
    so that graph capture (and compilation) is paid once, like transformers' own reused static cache."""

    def __init__(self, model, layout, batch: int, nodes: int, max_slots: int, device, mask_dtype, compiled,
                 want_hidden: bool = False, program=None, kv=None):
        """``kv``: a KV method with ``engine_cache(workspace)`` (DuoAttention): its cache replaces the plain slot
        buffers; it compacts (``compact(src, region, n_keep)``), defragments and resets itself per request."""
        self.model_ref = weakref.ref(model)
        # the adapter's step program (engine/capture.py) and its buffers: part of what the graphs read
        self.program = program
        self.step_bufs = program.buffers(batch, nodes, device) if program is not None else None
        self.want_hidden = want_hidden
        self.cache_kw = models.cache_kwarg(model)  # a constant argument of the compiled step
        self.layout, self.batch, self.nodes, self.max_slots = layout, batch, nodes, max_slots
        self.device, self.mask_dtype, self.compiled = device, mask_dtype, compiled
        n_layers = model.config.get_text_config().num_hidden_layers
        self.prefilling = False  # True during a request's prefill forward (a KV method's cache reads it)
        self.n_keep = torch.zeros(batch, dtype=torch.long, device=device)  # each row's accepted path length
        self.kv_key = kv.engine_key() if kv is not None else None
        self.cache = kv.engine_cache(self) if kv is not None else Cache(
            layers=[_SlotBufferLayer(self) for _ in range(n_layers)])
        self.slot_valid = torch.zeros(batch, max_slots, dtype=torch.bool, device=device)
        self.slot_pos = torch.zeros(batch, max_slots, dtype=torch.long, device=device)
        self.widths: dict = {}  # verify width -> _Width (its inputs and graphs); the KV and slot tables are shared
        self.sampling = {}  # engine/sampling.py's captured processing + draw steps for this workspace's logits
        self.plans: dict = {}  # engine/plans.py's PlanSets (layer plans' buffers and graphs), by plan key
        self._weight_bytes = None  # weight_bytes()
        self.use(nodes)
        self.in_use = False

    # the verify step's inputs and graphs are those of the current width (``use``)
    tokens = _per_width("tokens")
    q_pos = _per_width("q_pos")
    q_visible = _per_width("q_visible")
    region = _per_width("region")
    src = _per_width("src")
    verify_graph = _per_width("verify_graph")
    compact_graph = _per_width("compact_graph")
    verify_out = _per_width("verify_out")

    def use(self, n: int, chunk: bool = False) -> None:
        """Make width ``n`` (<= the node budget) the current verify width: one set of inputs and graphs per width,
        all on the same KV buffers and slot tables, so a request may switch widths between steps. ``chunk``: a
        prefill chunk, which may be wider (StaticBackend._chunk_width; its slots checked by the backend)."""
        if n > self.nodes and not chunk:
            raise RuntimeError(f"a verify of {n} nodes exceeds the static node budget {self.nodes}")
        w = self.width(n)
        self.cur = w
        self.write_idx = w.region

    def width(self, n: int) -> _Width:
        """Width ``n``'s buffers (made on first use), without making it the current one."""
        w = self.widths.get(n)
        if w is None:
            w = self.widths[n] = _Width(self.batch, n, self.device)
        return w

    def weight_bytes(self) -> int:
        """The bytes of the model's weights (what every forward reads once)."""
        if self._weight_bytes is None:
            self._weight_bytes = sum(p.numel() * p.element_size() for p in self.model_ref().parameters())
        return self._weight_bytes

    def forward(self, tokens, q_pos, q_visible, region, extra=None, last_only=False):
        return _forward(
            self.model_ref(), self.cache, self.layout, self.mask_dtype, self.slot_valid, self.slot_pos, tokens, q_pos,
            q_visible, region, self.want_hidden, last_only, self.cache_kw, **(extra or {}),
        )

    def verify_step(self, fn=None):
        return (fn or _verify)(
            self.model_ref(), self.cache, self.layout, self.mask_dtype, self.slot_valid, self.slot_pos, self.tokens,
            self.q_pos, self.q_visible, self.region, self.want_hidden, self.cache_kw,
        )

    def compact_step(self):
        src = self.src
        if self.kv_key is not None:
            self.cache.compact(src, self.region, self.n_keep)
            return
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values):
                kept = t.gather(2, src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
                t.index_copy_(2, self.region, kept)

    def capture(self) -> None:
        """Capture the verify step (mask build, forward, argmax) and the compaction as CUDA graphs. The
        static inputs must hold a real step's values (the warm-up runs write only the scratch region)."""
        program_key = self.program.key() if self.program is not None else None
        if self.kv_key is not None:  # its own code object: traced under the KV method's attention and cache
            program_key = (program_key, self.kv_key)
        fn = _compiled_verify(self.compiled, self.cur.n, program_key) if self.compiled is not None else None
        self.verify_graph, self.verify_out = capture.record(lambda: self.verify_step(fn), self.device,
                                                            warmup=3 if fn is not None else 2)
        self.capture_compact()

    def capture_compact(self) -> None:
        """Capture the compaction as a CUDA graph (also done by :meth:`capture`; layer plans, engine/plans.py,
        capture their own forwards and only this)."""
        saved, saved_keep = self.src.clone(), self.n_keep.clone()
        self.src.copy_(self.region[None, :].expand(self.batch, -1))  # identity: the warm-up changes nothing
        self.n_keep.zero_()  # (a KV method's rings append nothing)
        pool = self.verify_graph.pool() if self.verify_graph is not None else None
        self.compact_graph, _ = capture.record(self.compact_step, self.device, warmup=1, pool=pool)
        self.src.copy_(saved)
        self.n_keep.copy_(saved_keep)


def _forward(model, cache, layout, mask_dtype, slot_valid, slot_pos, tokens, q_pos, q_visible, region,
             want_hidden=False, last_only=False, cache_kw="past_key_values", **extra):
    masks = static_attention_masks(layout, slot_valid, slot_pos, q_pos, q_visible, region, mask_dtype)
    return run_model(
        model, want_hidden, last_only, cache_kw, input_ids=tokens, attention_mask=masks, position_ids=q_pos,
        past_key_values=cache, use_cache=True, **extra,
    )


def _verify(model, cache, layout, mask_dtype, slot_valid, slot_pos, tokens, q_pos, q_visible, region,
            want_hidden=False, cache_kw="past_key_values"):
    """Mask build + verify forward + argmax: the unit that is compiled and captured."""
    logits, hidden = _forward(
        model, cache, layout, mask_dtype, slot_valid, slot_pos, tokens, q_pos, q_visible, region, want_hidden,
        False, cache_kw,
    )
    return logits, logits.argmax(-1), hidden


# (compile options, width, program key) -> torch.compile(_verify); compiled code, shared by every workspace of the
# same shapes and step program
_COMPILED: dict = {}
_PROGRAM_TAGS: dict = {}  # program key -> a small int naming its code object


def _compiled_verify(options: tuple, width: int | None = None, program_key=None):
    """The compiled verify step. Each verify width gets its own copy of the function (its own code object), so that
    the widths of the budget chooser (engine/budget.py) don't share dynamo's recompile limit (it is per code object).

    Each step program (engine/capture.py) gets its own copy too: its layer edits run as forward hooks, and dynamo
    does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``), so code traced without the
    hooks (another method's workspace of the same width) would be replayed without the edits, silently (seen on an
    H200: hidden transfer's drafts fell from 2.0 to 1.1 tokens per forward). A program's copy is first traced inside
    its step context, with its hooks in place."""
    key = (options, width, program_key)
    fn = _COMPILED.get(key)
    if fn is None:
        if width is None and program_key is None:
            fn = torch.compile(_verify, dynamic=False, **compile_kwargs(options))
        else:
            tag = "" if program_key is None else f"_p{_PROGRAM_TAGS.setdefault(program_key, len(_PROGRAM_TAGS))}"
            fn = compiled_copy(_verify, options, f"_verify_w{width}{tag}")
        _COMPILED[key] = fn
    return fn


def compiled_copy(fn, options: tuple, name: str):
    """``torch.compile`` of a copy of ``fn`` with its own code object (named ``name``; closure and defaults kept):
    dynamo caches compiled code per code object and does not guard on everything a step's context changes (module
    hooks, the layer control of engine/layers.py), so a step traced under one context must not be found again by a
    call under another. Each copy also has its own recompile limit."""
    code = fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, dynamic=False, **compile_kwargs(options))


def compile_options(compile_config) -> tuple:
    """torch.compile options for the verify step from a transformers CompileConfig (None: the defaults).
    The mode is not passed on: the engine captures its own CUDA graph around the compiled step."""
    opts = {"fullgraph": False, "backend": "inductor"}
    if compile_config is not None:
        opts.update(fullgraph=compile_config.fullgraph, backend=compile_config.backend)
        if getattr(compile_config, "options", None):
            opts["options"] = compile_config.options
    return tuple(sorted((k, v if not isinstance(v, dict) else tuple(sorted(v.items()))) for k, v in opts.items()))


def compile_kwargs(options: tuple) -> dict:
    """``torch.compile`` keyword arguments from :func:`compile_options`' hashable form."""
    return {k: (dict(v) if k == "options" else v) for k, v in options}


# model -> {shape key: workspace}, least recently used first; buffers and graphs only (see _Workspace). At most
# _KEEP per model and _KEEP_BYTES of KV buffers: a benchmark interleaves several +static methods per prompt (each its own
# key: node budget, hidden states, step program), and evicting in a cycle shorter than the methods' would re-capture
# every graph on every call.
_WORKSPACES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_KEEP = 16
_KEEP_BYTES = 4 << 30


def release_workspaces(model=None) -> None:
    """Free the static engine's cached buffers and graphs (of one model, or all): workspaces with their layer plans,
    and static followers' slots (engine/follower.py)."""
    if model is None:
        _WORKSPACES.clear()
    else:
        _WORKSPACES.pop(model, None)


_LOCK = threading.Lock()


def _weights_fingerprint(model) -> tuple:
    """Where the weights live: captured graphs read those addresses, so new tensors mean new graphs."""
    return tuple(p.data_ptr() for p in model.parameters())


def _acquire(model, layout, batch, nodes, max_slots, device, mask_dtype, compiled, reuse: bool,
             want_hidden: bool = False, program=None, kv=None) -> _Workspace:
    with _LOCK:
        return _acquire_locked(model, layout, batch, nodes, max_slots, device, mask_dtype, compiled, reuse,
                               want_hidden, program, kv)


def _acquire_locked(model, layout, batch, nodes, max_slots, device, mask_dtype, compiled, reuse, want_hidden,
                    program=None, kv=None):
    key = (batch, nodes, max_slots, str(mask_dtype), str(device), compiled,
           tuple(sorted(layout.kinds.items(), key=str)), layout.mode, want_hidden,
           program.key() if program is not None else None,  # a graph reads the program's part: never share it
           kv.engine_key() if kv is not None else None)  # nor a KV method's cache (pattern, window)
    if reuse:
        fp = _weights_fingerprint(model)
        if _WORKSPACES.get(model, {}).get("__weights__") != fp:  # weights replaced since: drop stale graphs
            _WORKSPACES[model] = {"__weights__": fp}
    pool = _WORKSPACES.setdefault(model, {}) if reuse else {}
    ws = _free(pool, key)
    if ws is None:  # a free workspace with more slots serves too (no new capture / compilation)
        bigger = [(k, w) for k, w in pool.items() if k != "__weights__" and not w.in_use and k[:2] == key[:2]
                  and k[3:] == key[3:] and w.max_slots > max_slots]
        hit = min(bigger, key=lambda kw: kw[1].max_slots) if bigger else None
        ws = hit[1] if hit else None
        if hit:
            pool[hit[0]] = pool.pop(hit[0])  # most recently used
    if ws is None:
        ws = _Workspace(model, layout, batch, nodes, max_slots, device, mask_dtype, compiled, want_hidden, program,
                        kv)
        if reuse:
            _store(pool, key, ws)
    ws.in_use = True
    return ws


def _free(pool: dict, key):
    """The free pooled entry of ``key`` or of one of its copies (most recently used first), moved to the end of the
    LRU order; None if every one is in use."""
    for k in [key] + [k for k in pool if type(k) is tuple and len(k) == 3 and k[0] == "copy" and k[1] == key]:
        w = pool.get(k)
        if w is not None and not w.in_use:
            pool[k] = pool.pop(k)  # most recently used
            return w
    return None


def _store(pool: dict, key, entry) -> None:
    """Keep ``entry`` under ``key``, or under a copy of it while ``key``'s is in use (requests of the same shape at
    once, from several threads: each finds its own again), then evict."""
    k, n = key, 1
    while k in pool:
        k, n = ("copy", key, n), n + 1
    pool[k] = entry
    _evict(pool, keep=entry)


def acquire_pooled(model, key: tuple, make):
    """A free entry of ``model``'s pool under ``key`` (anything with ``in_use`` and a transformers ``cache``, e.g. a
    static follower's slots and graphs, engine/follower.py), else ``make()`` (kept for later requests), marked in
    use: as the static workspaces, one request at a time, least recently used evicted, dropped
    when the model's weights are replaced. ``key`` must not start with an int (the workspaces' keys do)."""
    with _LOCK:
        fp = _weights_fingerprint(model)
        if _WORKSPACES.get(model, {}).get("__weights__") != fp:  # weights replaced since: drop stale graphs
            _WORKSPACES[model] = {"__weights__": fp}
        pool = _WORKSPACES[model]
        entry = _free(pool, key)
        if entry is None:
            entry = make()
            _store(pool, key, entry)
        entry.in_use = True
        return entry


def _evict(pool: dict, keep) -> None:
    """Drop least recently used workspaces (free ones first) while the pool holds more than _KEEP or more than
    _KEEP_BYTES of KV buffers; ``keep`` (the one just made) stays."""
    while True:
        entries = [(k, w) for k, w in pool.items() if k != "__weights__"]
        total = sum(cache_nbytes(w.cache) for _, w in entries)
        if len(entries) <= _KEEP and total <= _KEEP_BYTES:
            return
        victims = [k for k, w in entries if w is not keep and not w.in_use] or [k for k, w in entries if w is not keep]
        if not victims:
            return
        pool.pop(victims[0])


#: chunked prefill through the verify step (StaticBackend._prefill_chunked): None (default) where the verify step is a
#: captured CUDA graph; True: also on the eager static engine, whatever the width and chunk count (tests run the
#: chunked path on CPU with it); False: never (one eager forward)
PREFILL_CHUNKS = None
#: the narrowest verify width and the most chunks a graphed prefill uses (else one eager forward; each chunk reads
#: every weight once, so many narrow chunks cost more than one eager forward)
PREFILL_MIN_WIDTH = 8
PREFILL_MAX_CHUNKS = 32
#: the chunk width when the node budget is narrower than PREFILL_MIN_WIDTH (layer plans: 1; M2R2 self_spec: k + 1):
#: the plain verify step at this width, captured once per workspace for the prefill alone. The eager prefill it
#: replaces cost LoRA-Drop 25-135 ms of a 0.26-0.39 s request on the H200 (128 tokens; ADED's chunked one 4-20 ms,
#: benchmarks/results/h200-bf16-cell-g1-2026-12-02-r6). Width 16 is ADED's usual one (compiled code shared in-process).
PREFILL_NARROW_WIDTH = 16
#: and at most this many weight bytes read by the chunks together (chunks x the model's weights): a large model's
#: eager prefill is bound by the device, not by the host's dispatch, and chunks would read its weights many times
#: (64 GiB: ~15 ms of an H200's memory bandwidth, a fraction of the ~40-60 ms an eager forward costs the host there;
#: the 135M default model gets the full PREFILL_MAX_CHUNKS, a 7B model in bf16 4 chunks)
PREFILL_MAX_WEIGHT_BYTES = 64 << 30
#: a KV method's prefill (its cache's own eager path, StaticBackend._prefill_kv) runs the prompt in chunks of queries
#: with at most this many (rows x queries x slots) mask entries each: the 4D mask and the attention's per-query views
#: are built per chunk (at 8k context one forward built ~0.5 GiB of them on the default model, more than its weights)
KV_PREFILL_ENTRIES = 1 << 24


class StaticBackend:
    """Per-request side of the static engine: the slot tables (host mirrors) and ``start``; the buffers and
    graphs live in a :class:`_Workspace`."""

    MIN_SLOTS = 512  # slot counts are rounded up to a power of two (>= this): few shapes, few compilations

    def __init__(self, model, layout, batch: int, device, mask_dtype, max_length: int, nodes: int,
                 use_graphs: bool, fwd_extra: dict, compiled=None, want_hidden: bool = False, program=None, kv=None):
        """``compiled``: torch.compile options (``compile_options(...)``) or None for no compilation;
        ``program``: the adapter's :class:`~hf_accel.engine.capture.StepProgram` (None: none); ``kv``: a KV method
        whose ``engine_cache`` holds the KV (DuoAttention), None: plain slot buffers."""
        self.device, self.nodes, self.batch = device, nodes, batch
        self.fwd_extra, self.program = fwd_extra, program
        self.use_graphs = use_graphs and capture.graphs_supported(device)
        need = max_length + nodes + 1
        slots = max(self.MIN_SLOTS, 1 << (need - 1).bit_length()) if self.use_graphs else need
        if self.use_graphs and kv is not None:  # a KV method saves memory: its slot count grows by MIN_SLOTS steps
            slots = -(-need // self.MIN_SLOTS) * self.MIN_SLOTS
        self.ws = _acquire(model, layout, batch, nodes, slots, device, mask_dtype,
                           compiled if self.use_graphs else None, reuse=self.use_graphs, want_hidden=want_hidden,
                           program=program, kv=kv)
        self.kv = kv
        self.max_slots = slots = self.ws.max_slots
        self.start = 0
        # host mirrors of the slot tables, copied in each step (pinned on a GPU: asynchronous copies; they are only
        # changed after the step's device read, which the copies precede) and their numpy views
        self.valid = torch.zeros(batch, slots, dtype=torch.bool)
        self.pos = torch.zeros(batch, slots, dtype=torch.long)
        if device.type == "cuda":
            self.valid, self.pos = self.valid.pin_memory(), self.pos.pin_memory()
        self._valid_np, self._pos_np = self.valid.numpy(), self.pos.numpy()
        self.compile_seconds = 0.0
        self.defrags = 0
        self._arange = np.arange(nodes)
        self.step = None  # a layer plan's step (engine/plans.py), run in place of the plain verify forward
        self.plans = None
        self.width = nodes  # the last verify's width (the node budget, or a smaller width the budget chooser picked)
        self.prefill_chunks = 0  # the prompt's chunks through the verify step (0: one eager forward)

    def close(self) -> None:
        self.ws.in_use = False

    def prefill(self, input_ids, attn, pos, chunks: bool = True):
        """The prompt's forward -> (logits of its last position (B, V) float32, hidden (B, P, H) or None). Through
        the verify step in chunks of the node budget's width (:meth:`_prefill_chunked`) where that applies
        (``chunks``: the adapter allows it, i.e. runs no layer plans; :meth:`_chunk_count`), else one eager
        forward. ``prefill_chunks`` says which ran (0: the eager forward)."""
        ws = self.ws
        b, plen = input_ids.shape
        if plen + self.nodes > self.max_slots:
            raise RuntimeError("static cache smaller than the prompt")  # max_length >= prompt length in HF
        w = self._chunk_width()
        self.prefill_chunks = self._chunk_count(plen, w) if chunks else 0
        if self.prefill_chunks:
            return self._prefill_chunked(input_ids, attn, pos, self.prefill_chunks, w)
        self.pos[:, :plen] = pos.cpu()
        ws.slot_pos.copy_(self.pos)
        ws.slot_valid.zero_()
        # one eager forward; a KV method's cache (its own prefill path) takes the prompt in chunks of queries
        step = max(1, KV_PREFILL_ENTRIES // (b * self.max_slots)) if self.kv is not None else plen
        if self.kv is not None:
            ws.cache.reset_request()  # a reused workspace: the KV method's rings start empty
            ws.prefilling = True
        hiddens = []
        try:
            for s in range(0, plen, step):
                e = min(plen, s + step)
                if s:  # the earlier chunks' real tokens are cached slots now
                    ws.slot_valid[:, :s].copy_(attn[:, :s])
                region = ws.write_idx = torch.arange(s, e, device=self.device)
                causal = torch.ones(e - s, e - s, dtype=torch.bool, device=self.device).tril()
                logits, hidden = ws.forward(input_ids[:, s:e], pos[:, s:e], causal[None] & attn[:, None, s:e], region,
                                            self.fwd_extra, last_only=True)
                if hidden is not None:
                    hiddens.append(hidden)
        finally:
            ws.write_idx = ws.region
            ws.prefilling = False
        self.valid[:, :plen] = attn.cpu()
        self.start = plen
        return logits[:, -1, :].float(), (torch.cat(hiddens, 1) if hiddens else None)

    def _chunk_width(self) -> int:
        """The prefill's chunk width: the node budget, or PREFILL_NARROW_WIDTH when the budget is narrower than
        PREFILL_MIN_WIDTH and no step program runs (a program's buffers are the budget's width)."""
        if self.nodes >= PREFILL_MIN_WIDTH or self.program is not None:
            return self.nodes
        return PREFILL_NARROW_WIDTH

    def _chunk_count(self, plen: int, w: int | None = None) -> int:
        """How many verify-width chunks the prompt is prefilled in (0: one eager forward instead). Chunks run where
        the verify step is a captured graph (or ``PREFILL_CHUNKS`` is True), the width is at least
        ``PREFILL_MIN_WIDTH``, the prompt needs at most ``PREFILL_MAX_CHUNKS`` of them and they read at most
        ``PREFILL_MAX_WEIGHT_BYTES`` of weights together (each chunk reads every weight once: many narrow chunks, or
        a few of a large model, cost more than one forward; one chunk always pays), there is no KV method (its cache
        has its own prefill), and the step program (if any) can be made to change nothing (``neutral``). ``w``: the
        chunk width (:meth:`_chunk_width`; a layer-plan method's prompt runs through the plain verify step, every
        layer, before its plans start)."""
        forced = PREFILL_CHUNKS is True
        if PREFILL_CHUNKS is False or not (self.use_graphs or forced):
            return 0
        if self.kv is not None or self.step is not None:
            return 0
        w = w or self.nodes
        n = -(-plen // w)
        if n * w > self.max_slots:  # a chunk wider than the node budget could run past the slots
            return 0
        if not forced and n > 1 and (w < PREFILL_MIN_WIDTH or n > PREFILL_MAX_CHUNKS
                                     or n * self.ws.weight_bytes() > PREFILL_MAX_WEIGHT_BYTES):
            return 0
        if self.program is not None and not self.program.neutral(self.ws.step_bufs):
            return 0  # (the last check: neutral() writes the program's buffers)
        return n

    def _prefill_chunked(self, input_ids, attn, pos, n_chunks: int, w: int | None = None):
        """The prompt through the verify step (its captured graph on a GPU, captured here on first use) in
        ``n_chunks`` chunks of W = ``w`` (the node budget's width, or :meth:`_chunk_width`'s): chunk j holds the padded prompt's columns [jW, jW + W)
        (the last one padded at its end with invalid columns), written at the slots of the same numbers as the eager
        prefill writes them. Each chunk is a causal chain over its valid columns, after every valid slot before it;
        an invalid column sees only itself (its KV stays invalid). Every input is written on the device (no host
        buffer is rewritten while an earlier chunk's copy may still be queued); the step program's buffers hold
        its neutral values. Leaves the slot tables as the eager prefill does."""
        ws, w, dev = self.ws, w or self.nodes, self.device
        b, plen = input_ids.shape
        total = n_chunks * w
        tail = total - plen
        tokens = torch.nn.functional.pad(input_ids, (0, tail))  # padding columns: token 0, position 0, invalid
        q_pos = torch.nn.functional.pad(pos, (0, tail))
        valid = torch.nn.functional.pad(attn.long(), (0, tail)).bool()
        causal = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(w, dtype=torch.bool, device=dev)
        chunks = valid.view(b, n_chunks, w).transpose(0, 1)  # (n, B, W)
        visible = (causal & chunks[:, :, None, :]) | eye  # (n, B, W, W)
        regions = torch.arange(total, device=dev).view(n_chunks, w)
        self.pos[:, :plen] = pos.cpu()
        ws.slot_pos.copy_(self.pos)  # the padding columns' positions (0) are the host mirror's there
        ws.slot_valid.zero_()
        ws.use(w, chunk=True)
        self.width = w
        live = self.program is not None and not (self.use_graphs and ws.verify_graph is not None)
        edits = capture.layer_edits(self.program.edits(ws.step_bufs)) if live else contextlib.nullcontext()
        hiddens = []
        with edits:
            for j in range(n_chunks):
                if j:  # the previous chunk's valid columns are now cached slots
                    ws.slot_valid[:, (j - 1) * w : j * w].copy_(chunks[j - 1])
                ws.region.copy_(regions[j])
                ws.tokens.copy_(tokens[:, j * w : (j + 1) * w])
                ws.q_pos.copy_(q_pos[:, j * w : (j + 1) * w])
                ws.q_visible.copy_(visible[j])
                logits, _, hidden = self._run_verify()
                if hidden is not None:  # the graph's output buffer is rewritten by the next replay: copies
                    hiddens.append(hidden[:, : min(w, plen - j * w)].clone())
        last = logits[:, plen - 1 - (n_chunks - 1) * w, :].to(torch.float32, copy=True)
        self.valid[:, :plen] = attn.cpu()
        self.start = plen
        return last, torch.cat(hiddens, 1) if hiddens else None

    def prompt_kv(self, n_layers: int):
        """Right after :meth:`prefill`: the prompt's KV of the first ``n_layers`` layers as ([(keys, values)] (B, H,
        slots, D) buffers, valid, pos), the prompt at slots [0, plen) with ``valid``/``pos`` (B, plen) host copies; None
        when a KV method owns the cache (a follower of the same lower layers adopts it: ``Follower.adopt``)."""
        layers = self.ws.cache.layers[:n_layers] if self.kv is None else []
        if not layers or not all(isinstance(x, _SlotBufferLayer) and x.is_initialized for x in layers):
            return None
        n = self.start
        return [(x.keys, x.values) for x in layers], self.valid[:, :n].clone(), self.pos[:, :n].clone()

    def pack_buffers(self, n: int) -> PackBuffers:
        """The host buffers :func:`~hf_accel.engine.tree.pack` fills for a verify of width ``n`` (reused, pinned on
        a GPU)."""
        return self.ws.width(n).host

    def verify(self, packed, q_pos, fed=None):
        ws, n = self.ws, packed.tokens.shape[1]
        if n > self.nodes:
            raise RuntimeError(f"a draft of {n} nodes exceeds the static node budget {self.nodes}")
        ws.use(n)  # pack() pads to the width: the node budget, or the budget chooser's bucket
        self.width = n
        if self.start + n > self.max_slots:
            self._defragment()
        s = self.start
        cur = ws.cur
        qp = q_pos.cpu() if q_pos.device.type != "cpu" else q_pos
        self._pos_np[:, s : s + n] = qp.numpy()
        self._valid_np[:, s : s + n] = False
        np.add(self._arange[:n], s, out=cur.region_np)
        ws.region.copy_(cur.region_host, non_blocking=True)
        ws.tokens.copy_(packed.tokens, non_blocking=True)
        if fed is not None:  # deferred draft tokens: nodes 1..m, device to device behind the copy above
            m = min(fed.shape[1], n - 1)
            ws.tokens[:, 1 : 1 + m].copy_(fed[:, :m])
        ws.q_pos.copy_(qp, non_blocking=True)
        ws.q_visible.copy_(packed.ancestors, non_blocking=True)
        ws.slot_valid.copy_(self.valid, non_blocking=True)
        ws.slot_pos.copy_(self.pos, non_blocking=True)
        if self.step is not None:
            return self.step(self)
        return self._run_verify()

    def _run_verify(self):
        """The plain verify step of the current width over the inputs just written: its CUDA graph (captured on
        first use) replayed, or the eager step."""
        ws = self.ws
        if self.use_graphs:
            if ws.verify_graph is None:
                t = clock(self.device)
                ws.capture()
                self.compile_seconds += clock(self.device) - t
            ws.verify_graph.replay()
            return ws.verify_out
        return ws.verify_step()

    def device_inputs(self, packed):
        """The last verify's trees on the device (``tokens``, ``ancestors``): the workspace's input buffers of the
        current width, which the verify's host->device copies filled (queued work reading them runs after those)."""
        return types.SimpleNamespace(tokens=self.ws.tokens, ancestors=self.ws.q_visible)

    def step_context(self, state, trees: list):
        """Around a verify: the workspace's program buffers filled; its layer edits active unless the step is
        already captured (the graph replays them)."""
        ws = self.ws
        if self.program is None:
            return contextlib.nullcontext()
        # this request's program: the workspace's was keyed equal (same part, same constants), so the graph
        # captured with it reads what this one would
        return capture.step(self.program, ws.step_bufs, state, trees,
                            live=not (self.use_graphs and ws.verify_graph is not None))

    def commit(self, paths: list) -> None:
        s, width = self.start, self.width
        keep = max((len(p) for p in paths), default=0)
        if keep:
            rows, offs, flat = [], [], []  # per kept node: its row, its place in the row's path, its node
            for b, p in enumerate(paths):
                k = len(p)
                rows += [b] * k
                offs += range(k)
                flat += p
            moved = flat != offs  # else every kept slot is already in place
            if self.kv is not None:  # a KV method's rings append every accepted path
                self.ws.n_keep.copy_(torch.tensor([len(p) for p in paths]), non_blocking=True)
                moved = True
            rows = np.array(rows)
            at = np.array(flat, dtype=np.int64)
            at += s
            offs = np.array(offs, dtype=np.int64)
            dst = offs + s
            pos, valid = self._pos_np, self._valid_np  # the host mirrors' memory: numpy, no torch dispatch
            pos[rows, dst] = pos[rows, at]  # fancy indexing reads a copy first
            valid[rows, dst] = True
            if moved:
                cur = self.ws.width(width)
                src = cur.src_np
                np.add(self._arange[:width], s, out=src[0])
                src[1:] = src[0]
                src[rows, offs] = at
                self.ws.src.copy_(cur.src_host, non_blocking=True)
                if self.use_graphs:
                    if self.ws.compact_graph is None:
                        self.ws.capture_compact()
                    self.ws.compact_graph.replay()
                else:
                    self.ws.compact_step()
        self.start = s + keep

    def _defragment(self) -> None:
        """Move each row's valid slots to the front (order kept); rows share the new ``start``."""
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)  # valid first
        idx = order.to(self.device)
        if self.kv is not None:
            self.ws.cache.defragment(idx)
        else:
            for layer in self.ws.cache.layers:
                for t in (layer.keys, layer.values):
                    t.copy_(t.gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])))
        if self.plans is not None:
            self.plans.defragment(idx)
        self.valid.copy_(self.valid.gather(1, order))  # in place: the pinned mirrors and their numpy views stay
        self.pos.copy_(self.pos.gather(1, order))
        self.start = int(self._valid_np.sum(1).max())  # the host mirror's numpy view: no tensor read
        self.defrags += 1
        if self.start + self.width > self.max_slots:
            raise RuntimeError("static cache overflow after defragmentation")

    @property
    def cache(self):
        return self.ws.cache

    def nbytes(self) -> int:
        return cache_nbytes(self.ws.cache)
