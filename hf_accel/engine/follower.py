"""A model that follows a request's committed tokens with its own KV cache and drafts greedy chains from them.

For drafters that are themselves a (partial) causal LM: M2R2's accelerated stream (the target's lower layers),
a small draft model. Each ``draft(rows, k)``:

1. catches up, in one forward, the tokens each row committed since the last call (per-row counts differ: the
   chunk is right-padded and padding slots are masked out, as in the engine's SlotCache);
2. drafts ``k`` tokens per row greedily (the first from the catch-up forward, then one forward per token);
3. drops the drafted tokens' KV again, so the cache holds exactly the committed tokens.

Masks and logical positions are built like the engine's (engine/tree.attention_masks), so padding, sliding
windows and batch > 1 behave the same. ``context`` (optional) is entered around every forward: M2R2 uses it to
route the layers through its control.

On the static engine (``static_slots=N``) the follower's KV lives in preallocated buffers of N slots (the static
engine's layer type, engine/backends._SlotBufferLayer) and every forward has a fixed shape: its width is rounded up to
a power of two (padding tokens are invalid and their slots reused), so with ``graphs=True`` (CUDA) each width is
captured as a CUDA graph (mask build, forward, head) the second time it is met, and replayed from then on, by this
request and by later ones (the slots and their graphs are pooled per model and key, see ``Follower``): the
one-token draft steps and the short catch-ups replay graphs, a one-off shape (the prompt's catch-up) runs eagerly. ``static_slots`` must cover the prompt, the generated tokens and a forward's width;
rows of a batch that commit different counts leave holes, and the slots are defragmented when they run out.

``verify_tree(rows, trees)`` is the intermediate level of a hierarchy (quant_spec): the follower checks a draft tree
in one forward (catch-up + tree attention) and returns its own greedy continuation as far as the tree agrees, plus its
next token. Inside a *section* (``open_section()`` ... ``close_section()``) a follower may be fed tokens that are not
committed yet (a draft it builds on over several rounds); closing the section drops everything after the tokens that
were committed when it opened.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from transformers import DynamicCache

from transformers.cache_utils import Cache

from .. import models
from . import backends, capture
from .backends import _SlotBufferLayer, clock, compiled_copy
from .cache import SlotCache, cache_nbytes
from .tree import attention_masks, pack, static_attention_masks
from .verify import greedy_walk

GRAPH_WIDTHS = 64  # widest forward captured as a graph (wider ones, e.g. the prompt's catch-up, run eagerly)


class StaticSlots:
    """A follower's KV on fixed buffers of ``max_slots`` slots, with SlotCache's ``valid``, ``pos``, ``length`` and
    ``keep``: slots ``[0, length)`` are written, ``valid``/``pos`` (device) say which hold a token and at which logical
    position. A forward writes its tokens at ``write_idx`` (set by the follower) and records their positions and
    validity itself (``_static_step``, inside the captured forward)."""

    def __init__(self, model, batch: int, max_slots: int, device):
        self.max_slots = max_slots
        self.write_idx = torch.zeros(1, dtype=torch.long, device=device)
        self.compile_error = None  # why its forwards' compiled step failed (then they are captured eagerly)
        n_layers = model.config.get_text_config().num_hidden_layers
        self.cache = Cache(layers=[_SlotBufferLayer(self) for _ in range(n_layers)])
        self.valid = torch.zeros(batch, max_slots, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch, max_slots, dtype=torch.long, device=device)
        self.start = 0
        self.defrags = 0
        # pooled (engine/backends.acquire_pooled): one request at a time; the captured forwards of this slot set,
        # per (width, picks shape), replayed by later requests with the same key (they read only these buffers)
        self.in_use = False
        self.graphs: dict = {}

    def reset(self) -> None:
        """A new request on these slots: nothing written (the KV buffers and graphs stay)."""
        self.valid.zero_()
        self.pos.zero_()
        self.start = 0
        self.defrags = 0

    @property
    def length(self) -> int:
        return self.start

    def keep(self, start: int, index: torch.Tensor, keep_valid: torch.Tensor) -> None:
        """As SlotCache.keep: per row, slots ``start + index[b, j]`` move to ``start + j``; ``length`` becomes
        ``start + K``."""
        k = index.shape[1]
        if k:
            src = start + index
            dst = torch.arange(start, start + k, device=index.device)
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is None:  # not written yet
                    continue
                for t in (layer.keys, layer.values):
                    t.index_copy_(2, dst, t.gather(2, src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])))
            self.pos[:, start : start + k] = self.pos.gather(1, src)
            self.valid[:, start : start + k] = keep_valid
        self.valid[:, start + k : max(self.start, start + k)] = False
        self.start = start + k

    def make_room(self, room: int) -> None:
        """Defragment when fewer than ``room`` slots are left (called where no slot index is held elsewhere: before
        a call's first forward, outside a section)."""
        if self.start + room > self.max_slots:
            self._defragment()

    def _defragment(self) -> None:
        order = torch.argsort((~self.valid).to(torch.int8), dim=1, stable=True)  # valid slots first, order kept
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                for t in (layer.keys, layer.values):
                    t.copy_(t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1])))
        self.valid.copy_(self.valid.gather(1, order))
        self.pos.copy_(self.pos.gather(1, order))
        self.start = int(self.valid.sum(1).max())
        self.defrags += 1

    def nbytes(self) -> int:
        return cache_nbytes(self.cache)


