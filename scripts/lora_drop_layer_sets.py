"""LoRA-Drop's greedy agreement by droppable layer set (issue 18: the agreement / layers-dropped frontier).

Greedy agreement (the share of generated tokens that are the model's own argmax after the same prefix, teacher-forced:
the bench's measure) of ``lora_drop`` at a period on the default model, for subsets of the committed adapter's
droppable layers (each keeps its trained LoRA), and for a set without the adapter. Hardware-independent up to float
rounding, so it runs on a CPU in fp32; prompts default to MT-Bench q20-25 (not the held-out q60+ of the GPU benches).

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/lora_drop_layer_sets.py [--start 20] [--prompts 6] [--tokens 128]
        [--sets all22,low12,...] [--no-adapter all22] [--adapter PATH --sets own]
    python scripts/lora_drop_layer_sets.py --plot RESULTS.txt OUT.png   # agreement against layers run per token
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import hf_accel  # noqa: F401  (registers accel=)
from hf_accel import loading
from hf_accel.bench.runner import nll_of
from hf_accel.data import mtbench

ART = "artifacts/smollm2-135m/lora_drop"
FULL = [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26, 27, 29]  # the committed set
SETS = {
    "all22": FULL,
    "odd15": [i for i in FULL if i % 2 == 1],
    "5to27_18": [i for i in FULL if 5 <= i <= 27],
    "pairs14": [2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27],
    "mid15": [i for i in FULL if 5 <= i <= 23],
    "upmid16": [i for i in FULL if 9 <= i <= 29],
    "mid12": [i for i in FULL if 9 <= i <= 23],
    "low15": [i for i in FULL if i <= 19],
    "low12": [i for i in FULL if i <= 15],
    "up10": [i for i in FULL if i >= 17],
    "low8": [i for i in FULL if i <= 10],
    "low7": [i for i in FULL if i <= 9],
    "low6": [i for i in FULL if i <= 7],
    "low5": [i for i in FULL if i <= 6],
    "low8no1": [i for i in FULL if 2 <= i <= 11],
    "low7no9": [1, 2, 3, 5, 6, 7, 10],
    "low7no7": [1, 2, 3, 5, 6, 9, 10],
    "low7no5": [1, 2, 3, 6, 7, 9, 10],
}


def layers_run(n_layers: int, dropped: int, period: int) -> float:
    """Layers run per token: the refresh step runs all of them, the period - 1 drop steps the rest."""
    return (n_layers + (period - 1) * (n_layers - dropped)) / period


def plot(results: str, out: str, period: int = 4, n_layers: int = 30) -> None:
    """The JSON lines of a run (``{"set", "n" or "dropped_layers", "adapter", "agree"}``) as agreement against layers
    run per token, the 0.85 target drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(results, encoding="utf-8") if line.startswith("{")]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for adapter, marker in ((True, "o"), (False, "x")):
        pts = [r for r in rows if r["adapter"] is adapter]
        xs = [layers_run(n_layers, r.get("dropped_layers", r.get("n")), period) for r in pts]
        ax.scatter(xs, [r["agree"] for r in pts], marker=marker,
                   label="with its trained LoRA" if adapter else "without the adapter")
        for r, x in zip(pts, xs):
            ax.annotate(r["set"], (x, r["agree"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.85, color="grey", ls="--", lw=1, label="issue 18's agreement target")
    ax.set_xlabel(f"layers run per token (period {period}, {n_layers} layers)")
    ax.set_ylabel("greedy agreement (teacher-forced)")
    ax.set_title("LoRA-Drop: agreement by droppable layer set")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", nargs=2, metavar=("RESULTS", "PNG"), help="draw a run's results and exit")
    ap.add_argument("--start", type=int, default=20, help="first MT-Bench question")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--period", type=int, default=4)
    ap.add_argument("--sets", default=",".join(SETS), help=f"names among {', '.join(SETS)}")
    ap.add_argument("--no-adapter", default="all22,low12", help="sets also run without the adapter (zero correction)")
    ap.add_argument("--adapter", default=ART, help="the LoRA-Drop artifact (default: the committed one); a set named "
                    "'own' is that artifact's own droppable layers")
    a = ap.parse_args()
    if a.plot:
        return plot(*a.plot, period=a.period)
    model, tok = loading.load_model("default", "fp32", "cpu")
    prompts = mtbench.prompts(tok, start=a.start, limit=a.prompts)
    n_layers = model.config.num_hidden_layers
    bare = set(filter(None, a.no_adapter.split(",")))
    print(f"lora_drop(period={a.period}), default model, fp32 CPU, MT-Bench q{a.start}-{a.start + a.prompts - 1}, "
          f"{a.tokens} new tokens; refresh steps are the full model, so drop_step_agree = (agree - 1/period) / "
          "(1 - 1/period)", flush=True)
    for name in a.sets.split(","):
        layers = json.load(open(f"{a.adapter}/config.json"))["settings"]["droppable"] if name == "own" else SETS[name]
        for adapter in ([a.adapter, None] if name in bare else [a.adapter]):
            t0, agree, n = time.time(), 0.0, 0
            for p in prompts:
                ids = torch.tensor([p])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.tokens,
                                     do_sample=False, accel="lora_drop",
                                     accel_kwargs={"adapter": adapter, "period": a.period, "droppable": layers})
                new = out[0, len(p):].tolist()
                agree += nll_of(model, p, new)[1] * len(new)
                n += len(new)
            ag = agree / max(1, n)
            print(json.dumps({"set": name, "dropped_layers": len(layers), "adapter": adapter is not None,
                              **({"artifact": a.adapter} if a.adapter != ART else {}),
                              "agree": round(ag, 3), "drop_step_agree": round((ag - 1 / a.period) / (1 - 1 / a.period), 3),
                              "layers_run_per_token": layers_run(n_layers, len(layers), a.period),
                              "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
