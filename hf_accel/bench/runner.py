"""Run every bench method on the same prompts in one process and collect per-prompt records.

Methods are interleaved per prompt (the order rotates from prompt to prompt) so that drift of the machine
(clocks, other tenants) hits every method alike; each method is warmed up first, untimed. Every ratio is
taken against ``vanilla`` measured in the same run.

Counting target forwards: hf_accel methods report theirs (``hf_accel.stats``); for HF's eager baselines
(vanilla, prompt lookup, assisted) a forward hook on the target counts calls and query tokens. The compiled
static baseline can't carry a Python hook (it would break the graph), so its forwards are counted as one per
new token, which is what vanilla decoding does by construction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from ..engine.backends import sync
from ..engine.cache import cache_nbytes
from .methods import MethodSpec, generate_kwargs



class _ForwardCounter:
    """Counts target forwards and their query tokens; times the first (prefill) forward of a call.

    The hooks sit on the (possibly shared) model but count only the forwards of the thread that entered the
    counter: another thread's request on the same model is not counted."""

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.handles = []
        self.owner = None
        self.reset()

    def reset(self):
        self.calls = 0
        self.query_tokens = 0  # decode forwards only
        self.prefill_seconds = 0.0
        self._t0 = None

    def _pre(self, module, args, kwargs):
        if threading.get_ident() != self.owner:
            return
        if self.calls == 0:
            sync(self.device)
            self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        if threading.get_ident() != self.owner:
            return
        if self.calls == 0 and self._t0 is not None:
            sync(self.device)
            self.prefill_seconds = time.perf_counter() - self._t0
        else:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None:
                self.query_tokens += ids.shape[-1]
        self.calls += 1

    def __enter__(self):
        self.owner = threading.get_ident()
        self.handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@dataclass
class Record:
    """One method on one prompt (batch 1, greedy)."""

    method: str
    prompt: int
    prompt_tokens: int
    new_tokens: int
    seconds: float
    tokens: list = field(repr=False)
    target_forwards: int = 0  # prefill included
    verify_width: float = 1.0  # mean query tokens per decode forward
    prefill_seconds: float | None = None
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    accepted_tokens: int | None = None
    peak_memory_bytes: int | None = None
    kv_cache_bytes: int | None = None
    token_match: float | None = None  # position-wise agreement with vanilla greedy, over vanilla's length
    prefix_match: float | None = None  # tokens before the first divergence / vanilla's length
    exact_match: bool | None = None
    nll: float | None = None  # the model's mean NLL of these new tokens (teacher-forced, same model)
    # share of these new tokens that are the model's own greedy choice after the same prefix (teacher-forced):
    # for lossy methods, per-step fidelity that does not collapse after a first divergence as token_match does
    greedy_agreement: float | None = None
    method_stats: dict = field(default_factory=dict)  # the method's own numeric figures (AccelStats.extra)
    compile_seconds: float | None = None  # graph capture / compilation inside this call (static engine)
    static: bool = False  # ran on a static cache with compiled / graphed forwards

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def decode_forwards(self) -> int:
        return max(self.target_forwards - 1, 0)

    @property
    def accepted_per_forward(self) -> float:
        """Draft tokens accepted per decode forward (the bonus token of each forward not counted)."""
        if not self.decode_forwards:
            return 0.0
        if self.accepted_tokens is not None:
            return self.accepted_tokens / self.decode_forwards
        return max(self.new_tokens - self.target_forwards, 0) / self.decode_forwards

    def as_dict(self, with_tokens: bool = False) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("tokens")
        d.update(
            tok_s=self.tok_s, tokens_per_forward=self.tokens_per_forward, accepted_per_forward=self.accepted_per_forward
        )
        return d


