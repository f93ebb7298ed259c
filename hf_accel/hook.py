"""The generate() hook: ``model.generate(..., accel="aded", accel_kwargs={...})`` for every HF causal LM.

``install()`` wraps ``GenerationMixin.generate`` once. Without a method selected (no ``accel=``, no
``hf_accel`` entry in the generation config), the wrapper calls the original generate with exactly the
arguments it got. With one, it validates the request (one ValueError naming the problem and the fix,
before anything is built), builds the method's adapter for this request, and calls the original generate
with ``custom_generate=`` the shared engine, so HF still prepares inputs, processors and criteria.
Nothing is patched on the model, so an error leaves it exactly as it was.

A *KV method* (engine.adapter.KVMethod: ``accel="duo_attention"``) alone runs transformers' original generate
itself, with ``past_key_values=`` the method's cache and inside the method's ``attention()`` context (which
switches the model's attention implementation for the call only and puts it back on exit, error or not); every
check runs before that. With ``cache_implementation="static"`` it runs on the static engine instead (with
:class:`~hf_accel.engine.adapter.NoDraft`: one token per step, each step a captured CUDA graph) where its ``runner``
option says so (:func:`_kv_on_engine`). Composed with a speculative method (``accel=["duo_attention", "aded"]``) the
engine runs as usual on the KV method's cache and attention. ``stats(output)`` works for both.

Pipelines need no code of their own: ``pipeline("text-generation", ..., accel="aded")`` (or ``accel=`` per call) passes
the keyword to ``model.generate`` as a generate kwarg, which this wrapper takes (tests/test_api.py checks it). The other
integrations live in ``hf_accel/integrations/`` (quantization, second models, artifacts).
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
import weakref

import torch
from transformers import GenerationMixin, StaticCache
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from . import config as accel_config
from . import models, registry
from .engine import loop
from .engine.adapter import AccelStats, NoDraft
from .engine.backends import clock

_ORIGINAL = None
_CACHES = (None, "dynamic", "static")  # what a speculative method runs on (dynamic, or its own static cache)
# results of finished runs (not decoding state): output tensor -> stats, model -> stats of its last run
_STATS_BY_OUTPUT: dict = {}  # id(tensor) -> (weakref to tensor, stats); tensors can't be weak dict keys
_STATS_BY_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def installed() -> bool:
    return _ORIGINAL is not None


def install() -> None:
    """Add accel= to GenerationMixin.generate (idempotent). Done by ``import hf_accel``."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return
    original = GenerationMixin.generate

    @functools.wraps(original)
    def generate(self, *args, accel=None, accel_kwargs=None, **kwargs):
        return _generate(self, original, args, kwargs, accel, accel_kwargs)

    generate.__hf_accel_wrapper__ = True
    _ORIGINAL = original
    GenerationMixin.generate = generate


def uninstall() -> None:
    """Restore the original GenerationMixin.generate."""
    global _ORIGINAL
    if _ORIGINAL is None:
        return
    GenerationMixin.generate = _ORIGINAL
    _ORIGINAL = None


def _generate(model, original, args, kwargs, accel, accel_kwargs):
    bound = inspect.signature(original).bind(model, *args, **kwargs)
    call = dict(bound.arguments)
    extra = call.pop("kwargs", {})
    specs = accel_config.resolve(model, accel, accel_kwargs, call.get("generation_config"))
    if specs is None:
        return original(model, *args, **kwargs)
    kv, spec = accel_config.split_methods(specs)
    models.check_causal_lm(model)
    gen_config = _effective_config(model, call.get("generation_config"), extra)
    if spec is not None:
        _warn_right_padding(spec[0] if kv is None else f"{kv[0]}+{spec[0]}", extra.get("attention_mask"))
    if spec is None:
        return _generate_kv(model, original, call, extra, gen_config, *kv)
    method, cls, method_kwargs = spec
    label = method if kv is None else f"{kv[0]}+{method}"
    kv_method = None
    if kv is not None:
        kv_name, kv_cls, kv_kwargs = kv
        if gen_config.cache_implementation == "static" and (
                getattr(kv_cls, "static_engine_unsupported", None) or kv_cls.static_refusal(kv_kwargs)):
            raise ValueError(
                f"accel={[kv_name, method]!r}: {kv_name} does not run on the static engine "
                f"(cache_implementation='static'): "
                f"{getattr(kv_cls, 'static_engine_unsupported', None) or kv_cls.static_refusal(kv_kwargs)} "
                "Leave cache_implementation unset."
            )
    _validate(label, cls, call, extra, gen_config, method_kwargs)
    kv_cfg = kv_cls.Config.from_kwargs(kv_name, kv_kwargs) if kv is not None else None
    cfg = cls.Config.from_kwargs(method, method_kwargs)  # every option of both methods checked before building
    if kv is not None:
        kv_method = kv_cls(model, kv_cfg)
    return _run_engine(model, original, call, extra, gen_config, cls(model, cfg), kv_method)


