"""``hf-accel`` command line: demo, bench, datastore build, methods."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[dtype]


QUANTIZE = ("none", "nf4", "int8")


def _quantization(quantize: str | None, dtype):
    """A bitsandbytes config for --quantize (None for none): NF4 4-bit computing in ``dtype``, or LLM.int8."""
    if quantize in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def _load_model(name: str, dtype: str, device: str, quantize: str | None = None):
    dt = _torch_dtype(dtype)
    qc = _quantization(quantize, dt)
    if name == "default":
        from .default_model import load_default

        return load_default(dtype=dt, device=device, quantization_config=qc)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"
    if qc is not None:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dt, quantization_config=qc, device_map=device).eval()
    else:
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


def _model_label(name: str) -> str:
    if name == "default":
        from .default_model import NAME

        return f"{NAME} (default)"
    return name


def _proj_kw(args) -> dict:
    return dict(ks=args.project_ks, prefixes=args.project_prefixes, reps=args.project_reps,
                progress=not args.no_progress)


def cmd_bench(args) -> int:
    import json as _json

    import torch

    from .bench import methods as bm
    from .bench import project as bp
    from .bench import report
    from .bench.runner import run_bench
    from .data import prompts as bprompts

    if args.suite == "duo":  # DuoAttention: passkey retrieval, KV bytes, memory, decode speed vs full attention
        from .bench import duo

        return duo.cli(args)
    command = "hf-accel " + " ".join(args.argv)
    out = Path(args.out)
    if args.project_from and not args.project_shape:
        raise SystemExit("--project-from needs --project-shape (which shapes to project to)")
    if args.project_from:
        # projection only, from an earlier bench's profiles (the bench model is still timed here)
        prev = _json.loads(Path(args.project_from).read_text())
        model, _ = _load_model(args.model, args.dtype, args.device)
        result = prev
        result["projection"] = bp.run_projection(
            model, prev["methods"], args.project_shape, _torch_dtype(args.dtype), **_proj_kw(args)
        )
        result["projection"]["command"] = command
        out.mkdir(parents=True, exist_ok=True)
        (out / "projection.json").write_text(_json.dumps(result["projection"], indent=1, default=float))
        (out / "projection.md").write_text(bp.markdown(result["projection"]) + "\n")
        bp.plot(result["projection"], out)
        print(bp.markdown(result["projection"]))
        return 0

    model, tok = _load_model(args.model, args.dtype, args.device, args.quantize)
    specs, skipped = bm.parse(args.methods, model.device.type, args.draft_model, model)
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    draft = None
    if args.draft_model:
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(args.draft_model, dtype=_torch_dtype(args.dtype))
        draft = draft.to(model.device).eval()
    if any(s.name == "aded" and "datastore" not in s.kwargs for s in specs) and not args.no_datastore:
        ensure_default_datastore(model, tok)
    prompts = bprompts.load(args.prompts, tok, start=args.start, limit=args.limit)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    print(
        f"bench: {len(prompts)} prompts x {len(specs)} methods ({', '.join(s.label for s in specs)}), "
        f"max_new_tokens={args.max_new_tokens}, {args.dtype} on {model.device}",
        flush=True,
    )
    run = run_bench(
        model, prompts, specs, args.max_new_tokens, pad, draft=draft, warmup=not args.no_warmup,
        with_nll=not args.no_nll, progress=not args.no_progress,
    )
    result = {
        "environment": report.environment(model, args.dtype, command, _model_label(args.model)),
        "config": {
            "prompt_source": args.prompts, "prompts": len(prompts), "start": args.start,
            "max_new_tokens": args.max_new_tokens, "methods": [s.label for s in specs],
            "draft_model": args.draft_model,
        },
        "skipped": skipped,
        "warmup_seconds": run["warmup_seconds"],
        "methods": report.aggregate(run["records"], specs[0].label),
    }
    if args.project_shape:
        result["projection"] = bp.run_projection(
            model, result["methods"], args.project_shape, _torch_dtype(args.dtype), **_proj_kw(args)
        )
    files = report.write(result, run["records"], out)
    print(report.markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_train(args) -> int:
    import torch

    from .train import data as tdata
    from .train.loop import fit

    if args.method == "duo":  # passkey data made on the fly, gates only: its own loop
        from .train import duo

        return duo.cli(args)
    device = args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, tok = _load_model(args.model, "fp32", device)
    model.requires_grad_(False)
    seqs = tdata.self_distilled(model, tok, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                prompt_max=args.prompt_max, batch=args.gen_batch, progress=not args.no_progress)
    train, held = tdata.split(seqs, args.heldout)
    torch.manual_seed(args.seed)
    module, loss_fn, kind, key = _trainee(args, model, device, tok)
    if args.init:  # warm start from an artifact of the same kind (its training time adds to this run's)
        from . import artifacts

        if kind == "draft":
            from transformers import AutoModelForCausalLM

            tensors = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).state_dict()
        else:
            tensors, _ = artifacts.load(args.init, kind, model)
        if hasattr(module, "init_from"):
            module.init_from(tensors)
        else:
            module.load_state_dict({k: v.float() for k, v in tensors.items()})
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    result = fit(module, loss_fn, train, held, args.out, minutes=args.minutes, max_steps=args.steps,
                 batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
                 resume=args.resume, pad=pad, progress=not args.no_progress)
    result["data"] = {"sequences": len(seqs), "train": len(train), "heldout": len(held),
                      "tokens": int(sum(len(x) for x in seqs)), "max_new_tokens": args.max_new_tokens,
                      "source": "ShareGPT first user turns, answered by the target (greedy)"}
    if args.init:
        result["init"] = args.init
    result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    command = "hf-accel " + " ".join(args.argv)
    if kind == "draft":  # a whole model: transformers' own format, plus what trained it
        module.save_pretrained(args.out)
        tok.save_pretrained(args.out)
        (Path(args.out) / "hf_accel_train.json").write_text(json.dumps({"command": command, "metrics": result},
                                                                       indent=2, default=float))
    else:
        module.save_pretrained(args.out, metrics=result, command=command)
    print(json.dumps(result, indent=2, default=float))
    print(f"saved {args.method} artifact to {args.out}: use accel_kwargs={{{key!r}: {args.out!r}}}")
    return 0


def _trainee(args, model, device, tok=None):
    """(module, loss_fn, artifact kind, accel_kwargs key) for ``hf-accel train <method>``."""
    if args.method == "clover":
        from .adapters.clover import CloverHeads
        from .train.clover import make_loss

        module = CloverHeads(model, depth=args.depth).to(device)
        return module, make_loss(module, model, args.depth), "clover", "heads"
    if args.method == "hidden-transfer":
        from .adapters.hidden_transfer import TransferMaps
        from .train.hidden_transfer import make_loss

        module = TransferMaps(model, layer=args.layer, k=args.depth).to(device)
        return module, make_loss(module, model, anchors=args.anchors), "hidden_transfer", "heads"
    if args.method == "lora-drop":
        from .adapters.lora_drop import DropLoRAs
        from .train.lora_drop import make_loss

        module = DropLoRAs(model, droppable=args.droppable, period=args.period, rank=args.rank or 8,
                           reuse=args.reuse).to(device)
        return module, make_loss(module, model), "lora_drop", "adapter"
    if args.method == "draft":
        from .train.draft import make_loss, shallow_copy

        module = shallow_copy(model, args.layers)
        module.requires_grad_(True)
        return module, make_loss(module, model), "draft", "small_model"
    if args.method == "lud":
        from .adapters.lud import LUDLoRA, placeholder_from_tokenizer
        from .train.lud import make_loss

        ph = args.placeholder_id if args.placeholder_id is not None else placeholder_from_tokenizer(tok)
        if args.targets == "projections":  # a LoRA on every projection, trained through peft
            from .train.lud import PeftLUD

            module = PeftLUD(model, placeholder_id=ph, k=args.depth, rank=args.rank or 16).to(device)
        else:
            module = LUDLoRA(model, placeholder_id=ph, k=args.depth, rank=args.rank or 32).to(device)
        return module, make_loss(module, model, alpha=args.alpha, anchors=args.anchors), "lud", "adapter"
    from .adapters.m2r2 import RateResiduals
    from .train.m2r2 import make_loss

    module = RateResiduals(model, exit_layer=args.layer, rank=args.rank or 32).to(device)
    return module, make_loss(module, model), "m2r2", "adapter"


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

    be = sub.add_parser("bench", help="speed, memory and fidelity of methods vs vanilla, HF prompt lookup, ...")
    be.add_argument("suite", nargs="?", choices=("methods", "duo"), default="methods",
                    help="methods (default): speed and fidelity of --methods on --prompts; duo: DuoAttention vs full "
                    "attention on passkey retrieval, KV bytes, peak memory and decode tok/s over context lengths")
    be.add_argument("--model", default="default")
    be.add_argument("--methods", default="vanilla,hf-pld,aded",
                    help="comma list: vanilla, vanilla-static, hf-pld, hf-assisted, any hf_accel method, "
                    "name(key=value,...) for options, or 'all'")
    be.add_argument("--prompts", default="mtbench", help="'mtbench' or a .jsonl file of {\"prompt\": ...} lines")
    be.add_argument("--start", type=int, default=0)
    be.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    be.add_argument("--max-new-tokens", type=int, default=256)
    be.add_argument("--dtype", default="bf16", choices=DTYPES)
    be.add_argument("--device", default="cuda" if _cuda() else "cpu")
    be.add_argument("--draft-model", default=None, help="path of a draft model for hf-assisted")
    be.add_argument("--quantize", choices=QUANTIZE, default="none",
                    help="load the model with bitsandbytes (nf4: 4-bit NF4, int8: LLM.int8); every method runs on it")
    be.add_argument("--out", default="benchmarks/results/latest")
    be.add_argument("--project-shape", type=lambda t: [x for x in t.split(",") if x], default=None,
                    help="also project speedups to these shapes (llama3-8b, qwen2.5-7b, tiny)")
    be.add_argument("--project-from", default=None, help="results.json of an earlier bench: projection only")
    ints = lambda t: tuple(int(x) for x in t.split(",") if x)  # noqa: E731
    be.add_argument("--project-prefixes", type=ints, default=(512, 4096), help="cached prefix lengths to time")
    be.add_argument("--project-ks", type=ints, default=(1, 2, 4, 8, 16, 32, 64), help="new tokens per forward")
    be.add_argument("--project-reps", type=int, default=10, help="timed forwards per (prefix, k); median kept")
    be.add_argument("--no-warmup", action="store_true")
    be.add_argument("--no-nll", action="store_true")
    be.add_argument("--no-progress", action="store_true")
    be.add_argument("--no-datastore", action="store_true", help="don't build ADED's datastore if it is missing")
    bd = be.add_argument_group("bench duo")
    bd.add_argument("--pattern", default=None, help="duo: DuoGates folder from `hf-accel train duo` (default pattern if none)")
    bd.add_argument("--sparsity", type=float, default=0.5, help="duo: share of streaming KV heads")
    bd.add_argument("--sink", type=int, default=None, help="duo: sink tokens (default: the pattern's / the method's)")
    bd.add_argument("--recent", type=int, default=None, help="duo: recent tokens (default: the pattern's / the method's)")
    bd.add_argument("--lengths", default="2048,4096,8192", help="duo: comma list of context lengths (tokens)")
    bd.add_argument("--depths", default="0.05,0.25,0.5,0.75,0.95", help="duo: comma list of needle depths")
    bd.add_argument("--samples", type=int, default=2, help="duo: passkey samples per (depth, length)")
    bd.add_argument("--answer-tokens", type=int, default=16, help="duo: new tokens for a passkey answer")
    bd.add_argument("--reps", type=int, default=3, help="duo: timed repetitions per length (median kept); "
                    "decode timing uses --max-new-tokens")
    bd.add_argument("--static", action="store_true", help="duo: also time HF's compiled static path: vanilla-static "
                    "and duo_attention-static (cache_implementation='static'), one fixed cache length per context")
    bd.add_argument("--static-kernel", choices=("math", "sdpa"), default=None,
                    help="duo: decode attention of duo_attention-static (default: the method's, math)")
    be.set_defaults(fn=cmd_bench)

    tr = sub.add_parser("train", help="train a method's small part (self-distilled ShareGPT data)")
    tr.add_argument("method", choices=("clover", "hidden-transfer", "lora-drop", "m2r2", "lud", "draft", "duo"))
    tr.add_argument("--model", default="default")
    tr.add_argument("--out", required=True, help="artifact folder (safetensors + config.json + log.jsonl)")
    tr.add_argument("--minutes", type=float, default=10.0, help="training time budget (data generation apart)")
    tr.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    tr.add_argument("--device", default="cuda" if _cuda() else "cpu")
    tr.add_argument("--samples", type=int, default=512, help="self-distilled sequences")
    tr.add_argument("--max-new-tokens", type=int, default=256, help="answer length when self-distilling")
    tr.add_argument("--prompt-max", type=int, default=256)
    tr.add_argument("--gen-batch", type=int, default=64)
    tr.add_argument("--heldout", type=float, default=0.05)
    tr.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; duo: 1)")
    tr.add_argument("--seq-len", type=int, default=None, help="longest training sequence (default 512; duo: 2048)")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; duo: 0.02)")
    tr.add_argument("--depth", type=int, default=None,
                    help="heads (clover, default 4) / pseudo positions (hidden transfer, 3) / k predictions per forward (lud, 4)")
    tr.add_argument("--layer", type=int, default=None,
                    help="hidden transfer: layer whose output is transferred; m2r2: exit layer (layers run)")
    tr.add_argument("--anchors", type=int, default=32, help="hidden transfer: pseudo chains per sequence")
    tr.add_argument("--layers", type=int, default=4, help="draft: decoder layers of the draft model")
    tr.add_argument("--period", type=int, default=4, help="lora-drop: a refresh step every N steps")
    tr.add_argument("--droppable", type=lambda t: [int(x) for x in t.split(",") if x], default=None,
                    help="lora-drop: comma list of droppable layers (default: all but every 4th from layer 0)")
    tr.add_argument("--reuse", choices=("delta", "output"), default="delta", help="lora-drop: what drop steps reuse")
    tr.add_argument("--rank", type=int, default=None,
                    help="lora-drop LoRA rank (8) / m2r2 adapter rank (32) / lud adapter rank (32)")
    tr.add_argument("--alpha", type=float, default=0.6, help="lud: probability that marks lexical-unit tokens")
    tr.add_argument("--targets", choices=("layers", "projections"), default="layers",
                    help="lud: one adapter per decoder layer, or a LoRA on every projection (trained through peft)")
    tr.add_argument("--placeholder-id", type=int, default=None,
                    help="lud: token id used as placeholder (default: an unused special token of the tokenizer)")
    tr.add_argument("--sink", type=int, default=64, help="duo: sink tokens a streaming head keeps")
    tr.add_argument("--recent", type=int, default=256, help="duo: recent tokens a streaming head keeps")
    tr.add_argument("--l1", type=float, default=0.05, help="duo: weight of the L1 penalty on the gates")
    tr.add_argument("--sparsity", type=float, default=0.5,
                    help="duo: share of streaming heads the saved pattern deploys with by default")
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    tr.add_argument("--init", default=None, help="start from the weights of this artifact (fresh optimizer)")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(fn=cmd_train)

    m = sub.add_parser("methods", help="list the registered methods")
    m.set_defaults(fn=cmd_methods)

    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    if getattr(args, "fn", None) is cmd_train and args.depth is None:
        args.depth = 4 if args.method in ("clover", "lud") else 3
    if getattr(args, "fn", None) is cmd_train:
        duo = args.method == "duo"
        args.batch = args.batch if args.batch is not None else (1 if duo else 8)
        args.seq_len = args.seq_len if args.seq_len is not None else (2048 if duo else 512)
        args.lr = args.lr if args.lr is not None else (0.02 if duo else 1e-3)
    return args.fn(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
