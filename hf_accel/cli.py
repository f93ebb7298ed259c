"""``hf-accel`` command line: demo, bench, train, datastore build, methods.

The parser imports nothing heavy: torch, transformers and the suites are imported inside the handlers. Loading
(model, tokenizer, dtype, quantization, the default model and its trained parts) lives in ``hf_accel.loading``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from . import loading
from .loading import DTYPES, QUANTIZE

# old names, kept for code that imported them from here (load through hf_accel.loading instead)
_torch_dtype = loading.torch_dtype
_quantization = loading.quantization
_load_model = loading.load_model
_model_label = loading.model_label
default_datastore_path = loading.default_datastore_path
ensure_default_datastore = loading.ensure_default_datastore


def cmd_datastore_build(args) -> int:
    from .data.trigram import build_from_sharegpt

    model, tok = loading.load_model(args.model, "fp32", "cpu")
    default = loading.default_datastore_path(model, tok)
    out = Path(args.out) if args.out else default
    t = time.time()
    store = build_from_sharegpt(tok, limit=args.limit, top_k=args.top_k)
    store.save(out)
    if out.resolve().parent == default.resolve().parent:  # in the cache: datastore="auto" finds it for this model
        loading.register_datastore(model, out)
    print(
        f"datastore: {len(store):,} token pairs from {store.meta['tokens']:,} tokens "
        f"({store.meta['turns']:,} assistant turns) -> {out} in {time.time() - t:.0f}s"
    )
    return 0


# what `hf-accel methods` says of each built-in method: (output, what it needs)
METHOD_NOTES = {
    "aded": ("lossless", "nothing trained: the ShareGPT trigram datastore of the tokenizer (built on first use by "
             "the CLI) or the prompt alone"),
    "clover": ("lossless", "trained heads: part=DIR or heads=DIR (`hf-accel train clover`; committed for the "
               "default model)"),
    "duo_attention": ("lossy (KV heads compressed)", "trained gates: part=DIR or pattern=DIR "
                      "(`hf-accel train duo_attention`; committed for the default model), else a fixed rule"),
    "ead": ("lossy", "a small model with the same tokenizer: small_model=MODEL_OR_PATH (`hf-accel train draft`)"),
    "hidden_transfer": ("lossless", "trained maps: part=DIR or heads=DIR (`hf-accel train hidden_transfer`; "
                        "committed for the default model)"),
    "lora_drop": ("lossy", "trained LoRAs: part=DIR or adapter=DIR (`hf-accel train lora_drop`; committed for the "
                  "default model)"),
    "lud": ("lossy; lossless=True exact", "trained placeholder adapters: part=DIR or adapter=DIR "
            "(`hf-accel train lud`; committed for the default model)"),
    "m2r2": ("lossless (mode=self_spec); lossy (mode=early_exit)", "trained adapters: part=DIR or adapter=DIR "
             "(`hf-accel train m2r2`; committed for the default model)"),
    "quant_spec": ("lossless (vs the quantized target)", "a bitsandbytes-quantized target; a draft model "
                   "(draft_model=) and/or the target's full-precision copy"),
}


def _lossless(name: str, kwargs: dict) -> bool:
    """Whether ``accel=name`` with these options reproduces greedy decoding exactly."""
    from . import registry

    cls = registry.get(name)
    fields = cls.Config.__dataclass_fields__

    def opt(key):  # the entry's value, else the config's default (no validation: parts may be missing here)
        return kwargs[key] if key in kwargs else fields[key].default

    if "lossless" in fields:
        return bool(opt("lossless"))
    if name == "m2r2":
        return opt("mode") == "self_spec"
    return bool(getattr(cls, "lossless", False))


def _method_defaults(model_name: str, names) -> dict:
    """accel_kwargs defaults per method: the committed trained parts when the model is the default one."""
    if model_name != "default":
        return {}
    return {n: loading.default_accel_kwargs(n) for n in names if loading.default_accel_kwargs(n)}


def _skip_reason(model_name: str, name: str, why: str) -> str:
    from .default_model import ARTIFACT_KEYS, missing_artifacts_message

    if model_name == "default" and name in ARTIFACT_KEYS and loading.default_artifact(name) is None:
        return f"{why}; {missing_artifacts_message(name)}"
    return why


def cmd_demo(args) -> int:
    import torch

    import hf_accel

    from . import registry
    from .bench import methods as bm
    from .data import mtbench
    from .bench.runner import before_timed_call

    device = loading.resolve_device(args.device)
    model, tok = loading.load_model(args.model, args.dtype, device)
    defaults = _method_defaults(args.model, registry.available())
    runs = []
    try:
        for t in bm.split_top(args.methods):
            try:
                s = bm.parse_one(t, defaults, model)
            except bm.MissingPart as e:
                print(f"skipped {e.label}: {_skip_reason(args.model, e.label.split('(')[0].removesuffix('+static'), e.reason)}")
                continue
            if s.name not in registry.available():
                raise ValueError(f"{s.label} is not an hf_accel method (the demo compares methods with vanilla "
                                 f"greedy; baselines are for hf-accel bench). Methods: "
                                 f"{', '.join(registry.available())}")
            runs.append(s)
    except ValueError as e:
        raise SystemExit(f"hf-accel demo --methods: {e}") from None
    if not runs:
        print("nothing to run")
        return 1
    if any(s.name == "aded" and "datastore" not in s.kwargs for s in runs) and not args.no_datastore:
        store = loading.ensure_default_datastore(model, tok)
        for s in runs:
            if s.name == "aded" and "datastore" not in s.kwargs:
                s.kwargs["datastore"] = str(store)
    elif args.no_datastore:
        for s in runs:
            if s.name == "aded":
                s.kwargs.setdefault("datastore", None)
    prompts = mtbench.prompts(tok, start=args.start, limit=args.prompts)
    print(f"model={loading.model_label(args.model)} dtype={args.dtype} device={device} "
          f"max_new_tokens={args.max_new_tokens} methods={', '.join(s.label for s in runs)}", flush=True)
    width = max(len(s.label) for s in runs)

    def gen(x, spec=None, n=args.max_new_tokens):
        kw = bm.generate_kwargs(spec, None) if spec is not None else {}
        before_timed_call()  # as hf-accel bench times a call
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, do_sample=False, **kw)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    if prompts and not args.no_warmup:  # first calls pay one-off costs (allocations, kernels, compile): not timed
        t = time.perf_counter()
        x = torch.tensor([prompts[0]], device=device)
        gen(x, n=min(16, args.max_new_tokens))
        for s in runs:
            gen(x, s, n=min(16, args.max_new_tokens))
        print(f"warm-up {time.perf_counter() - t:.1f}s (not timed)", flush=True)
    rows = []
    for qi, ids in enumerate(prompts):
        x = torch.tensor([ids], device=device)
        ref, tv = gen(x)
        nv = ref.shape[1] - x.shape[1]
        for s in runs:
            out, ta = gen(x, s)
            st = hf_accel.stats(out)
            same = out.shape == ref.shape and torch.equal(out, ref)
            rows.append((qi, s.label, nv / tv, st.new_tokens / ta, st.tokens_per_forward, same))
            print(
                f"q{args.start + qi:02d} {s.label:{width}s} vanilla {nv / tv:6.1f} tok/s | {s.label} "
                f"{st.new_tokens / ta:6.1f} tok/s ({(st.new_tokens / ta) / (nv / tv):.2f}x) "
                f"| {st.tokens_per_forward:.2f} tokens/forward | identical: {'yes' if same else 'NO'}",
                flush=True,
            )
        if qi == 0:
            print("  sample output:", repr(tok.decode(ref[0, x.shape[1] :], skip_special_tokens=True)[:160]))
    for s in runs:
        r = [x for x in rows if x[1] == s.label]
        if not r:
            continue
        v = sum(x[2] for x in r) / len(r)
        a = sum(x[3] for x in r) / len(r)
        tpf = sum(x[4] for x in r) / len(r)
        lossless = _lossless(s.name, s.kwargs)
        print(
            f"== {s.label}: vanilla {v:.1f} tok/s, {s.label} {a:.1f} tok/s ({a / v:.2f}x), {tpf:.2f} tokens/forward, "
            f"identical {sum(x[5] for x in r)}/{len(r)}" + ("" if lossless else " (a lossy method: differences "
                                                           "from vanilla are expected)")
        )
    exact = {s.label for s in runs if _lossless(s.name, s.kwargs)}
    return 0 if all(x[5] for x in rows if x[1] in exact) else 1


def _proj_kw(args) -> dict:
    return dict(ks=args.project_ks, prefixes=args.project_prefixes, reps=args.project_reps,
                progress=not args.no_progress)


def bench_default_dtype(device: str) -> str:
    """``hf-accel bench``'s dtype when --dtype is not given: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def cmd_bench(args) -> int:
    import json as _json

    from .bench import methods as bm
    from .bench import project as bp
    from .bench import report
    from .bench.runner import run_bench
    from .data import prompts as bprompts

    if args.dtype is None:  # fp32 on a CPU (bf16 there is slow and flips near-tie tokens), bf16 on a GPU
        args.dtype = bench_default_dtype(args.device)
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
        model, _ = loading.load_model(args.model, args.dtype, args.device)
        result = prev
        result["projection"] = bp.run_projection(
            model, prev["methods"], args.project_shape, loading.torch_dtype(args.dtype), **_proj_kw(args)
        )
        result["projection"]["command"] = command
        out.mkdir(parents=True, exist_ok=True)
        (out / "projection.json").write_text(_json.dumps(result["projection"], indent=1, default=float))
        (out / "projection.md").write_text(bp.markdown(result["projection"]) + "\n")
        bp.plot(result["projection"], out)
        print(bp.markdown(result["projection"]))
        return 0

    model, tok = loading.load_model(args.model, args.dtype, args.device, args.quantize)
    if args.batch > 1 and args.project_shape:
        raise SystemExit("--project-shape projects batch-1 decoding: run it with --batch 1")
    from . import registry

    specs, skipped = bm.parse(args.methods, model.device.type, args.draft_model, model, batch=args.batch,
                              defaults=_method_defaults(args.model, registry.available()))
    skipped = [(label, _skip_reason(args.model, label.split("(")[0].removesuffix("+static"), why))
               for label, why in skipped]
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    draft = None
    if args.draft_model:
        from transformers import AutoModelForCausalLM

        draft = AutoModelForCausalLM.from_pretrained(args.draft_model, dtype=loading.torch_dtype(args.dtype))
        draft = draft.to(model.device).eval()
    if any(s.name == "aded" and "datastore" not in s.kwargs for s in specs) and not args.no_datastore:
        loading.ensure_default_datastore(model, tok, progress=not args.no_progress)
    if args.questions:
        chosen = _bench_questions(args.questions)
        every = bprompts.load(args.prompts, tok)
        if max(chosen) >= len(every):
            raise SystemExit(f"--questions {args.questions}: {args.prompts!r} has {len(every)} prompts (0-{len(every) - 1})")
        prompts = [every[i] for i in chosen]
    else:
        prompts = bprompts.load(args.prompts, tok, start=args.start, limit=args.limit)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    settings = bm.Settings(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed)
    print(
        f"bench: {len(prompts)} prompts in rows of {args.batch} x {len(specs)} methods "
        f"({', '.join(s.label for s in specs)}), max_new_tokens={args.max_new_tokens}, {settings.describe()}, "
        f"{args.dtype} on {model.device}",
        flush=True,
    )
    env = report.environment(model, args.dtype, command, loading.model_label(args.model))

    def bench_result(run: dict) -> dict:
        """The report of ``run``: the final one, or one of the rows done so far (with a ``progress`` entry)."""
        labels = [s.label for s in run["specs"]]
        reference = bm.headline_reference(labels)
        done = run["rows_done"]
        result = {
            "environment": env,
            "config": {
                "prompt_source": args.prompts, "prompts": len(prompts), "start": args.start,
                "questions": args.questions, "max_new_tokens": args.max_new_tokens, "methods": labels,
                "draft_model": args.draft_model, "batch": args.batch, "rows": len(run["rows"]),
                "do_sample": args.do_sample, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed, "decoding": settings.describe(), "reference": reference,
                "max_cache_len": run["max_cache_len"], "warmup_shapes": run["warmup_shapes"],
                "dynamo_recompile_limit": run["dynamo_recompile_limit"],
            },
            "skipped": list(skipped) + run["skipped"],
            "warmup_seconds": run["warmup_seconds"],
            "methods": report.aggregate(run["records"], reference, sampled=args.do_sample) if done else {},
        }
        if done < len(run["rows"]):
            result["progress"] = {"rows_done": done, "rows": len(run["rows"]), "partial": True}
        return result

    def write_partial(run: dict) -> None:  # after the warm-ups and every finished row; plots only at the end
        report.write(bench_result(run), run["records"], out, with_plots=False)

    run = run_bench(
        model, prompts, specs, args.max_new_tokens, pad, draft=draft, warmup=not args.no_warmup,
        with_nll=not args.no_nll, progress=not args.no_progress, batch=args.batch, settings=settings,
        on_rows=write_partial, warmup_only=args.warmup_only,
    )
    if args.warmup_only:  # compile caches filled; no timed row, so no speed report
        print("warm-up only: " + ", ".join(f"{k} {v:.1f} s" for k, v in run["warmup_seconds"].items()))
        return 0
    result = bench_result(run)
    if args.project_shape:
        result["projection"] = bp.run_projection(
            model, result["methods"], args.project_shape, loading.torch_dtype(args.dtype), **_proj_kw(args)
        )
    files = report.write(result, run["records"], out)
    print(report.markdown(result))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def _bench_questions(text: str) -> list:
    """``--questions 60-64`` / ``60,62,70-72``: prompt indices (0-based, inclusive ranges)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        a, dash, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if dash else int(a)
        except ValueError:
            raise SystemExit(f"--questions {text!r}: write indices and ranges, e.g. 60-64 or 60,62,70-72") from None
        if lo < 0 or hi < lo:
            raise SystemExit(f"--questions {text!r}: {part!r} is not an increasing range of indices >= 0")
        out += range(lo, hi + 1)
    if not out:
        raise SystemExit(f"--questions {text!r}: no index given")
    return out


def cmd_train(args) -> int:
    """Dispatch through the training registry (train/registry.py): the method's train module builds its trainee
    (``build``) for the shared fit loop on self-distilled data, or runs its own loop (``run``)."""
    import torch

    from .train import data as tdata
    from .train import registry as trainers
    from .train.loop import fit

    trainer = trainers.module(args.method)
    args.device = device = loading.resolve_device(args.device)
    if hasattr(trainer, "run"):  # its own data and loop (DuoAttention: passkey data made on the fly)
        return trainer.run(args)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, tok = loading.load_model(args.model, "fp32", device)
    model.requires_grad_(False)
    seqs = tdata.self_distilled(model, tok, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                prompt_max=args.prompt_max, batch=args.gen_batch, progress=not args.no_progress)
    train, held = tdata.split(seqs, args.heldout)
    torch.manual_seed(args.seed)
    module, loss_fn, kind, key = trainer.build(args, model, device, tok)
    if args.init:  # warm start from an artifact of the same kind (its training time adds to this run's)
        from .integrations import artifacts

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
                 resume=args.resume, pad=pad, progress=not args.no_progress, eval_start=bool(args.init))
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


def cmd_methods(args) -> int:
    """One line per registered method: its name, whether its output equals greedy decoding, what it needs."""
    import hf_accel
    from . import registry

    names = hf_accel.available()
    width = max(len(n) for n in names)
    for name in names:
        out, needs = METHOD_NOTES.get(name, (None, None))
        if out is None:  # a method registered by other code: what its class says
            cls = registry.get(name)
            out = "lossless" if getattr(cls, "lossless", False) else "lossy"
            needs = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "see its documentation"
        print(f"{name:{width}s}  {out}; needs {needs}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="hf-accel",
                                description="faster HF generate(): demo, bench, train, datastores, methods")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="vanilla vs accelerated generate side by side on MT-Bench prompts",
                       description="Greedy generate with and without each method on MT-Bench questions: per prompt "
                       "vanilla vs method tok/s, tokens per forward and whether the output is identical (after "
                       "an untimed warm-up). Exit status 1 if a lossless method's output differs.")
    d.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct, offline, with its committed trained parts) or a path / "
                   "Hub id of a causal LM")
    d.add_argument("--methods", default="aded",
                   help="comma list of hf_accel methods (hf-accel methods), with options as name(key=value,...) and "
                   "+static for the static engine, e.g. 'aded(max_nodes=16),clover'")
    d.add_argument("--prompts", type=int, default=3, help="number of MT-Bench questions")
    d.add_argument("--start", type=int, default=0, help="first MT-Bench question")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    d.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="model dtype (fp32 default: lossless methods are then token-identical to vanilla; in "
                   "bf16/fp16 near-ties can flip)")
    d.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when a GPU is visible)")
    d.add_argument("--no-datastore", action="store_true",
                   help="ADED from the prompt only (don't build or use the ShareGPT datastore)")
    d.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call of each method")
    d.set_defaults(fn=cmd_demo)

    ds = sub.add_parser("datastore", help="ADED trigram datastores")
    dsub = ds.add_subparsers(dest="dcmd", required=True)
    b = dsub.add_parser("build", help="build a trigram datastore from ShareGPT with the model's tokenizer")
    b.add_argument("--model", default="default", help="'default' or a path / Hub id: whose tokenizer to use")
    b.add_argument("--out", default=None,
                   help="store file (default: $HF_ACCEL_CACHE/datastores/sharegpt-trigram-<tokenizer hash>"
                   ".safetensors, where datastore='auto' finds it)")
    b.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    b.add_argument("--top-k", type=int, default=12, help="successors kept per token pair")
    b.set_defaults(fn=cmd_datastore_build)

    be = sub.add_parser("bench", help="speed, memory and fidelity of methods vs vanilla, HF prompt lookup, ...")
    be.add_argument("suite", nargs="?", choices=("methods", "duo"), default="methods",
                    help="methods (default): speed and fidelity of --methods on --prompts; duo: DuoAttention vs full "
                    "attention on passkey retrieval, KV bytes, peak memory and decode tok/s over context lengths")
    be.add_argument("--model", default="default")
    be.add_argument("--methods", default="vanilla,hf-pld,aded",
                    help="comma list: vanilla, vanilla-static, vanilla-static-naive, hf-pld, hf-assisted, "
                    "hf-pld+static / hf-assisted+static (transformers 5.24+), any hf_accel method, name(key=value,...) "
                    "for options, name+static for the static engine; 'all' (every baseline and method) and "
                    "'all+static' (every method the static engine runs) mix with entries")
    be.add_argument("--prompts", default="mtbench", help="'mtbench' or a .jsonl file of {\"prompt\": ...} lines")
    be.add_argument("--start", type=int, default=0, help="skip the first N prompts")
    be.add_argument("--limit", type=int, default=None, help="only the first N prompts (after --start)")
    be.add_argument("--questions", default=None,
                    help="prompt indices, 0-based, ranges inclusive: 60-64 or 60,62,70-72 (instead of --start/--limit)")
    be.add_argument("--max-new-tokens", type=int, default=256)
    be.add_argument("--batch", type=int, default=1,
                    help="prompts per generate call (rows, left padded; the same rows for every method)")
    be.add_argument("--do-sample", action="store_true",
                    help="sample instead of greedy, with the processors below, for every method and baseline")
    be.add_argument("--temperature", type=float, default=1.0, help="with --do-sample")
    be.add_argument("--top-p", type=float, default=1.0, help="with --do-sample (1.0: off)")
    be.add_argument("--top-k", type=int, default=0, help="with --do-sample (0: off)")
    be.add_argument("--seed", type=int, default=0, help="with --do-sample: row i is drawn with seed + i, every method")
    be.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
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
    be.add_argument("--warmup-only", action="store_true",
                    help="run each method's untimed warm-up and stop (fills torch's on-disk compile cache for a later run)")
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
                    "and duo_attention-static (cache_implementation='static': on a GPU hf_accel's static engine, one "
                    "token per CUDA-graph step), one fixed cache length per context")
    bd.add_argument("--static-kernel", choices=("math", "sdpa"), default=None,
                    help="duo: decode attention of duo_attention-static (default: the method's, math)")
    bd.add_argument("--compose", default="aded",
                    help="duo --static: speculative methods (comma list; 'none' for none) also timed composed with "
                         "duo_attention on hf_accel's static engine, as rows duo_attention+M-static (default: aded)")
    bd.add_argument("--duo-methods", default=None,
                    help="duo: the memory/speed rows to measure, comma list (default all: vanilla, duo_attention, and "
                         "with --static vanilla-static, duo_attention-static, duo_attention+M-static for --compose; "
                         "by name only: duo_attention-hf-static, HF's compiled generate on duo's static cache); "
                         "NAME@LENGTH measures a row at that length only, e.g. duo_attention+aded-static@8192")
    bd.add_argument("--no-passkey", action="store_true", help="duo: skip the passkey retrieval grid")
    be.set_defaults(fn=cmd_bench)

    from .train import registry as trainers

    tr = sub.add_parser("train", help="train a method's small part (self-distilled ShareGPT data)",
                        description="Train a method's part against the frozen model. Method options: "
                        "hf-accel train METHOD --help.")
    tr.add_argument("method", choices=trainers.names(), metavar="METHOD",
                    help=f"{', '.join(trainers.TRAINERS)} (also {', '.join(trainers.ALIASES)})")
    tr.add_argument("--model", default="default", help="'default' or a path / Hub id of the (frozen) target")
    tr.add_argument("--out", required=True, help="artifact folder (safetensors + config.json + log.jsonl)")
    tr.add_argument("--minutes", type=float, default=10.0, help="training time budget (data generation apart)")
    tr.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    tr.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when a GPU is visible)")
    tr.add_argument("--samples", type=int, default=512, help="self-distilled sequences")
    tr.add_argument("--max-new-tokens", type=int, default=256, help="answer length when self-distilling")
    tr.add_argument("--prompt-max", type=int, default=256)
    tr.add_argument("--gen-batch", type=int, default=64)
    tr.add_argument("--heldout", type=float, default=0.05)
    tr.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; duo_attention: 1)")
    tr.add_argument("--seq-len", type=int, default=None,
                    help="longest training sequence (default 512; duo_attention: 2048)")
    tr.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; duo_attention: 0.02)")
    tr.add_argument("--eval-every", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    tr.add_argument("--init", default=None, help="start from the weights of this artifact (fresh optimizer)")
    tr.add_argument("--no-progress", action="store_true")
    if len(argv) > 1 and argv[0] == "train" and argv[1] in trainers.names():
        # the method's own options (its train module declares them): imported only when training it
        trainers.module(argv[1]).add_arguments(tr.add_argument_group(f"{trainers.canonical(argv[1])} options"))
    tr.set_defaults(fn=cmd_train)

    m = sub.add_parser("methods", help="list the registered methods: lossless or not, what each needs")
    m.set_defaults(fn=cmd_methods)

    args = p.parse_args(argv)
    args.argv = argv
    if getattr(args, "fn", None) is cmd_train:
        args.method = trainers.canonical(args.method)
        for key, value in trainers.defaults(args.method).items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args.fn(args)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
