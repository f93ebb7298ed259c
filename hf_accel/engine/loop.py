"""The decoding loop shared by every speculative method: draft -> verify (one forward) -> accept -> commit -> observe.

Called by transformers' ``generate`` as a ``custom_generate`` callable, after HF has prepared the inputs,
logits processors and stopping criteria, so every HF generation option that reaches those is honoured the
way vanilla generate honours it. Batch > 1 with left padding: each row accepts its own number of tokens;
per-row cache holes are tracked by :class:`~hf_accel.engine.cache.SlotCache`.

Sampling, and greedy with logits processors: every node's processed scores and its draw are computed on the
device in one batched step (engine/sampling.py; captured as a CUDA graph on the static engine) and the tree is
walked with those draws: one host read per step, as plain greedy. A processor list the device path doesn't know
runs on the host path instead (verify.process_tree_scores + verify.sample_walk); ``stats.extra["sampling_path"]``.
"""

from __future__ import annotations

import contextlib
import time

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
    batch, plen = input_ids.shape
    label = adapter.name if accel_kv is None else f"{accel_kv.name}+{adapter.name}"
    stats = AccelStats(method=label, batch_size=batch)
    t_start = clock(device)

    attn = model_kwargs.get("attention_mask")
    attn = torch.ones_like(input_ids, dtype=torch.bool) if attn is None else attn.to(device).bool()
    pad_id = _pad_id(gc)
    do_sample = bool(gc.do_sample)
    want_scores = bool(gc.return_dict_in_generate and gc.output_scores)
    want_logits = bool(gc.return_dict_in_generate and getattr(gc, "output_logits", False))
    layout = models.attention_layout(model)
    mdtype = _mask_dtype(model)
    fwd_extra = {"logits_to_keep": 1} if models.accepts_logits_to_keep(model) else {}

    # ---- prefill -----------------------------------------------------------------------------------
    static = gc.cache_implementation == "static"
    want_hidden = bool(adapter.hidden)
    program = adapter.step_program()  # fixed-shape per-step device work inside the verify forward (capture.py)
    if static and accel_kv is not None:
        raise ValueError(f"accel={label!r}: {accel_kv.name} does not run on the static engine; leave "
                         "cache_implementation unset.")
    if static:
        nodes = adapter.max_tree_nodes()
        max_length = gc.max_length if gc.max_length is not None else plen + (gc.max_new_tokens or 20)
        backend = StaticBackend(
            model, layout, batch, device, mdtype, max_length, nodes,
            use_graphs=not gc.disable_compile and not models.is_dispatched(model),  # as HF: no compile when offloaded
            fwd_extra=fwd_extra, compiled=compile_options(gc.compile_config), want_hidden=want_hidden,
            program=program,
        )
    else:
        nodes = None
        kv_cache = accel_kv.new_cache(max_forward=adapter.max_tree_nodes()) if accel_kv is not None else None
        backend = DynamicBackend(model, layout, batch, device, mdtype, fwd_extra, want_hidden, cache=kv_cache,
                                 program=program)
    scope = contextlib.ExitStack()  # the KV method's attention switch, for the whole request
    try:
        if accel_kv is not None:
            scope.enter_context(accel_kv.attention())
        pos = (attn.long().cumsum(-1) - 1).clamp_min(0)
        raw, prompt_hidden = backend.prefill(input_ids, attn, pos)
        first_scores = logits_processor(input_ids, raw) if logits_processor else raw
        if do_sample:
            first = torch.multinomial(torch.softmax(first_scores, dim=-1), 1).squeeze(1)
        else:
            first = first_scores.argmax(-1)
        stats.target_forwards += 1
        stats.row_forwards += batch
        t_prefill = clock(device)
        stats.prefill_seconds = t_prefill - t_start

        prompt_rows = input_ids.tolist()
        attn_rows = attn.tolist()
        rows = [
            Row(b, [t for t, m in zip(prompt_rows[b], attn_rows[b]) if m], int(sum(attn_rows[b]))) for b in range(batch)
        ]
        gen = [[] for _ in range(batch)]
        finished = [False] * batch
        out_scores = [[] for _ in range(batch)]
        out_logits = [[] for _ in range(batch)]
        n_valid = [r.prompt_len for r in rows]  # logical position of each row's pending (root) token
        host_stop = _host_stopping(stopping_criteria)
        # the criteria HF builds itself are checked on the host; others (custom, stop strings) need score rows
        needs_rows = want_scores or want_logits or (stopping_criteria and host_stop is None)

        def commit(b: int, tokens: list, score_rows: list, logit_rows: list) -> list:
            done = []
            for j, tok in enumerate(tokens):
                gen[b].append(tok)
                rows[b].tokens.append(tok)
                done.append(tok)
                if want_scores:
                    out_scores[b].append(score_rows[j])
                if want_logits:
                    out_logits[b].append(logit_rows[j])
                if host_stop is not None:
                    if host_stop(plen + len(gen[b]), tok):  # HF's max_length counts the padding
                        finished[b] = True
                        break
                elif stopping_criteria:
                    seq = torch.cat([input_ids[b], torch.tensor(gen[b], dtype=input_ids.dtype, device=device)])
                    if bool(stopping_criteria(seq[None], score_rows[j][None]).any()):
                        finished[b] = True
                        break
            return done

        first_list = first.tolist()
        for b in range(batch):
            commit(b, [first_list[b]], [first_scores[b]], [raw[b]])
        stats.new_tokens += batch

        if streamer is not None:
            streamer.put(first[:1].cpu())

        state = adapter.prepare(model, rows, gc)
        adapter.bind(state, backend)
        adapter.prefilled(state, StepOutput(hidden=prompt_hidden, attn=attn, tokens=first, input_ids=input_ids))
        # sampling / processors: every node processed and drawn on the device (one host read per step) unless
        # the list holds a processor the device path doesn't know (then the host path, per row and node)
        ctx_len = gc.max_length if gc.max_length is not None else plen + (gc.max_new_tokens or 20)
        if static:
            ctx_len = backend.max_slots  # fixed per workspace: a captured step serves every request on it
        sampler = DeviceSampler.build(
            logits_processor, do_sample, input_ids, first_list, raw.shape[-1], ctx_len,
            workspace=backend.ws if static and backend.use_graphs else None,
        )
        if do_sample or logits_processor:
            stats.extra["sampling_path"] = "device" if sampler is not None else "host"
        host_procs = logits_processor and sampler is None
        row_procs = [row_processors(logits_processor, b) for b in range(batch)] if host_procs else None

        # ---- draft / verify loop ---------------------------------------------------------------------
        root_pad = pad_id if pad_id is not None else 0
        # node budget "auto": each step's verify width chosen from measured step costs (engine/budget.py)
        chooser = budgets.for_request(adapter, model, batch, "static" if static else "dynamic",
                                      (backend.use_graphs, backend.max_slots) if static else (),
                                      backend=backend, n_valid=n_valid, pad=root_pad)
        while not all(finished):
            active = [not f for f in finished]
            t0 = time.perf_counter()
            if chooser is not None:
                cap = chooser.draft_cap()
                for r in rows:
                    r.max_nodes = cap
            drafted = adapter.draft(state, [rows[b] if active[b] else None for b in range(batch)])
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
            width = nodes
            if chooser is not None:
                width = chooser.choose([trees[b] for b in range(batch) if active[b]])
                trees = [budgets.cut(t, width) for t in trees]
                chooser.record(width)
                width = width if static else None  # the static engine runs the width's bucket
            t1 = time.perf_counter()  # drafting is host work: no device sync needed to time it
            stats.draft_seconds += t1 - t0

            compile_before = backend.compile_seconds
            packed = pack(trees, active, root_pad, "cpu" if static else device, nodes=width)
            q_pos = torch.tensor(n_valid, device=packed.depths.device)[:, None] + packed.depths
            if sampler is not None:
                sampler.stage(trees, packed)  # this step's sampling inputs, queued before the forward
            with adapter.verify_context(state, trees), backend.step_context(state, trees):
                logits, argmax_t, hidden = backend.verify(packed, q_pos)  # logits in the model's dtype; the static
            # engine's buffer is overwritten by the next forward, so rows that are kept are copied (_f32)
            step_out = StepOutput(logits=logits, hidden=hidden)
            stats.target_forwards += 1
            stats.steps += 1
            stats.row_forwards += sum(active)

            fast_greedy = not do_sample and not logits_processor
            argmax = argmax_t.tolist() if fast_greedy else None  # the step's one host sync on the fast path
            if sampler is not None:  # processed scores and per-node draws of every node: the step's one host read
                node_out, proc_scores = sampler.finish(logits)
            paths = [[] for _ in range(batch)]
            for b in range(batch):
                if not active[b]:
                    continue
                tree = trees[b]
                row_logits = logits[b, : tree.real]
                if fast_greedy:
                    path, bonus = greedy_walk(tree, argmax[b])
                    kept = [_f32(row_logits[i]) for i in path] if needs_rows else [None] * len(path)
                    score_rows = logit_rows = kept
                elif sampler is not None:
                    path, bonus = walk(tree, node_out[b])
                    if needs_rows:  # the step's buffers are overwritten by the next step: copies
                        score_rows = [proc_scores[b, i].clone() for i in path]
                        logit_rows = [_f32(row_logits[i]) for i in path]
                    else:
                        score_rows = logit_rows = [None] * len(path)
                else:
                    row_logits = _f32(row_logits)
                    base = torch.cat([input_ids[b], torch.tensor(gen[b], dtype=input_ids.dtype, device=device)])
                    proc = process_tree_scores(row_procs[b], base, tree, row_logits)
                    if do_sample:
                        path, bonus = sample_walk(tree, torch.softmax(proc, dim=-1))
                    else:
                        path, bonus = greedy_walk(tree, proc.argmax(-1).tolist())
                    score_rows, logit_rows = [proc[i] for i in path], [row_logits[i] for i in path]
                new = [tree.tokens[i] for i in path[1:]] + [bonus]
                done = commit(b, new, score_rows, logit_rows)
                if sampler is not None:
                    sampler.committed(b, done)
                stats.drafted_tokens += tree.real - 1
                stats.accepted_tokens += min(len(path) - 1, len(done))
                stats.new_tokens += len(done)
                if streamer is not None and b == 0 and done:
                    streamer.put(torch.tensor(done))
                if chooser is not None:
                    chooser.observe(tree, len(path) - 1)
                adapter.verified(state, rows[b], tree, path, done, step_out, b)
                adapter.observe(state, rows[b], done)
                paths[b] = path
                n_valid[b] += len(path)

            backend.commit([paths[b] if not finished[b] else [] for b in range(batch)])
            t2 = time.perf_counter()
            stats.verify_seconds += t2 - t1  # the step synced when it read the argmax
            if chooser is not None:  # a step that captured a graph is no sample of its cost
                clean = backend.compile_seconds == compile_before
                chooser.timed(chooser.last, t1 - t0, t2 - t1 if clean else None)
    finally:
        scope.close()
        backend.close()  # the static workspace is free for the next request

    if streamer is not None:
        streamer.end()

    # ---- outputs -----------------------------------------------------------------------------------
    max_gen = max(len(g) for g in gen)
    if pad_id is None and any(len(g) != max_gen for g in gen):
        raise ValueError(
            "rows of the batch ended at different lengths and no pad_token_id is set: pass pad_token_id= to "
            "generate (vanilla generate needs it for the same reason)"
        )
    fill = pad_id if pad_id is not None else 0
    new_ids = torch.full((batch, max_gen), fill, dtype=input_ids.dtype, device=device)
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
        stats.extra["verify_width"] = nodes  # the node budget: every verify forward runs it (unless "auto")
        if sampler is not None and sampler.captured() is not None:
            stats.extra["sampling_graph"] = sampler.captured()  # processing + draws replayed as a CUDA graph
    if chooser is not None:
        stats.extra["budget"] = chooser.report()
        if static and stats.steps:  # the mean width the forwards ran (the chooser's buckets)
            stats.extra["verify_width"] = sum(w * n for w, n in chooser.chosen.items()) / stats.steps
    if accel_kv is not None:
        accel_kv.finished(backend.cache, stats)
    adapter.finished(state, stats)
    stats.total_seconds = clock(device) - t_start
    if accel_stats_sink is not None:
        accel_stats_sink(sequences, stats)

    if not gc.return_dict_in_generate:
        return sequences
    result = GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=_stack_steps(out_scores, max_gen) if want_scores else None,
        logits=_stack_steps(out_logits, max_gen) if want_logits else None,
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
