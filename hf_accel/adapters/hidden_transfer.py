"""Hidden transfer (arXiv 2404.12022): pseudo hidden states for future positions, drafted inside the verify forward.

Lossless: the drafts are verified by the target through the engine.

How it runs (``TransferMaps``; trained by ``hf-accel train hidden-transfer``, loaded with
``accel_kwargs={"heads": path}``):

* k trained linear maps ``W_j`` (j = 1..k) at an intermediate layer t turn a token's layer-t hidden state h into
  pseudo hidden states ``W_j h + b_j`` standing for positions +1..+k after it.
* Every real node u of a draft tree gets a chain of k *scratch* nodes (engine/tree.py: never accepted, KV dropped at
  commit) at positions pos(u)+1..pos(u)+k, seeing u's ancestors, u and the earlier scratch nodes of its chain. During
  the verify forward an edit of layer t (a fixed-shape step program, engine/capture.py: per position the source
  node, the map and a scratch mask, filled before each verify) replaces the scratch nodes' layer-t output by the
  transferred states of u, so they pass through layers t+1..L attending to the real context, and the LM head gives
  their predictions. The scratch nodes run through layers <= t too (on placeholder tokens, seen by nobody): that
  keeps one ordinary forward, with the cost of k extra query positions per node in the lower layers. Scratch
  chains count in the node budget (``max_nodes x (1 + depth)``), so the static engine captures the whole step.
* After the walk, the scratch chain of the last accepted node u holds the predictions for the k tokens that follow
  the bonus token (u's argmax): pseudo j predicts depth j of the next tree. The next tree is grown best-first from
  those per-depth candidates (product of probabilities, ``max_nodes`` real nodes, Medusa-style).
* The first step after prefill drafts the root alone (plus its scratch chain): prefill has no scratch nodes.

Choices that are ours: maps are affine (``W_j h + b_j``, W_j initialised to identity); the default layer is
``(num_layers - 1) // 2``; the training loss is the KL from the target's own next-token distribution at the real
position to the pseudo position's (the target sees the true tokens there), on self-distilled data.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import models
from ..config import AccelConfig, option
from ..engine import capture
from ..engine.adapter import Row, SpeculativeAdapter, StepOutput
from ..engine.tree import Tree, add_scratch_chains
from ..integrations import artifacts
from ..registry import register

KIND = "hidden_transfer"


class TransferMaps(artifacts.TrainedPart, nn.Module):
    kind = KIND

    def __init__(self, model, layer: int | None = None, k: int = 3):
        super().__init__()
        d = models.dims(model)
        n = d["layers"]
        self.layer = (n - 1) // 2 if layer is None else int(layer)
        if not 0 <= self.layer < n - 1:
            raise ValueError(f"hidden transfer layer must be in [0, {n - 2}] for a {n}-layer model; got {layer}")
        self.k = int(k)
        h = d["hidden"]
        self.weight = nn.Parameter(torch.eye(h).repeat(self.k, 1, 1))  # (k, out, in)
        self.bias = nn.Parameter(torch.zeros(self.k, h))
        self.__dict__["base"] = model

    def transfer(self, h, j):
        """h (M, H) layer-t states, j (M,) in [0, k) -> (M, H) pseudo states."""
        w = self.weight.index_select(0, j)  # (M, H, H)
        return torch.bmm(w, h.to(w.dtype)[:, :, None])[:, :, 0] + self.bias.index_select(0, j)

    def transfer_all(self, h, j):
        """h (B, N, H) layer-t states, j (B, N) in [0, k) -> (B, N, H): every position through its own map. Fixed
        shapes, no host read (all k maps are applied, then one is picked per position): capturable."""
        w = self.weight
        y = torch.einsum("bni,koi->bnko", h.to(w.dtype), w) + self.bias  # (B, N, k, H)
        return y.gather(2, j[:, :, None, None].expand(-1, -1, 1, y.shape[-1]))[:, :, 0]

    def layer_module(self):
        return models.layers(self.base)[self.layer]

    def routed(self, rows, dst, src, j):
        """While active, layer ``self.layer``'s output at (rows, dst) is replaced by the transfer of its output at
        (rows, src) through map j (training). Only forwards of this thread are touched (engine/capture.py)."""

        def edit(module, args, kwargs, output):
            out = models.layer_output_hidden(output)
            vals = self.transfer(out[rows, src], j).to(out.dtype)
            return models.replace_layer_output(output, out.index_put((rows, dst), vals))

        return capture.layer_edits([(self.layer_module(), edit)])

    def settings(self) -> dict:
        return {"layer": self.layer, "k": self.k}


#: default real nodes per row. An H200 (bf16, default model, held-out MT-Bench q60-75, 2026-12-03, thirteenth run,
#: benchmarks/README.md): batch 1, 16 nodes 2.07x vanilla-static (twelfth run); batch 8, 16 nodes 0.96x, 8 nodes 1.11x,
#: 4 nodes 1.12x (a verify of 8 rows x 16 x (1 + depth) positions is no longer latency-bound). Batches 2-7 are not
#: measured: they get the batched default.
MAX_NODES_B1 = 16
MAX_NODES_BATCHED = 8


@dataclass
class HiddenTransferConfig(AccelConfig):
    part_option = "heads"  # also accepted as part= (AccelConfig.part_option)
    heads: Any = None  # artifact folder (hf-accel train hidden-transfer) or a TransferMaps
    depth: int | None = option(None, min=1)  # pseudo positions used (<= the k trained; default k)
    # real tree nodes per row, root included (default: MAX_NODES_B1 at batch 1, MAX_NODES_BATCHED at batch > 1)
    max_nodes: int | None = option(None, min=1)
    top_k: int = option(8, min=1)  # candidates kept per depth
    min_prob: float = option(0.0, min=0, max=1)

    def validate(self, method: str) -> None:
        if self.heads is None:
            raise ValueError(
                f"accel={method!r} needs trained transfer maps: pass accel_kwargs={{'heads': path}} (a folder "
                "written by `hf-accel train hidden-transfer`)."
            )


class _State(list):
    """Per-row states, plus the last verify's top candidates of every position (read once per step)."""

    top = None


