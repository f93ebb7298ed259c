"""``hf-accel bench duo``: DuoAttention against full attention — passkey retrieval, KV-cache bytes, peak memory,
decode speed.

(a) Passkey retrieval (:mod:`hf_accel.data.passkey`): for every context length × needle depth × sample, greedy
answers of vanilla ``generate`` (full attention) and of ``generate(accel="duo_attention")``; a cell is the share
of answers that contain the key. Two heat maps side by side (depth × length) and a markdown table.

(b) Cost per context length, one passkey prompt each, every method in the same run (order: (d)): KV-cache bytes at
the end (vanilla: the returned DynamicCache's key/value tensors; DuoAttention: ``stats(out).kv_cache_bytes``, with
``stats(out).extra["full_kv_bytes"]`` beside it), peak CUDA memory (``torch.cuda.max_memory_allocated``, reset
before each call; not on CPU; each cell starts from the weights alone, :func:`_fresh`: what earlier cells compiled and
captured would otherwise count against whichever cell runs later) and the call's own peak (that peak minus the memory
held before the call: the weights and the cell's warm call's graphs and buffers), and decode tok/s: (new tokens of an
N-token call - those of a 1-token call) / (the time difference), so the prompt's prefill cancels out; median over
``reps``.

(c) With ``static=True`` (``--static``) the cost part also times HF's compiled static path: ``vanilla-static``
(HF's StaticCache passed as ``past_key_values``, so HF's generate compiles the decode step) and
``duo_attention-static`` (``cache_implementation="static"``: on a GPU hf_accel's static engine decoding one token per
step, each step a CUDA graph, on its EngineDuoCache — the method's default ``runner`` — elsewhere HF's generate on the
StaticDuoCache, compiled by HF the same way; ``duo_attention-hf-static``, by ``--duo-methods`` only: HF's runner
everywhere). They use one fixed cache length per context length (context + decode tokens), so each length compiles
once; a warm call per length and method runs before the timed ones. Ratios are reported against vanilla (eager) and
against vanilla-static. The passkey part runs the eager methods only (the static cache computes the same attention).
``compose`` (``--compose``, default ``aded`` under ``--static``) adds, per speculative method M, the row
``duo_attention+M-static``: ``accel=["duo_attention", M]`` with ``cache_implementation="static"``, i.e. DuoAttention's
rings under M's tree verify on hf_accel's static engine (CUDA graphs; EngineDuoCache), timed the same way.

(d) Order and partial results: the cost part runs first, one (length, method) cell after the other (all reps of a
cell together), the longest context first and, at each length, the static rows before the eager ones; the passkey
grid last (``--no-passkey`` skips it). ``--duo-methods`` picks the cost rows (``NAME@LENGTH``: that row at one length
only). results.json / results.md are rewritten in ``--out`` after every cell and after the passkey grid, marked
"partial: N of M cells" until the run ends (plots at the end), and each cost row is printed as a markdown table line
as soon as it is measured: a run stopped by a time limit keeps every finished cell.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..data import passkey
from .report import _replace  # write through a temporary file and a rename

VANILLA, DUO = "vanilla", "duo_attention"
VANILLA_STATIC, DUO_STATIC = "vanilla-static", "duo_attention-static"
DUO_STATIC_HF = "duo_attention-hf-static"  # HF's compiled generate on the StaticDuoCache (runner "hf"), by name only


def composed_name(method: str) -> str:
    """The cost row of duo_attention composed with ``method`` on the static engine."""
    return f"{DUO}+{method}-static"


def _composed(name: str) -> str | None:
    """The speculative method of a composed row's name (None: not one)."""
    if name.startswith(DUO + "+") and name.endswith("-static"):
        return name[len(DUO) + 1: -len("-static")]
    return None


