"""One table and one plot over several `hf-accel bench` runs: each method's speedup vs the run's strongest
baseline (`vanilla-static`), run by run (greedy / sampling, batch 1 / 8).

    python scripts/wave_summary.py benchmarks/results/h200-bf16-{greedy-b1,greedy2-b1,sample-b1,greedy-b8,sample-b8}-2026-12-02 \
        --out benchmarks/results/h200-bf16-summary-2026-12-02
writes OUT.md (markdown table) and OUT.png (grouped bars, the 1.0 line is vanilla-static of the same run).
``--earlier DIR ...``: runs of an earlier session that only fill the cells the runs left empty (marked † in the
table, hatched in the plot); in the runs themselves a method's first run wins."""
import argparse
import json
from pathlib import Path


def label(cfg: dict) -> str:
    mode = "sampling" if cfg.get("do_sample") else "greedy"
    return f"{mode} b{cfg.get('batch', 1)}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--earlier", nargs="*", default=[])
    a = ap.parse_args()
    runs, methods, earlier = [], [], set()
    for d in a.runs + a.earlier:
        r = json.loads((Path(d) / "results.json").read_text())
        runs.append((label(r["config"]), Path(d).name, r))
        if d in a.earlier:
            earlier.add(Path(d).name)
        for m, v in r["methods"].items():
            if m not in ("vanilla", "vanilla-static") and v.get("reference") and m not in methods:
                methods.append(m)
    cols = []  # one column per run kind; runs of the same kind (two greedy b1 runs) share it
    for lab, _, _ in runs:
        if lab not in cols:
            cols.append(lab)
    cell = {}
    base = {}
    for lab, name, r in runs:
        vs = r["methods"].get("vanilla-static", {})
        if name not in earlier:
            base.setdefault(lab, []).append(f"{vs.get('tok_s', float('nan')):.0f}")
        for m, v in r["methods"].items():
            if m in methods and (m, lab) not in cell:
                cell[(m, lab)] = (v["speedup"], v.get("tokens_per_forward"), name in earlier)
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols),
             "| vanilla-static tok/s (total tokens / time) | " + " | ".join(" / ".join(base.get(c, ["–"])) for c in cols) + " |"]
    for m in methods:
        row = []
        for c in cols:
            s = cell.get((m, c))
            row.append("–" if s is None else f"**{s[0]:.2f}x** ({s[1]:.2f} tok/fwd)" + (" †" if s[2] else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    src = ", ".join(f"`{n}`" for _, n, _ in runs if n not in earlier)
    old = ", ".join(f"`{n}`" for _, n, _ in runs if n in earlier)
    md = (f"Speedup vs `vanilla-static` of the same run (total tokens / total time), tokens per target forward in "
          f"brackets; runs: {src}." + (f" † an earlier run: {old}." if old else "") + "\n\n" + "\n".join(lines) + "\n")
    Path(a.out + ".md").write_text(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(cols)
    for j, c in enumerate(cols):
        xs, ys, hatch = [], [], []
        for i, m in enumerate(methods):
            s = cell.get((m, c))
            if s is not None:
                xs.append(i + (j - (len(cols) - 1) / 2) * width)
                ys.append(s[0])
                hatch.append("//" if s[2] else "")
        bars = ax.bar(xs, ys, width=width, label=c)
        for b, h in zip(bars, hatch):
            b.set_hatch(h)
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="vanilla-static (same run)")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([f"M{i + 1}" for i in range(len(methods))])
    ax.set_ylabel("speedup vs vanilla-static")
    ax.legend(fontsize=8, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars
    key = "\n".join(f"M{i + 1} = {m}" for i, m in enumerate(methods))
    fig.text(0.01, 0.01, key, fontsize=7, family="monospace", va="bottom")
    fig.subplots_adjust(bottom=0.12 + 0.028 * len(methods))
    fig.savefig(a.out + ".png", dpi=110)
    print(md)


if __name__ == "__main__":
    main()
