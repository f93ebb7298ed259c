"""Aggregates, JSON, markdown table and PNG plots of a bench run."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from .figures import _save, label_key, short_labels


def _q(xs: list, q: float) -> float:
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _sum(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) if xs else None


def aggregate(records: dict, reference: str, sampled: bool = False, vanilla: str = "vanilla") -> dict:
    """Per-method figures. ``speedup*`` are against ``reference`` (the headline baseline: ``vanilla-static`` when
    it ran, see :func:`hf_accel.bench.methods.headline_reference`), ``speedup_vs_vanilla`` against eager
    ``vanilla``, both measured in the same run. Under sampling (``sampled``) token match against vanilla is
    not defined (two draws of a distribution), and is left out (None)."""
    ref = records[reference]
    ref_rate = sum(r.new_tokens for r in ref) / sum(r.seconds for r in ref)
    van = records.get(vanilla, ref)
    van_rate = sum(r.new_tokens for r in van) / sum(r.seconds for r in van)
    out = {}
    for label, recs in records.items():
        tokens = sum(r.new_tokens for r in recs)
        secs = sum(r.seconds for r in recs)
        seqs = sum(r.batch for r in recs)
        fwd = sum(r.per_row_forwards for r in recs)  # per sequence (batch 1: the target forwards)
        dec_fwd = sum(r.decode_forwards for r in recs)  # batched decode forwards
        row_dec_fwd = sum(r.row_decode_forwards for r in recs)
        per_prompt_speedup = [r.tok_s / v.tok_s if v.tok_s else float("nan") for r, v in zip(recs, ref)]
        draft = _sum([r.draft_seconds for r in recs])
        verify = _sum([r.verify_seconds for r in recs])
        # the compiled baselines have no prefill split: their prefill is the eager one vanilla timed on the row
        estimated = any(r.prefill_seconds is None for r in recs)
        prefill = _sum([r.prefill_seconds if r.prefill_seconds is not None else v.prefill_seconds
                        for r, v in zip(recs, van)])
        nll_tok = [(r.nll, r.new_tokens) for r in recs if r.nll is not None and not math.isnan(r.nll)]
        width_num = sum(r.verify_width * r.row_decode_forwards for r in recs)
        accepted = [r.accepted_per_forward * r.row_decode_forwards for r in recs]
        fidelity = not sampled
        out[label] = {
            "prompts": seqs,
            "rows": len(recs),
            "batch": max(r.batch for r in recs),
            "new_tokens": tokens,
            "new_tokens_per_row": [r.new_tokens for r in recs],
            "seconds": secs,
            "tok_s": tokens / secs if secs else 0.0,
            "tok_s_median": statistics.median(r.tok_s for r in recs),
            "tok_s_p10": _q([r.tok_s for r in recs], 0.1),
            "tok_s_p90": _q([r.tok_s for r in recs], 0.9),
            "reference": reference,
            "speedup": (tokens / secs) / ref_rate if secs else 0.0,
            "speedup_vs_vanilla": (tokens / secs) / van_rate if secs else 0.0,
            "speedup_median": _q(per_prompt_speedup, 0.5),
            "speedup_p10": _q(per_prompt_speedup, 0.1),
            "speedup_p90": _q(per_prompt_speedup, 0.9),
            "speedup_per_prompt": per_prompt_speedup,
            "target_forwards": fwd,
            "batched_forwards": sum(r.target_forwards for r in recs),
            "forwards_per_token": fwd / tokens if tokens else 0.0,
            "tokens_per_forward": tokens / fwd if fwd else 0.0,
            "accepted_per_forward": sum(accepted) / row_dec_fwd if row_dec_fwd else 0.0,
            "verify_width": width_num / row_dec_fwd if row_dec_fwd else 1.0,
            "prefill_seconds": prefill,
            "draft_seconds": draft,
            "verify_seconds": verify,
            "draft_fraction": draft / (draft + verify) if draft is not None and verify else None,
            "decode_seconds_per_forward": (secs - prefill) / dec_fwd if prefill is not None and dec_fwd else None,
            "prefill_estimated": estimated,
            "static": bool(recs[0].static),
            "peak_memory_bytes": max((r.peak_memory_bytes for r in recs if r.peak_memory_bytes), default=None),
            "kv_cache_bytes_mean": statistics.mean(r.kv_cache_bytes for r in recs) if recs[0].kv_cache_bytes is not None else None,
            "kv_cache_bytes_max": max((r.kv_cache_bytes or 0) for r in recs),
            "token_match": statistics.mean(r.token_match for r in recs) if fidelity else None,
            "prefix_match": statistics.mean(r.prefix_match for r in recs) if fidelity else None,
            "exact_match": sum(bool(r.exact_match) for r in recs) / len(recs) if fidelity else None,
            "compile_seconds_per_call": (
                statistics.mean(r.compile_seconds for r in recs) if recs[0].compile_seconds is not None else None
            ),
            "nll": sum(n * t for n, t in nll_tok) / sum(t for _, t in nll_tok) if nll_tok else None,
            "method_stats": {k: statistics.mean(r.method_stats[k] for r in recs)
                             for k in (recs[0].method_stats or {}) if all(k in r.method_stats for r in recs)},
            "greedy_agreement": (sum(r.greedy_agreement * r.new_tokens for r in recs
                                     if r.greedy_agreement is not None and not math.isnan(r.greedy_agreement))
                                 / max(1, sum(r.new_tokens for r in recs if r.greedy_agreement is not None
                                              and not math.isnan(r.greedy_agreement)))
                                 if any(r.greedy_agreement is not None for r in recs) else None),
        }
    return out


def environment(model, dtype: str, command: str, model_name: str | None = None) -> dict:
    import transformers

    import hf_accel

    dev = model.device
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": name,
        "device_type": dev.type,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_accel": hf_accel.__version__,
        "python": platform.python_version(),
        "model": model_name or str(getattr(model.config, "_name_or_path", "")) or model.config.model_type,
        "quantization": _quantization_label(model),
        "command": command,
        # the auto budget's graphed widths when set for the process (engine/budget.py graph_widths)
        "graph_widths": os.environ.get("HF_ACCEL_GRAPH_WIDTHS") or None,
    }


def _quantization_label(model) -> str:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return "none"
    d = qc if isinstance(qc, dict) else qc.to_dict()
    qm = str(d.get("quant_method", "?"))
    if d.get("load_in_4bit"):
        return f"{qm} 4-bit {d.get('bnb_4bit_quant_type', '')}".strip()
    if d.get("load_in_8bit"):
        return f"{qm} 8-bit"
    return f"{qm} {d.get('bits', '')}-bit".strip()


def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


BF16_NOTE = (
    "Reduced precision ({dtype}): a lossless method's verify forward (several tokens at once) and vanilla's one-token "
    "decode forward run different kernels with a different reduction order, so near-tie logits can flip a greedy "
    "token, after which the two continuations part. Token match below 1 is expected under {dtype} for lossless "
    "methods (HF's prompt lookup included); greedy agree (teacher-forced: each token is the model's argmax after "
    "the method's own prefix) is the per-step check, and fp32 (`--dtype fp32`) gives token-identical output "
    "(the test suite checks it)."
)


def _baselines_text(result: dict, labels) -> list:
    cfg = result["config"]
    out = []
    if "vanilla-static" in labels or any(m.startswith("hf-") and m.endswith("+static") for m in labels):
        out.append(
            f"HF static baselines (`vanilla-static`, `hf-pld+static`, `hf-assisted+static`): `generate(..., "
            f"cache_implementation=\"static\", max_cache_len={cfg.get('max_cache_len')})`, one cache size for the "
            f"whole run (the longest row + max_new_tokens) so transformers never resizes the cache nor recompiles "
            f"for a new prompt length; transformers compiles the forward itself on a GPU (its default CompileConfig); "
            f"warmed up untimed on each of the run's {cfg.get('warmup_shapes', '?')} distinct row shape(s) "
            f"(batch, padded prompt length) before any timed call, and once more after every method's warm-up. "
            f"Each keeps its own record of transformers' largest cache size (`_previous_max_cache_length`), so one "
            f"baseline's cache never resizes another's"
            + (f"; torch's recompile limit raised to {cfg['dynamo_recompile_limit']} (several baselines share "
               f"transformers' one compiled forward)" if cfg.get("dynamo_recompile_limit") else "")
            + f". `hf-pld+static` / `hf-assisted+static` get "
            f"64 more slots (transformers 5.24 writes the last verify's draft candidates past max_length on a static "
            f"cache)."
        )
    if "vanilla-static-naive" in labels:
        out.append(
            "`vanilla-static-naive`: `generate(..., cache_implementation=\"static\")` alone, as a user first calls it: "
            "transformers sizes the cache per call (growing it when a longer call comes), one short warm-up call; "
            "any resize or recompilation inside a timed call is counted."
        )
    return out


def markdown(result: dict) -> str:
    env, agg, cfg = result["environment"], result["methods"], result["config"]
    labels = list(agg)
    ref = cfg.get("reference") or next(iter(agg.values())).get("reference", "vanilla")
    sampled = bool(cfg.get("do_sample"))
    batch = cfg.get("batch", 1)
    decoding = cfg.get("decoding", "greedy")
    lines = [
        f"# hf-accel bench — {env['model']} on {env['device']}",
        "",
    ]
    prog = result.get("progress")
    if prog:  # written while the run goes on: what a run killed now leaves behind
        lines += [
            f"**partial: {prog['rows_done']} of {prog['rows']} rows** (every method measured on the same "
            f"{prog['rows_done']} row(s); the run had not finished when this was written; NLL and greedy agree are "
            "computed at the end, – here).",
            "",
        ]
    lines += [
        f"{env['date']} · dtype {env['dtype']} · weights {env.get('quantization', 'none')} · torch {env['torch']} · transformers {env['transformers']} · "
        f"hf_accel {env['hf_accel']} · {cfg['prompts']} prompts ({cfg['prompt_source']}"
        f"{', questions ' + cfg['questions'] if cfg.get('questions') else ''}) · "
        f"max_new_tokens {cfg['max_new_tokens']} · batch {batch} (rows of {batch} prompts, left padded) · {decoding}"
        + (f" · HF_ACCEL_GRAPH_WIDTHS={env['graph_widths']}" if env.get("graph_widths") else ""),
        "",
        f"Command: `{env['command']}`",
        "",
        f"**Headline: speedup vs `{ref}`** (tok/s over the run's total tokens and time against `{ref}`'s, same run); "
        "`x vanilla`: the same against eager `vanilla` (HF generate, dynamic cache). Methods interleaved per row; "
        "every timed call after a garbage collection and with the ADED datastores' lookup caches emptied. "
        "tok/s counts every sequence's new tokens up to and including its eos (padding not counted); median over "
        f"rows [p10–p90]. Per-row speedup (vs `{ref}`): median [p10–p90]. Tokens/forward: new tokens per target "
        "forward and sequence. "
        + ("Match: n/a under sampling (vanilla's tokens are one draw of the distribution, not a reference; the "
           "distribution tests are in the test suite). " if sampled else
           "Match: against vanilla's tokens, sequence by sequence, position by position. ")
        + "Greedy agree: share of the method's tokens that are the model's own argmax after the same prefix "
        "(teacher-forced). NLL: the model's, of the method's tokens. Warm-up: the untimed first call(s) (includes "
        "torch.compile for the HF static baselines). Capture: CUDA-graph capture inside each timed call of a "
        "`+static` hf_accel method (included in its tok/s).",
        "",
    ]
    lines += [t + "\n" for t in _baselines_text(result, labels)]
    if env.get("dtype") in ("bf16", "bfloat16", "fp16", "float16") and not sampled:
        lines += [BF16_NOTE.format(dtype=env["dtype"]), ""]
    lines += [
        f"| method | tok/s | speedup vs {ref} | x vanilla | per-row speedup | new tokens | tokens/forward "
        "| accepted/forward | draft / verify s | peak mem MiB | KV MiB (end) | token match | exact | greedy agree | NLL "
        "| warm-up s | capture s/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, a in agg.items():
        dv = (
            f"{a['draft_seconds']:.2f} / {a['verify_seconds']:.2f}"
            if a["draft_seconds"] is not None and a["verify_seconds"] is not None
            else "–"
        )
        na = "n/a" if sampled else "–"
        tm = na if a.get("token_match") is None else f"{a['token_match']:.3f}"
        ex = na if a.get("exact_match") is None else f"{a['exact_match']:.2f}"
        head = f"**{a['speedup']:.2f}x**" if label != ref else "1.00x"
        lines.append(
            f"| {label} | {a['tok_s_median']:.1f} [{a['tok_s_p10']:.1f}–{a['tok_s_p90']:.1f}] "
            f"| {head} | {a.get('speedup_vs_vanilla', a['speedup']):.2f}x "
            f"| {a['speedup_median']:.2f} [{a['speedup_p10']:.2f}–{a['speedup_p90']:.2f}] | {a['new_tokens']} "
            f"| {_f(a['tokens_per_forward'] or None)} | {a['accepted_per_forward']:.2f} | {dv} "
            f"| {_mib(a['peak_memory_bytes'])} | {_mib(a['kv_cache_bytes_mean'])} | {tm} "
            f"| {ex} | {_f(a.get('greedy_agreement'), '{:.3f}')} | {_f(a['nll'], '{:.3f}')} | {_f(result['warmup_seconds'].get(label), '{:.1f}')} "
            f"| {_f(a.get('compile_seconds_per_call'), '{:.3f}')} |"
        )
    if batch > 1:
        lines += ["", "New tokens per row (sum over the row's sequences, each to its eos):", ""]
        lines += [f"- {label}: " + ", ".join(str(n) for n in a.get("new_tokens_per_row", [])) for label, a in agg.items()]
    figures = [(label, a["method_stats"]) for label, a in agg.items() if a.get("method_stats")]
    if figures:
        lines += ["", "Method figures (mean over rows, from `hf_accel.stats(out).extra`):", ""]
        lines += [f"- {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in st.items()) for label, st in figures]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"`{m}` ({why})" for m, why in result["skipped"])]
    proj = result.get("projection")
    if proj:
        from .project import markdown as proj_md

        lines += ["", proj_md(proj)]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = result["methods"]
    labels = list(agg)
    short = short_labels(labels)
    key = label_key(short)
    names = [short[m] for m in labels]
    ref = result["config"].get("reference") or agg[labels[0]].get("reference", "vanilla")
    files = []
    title = (f"{result['environment']['model']} · {result['environment']['device']} · {result['environment']['dtype']}"
             f" · batch {result['config'].get('batch', 1)} · {result['config'].get('decoding', 'greedy')}")
    title = "\n".join(__import__("textwrap").wrap(title, 90))
    van_ratio = (agg["vanilla"]["tok_s"] / agg[ref]["tok_s"]) if "vanilla" in agg and ref != "vanilla" else None

    fig, ax = plt.subplots(figsize=(min(16, max(5, 0.7 * len(labels) + 2)), 4.2))
    ax.boxplot([agg[m]["speedup_per_prompt"] for m in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), names, rotation=30, ha="right", fontsize=8)
    ax.scatter(range(1, len(labels) + 1), [agg[m]["speedup"] for m in labels], marker="D", color="C3", zorder=3,
               label="total tokens / total time")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label=f"{ref} (1.0)")
    if van_ratio is not None:
        ax.axhline(van_ratio, color="C2", lw=0.8, ls=":", label=f"eager vanilla ({van_ratio:.2f})")
    ax.set_ylabel(f"speedup vs {ref} (per row)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    files.append(out / "speedup.png")
    _save(fig, files[-1], key)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(min(16, max(5, 0.7 * len(labels) + 2)), 4.2))
    ax.bar(range(len(labels)), [agg[m]["tokens_per_forward"] for m in labels], color="C0")
    ax.set_ylabel("new tokens per target forward (per sequence)")
    ax.set_xticks(range(len(labels)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=8)
    files.append(out / "tokens_per_forward.png")
    _save(fig, files[-1], key)
    plt.close(fig)

    panels = [("token_match", "token match vs vanilla"), ("greedy_agreement", "greedy agreement (teacher-forced)"),
              ("nll", "model NLL of the output (nats/token)")]
    panels = [p for p in panels if any(agg[m].get(p[0]) is not None for m in labels)]
    if panels:  # none under sampling without --nll
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
        for ax, (k, name) in zip(axes[0], panels):
            for i, m in enumerate(labels):
                if agg[m].get(k) is not None:
                    ax.scatter(agg[m]["speedup"], agg[m][k], color=f"C{i % 10}", marker="os^Dv"[i // 10 % 5],
                               label=short[m], s=40)
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(f"speedup vs {ref}")
            ax.set_ylabel(name)
            if k != "nll":
                ax.set_ylim(-0.02, 1.02)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(title, fontsize=8)
        files.append(out / "fidelity_vs_speedup.png")
        _save(fig, files[-1], key)
        plt.close(fig)

    shared = [m for m in labels if "large_share" in agg[m].get("method_stats", {})]
    if shared:  # two-model methods (EAD): quality against how much of the output the large model wrote
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
        for ax, (k, name) in zip(axes, [("greedy_agreement", "greedy agreement (teacher-forced)"),
                                        ("nll", "large model's NLL of the output")]):
            for i, m in enumerate(shared):
                ax.scatter(agg[m]["method_stats"]["large_share"], agg[m].get(k), color=f"C{i % 10}", label=short[m],
                           s=40)
            if agg[labels[0]].get(k) is not None:
                ax.axhline(agg[labels[0]][k], color="grey", lw=0.8, ls="--", label=labels[0])
            ax.set_xlabel("share of tokens from the large model")
            ax.set_ylabel(name)
            ax.set_xlim(-0.02, 1.02)
        axes[0].legend(fontsize=6)
        fig.suptitle(title, fontsize=8)
        files.append(out / "quality_vs_large_share.png")
        _save(fig, files[-1], key)
        plt.close(fig)

    if result.get("projection"):
        from .project import plot as proj_plot

        files.append(proj_plot(result["projection"], out))
    return files


def _replace(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a run killed mid-write leaves the previous
    version, never half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(result: dict, records: dict, out: Path, with_plots: bool = True) -> list:
    """results.json and results.md in ``out`` (each replaced atomically), and the plots unless ``with_plots=False``
    (the partial writes during a run, see ``result["progress"]``, leave them to the end)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    payload["per_prompt"] = {m: [r.as_dict() for r in recs] for m, recs in records.items()}
    _replace(out / "results.json", json.dumps(payload, indent=1, default=float))
    _replace(out / "results.md", markdown(result))
    return [out / "results.json", out / "results.md", *(plots(result, out) if with_plots else [])]
