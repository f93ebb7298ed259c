"""LUD, lexical unit decoding (arXiv 2405.15208): several tokens per forward from placeholder positions.

``generate(..., accel="lud", accel_kwargs={"adapter": path, "beta": 0.9})``; the adapter is trained by
``hf-accel train lud``. ``beta`` defaults to 0.9, and to 0.2 with ``lossless=True``.

Each forward appends k−1 *placeholder* positions after the row's last token: the output at the real position
predicts the next token t1 as usual, the output at placeholder j predicts t_{j+1}. The leading placeholder
predictions whose probability is ≥ ``beta`` are accepted with t1 (at least t1), stopping at the first one that
repeats its predecessor (repetition guard, ``guard=True``); placeholder KV is discarded. Through the shared engine
the placeholders are scratch nodes (engine/tree.py) and the accepted extra tokens are the next step's *forced*
chain: they go through the next forward as real inputs (that is where their KV comes from) and are committed
without verification. Per row, so batch > 1 with padding works as for every engine method.

``lossless=True`` verifies instead of forcing: the extra tokens become an ordinary draft chain that the base model
checks in the next forward (every real node then carries its own placeholder chain, since which one is accepted
is not known in advance), so the output is token-identical to the base model's greedy output.

The fine-tune (``LUDLoRA``): rank-r low-rank adapters, one per decoder layer (input -> addition to its output;
``targets="projections"``: a LoRA on every projection instead), applied **only at placeholder positions** (layer edits of the request's own forwards, engine/capture.py, masked by a fixed-shape per-position scale). Real positions therefore run the
unchanged base model: that is what makes ``lossless=True`` exact with one forward per step, and what keeps the
user's model untouched between requests.

Choices that are ours: the placeholder is an existing token id (``<repo_name>``, id 3, for the default model, chosen by
``placeholder_from_tokenizer``: the first added special token that the chat template never emits),
not a new one, so the base model's embeddings stay as they are; the fine-tune is position-masked LoRA (the paper
fine-tunes the whole model on rewritten sequences); training uses the anchored placeholder chains of
``train/lud.py`` instead of rewriting the sequences in place (same targets: tokens after a unit's first, predicted
from placeholders); the repetition guard. peft: ``hf-accel train lud --targets projections`` trains the
per-projection LoRA through peft (``train/lud.PeftLUD``: peft LoRA layers injected into the training process's model,
masked to placeholder positions) and exports it to this format; decoding never injects peft layers, because they
would stay in the user's model and apply at every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine import capture
from ..engine.adapter import SpeculativeAdapter
from ..engine.tree import Tree, add_scratch_chains
from ..integrations import artifacts
from ..registry import register

KIND = "lud"
LOSSY_BETA, LOSSLESS_BETA = 0.9, 0.2  # LUDConfig.beta's defaults


def placeholder_from_tokenizer(tokenizer) -> int:
    """An existing special token the chat template does not produce, used as the placeholder input."""
    used = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - no chat template: any unused special token will do
        text = ""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tid in sorted(added):
        tok = added[tid]
        if getattr(tok, "special", False) and tid not in used and str(tok) not in text:
            return int(tid)
    raise ValueError("LUD needs a placeholder token: this tokenizer has no unused special token; pass "
                     "--placeholder-id with a token id the model never produces")


class LUDLoRA(artifacts.TrainedPart, nn.Module):
    """Low-rank adapters applied only where ``applied(mask)`` says. ``targets="layers"`` (default): one per decoder
    layer, from the layer's input to an addition to its output (a parallel adapter: one hook per layer);
    ``targets="projections"``: a LoRA on every projection inside the layers (seven hooks per layer: the extra
    kernel launches cost more than the tokens gained on a launch-bound GPU; kept for comparison)."""

    kind = KIND

    def __init__(self, model, placeholder_id: int, k: int = 4, rank: int = 16, alpha: float = 32.0,
                 targets: str = "layers"):
        super().__init__()
        self.placeholder_id, self.k, self.rank, self.alpha = int(placeholder_id), int(k), int(rank), float(alpha)
        if self.k < 2:
            raise ValueError(f"LUD needs k >= 2 (one real + k-1 placeholder predictions); got {k}")
        if targets not in ("layers", "projections"):
            raise ValueError(f"LUD targets must be 'layers' or 'projections', got {targets!r}")
        self.targets = targets
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        targets = self._targets(model)
        for _, mod, (i, o) in targets:
            self.A.append(nn.Parameter(torch.randn(self.rank, i) * i ** -0.5))
            self.B.append(nn.Parameter(torch.zeros(o, self.rank)))
        self.__dict__["base"] = model
        self.__dict__["modules_"] = [mod for _, mod, _ in targets]  # the model's own modules, not ours

    def _targets(self, model):
        if self.targets == "layers":
            h = models.dims(model)["hidden"]
            return [(f"layer{i}", layer, (h, h)) for i, layer in enumerate(models.layers(model))]
        return [(n, m, models.linear_dims(m)) for n, m in models.projections(model)]

    def applied(self, where: torch.Tensor):
        """While active, every target adds ``(alpha / rank) · B A x`` (x its input) to its output at the positions
        where ``where`` (B, T) is True (forwards of this thread only, engine/capture.py; nothing left on exit)."""
        return capture.layer_edits(self.edits(where[..., None].to(self.A[0].dtype) * (self.alpha / self.rank)))

    def edits(self, w: torch.Tensor) -> list:
        """(module, edit) pairs adding ``B A x · w`` to every target's output; ``w`` (B, T, 1) the per-position
        scale (``alpha / rank`` at placeholders, 0 elsewhere). Device tensors only: capturable."""

        def make(i):
            def edit(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                out = models.layer_output_hidden(output)
                delta = (x.to(self.A[i].dtype) @ self.A[i].t()) @ self.B[i].t()
                scale = w.reshape(*delta.shape[:-1], 1)  # OPT flattens (B, T) before its feed-forward
                return models.replace_layer_output(output, torch.addcmul(out, delta.to(out.dtype),
                                                                         scale.to(out.dtype)))

            return edit

        return [(mod, make(i)) for i, mod in enumerate(self.modules_)]

    def settings(self) -> dict:
        return {"placeholder_id": self.placeholder_id, "k": self.k, "rank": self.rank, "alpha": self.alpha,
                "targets": self.targets}


@dataclass
class LUDConfig(AccelConfig):
    part_option = "adapter"  # also accepted as part= (AccelConfig.part_option)
    adapter: Any = None  # artifact folder (hf-accel train lud) or a LUDLoRA
    beta: float | None = option(None, min=0, max=1)  # confidence needed to accept a placeholder's prediction
    # (default: 0.9 lossy; lossless 0.2, where beta only picks which predictions are drafted for the base model to
    # verify: on MT-Bench q20-25, fp32 CPU, 2026-12-03, lossless at beta 0.9 / 0.5 / 0.2 / 0 drafted 1.09 / 1.21 /
    # 1.32 / 1.36 tokens per forward, all token-identical; on the static engine the verify's width is the same)
    k: int | None = option(None, min=2)  # predictions per forward, real one included (<= trained k; default it)
    lossless: bool = False  # verify the extra tokens with the base model (token-identical output)
    guard: bool = True  # stop accepting at a token that repeats its predecessor

    @property
    def threshold(self) -> float:
        """``beta``, or its default for the mode."""
        return self.beta if self.beta is not None else (LOSSLESS_BETA if self.lossless else LOSSY_BETA)

    def validate(self, method: str) -> None:
        if self.adapter is None:
            raise ValueError(
                f"accel={method!r} needs a LUD fine-tune: pass accel_kwargs={{'adapter': path}} (a folder written by "
                "`hf-accel train lud`)."
            )


class _State(list):
    """Per-row states, plus the last verify's most likely token and its probability at every position."""

    top = None


