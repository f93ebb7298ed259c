"""The decoding loop shared by every speculative method: draft -> verify (one forward) -> accept -> commit.

Called by transformers' ``generate`` as a ``custom_generate`` callable, after HF has prepared the inputs,
logits processors and stopping criteria, so every HF generation option that reaches those is honoured the
way vanilla generate honours it. Batch > 1 with left padding: each row accepts its own number of tokens;
per-row cache holes are tracked by :class:`~hf_accel.engine.cache.SlotCache`.

:func:`run` is a sequence of named steps:

* :func:`_backend`: the engine (StaticBackend for ``cache_implementation="static"``, else DynamicBackend, on
  the KV method's cache when one is composed) and the verify width;
* :func:`_prefill`: the prompt's forward and the first token;
* :class:`_Commits`: per-row commit state (each row's tokens, what it generated, whether it has finished, the
  score/logit rows ``output_scores``/``output_logits`` keep, stopping criteria);
* :class:`_Steps`: the draft/verify loop, one :meth:`_Steps.step` per verify forward: :meth:`_Steps.draft`
  (the adapter's trees, cut to the node budget's width), the verify forward, :meth:`_Steps.accept` (each row's
  tree walked with its verdicts, :meth:`_Steps.walk`, then committed, and the adapter told through
  ``verified``), then the backend commits the accepted nodes to the cache;
* :func:`_outputs`: the padded sequences, the run's stats, and HF's output object.

Sampling, and greedy with logits processors: every node's processed scores and its draw are computed on the
device in one batched step (engine/sampling.py; captured as a CUDA graph on the static engine) and the tree is
walked with those draws: one host read per step, as plain greedy. A processor list the device path doesn't know
runs on the host path instead (verify.process_tree_scores + verify.sample_walk); ``stats.extra["sampling_path"]``.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .. import models
from .adapter import AccelStats, Row, StepOutput
from . import budget as budgets
from .backends import DynamicBackend, StaticBackend, clock, compile_options
from .sampling import DeviceSampler, walk
from .tree import Tree, pack
from .verify import greedy_walk, process_tree_scores, row_processors, sample_walk


def _pad_id(generation_config):
    pad = getattr(generation_config, "_pad_token_tensor", None)
    if pad is None:
        pad = generation_config.pad_token_id
    if pad is None:
        return None
    if isinstance(pad, torch.Tensor):
        pad = pad.reshape(-1)[0].item()
    elif isinstance(pad, (list, tuple)):
        pad = pad[0]
    return int(pad)


def _mask_dtype(model) -> torch.dtype:
    dt = getattr(model, "dtype", torch.float32)
    return dt if dt.is_floating_point else torch.float32


def _max_length(gc, plen: int) -> int:
    return gc.max_length if gc.max_length is not None else plen + (gc.max_new_tokens or 20)


@torch.no_grad()
def run(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    accel_adapter=None,
    accel_streamer=None,
    accel_stats_sink=None,
    accel_kv=None,
    **model_kwargs,
):
    """``accel_kv``: a KV method (engine.adapter.KVMethod, e.g. DuoAttention) whose cache and attention the request
    runs on, under ``accel_adapter``'s drafts."""
    adapter = accel_adapter
    gc = generation_config
    streamer = accel_streamer
    device = input_ids.device
    batch = input_ids.shape[0]
    label = "+".join(n for n in (accel_kv.name if accel_kv is not None else "", adapter.name) if n)
    stats = AccelStats(method=label, batch_size=batch)
    t_start = clock(device)

    attn = model_kwargs.get("attention_mask")
    attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn.to(device).bool()
    static = gc.cache_implementation == "static"
    adapter.for_batch(batch)
    backend, nodes = _backend(model, gc, adapter, accel_kv, label, static, input_ids)
    scope = contextlib.ExitStack()  # the KV method's attention switch, for the whole request
    try:
        if accel_kv is not None:
            scope.enter_context(accel_kv.attention())
        steps = _prefill(model, backend, nodes, static, input_ids, attn, logits_processor, stopping_criteria, gc,
                         adapter, streamer, stats, t_start)
        steps.loop()
    finally:
        scope.close()
        backend.close()  # the static workspace is free for the next request

    if streamer is not None:
        streamer.end()
    return _outputs(steps, accel_kv, accel_stats_sink, t_start)


