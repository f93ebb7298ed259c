"""Run every bench method on the same rows of prompts in one process and collect per-row records.

Prompts are grouped into rows of ``batch`` prompts (left padded), the same rows for every method. Methods are
interleaved per row (the order rotates from row to row) so that drift of the machine (clocks, other tenants)
hits every method alike; every timed call starts with the ADED datastores' lookup caches empty (else the ADED
configurations run after another one on the same prompt would find its lookups made) and after a full garbage
collection (else a pass of ~0.1 s lands in one random call). Each method is warmed up
first, untimed (HF's fixed-size static baselines on every distinct row shape of the run, see
:mod:`hf_accel.bench.methods`). Tokens are counted per sequence up to and including its first eos (padding after it
is not counted); tok/s is every counted token of a row over the call's wall time. Token match is against
``vanilla`` of the same row, sequence by sequence.

Counting target forwards: hf_accel methods report theirs (``hf_accel.stats``); for HF's eager baselines
(vanilla, prompt lookup, assisted) a forward hook on the target counts calls and query tokens. The compiled
static baseline can't carry a Python hook (it would break the graph), so its forwards are counted as one per
new token, which is what vanilla decoding does by construction.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data.trigram import clear_lookup_caches
from ..engine.backends import sync
from ..engine.cache import cache_nbytes
from .methods import MethodSpec, Settings, generate_kwargs



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
    """One method on one row of prompts (``batch`` sequences, left padded; batch 1: one prompt)."""

    method: str
    prompt: int  # row index
    prompt_tokens: int  # the row's padded prompt length (batch 1: the prompt's length)
    new_tokens: int  # real new tokens of all the row's sequences (each up to and including its first eos)
    seconds: float
    tokens: list = field(repr=False)  # per sequence: its real new tokens
    target_forwards: int = 0  # batched target forwards, prefill included
    verify_width: float = 1.0  # mean query tokens per decode forward (per row)
    prefill_seconds: float | None = None
    draft_seconds: float | None = None
    verify_seconds: float | None = None
    accepted_tokens: int | None = None
    peak_memory_bytes: int | None = None
    kv_cache_bytes: int | None = None
    token_match: float | None = None  # position-wise agreement with vanilla, over vanilla's tokens (all sequences)
    prefix_match: float | None = None  # mean over sequences of: tokens before the first divergence / vanilla's length
    exact_match: bool | None = None  # every sequence identical to vanilla's
    sequence_match: list | None = None  # token match of each sequence
    nll: float | None = None  # the model's mean NLL of these new tokens (teacher-forced, same model)
    # share of these new tokens that are the model's own greedy choice after the same prefix (teacher-forced):
    # for lossy methods, per-step fidelity that does not collapse after a first divergence as token_match does
    greedy_agreement: float | None = None
    method_stats: dict = field(default_factory=dict)  # the method's own numeric figures (AccelStats.extra)
    # a step the method asked to compile that was captured eagerly instead: AccelStats.extra key -> why
    compile_errors: dict = field(default_factory=dict)
    compile_seconds: float | None = None  # graph capture / compilation inside this call (static engine)
    static: bool = False  # ran on a static cache with compiled / graphed forwards
    batch: int = 1
    prompts: list = field(default_factory=list)  # prompt indices of the row's sequences
    row_new_tokens: list = field(default_factory=list)  # real new tokens per sequence
    row_forwards: int = 0  # sum over sequences of the target forwards each took part in (prefill included)

    def __post_init__(self):
        if self.tokens and not isinstance(self.tokens[0], (list, tuple)):
            self.tokens = [list(self.tokens)]  # one sequence given flat
        if not self.row_new_tokens:
            self.row_new_tokens = [len(t) for t in self.tokens]

    @property
    def tok_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_row_forwards(self) -> int:
        return self.row_forwards or self.target_forwards * self.batch

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward, per sequence (vanilla: 1.0)."""
        f = self.per_row_forwards
        return self.new_tokens / f if f else 0.0

    @property
    def decode_forwards(self) -> int:
        return max(self.target_forwards - 1, 0)

    @property
    def row_decode_forwards(self) -> int:
        return max(self.per_row_forwards - self.batch, 0)

    @property
    def accepted_per_forward(self) -> float:
        """Draft tokens accepted per decode forward and sequence (the bonus token of each forward not counted)."""
        d = self.row_decode_forwards
        if not d:
            return 0.0
        if self.accepted_tokens is not None:
            return self.accepted_tokens / d
        return max(self.new_tokens - self.per_row_forwards, 0) / d

    def as_dict(self, with_tokens: bool = False) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("tokens")
        d.update(
            tok_s=self.tok_s, tokens_per_forward=self.tokens_per_forward, accepted_per_forward=self.accepted_per_forward
        )
        return d