class _RowState:
    __slots__ = ("cands", "scratch")

    def __init__(self):
        self.cands = None  # per depth: (tokens, log-probs), best first
        self.scratch = None  # real node -> its scratch chain (node indices), for the tree in flight


@register("hidden_transfer")
class HiddenTransfer(SpeculativeAdapter):
    Config = HiddenTransferConfig

    def __init__(self, model, config: HiddenTransferConfig):
        super().__init__(model, config)
        self.maps = artifacts.part_from(config.heads, TransferMaps, model, self.name)
        if config.depth is not None and config.depth > self.maps.k:
            raise ValueError(
                f"accel={self.name!r}: depth={config.depth} is more than the {self.maps.k} pseudo positions these "
                f"transfer maps were trained for: pass depth <= {self.maps.k} (or leave it out), or train maps with "
                f"a larger k (`hf-accel train hidden-transfer --depth {config.depth}`)."
            )
        self.depth = config.depth or self.maps.k
        self.max_nodes = config.max_nodes or MAX_NODES_B1

    def for_batch(self, batch: int) -> None:
        if self.config.max_nodes is None:
            self.max_nodes = MAX_NODES_B1 if batch == 1 else MAX_NODES_BATCHED

    def max_tree_nodes(self) -> int:
        return self.max_nodes * (1 + self.depth)

    def max_real_nodes(self) -> int:
        return self.max_nodes  # each real node's scratch chain follows them (depth nodes per real node)

    @classmethod
    def missing_artifacts(cls, model, kwargs: dict):
        return artifacts.missing(kwargs.get("heads"), TransferMaps,
                                 "trained transfer maps (accel_kwargs heads=...; `hf-accel train hidden-transfer`)")

    def prepare(self, model, rows, generation_config):
        return _State(_RowState() for _ in rows)

    def draft(self, state, rows: list) -> list:
        out = []
        for b, row in enumerate(rows):
            st = state[b]
            if row is None:
                st.scratch = None
                out.append(None)
                continue
            tokens, parents = self._real_tree(st, row.tokens[-1])
            n_real = len(tokens)
            real_tokens = list(tokens)  # placeholder inputs: replaced at the transfer layer
            st.scratch = add_scratch_chains(tokens, parents, range(n_real), self.depth, lambda u: real_tokens[u])
            out.append(Tree(tokens, parents, n_real=n_real))
        return out

    def _real_tree(self, st: _RowState, root: int):
        tokens, parents, score = [root], [-1], [0.0]
        cands = st.cands
        if not cands:
            return tokens, parents
        floor = math.log(self.config.min_prob) if self.config.min_prob > 0 else -math.inf
        heap = [(-cands[0][1][0], 0, 0, 0)]
        while heap and len(tokens) < self.max_nodes:
            neg, par, d, c = heapq.heappop(heap)
            if -neg < floor:
                break
            node = len(tokens)
            tokens.append(cands[d][0][c])
            parents.append(par)
            score.append(-neg)
            if c + 1 < len(cands[d][0]):
                heapq.heappush(heap, (-(score[par] + cands[d][1][c + 1]), par, d, c + 1))
            if d + 1 < len(cands):
                heapq.heappush(heap, (-(score[node] + cands[d + 1][1][0]), node, d + 1, 0))
        return tokens, parents

    def step_program(self):
        return _TransferStep(self.maps)

    @torch.no_grad()
    def verified(self, state, row: Row, tree: Tree, path: list, new_tokens: list, step: StepOutput, b: int) -> None:
        st = state[b]
        reads = step.reads
        if reads is None:  # (an engine path that did not read them with the step: once per step, all rows)
            if state.top is None or state.top[0] is not step:
                state.top = (step, self.step_reads(state, step.logits).cpu().numpy())
            reads = state.top[1]
        k = reads.shape[-1] // 2
        st.cands = [([int(t) for t in r[:k]], r[k:]) for r in (reads[b, i].tolist() for i in st.scratch[path[-1]])]

    def step_reads(self, state, logits):
        """Each node's top-k tokens and their log-probabilities, (B, N, 2k) float64: read with the step's argmax."""
        x = logits.float()
        top = x.topk(min(self.config.top_k, x.shape[-1]), dim=-1)
        vals = top.values - torch.logsumexp(x, -1, keepdim=True)  # log-probabilities of the top tokens
        return torch.cat([top.indices.double(), vals.double()], -1)


