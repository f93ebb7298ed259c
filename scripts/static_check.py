"""Quick GPU check of the static-cache engine: identity to vanilla greedy and speed, default model.

    python scripts/static_check.py [--dtype fp32|bf16] [--prompts 3] [--max-new-tokens 128]
"""

import argparse
import time

import torch

import hf_accel
from hf_accel.cli import _load_model, ensure_default_datastore
from hf_accel.data import mtbench


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    model, tok = _load_model("default", a.dtype, a.device)
    ensure_default_datastore(model, tok)
    for i, ids in enumerate(mtbench.prompts(tok, limit=a.prompts)):
        x = torch.tensor([ids], device=model.device)
        row = []
        ref = None
        for label, kw in [
            ("vanilla", {}),
            ("aded", {"accel": "aded"}),
            ("aded+static", {"accel": "aded", "cache_implementation": "static"}),
            ("aded+static-nographs", {"accel": "aded", "cache_implementation": "static", "disable_compile": True}),
        ]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(x, max_new_tokens=a.max_new_tokens, do_sample=False, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            n = out.shape[1] - x.shape[1]
            if ref is None:
                ref = out
            st = hf_accel.stats(out) if "accel" in kw else None
            extra = f" tpf {st.tokens_per_forward:.2f} {st.extra}" if st else ""
            row.append(f"{label}: {n / dt:.1f} tok/s same={torch.equal(out, ref)}{extra}")
        print(f"q{i}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