def output_cache(out):
    """The cache a ``generate`` output returns: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def eos_ids(model) -> set:
    e = getattr(model.generation_config, "eos_token_id", None)
    if e is None:
        return set()
    return {int(x) for x in (e if isinstance(e, (list, tuple)) else [e])}


def real_tokens(seq: list, eos: set) -> list:
    """The generated tokens of one sequence up to and including its first eos (what follows is padding)."""
    for i, t in enumerate(seq):
        if t in eos:
            return seq[: i + 1]
    return seq


def left_pad(row: list, pad_token_id, device):
    """(input_ids, attention_mask) of a row of prompts (lists of ids), left padded to the longest."""
    n = max(len(p) for p in row)
    ids = torch.full((len(row), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(row), n), dtype=torch.long)
    for i, p in enumerate(row):
        if p:
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
    return ids.to(device), mask.to(device)


class _CacheLengths:
    """transformers keeps the largest static-cache size any call used on the model (``_previous_max_cache_length``)
    and sizes every later static cache at least that large. Each HF static baseline of a run gets its own value,
    swapped in around its calls: ``vanilla-static`` keeps its fixed size whatever ``hf-pld+static`` (a larger
    cache) ran before it, and ``vanilla-static-naive`` sees the growing size a user's process would."""

    ATTR = "_previous_max_cache_length"

    def __init__(self):
        self.values = {}

    def __call__(self, model, label: str):
        return _Swap(model, self, label)


class _Swap:
    def __init__(self, model, state, label):
        self.model, self.state, self.label = model, state, label

    def _set(self, value):
        a = _CacheLengths.ATTR
        if value is None:
            if hasattr(self.model, a):
                delattr(self.model, a)
        else:
            setattr(self.model, a, value)

    def __enter__(self):
        self.saved = getattr(self.model, _CacheLengths.ATTR, None)
        self._set(self.state.values.get(self.label))

    def __exit__(self, *exc):
        self.state.values[self.label] = getattr(self.model, _CacheLengths.ATTR, None)
        self._set(self.saved)


def before_timed_call() -> None:
    """What every timed ``generate`` call of the bench and the demo starts from: the ADED stores' lookup caches empty
    (methods run one after another on a row, and one drafting from a store would otherwise find the lookups of
    another's call on the same prompt made) and the garbage collector's counts reset (a full pass, ~140 ms on a CPU
    with torch and transformers loaded, otherwise lands in whichever call crosses its threshold, most often the one
    allocating the most)."""
    clear_lookup_caches()
    gc.collect()


def run_once(model, spec: MethodSpec, ids: list, max_new_tokens: int, pad_token_id, draft=None, prompt_index=-1,
             settings: Settings | None = None, cache_lengths=None, prompt_ids=None):
    """One timed ``generate`` call of ``spec`` on one row. ``ids``: a prompt (list of ids) or a row of prompts
    (list of lists), left padded here. Sampling reseeds the global generators with ``settings.seed + row``
    before the call, the same for every method."""
    settings = settings or Settings()
    device = model.device
    row = [list(ids)] if ids and not isinstance(ids[0], (list, tuple)) else [list(p) for p in ids]
    x, mask = left_pad(row, pad_token_id, device)
    kw = generate_kwargs(spec, draft, settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # hf_accel methods report their own counts (their static engine replays CUDA graphs, which a hook can't
    # see); HF's eager baselines are counted by the hook; the compiled ones can't carry one (see above)
    hooked = spec.is_baseline and not (spec.compiled and device.type == "cuda")
    counter = _ForwardCounter(model)
    swap = cache_lengths(model, spec.label) if (cache_lengths is not None and spec.compiled) else None
    if settings.do_sample:
        torch.manual_seed(settings.seed + max(prompt_index, 0))
    before_timed_call()
    sync(device)
    t0 = time.perf_counter()
    if hooked:
        counter.__enter__()
    if swap is not None:
        swap.__enter__()
    try:
        out = model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id,
            **settings.sampling_kwargs(),
            **kw,
        )
        sync(device)
    finally:
        if swap is not None:
            swap.__exit__()
        if hooked:
            counter.__exit__()
    seconds = time.perf_counter() - t0
    eos = eos_ids(model)
    seqs = [real_tokens(out.sequences[i, x.shape[1]:].tolist(), eos) for i in range(len(row))]
    lens = [len(t) for t in seqs]
    rec = Record(spec.label, prompt_index, x.shape[1], sum(lens), seconds, seqs, static=spec.compiled or spec.static,
                 batch=len(row), prompts=list(prompt_ids) if prompt_ids is not None else [], row_new_tokens=lens)
    st = getattr(out, "accel_stats", None)
    cache = output_cache(out)
    if hooked:
        rec.target_forwards = counter.calls
        # a sequence takes part in every forward until its eos: as many as its tokens (vanilla decoding);
        # prompt lookup / assisted run batch 1, where every forward is the sequence's
        rec.row_forwards = counter.calls if len(row) == 1 else sum(lens)
        rec.verify_width = counter.query_tokens / max(counter.calls - 1, 1) if counter.calls > 1 else 1.0
        rec.prefill_seconds = counter.prefill_seconds
        rec.kv_cache_bytes = cache_nbytes(cache)
    elif st is not None:
        rec.target_forwards = st.target_forwards
        rec.row_forwards = st.row_forwards
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
        rec.compile_errors = {k: v for k, v in st.extra.items() if k.endswith("compile_error") and v}
        budget = st.extra.get("budget")
        if isinstance(budget, dict):  # node budget "auto": its calibration, drafting time and steps per width
            rec.method_stats["budget_calibration"] = float(budget.get("calibration", 0.0))
            rec.method_stats["budget_draft_seconds"] = float(budget.get("draft_seconds", 0.0))
            for w, n in (budget.get("chosen") or {}).items():
                rec.method_stats[f"budget_steps_w{w}"] = int(n)
    else:  # HF's compiled paths: one forward per token by construction (vanilla decoding)
        rec.target_forwards = max(lens, default=0)
        rec.row_forwards = sum(lens)
        rec.kv_cache_bytes = cache_nbytes(cache)
        if spec.name in ("hf-pld", "hf-assisted"):  # compiled assisted: forwards unknown, not one per token
            rec.target_forwards = rec.row_forwards = 0
    if device.type == "cuda":
        rec.peak_memory_bytes = int(torch.cuda.max_memory_allocated(device))
    return rec


