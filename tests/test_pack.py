"""engine/tree.pack against the definition: tokens padded, depth = path length, ancestry = the path's nodes."""

from __future__ import annotations

import random

import pytest
import torch

from hf_accel.engine.tree import PackBuffers, Tree, pack


def _forest(rng, b, n):
    trees = []
    for _ in range(b):
        m = rng.randint(1, n)
        par = [-1] + [rng.randrange(i) if rng.random() < 0.5 else i - 1 for i in range(1, m)]
        trees.append(Tree([rng.randrange(90) for _ in range(m)], par))
    return trees


@pytest.mark.parametrize("n", [1, 5, 16, 64, 65, 100])
@pytest.mark.parametrize("buffers", [False, True])
def test_pack_matches_the_definition(n, buffers):
    rng = random.Random(n)
    for _ in range(30):
        b = rng.choice([1, 3, 8])
        trees = _forest(rng, b, n)
        active = [rng.random() < 0.8 for _ in range(b)]
        base = [rng.randrange(50) for _ in range(b)]
        out = PackBuffers(b, n) if buffers else None
        # a learned position table's last position (GPT-2): nodes past it sit at it; None: no table
        last = rng.choice([None, rng.randrange(20, 80)])
        p = pack(trees, active, 7, "cpu", nodes=n, base=base, out=out, last_position=last)
        tokens = torch.full((b, n), 7)
        depths = torch.zeros(b, n, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        anc = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)
        for r, t in enumerate(trees):
            tokens[r, : len(t)] = torch.tensor(t.tokens)
            valid[r, : len(t)] = active[r]
            for i in range(len(t)):
                path = t.path_to(i)
                depths[r, i] = len(path) - 1
                anc[r, i, path] = True
        assert torch.equal(p.tokens, tokens) and torch.equal(p.depths, depths)
        assert torch.equal(p.valid, valid) and torch.equal(p.ancestors, anc)
        q_pos = torch.tensor(base)[:, None] + depths
        q_pos[~torch.tensor(active)] = 0  # a finished row's (root-only) tree, seen by none, at position 0
        assert torch.equal(p.q_pos, q_pos if last is None else q_pos.clamp(max=last))
        assert p.max_depth == int(depths.max())
        if buffers:
            assert p.tokens.data_ptr() == out.tokens.data_ptr()  # written in place


def test_pack_refuses_a_tree_wider_than_the_width():
    with pytest.raises(ValueError, match="does not fit"):
        pack([Tree.chain(1, [2, 3])], [True], 0, "cpu", nodes=2)
