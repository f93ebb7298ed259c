"""Scale projection: what a method's measured acceptance profile buys on a 7-8B model.

The method is PROJECTION_METHOD below; it is written into every result so a reader can check it.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..engine.backends import sync

SHAPES = {
    "llama3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
    ),
    # for tests and CPU smoke runs
    "tiny": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192,
    ),
}

PROJECTION_METHOD = """1. On the bench device, time one forward of ``k`` new tokens (k = 1, 2, 4, ..., 64) over a cached prefix
   of P tokens (P = 512 and 4096 by default) for random-weight models of the target shapes, and for the bench model
   itself, two ways: eager on a DynamicCache (what the dynamic engine and HF's eager baselines run; the cache is
   cropped back to P after each), and as a replayed CUDA graph of the static engine's verify step (mask build,
   forward, argmax over a fixed slot buffer; not torch.compile'd, so kernels are unfused). Median of ``reps``
   timed forwards after warm-up. Methods that ran on a static cache (``+static``, ``vanilla-static``) are
   projected with the graphed timings, the others with the eager ones.
2. From the bench run, each method has: new tokens per decode forward ``tau`` (prefill excluded); mean query tokens per decode
   forward ``w`` (the verify width: 1 for vanilla, tree/chain nodes for speculative methods); and the time per
   decode step spent outside the target forward, ``o = decode seconds per forward - T_bench(w, 512)``, which is
   drafting, acceptance and the loop's own bookkeeping (host-side, so it does not grow with the model). It is
   never taken below the method's measured drafting time per step (drafting does not overlap the forward)
   nor below 0 (compiled steps, whose fused kernels beat the unfused graph, would otherwise go negative). For
   ``vanilla-static`` the prefill time is vanilla's on the same prompt (its own is not separable).
3. Projected seconds per token on shape S at prefix P: ``(T_S(w, P) + o) / tau``; vanilla's: ``T_S(1, P) + o_v``.
   Projected speedup = vanilla's / the method's; projected tok/s = 1 / the method's. ``T`` between measured k
   is interpolated linearly.
4. Roofline: the single-token bandwidth bound ``weight bytes / copy bandwidth`` (a device-to-device copy,
   bytes read + written / time) — no batch-1 decoder can beat it without reading fewer weight bytes.

What it leaves out: a drafter that itself runs a model that grows with the target (not the case for the
methods measured so far), and acceptance changing with model size (tau is taken from the bench model)."""

KS = (1, 2, 4, 8, 16, 32, 64)
PREFIXES = (512, 4096)



def build_shape(name: str, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in SHAPES:
        raise ValueError(f"unknown --project-shape {name!r}; known: {', '.join(SHAPES)}")
    spec = dict(SHAPES[name])
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


@torch.no_grad()
def time_forwards(model, ks=KS, prefixes=PREFIXES, reps: int = 10, progress: bool = True) -> dict:
    """{prefix: {k: median seconds}} for one eager forward of k tokens over a cached prefix."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = model.device
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    table = {}
    bar = tqdm(total=len(prefixes) * len(ks), desc=f"forward timings {model.config.model_type}", disable=not progress)
    for p in prefixes:
        cache = DynamicCache()
        ids = torch.randint(0, vocab, (1, p), generator=g).to(device)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        table[p] = {}
        for k in ks:
            q = torch.randint(0, vocab, (1, k), generator=g).to(device)
            pos = torch.arange(p, p + k, device=device)[None]
            times = []
            for i in range(reps + 2):
                sync(device)
                t = time.perf_counter()
                model(input_ids=q, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=k)
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t)
                cache.crop(-k)  # back to the prefix (negative: tokens to drop; works on 5.17 and 5.23)
            table[p][k] = statistics.median(times)
            bar.update(1)
        del cache
    bar.close()
    return table