# ---- backend choice --------------------------------------------------------------------------------------
def _backend(model, gc, adapter, accel_kv, label: str, static: bool, input_ids):
    """The request's engine and its verify width (the static engine's node budget; None on the dynamic engine)."""
    batch, plen = input_ids.shape
    device = input_ids.device
    layout = models.attention_layout(model)
    mdtype = _mask_dtype(model)
    fwd_extra = {"logits_to_keep": 1} if models.accepts_logits_to_keep(model) else {}
    want_hidden = bool(adapter.hidden)
    program = adapter.step_program()  # fixed-shape per-step device work inside the verify forward (capture.py)
    if static and accel_kv is not None and not hasattr(accel_kv, "engine_cache"):
        raise ValueError(f"accel={label!r}: {accel_kv.name} does not run on the static engine; leave "
                         "cache_implementation unset.")
    if static:
        nodes = adapter.max_tree_nodes()
        max_len = _max_length(gc, plen)
        if accel_kv is not None:  # its fixed length option (one value across calls: one workspace, one capture)
            max_len = accel_kv.engine_max_length(max_len)
        backend = StaticBackend(
            model, layout, batch, device, mdtype, max_len, nodes,
            use_graphs=not gc.disable_compile and not models.is_dispatched(model),  # as HF: no compile when offloaded
            fwd_extra=fwd_extra, compiled=compile_options(gc.compile_config), want_hidden=want_hidden,
            program=program, kv=accel_kv,
        )
        return backend, nodes
    kv_cache = accel_kv.new_cache(max_forward=adapter.max_tree_nodes()) if accel_kv is not None else None
    backend = DynamicBackend(model, layout, batch, device, mdtype, fwd_extra, want_hidden, cache=kv_cache,
                             program=program)
    return backend, None


# ---- prefill ---------------------------------------------------------------------------------------------
def _prefill(model, backend, nodes, static, input_ids, attn, logits_processor, stopping_criteria, gc, adapter,
             streamer, stats, t_start) -> _Steps:
    """The prompt's forward and every row's first token (committed), the adapter's request state, the device
    sampler and the node-budget chooser: the draft/verify loop, ready to run."""
    device = input_ids.device
    batch = input_ids.shape[0]
    do_sample = bool(gc.do_sample)
    pos = (attn.long().cumsum(-1) - 1).clamp_min(0)
    if static:  # through the verify step's graph in chunks where it applies (backends.StaticBackend.prefill)
        raw, prompt_hidden = backend.prefill(input_ids, attn, pos)
        chunks = stats.extra["prefill_chunks"] = backend.prefill_chunks  # 0: the eager forward (benches keep numbers)
        stats.extra["prefill"] = (f"{'graphed' if backend.use_graphs else 'eager'} chunks {chunks}" if chunks
                                  else "eager")
    else:
        raw, prompt_hidden = backend.prefill(input_ids, attn, pos)
        stats.extra["prefill"] = "eager"
    first_scores = logits_processor(input_ids, raw) if logits_processor else raw
    if do_sample:
        first = torch.multinomial(torch.softmax(first_scores, dim=-1), 1).squeeze(1)
    else:
        first = first_scores.argmax(-1)
    stats.target_forwards += 1
    stats.row_forwards += batch
    stats.prefill_seconds = clock(device) - t_start

    commits = _Commits(input_ids, attn, stopping_criteria,
                       want_scores=bool(gc.return_dict_in_generate and gc.output_scores),
                       want_logits=bool(gc.return_dict_in_generate and getattr(gc, "output_logits", False)))
    first_list = first.tolist()
    for b in range(batch):
        commits.commit(b, [first_list[b]], [first_scores[b]], [raw[b]])
    stats.new_tokens += batch

    if streamer is not None:
        streamer.put(first[:1].cpu())

    state = adapter.prepare(model, commits.rows, gc)
    adapter.bind(state, backend)
    adapter.prefilled(state, StepOutput(hidden=prompt_hidden, attn=attn, tokens=first, input_ids=input_ids))
    # sampling / processors: every node processed and drawn on the device (one host read per step) unless
    # the list holds a processor the device path doesn't know (then the host path, per row and node)
    ctx_len = _max_length(gc, input_ids.shape[1])
    if static:
        ctx_len = backend.max_slots  # fixed per workspace: a captured step serves every request on it
    sampler = DeviceSampler.build(
        logits_processor, do_sample, input_ids, first_list, raw.shape[-1], ctx_len,
        workspace=backend.ws if static and backend.use_graphs else None,
    )
    if do_sample or logits_processor:
        stats.extra["sampling_path"] = "device" if sampler is not None else "host"
    pad_id = _pad_id(gc)
    root_pad = pad_id if pad_id is not None else 0
    # node budget "auto": each step's verify width chosen from measured step costs (engine/budget.py)
    # (a KV method's static steps cost what its cache makes them: their own cost table)
    key_extra = (backend.use_graphs, backend.max_slots) if static else ()
    if static and backend.ws.kv_key is not None:
        key_extra += (backend.ws.kv_key,)
    chooser = budgets.for_request(adapter, model, batch, "static" if static else "dynamic", key_extra,
                                  backend=backend, n_valid=commits.n_valid, pad=root_pad)
    return _Steps(adapter, state, backend, commits, sampler, chooser, logits_processor, do_sample, input_ids,
                  nodes, static, pad_id, streamer, stats, gc, last_position=models.last_position(model))