def duo_available() -> bool:
    import hf_accel

    return DUO in hf_accel.available()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gen(model, ids: list, method: str, duo_kwargs: dict, max_new_tokens: int, pad: int, min_new: int = 0,
         cache_len: int | None = None, compose_kwargs: dict | None = None):
    x = torch.tensor([ids], device=model.device)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
              return_dict_in_generate=True, pad_token_id=pad)
    if min_new:
        kw["min_new_tokens"] = min_new
    cache_len = cache_len or len(ids) + max_new_tokens
    spec = _composed(method)
    if spec is not None:  # one engine length per context: the 1-token and N-token calls share the warm call's graphs
        kw.update(accel=[DUO, spec], cache_implementation="static",
                  accel_kwargs={DUO: {**duo_kwargs, "max_cache_len": cache_len},
                                spec: dict((compose_kwargs or {}).get(spec, {}))})
    elif method == DUO:
        kw.update(accel=DUO, accel_kwargs=dict(duo_kwargs))
    elif method in (DUO_STATIC, DUO_STATIC_HF):
        runner = {"runner": "hf"} if method == DUO_STATIC_HF else {}
        kw.update(accel=DUO, accel_kwargs={**duo_kwargs, "max_cache_len": cache_len, **runner},
                  cache_implementation="static")
    elif method == VANILLA_STATIC:
        from transformers import StaticCache

        kw["past_key_values"] = StaticCache(config=model.config, max_cache_len=cache_len)
    with torch.no_grad():
        return model.generate(x, **kw)


def _with_duo(method: str) -> bool:
    """A row that runs duo_attention (alone or composed): its figures come from ``hf_accel.stats``."""
    return method in (DUO, DUO_STATIC, DUO_STATIC_HF) or _composed(method) is not None


def _runner(out, method: str) -> str:
    """What decoded a row: "hf" (transformers' generate) or "engine" (hf_accel's engine)."""
    if _with_duo(method):
        import hf_accel

        return hf_accel.stats(out).extra["runner"]
    return "hf"


def kv_bytes(out, method: str) -> tuple:
    """(bytes the cache holds at the end, bytes a full cache would hold or None)."""
    if _with_duo(method):
        import hf_accel

        st = hf_accel.stats(out)
        return int(st.kv_cache_bytes), st.extra.get("full_kv_bytes")
    from ..engine.cache import cache_nbytes

    from .runner import output_cache

    n = int(cache_nbytes(output_cache(out)))  # past_key_values up to transformers 5.23, cache from 5.24
    return n, n


def retrieval(model, tok, methods, duo_kwargs, lengths, depths, samples, answer_tokens=16, pad=0, chat=True,
              texts=None, progress=True) -> dict:
    """Passkey accuracy per method, depth and length: {"accuracy": {method: [[acc per length] per depth]},
    "answers": [...]}"""
    from tqdm.auto import tqdm

    acc = {m: [[0.0] * len(lengths) for _ in depths] for m in methods}
    answers = []
    bar = tqdm(total=len(lengths) * len(depths) * samples * len(methods), desc="passkey", disable=not progress,
               unit="gen")
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for s in range(samples):
                sample = passkey.make_sample(tok, length, depth, seed=s, chat=chat, texts=texts)
                row = {"length": length, "depth": depth, "seed": s, "key": sample.key}
                for m in methods:
                    out = _gen(model, sample.prompt, m, duo_kwargs, answer_tokens, pad)
                    text = tok.decode(out.sequences[0, sample.prompt_len :], skip_special_tokens=True)
                    ok = passkey.answered(text, sample)
                    acc[m][di][li] += ok / samples
                    row[m] = {"ok": bool(ok), "text": text}
                    bar.update(1)
                answers.append(row)
                bar.set_postfix({m: f"{sum(r[m]['ok'] for r in answers)}/{len(answers)}" for m in methods})
    bar.close()
    return {"accuracy": acc, "answers": answers}


def cost_cells(lengths, methods, only: dict | None = None) -> list:
    """The (length, method) cells of the cost part in the order they are measured: the longest context first (the
    issue's targets are at 8k), and at each length the static rows (HF's compiled path and the static engine: the
    baseline and the targets) before the eager ones; within each group ``methods``' order. ``only``: {method: lengths}
    for methods measured at some lengths only (``--duo-methods NAME@LENGTH``)."""
    static = [m for m in methods if m.endswith("-static")]
    eager = [m for m in methods if not m.endswith("-static")]
    return [(length, m) for length in sorted({int(x) for x in lengths}, reverse=True) for m in static + eager
            if not only or m not in only or length in only[m]]


