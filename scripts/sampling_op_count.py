"""How many device ops one sampling step issues: the device sampler's step (engine/sampling.py ``_step``) for one
node of one row over the default model's vocabulary (49152), temperature 0.7 + top-p 0.9 + the keyed draw, run once
eagerly under torch's profiler (CPU). Uncompiled, each top-level op is at least one kernel launch inside the captured
CUDA graph; the count is why the step is compiled before its capture.

    python scripts/sampling_op_count.py [--vocab 49152] [--nodes 1]
"""

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from hf_accel.engine import sampling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--nodes", type=int, default=1)
    a = ap.parse_args()
    ops = sampling.plan(LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.9)]))
    e = sampling._Entry(ops, 1, a.nodes, a.vocab, 512, torch.device("cpu"), True, False)
    e.seed.fill_(123)
    e.anc[:] = torch.ones(a.nodes, a.nodes, dtype=torch.bool).tril()
    raw = torch.randn(1, a.nodes, a.vocab) * 3
    e.run(raw)  # first call outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        e.run(raw)
    top = [x for x in prof.events() if x.cpu_parent is None]
    print(f"top-level ops in one step ({a.nodes} node(s), vocabulary {a.vocab}): {len(top)}")
    print(", ".join(f"{n} {c}" for n, c in Counter(x.name for x in top).most_common()))


if __name__ == "__main__":
    main()
