"""Host cost of handing a step's adapter reads (``StepOutput.reads``) to the adapters, old way against new.

The greedy fast path reads the argmax and the adapter's per-node reads (hidden transfer: top-k tokens and
log-probabilities, K = 2 x top_k; LUD: confidence and token, K = 2) in one transfer. Until 2026-12-03 the engine
turned the whole (B, N, 1 + K) array into nested Python lists and split every node's list; now it keeps one numpy
array, makes only the argmax a list, and each adapter's ``verified`` converts the few nodes it reads
(``reads[b, i].tolist()`` per node i). This times both ways on the host (no device needed: the array is already on the
host; the transfer itself is the same), at the batch-8 shapes of the thirteenth H200 run's step profile.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/reads_conversion_cost.py [--batch 8] [--nodes 32] [--k 16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def old_way(argmax_t, extra, chains):
    both = torch.cat([argmax_t[..., None].to(extra.dtype), extra], -1).tolist()
    argmax = [[int(node[0]) for node in row] for row in both]
    reads = [[node[1:] for node in row] for row in both]
    k = len(reads[0][0]) // 2
    return argmax, [[([int(t) for t in reads[b][i][:k]], reads[b][i][k:]) for i in c] for b, c in enumerate(chains)]


def new_way(argmax_t, extra, chains):
    both = torch.cat([argmax_t[..., None].to(extra.dtype), extra], -1).cpu().numpy()
    argmax = both[..., 0].astype(np.int64).tolist()
    reads = both[..., 1:]
    k = reads.shape[-1] // 2
    return argmax, [[([int(t) for t in r[:k]], r[k:]) for r in (reads[b, i].tolist() for i in c)]
                    for b, c in enumerate(chains)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=32,
                    help="verify positions per row (hidden transfer: max_nodes x (1 + depth))")
    ap.add_argument("--k", type=int, default=16, help="reads per node (hidden transfer: 2 x top_k 8)")
    ap.add_argument("--depth", type=int, default=3, help="nodes each row's verified() reads")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    argmax_t = torch.randint(0, 49152, (a.batch, a.nodes), generator=g)
    extra = torch.rand(a.batch, a.nodes, a.k, generator=g, dtype=torch.float64)
    chains = [list(range(b, b + a.depth)) for b in range(a.batch)]
    ref = old_way(argmax_t, extra, chains)
    assert new_way(argmax_t, extra, chains) == ref, "the two ways must hand over the same values"
    print(f"batch {a.batch}, {a.nodes} nodes, {a.k} reads per node, {a.depth} nodes read per row; host us per step:")
    for f in (old_way, new_way):
        t = time.perf_counter()
        for _ in range(a.reps):
            f(argmax_t, extra, chains)
        print(f"  {f.__name__}: {(time.perf_counter() - t) / a.reps * 1e6:.0f}")


if __name__ == "__main__":
    main()