class _Leading:
    """The sampler's view of a step's packed trees: their first ``r`` positions (every real node; the scratch nodes
    after them are never accepted, and a real node's ancestors are real). Views: the sampler copies from them."""

    __slots__ = ("tokens", "ancestors")

    def __init__(self, packed, r: int):
        self.tokens = packed.tokens[:, :r]
        self.ancestors = packed.ancestors[:, :r, :r]


# ---- per-row commit state --------------------------------------------------------------------------------
class _Commits:
    """Per-row commit state of a request: ``rows`` (each row's real tokens, ending with its pending root token),
    ``gen`` (what each row generated), ``finished``, the score/logit rows kept for ``output_scores`` /
    ``output_logits``, and ``n_valid`` (the logical position of each row's pending root token)."""

    def __init__(self, input_ids, attn, stopping_criteria, want_scores: bool, want_logits: bool):
        batch = input_ids.shape[0]
        prompt_rows = input_ids.tolist()
        attn_rows = attn.tolist()
        self.rows = [
            Row(b, [t for t, m in zip(prompt_rows[b], attn_rows[b]) if m], int(sum(attn_rows[b]))) for b in range(batch)
        ]
        self.gen = [[] for _ in range(batch)]
        self.finished = [False] * batch
        self.out_scores = [[] for _ in range(batch)]
        self.out_logits = [[] for _ in range(batch)]
        self.n_valid = [r.prompt_len for r in self.rows]
        self.input_ids = input_ids
        self.want_scores, self.want_logits = want_scores, want_logits
        self.stopping_criteria = stopping_criteria
        self.host_stop = _host_stopping(stopping_criteria)
        # the criteria HF builds itself are checked on the host; others (custom, stop strings) need score rows
        self.needs_rows = want_scores or want_logits or (stopping_criteria and self.host_stop is None)

    def commit(self, b: int, tokens: list, score_rows: list, logit_rows: list) -> list:
        """Append ``tokens`` to row ``b`` up to its first stop; the tokens committed."""
        gen, row_tokens = self.gen[b], self.rows[b].tokens
        host_stop, criteria = self.host_stop, self.stopping_criteria
        input_ids = self.input_ids
        plen = input_ids.shape[1]
        done = []
        for j, tok in enumerate(tokens):
            gen.append(tok)
            row_tokens.append(tok)
            done.append(tok)
            if self.want_scores:
                self.out_scores[b].append(score_rows[j])
            if self.want_logits:
                self.out_logits[b].append(logit_rows[j])
            if host_stop is not None:
                if host_stop(plen + len(gen), tok):  # HF's max_length counts the padding
                    self.finished[b] = True
                    break
            elif criteria:
                seq = torch.cat([input_ids[b], torch.tensor(gen, dtype=input_ids.dtype, device=input_ids.device)])
                if bool(criteria(seq[None], score_rows[j][None]).any()):
                    self.finished[b] = True
                    break
        return done

    def prefix(self, b: int) -> torch.Tensor:
        """Row ``b``'s prompt (with its padding) and generated tokens, as the processors see them."""
        ids = self.input_ids
        return torch.cat([ids[b], torch.tensor(self.gen[b], dtype=ids.dtype, device=ids.device)])