def _fresh(model) -> None:
    """Free what earlier cells compiled and captured (dynamo's code with HF's CUDA-graph pools, hf_accel's static
    workspaces): a cell's memory is then the weights plus its own (a warm call's graphs and buffers, its calls' peak),
    as in a process that runs that configuration alone, whichever cells ran before it."""
    import gc

    from ..engine.backends import release_workspaces

    release_workspaces(model)
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _measure(model, sample, m, duo_kwargs, decode_tokens, reps, pad, compose_kwargs) -> dict:
    """One (length, method) cell: a warm call first for a static row (it compiles the decode step at this length),
    then ``reps`` × (a 1-token call, an N-token call); medians."""
    device = model.device
    cache_len = sample.prompt_len + decode_tokens  # one fixed static length per context length: one compile
    if device.type == "cuda":
        _fresh(model)
    if m.endswith("-static"):
        warm = min(8, decode_tokens)
        _gen(model, sample.prompt, m, duo_kwargs, warm, pad, min_new=warm, cache_len=cache_len,
             compose_kwargs=compose_kwargs)
        _sync(device)
    r = {"t1": [], "tn": [], "n1": [], "nn": [], "peak": [], "held": [], "kv": None, "full_kv": None}
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        out = _gen(model, sample.prompt, m, duo_kwargs, 1, pad, cache_len=cache_len, compose_kwargs=compose_kwargs)
        _sync(device)
        r["t1"].append(time.perf_counter() - t)
        r["n1"].append(out.sequences.shape[1] - sample.prompt_len)
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            # what is held before the call: the weights, and whatever earlier cells left (compiled steps' CUDA-graph
            # memory pools live as long as their compiled code): the call's own peak is the peak above it
            r["held"].append(int(torch.cuda.memory_allocated(device)))
        t = time.perf_counter()
        out = _gen(model, sample.prompt, m, duo_kwargs, decode_tokens, pad, min_new=decode_tokens,
                   cache_len=cache_len, compose_kwargs=compose_kwargs)
        _sync(device)
        r["tn"].append(time.perf_counter() - t)
        r["nn"].append(out.sequences.shape[1] - sample.prompt_len)
        if device.type == "cuda":
            r["peak"].append(int(torch.cuda.max_memory_allocated(device)))
        r["kv"], r["full_kv"] = kv_bytes(out, m)
        r["runner"] = _runner(out, m)
        del out
    t1, tn = statistics.median(r["t1"]), statistics.median(r["tn"])
    new = statistics.median(r["nn"]) - statistics.median(r["n1"])
    return {
        "method": m, "prompt_tokens": sample.prompt_len,
        "new_tokens": statistics.median(r["nn"]),
        "kv_cache_bytes": r["kv"], "full_kv_bytes": r["full_kv"], "runner": r["runner"],
        "peak_memory_bytes": max(r["peak"]) if r["peak"] else None,
        "held_before_bytes": min(r["held"]) if r["held"] else None,
        "peak_added_bytes": max(p - h for p, h in zip(r["peak"], r["held"])) if r["peak"] else None,
        "prefill_seconds": t1, "seconds": tn,
        "decode_tok_s": new / (tn - t1) if tn > t1 and new > 0 else None,
        "seconds_all": r["tn"],
    }


def ratios(rows: list) -> list:
    """(Re)computes each row's ratios against vanilla and vanilla-static at the same length, from the rows measured
    so far (a baseline measured later fills them in on the next call)."""
    by = {(r["length"], r["method"]): r for r in rows}
    for r in rows:
        for base, suffix in ((VANILLA, "vanilla"), (VANILLA_STATIC, "vanilla_static")):
            v = by.get((r["length"], base))
            if v is None:
                continue
            r[f"kv_ratio_vs_{suffix}"] = r["kv_cache_bytes"] / v["kv_cache_bytes"] if v["kv_cache_bytes"] else None
            r[f"peak_ratio_vs_{suffix}"] = (r["peak_memory_bytes"] / v["peak_memory_bytes"]
                                            if r["peak_memory_bytes"] and v["peak_memory_bytes"] else None)
            r[f"peak_added_ratio_vs_{suffix}"] = (r["peak_added_bytes"] / v["peak_added_bytes"]
                                                  if r.get("peak_added_bytes") and v.get("peak_added_bytes") else None)
            r[f"decode_speedup_vs_{suffix}"] = (r["decode_tok_s"] / v["decode_tok_s"]
                                                if r["decode_tok_s"] and v["decode_tok_s"] else None)
    return rows