def run_once(model, spec: MethodSpec, ids: list, max_new_tokens: int, pad_token_id, draft=None, prompt_index=-1):
    device = model.device
    x = torch.tensor([ids], device=device)
    kw = generate_kwargs(spec, draft)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # hf_accel methods report their own counts (their static engine replays CUDA graphs, which a hook can't
    # see); HF's eager baselines are counted by the hook; the compiled baseline can't carry one (see above)
    hooked = spec.is_baseline and not spec.compiled
    counter = _ForwardCounter(model)
    sync(device)
    t0 = time.perf_counter()
    if hooked:
        counter.__enter__()
    try:
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
            **kw,
        )
        sync(device)
    finally:
        if hooked:
            counter.__exit__()
    seconds = time.perf_counter() - t0
    new = out.sequences[0, len(ids) :].tolist()
    rec = Record(spec.label, prompt_index, len(ids), len(new), seconds, new, static=spec.compiled or spec.static)
    st = getattr(out, "accel_stats", None)
    if hooked:
        rec.target_forwards = counter.calls
        rec.verify_width = counter.query_tokens / max(counter.calls - 1, 1) if counter.calls > 1 else 1.0
        rec.prefill_seconds = counter.prefill_seconds
        rec.kv_cache_bytes = cache_nbytes(getattr(out, "past_key_values", None))
    elif st is not None:
        rec.target_forwards = st.target_forwards
        rec.verify_width = st.extra.get("verify_width") or (
            (st.drafted_tokens + st.row_forwards - st.batch_size) / max(st.row_forwards - st.batch_size, 1)
        )
        rec.draft_seconds = st.draft_seconds
        rec.verify_seconds = st.verify_seconds
        rec.prefill_seconds = st.prefill_seconds
        rec.accepted_tokens = st.accepted_tokens
        rec.kv_cache_bytes = st.kv_cache_bytes
        rec.compile_seconds = st.extra.get("compile_seconds")
        rec.method_stats = {k: v for k, v in st.extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    else:  # the compiled static baseline: one forward per token by construction
        rec.target_forwards = len(new)
        rec.kv_cache_bytes = cache_nbytes(getattr(out, "past_key_values", None))
    if device.type == "cuda":
        rec.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return rec


def _compare(rec: Record, ref: Record) -> None:
    a, b = rec.tokens, ref.tokens
    n = len(b)
    same = sum(1 for i in range(min(len(a), n)) if a[i] == b[i])
    first = next((i for i in range(min(len(a), n)) if a[i] != b[i]), min(len(a), n))
    rec.token_match = same / n if n else 1.0
    rec.prefix_match = first / n if n else 1.0
    rec.exact_match = a == b


@torch.no_grad()
def nll_of(model, prompt: list, new: list) -> tuple:
    """(mean negative log-likelihood in nats/token, share of tokens equal to the model's argmax) of ``new`` after
    ``prompt``, teacher-forced by the model."""
    if not new:
        return float("nan"), float("nan")
    ids = torch.tensor([prompt + new], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    target = ids[0, len(prompt) :]
    nll = float(torch.nn.functional.cross_entropy(logits, target, reduction="mean"))
    return nll, float((logits.argmax(-1) == target).float().mean())


def run_bench(
    model,
    prompts: list,
    specs: list,
    max_new_tokens: int,
    pad_token_id,
    draft=None,
    warmup: bool = True,
    with_nll: bool = True,
    progress: bool = True,
    log=print,
) -> dict:
    """Records of every (prompt, method) plus warm-up times. ``specs[0]`` must be vanilla."""
    from tqdm.auto import tqdm

    assert specs[0].name == "vanilla"
    warm = {}
    if warmup:
        longest = max(prompts, key=len)
        for spec in tqdm(specs, desc="warm-up", disable=not progress):
            # static paths size (and compile for) their cache on the first call: give them the longest one,
            # so that every timed call reuses what the warm-up built
            static = spec.compiled or spec.static
            ids, n = (longest, max_new_tokens) if static else (prompts[0], min(max_new_tokens, 16))
            t = time.perf_counter()
            run_once(model, spec, ids, n, pad_token_id, draft)
            warm[spec.label] = time.perf_counter() - t
    records = {s.label: [] for s in specs}
    bar = tqdm(total=len(prompts) * len(specs), desc="bench (prompt x method)", disable=not progress)
    for i, ids in enumerate(prompts):
        k = i % len(specs)
        for spec in specs[k:] + specs[:k]:
            rec = run_once(model, spec, ids, max_new_tokens, pad_token_id, draft, prompt_index=i)
            records[spec.label].append(rec)
            bar.set_postfix_str(f"{spec.label}: {rec.tok_s:.1f} tok/s")
            bar.update(1)
    bar.close()
    ref = records[specs[0].label]
    for label, recs in records.items():
        for r, v in zip(recs, ref):
            _compare(r, v)
    if with_nll:
        cache = {}
        for label, recs in tqdm(records.items(), desc="NLL of outputs", disable=not progress):
            for r in recs:
                key = (r.prompt, tuple(r.tokens))
                if key not in cache:
                    cache[key] = nll_of(model, prompts[r.prompt], r.tokens)
                r.nll, r.greedy_agreement = cache[key]
    return {"records": records, "warmup_seconds": warm}
