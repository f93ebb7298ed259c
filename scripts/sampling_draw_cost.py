"""Cost of drawing every node's token in one sampling step: the inverse-CDF draw (one position-keyed uniform per node,
engine/sampling.py) against the exponential race it replaced (V position-keyed noise values per node), with the
processing both share (temperature + transformers' top-p) for scale.

    OMP_NUM_THREADS=2 python scripts/sampling_draw_cost.py [--batch 8] [--nodes 16] [--vocab 49152] [--device cpu]
        [--scale 3]
    OMP_NUM_THREADS=2 python scripts/sampling_draw_cost.py --nucleus   # real logits: nucleus sizes, TOPP_MARGIN

Prints milliseconds per call (mean of --reps after one warm-up) of: processing, the race's noise, the race's draw,
the per-node uniforms, the inverse-CDF draw; and both steps' totals; then the engine's whole step
(``sampling._step``) with top-p through transformers' sort and through its top-K form (``TOPP_K``). On a GPU these are eager kernels (the captured
step replays the same ones); on a CPU the absolute numbers follow the machine's load."""

import argparse
import time

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from hf_accel.engine import sampling


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--scale", type=float, default=3.0, help="logits = scale * N(0, 1)")
    ap.add_argument("--nucleus", action="store_true", help="instead: the top-p 0.9 nucleus sizes of the default "
                    "model's real logits (T 0.7) and how many positions each TOPP_MARGIN would send to the sort")
    a = ap.parse_args()
    if a.nucleus:
        return nucleus()
    b, n, v, dev = a.batch, a.nodes, a.vocab, a.device
    torch.manual_seed(0)
    raw = torch.randn(b, n, v, device=dev) * a.scale
    rows = torch.arange(b, device=dev)[:, None].expand(b, n)
    pos = torch.arange(n, device=dev)[None].expand(b, n) + 100

    def timed(fn):
        fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / a.reps * 1e3

    temp, top_p = TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)

    def process():
        return top_p(None, temp(None, raw.reshape(b * n, v))).reshape(b, n, v)

    scores = process()
    noise = sampling.keyed_uniform(7, rows, pos, v).log_().neg_()

    def race():  # argmax p(v) / E_v, E_v ~ Exp(1)
        return (torch.softmax(scores, dim=-1) / noise.clamp_min(1e-30)).argmax(-1)

    u0 = sampling.keyed_uniform(7, rows, pos, 1, dtype=torch.float64)[..., 0]
    t_proc = timed(process)
    t_noise = timed(lambda: sampling.keyed_uniform(7, rows, pos, v).log_().neg_())
    t_race = timed(race)
    t_u = timed(lambda: sampling.keyed_uniform(7, rows, pos, 1, dtype=torch.float64))
    t_inv = timed(lambda: sampling.draw(scores, u0, None))
    print(f"B={b} N={n} V={v} {dev}, temperature 0.7 + top-p 0.9, logits {a.scale} * N(0, 1), ms per call")
    print(f"processing {t_proc:.1f} | race: noise {t_noise:.1f} + draw {t_race:.1f} = step {t_proc + t_noise + t_race:.1f}"
          f" | inverse CDF: uniforms {t_u:.2f} + draw {t_inv:.1f} = step {t_proc + t_u + t_inv:.1f}")
    # the whole step as the engine runs it (sampling._step): top-p through transformers' sort vs its top-K form
    ops = sampling.plan([temp, top_p])
    consts, state = sampling._Consts(ops, v, dev), sampling._State(ops, b, v, 64, dev)
    state.base_len.fill_(100)
    tokens = torch.zeros(b, n, dtype=torch.long, device=dev)
    anc = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))[None].expand(b, n, n).contiguous()
    seed = torch.tensor(7, device=dev)
    t_sort = timed(lambda: sampling._step(ops, consts, state, raw, tokens, anc, seed, None, fast=False))
    t_topk = timed(lambda: sampling._step(ops, consts, state, raw, tokens, anc, seed, None, fast=True))
    fast, exact = (sampling._step(ops, consts, state, raw, tokens, anc, seed, None, fast=f)[1] for f in (True, False))
    _, _, short = sampling.process(ops, consts, state, raw, tokens, anc, fast=True)
    same = "same draws" if bool((fast < 0).any()) is False and torch.equal(fast, exact) else "step falls back"
    print(f"step (sampling._step): top-p by sort {t_sort:.1f} | top-p from the top {sampling.TOPP_K} {t_topk:.1f} "
          f"({same}; nodes past the top {sampling.TOPP_K}: {int(short.sum())} of {b * n})")


def nucleus(questions=range(60, 68), new_tokens: int = 96):
    """The default model (fp32, CPU) samples an answer (T 0.7, top-p 0.9, seed 0) to each MT-Bench question; at every
    position of prompt + answer: the size of the 0.9 nucleus at T 0.7, transformers' float32 cumulative sum against a
    float64 one, and the positions :func:`sampling.top_p_candidates` flags at a few margins."""
    from hf_accel.data import mtbench
    from hf_accel.default_model import load_default

    model, tok = load_default()
    qs = mtbench.questions()
    logits = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": qs[q]["turns"][0]}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        torch.manual_seed(0)
        out = model.generate(ids, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=new_tokens)
        with torch.no_grad():
            logits.append(model(out).logits[0].float())
    s = TemperatureLogitsWarper(0.7)(None, torch.cat(logits))
    srt = s.sort(-1, descending=True).values.softmax(-1).cumsum(-1)
    size = ((srt < 0.9).sum(-1) + 1).float()
    print(f"{len(s)} positions (MT-Bench q{questions[0]}-{questions[-1]}): 0.9 nucleus median {float(size.median()):.0f}, "
          f"p99 {float(size.quantile(0.99)):.0f}, max {float(size.max()):.0f} tokens")
    print("positions whose nucleus (+ the margin) lies past the top K (top-p's top-K form sends them to the sort): "
          + ", ".join(f"K={k}: {int((size > k).sum())}" for k in (64, 128, 256, 512, 1024)))
    asc = s.sort(-1).values
    gap = (asc.softmax(-1).cumsum(-1).double() - asc.double().softmax(-1).cumsum(-1)).abs().max()
    print(f"transformers' float32 cumulative sum vs float64: max difference {float(gap):.2g}")
    top_p = TopPLogitsWarper(0.9)
    ref = top_p(None, s.clone())
    saved = sampling.TOPP_MARGIN
    try:
        for m in (1e-4, 1e-5, 2e-6, 1e-6):
            sampling.TOPP_MARGIN = m
            out, _, short = sampling.top_p_candidates(top_p, s, sampling.TOPP_K)
            print(f"margin {m:g}: {int(short.sum())} positions sent to the sort; the rest equal transformers': "
                  f"{torch.equal(out[~short], ref[~short])}")
    finally:
        sampling.TOPP_MARGIN = saved


if __name__ == "__main__":
    main()