class _Graph:
    """The device inputs of a static forward of one width (captured: its graph and output). ``packed`` (B, 3W + P + 1)
    int64 holds, per row, the tokens, positions, validity (0/1) and the P query indices whose logits are read (one
    index when ``last`` is (B,): P = 0 marks that), then the first slot of the region: a forward's inputs arrive in
    one host-to-device copy. ``visible`` (B, W, W): which of the forward's tokens see which (None: causal)."""

    def __init__(self, batch, width, picks, causal, device):
        self.width = width
        w = width
        self.packed = torch.zeros(batch, 3 * w + max(picks, 1) + 1, dtype=torch.long, device=device)
        self.tokens = self.packed[:, :w]
        self.q_pos = self.packed[:, w : 2 * w]
        self.valid = self.packed[:, 2 * w : 3 * w]
        self.last = self.packed[:, 3 * w : 3 * w + picks] if picks else self.packed[:, 3 * w]
        self.start = self.packed[0, -1]
        self.visible = None if causal else torch.zeros(batch, w, w, dtype=torch.bool, device=device)
        self.lower = torch.ones(w, w, dtype=torch.bool, device=device).tril()  # causal visibility
        self.eye = torch.eye(w, dtype=torch.bool, device=device)
        self.offsets = torch.arange(w, device=device)
        self.region = torch.zeros(w, dtype=torch.long, device=device)  # the slots written: start + offsets
        self.graph = self.out = None


def static_slots_for(rows: list, generation_config, extra: int) -> int | None:
    """Slots for a follower of a request on the static engine (None when the request runs on the dynamic one):
    the prompt and every token the request may generate, plus ``extra`` (the widest draft it feeds), rounded."""
    gc = generation_config
    if gc is None or gc.cache_implementation != "static":
        return None
    longest = max(len(r.tokens) for r in rows)
    total = gc.max_length if gc.max_length is not None else longest + (gc.max_new_tokens or 20)
    need = max(total, longest + (gc.max_new_tokens or 0)) + 2 * (extra + 1)
    return max(256, 1 << (need - 1).bit_length())


def graphs_for(model, generation_config) -> bool:
    """Whether a static follower captures its forwards (as the static engine: not with disable_compile, not on an
    offloaded model, CUDA only)."""
    return (not generation_config.disable_compile and not models.is_dispatched(model)
            and capture.graphs_supported(next(model.parameters()).device))


