"""The fit loop every trained method shares."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import batches, collate


def fit(module, loss_fn, train, heldout: list, out, *, minutes: float = 10.0, max_steps: int | None = None,
        batch: int = 8, seq_len: int = 512, lr: float = 1e-3, seed: int = 0, eval_every: int = 100,
        eval_batches: int = 4, resume: bool = False, pad: int = 0, progress: bool = True, warmup: int = 50,
        clip: float | None = 1.0, after_step=None, final_metrics=None, desc: str = "train",
        eval_start: bool = False) -> dict:
    """Train ``module``'s trainable parameters on ``loss_fn(*batch) -> (loss, metrics)`` until ``minutes``
    of training time or ``max_steps``; held-out metrics every ``eval_every`` steps and at the end (logged to
    ``out/log.jsonl``); a checkpoint (``out/checkpoint.pt``) at every evaluation, picked up by ``resume``.
    ``eval_start``: also before the first step (a warm start's own metrics: ``heldout_start`` in the result, ``step
    0`` in the log), so a run that makes its init worse says so.

    ``train``: token sequences (batched here into (ids, mask), ``heldout`` likewise), or a callable ``step -> batch``
    for data made on the fly (``heldout`` is then a list of ready batches). ``after_step()`` runs after every
    optimizer step (e.g. a clamp); ``final_metrics()`` adds to the last evaluation's metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(module.parameters()).device
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    step, elapsed = 0, 0.0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, elapsed = state["step"], state["elapsed"]
        rng = state["rng"]
    log = open(out / "log.jsonl", "a")
    if callable(train):
        batch_at, eval_set = train, list(heldout)
    else:
        it = batches(train, batch, seq_len, pad, rng, device)
        batch_at = lambda step: next(it)  # noqa: E731
        eval_set = [collate(heldout[i : i + batch], seq_len, pad, device) for i in range(0, len(heldout), batch)]
    eval_set = eval_set[:eval_batches]

    def evaluate() -> dict:
        module.eval()
        sums: dict = {}
        with torch.no_grad():
            for b in eval_set:
                _, m = loss_fn(*b)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(eval_set)
        module.train()
        return sums

    budget = minutes * 60.0
    total = max_steps if max_steps is not None else None
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, unit="step")
    metrics = start = {}
    if eval_start and step == 0:
        start = evaluate()
        _record(log, 0, 0.0, float("nan"), start, bar)
    module.train()
    t_last = time.perf_counter()
    while (max_steps is None or step < max_steps) and elapsed < budget:
        loss, m = loss_fn(*batch_at(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", min=f"{elapsed / 60:.1f}")
        if step % eval_every == 0:
            metrics = evaluate()
            _record(log, step, elapsed, loss.item(), metrics, bar)
            torch.save({"module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "elapsed": elapsed, "rng": rng}, ckpt)
            t_last = time.perf_counter()  # evaluation is not training time
    bar.close()
    metrics = evaluate()
    if final_metrics is not None:
        module.eval()
        with torch.no_grad():
            metrics.update(final_metrics())
        module.train()
    _record(log, step, elapsed, float("nan") if step == 0 else loss.item(), metrics, None)
    log.close()
    module.eval()
    return {"steps": step, "train_minutes": round(elapsed / 60, 2), "heldout": metrics,
            **({"heldout_start": start} if start else {})}


def _record(log, step, elapsed, loss, metrics, bar) -> None:
    row = {"step": step, "minutes": round(elapsed / 60, 3), "loss": loss, **{k: round(v, 4) for k, v in metrics.items()}}
    log.write(json.dumps(row) + "\n")
    log.flush()
    text = " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
    (bar.write if bar is not None else print)(f"step {step}: held-out {text}")
