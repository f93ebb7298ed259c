"""``hf-accel`` command line: demo, datastore build, methods."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _load_model(name: str, dtype: str, device: str):
    import torch

    dt = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if name == "default":
        from .default_model import load_default

        return load_default(dtype=dt, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dt).to(device).eval()
    return model, tok


def default_datastore_path(model, tok) -> Path:
    from .data.trigram import default_path, tokenizer_hash

    return default_path(tokenizer_hash(tok))


def _register_store(model, path: Path) -> None:
    index = path.parent / "index.txt"
    name = str(getattr(model.config, "_name_or_path", ""))
    lines = [ln for ln in (index.read_text().splitlines() if index.exists() else []) if not ln.startswith(name + "\t")]
    lines.append(f"{name}\t{path.name}")
    index.write_text("\n".join(lines) + "\n")


def cmd_datastore_build(args) -> int:
    from .data.trigram import build_from_sharegpt

    model, tok = _load_model(args.model, "fp32", "cpu")
    out = Path(args.out) if args.out else default_datastore_path(model, tok)
    t = time.time()
    store = build_from_sharegpt(tok, limit=args.limit, top_k=args.top_k)
    store.save(out)
    if out.parent == default_datastore_path(model, tok).parent:
        _register_store(model, out)
    print(
        f"datastore: {len(store):,} token pairs from {store.meta['tokens']:,} tokens "
        f"({store.meta['turns']:,} assistant turns) -> {out} in {time.time() - t:.0f}s"
    )
    return 0


def ensure_default_datastore(model, tok, limit=None):
    """Path of the ShareGPT datastore for this tokenizer, building it (with a progress bar) if missing."""
    from .data.trigram import build_from_sharegpt

    path = default_datastore_path(model, tok)
    if not path.exists():
        print(f"building the ShareGPT trigram datastore for this tokenizer (once) -> {path}", flush=True)
        build_from_sharegpt(tok, limit=limit).save(path)
        _register_store(model, path)
    return path


def cmd_demo(args) -> int:
    import torch

    import hf_accel
    from .data import mtbench

    model, tok = _load_model(args.model, args.dtype, args.device)
    store = ensure_default_datastore(model, tok) if not args.no_datastore else None
    prompts = mtbench.prompts(tok, start=args.start, limit=args.prompts)
    methods = args.methods.split(",")
    print(f"model={args.model} dtype={args.dtype} device={args.device} max_new_tokens={args.max_new_tokens}")
    rows = []
    for qi, ids in enumerate(prompts):
        x = torch.tensor([ids], device=args.device)
        t = time.perf_counter()
        ref = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False)
        tv = time.perf_counter() - t
        nv = ref.shape[1] - x.shape[1]
        for m in methods:
            kw = {"datastore": str(store) if store else None} if m == "aded" else {}
            t = time.perf_counter()
            out = model.generate(x, max_new_tokens=args.max_new_tokens, do_sample=False, accel=m, accel_kwargs=kw)
            ta = time.perf_counter() - t
            st = hf_accel.stats(out)
            same = torch.equal(out, ref)
            rows.append((qi, m, nv / tv, st.new_tokens / ta, st.tokens_per_forward, same))
            print(
                f"q{args.start + qi:02d} {m:8s} vanilla {nv / tv:6.1f} tok/s | {m} {st.new_tokens / ta:6.1f} tok/s "
                f"| {st.tokens_per_forward:.2f} tokens/forward | identical: {'yes' if same else 'NO'}",
                flush=True,
            )
        if qi == 0:
            print("  sample output:", repr(tok.decode(ref[0, x.shape[1] :], skip_special_tokens=True)[:160]))
    for m in methods:
        r = [x for x in rows if x[1] == m]
        v = sum(x[2] for x in r) / len(r)
        a = sum(x[3] for x in r) / len(r)
        tpf = sum(x[4] for x in r) / len(r)
        print(
            f"== {m}: vanilla {v:.1f} tok/s, {m} {a:.1f} tok/s ({a / v:.2f}x), {tpf:.2f} tokens/forward, "
            f"identical {sum(x[5] for x in r)}/{len(r)}"
        )
    return 0 if all(x[5] for x in rows) else 1


def cmd_methods(args) -> int:
    import hf_accel

    for name in hf_accel.available():
        print(name)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hf-accel", description="faster HF generate(): demo, datastores, methods")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="vanilla vs accelerated generate side by side on MT-Bench prompts")
    d.add_argument("--model", default="default")
    d.add_argument("--methods", default="aded")
    d.add_argument("--prompts", type=int, default=3)
    d.add_argument("--start", type=int, default=0)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--dtype", default="fp32")
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-datastore", action="store_true", help="ADED from the prompt only")
    d.set_defaults(fn=cmd_demo)

    ds = sub.add_parser("datastore", help="ADED trigram datastores")
    dsub = ds.add_subparsers(dest="dcmd", required=True)
    b = dsub.add_parser("build", help="build a trigram datastore from ShareGPT with the model's tokenizer")
    b.add_argument("--model", default="default")
    b.add_argument("--out", default=None)
    b.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    b.add_argument("--top-k", type=int, default=12)
    b.set_defaults(fn=cmd_datastore_build)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(fn=cmd_methods)

    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