def _compare(rec: Record, ref: Record) -> None:
    same_all = n_all = 0
    prefixes, per = [], []
    for a, b in zip(rec.tokens, ref.tokens):
        n = len(b)
        same = sum(1 for i in range(min(len(a), n)) if a[i] == b[i])
        first = next((i for i in range(min(len(a), n)) if a[i] != b[i]), min(len(a), n))
        same_all += same
        n_all += n
        prefixes.append(first / n if n else 1.0)
        per.append(same / n if n else 1.0)
    rec.token_match = same_all / n_all if n_all else 1.0
    rec.prefix_match = sum(prefixes) / len(prefixes) if prefixes else 1.0
    rec.exact_match = [list(t) for t in rec.tokens] == [list(t) for t in ref.tokens]
    rec.sequence_match = per


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


def make_rows(prompts: list, batch: int) -> list:
    """Rows of ``batch`` prompt indices (the last row may be shorter)."""
    if batch < 1:
        raise ValueError(f"--batch {batch}: must be at least 1")
    return [list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)]


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
    batch: int = 1,
    settings: Settings | None = None,
    on_rows=None,
    warmup_only: bool = False,
) -> dict:
    """Records of every (row, method) plus warm-up times, the run's fixed static-cache size and the methods that
    failed their warm-up (dropped, with the error, as ``skipped``). ``specs[0]`` must be vanilla.

    After every finished row (every method measured on it) one line with each method's tok/s on that row goes to
    ``log``. ``on_rows(run)``, when given, is called after the warm-ups and after every finished row with the
    run so far: the dict this function returns, on the rows done (``rows_done`` of them; token match already
    compared, no NLL yet), so a caller can write a partial report that a killed run leaves behind.

    ``warmup_only``: stop after the warm-ups (no timed row): what a compile-cache pre-warm needs, e.g. several
    processes filling torch's on-disk compile cache side by side before the timed runs."""
    from tqdm.auto import tqdm

    if log is print:  # a killed run's log must still hold the rows it finished
        log = _flushed_print

    assert specs[0].name == "vanilla"
    settings = settings or Settings()
    rows = make_rows(prompts, batch)
    row_ids = [[prompts[i] for i in r] for r in rows]
    if settings.max_cache_len is None:  # one size for the whole run: the longest row + its new tokens
        settings.max_cache_len = max(max(len(p) for p in r) for r in row_ids) + max_new_tokens
    cache_lengths = _CacheLengths()
    warm, skipped, shapes = {}, [], {}
    for r, ids in zip(rows, row_ids):  # one row per distinct (batch, padded length)
        shapes.setdefault((len(ids), max(len(p) for p in ids)), r)
    longest = max(range(len(rows)), key=lambda i: max(len(p) for p in row_ids[i]))
    recompile_limit = None
    if model.device.type == "cuda" and sum(s.compiled for s in specs) > 1:
        # several HF static baselines share transformers' one compiled forward (a graph per cache size / verify
        # width): keep torch from falling back to eager after its default 8 graphs, which one baseline alone
        # would never reach
        import torch._dynamo

        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        recompile_limit = getattr(cfg, name)
    if warmup:
        kept = []
        for spec in tqdm(specs, desc="warm-up", disable=not progress):
            if spec.fixed_static:  # HF's fixed-size static cache: every shape the timed calls will see
                calls = [(rows.index(r), max_new_tokens) for r in shapes.values()]
            elif spec.static:
                # hf_accel's static engine sizes (and captures for) its workspace on the first call: give it the
                # longest row, so that every timed call reuses what the warm-up built
                calls = [(longest, max_new_tokens)]
            else:  # eager paths and the naive static baseline (a user's first, short call)
                calls = [(0, min(max_new_tokens, 16))]
            t = time.perf_counter()
            try:
                for i, n in calls:
                    rec = run_once(model, spec, row_ids[i], n, pad_token_id, draft, prompt_index=i, settings=settings,
                                   cache_lengths=cache_lengths)
                    for key, why in rec.compile_errors.items():  # the step runs, captured eagerly: say why
                        log(f"compile fallback {spec.label}: {key}: {why[:300]}")
            except Exception as e:  # noqa: BLE001 - one method's failure must not end the run
                if spec.name == "vanilla":
                    raise
                skipped.append((spec.label, f"failed in warm-up: {type(e).__name__}: {str(e)[:300]}"))
                log(f"skipped {spec.label}: {skipped[-1][1]}")
                continue
            warm[spec.label] = time.perf_counter() - t
            log(f"warm-up {spec.label}: {warm[spec.label]:.1f} s")
            kept.append(spec)
        specs = kept
        # again, after every method's warm-up: a graph another baseline added to the shared compiled forward
        # since (another cache size) is exercised here, not in a timed call
        for spec in specs:
            if spec.fixed_static:
                t = time.perf_counter()
                for r in shapes.values():
                    i = rows.index(r)
                    run_once(model, spec, row_ids[i], max_new_tokens, pad_token_id, draft, prompt_index=i,
                             settings=settings, cache_lengths=cache_lengths)
                warm[spec.label] += time.perf_counter() - t
    records = {s.label: [] for s in specs}

    def so_far(done: int) -> dict:
        return {"records": {label: recs[:done] for label, recs in records.items()}, "warmup_seconds": dict(warm),
                "skipped": list(skipped), "rows": rows, "specs": specs, "max_cache_len": settings.max_cache_len,
                "warmup_shapes": len(shapes), "dynamo_recompile_limit": recompile_limit, "rows_done": done}

    if on_rows is not None:
        on_rows(so_far(0))
    if warmup_only:
        return so_far(0)
    bar = tqdm(total=len(rows) * len(specs), desc=f"bench (row of {batch} x method)", disable=not progress)
    for i, ids in enumerate(row_ids):
        k = i % len(specs)
        for spec in specs[k:] + specs[:k]:
            rec = run_once(model, spec, ids, max_new_tokens, pad_token_id, draft, prompt_index=i, settings=settings,
                           cache_lengths=cache_lengths, prompt_ids=rows[i])
            records[spec.label].append(rec)
            bar.set_postfix_str(f"{spec.label}: {rec.tok_s:.1f} tok/s")
            bar.update(1)
        ref = records[specs[0].label][i]
        for recs in records.values():
            _compare(recs[i], ref)
        log(f"row {i + 1}/{len(rows)}: " + ", ".join(f"{label} {recs[i].tok_s:.1f} tok/s"
                                                     for label, recs in records.items()))
        if on_rows is not None:
            on_rows(so_far(i + 1))
    bar.close()
    if with_nll:
        cache = {}
        for label, recs in tqdm(records.items(), desc="NLL of outputs", disable=not progress):
            for r in recs:
                nll_w = agree_w = n = 0.0
                for pi, toks in zip(rows[r.prompt], r.tokens):
                    key = (pi, tuple(toks))
                    if key not in cache:
                        cache[key] = nll_of(model, prompts[pi], list(toks))
                    nll, agree = cache[key]
                    if toks and nll == nll:  # not NaN
                        nll_w += nll * len(toks)
                        agree_w += agree * len(toks)
                        n += len(toks)
                r.nll, r.greedy_agreement = (nll_w / n, agree_w / n) if n else (float("nan"), float("nan"))
    return {"records": records, "warmup_seconds": warm, "skipped": skipped, "rows": rows, "specs": specs,
            "max_cache_len": settings.max_cache_len, "warmup_shapes": len(shapes),
            "dynamo_recompile_limit": recompile_limit, "rows_done": len(rows)}


def _flushed_print(*args, **kwargs):
    print(*args, **kwargs, flush=True)