class _Row:
    __slots__ = ("extra", "chains")

    def __init__(self):
        self.extra = []  # tokens proposed by the last forward's placeholders (forced or drafted next)
        self.chains = None  # real node -> its placeholder nodes, for the tree in flight


@register("lud")
class LUD(SpeculativeAdapter):
    Config = LUDConfig

    def __init__(self, model, config: LUDConfig):
        super().__init__(model, config)
        self.lora = artifacts.part_from(config.adapter, LUDLoRA, model, self.name)
        if config.k is not None and config.k > self.lora.k:
            raise ValueError(
                f"accel={self.name!r}: k={config.k} is more than the {self.lora.k} predictions per forward this LUD "
                f"fine-tune was trained for: pass k <= {self.lora.k} (or leave it out), or train one with a larger k "
                f"(`hf-accel train lud --depth {config.k}`)."
            )
        self.k = config.k or self.lora.k
        self.lossless = bool(config.lossless)

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        return artifacts.missing(kwargs.get("adapter"), LUDLoRA, "LUD fine-tune (accel_kwargs adapter=...; `hf-accel train lud`)")

    def max_tree_nodes(self) -> int:
        m = self.k - 1
        return (1 + m) * self.k if self.lossless else 1 + m + m

    def max_real_nodes(self) -> int:
        return self.k  # the root and up to k - 1 extra tokens; the placeholder chains follow them

    def prepare(self, model, rows, generation_config):
        return _State(_Row() for _ in rows)

    def draft(self, state, rows: list) -> list:
        out = []
        ph, m = self.lora.placeholder_id, self.k - 1
        for b, row in enumerate(rows):
            st = state[b]
            if row is None:
                st.chains = None
                out.append(None)
                continue
            tokens = [row.tokens[-1]] + st.extra
            parents = list(range(-1, len(st.extra)))
            n_real = len(tokens)
            owners = range(n_real) if self.lossless else [n_real - 1]
            st.chains = add_scratch_chains(tokens, parents, owners, m, lambda u: ph)
            out.append(Tree(tokens, parents, n_real=n_real, forced=0 if self.lossless else len(st.extra)))
        return out

    def step_program(self):
        return _PlaceholderStep(self.lora)

    def step_reads(self, state, logits):
        """Each node's top probability and token, (B, N, 2) float64: read with the step's argmax."""
        conf, tok = torch.softmax(logits.float(), -1).max(-1)
        return torch.stack([conf.double(), tok.double()], -1)

    def verified(self, state, row, tree, path, new_tokens, step, b) -> None:
        st = state[b]
        chain = st.chains.get(path[-1]) if st.chains else None
        st.extra = []
        if not chain or len(new_tokens) != len(path):  # a stopping criterion ended the row inside this step
            return
        reads = step.reads
        if reads is None:  # (an engine path that did not read them with the step: once per step, all rows)
            if state.top is None or state.top[0] is not step:
                state.top = (step, self.step_reads(state, step.logits).cpu().numpy())
            reads = state.top[1]
        prev = new_tokens[-1]
        for c, t in (reads[b, i].tolist() for i in chain):
            t = int(t)
            if c < self.config.threshold or (self.config.guard and t == prev):
                break
            st.extra.append(t)
            prev = t


class _PlaceholderStep(capture.StepProgram):
    """The placeholder-only adapters as a fixed-shape step (engine/capture.py): one scale buffer (B, N, 1),
    ``alpha / rank`` at the forward's placeholder (scratch) positions and 0 elsewhere."""

    def __init__(self, lora: LUDLoRA):
        self.lora = lora

    def key(self):
        return capture.part_key(KIND, self.lora)

    def buffers(self, batch, nodes, device):
        return {"w": torch.zeros(batch, nodes, 1, dtype=self.lora.A[0].dtype, device=device)}

    def fill(self, state, trees, bufs):
        w = torch.zeros(bufs["w"].shape, dtype=bufs["w"].dtype)
        for b, t in enumerate(trees):
            w[b, t.real : len(t)] = self.lora.alpha / self.lora.rank
        capture.upload(bufs["w"], w)

    def neutral(self, bufs):
        bufs["w"].zero_()  # no placeholder: the adapters add 0
        return True

    def edits(self, bufs):
        return self.lora.edits(bufs["w"])


__all__ = ["LUD", "LUDConfig", "LUDLoRA", "placeholder_from_tokenizer"]