def compile_for(generation_config) -> tuple:
    """The torch.compile options of a follower's captured forwards: the static engine's verify options."""
    return backends.compile_options(getattr(generation_config, "compile_config", None))


def _head(model, hidden, last):
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    picked = hidden[rows, last] if last.dim() == 1 else hidden[rows[:, None], last]
    return models.logits_from_hidden(model, picked).float()


def _static_step(model, layout, slots, mask_dtype, cache_kw, g: _Graph):
    """One static forward over the slots, from ``g``'s device inputs: the region's slots reserved (positions written,
    not yet valid: windows read positions), the masks, the forward and head, then the region's validity recorded.
    Every shape is fixed and nothing is read on the host: the unit that is captured (and compiled)."""
    torch.add(g.offsets, g.start, out=g.region)
    valid = g.valid.bool()
    slots.pos.index_copy_(1, g.region, g.q_pos)
    slots.valid.index_fill_(1, g.region, False)
    visible = g.lower[None] if g.visible is None else g.visible
    seen = visible & valid[:, None, :] | g.eye[None]  # padding sees itself: no NaN rows
    masks = static_attention_masks(layout, slots.valid, slots.pos, g.q_pos, seen, g.region, mask_dtype)
    hidden = models.decoder(model)(
        input_ids=g.tokens, attention_mask=masks, position_ids=g.q_pos, **{cache_kw: slots.cache}, use_cache=True,
    ).last_hidden_state
    slots.valid.index_copy_(1, g.region, valid)
    return _head(model, hidden, g.last)