def capture_step(step, device, warmup: int = 3):
    """A CUDA graph of ``step()`` captured the way torch's docs prescribe, and its output: ``step`` first runs
    eagerly on the current stream (every kernel and cuBLAS/cuBLASLt plan for these shapes chosen outside any
    capture), then ``warmup`` times on a side stream, then is captured *on that same side stream*, whose cuBLAS
    handle and workspace the warm-up has already created: nothing is created or allocated by cuBLAS during
    capture (the H200 run ended in ``CUBLAS_STATUS_EXECUTION_FAILED`` inside ``torch.cuda.graph`` when the
    capture ran on another stream than the warm-up)."""
    step()
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    side.synchronize()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = step()
    torch.cuda.synchronize(device)
    return graph, out


def _prepared_workspace(model, layout, p: int, k: int, vocab: int, g, device):
    """A static-engine workspace holding a prefix of ``p`` random tokens and a verify step of a causal chain of
    ``k`` random tokens written after it (the step's inputs hold a real step's values)."""
    from ..engine.backends import _Workspace

    ws = _Workspace(model, layout, 1, k, p + k + 1, device, model.dtype, None)
    ids = torch.randint(0, vocab, (1, p), generator=g).to(device)
    pos = torch.arange(p, device=device)[None]
    ws.slot_pos[0, : p + k] = torch.arange(p + k, device=device)
    ws.write_idx = pos[0]
    ws.forward(ids, pos, torch.ones(p, p, dtype=torch.bool, device=device).tril()[None], pos[0])
    ws.write_idx = ws.region
    ws.slot_valid[0, :p] = True
    ws.region.copy_(torch.arange(p, p + k, device=device))
    ws.tokens.copy_(torch.randint(0, vocab, (1, k), generator=g))
    ws.q_pos.copy_(torch.arange(p, p + k)[None])
    ws.q_visible.copy_(torch.ones(k, k, dtype=torch.bool).tril()[None])
    return ws


@torch.no_grad()
def time_forwards_graphed(model, ks=KS, prefixes=PREFIXES, reps: int = 10, progress: bool = True,
                          log=print) -> dict | None:
    """{prefix: {k: median seconds}} for one replay of the static engine's verify step (mask build, forward,
    argmax; a causal chain of k tokens over a cached prefix of P slots) captured as a CUDA graph
    (:func:`capture_step`). On a CPU the same step runs eagerly (what the tests exercise). None, with the error
    logged, when a capture fails (the projection then leaves out the static methods)."""
    from tqdm.auto import tqdm

    from .. import models

    device = model.device
    vocab = model.config.get_text_config().vocab_size
    layout = models.attention_layout(model)
    g = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    table = {}
    bar = tqdm(total=len(prefixes) * len(ks), desc=f"graphed timings {model.config.model_type}", disable=not progress)
    for p in prefixes:
        table[p] = {}
        for k in ks:
            ws = _prepared_workspace(model, layout, p, k, vocab, g, device)
            graph = None
            if cuda:
                try:
                    graph, _ = capture_step(ws.verify_step, device)
                except RuntimeError as e:
                    bar.close()
                    log(f"graphed timings of {model.config.model_type} skipped: capture at prefix {p}, k={k} "
                        f"failed ({str(e).splitlines()[0][:200]})")
                    return None
            times = []
            for i in range(reps + 2):
                sync(device)
                t = time.perf_counter()
                graph.replay() if graph is not None else ws.verify_step()
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t)
            table[p][k] = statistics.median(times)
            del ws, graph
            bar.update(1)
    bar.close()
    return table


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read + written."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 27)
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


def _intkeys(table: dict) -> dict:
    """Tables read back from JSON have string keys."""
    return {int(k): (_intkeys(v) if isinstance(v, dict) else v) for k, v in table.items()}


def interp(table_p: dict, w: float) -> float:
    table_p = {int(k): v for k, v in table_p.items()}
    ks = sorted(table_p)
    w = max(w, ks[0])
    for a, b in zip(ks, ks[1:]):
        if w <= b:
            return table_p[a] + (table_p[b] - table_p[a]) * (w - a) / (b - a)
    a, b = ks[-2], ks[-1]  # beyond the grid: extend the last segment, never downwards
    return table_p[b] + max(table_p[b] - table_p[a], 0.0) * (w - b) / (b - a)