class _TransferStep(capture.StepProgram):
    """The transfer at layer t as a fixed-shape step (engine/capture.py): per position of the verify forward, the
    node whose layer-t state it takes (``src``), the map (``j``) and whether it is a scratch node (``on``); every
    other position keeps its own output."""

    def __init__(self, maps: TransferMaps):
        self.maps = maps

    def key(self):
        return capture.part_key(KIND, self.maps)

    def buffers(self, batch, nodes, device):
        return {"src": torch.zeros(batch, nodes, dtype=torch.long, device=device),
                "j": torch.zeros(batch, nodes, dtype=torch.long, device=device),
                "on": torch.zeros(batch, nodes, 1, dtype=torch.bool, device=device)}

    def fill(self, state, trees, bufs):
        b, n = bufs["src"].shape
        src = np.tile(np.arange(n), (b, 1))
        j = np.zeros((b, n), dtype=np.int64)
        on = np.zeros((b, n, 1), dtype=bool)
        for r, st in enumerate(state):
            if not st.scratch:
                continue
            chains = list(st.scratch.values())
            lens = [len(c) for c in chains]
            at = np.fromiter((p for c in chains for p in c), dtype=np.int64, count=sum(lens))
            src[r, at] = np.repeat(np.fromiter(st.scratch.keys(), dtype=np.int64, count=len(chains)), lens)
            j[r, at] = np.concatenate([np.arange(k) for k in lens]) if lens else at
            on[r, at] = True
        for name, v in (("src", src), ("j", j), ("on", on)):
            capture.upload(bufs[name], v)

    def neutral(self, bufs):
        bufs["on"].zero_()  # no scratch node: every position keeps its own output
        return True

    def edits(self, bufs):
        maps, src, j, on = self.maps, bufs["src"], bufs["j"], bufs["on"]

        def edit(module, args, kwargs, output):
            out = models.layer_output_hidden(output)
            h = out.gather(1, src[:, :, None].expand(-1, -1, out.shape[-1]))
            return models.replace_layer_output(output, torch.where(on, maps.transfer_all(h, j).to(out.dtype), out))

        return [(maps.layer_module(), edit)]