# ---- the draft/verify loop -------------------------------------------------------------------------------
class _Steps:
    """The request's draft -> verify -> accept -> commit loop (one :meth:`step` per verify forward)."""

    def __init__(self, adapter, state, backend, commits: _Commits, sampler, chooser, logits_processor,
                 do_sample: bool, input_ids, nodes, static: bool, pad_id, streamer, stats: AccelStats, gc,
                 last_position: int | None = None):
        self.adapter, self.state, self.backend, self.commits = adapter, state, backend, commits
        self.sampler, self.chooser, self.streamer, self.stats, self.gc = sampler, chooser, streamer, stats, gc
        self.do_sample, self.input_ids, self.nodes, self.static, self.pad_id = do_sample, input_ids, nodes, static, pad_id
        self.root_pad = pad_id if pad_id is not None else 0
        self.drafted: list = []  # the step's trees before the budget's cut (node budget "auto")
        # the device sampler processes and draws only the positions that can be accepted: a method whose trees carry
        # scratch nodes after their real ones (hidden transfer: 16 real of 64) has the rest of its step skip them
        self.real_nodes = adapter.max_real_nodes()
        self._sampled = None  # the step's sampled positions (a leading slice of the verify's), when fewer than all
        self.batch = input_ids.shape[0]
        self.device = input_ids.device
        # a learned position table's last position (GPT-2: n_positions - 1): pack clamps the nodes past it (past
        # max_length too: deep drafts and scratch nodes near the end), which index past the table otherwise
        self.last_position = last_position
        self.fast_greedy = not do_sample and not logits_processor
        host_procs = logits_processor and sampler is None
        self.row_procs = [row_processors(logits_processor, b) for b in range(self.batch)] if host_procs else None

    def loop(self) -> None:
        finished = self.commits.finished
        while not all(finished):
            self.step()

    def step(self) -> None:
        backend, stats, chooser, batch = self.backend, self.stats, self.chooser, self.batch
        finished = self.commits.finished
        active = [not f for f in finished]
        t0 = time.perf_counter()
        trees, width, fed = self.draft(active)
        t1 = time.perf_counter()  # drafting is host work: no device sync needed to time it
        stats.draft_seconds += t1 - t0

        compile_before = backend.compile_seconds
        if self.static:  # the workspace's host buffers of this width (reused; pinned on a GPU)
            n = width if width is not None else max(len(t) for t in trees)
            packed = pack(trees, active, self.root_pad, "cpu", nodes=n, base=self.commits.n_valid,
                          out=backend.pack_buffers(n), last_position=self.last_position)
        else:
            packed = pack(trees, active, self.root_pad, self.device, nodes=width, base=self.commits.n_valid,
                          last_position=self.last_position)
        q_pos = packed.q_pos
        with self.adapter.verify_context(self.state, trees), backend.step_context(self.state, trees):
            logits, argmax_t, hidden = backend.verify(packed, q_pos, fed=fed)  # logits in the model's dtype; the static
        # engine's buffer is overwritten by the next forward, so rows that are kept are copied (_f32)
        if self.sampler is not None:  # this step's sampling inputs, queued behind the forward while it runs
            on_device = backend.device_inputs(packed)
            n = on_device.tokens.shape[1]
            r = self._sampled = self.real_nodes if self.real_nodes < n else None
            self.sampler.stage(trees, on_device if r is None else _Leading(on_device, r))
        stats.target_forwards += 1
        stats.steps += 1
        stats.row_forwards += sum(active)

        paths = self.accept(trees, active, logits, argmax_t, hidden, fed)
        backend.commit([paths[b] if not finished[b] else [] for b in range(batch)])
        t2 = time.perf_counter()
        stats.verify_seconds += t2 - t1  # the step synced when it read the argmax
        if chooser is not None:  # a step that captured a graph is no sample of its cost
            clean = backend.compile_seconds == compile_before
            chooser.timed(chooser.last, t1 - t0, t2 - t1 if clean else None)

    def draft(self, active: list):
        """The adapter's tree per row (a root-only tree for finished rows and rows it didn't draft), cut to the
        node budget's width when it is "auto"; the width the static engine runs (None: the engine's own); and the
        adapter's deferred tokens (``SpeculativeAdapter.deferred_tokens``: the trees hold placeholders there until
        :meth:`accept` reads them with the verdicts), None when the trees' tokens are real."""
        rows, chooser, adapter = self.commits.rows, self.chooser, self.adapter
        batch, root_pad = self.batch, self.root_pad
        if chooser is not None:
            cap = chooser.draft_cap()
            for r in rows:
                r.max_nodes = cap
        drafted = adapter.draft(self.state, [rows[b] if active[b] else None for b in range(batch)])
        trees = []
        for b in range(batch):
            if not active[b]:
                trees.append(Tree.root_only(root_pad))
                continue
            tree = drafted[b] if drafted[b] is not None else Tree.root_only(rows[b].tokens[-1])
            if tree.tokens[0] != rows[b].tokens[-1]:
                raise RuntimeError(
                    f"{adapter.name}: draft root {tree.tokens[0]} is not the row's last token {rows[b].tokens[-1]}"
                )
            trees.append(tree)
        fed = adapter.deferred_tokens(self.state)
        if fed is not None and chooser is not None:  # the chooser cuts trees by their scores, as drafted
            raise RuntimeError(f"{adapter.name}: an adapter whose node budget the engine chooses (auto_budget) can't "
                               "defer its draft tokens (deferred_tokens must return None)")
        width = self.nodes
        if chooser is not None:
            width = chooser.choose([trees[b] for b in range(batch) if active[b]])
            self.drafted = trees  # as drafted, before the cut: the chooser's calibration reads the nodes left out
            trees = [budgets.cut(t, width) for t in trees]
            chooser.record(width)
            width = width if self.static else None  # the static engine runs the width's bucket
        return trees, width, fed

    def accept(self, trees: list, active: list, logits, argmax_t, hidden, fed=None) -> list:
        """Walk every active row's tree with the verify's verdicts, commit the accepted tokens and the bonus
        token, tell the adapter (``verified``); each row's accepted path (root first; [] for inactive rows).
        ``fed``: the draft's deferred tokens (device), read here with the verdicts and filled into the trees."""
        commits, stats, chooser, sampler = self.commits, self.stats, self.chooser, self.sampler
        adapter, state, streamer = self.adapter, self.state, self.streamer
        step_out = StepOutput(logits=logits, hidden=hidden)
        extra = adapter.step_reads(state, logits)  # what the adapter needs on the host, read with the argmax
        fed_host = None
        if self.fast_greedy:  # the step's one host sync on the fast path
            if extra is None and fed is not None:  # the drafted tokens ride along with the argmax
                n = argmax_t.shape[1]
                both = torch.cat([argmax_t, fed.to(argmax_t.dtype)], 1).tolist()
                argmax, fed_host = [r[:n] for r in both], [r[n:] for r in both]
            elif extra is None:
                argmax = argmax_t.tolist()
            else:  # one array on the host; only the argmax becomes lists (per-node lists of every node's reads cost
                # 0.4-1.2 ms a step at batch 8 on a 2-core host, scripts/reads_conversion_cost.py: the adapter
                # converts the few nodes it reads)
                both = torch.cat([argmax_t[..., None].to(extra.dtype), extra], -1).cpu().numpy()
                argmax = both[..., 0].astype(np.int64).tolist()
                step_out.reads = both[..., 1:]
        else:
            argmax = None
            if extra is not None:
                step_out.reads = extra.cpu().numpy()
        node_out = proc_scores = None
        if sampler is not None:  # processed scores and per-node draws of every node: the step's one host read
            raw = logits if self._sampled is None else logits[:, : self._sampled]
            node_out, proc_scores, fed_host = sampler.finish_with(raw, fed)  # (the deferred tokens read with them)
        if fed is not None:
            _fill(trees, active, fed_host if fed_host is not None else fed.tolist())  # (read after the verdicts)
        paths = [[] for _ in range(self.batch)]
        for b in range(self.batch):
            if not active[b]:
                continue
            tree = trees[b]
            path, bonus, score_rows, logit_rows = self.walk(b, tree, logits, argmax, node_out, proc_scores)
            new = [tree.tokens[i] for i in path[1:]] + [bonus]
            done = commits.commit(b, new, score_rows, logit_rows)
            if sampler is not None:
                sampler.committed(b, done)
            stats.drafted_tokens += tree.real - 1
            stats.accepted_tokens += min(len(path) - 1, len(done))
            stats.new_tokens += len(done)
            if streamer is not None and b == 0 and done:
                streamer.put(torch.tensor(done))
            if chooser is not None:
                chooser.observe(tree, len(path) - 1, self.drafted[b], path[-1], bonus)
            adapter.verified(state, commits.rows[b], tree, path, done, step_out, b)
            paths[b] = path
            commits.n_valid[b] += len(path)
        return paths

    def walk(self, b: int, tree: Tree, logits, argmax, node_out, proc_scores):
        """Row ``b``'s accepted path (root first), its bonus token, and the score/logit rows of the committed
        tokens (None each unless kept): by the argmax (plain greedy), the device sampler's draws, or the host
        path (processed and drawn per node)."""
        needs_rows = self.commits.needs_rows
        if self.fast_greedy:
            path, bonus = greedy_walk(tree, argmax[b])
            kept = [_f32(logits[b, i]) for i in path] if needs_rows else [None] * len(path)
            return path, bonus, kept, kept
        if self.sampler is not None:
            path, bonus = walk(tree, node_out[b])
            if needs_rows:  # the step's buffers are overwritten by the next step: copies
                return path, bonus, [proc_scores[b, i].clone() for i in path], [_f32(logits[b, i]) for i in path]
            none = [None] * len(path)
            return path, bonus, none, none
        row_logits = _f32(logits[b, : tree.real])
        proc = process_tree_scores(self.row_procs[b], self.commits.prefix(b), tree, row_logits)
        if self.do_sample:
            path, bonus = sample_walk(tree, torch.softmax(proc, dim=-1))
        else:
            path, bonus = greedy_walk(tree, proc.argmax(-1).tolist())
        return path, bonus, [proc[i] for i in path], [row_logits[i] for i in path]