def cost(model, tok, methods, duo_kwargs, lengths, decode_tokens=256, reps=3, pad=0, chat=True, texts=None,
         progress=True, compose_kwargs: dict | None = None, cells: list | None = None, on_row=None) -> dict:
    """Per length and method: kv bytes, peak memory, prefill seconds, decode tok/s (medians over ``reps``), one
    (length, method) cell after the other in :func:`cost_cells`' order (or ``cells``'); ``on_row(row, rows)`` is
    called after each cell, with the ratios of the rows so far filled in."""
    from tqdm.auto import tqdm

    cells = cost_cells(lengths, methods) if cells is None else cells
    rows, samples = [], {}
    bar = tqdm(total=len(cells) * reps, desc="memory / speed", disable=not progress, unit="run")
    for length, m in cells:
        if length not in samples:
            samples[length] = passkey.make_sample(tok, length, 0.5, seed=10_000, chat=chat, texts=texts)
        t = time.perf_counter()
        row = {"length": length, **_measure(model, samples[length], m, duo_kwargs, decode_tokens, reps, pad,
                                            compose_kwargs)}
        row["cell_seconds"] = time.perf_counter() - t  # the whole cell: warm call (compile) and every rep
        rows.append(row)
        ratios(rows)
        bar.update(reps)
        if on_row is not None:
            on_row(row, rows)
    bar.close()
    return {"rows": rows}


