"""Cost of one ADED datastore lookup (``TrigramStore.trigram_pairs``), cold (not in the store's cache) and cached.

    PYTHONPATH=<worktree> python scripts/trigram_lookup_cost.py [--keys 8000] [--reps 3]

The default model's ShareGPT store (built on first use, as ``hf-accel demo`` does); ``--keys`` random trigram keys
present in the store and as many random absent ones, shuffled (16,000 by default: they fit the store's cache of
16,384 lookups, which is emptied when full); each repetition empties the cache, times every key
once (cold), then once more (cached), and the best repetition is printed in microseconds per lookup. Run it against
two worktrees (PYTHONPATH) to compare commits."""
import argparse
import time

import numpy as np

import hf_accel
from hf_accel import loading
from hf_accel.data.trigram import TrigramStore


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    model, tok = loading.load_model("default", "fp32", "cpu")
    store = TrigramStore.load(str(loading.ensure_default_datastore(model, tok)))
    v = store.vocab_size
    rng = np.random.default_rng(0)
    keys = np.concatenate([store.pair_keys[rng.integers(0, len(store.pair_keys), a.keys)],
                           rng.integers(0, v * v, a.keys)])
    rng.shuffle(keys)
    pairs = [(int(k) // v, int(k) % v) for k in keys]
    cold = warm = float("inf")
    for _ in range(a.reps):
        store._pairs.clear()
        t = time.perf_counter()
        for x, y in pairs:
            store.trigram_pairs(x, y)
        t1 = time.perf_counter()
        for x, y in pairs:
            store.trigram_pairs(x, y)
        t2 = time.perf_counter()
        cold, warm = min(cold, (t1 - t) / len(pairs)), min(warm, (t2 - t1) / len(pairs))
    print(f"hf_accel {hf_accel.__file__}: {len(pairs)} lookups ({a.keys} present), cold {cold * 1e6:.2f} us, "
          f"cached {warm * 1e6:.2f} us per lookup")


if __name__ == "__main__":
    main()
