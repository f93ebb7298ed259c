"""The adapter protocol: what a method supplies to the shared engine.

A speculative adapter drafts; the engine verifies, commits and owns the cache:

* ``prepare(model, rows, generation_config) -> state`` once per request. All per-request state lives in
  the returned object, never on the adapter's model or in a module global.
* ``draft(state, rows) -> list[Tree]``: one tree per row (root = the row's last committed token). Rows that
  have finished are not asked (their entry in ``rows`` is None).
* ``verified(state, row, tree, path, new_tokens, step, b)`` per active row after each verify, with the tokens
  committed for that row (``new_tokens``; ``row.tokens`` already ends with them), ``path`` the accepted nodes (root
  first) of ``tree``, ``step`` the verify's :class:`StepOutput` (``logits`` (B, N, V) and, when ``hidden``,
  ``hidden`` (B, N, H), on the device; row ``b`` of them is this row's tree). A method that only needs the
  committed tokens (ADED) reads ``new_tokens``. (It was once two hooks, ``verified`` then ``observe``; no method
  needed both, so ``observe`` was folded in: a subclass that still defines ``observe`` is refused.)

Optional hooks, for methods that read the target's own forward (trained heads, hidden transfer):

* ``hidden = True``: the engine runs the target's decoder and LM head apart, so the final (post-norm)
  hidden states of every prefill / verify position are available.
* ``prefilled(state, step)`` right after ``prepare``, with the prefill's :class:`StepOutput` (``hidden``
  over the prompt (B, P, H) when ``hidden``; ``attn`` (B, P) the prompt mask; ``input_ids`` the prompt; ``tokens``
  the first generated token of every row).
* ``verify_context(state, trees)``: a context manager entered around each verify forward (e.g. to route a
  layer's output through the method); it must undo everything it did on exit.
* ``step_program() -> StepProgram | None`` (engine/capture.py): per-step device work that runs *inside* the
  verify forward (e.g. a layer's output replaced at scratch positions) as fixed-shape buffers the adapter fills
  on the host before each verify plus layer edits that read only those buffers and the trained part. Both engines
  run it; the static engine allocates the buffers once per workspace and captures the edits in its verify graph
  (keyed on ``StepProgram.key()``), so a method that uses it runs with ``cache_implementation="static"``. Prefer
  it to ``verify_context`` for anything that touches the forward: its edits only act on the forward of the
  request that runs them, whatever other threads do on the same model. A method's own draft step (a drafter
  outside the target's forward) goes through ``capture.Graphed`` for the same reason: fixed shapes, eager on CPU,
  one CUDA graph on a GPU (Clover's drafter).
* ``finished(state, stats)`` once at the end of the request, to add the method's own figures to
  ``stats.extra``.

``rows[b]`` is a :class:`Row`: the row's real tokens (prompt without padding, then everything generated,
ending with the pending root token).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .tree import Tree


def _canonical_options(cls) -> None:
    """Give ``cls``'s own ``missing_artifacts`` / ``static_refusal`` the accel_kwargs with ``part=`` under the
    method's own name for its trained part (``Config.canonical``), so that they read one key whichever the caller
    used."""
    import functools

    for hook in ("missing_artifacts", "static_refusal"):
        defined = vars(cls).get(hook)
        if not isinstance(defined, classmethod):
            continue
        func = defined.__func__

        @functools.wraps(func)
        def canonical(klass, *args, __func=func):
            *head, kwargs = args
            config = getattr(klass, "Config", None)
            if config is not None and kwargs:
                kwargs = config.canonical(klass.name or klass.__name__, kwargs)
            return __func(klass, *head, kwargs)

        setattr(cls, hook, classmethod(canonical))


@dataclass
class Row:
    index: int  # row in the caller's batch
    tokens: list  # prompt (no padding) + generated; tokens[-1] is the root of the next draft
    prompt_len: int
    #: the engine's cap on this step's draft size (root included) when it chooses the budget (engine/budget.py);
    #: None: the adapter's own budget
    max_nodes: int | None = None

    @property
    def generated(self) -> list:
        return self.tokens[self.prompt_len :]


@dataclass
class StepOutput:
    """What one target forward of the engine produced (device tensors; see the module docstring)."""

    logits: Any = None
    hidden: Any = None
    attn: Any = None
    tokens: Any = None
    input_ids: Any = None
    #: host copy of the adapter's :meth:`SpeculativeAdapter.step_reads` tensor (a (B, N, K) numpy array: index the
    #: row and the nodes needed, e.g. ``reads[b, i].tolist()``), read with the step's one host read on the greedy
    #: fast path; None when the adapter reads nothing
    reads: Any = None


class SpeculativeAdapter:
    """Base class of every draft/verify method. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    lossless: ClassVar[bool] = True
    hidden: ClassVar[bool] = False  # the engine returns final hidden states (see the module docstring)
    #: why the static engine can't run this method (None: it can)
    static_unsupported: ClassVar[str | None] = None
    kv_method: ClassVar[bool] = False  # a speculative adapter, not a KV method (see :class:`KVMethod`)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _canonical_options(cls)
        if "observe" in vars(cls):
            raise TypeError(
                f"{cls.__name__} defines observe(state, row, new_tokens); that hook was folded into "
                "verified(state, row, tree, path, new_tokens, step, b), called per active row after each verify with "
                "the same new_tokens: rename it to verified and take the extra arguments."
            )

    def __init__(self, model, config):
        self.model = model
        self.config = config

    def for_batch(self, batch: int) -> None:
        """The request's batch size, told once before any budget (:meth:`max_tree_nodes`) is read: a method whose
        default budget depends on it (hidden transfer: fewer real nodes per row at batch > 1) sets it here. The
        adapter is the request's own (one per ``generate`` call), so this is per-request state."""

    def max_tree_nodes(self) -> int:
        """The most nodes (root included) a draft of this adapter can have. The static engine
        (``cache_implementation="static"``) pads every verify forward to it, so it must hold for the whole
        request; a larger draft is an error there."""
        return 64

    def max_real_nodes(self) -> int:
        """The most real nodes (``Tree.real``: the nodes that can be accepted, root included; scratch nodes come after
        them) a draft of this adapter can have. The device sampler processes and draws only those positions of a
        step, so an adapter whose trees carry many scratch nodes says how few are real (default: every node)."""
        return self.max_tree_nodes()

    def step_reads(self, state, logits) -> Any:
        """A (B, N, K) device tensor computed from this step's verify ``logits`` (B, N, V) that :meth:`verified`
        needs on the host (e.g. each node's top-k): the engine reads it together with the step's argmax, in one
        host transfer, and hands it over as ``StepOutput.reads``. None (default): nothing to read."""
        return None

    def deferred_tokens(self, state) -> Any:
        """Drafted tokens the host has not read: a (B, m) integer device tensor, nodes 1..m of each active row's tree
        that :meth:`draft` just returned (there with placeholder tokens; every such tree a chain of at least m + 1
        nodes). The engine writes them into the verify's inputs on the device and reads them with the step's verdicts,
        so drafting costs no host read of its own. Asked once right after each :meth:`draft`; None (default): the
        trees' tokens are real. Not with :meth:`auto_budget` (the engine's chooser cuts the trees as drafted)."""
        return None

    def auto_budget(self) -> bool:
        """True when the engine chooses each step's node budget (engine/budget.py): the adapter's trees then carry
        ``Tree.scores`` (best-first order) and it drafts at most ``row.max_nodes`` nodes per row."""
        return False

    @classmethod
    def static_refusal(cls, kwargs: dict) -> str | None:
        """Why the static engine can't run this method with these accel_kwargs (None: it can)."""
        return cls.static_unsupported

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict) -> str | None:
        """Why this method can't run on ``model`` with ``kwargs`` as they stand (a trained part not found), or
        None. ``hf-accel bench --methods all`` skips a method with a reason and prints it."""
        return None

    def prepare(self, model, rows: list, generation_config) -> object:
        return None

    def bind(self, state, backend) -> None:
        """Called once after ``prepare`` with the request's engine backend (a DynamicBackend or StaticBackend);
        layer-plan methods set their step on the static one (engine/plans.py)."""
        return None

    def draft(self, state, rows: list) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def prefilled(self, state, step: StepOutput) -> None:
        return None

    def verify_context(self, state, trees: list):
        return contextlib.nullcontext()

    def verified(self, state, row: Row, tree: Tree, path: list, new_tokens: list, step: StepOutput, b: int) -> None:
        return None

    def step_program(self):
        """The adapter's :class:`~hf_accel.engine.capture.StepProgram`, or None (see the module docstring)."""
        return None

    def finished(self, state, stats: "AccelStats") -> None:
        return None