def _fill(trees: list, active: list, tokens: list) -> None:
    """Deferred draft tokens (per row, nodes 1..m) into the active rows' trees (their placeholders)."""
    for b, tree in enumerate(trees):
        if active[b] and len(tree) > 1:
            tree.fill(tokens[b][: len(tree) - 1])


# ---- outputs ---------------------------------------------------------------------------------------------
def _outputs(steps: _Steps, accel_kv, accel_stats_sink, t_start):
    """The padded sequences (or HF's output object), with the run's figures in ``accel_stats``."""
    commits, stats, backend, chooser, gc = steps.commits, steps.stats, steps.backend, steps.chooser, steps.gc
    input_ids, pad_id, static, sampler = steps.input_ids, steps.pad_id, steps.static, steps.sampler
    gen = commits.gen
    batch = input_ids.shape[0]
    max_gen = max(len(g) for g in gen)
    if pad_id is None and any(len(g) != max_gen for g in gen):
        raise ValueError(
            "rows of the batch ended at different lengths and no pad_token_id is set: pass pad_token_id= to "
            "generate (vanilla generate needs it for the same reason)"
        )
    fill = pad_id if pad_id is not None else 0
    new_ids = torch.full((batch, max_gen), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, g in enumerate(gen):
        if g:
            new_ids[b, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids, new_ids], dim=1)
    stats.kv_cache_bytes = backend.nbytes()
    stats.extra["cache"] = "static" if static else "dynamic"
    if static:
        stats.extra["compile_seconds"] = backend.compile_seconds
        stats.extra["graphs"] = backend.use_graphs
        stats.extra["defragmentations"] = backend.defrags
        stats.extra["verify_width"] = steps.nodes  # the node budget: every verify forward runs it (unless "auto")
        if sampler is not None and sampler.captured() is not None:
            stats.extra["sampling_graph"] = sampler.captured()  # processing + draws replayed as a CUDA graph
            compiled, why = sampler.compile_state()  # ... captured from the compiled step (else: why not)
            stats.extra["sampling_compiled"] = int(compiled)  # a number: the bench keeps numeric stats
            if why:
                stats.extra["sampling_compile_error"] = why
    if sampler is not None and any(k == "topp" for k, _ in sampler.ops):
        stats.extra["sampling_topp_fallbacks"] = sampler.fallbacks  # steps top-p's top-K form sent to the sort
    if chooser is not None:
        stats.extra["budget"] = chooser.report()
        chooser.done()
        if static and stats.steps:  # the mean width the forwards ran (the chooser's buckets)
            stats.extra["verify_width"] = sum(w * n for w, n in chooser.chosen.items()) / stats.steps
    if accel_kv is not None:
        accel_kv.finished(backend.cache, stats)
        stats.extra["runner"] = "engine"
    steps.adapter.finished(steps.state, stats)
    stats.total_seconds = clock(input_ids.device) - t_start
    if accel_stats_sink is not None:
        accel_stats_sink(sequences, stats)

    if not gc.return_dict_in_generate:
        return sequences
    result = GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=_stack_steps(commits.out_scores, max_gen) if commits.want_scores else None,
        logits=_stack_steps(commits.out_logits, max_gen) if commits.want_logits else None,
        past_key_values=None,
    )
    result.accel_stats = stats
    return result