def _run_engine(model, original, call, extra, gen_config, adapter, kv_method):
    """HF's generate with ``custom_generate=`` the shared engine on ``adapter`` (and ``kv_method``'s cache), after
    every check: stop strings become a stopping criterion (the engine checks criteria on the host)."""
    streamer = call.get("streamer")
    stop_strings = gen_config.stop_strings
    tokenizer = extra.pop("tokenizer", None)
    if stop_strings:
        if tokenizer is None:
            raise ValueError(
                "stop_strings needs the model's tokenizer: pass generate(..., tokenizer=tokenizer) "
                "(as vanilla generate requires)."
            )
        criteria = StoppingCriteriaList(list(call.get("stopping_criteria") or []))
        criteria.append(StopStringCriteria(stop_strings=stop_strings, tokenizer=tokenizer))
        call["stopping_criteria"] = criteria
        extra.pop("stop_strings", None)
        passed = call.get("generation_config")
        call["generation_config"] = copy.deepcopy(passed if passed is not None else model.generation_config)
        call["generation_config"].stop_strings = None

    call["custom_generate"] = functools.partial(
        loop.run, accel_adapter=adapter, accel_kv=kv_method, accel_streamer=streamer,
        accel_stats_sink=functools.partial(_record, model),
    )
    self_ = call.pop("self", model)
    return original(self_, **call, **extra)


RIGHT_PADDING = (
    "accel={method!r}: the attention_mask has padding after tokens (right padding). Generation appends new tokens "
    "after the last column, so a right-padded row continues after its pad tokens: its output is not the answer to "
    "its prompt, and hf_accel's output for such rows differs from vanilla generate's (neither is the left-padded "
    "answer). Pad on the left for decoder-only generation: tokenizer.padding_side = 'left'."
)


def _warn_right_padding(method, mask) -> None:
    """Warn when a row of ``mask`` has a 0 after a 1 (shown once per call site under Python's default filter)."""
    if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] < 2:
        return
    m = mask != 0
    right = (m[:, :-1] & ~m[:, 1:]).any(1)
    if bool(right.any()):
        warnings.warn(RIGHT_PADDING.format(method=method), UserWarning, stacklevel=4)


def _record(model, sequences, stats) -> None:
    """Keep a finished run's stats for ``stats(output)`` / ``stats(model)``."""
    key = id(sequences)
    _STATS_BY_OUTPUT[key] = (weakref.ref(sequences), stats)
    weakref.finalize(sequences, _STATS_BY_OUTPUT.pop, key, None)
    _STATS_BY_MODEL[model] = stats


def _generate_kv(model, original, call, extra, gc, method, cls, method_kwargs):
    """A KV method alone: transformers' own generate on the method's cache, under its attention (see KVMethod)."""
    _validate_kv(method, call, extra, gc)
    kv = cls(model, cls.Config.from_kwargs(method, method_kwargs))  # every check before anything changes
    inputs = call.get("inputs", extra.get("input_ids"))
    if gc.cache_implementation == "static" and _kv_on_engine(model, method, call, extra, gc, kv):
        _warn_right_padding(method, extra.get("attention_mask"))
        return _run_engine(model, original, call, extra, gc, NoDraft(model, None), kv)
    if gc.cache_implementation == "static":
        # fixed buffers for the whole call, as HF sizes its StaticCache; HF's generate compiles the decode step on a
        # compileable user cache exactly as on its own (GenerationMixin._valid_auto_compile_criteria)
        cache = kv.new_static_cache(_static_cache_len(method, inputs, gc))
    else:
        cache = kv.new_cache(max_forward=1)
    extra[models.cache_kwarg(model)] = cache  # "cache" from transformers 5.24, where the old name warns
    if gc.cache_implementation is not None:  # HF refuses a cache_implementation next to a cache object
        extra["cache_implementation"] = None
    self_ = call.pop("self", model)
    t0 = clock(model.device)
    with kv.attention():
        out = original(self_, **call, **extra)
    seqs = getattr(out, "sequences", out)
    plen = inputs.shape[-1] if torch.is_tensor(inputs) and inputs.dim() == 2 and not torch.is_floating_point(inputs) \
        else 0
    new = seqs[:, plen:]
    steps = new.shape[1]
    eos = gc.eos_token_id
    per_row = torch.full((seqs.shape[0],), steps, dtype=torch.long)
    if eos is not None and steps:
        ids = torch.as_tensor(eos, device=new.device).reshape(-1)
        hit = torch.isin(new, ids).long()
        after_first = (hit.cumsum(1) - hit) > 0  # positions after the row's first eos (HF pads them)
        per_row = steps - after_first.sum(1).cpu()
    stats = AccelStats(
        method=method, batch_size=seqs.shape[0], target_forwards=steps, steps=max(0, steps - 1),
        new_tokens=int(per_row.sum()), row_forwards=seqs.shape[0] * steps,
        total_seconds=clock(model.device) - t0,
    )
    stats.kv_cache_bytes = cache.nbytes() if hasattr(cache, "nbytes") else 0
    stats.extra["cache"] = type(cache).__name__
    stats.extra["runner"] = "hf"
    kv.finished(cache, stats)
    _record(model, seqs, stats)
    if seqs is not out:
        out.accel_stats = stats
    return out