class NoDraft(SpeculativeAdapter):
    """Drafts nothing: every step verifies the root alone (one token per forward), i.e. plain decoding on the
    engine. Not a method of its own (not registered): a KV method alone runs on it where the static engine serves it
    (``runner`` of DuoAttention: its steps captured as CUDA graphs, one host read per token)."""

    name = ""  # the request's label is the KV method's

    def max_tree_nodes(self) -> int:
        return 1

    def draft(self, state, rows: list) -> list:
        return [None if row is None else Tree.root_only(row.tokens[-1]) for row in rows]


class KVMethod:
    """Base class of a *KV method*: a method that changes which keys/values the cache keeps and how attention reads
    them (DuoAttention), not what is decoded. Alone (``accel="duo_attention"``) it runs inside transformers' own
    generate (every HF decoding feature keeps working): the hook passes ``past_key_values=new_cache(1)`` and runs the
    call inside ``attention()``. Composed with a speculative method (``accel=["duo_attention", "aded"]``) the shared
    engine uses ``new_cache(max_tree_nodes)`` in place of its DynamicCache and runs the request inside
    ``attention()``; with ``cache_implementation="static"`` the static engine needs ``engine_cache(workspace)``,
    ``engine_key()`` and ``engine_max_length(needed)`` (engine/backends.py; a method without them is refused there). ``finished(cache, stats)`` adds the method's figures to the run's :class:`AccelStats`.

    A KV method object is built per request; its per-request state lives in the cache it returns, never on the model.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = None
    lossless: ClassVar[bool] = False
    kv_method: ClassVar[bool] = True
    #: why the static engine can't run this method (None: it can)
    static_unsupported: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _canonical_options(cls)

    def __init__(self, model, config):
        self.model = model
        self.config = config

    @classmethod
    def static_refusal(cls, kwargs: dict) -> str | None:
        return cls.static_unsupported

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict) -> str | None:
        return None

    def new_cache(self, max_forward: int = 1):  # pragma: no cover - interface
        """A fresh transformers ``Cache`` for one request; ``max_forward``: the widest forward that will follow the
        prefill (1 for plain decoding, the speculative method's node budget under the engine)."""
        raise NotImplementedError

    def attention(self):
        """Context manager around the whole request (e.g. switch the model's attention implementation)."""
        return contextlib.nullcontext()

    def finished(self, cache, stats: "AccelStats") -> None:
        return None


@dataclass
class AccelStats:
    """Per-run statistics, read with ``hf_accel.stats(output)``."""

    method: str
    batch_size: int = 0
    steps: int = 0  # verify forwards
    target_forwards: int = 0  # all target forwards, prefill included
    new_tokens: int = 0  # tokens generated, all rows
    row_forwards: int = 0  # sum over rows of the forwards each row took part in
    drafted_tokens: int = 0  # draft nodes sent to verification (root excluded), all rows
    accepted_tokens: int = 0  # draft nodes accepted, all rows
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    total_seconds: float = 0.0
    kv_cache_bytes: int = 0  # at the end of the run
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per target forward, per row (vanilla decoding gives 1.0)."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["tokens_per_forward"] = self.tokens_per_forward
        d["acceptance_rate"] = self.acceptance_rate
        return d


__all__ = ["Row", "SpeculativeAdapter", "NoDraft", "KVMethod", "AccelStats", "StepOutput", "Tree"]
