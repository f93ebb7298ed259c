"""Hierarchical speculative decoding on quantized targets (SpecMQuant, arXiv 2505.22179). Lossless.

``generate(..., accel="quant_spec", accel_kwargs={"draft_model": model_or_path, "drafter": "aded" | "model",
"intermediate": "auto" | "draft_model" | "full_precision" | "none", "k": 6})``; the target is the model ``generate``
is called on, typically loaded 4-bit (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``).

The paper's finding: verifying a *tree* on a 4-bit target costs much more than verifying one token (every extra
token pays the dequantizing matmuls), so tree drafts lose their edge. The hierarchy keeps the tree one level down:

1. a cheap **drafter** builds a token tree: ADED's trigram tree (``drafter="aded"``; its settings in ``aded={...}``),
   or the draft model's greedy chain of ``tree_depth`` tokens with its ``width - 1`` next-best alternatives at every
   depth (``drafter="model"``, one draft-model forward per depth);
2. an **intermediate** model (the draft model, or the target's own unquantized copy) checks the tree in one forward
   with tree attention (engine/follower.verify_tree) and keeps its greedy path plus its own next token; rounds repeat
   until it holds a *sequence* of at least ``k`` tokens;
3. the quantized **target** verifies that sequence with a plain causal mask in the shared engine: output is the
   target's own (token-identical to its greedy decoding; under sampling its distribution, since the sequence does not
   depend on the target's samples and is checked token by token).

``intermediate="none"`` skips level 2: with ``drafter="model"`` that is plain (single-level) speculative decoding,
the draft model's greedy chain of ``k`` tokens verified by the target — the baseline that shows what the hierarchy
adds. ``"auto"``: ADED → the draft model when one is given, else the full-precision copy; a model drafter → the
full-precision copy on a quantized target, else none.

Choices that are ours: both the intermediate and the draft model follow the request with their own KV caches and
catch up committed tokens inside their next forward; what they computed on tokens the target then rejects is
dropped (engine/follower sections); the intermediate's continuation is greedy in every mode (under sampling the
target's token-matching verification keeps the output exact); ``full_precision`` reloads the target's own checkpoint
without the quantizer (bitsandbytes quantizes on load), or takes ``full_model=``. Stats: ``rounds`` (intermediate
forwards per target step), ``intermediate_forwards``, ``drafter_forwards``, ``sequence_len`` (tokens per sequence
draft), ``intermediate_accept`` (drafter tokens the intermediate kept per round).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..config import AccelConfig, option
from ..integrations.companions import companion
from ..integrations import quantization
from ..engine.adapter import Row, SpeculativeAdapter
from ..engine.follower import Follower, compile_for, graphs_for, static_slots_for
from ..engine.tree import Tree
from ..registry import get, register

DRAFTERS = ("aded", "model")
# The ADED drafter's tree (unless aded={"max_nodes": ...} says otherwise): ADED's own "auto" budget is chosen by the
# target's verify cost, which the intermediate doesn't share. At 64 nodes (that budget's largest) every round's
# intermediate verify (catch-up + tree, 128 wide) ran eagerly, past the captured widths: quant_spec drafted for
# 6.7 of its 8 s on an H200 (NF4 target, 2026-12-02, benchmarks/results/h200-bf16-nf4-b1-2026-12-02-r8).
ADED_NODES = 16
PAD_TO = 32  # a follower forward of 2 .. 32 tokens runs at width 32 (one captured shape)
INTERMEDIATES = ("auto", "draft_model", "full_precision", "none")


@dataclass
class QuantSpecConfig(AccelConfig):
    draft_model: Any = None  # a causal LM with the target's tokenizer, or a path to one
    drafter: Literal["aded", "model"] = "aded"
    intermediate: Any = "auto"  # or a causal LM to use in between
    k: int = option(6, min=1)  # the sequence draft the target verifies holds at least k tokens
    tree_depth: int = option(4, min=1)  # model drafter: depth of its tree
    width: int = option(2, min=1)  # model drafter: tokens per depth (its choice and width - 1 alternatives)
    max_rounds: int = option(8, min=1)  # intermediate rounds per target step at most
    full_model: Any = None  # intermediate="full_precision": the target's unquantized copy (model or path)
    aded: dict = field(default_factory=dict)  # ADED drafter settings (datastore, max_nodes, max_depth, ...)

    def validate(self, method: str) -> None:
        inter = self.intermediate
        if isinstance(inter, str) and inter not in INTERMEDIATES:
            raise ValueError(
                f"accel={method!r}: intermediate must be one of {INTERMEDIATES} or a causal LM, got {inter!r}"
            )
        if self.drafter == "model" and self.draft_model is None:
            raise ValueError(
                f"accel={method!r} with drafter='model' needs accel_kwargs draft_model=<a small causal LM with the "
                "same tokenizer, e.g. one made by `hf-accel train draft`>, or drafter='aded'."
            )
        if inter == "draft_model" and self.draft_model is None:
            raise ValueError(f"accel={method!r}: intermediate='draft_model' needs accel_kwargs draft_model=...")
        if inter == "draft_model" and self.drafter == "model":
            raise ValueError(
                f"accel={method!r}: the draft model can't check its own drafts; with drafter='model' use "
                "intermediate='full_precision' (hierarchy) or 'none' (single-level speculation)."
            )
        get("aded").Config.check_options(f"{method}: aded", self.aded)  # the ADED drafter's options, checked now


class _State:
    def __init__(self, inter, drafter_follower, aded_state, gc):
        self.inter = inter
        self.drafter_follower = drafter_follower
        self.aded_state = aded_state
        self.rounds = 0
        self.steps = 0
        self.seq_tokens = 0
        self.inter_kept = 0
        self.inter_rounds = 0


@register("quant_spec")
class QuantSpec(SpeculativeAdapter):
    Config = QuantSpecConfig
    lossless = True

    def __init__(self, model, config: QuantSpecConfig):
        super().__init__(model, config)
        cfg = config
        self.draft_lm = companion(cfg.draft_model, model, "quant_spec", "draft model")
        inter = cfg.intermediate
        if inter == "auto":
            if cfg.drafter == "aded":
                inter = "draft_model" if self.draft_lm is not None else "full_precision"
            else:
                inter = "full_precision" if quantization.is_quantized(model) or cfg.full_model is not None else "none"
        self.mode = inter if isinstance(inter, str) else "given"
        if inter == "draft_model":
            self.inter = self.draft_lm
        elif inter == "full_precision":
            self.inter = (companion(cfg.full_model, model, "quant_spec", "full model")
                          if cfg.full_model is not None else quantization.full_precision_copy(model, "quant_spec"))
        elif inter == "none":
            self.inter = None
        else:
            self.inter = companion(inter, model, "quant_spec", "intermediate model")
        self.aded = None
        if cfg.drafter == "aded":
            aded_cls = get("aded")
            self.aded = aded_cls(model, aded_cls.Config.from_kwargs("aded", {"max_nodes": ADED_NODES, **cfg.aded}))
        if self.inter is None and cfg.drafter == "aded":
            raise ValueError(
                "accel='quant_spec' with drafter='aded' and intermediate='none' is ADED itself: use accel='aded', "
                "or give an intermediate (draft_model=... or intermediate='full_precision')."
            )

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        drafter, inter, draft = kwargs.get("drafter", "aded"), kwargs.get("intermediate", "auto"), kwargs.get("draft_model")
        if (drafter == "model" or inter == "draft_model") and draft is None:
            return "no draft model (accel_kwargs draft_model=...: a causal LM with the same tokenizer)"
        full = inter == "full_precision" or (inter == "auto" and drafter == "aded" and draft is None)
        if full and kwargs.get("full_model") is None and not quantization.is_quantized(model):
            return "no draft model, and the model is not quantized (its full-precision copy would be itself)"
        return None

    def max_tree_nodes(self) -> int:
        cfg = self.config
        if self.inter is None:
            return 1 + cfg.k
        # before the last round a sequence holds < k tokens; a round adds a tree's depth + 1 at most
        depth = self.aded.config.max_depth if self.aded is not None else cfg.tree_depth
        return cfg.k + depth + 1

    def _follower(self, m, rows, gc):
        # a section holds up to a sequence draft plus one round's tree before it is closed
        cfg = self.config
        tree = self.aded.max_tree_nodes() if self.aded is not None else cfg.tree_depth * cfg.width
        room = self.max_tree_nodes() + tree + cfg.k
        # with graphs, one captured shape for most forwards: a round's verify (catch-up + tree) padded to PAD_TO
        # tokens and read at ``tree`` picks; the drafter model's catch-ups padded too (follower pad_to / picks_to)
        return Follower(m, len(rows), m.device, quantization.compute_dtype(m),
                        static_slots=static_slots_for(rows, gc, room + PAD_TO), graphs=graphs_for(m, gc),
                        static_room=2 * room, compiled=compile_for(gc), pad_to=PAD_TO, picks_to=tree)

    def prepare(self, model, rows, generation_config):
        gc = generation_config
        inter = self._follower(self.inter, rows, gc) if self.inter is not None else None
        drafter = self._follower(self.draft_lm, rows, gc) if self.config.drafter == "model" else None
        aded_state = self.aded.prepare(model, rows, generation_config) if self.aded is not None else None
        return _State(inter, drafter, aded_state, generation_config)

    def verified(self, state: _State, row: Row, tree, path, new_tokens: list, step, b: int) -> None:
        if self.aded is not None:
            self.aded.verified(state.aded_state, row, tree, path, new_tokens, step, b)

    # ---- drafting --------------------------------------------------------------------------------------
    def _model_trees(self, state: _State, rows: list, depth: int, width: int) -> list:
        """The draft model's greedy chain of ``depth`` tokens with its ``width - 1`` next-best tokens at each depth."""
        alts = [[] for _ in rows]

        def choose(b, logits):
            top = torch.topk(logits, min(width, logits.shape[-1])).indices.tolist()
            alts[b].append(top[1:])
            return top[0], True

        chains = state.drafter_follower.run(rows, choose, depth, keep=False)
        trees = [None] * len(rows)
        for b, chain in enumerate(chains):
            if chain is None:
                continue
            tokens, parents = [rows[b].tokens[-1]] + chain, list(range(-1, len(chain)))
            for d, others in enumerate(alts[b]):
                for t in others:
                    tokens.append(t)
                    parents.append(d)  # a sibling of chain node d + 1: child of node d
            trees[b] = Tree(tokens, parents)
        return trees

    def _drafter_trees(self, state: _State, rows: list) -> list:
        if self.aded is not None:
            return self.aded.draft(state.aded_state, rows)
        return self._model_trees(state, rows, self.config.tree_depth, self.config.width)

    def draft(self, state: _State, rows: list) -> list:
        cfg = self.config
        state.steps += 1
        if self.inter is None:  # single level: the draft model's chain of k tokens
            chains = state.drafter_follower.run(rows, lambda b, lg: (int(lg.argmax()), True), cfg.k, keep=False)
            out = [None if c is None else Tree.chain(rows[b].tokens[-1], c) for b, c in enumerate(chains)]
            state.seq_tokens += sum(len(c) for c in chains if c is not None)
            return out
        seqs = [[] if r is not None else None for r in rows]
        inter = state.inter
        inter.open_section()
        if state.drafter_follower is not None:
            state.drafter_follower.open_section()
        try:
            for _ in range(cfg.max_rounds):
                ctx = [None if r is None or len(seqs[b]) >= cfg.k else Row(r.index, r.tokens + seqs[b], r.prompt_len)
                       for b, r in enumerate(rows)]
                if all(c is None for c in ctx):
                    break
                trees = self._drafter_trees(state, ctx)
                got = inter.verify_tree(ctx, trees)
                state.rounds += 1
                for b, toks in enumerate(got):
                    if toks is not None:
                        seqs[b].extend(toks)
                        state.inter_kept += len(toks) - 1
                        state.inter_rounds += 1
        finally:
            inter.close_section()
            if state.drafter_follower is not None:
                state.drafter_follower.close_section()
        state.seq_tokens += sum(len(s) for s in seqs if s is not None)
        return [None if s is None else Tree.chain(rows[b].tokens[-1], s) for b, s in enumerate(seqs)]

    def finished(self, state: _State, stats) -> None:
        e = stats.extra
        e["sequence_len"] = state.seq_tokens / max(1, stats.row_forwards - stats.batch_size)
        followers = [f for f in (state.inter, state.drafter_follower) if f is not None]
        if followers:
            e["follower_cache"] = "static" if followers[0].static else "dynamic"
        if state.inter is not None:
            e["intermediate_forwards"] = state.inter.forwards
            e["rounds"] = state.rounds / max(1, state.steps)
            e["intermediate_accept"] = state.inter_kept / max(1, state.inter_rounds)
        if state.drafter_follower is not None:
            e["drafter_forwards"] = state.drafter_follower.forwards
        if followers:  # graphs captured by this request's followers (0 when earlier requests' are replayed)
            e["follower_captures"] = sum(f.captures for f in followers)
            e["follower_capture_seconds"] = sum(f.capture_seconds for f in followers)
            e["follower_compiled"] = sum(f.compiled for f in followers)
            e["follower_compile_error"] = next((f.compile_error for f in followers if f.compile_error), None)
            if "compile_seconds" in e:  # the request's capture time includes its followers'
                e["compile_seconds"] += e["follower_capture_seconds"]
        for f in followers:
            f.close()  # their pooled static slots and graphs: free for the next request


__all__ = ["QuantSpec", "QuantSpecConfig"]