def _f32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy (never a view of an engine buffer)."""
    return t.to(torch.float32, copy=True)


def _host_stopping(criteria):
    """A host-side check equivalent to ``criteria`` when it holds only HF's max-length / eos / max-time
    criteria (no device sync per token), else None."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria

    if not criteria:
        return None
    max_len, eos, timers = None, set(), []
    for c in criteria:
        if type(c) is MaxLengthCriteria:
            max_len = c.max_length if max_len is None else min(max_len, c.max_length)
        elif type(c) is EosTokenCriteria:
            eos |= set(torch.as_tensor(c.eos_token_id).reshape(-1).tolist())
        elif type(c) is MaxTimeCriteria:
            timers.append(c)
        else:
            return None

    def stop(length: int, token: int) -> bool:
        if token in eos or (max_len is not None and length >= max_len):
            return True
        return any(time.time() - c.initial_timestamp > c.max_time for c in timers)

    return stop


def _stack_steps(per_row: list, steps: int) -> tuple:
    """Per-row lists of (V,) tensors -> tuple over steps of (B, V); rows that had ended hold zeros."""
    ref = next(r[0] for r in per_row if r)
    out = []
    for t in range(steps):
        out.append(torch.stack([r[t] if t < len(r) else torch.zeros_like(ref) for r in per_row]))
    return tuple(out)