def _kv_on_engine(model, method, call, extra, gc, kv) -> bool:
    """Whether a KV method alone with ``cache_implementation="static"`` runs on hf_accel's static engine (its
    ``runner`` option): "hf" never; "engine" always (what the engine refuses raises here); "auto" where the engine
    captures its steps as CUDA graphs (a GPU, compile not disabled, one device: where HF compiles too) and the call asks
    nothing the engine refuses (else HF's compiled generate, which honours every option of a plain generate call)."""
    runner = getattr(kv.config, "runner", "hf")
    if runner == "hf" or not hasattr(kv, "engine_cache"):
        return False
    if runner == "engine":
        _validate(method, NoDraft, call, extra, gc)
        return True
    from .engine.capture import graphs_supported

    if gc.disable_compile or models.is_dispatched(model) or not graphs_supported(model.device):
        return False
    try:
        _validate(method, NoDraft, call, extra, gc)
    except ValueError:
        return False
    return True


def _static_cache_len(method, inputs, gc) -> int:
    """The slots a static KV-method cache needs for this call (prompt + new tokens, as HF sizes its StaticCache)."""
    plen = inputs.shape[-1] if torch.is_tensor(inputs) and inputs.dim() == 2 else None
    if plen is not None and gc.max_new_tokens is not None:
        return plen + gc.max_new_tokens
    if gc.max_length is not None and (plen is None or gc.max_length > plen):
        return gc.max_length
    raise ValueError(
        f"accel={method!r} with cache_implementation='static' sizes its cache from the prompt and max_new_tokens: "
        "pass input_ids and max_new_tokens=."
    )


def _user_cache(extra: dict):
    """A cache the caller passed: ``past_key_values=`` (transformers <= 5.23) or ``cache=`` (its name from 5.24)."""
    cache = extra.get("past_key_values")
    return extra.get("cache") if cache is None else cache


def _validate_kv(method, call, extra, gc) -> None:
    """What a KV method alone can't honour inside HF's generate (the rest of HF's options work as in vanilla)."""
    if call.get("custom_generate") is not None:
        raise ValueError(f"accel={method!r} can't be combined with custom_generate=: pass one of them.")
    if (gc.num_beams or 1) > 1:
        raise ValueError(
            f"accel={method!r} does not do beam search (num_beams={gc.num_beams}): its cache keeps different slots "
            "per row. Use num_beams=1, or drop accel=."
        )
    if call.get("assistant_model") is not None or extra.get("assistant_model") is not None \
            or getattr(gc, "prompt_lookup_num_tokens", None) or getattr(gc, "assistant_early_exit", None):
        raise ValueError(
            f"accel={method!r} can't run under HF assisted decoding (assistant_model / prompt_lookup_num_tokens / "
            f"assistant_early_exit roll the cache back, which {method} can't): compose it with one of hf_accel's "
            f"speculative methods instead, e.g. accel=[{method!r}, 'aded']."
        )
    if _user_cache(extra) is not None:
        raise ValueError(
            f"accel={method!r} builds its own cache from the prompt: don't pass past_key_values= / cache=; pass the whole "
            "conversation as input_ids instead."
        )
    static_ok = hasattr(registry.get(method), "new_static_cache")
    if gc.cache_implementation not in (None, "dynamic") and not (gc.cache_implementation == "static" and static_ok):
        raise ValueError(
            f"accel={method!r} keeps its own cache, so cache_implementation={gc.cache_implementation!r} "
            "(offloaded, sliding_window, ...) is not supported: leave cache_implementation unset"
            + (", or use 'static' (its own fixed-shape cache, compiled by HF's generate)." if static_ok else ".")
        )
    if gc.use_cache is False:
        raise ValueError(f"accel={method!r} works on the KV cache: use_cache=False is not supported; drop it.")
    if gc.return_dict_in_generate and gc.output_attentions:
        raise ValueError(f"accel={method!r} can't return attention weights: drop output_attentions.")


