"""EAD, entropy adaptive decoding (arXiv 2502.06833): a small and a large model take turns by entropy. Lossy.

``generate(..., accel="ead", accel_kwargs={"small_model": model_or_path, "threshold": 1.5, "window": 5,
"min_run": 4})``; the model ``generate`` is called on is the large one.

Every row keeps the rolling mean (``window`` tokens) of the entropy, in bits, of the next-token distribution of
whichever model produced each token. The large model hands over to the small one when the mean is at or below
``threshold`` and it has produced at least ``min_run`` tokens in a row; the small one hands back when the mean
exceeds ``threshold`` (after ``min_run`` tokens too). Each model keeps its own KV cache and, when it takes over,
catches up the tokens it missed in one forward: the small model through engine/follower.py, the large one through
the engine, where the small model's tokens arrive as a *forced* chain (committed as they are, computed in the
forward that also gives the large model's next token). Rows of a batch switch on their own.

Choices that are ours: the first generated token is the large model's (the prompt's prefill); the entropy window
runs across switches (it holds the last tokens whatever model produced them); under sampling the small model samples
from its distribution at ``generation_config.temperature`` (the other logits processors act on the large model's
tokens); ``max_small_run`` caps a small-model run (then the large model gives one token and the rule goes on).
On the static engine (``cache_implementation="static"``) the small model's KV is on static slots and its forwards are
CUDA graphs (engine/follower.py); the large model's verify is padded to ``max_small_run + 1`` nodes there (the
widest forced chain), so a smaller ``max_small_run`` keeps its step cheap. Stats (``hf_accel.stats(out).extra``): ``large_share`` (tokens from the large model), ``switches``,
``small_forwards``, ``large_forwards``, ``large_compute_ratio``: the large model's token-forwards (catch-up
included) over vanilla's — EAD saves the large model sequential steps, while its catch-up still processes every
token — and ``est_flops_saved``: 1 − (large token-forwards + small token-forwards × the small/large parameter ratio)
over vanilla's token-forwards (weight FLOPs; negative when the small model's work outweighs what it saves).
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AccelConfig, option
from ..integrations.companions import companion
from ..engine.adapter import SpeculativeAdapter
from ..engine.follower import GRAPH_WIDTHS, Follower, compile_for, graphs_for, static_slots_for
from ..engine.tree import Tree
from ..registry import register


def entropy_bits(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1)
    return float(-(logp.exp() * logp).sum()) / math.log(2.0)


@dataclass
class EADConfig(AccelConfig):
    small_model: Any = None  # a causal LM with the same tokenizer, or a path to one (loaded like the large model)
    threshold: float = 1.5  # tau, in bits (below 0: never hand over to the small model); 1.5 keeps greedy agreement
    # >= 0.85 on the default model with its 4-layer draft (0.877 at 1.48x vanilla-static; 2.0: 0.847 at 1.65x, and
    # under sampling 87% of its greedy ratio against 94% at 1.5; eleventh H200 run, benchmarks/README.md)
    window: int = option(5, min=1)
    min_run: int = option(4, min=1)
    max_small_run: int = option(64, min=1)

    def validate(self, method: str) -> None:
        if self.small_model is None:
            raise ValueError(
                f"accel={method!r} needs a small model with the same tokenizer: pass accel_kwargs={{'small_model': "
                "model_or_path} (e.g. a smaller model of the same family)."
            )


class _Row:
    __slots__ = ("small", "run", "window", "large_tokens", "small_tokens", "switches")

    def __init__(self, window: int):
        self.small = False
        self.run = 1  # the prefill's token came from the large model
        self.window = deque(maxlen=window)
        self.large_tokens, self.small_tokens, self.switches = 1, 0, 0

    def mean(self) -> float:
        return sum(self.window) / len(self.window) if self.window else 0.0


class _State:
    def __init__(self, rows, follower, gc):
        self.rows = rows
        self.follower = follower
        self.gc = gc
        self.large_token_forwards = 0


@register("ead")
class EAD(SpeculativeAdapter):
    Config = EADConfig
    lossless = False

    def __init__(self, model, config: EADConfig):
        super().__init__(model, config)
        spec = config.small_model
        try:
            small = companion(spec, model, "ead", "small model")
        except (OSError, ValueError) as e:  # transformers' errors for a path that is neither a folder nor a Hub id
            if not (isinstance(spec, str) or hasattr(spec, "__fspath__")) or str(e).startswith("accel="):
                raise
            why = (f"the folder holds no loadable model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
                   if os.path.exists(spec) else "there is no folder at that path, and it is not a Hub model id that "
                   "can be downloaded")
            raise ValueError(
                f"accel='ead': the small model {str(spec)!r} can't be loaded: {why}. Pass accel_kwargs="
                "{'small_model': <a loaded causal LM, or a folder saved with save_pretrained, or a Hub id>}."
            ) from None
        self.small = small
        p = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
        self.param_ratio = p(small) / max(1, p(model))

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        if kwargs.get("small_model") is None:
            return "no small model (accel_kwargs small_model=...: a causal LM with the same tokenizer)"
        return None

    def max_tree_nodes(self) -> int:
        return 1 + self.config.max_small_run

    def prepare(self, model, rows, generation_config):
        dtype = self.small.dtype if self.small.dtype.is_floating_point else torch.float32
        # pad_to: the small model's catch-ups (the tokens the large model produced since it last ran: any length)
        # run at one captured width, so no request meets a width the warm-up did not capture (on an H200 one such
        # capture stalled a timed EAD request ~5 s: benchmarks/results/h200-bf16-cell-e1-2026-12-02-r8)
        follower = Follower(self.small, len(rows), self.small.device, dtype,
                            static_slots=static_slots_for(rows, generation_config,
                                                          self.config.max_small_run + 1 + GRAPH_WIDTHS),
                            graphs=graphs_for(self.small, generation_config), compiled=compile_for(generation_config),
                            static_room=2 * self.config.max_small_run + 2, pad_to=GRAPH_WIDTHS)
        return _State([_Row(self.config.window) for _ in rows], follower, generation_config)

    def _choose(self, state: _State):
        cfg, gc = self.config, state.gc
        sample = bool(gc.do_sample)
        temp = float(gc.temperature or 1.0)
        eos = getattr(gc, "_eos_token_tensor", None)
        eos = set(torch.as_tensor(eos).reshape(-1).tolist()) if eos is not None else set()

        def choose(b, logits):
            st = state.rows[b]
            logp = torch.log_softmax(logits.float(), -1)
            if sample:
                pick = torch.multinomial(torch.softmax(logits.float() / temp, -1), 1)[0]
            else:
                pick = logp.argmax()
            ent, tok = torch.stack([-(logp.exp() * logp).sum() / math.log(2.0), pick.float()]).tolist()  # one sync
            tok = int(tok)
            st.window.append(ent)
            st.run += 1
            ended = tok in eos
            hand_back = st.run >= cfg.min_run and st.mean() > cfg.threshold
            return tok, not (ended or hand_back)

        return choose

    def draft(self, state: _State, rows: list) -> list:
        out = [None] * len(rows)
        small_rows = [r if r is not None and state.rows[b].small else None for b, r in enumerate(rows)]
        if any(r is not None for r in small_rows):
            cap, left = self.config.max_small_run, state.gc.max_new_tokens
            limits = [cap if r is None or left is None else max(1, min(cap, left - len(r.generated))) for r in rows]
            runs = state.follower.run(small_rows, self._choose(state), limits, keep=True)
            for b, toks in enumerate(runs):
                if toks is None:
                    continue
                out[b] = Tree([rows[b].tokens[-1]] + toks, list(range(-1, len(toks))), forced=len(toks))
                st = state.rows[b]
                st.small, st.run, st.switches = False, 0, st.switches + 1  # the large model takes over
        for b, r in enumerate(rows):
            if r is not None:
                state.large_token_forwards += len(out[b]) if out[b] is not None else 1
        return out

    def verified(self, state: _State, row, tree, path, new_tokens, step, b) -> None:
        st = state.rows[b]
        st.small_tokens += min(tree.forced, len(new_tokens))
        if len(new_tokens) != len(path):
            return  # the row ended inside this step
        st.window.append(entropy_bits(step.logits[b, path[-1]]))
        st.run += 1
        st.large_tokens += 1
        if st.run >= self.config.min_run and st.mean() <= self.config.threshold:
            st.small, st.run = True, 0
            st.switches += 1

    def finished(self, state: _State, stats) -> None:
        large = sum(r.large_tokens for r in state.rows)
        small = sum(r.small_tokens for r in state.rows)
        stats.extra.update(
            large_share=large / max(1, large + small), switches=sum(r.switches for r in state.rows),
            small_forwards=state.follower.forwards, large_forwards=stats.target_forwards,
            large_compute_ratio=state.large_token_forwards / max(1, stats.new_tokens),
            small_param_ratio=self.param_ratio,
            # weight FLOPs (2 x parameters per token fed) against vanilla's, attention left out
            est_flops_saved=1.0 - (state.large_token_forwards + self.param_ratio * state.follower.tokens)
            / max(1, stats.new_tokens),
            small_cache="static" if state.follower.static else "dynamic",
            small_graphs=len(state.follower._graphs), small_captures=state.follower.captures,
            small_capture_seconds=state.follower.capture_seconds, small_compiled=state.follower.compiled,
            small_compile_error=state.follower.compile_error,
        )
        if "compile_seconds" in stats.extra:  # the request's capture time includes the small model's
            stats.extra["compile_seconds"] += state.follower.capture_seconds
        state.follower.close()  # its pooled static slots and graphs: free for the next request


__all__ = ["EAD", "EADConfig", "entropy_bits"]
