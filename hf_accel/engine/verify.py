"""Verification rules: which drafted tokens the target accepts.

Greedy: walk the tree from the root, following the child whose token equals the target's argmax; the
first argmax with no matching child is the bonus token. Identical to vanilla greedy by construction.

Sampling, trees without draft distributions (deterministic drafts such as ADED's): at each node draw
x ~ p (the target's processed distribution at that node); if a child carries x, descend, else x is the
bonus token. Every emitted token is an exact draw from the target's conditional, so the output
distribution equals vanilla sampling (this is recursive rejection sampling with point-mass drafts).

Sampling, chains with draft distributions q (drafts sampled from a draft model): standard speculative
sampling (accept x with prob min(1, p(x)/q(x)); on rejection draw from norm(max(p - q, 0))).

Where these run: when every processor in the request's list is one the device path knows (engine/sampling.py:
the processors transformers builds for the usual options), the processed scores of every node and a draw at
every node are computed on the device in one batched step and the walk is :func:`greedy_walk` over those draws
(``sampling.walk``; the module docstring there proves this is the lazy walk's distribution): one host read per
step. Otherwise :func:`process_tree_scores` + :func:`sample_walk` below run on the host, per row and node
(``stats.extra["sampling_path"]`` says which).
"""

from __future__ import annotations

import copy

import torch

from .tree import Tree


def greedy_walk(tree: Tree, argmax: list) -> tuple:
    """argmax[i] = the target's choice after node i. Returns (path nodes root-first, bonus token)."""
    children = tree.children()
    node = tree.forced
    path = list(range(node + 1))
    while True:
        nxt = children[node].get(argmax[node])
        if nxt is None:
            return path, argmax[node]
        node = nxt
        path.append(node)


def sample_walk(tree: Tree, probs: torch.Tensor, generator=None) -> tuple:
    """probs (N, V): the target's processed distribution at every node. Returns (path, bonus)."""
    if tree.draft_probs is not None and tree.is_chain:
        return _speculative_chain(tree, probs, generator)
    children = tree.children()
    node = tree.forced
    path = list(range(node + 1))
    while True:
        x = int(torch.multinomial(probs[node], 1, generator=generator))
        nxt = children[node].get(x)
        if nxt is None:
            return path, x
        node = nxt
        path.append(node)


def _speculative_chain(tree: Tree, probs: torch.Tensor, generator=None) -> tuple:
    q = tree.draft_probs.to(probs.device, probs.dtype)
    path = [0]
    for i in range(1, len(tree)):
        x = tree.tokens[i]
        p_x = probs[i - 1, x]
        q_x = q[i - 1, x]
        u = torch.rand((), device=probs.device, generator=generator)
        if q_x > 0 and u * q_x <= p_x:
            path.append(i)
            continue
        residual = (probs[i - 1] - q[i - 1]).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else probs[i - 1]
        return path, int(torch.multinomial(residual, 1, generator=generator))
    last = len(tree) - 1
    return path, int(torch.multinomial(probs[last], 1, generator=generator))


def row_processors(logits_processor, row: int):
    """The processor list as row ``row`` alone would see it.

    The engine calls processors per row (rows advance at different speeds), so processors that hold
    per-batch-row state are specialised to the row. Known case: RepetitionPenaltyLogitsProcessor's
    per-row ``prompt_ignore_length`` (the left-padding length, transformers >= 5.2x).
    """
    from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    out = LogitsProcessorList()
    for proc in logits_processor:
        ignore = getattr(proc, "prompt_ignore_length", None)
        if isinstance(proc, RepetitionPenaltyLogitsProcessor) and isinstance(ignore, torch.Tensor):
            proc = copy.copy(proc)
            proc.prompt_ignore_length = int(ignore[row])
        out.append(proc)
    return out


def process_tree_scores(logits_processor, base_ids: torch.Tensor, tree: Tree, raw: torch.Tensor) -> torch.Tensor:
    """Run HF logits processors on every node with the context vanilla generate would give it.

    base_ids (L,): the row's sequence so far (padding included, as vanilla sees it), ending with the root.
    raw (N, V): the row's float logits. Returns processed scores (N, V).
    """
    if not logits_processor:
        return raw
    n = tree.real
    depths = tree.depths()
    out = raw[:n].clone()  # scratch nodes (>= tree.real) are never scored
    by_depth: dict = {}
    for i in range(n):
        by_depth.setdefault(depths[i], []).append(i)
    for d, nodes in by_depth.items():
        ctx = torch.empty((len(nodes), base_ids.shape[0] + d), dtype=base_ids.dtype, device=base_ids.device)
        ctx[:, : base_ids.shape[0]] = base_ids
        for r, node in enumerate(nodes):
            if d:
                ctx[r, base_ids.shape[0] :] = torch.tensor(
                    [tree.tokens[j] for j in tree.path_to(node)[1:]], dtype=base_ids.dtype
                )
        out[nodes] = logits_processor(ctx, raw[nodes])
    return out