def _effective_config(model, passed, extra):
    gc = copy.deepcopy(passed if passed is not None else model.generation_config)
    for key, value in extra.items():
        if hasattr(gc, key) and not key.startswith("_"):
            setattr(gc, key, value)
    return gc


def _validate(method, cls, call, extra, gc, method_kwargs=None) -> None:
    if call.get("custom_generate") is not None:
        raise ValueError(f"accel={method!r} can't be combined with custom_generate=: pass one of them.")
    if (gc.num_beams or 1) > 1:
        raise ValueError(
            f"accel={method!r} does not do beam search (num_beams={gc.num_beams}): use num_beams=1, or drop accel=."
        )
    if call.get("assistant_model") is not None or extra.get("assistant_model") is not None:
        raise ValueError(
            f"accel={method!r} can't be combined with assistant_model=: HF assisted decoding is its own accelerator. "
            "Drop one of them."
        )
    if getattr(gc, "prompt_lookup_num_tokens", None) or getattr(gc, "assistant_early_exit", None):
        raise ValueError(
            f"accel={method!r} can't be combined with HF's own speculative options "
            "(prompt_lookup_num_tokens / assistant_early_exit): drop one of them."
        )
    cache = _user_cache(extra)
    if gc.cache_implementation not in _CACHES:
        raise ValueError(
            f"accel={method!r} runs on a dynamic cache or on its own static cache "
            f"(cache_implementation='static'); cache_implementation={gc.cache_implementation!r} (offloaded, hybrid, "
            "sliding-window and paged caches) is not supported. Use cache_implementation='static' or leave it unset "
            "(to fit a large model, offload its weights with device_map instead)."
        )
    no_static = cls.static_refusal(method_kwargs or {})
    if gc.cache_implementation == "static" and no_static:
        raise ValueError(
            f"accel={method!r} does not run on the static engine (cache_implementation='static'): "
            f"{no_static} Leave cache_implementation unset for it."
        )
    if isinstance(cache, StaticCache):
        raise ValueError(
            f"accel={method!r} builds its own static cache: pass cache_implementation='static' instead of a "
            "StaticCache in past_key_values= / cache=."
        )
    if cache is not None:
        raise ValueError(
            f"accel={method!r} builds its own cache from the prompt: don't pass past_key_values= / cache=; pass the whole "
            "conversation as input_ids instead."
        )
    if extra.get("inputs_embeds") is not None:
        raise ValueError(f"accel={method!r} needs input_ids; inputs_embeds= is not supported.")
    if call.get("prefix_allowed_tokens_fn") is not None:
        raise ValueError(f"accel={method!r} does not support prefix_allowed_tokens_fn=; drop one of them.")
    if (getattr(gc, "guidance_scale", None) or 1) != 1 or call.get("negative_prompt_ids") is not None:
        raise ValueError(f"accel={method!r} does not support classifier-free guidance (guidance_scale); drop one.")
    if gc.return_dict_in_generate and (gc.output_attentions or gc.output_hidden_states):
        raise ValueError(
            f"accel={method!r} can't return attentions or hidden states (they'd cover draft tokens too): "
            "drop output_attentions / output_hidden_states."
        )
    if call.get("synced_gpus"):
        raise ValueError(f"accel={method!r} does not support synced_gpus=True.")


def stats(obj):
    """Statistics of an accel run: pass its output (tensor or GenerateDecoderOnlyOutput) or the model."""
    found = getattr(obj, "accel_stats", None)
    if found is not None:
        return found
    seqs = getattr(obj, "sequences", obj)
    entry = _STATS_BY_OUTPUT.get(id(seqs))
    if entry is not None and entry[0]() is seqs:
        return entry[1]
    try:
        found = _STATS_BY_MODEL.get(obj)
    except TypeError:
        found = None
    if found is None:
        raise ValueError(
            "no hf_accel statistics for this object: pass the output of generate(..., accel=...) or the model "
            "it ran on."
        )
    return found
