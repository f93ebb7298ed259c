"""Aggregates, JSON, markdown table and PNG plots of a bench run."""

from __future__ import annotations

import json
import math
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch


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


def aggregate(records: dict, reference: str) -> dict:
    """Per-method figures; speedups are against ``reference`` (vanilla) in the same run."""
    ref = records[reference]
    ref_rate = sum(r.new_tokens for r in ref) / sum(r.seconds for r in ref)
    out = {}
    for label, recs in records.items():
        tokens = sum(r.new_tokens for r in recs)
        secs = sum(r.seconds for r in recs)
        fwd = sum(r.target_forwards for r in recs)
        dec_fwd = sum(r.decode_forwards for r in recs)
        per_prompt_speedup = [r.tok_s / v.tok_s if v.tok_s else float("nan") for r, v in zip(recs, ref)]
        draft = _sum([r.draft_seconds for r in recs])
        verify = _sum([r.verify_seconds for r in recs])
        # the compiled baseline has no prefill split: its prefill is the eager one vanilla timed on the prompt
        estimated = any(r.prefill_seconds is None for r in recs)
        prefill = _sum([r.prefill_seconds if r.prefill_seconds is not None else v.prefill_seconds
                        for r, v in zip(recs, ref)])
        nll_tok = [(r.nll, r.new_tokens) for r in recs if r.nll is not None and not math.isnan(r.nll)]
        width_num = sum(r.verify_width * r.decode_forwards for r in recs)
        accepted = [r.accepted_per_forward * r.decode_forwards for r in recs]
        out[label] = {
            "prompts": len(recs),
            "new_tokens": tokens,
            "seconds": secs,
            "tok_s": tokens / secs if secs else 0.0,
            "tok_s_median": statistics.median(r.tok_s for r in recs),
            "tok_s_p10": _q([r.tok_s for r in recs], 0.1),
            "tok_s_p90": _q([r.tok_s for r in recs], 0.9),
            "speedup": (tokens / secs) / ref_rate if secs else 0.0,
            "speedup_median": _q(per_prompt_speedup, 0.5),
            "speedup_p10": _q(per_prompt_speedup, 0.1),
            "speedup_p90": _q(per_prompt_speedup, 0.9),
            "speedup_per_prompt": per_prompt_speedup,
            "target_forwards": fwd,
            "forwards_per_token": fwd / tokens if tokens else 0.0,
            "tokens_per_forward": tokens / fwd if fwd else 0.0,
            "accepted_per_forward": sum(accepted) / dec_fwd if dec_fwd else 0.0,
            "verify_width": width_num / dec_fwd if dec_fwd else 1.0,
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
            "token_match": statistics.mean(r.token_match for r in recs),
            "prefix_match": statistics.mean(r.prefix_match for r in recs),
            "exact_match": sum(bool(r.exact_match) for r in recs) / len(recs),
            "compile_seconds_per_call": (
                statistics.mean(r.compile_seconds for r in recs) if recs[0].compile_seconds is not None else None
            ),
            "nll": sum(n * t for n, t in nll_tok) / sum(t for _, t in nll_tok) if nll_tok else None,
            "method_stats": {k: statistics.mean(r.method_stats[k] for r in recs)
                             for k in (recs[0].method_stats or {}) if all(k in r.method_stats for r in recs)},
            "greedy_agreement": (sum(r.greedy_agreement * len(r.tokens) for r in recs if r.greedy_agreement is not None)
                                 / max(1, sum(len(r.tokens) for r in recs if r.greedy_agreement is not None))
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


def markdown(result: dict) -> str:
    env, agg = result["environment"], result["methods"]
    lines = [
        f"# hf-accel bench — {env['model']} on {env['device']}",
        "",
        f"{env['date']} · dtype {env['dtype']} · weights {env.get('quantization', 'none')} · torch {env['torch']} · transformers {env['transformers']} · "
        f"hf_accel {env['hf_accel']} · {result['config']['prompts']} prompts ({result['config']['prompt_source']}) · "
        f"max_new_tokens {result['config']['max_new_tokens']} · batch 1, greedy",
        "",
        f"Command: `{env['command']}`",
        "",
        "Speedups are against `vanilla` (HF greedy generate, dynamic cache) measured in the same run, methods "
        "interleaved per prompt. tok/s: median over prompts [p10–p90]. Speedup: total tokens / total time vs "
        "vanilla's; per-prompt median [p10–p90] beside it. Match: against vanilla greedy's tokens, position by position. "
        "Greedy agree: share of the method's tokens that are the model's own argmax after the same prefix "
        "(teacher-forced; per-step fidelity of lossy methods). NLL: the model's, of the method's tokens. Warm-up: the "
        "untimed first call (includes torch.compile for vanilla-static). Capture: CUDA-graph capture inside each "
        "timed call of a `+static` method (included in its tok/s).",
        "",
        "| method | tok/s | speedup | per-prompt speedup | tokens/forward | accepted/forward | draft / verify s "
        "| peak mem MiB | KV MiB (end) | token match | exact | greedy agree | NLL | warm-up s | capture s/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, a in agg.items():
        dv = (
            f"{a['draft_seconds']:.2f} / {a['verify_seconds']:.2f}"
            if a["draft_seconds"] is not None and a["verify_seconds"] is not None
            else "–"
        )
        lines.append(
            f"| {label} | {a['tok_s_median']:.1f} [{a['tok_s_p10']:.1f}–{a['tok_s_p90']:.1f}] "
            f"| {a['speedup']:.2f}x | {a['speedup_median']:.2f} [{a['speedup_p10']:.2f}–{a['speedup_p90']:.2f}] "
            f"| {a['tokens_per_forward']:.2f} | {a['accepted_per_forward']:.2f} | {dv} "
            f"| {_mib(a['peak_memory_bytes'])} | {_mib(a['kv_cache_bytes_mean'])} | {a['token_match']:.3f} "
            f"| {a['exact_match']:.2f} | {_f(a.get('greedy_agreement'), '{:.3f}')} | {_f(a['nll'], '{:.3f}')} | {_f(result['warmup_seconds'].get(label), '{:.1f}')} "
            f"| {_f(a.get('compile_seconds_per_call'), '{:.3f}')} |"
        )
    figures = [(label, a["method_stats"]) for label, a in agg.items() if a.get("method_stats")]
    if figures:
        lines += ["", "Method figures (mean over prompts, from `hf_accel.stats(out).extra`):", ""]
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
    files = []
    title = f"{result['environment']['model']} · {result['environment']['device']} · {result['environment']['dtype']}"

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    ax.boxplot([agg[m]["speedup_per_prompt"] for m in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right")
    ax.scatter(range(1, len(labels) + 1), [agg[m]["speedup"] for m in labels], marker="D", color="C3", zorder=3,
               label="total tokens / total time")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("speedup vs vanilla (per prompt)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "speedup.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4))
    ax.bar(labels, [agg[m]["tokens_per_forward"] for m in labels], color="C0")
    ax.set_ylabel("new tokens per target forward")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    files.append(out / "tokens_per_forward.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    panels = [("token_match", "token match vs vanilla greedy"), ("greedy_agreement", "greedy agreement (teacher-forced)"),
              ("nll", "model NLL of the output (nats/token)")]
    panels = [p for p in panels if any(agg[m].get(p[0]) is not None for m in labels)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for i, m in enumerate(labels):
            if agg[m].get(key) is not None:
                ax.scatter(agg[m]["speedup"], agg[m][key], color=f"C{i % 10}", label=m, s=40)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("speedup vs vanilla")
        ax.set_ylabel(name)
        if key != "nll":
            ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.append(out / "fidelity_vs_speedup.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    shared = [m for m in labels if "large_share" in agg[m].get("method_stats", {})]
    if shared:  # two-model methods (EAD): quality against how much of the output the large model wrote
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
        for ax, (key, name) in zip(axes, [("greedy_agreement", "greedy agreement (teacher-forced)"),
                                          ("nll", "large model's NLL of the output")]):
            for i, m in enumerate(shared):
                ax.scatter(agg[m]["method_stats"]["large_share"], agg[m].get(key), color=f"C{i % 10}", label=m, s=40)
            if agg[labels[0]].get(key) is not None:
                ax.axhline(agg[labels[0]][key], color="grey", lw=0.8, ls="--", label=labels[0])
            ax.set_xlabel("share of tokens from the large model")
            ax.set_ylabel(name)
            ax.set_xlim(-0.02, 1.02)
        axes[0].legend(fontsize=6)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        files.append(out / "quality_vs_large_share.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    if result.get("projection"):
        from .project import plot as proj_plot

        files.append(proj_plot(result["projection"], out))
    return files


def write(result: dict, records: dict, out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(result)
    payload["per_prompt"] = {m: [r.as_dict() for r in recs] for m, recs in records.items()}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / "results.md").write_text(markdown(result))
    return [out / "results.json", out / "results.md", *plots(result, out)]