class Follower:
    def __init__(self, model, batch: int, device, mask_dtype, context=None, static_slots: int | None = None,
                 graphs: bool = False, static_room: int = 0, key=None, owner=None, compiled: tuple | None = None,
                 pad_to: int = 1, picks_to: int = 1):
        """``static_slots``: run on the static layout with that many slots (None: a growing DynamicCache);
        ``graphs``: capture its forwards as CUDA graphs (static layout on a CUDA device only); ``static_room``: the
        most slots one call (or one section) may add beyond its catch-up: the slots are defragmented before a call
        when fewer are left. ``key``: what ``context`` makes the forwards read (e.g. M2R2's trained part, by identity;
        ``owner`` keeps it alive): with graphs, the static slots and their captured forwards are pooled per model
        under (batch, slots, dtype, device, key) and reused by the next request with an equal key, which then
        captures nothing (a follower with a ``context`` and no ``key`` is not pooled). :meth:`close` (or the
        follower's collection) gives them back. ``compiled``: torch.compile options (:func:`compile_for`) of the
        captured forwards (None: captured eagerly); each capture compiles its own copy of the step (under this
        follower's context, on which dynamo does not guard), and if compiling fails the pooled slots remember why
        (``slots.compile_error``) and capture eagerly from then on. ``pad_to`` (with graphs): a forward of 2 ..
        ``pad_to`` tokens (a catch-up after a verify) runs at that width (rounded up to a power of two), so those
        catch-ups are one shape that the first request captures, not a width a later request meets for the first
        time (on the H200 one such capture stalled a timed M2R2 self_spec request for 6 s). ``picks_to`` (with
        graphs): :meth:`verify_tree` reads the logits of at least that many nodes per row (the extra picks read the
        first fed token's and are ignored), so trees of different sizes share one captured forward."""
        self.model = model
        self.layout = models.attention_layout(model)
        self.last_position = models.last_position(model)  # a learned position table's last (GPT-2, OPT)
        self.mask_dtype = mask_dtype
        self.device = device
        self.static = static_slots is not None
        self.graphs = graphs and self.static and capture.graphs_supported(device)
        self.pooled = self.graphs and (context is None or key is not None)
        self._release = None
        if self.pooled:
            pool_key = ("follower", batch, static_slots, str(mask_dtype), str(device), key)
            self.slots = backends.acquire_pooled(model, pool_key,
                                                 lambda: StaticSlots(model, batch, static_slots, device))
            self.slots.reset()
            self.slots.owner = owner
            self._release = weakref.finalize(self, setattr, self.slots, "in_use", False)
        elif self.static:
            self.slots = StaticSlots(model, batch, static_slots, device)
        else:
            self.slots = SlotCache(DynamicCache(), batch, device)
        self.reused = self.pooled and bool(self.slots.graphs)  # found graphs captured by an earlier request
        self.static_room = static_room
        self._graphs: dict = self.slots.graphs if self.static else {}
        self._uses: dict = {}  # forward shape -> forwards of that shape in this request
        self._scratch: dict = {}  # forward shape -> the input buffers of its eager (not captured) forwards
        self.captures = 0  # graphs captured by this follower (this request)
        self.capture_seconds = 0.0
        self.done = [0] * batch  # tokens of each row already in the cache
        self.cache_kw = models.cache_kwarg(models.decoder(model))  # 'cache' from transformers 5.24
        self.context = context or contextlib.nullcontext
        self.compile_options = compiled if self.graphs else None
        self.pad_to = 1 << (max(1, pad_to) - 1).bit_length()
        self.picks_to = max(1, picks_to) if self.graphs else 1
        self.compiled = 0  # graphs this follower captured from a compiled step
        self.forwards = 0
        self.tokens = 0  # tokens fed, padding excluded (compute estimates)
        self._section = None  # None, or [None | (start slot, chunk lengths, done before)] while a section is open

    @property
    def compile_error(self):
        """Why this follower's forwards were captured eagerly instead of compiled (None: compiled, or not asked)."""
        return getattr(self.slots, "compile_error", None)

    def _forward(self, tokens, q_pos, q_valid, visible, last, fed=None):
        """Logits (B, V) at query index ``last[b]`` of every row, or (B, M, V) when ``last`` is (B, M). The inputs are
        host tensors (``visible`` (B, N, N) bool, or None: causal); ``fed`` (B, N) on the device, if given, replaces
        ``tokens`` (a drafted token fed back without a host read)."""
        if self.static:
            return self._static_forward(tokens, q_pos, q_valid, visible, last, fed)
        dev = self.device
        n = tokens.shape[1]
        if visible is None:
            visible = torch.ones(n, n, dtype=torch.bool).tril()[None].expand(tokens.shape[0], -1, -1)
        q_pos, q_valid = q_pos.to(dev), q_valid.to(dev)
        masks = attention_masks(self.layout, self.slots.valid, self.slots.pos, q_pos, q_valid, visible.to(dev),
                                self.mask_dtype)
        with self.context():
            hidden = models.decoder(self.model)(
                input_ids=tokens.to(dev) if fed is None else fed, attention_mask=masks, position_ids=q_pos,
                **{self.cache_kw: self.slots.cache}, use_cache=True,
            ).last_hidden_state
        self.slots.append(q_valid, q_pos)
        self.forwards += 1
        return self._head(hidden, last.to(dev))

    def _positions(self, pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Host positions of a forward's tokens, in place: the tokens no one sees (padding, finished rows) at 0, and
        under a learned position table (GPT-2, OPT) none past its last — a token there is past max_length (drafts
        near the end; the engine's pack clamps their tree nodes the same way): it only must not index past it."""
        pos.masked_fill_(~valid, 0)
        if self.last_position is not None:
            pos.clamp_(max=self.last_position)
        return pos

    def _head(self, hidden, last):
        return _head(self.model, hidden, last)

    def _static_forward(self, tokens, q_pos, q_valid, visible, last, fed):
        n = tokens.shape[1]
        width = 1 << (n - 1).bit_length()  # fixed widths: few shapes, few graphs
        if self.graphs and 1 < n <= self.pad_to:  # catch-ups of 2 .. pad_to tokens: one shape, met in every request
            width = self.pad_to
        slots, b = self.slots, tokens.shape[0]
        s = slots.start
        if s + width > slots.max_slots:
            raise RuntimeError(f"Follower: {slots.max_slots} static slots are too few for this request (a forward of "
                               f"{width} at slot {s}); the adapter sizes them with static_slots_for")
        picks = last.shape[1] if last.dim() == 2 else 0
        # the inputs on the host, padded to the width: padding tokens are invalid, seen by none, at the row's last
        # position (as the engine's tree padding sits at its root's; the callers put invalid tokens at 0): a position
        # past it could exceed a learned position table (GPT-2 at its n_positions) while the real tokens still fit
        host = torch.zeros(b, 3 * width + max(picks, 1) + 1, dtype=torch.long)
        host[:, :n] = tokens
        host[:, width : width + n] = q_pos
        host[:, width + n : 2 * width] = q_pos[:, -1:]
        host[:, 2 * width : 2 * width + n] = q_valid
        host[:, 3 * width : 3 * width + max(picks, 1)] = last if picks else last[:, None]
        host[:, -1] = s
        key = (width, picks, visible is None)
        uses = self._uses[key] = self._uses.get(key, 0) + 1
        g = self._graphs.get(key) if self.graphs and width <= GRAPH_WIDTHS else None
        # a shape met once in a request (the prompt's catch-up) runs eagerly, unless an earlier request captured it
        graphed = self.graphs and width <= GRAPH_WIDTHS and (g is not None or uses >= 2)
        fresh = g is None
        if fresh and not graphed:  # eager: this request's own input buffers of that shape
            g = self._scratch.get(key)
            if g is None:
                g = self._scratch[key] = _Graph(b, width, picks, visible is None, self.device)
        elif fresh:
            g = self._graphs[key] = _Graph(b, width, picks, visible is None, self.device)
        g.packed.copy_(host, non_blocking=True)  # the forward's one host-to-device copy (pageable: staged at once)
        if fed is not None:
            g.tokens[:, :n].copy_(fed)
        if visible is not None:
            wide = torch.zeros(b, width, width, dtype=torch.bool)
            wide[:, :n, :n] = visible
            g.visible.copy_(wide, non_blocking=True)
        slots.write_idx = g.region
        if graphed:
            if fresh:
                self._capture(g)
            g.graph.replay()
            out = g.out
        else:
            with self.context():
                out = _static_step(self.model, self.layout, slots, self.mask_dtype, self.cache_kw, g)
        slots.start = s + n  # the padding's slots are reused by the next forward
        self.forwards += 1
        return out

    def _capture(self, g: _Graph) -> None:
        dev = self.device
        t = clock(dev)
        # what the graph reads: the pooled slots' buffers, g's inputs and what the context reads (the pool key);
        # the closure holds no reference to this follower (a later request's follower replays it)
        model, layout, slots, mdt, kw, ctx = self.model, self.layout, self.slots, self.mask_dtype, self.cache_kw, \
            self.context

        def forward(step):  # the warm-up runs on the real inputs: it writes what the replay writes again
            with ctx():
                return step(model, layout, slots, mdt, kw, g)

        done = False
        if self.compile_options is not None and slots.compile_error is None:
            try:
                step = compiled_copy(_static_step, self.compile_options, f"_follower_w{g.width}")
                g.graph, g.out = capture.record(lambda: forward(step), dev, warmup=3)
                done = True
                self.compiled += 1
            except Exception as e:  # noqa: BLE001 - any compile failure: captured eagerly (and from now on)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                slots.compile_error = f"{type(e).__name__}: {e}"[:500]
        if not done:
            g.graph, g.out = capture.record(lambda: forward(_static_step), dev)
        self.captures += 1
        self.capture_seconds += clock(dev) - t

    def adopt(self, layers: list, valid: torch.Tensor, pos: torch.Tensor) -> bool:
        """Take a prompt's KV that a forward of the same weights already computed, instead of catching it up: M2R2's
        accelerated stream runs the target's own layers below its exit, so the target's prefill holds the follower's
        prompt KV for them. ``layers``: (keys, values) (B, H, >= n, D) of the follower's first ``len(layers)`` layers,
        the prompt at slots [0, n) valid and at the logical positions of ``valid`` / ``pos`` (B, n) (host tensors; a
        row's valid slots are its prompt, in order). Only a fresh static follower adopts (nothing fed yet; the
        prompt's eager catch-up is what this saves); returns whether it did (else the first draft catches up)."""
        slots, n = self.slots, valid.shape[1]
        if not self.static or slots.length or any(self.done) or self._section is not None:
            return False
        if n + 2 * (self.pad_to + self.static_room) > slots.max_slots:
            return False
        own = slots.cache.layers[: len(layers)]
        for layer, (k, v) in zip(own, layers):
            if k.dim() != 4 or k.shape[0] != valid.shape[0] or k.shape[2] < n or v.shape[2] < n:
                return False
            if getattr(layer, "is_initialized", False) and (
                    layer.keys.shape[:2] + layer.keys.shape[3:] != k.shape[:2] + k.shape[3:]
                    or layer.values.shape[3:] != v.shape[3:] or layer.keys.dtype != k.dtype):
                return False
        for layer, (k, v) in zip(own, layers):
            if not getattr(layer, "is_initialized", False):
                layer.lazy_initialization(k[:, :, :1], v[:, :, :1])
            layer.keys[:, :, :n].copy_(k[:, :, :n])
            layer.values[:, :, :n].copy_(v[:, :, :n])
        slots.valid[:, :n].copy_(valid, non_blocking=True)
        slots.pos[:, :n].copy_(pos, non_blocking=True)
        slots.start = n
        self.done = [int(c) for c in valid.sum(1).tolist()]
        return True

    def nbytes(self) -> int:
        return self.slots.nbytes()

    def close(self) -> None:
        """The request is over: pooled static slots (and their graphs) are free for the next one."""
        if self._release is not None:
            self._release()

    def _chunks(self, rows: list) -> list:
        """Each active row's tokens not yet in the cache (its root last); records where a section's committed
        tokens end when this is the section's first forward."""
        chunks = [row.tokens[self.done[b] :] if row is not None else [] for b, row in enumerate(rows)]
        if self.static and self._section is None:  # a safe point: no slot index is held across it
            pad = self.pad_to if self.graphs else 0  # a catch-up padded to pad_to tokens, then the call's own room
            self.slots.make_room(max(self.static_room + pad, 2 * max(len(c) for c in chunks) + 2))
        if any(r is not None and not c for r, c in zip(rows, chunks)):
            raise RuntimeError("Follower: a row's last token is already in the cache (rows must grow between calls)")
        if self._section is not None and self._section[0] is None:
            self._section[0] = (self.slots.length, [len(c) for c in chunks], list(self.done))
        return chunks

    def open_section(self) -> None:
        """Tokens fed from now on may be uncommitted; the first forward's catch-up (the rows' tokens as given to it)
        is what stays at ``close_section``."""
        self._section = [None]

    def close_section(self) -> None:
        """Drop every slot fed since the section's first forward except that forward's catch-up chunk without its
        last token (the root: as after ``run``, a row's last token is fed by the next call)."""
        mark, self._section = self._section[0] if self._section else None, None
        if mark is None:
            return
        start, lens, done = mark
        lens = [max(0, n - 1) for n in lens]
        width = max(lens) if lens else 0
        dev = self.device
        index = torch.arange(width, device=dev)[None].expand(len(lens), -1)
        keep = index < torch.tensor(lens, device=dev)[:, None]
        self.slots.keep(start, index.contiguous(), keep)
        self.done = [d + n for d, n in zip(done, lens)]

    def _catch_up(self, rows: list):
        """Feed each active row's tokens not yet in the cache (its root last) in one causal forward; the logits
        (B, V) after each row's root."""
        batch = len(rows)
        chunks = self._chunks(rows)
        width = max(1, max(len(c) for c in chunks))
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        pos = torch.zeros(batch, width, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for b, c in enumerate(chunks):
            if c:
                tokens[b, : len(c)] = torch.tensor(c)
                valid[b, : len(c)] = True
                last[b] = len(c) - 1
            pos[b] = self.done[b] + torch.arange(width)
        self._positions(pos, valid)
        logits = self._forward(tokens, pos, valid, None, last)
        self.tokens += sum(len(c) for c in chunks)
        for b, c in enumerate(chunks):
            self.done[b] += len(c)
        return logits

    @torch.no_grad()
    def draft(self, rows: list, k: int, read: bool = True):
        """Greedy chains of ``k`` tokens after each active row's last token (None for inactive rows); the drafted
        tokens' KV is dropped again. Each drafted token is fed back on the device (no host decision is needed: every
        active row drafts exactly ``k``), so the ``k`` forwards are queued back to back and the chains are read in
        one host transfer at the end — the same tokens :meth:`run` picks one read per row and token. ``read=False``:
        no host read at all: the chains as a (B, k) device tensor (inactive rows' entries are meaningless), for the
        engine to feed to its verify and read with its verdicts (``SpeculativeAdapter.deferred_tokens``)."""
        if not read and (k <= 0 or not any(r is not None for r in rows)):
            raise ValueError("Follower.draft(read=False) needs k >= 1 and an active row")
        if k <= 0 or not any(r is not None for r in rows):
            return self.run(rows, lambda b, logits: (int(logits.argmax()), True), k, keep=False)
        batch = len(rows)
        dev = self.device
        logits = self._catch_up(rows)
        committed = self.slots.length
        live = [r is not None for r in rows]
        drawn = [logits.argmax(-1)]  # (B,) on the device: no host read per token
        if k > 1:
            q_valid = torch.tensor(live, dtype=torch.bool)[:, None]
            q_pos = torch.tensor(self.done)[:, None] + torch.arange(k)[None]  # (B, k): draft i at done + i
            q_pos = self._positions(q_pos, q_valid.expand(-1, k).clone())
            blank, zero = torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
            for i in range(1, k):
                logits = self._forward(blank, q_pos[:, i - 1 : i], q_valid, None, zero, fed=drawn[-1][:, None])
                self.tokens += sum(live)
                drawn.append(logits.argmax(-1))
        chains = torch.stack(drawn, 1) if k > 1 else drawn[0][:, None]
        if k > 1:  # keep no drafted slot (as run(keep=False)); with k = 1 none was fed
            none = torch.zeros(batch, 0, dtype=torch.long, device=dev)
            self.slots.keep(committed, none, none.bool())
        if not read:
            return chains
        chains = chains.tolist()  # the draft's one host read
        return [chains[b] if live[b] else None for b in range(batch)]

    @torch.no_grad()
    def run(self, rows: list, choose, limit, keep: bool = True) -> list:
        """Tokens after each active row's last token (None for inactive rows), one forward per token after the
        catch-up. ``choose(b, logits (V,)) -> (token, go_on)`` picks row b's next token from this model's logits;
        a row stops after a token with ``go_on`` False or after ``limit`` tokens (an int, or one per row).
        ``keep``: the generated tokens' KV stays (they are about to be committed as they are; the last one, never
        fed, is caught up next time); else it is dropped."""
        batch = len(rows)
        limits = [limit] * batch if isinstance(limit, int) else list(limit)
        dev = self.device
        logits = self._catch_up(rows)
        committed, done_before = self.slots.length, list(self.done)
        out = [[] if r is not None else None for r in rows]
        live = [r is not None and limits[b] > 0 for b, r in enumerate(rows)]
        zero = torch.zeros(batch, dtype=torch.long)
        while True:
            feed = torch.zeros(batch, dtype=torch.long)
            for b in range(batch):
                if live[b]:
                    tok, go_on = choose(b, logits[b])
                    out[b].append(tok)
                    feed[b] = tok
                    live[b] = go_on and len(out[b]) < limits[b]
            if not any(live):
                break
            q_valid = torch.tensor(live, dtype=torch.bool)[:, None]
            q_pos = self._positions(torch.tensor(self.done)[:, None], q_valid.clone())
            logits = self._forward(feed[:, None], q_pos, q_valid, None, zero)
            self.tokens += sum(live)
            for b in range(batch):
                if live[b]:
                    self.done[b] += 1
        if not keep:  # keep no appended slot: the cache is cropped back to the committed tokens
            none = torch.zeros(batch, 0, dtype=torch.long, device=dev)
            self.slots.keep(committed, none, none.bool())
            self.done = done_before
        return out

    @torch.no_grad()
    def verify_tree(self, rows: list, trees: list) -> list:
        """Check each active row's draft tree (node 0 = the row's last token) with this model in one forward that also
        catches up. Returns, per active row, this model's greedy continuation: the tree's tokens along its greedy path,
        then its own next token (None for inactive rows). The accepted nodes' KV stays (they count as fed); the
        rejected nodes' is dropped."""
        batch = len(rows)
        chunks = self._chunks(rows)
        sizes = [len(c) + (len(trees[b]) - 1 if rows[b] is not None else 0) for b, c in enumerate(chunks)]
        width = max(1, max(sizes))
        nodes = max(1, max(len(t) for t, r in zip(trees, rows) if r is not None) if any(r is not None for r in rows) else 1)
        nodes = max(nodes, self.picks_to)  # picks past a row's tree read slot 0's logits (unused)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        pos = torch.zeros(batch, width, dtype=torch.long)
        visible = torch.zeros(batch, width, width, dtype=torch.bool)
        picks = torch.zeros(batch, nodes, dtype=torch.long)
        for b, c in enumerate(chunks):
            n0 = self.done[b]
            pos[b] = n0 + torch.arange(width)
            if rows[b] is None:
                continue
            tree, m = trees[b], len(c)
            if tree.tokens[0] != c[-1]:
                raise ValueError("a draft tree's root must be the row's last token")
            n, packed = len(tree), pack([tree], [True], 0, "cpu")  # the engine's tree tensors (depths, ancestry)
            tokens[b, :m] = torch.tensor(c)
            tokens[b, m : m - 1 + n] = packed.tokens[0, 1:]
            valid[b, : sizes[b]] = True
            pos[b, m - 1 : m - 1 + n] = n0 + m - 1 + packed.depths[0]
            visible[b, :m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
            visible[b, m:, :m] = True  # tree nodes see the whole catch-up chunk ...
            visible[b, m - 1 : m - 1 + n, m - 1 : m - 1 + n] = packed.ancestors[0]  # ... and their ancestors
            picks[b, :n] = m - 1 + torch.arange(n)
        dev = self.device
        start = self.slots.length
        self._positions(pos, valid)
        logits = self._forward(tokens, pos, valid, visible, picks)
        self.tokens += sum(sizes)
        choice = logits.argmax(-1).tolist()
        out, kept = [None] * batch, []
        for b, c in enumerate(chunks):
            if rows[b] is None:
                kept.append([])
                continue
            path, bonus = greedy_walk(trees[b], choice[b])
            path = path[1:]  # accepted nodes, root excluded
            out[b] = [trees[b].tokens[i] for i in path] + [bonus]
            kept.append(list(range(len(c))) + [len(c) - 1 + i for i in path])
            self.done[b] += len(c) + len(path)
        k = max(len(x) for x in kept)
        index = torch.zeros(batch, k, dtype=torch.long)
        keep = torch.zeros(batch, k, dtype=torch.bool)
        for b, x in enumerate(kept):
            index[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            keep[b, : len(x)] = True
        self.slots.keep(start, index.to(dev), keep.to(dev))
        return out


__all__ = ["Follower", "StaticSlots", "static_slots_for", "graphs_for"]