def parse_methods(spec) -> tuple:
    """``--duo-methods``: a comma list (or list) of cost rows, each ``NAME`` or ``NAME@LENGTH`` (that row at that
    context length only; repeat for more lengths). Returns (names in the order given, {name: {lengths}} for the
    restricted ones). None, "" or "all": (None, {})."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return None, {}
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if str(x).strip()]
    names, only, whole = [], {}, set()
    for item in items:
        name, _, at = item.partition("@")
        name = name.strip()
        if name not in names:
            names.append(name)
        if at:
            try:
                only.setdefault(name, set()).add(int(at))
            except ValueError:
                raise ValueError(f"--duo-methods: {item!r}: the length after '@' must be an integer, e.g. "
                                 f"{name}@8192") from None
        else:
            whole.add(name)
    return names, {k: v for k, v in only.items() if k not in whole}


def _check_methods(names: list, with_duo: bool) -> list:
    """The cost rows named by ``--duo-methods``, in the canonical order; one clear error for an unknown name."""
    import hf_accel

    valid = [VANILLA, VANILLA_STATIC] + ([DUO, DUO_STATIC, DUO_STATIC_HF] if with_duo else [])
    for n in names:
        spec = _composed(n)
        if n in valid or (with_duo and spec and spec != DUO and spec in hf_accel.available()):
            continue
        raise ValueError(f"--duo-methods: unknown cost row {n!r}; choose from "
                         f"{', '.join(valid + ([composed_name('M')] if with_duo else []))} (M: a speculative method, "
                         f"e.g. {composed_name('aded')})" + ("" if with_duo else
                                                               "; accel='duo_attention' is not registered here"))
    canon = [VANILLA, DUO, VANILLA_STATIC, DUO_STATIC, DUO_STATIC_HF]
    return [m for m in canon if m in names] + [m for m in names if m not in canon]


def run(model, tok, *, pattern=None, sparsity: float = 0.5, sink: int | None = None, recent: int | None = None,
        lengths=(2048, 4096, 8192), depths=(0.05, 0.25, 0.5, 0.75, 0.95), samples: int = 2, answer_tokens: int = 16,
        decode_tokens: int = 256, reps: int = 3, warmup: bool = True, chat: bool = True, texts=None,
        progress: bool = True, with_duo: bool | None = None, command: str = "", dtype: str | None = None,
        model_name: str | None = None, duo_options: dict | None = None, static: bool = False,
        compose=("aded",), compose_kwargs: dict | None = None, methods=None, with_passkey: bool = True,
        out=None, echo=None) -> dict:
    """Both parts of the bench; DuoAttention is left out (and said so) while ``accel="duo_attention"`` is not
    registered. ``duo_options``: more accel_kwargs for duo_attention (e.g. ``slack``). ``static``: the cost part also
    times vanilla-static and duo_attention-static, and with ``compose`` (speculative methods) duo_attention+M-static
    on the static engine (``compose_kwargs``: {M: its accel_kwargs}) (module docstring, (c)).

    ``methods``: the cost rows to measure (:func:`parse_methods`' syntax; None: all of the above), in place of
    ``static`` and ``compose``. ``with_passkey=False`` skips the passkey part. The cost part runs first, in
    :func:`cost_cells`' order (longest context first, static rows first), then the passkey grid. ``out``: a folder
    where results.json and results.md are rewritten after every cost cell and after the passkey grid (with
    ``progress``: "partial: N of M cells" until the end), so an interrupted run keeps what it measured; ``echo``: a
    callable given each cost row as a markdown table line as soon as it is measured (the table's header first)."""
    with_duo = duo_available() if with_duo is None else with_duo
    methods_pk = [VANILLA] + ([DUO] if with_duo else [])
    names, only = parse_methods(methods)
    if names is None:
        composed = [composed_name(m) for m in (compose or ())] if with_duo else []
        cost_methods = methods_pk + ([VANILLA_STATIC] + ([DUO_STATIC] + composed if with_duo else []) if static
                                     else [])
    else:
        cost_methods = _check_methods(names, with_duo)
    lengths, depths = [int(x) for x in lengths], [float(x) for x in depths]
    bad = sorted({n for m, ls in only.items() for n in ls if n not in lengths})
    if bad:
        raise ValueError(f"--duo-methods: length(s) {bad} after '@' are not in --lengths {lengths}")
    cells = cost_cells(lengths, cost_methods, only)
    if any(m.endswith("-static") for m in cost_methods):  # every (length, static method) is one compiled graph
        import torch._dynamo

        limit, dyn = 4 * len(lengths) + 8, torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, name, max(getattr(dyn, name), limit))
    gates = pattern
    if isinstance(pattern, (str, Path)):  # a gates folder: loaded (and checked against the model) once, here
        from ..train.duo import load_gates

        gates = load_gates(pattern, model)
    duo_kwargs = {"pattern": gates, "sparsity": sparsity}
    if sink is not None:
        duo_kwargs["sink"] = sink
    if recent is not None:
        duo_kwargs["recent"] = recent
    duo_kwargs.update(duo_options or {})
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    notes = []
    if limit and max(lengths) + max(decode_tokens, answer_tokens) > limit:
        notes.append(f"the longest context + new tokens ({max(lengths) + max(decode_tokens, answer_tokens)}) exceeds "
                     f"the model's max_position_embeddings ({limit})")
    if not with_duo:
        notes.append("accel='duo_attention' is not registered in this hf_accel: vanilla only")
    if not with_passkey:
        notes.append("passkey retrieval skipped (--no-passkey)")
    shown = dict(duo_kwargs)
    if pattern is not None:
        shown["pattern"] = str(pattern) if isinstance(pattern, (str, Path)) else f"<{type(pattern).__name__}>"
    from . import report

    result = {
        "environment": report.environment(model, dtype or str(model.dtype).replace("torch.", ""), command, model_name),
        "config": {"methods": methods_pk, "cost_methods": cost_methods, "cost_cells": [list(c) for c in cells],
                   "passkey": bool(with_passkey), "duo_kwargs": shown, "lengths": lengths, "depths": depths,
                   "samples": samples, "answer_tokens": answer_tokens, "decode_tokens": decode_tokens, "reps": reps,
                   "chat_template": bool(chat and getattr(tok, "chat_template", None))},
        "notes": notes,
        "warmup_seconds": {},
        "retrieval": None,
        "cost": {"rows": []},
        "progress": None,
    }

    def saved(cost_done: int, passkey_done: bool) -> None:
        total = len(cells) + (1 if with_passkey else 0)
        done = cost_done + (1 if with_passkey and passkey_done else 0)
        result["progress"] = {"done": done, "total": total, "complete": done == total,
                              "cost_cells_done": cost_done, "cost_cells": len(cells),
                              "passkey": "skipped" if not with_passkey else "done" if passkey_done else "pending"}
        if out is not None:
            write(result, out, with_plots=False)

    saved(0, False)
    eager = [m for m in dict.fromkeys((methods_pk if with_passkey else []) + cost_methods)
             if not m.endswith("-static")]
    if warmup and eager:  # the eager methods' first calls (the static rows warm up per length, in the cost part)
        sample = passkey.make_sample(tok, min(lengths), 0.5, seed=99, chat=chat, texts=texts)
        for m in eager:
            t = time.perf_counter()
            _gen(model, sample.prompt, m, duo_kwargs, 4, pad)
            _sync(model.device)
            result["warmup_seconds"][m] = time.perf_counter() - t
    static_cols = _static_cols(cost_methods)
    if echo is not None and cells:
        echo(_cost_header(static_cols))

    def on_row(row, rows):
        result["cost"]["rows"] = rows
        if echo is not None:
            echo(_cost_line(row, static_cols))
        saved(len(rows), False)

    result["cost"] = cost(model, tok, cost_methods, duo_kwargs, lengths, decode_tokens, reps, pad, chat, texts,
                          progress, compose_kwargs, cells=cells, on_row=on_row)
    if with_passkey or not cells:  # (without it the last cell's write was the complete one)
        if with_passkey:
            result["retrieval"] = retrieval(model, tok, methods_pk, duo_kwargs, lengths, depths, samples,
                                            answer_tokens, pad, chat, texts, progress)
        saved(len(cells), True)
    return result


# ---- report --------------------------------------------------------------------------------------------------------


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def _x(x, fmt="{:.2f}x") -> str:
    return "–" if x is None else fmt.format(x)


def _static_cols(cost_methods) -> bool:
    return any(m.endswith("-static") for m in cost_methods)


def _cost_header(static: bool) -> str:
    return ("| length | method | KV MiB (end) | full-KV MiB | KV vs vanilla | peak MiB | peak vs vanilla "
            "| prefill s | decode tok/s | decode speedup |"
            + (" KV vs vanilla-static | peak vs vanilla-static | decode vs vanilla-static |" if static else "")
            + " held before MiB | call's peak MiB | call's peak vs vanilla" + ("-static" if static else "")
            + " | cell s |"
            + "\n|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if static else "") + "---|---|---|---|")


def _cost_line(r: dict, static: bool) -> str:
    tok_s = "–" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
    method = r["method"] + (" (engine)" if r.get("runner") == "engine" and r["method"] in (DUO, DUO_STATIC) else "")
    return (f"| {r['length']} | {method} | {_mib(r['kv_cache_bytes'])} | {_mib(r['full_kv_bytes'])} "
            f"| {_x(r.get('kv_ratio_vs_vanilla'))} | {_mib(r['peak_memory_bytes'])} "
            f"| {_x(r.get('peak_ratio_vs_vanilla'))} "
            f"| {r['prefill_seconds']:.3f} | {tok_s} | {_x(r.get('decode_speedup_vs_vanilla'))} |"
            + (f" {_x(r.get('kv_ratio_vs_vanilla_static'))} | {_x(r.get('peak_ratio_vs_vanilla_static'))} "
               f"| {_x(r.get('decode_speedup_vs_vanilla_static'))} |" if static else "")
            + f" {_mib(r.get('held_before_bytes'))} | {_mib(r.get('peak_added_bytes'))} "
            + f"| {_x(r.get('peak_added_ratio_vs_vanilla_static' if static else 'peak_added_ratio_vs_vanilla'))} |"
            + f" {_x(r.get('cell_seconds'), '{:.1f}')} |")


def partial_line(result: dict) -> str | None:
    """"partial: N of M cells (...)" while the run is unfinished (or was stopped), None once complete."""
    p = result.get("progress")
    if not p or p["complete"]:
        return None
    return (f"partial: {p['done']} of {p['total']} cells (memory/speed {p['cost_cells_done']} of {p['cost_cells']}"
            f"{', passkey grid ' + p['passkey'] if p['passkey'] != 'skipped' else ''}); the run is still going or "
            f"was stopped")


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    methods, lengths, depths = cfg["methods"], cfg["lengths"], cfg["depths"]
    partial = partial_line(result)
    lines = [f"# hf-accel bench duo — {env['model']} on {env['device']}", ""]
    if partial:
        lines += [f"**{partial}**", ""]
    lines += [
        f"- date: {env['date']}",
        f"- device: {env['device']}",
        f"- dtype: {env['dtype']}",
        f"- torch {env['torch']} · transformers {env['transformers']} · hf_accel {env['hf_accel']}",
        f"- command: `{env['command']}`",
        f"- DuoAttention settings: {json.dumps(cfg['duo_kwargs'])}",
        f"- passkey: {cfg['samples']} sample(s) per cell, greedy, {cfg['answer_tokens']} new tokens, correct = the "
        f"answer contains the key; chat template: {'yes' if cfg['chat_template'] else 'no'}",
        f"- decode timing: {cfg['decode_tokens']} new tokens (min_new_tokens), prefill cancelled by a 1-token call, "
        f"median of {cfg['reps']}, batch 1; cells measured one after the other, longest context first, static rows "
        f"first; cell s: the cell's wall time, its warm (compiling) call included",
        "- memory (CUDA): peak = torch.cuda.max_memory_allocated over the N-token call; held before = what was "
        "allocated when it started (each cell starts from the weights alone: what earlier cells compiled and captured "
        "is freed first; then the cell's warm call's compiled steps, CUDA graphs and, for hf_accel's engine, its "
        "reused workspace with the KV buffers); call's peak = peak - held before (the request's own working memory)",
    ]
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    lines += ["", "## Passkey retrieval accuracy (depth × context length)", ""]
    if result.get("retrieval") is None:
        lines += ["skipped (--no-passkey)" if not cfg.get("passkey", True) else "not measured yet", ""]
    else:
        acc = result["retrieval"]["accuracy"]
        for m in methods:
            lines += [f"**{m}** (mean {sum(map(sum, acc[m])) / (len(depths) * len(lengths)):.2f})", "",
                      "| depth \\ length | " + " | ".join(str(x) for x in lengths) + " |",
                      "|---|" + "---|" * len(lengths)]
            for di, d in enumerate(depths):
                lines.append(f"| {d:.2f} | " + " | ".join(f"{acc[m][di][li]:.2f}" for li in range(len(lengths)))
                             + " |")
            lines.append("")
    cost_methods = cfg.get("cost_methods", methods)
    static = _static_cols(cost_methods)
    order = {m: i for i, m in enumerate(cost_methods)}
    rows = sorted(result["cost"]["rows"], key=lambda r: (r["length"], order.get(r["method"], len(order))))
    lines += ["## Memory and decode speed", "", _cost_header(static)]
    lines += [_cost_line(r, static) for r in rows]
    if partial:
        lines += ["", f"({len(rows)} of {len(cfg.get('cost_cells') or rows)} cells measured so far.)"]
    else:
        lines += ["", "Plots: " + ", ".join(
            ([] if result.get("retrieval") is None else ["`passkey_heatmap.png`"]) + ["`kv_bytes.png`",
                                                                                      "`decode_tok_s.png`"]
            + (["`peak_memory.png`"] if any(r["peak_memory_bytes"] for r in rows) else [])) + "."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")

    env = result["environment"]
    out = Path(out)
    title = f"{env['model']} · {env['device']} · {env['dtype']}"
    files = []
    if result.get("retrieval") is not None:
        files += _heatmap(result, out, title)
    _cost_plots(result, out, title, files)
    return files


def _heatmap(result: dict, out: Path, title: str) -> list:
    import matplotlib.pyplot as plt

    cfg = result["config"]
    methods, lengths, depths = cfg["methods"], cfg["lengths"], cfg["depths"]
    acc = result["retrieval"]["accuracy"]
    fig, axes = plt.subplots(1, len(methods), figsize=(2.5 + (1.0 * len(lengths) + 1.2) * len(methods),
                                                        0.5 * len(depths) + 2), squeeze=False)
    im = None
    for i, (ax, m) in enumerate(zip(axes[0], methods)):
        im = ax.imshow(acc[m], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if i == 0:
            ax.set_ylabel("needle depth")
        mean = sum(map(sum, acc[m])) / (len(depths) * len(lengths))
        label = m if m == VANILLA else f"{m} (sparsity {cfg['duo_kwargs'].get('sparsity')})"
        ax.set_title(f"{label}: mean {mean:.2f}", fontsize=9)
        for di in range(len(depths)):
            for li in range(len(lengths)):
                ax.text(li, di, f"{acc[m][di][li]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="passkey accuracy")
    fig.suptitle(title, fontsize=9)
    fig.savefig(out / "passkey_heatmap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [out / "passkey_heatmap.png"]


def _cost_plots(result: dict, out: Path, title: str, files: list) -> None:
    import matplotlib.pyplot as plt

    cfg = result["config"]
    rows = sorted(result["cost"]["rows"], key=lambda r: r["length"])
    methods = cfg.get("cost_methods", cfg["methods"])
    panels = [("kv_cache_bytes", "KV cache at the end (MiB)", "kv_bytes.png", 2**20),
              ("decode_tok_s", "decode tokens / s", "decode_tok_s.png", 1),
              ("peak_memory_bytes", "peak CUDA memory (MiB)", "peak_memory.png", 2**20)]
    for key, name, fname, scale in panels:
        if not any(r[key] for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for i, m in enumerate(methods):
            pts = [(r["length"], r[key] / scale) for r in rows if r["method"] == m and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=m)
        if key == "kv_cache_bytes":
            pts = [(r["length"], r["full_kv_bytes"] / scale) for r in rows
                   if r["method"] == DUO and r.get("full_kv_bytes")]
            if pts:
                ax.plot(*zip(*pts), ls="--", color="grey", label="full KV (duo's count)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(name)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / fname)
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)


def write(result: dict, out, with_plots: bool = True) -> list:
    """results.json and results.md in ``out`` (and the plots unless ``with_plots=False``: the incremental writes
    during a run leave them to the end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / "results.json", json.dumps(result, indent=1, default=float) + "\n")
    _replace(out / "results.md", markdown(result))
    return [out / "results.json", out / "results.md"] + (plots(result, out) if with_plots else [])


def _floats(text: str) -> list:
    return [float(x) for x in str(text).split(",") if x.strip()]


def cli(args) -> int:
    """``hf-accel bench duo`` (options from the bench parser's duo group)."""
    from ..loading import default_artifact, load_model, model_label

    command = "hf-accel " + " ".join(args.argv)
    out = args.out if args.out != "benchmarks/results/latest" else "benchmarks/results/duo"
    model, tok = load_model(args.model, args.dtype, args.device)
    pattern = args.pattern
    if pattern is None and args.model == "default":  # the default model's committed gates, where present
        pattern = default_artifact("duo_attention")
        print(f"pattern: {pattern if pattern is not None else 'the default rule (no committed gates found)'}")
    result = run(
        model, tok, pattern=pattern, sparsity=args.sparsity, sink=args.sink, recent=args.recent,
        lengths=[int(x) for x in _floats(args.lengths)], depths=_floats(args.depths), samples=args.samples,
        answer_tokens=args.answer_tokens, decode_tokens=args.max_new_tokens, reps=args.reps,
        warmup=not args.no_warmup, progress=not args.no_progress, command=command, dtype=args.dtype,
        model_name=model_label(args.model), static=getattr(args, "static", False),
        duo_options={"static_kernel": args.static_kernel} if getattr(args, "static_kernel", None) else None,
        compose=[m for m in str(getattr(args, "compose", "aded") or "").split(",") if m.strip() and m != "none"],
        methods=getattr(args, "duo_methods", None), with_passkey=not getattr(args, "no_passkey", False), out=out,
        echo=lambda line: print(line, flush=True),
    )
    files = write(result, out)
    print(markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


__all__ = ["run", "retrieval", "cost", "cost_cells", "parse_methods", "ratios", "kv_bytes", "partial_line", "markdown", "plots", "write", "cli", "duo_available"]