def profiles(methods: dict, bench_tables: dict) -> dict:
    """Per-method tau, w and per-step overhead o (seconds) from bench aggregates and the bench model's timings
    (``bench_tables``: {"eager": table, "graphed": table or None})."""
    out = {}
    for label, a in methods.items():
        per_fwd = a.get("decode_seconds_per_forward")
        kind = "graphed" if a.get("static") else "eager"
        bench_table = bench_tables.get(kind)
        bench_table = _intkeys(bench_table) if bench_table is not None else None
        if per_fwd is None or bench_table is None:
            continue
        p = 512 if 512 in bench_table else min(bench_table)  # the bench's prompts + outputs are ~100-700 tokens
        w = a["verify_width"]
        dec = a["target_forwards"] - a["prompts"]  # each prompt's prefill forward yields its first token
        # host drafting does not overlap the forward: it is a floor on the overhead
        floor = (a.get("draft_seconds") or 0.0) / dec if dec > 0 else 0.0
        out[label] = {
            "tau": (a["new_tokens"] - a["prompts"]) / dec if dec > 0 else 1.0,
            "verify_width": w,
            "overhead_s": max(per_fwd - interp(bench_table[p], w), floor),
            "decode_seconds_per_forward": per_fwd,
            "timings": kind,
        }
    return out


def project(profs: dict, tables: dict, weight_bytes: dict, bandwidth: float, reference: str = "vanilla",
            graphed: dict | None = None) -> list:
    """Rows of projected tok/s and speedup vs ``reference`` per (shape, prefix, method). ``tables`` are eager
    timings, ``graphed`` (same keys) the static engine's; a profile's ``timings`` says which it uses."""
    rows = []
    tables = {s: _intkeys(t) for s, t in tables.items()}
    graphed = {s: _intkeys(t) for s, t in (graphed or {}).items()}
    for shape, table in tables.items():
        roof = bandwidth / weight_bytes[shape]
        for p, tp in table.items():
            ref = profs[reference]
            t_ref = interp(tp, 1.0) + ref["overhead_s"]
            for label, pr in profs.items():
                tab = tp
                if pr.get("timings") == "graphed":
                    if not graphed or shape not in graphed:
                        continue
                    tab = graphed[shape][p]
                per_tok = (interp(tab, pr["verify_width"]) + pr["overhead_s"]) / pr["tau"]
                rows.append({
                    "shape": shape, "prefix": p, "method": label, "timings": pr.get("timings", "eager"),
                    "projected_tok_s": 1.0 / per_tok, "projected_speedup": t_ref / per_tok,
                    "single_token_forward_s": tp[min(tp)], "roofline_tok_s": roof,
                })
    return rows


def markdown(proj: dict) -> str:
    lines = [
        "## Scale projection",
        "",
        proj["method"],
        "",
        f"Copy bandwidth {proj['bandwidth_bytes_s'] / 1e12:.2f} TB/s (read + written). Forward timings "
        "(ms, eager, one forward of k new tokens over a cached prefix):",
        "",
    ]
    for title, tables in (("eager", proj["forward_seconds"]), ("graphed", proj.get("graphed_forward_seconds") or {})):
        for shape, table in tables.items():
            ks = sorted(next(iter(table.values())), key=int)
            lines.append(f"| {shape} ({title}) | " + " | ".join(f"k={k}" for k in ks) + " |")
            lines.append("|---|" + "---|" * len(ks))
            for p, tp in table.items():
                lines.append(f"| prefix {p} | " + " | ".join(f"{tp[k] * 1e3:.2f}" for k in ks) + " |")
            lines.append("")
    lines += [
        "| shape | prefix | method | timings | projected tok/s | projected speedup vs vanilla | roofline tok/s (1 token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in proj["rows"]:
        lines.append(
            f"| {r['shape']} | {r['prefix']} | {r['method']} | {r.get('timings', 'eager')} | {r['projected_tok_s']:.1f} "
            f"| {r['projected_speedup']:.2f}x | {r['roofline_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(proj: dict, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s in proj["forward_seconds"] if s != "bench-model"]
    from .figures import _save, label_key, short_labels

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    graphed = {s: _intkeys(t) for s, t in (proj.get("graphed_forward_seconds") or {}).items()}
    for i, (shape, table) in enumerate(proj["forward_seconds"].items()):
        for j, (p, tp) in enumerate(_intkeys(table).items()):
            ks = sorted(tp)
            ax.plot(ks, [tp[k] * 1e3 for k in ks], marker="o", color=f"C{i}", ls="-" if j == 0 else "--",
                    label=f"{shape}, prefix {p}, eager")
            if shape in graphed:
                gp = graphed[shape][p]
                ax.plot(ks, [gp[k] * 1e3 for k in ks], marker="x", color=f"C{i}", ls=":" if j == 0 else "-.",
                        label=f"{shape}, prefix {p}, CUDA graph")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("new tokens in one forward (k)")
    ax.set_ylabel("ms per forward")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("forward cost vs tokens per forward", fontsize=9)
    ax = axes[1]
    rows = [r for r in proj["rows"] if r["shape"] in shapes]
    groups = sorted({(r["shape"], r["prefix"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    short = short_labels(methods)
    width = 0.8 / max(len(methods), 1)
    for mi, m in enumerate(methods):
        xs = [gi + mi * width for gi in range(len(groups))]
        ys = [next((r["projected_tok_s"] for r in rows if (r["shape"], r["prefix"]) == g and r["method"] == m), 0)
              for g in groups]
        ax.bar(xs, ys, width=width, label=short[m], color=f"C{mi % 10}")
    for gi, g in enumerate(groups):
        roof = next(r["roofline_tok_s"] for r in rows if (r["shape"], r["prefix"]) == g)
        ax.hlines(roof, gi - 0.1, gi + 0.9, colors="k", linestyles=":", label="1-token roofline" if gi == 0 else None)
    ax.set_xticks([gi + 0.4 - width / 2 for gi in range(len(groups))], [f"{s}\nprefix {p}" for s, p in groups],
                  fontsize=8)
    ax.set_ylabel("projected tok/s (batch 1)")
    ax.legend(fontsize=7)
    ax.set_title("projected decode speed", fontsize=9)
    path = out / "projection.png"
    _save(fig, path, label_key(short))
    plt.close(fig)
    return path


def run_projection(bench_model, methods: dict, shapes: list, dtype, ks=KS, prefixes=PREFIXES, reps=10,
                   progress=True) -> dict:
    device = bench_model.device
    tables = {"bench-model": time_forwards(bench_model, ks, prefixes, reps, progress)}
    graphed = {"bench-model": time_forwards_graphed(bench_model, ks, prefixes, reps, progress)}
    weight_bytes = {"bench-model": sum(p.numel() * p.element_size() for p in bench_model.parameters())}
    for s in shapes:
        m = build_shape(s, device, dtype)
        weight_bytes[s] = sum(p.numel() * p.element_size() for p in m.parameters())
        tables[s] = time_forwards(m, ks, prefixes, reps, progress)
        graphed[s] = time_forwards_graphed(m, ks, prefixes, reps, progress)
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    graphed = {s: t for s, t in graphed.items() if t is not None}
    bw = copy_bandwidth(device)
    profs = profiles(methods, {"eager": tables["bench-model"], "graphed": graphed.get("bench-model")})
    if "vanilla" not in profs:
        raise ValueError("the projection needs vanilla's profile from the same bench run")
    return {
        "method": PROJECTION_METHOD,
        "bandwidth_bytes_s": bw,
        "weight_bytes": weight_bytes,
        "forward_seconds": tables,
        "graphed_forward_seconds": graphed,
        "profiles": profs,
        "rows": project(profs, tables, weight_bytes, bw, graphed=graphed),
    }
