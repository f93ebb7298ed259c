"""Bad input gives one clear error and leaves the model as it was: damaged artifact folders, options of the wrong
type, trained parts in another dtype, unsupported caches, set_generation_config, right padding, messages; and the
bench's forward counter under two threads."""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

import hf_accel
from hf_accel import ArtifactError
from hf_accel.adapters.clover import CloverHeads
from hf_accel.adapters.hidden_transfer import TransferMaps
from hf_accel.adapters.lora_drop import DropLoRAs
from hf_accel.adapters.lud import LUDLoRA
from hf_accel.adapters.m2r2 import RateResiduals
from hf_accel.bench.runner import _ForwardCounter
from hf_accel.config import AccelConfig, option
from hf_accel.integrations import artifacts

from conftest import prompts, tiny_model


def _snapshot(model):
    return dict(
        params={k: v.detach().clone() for k, v in model.state_dict().items()},
        dtypes={k: v.dtype for k, v in model.state_dict().items()},
        generate="generate" in vars(model),
        gc=model.generation_config.to_dict(),
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        attn=model.config._attn_implementation,
    )


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now["generate"] is False and snap["generate"] is False  # nothing patched on the instance
    assert now["gc"] == snap["gc"]
    assert now["hooks"] == snap["hooks"]
    assert now["attn"] == snap["attn"]
    assert now["dtypes"] == snap["dtypes"]
    for k, v in snap["params"].items():
        assert torch.equal(now["params"][k], v), k


def _refused(model, exc, accel, accel_kwargs=None, *, names=(), **kw):
    """generate(...) raises ``exc`` whose message holds every string of ``names``; the model is unchanged."""
    ids, attn = prompts([7, 5], seed=2)
    snap = _snapshot(model)
    with pytest.raises(exc) as info:
        model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False, accel=accel,
                       accel_kwargs=accel_kwargs, **kw)
    msg = str(info.value)
    for n in names:
        assert n in msg, (n, msg)
    _assert_unchanged(model, snap)
    return msg


# ---- damaged artifact folders -------------------------------------------------------------------------------------


def _maps_folder(model, path):
    torch.manual_seed(0)
    TransferMaps(model, k=3).save_pretrained(path)
    return path


def _edit_meta(path, fn):
    meta = json.loads((path / "config.json").read_text())
    fn(meta)
    (path / "config.json").write_text(json.dumps(meta))


def _truncate(p):
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


DAMAGE = {
    # name: (how to damage the folder, the file the message names, the problem it names, the fix it names)
    "truncated_weights": (_truncate, "model.safetensors", "damaged", "hf-accel train hidden-transfer"),
    "missing_weights": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "missing",
                        "copy the whole folder"),
    "config_not_json": (lambda p: (p / "config.json").write_text('{"kind": "hidden_transfer", '), "config.json",
                        "not valid JSON", "hf-accel train hidden-transfer"),
    "config_not_object": (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json", "not a JSON object",
                          "hf-accel train hidden-transfer"),
    "setting_wrong_type": (lambda p: _edit_meta(p, lambda m: m["settings"].update(k="three")), "config.json",
                           "'k'", "hf-accel train hidden-transfer"),
    "unknown_setting": (lambda p: _edit_meta(p, lambda m: m["settings"].update(colour="red")), "config.json",
                        "unknown settings ['colour']", "remove them"),
    "settings_disagree_with_tensors": (lambda p: _edit_meta(p, lambda m: m["settings"].update(k=2)),
                                       "model.safetensors", "disagrees with the settings", "hf-accel train"),
    "no_kind": (lambda p: _edit_meta(p, lambda m: m.pop("kind")), "config.json", "names no kind", "hf-accel train"),
    "wrong_kind": (lambda p: _edit_meta(p, lambda m: m.update(kind="clover")), "", "holds a 'clover' artifact",
                   "hf-accel train hidden-transfer"),
    "settings_not_object": (lambda p: _edit_meta(p, lambda m: m.update(settings=[3])), "config.json",
                            "'settings'", "hf-accel train"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artifact_is_one_artifact_error(tmp_path, damage):
    model = tiny_model("llama", seed=1)
    path = _maps_folder(model, tmp_path / "maps")
    how, file, problem, fix = DAMAGE[damage]
    how(path)
    msg = _refused(model, ArtifactError, "hidden_transfer", {"heads": str(path)}, names=(str(path), file, problem, fix))
    assert "None artifact" not in msg
    assert issubclass(ArtifactError, ValueError)
    # the folder loader names the same problem (for scripts that load parts themselves)
    with pytest.raises(ArtifactError):
        TransferMaps.from_pretrained(path, model)


def test_artifact_for_another_base_model_and_missing_folder(tmp_path):
    model = tiny_model("llama", seed=1)
    _maps_folder(tiny_model("llama", seed=1, layers=3), tmp_path / "other")
    _refused(model, ArtifactError, "hidden_transfer", {"heads": str(tmp_path / "other")},
             names=("another base model", "hf-accel train hidden_transfer".replace("_", "-")))
    _refused(model, ArtifactError, "hidden_transfer", {"heads": str(tmp_path / "nope")},
             names=(str(tmp_path / "nope"), "config.json missing", "hf-accel train"))
    (tmp_path / "file").write_text("x")
    _refused(model, ArtifactError, "hidden_transfer", {"heads": str(tmp_path / "file")},
             names=("is a file", "config.json"))
    _refused(model, ValueError, "hidden_transfer", {"heads": 42}, names=("TransferMaps", "path", "int"))


def test_clover_settings_checked_through_its_own_from_settings(tmp_path):
    """Clover rebuilds from its settings with its own from_settings: a wrong type or an unknown key is still caught."""
    model = tiny_model("qwen2", seed=1)
    torch.manual_seed(0)
    CloverHeads(model, depth=2).save_pretrained(tmp_path / "h")
    original = (tmp_path / "h" / "config.json").read_text()
    _edit_meta(tmp_path / "h", lambda m: m["settings"].update(depth="2"))
    _refused(model, ArtifactError, "clover", {"heads": str(tmp_path / "h")}, names=("'depth'", "an integer", "'2'"))
    (tmp_path / "h" / "config.json").write_text(original)
    _edit_meta(tmp_path / "h", lambda m: m["settings"].update(extra=1))
    _refused(model, ArtifactError, "clover", {"heads": str(tmp_path / "h")}, names=("unknown settings ['extra']",))
    (tmp_path / "h" / "config.json").write_text(original)  # repaired: it loads and runs
    ids, attn = prompts([6], seed=1)
    model.generate(ids, attention_mask=attn, max_new_tokens=4, accel="clover",
                   accel_kwargs={"heads": str(tmp_path / "h")})


# ---- options of the wrong type ------------------------------------------------------------------------------------

WRONG = [
    ("aded", {"max_nodes": "16"}, "max_nodes", "an integer >= 1"),
    ("aded", {"max_nodes": None}, "max_nodes", "an integer >= 1"),
    ("aded", {"max_nodes": True}, "max_nodes", "an integer >= 1"),
    ("aded", {"max_nodes": 2.0}, "max_nodes", "an integer >= 1"),
    ("aded", {"max_nodes": -1}, "max_nodes", "an integer >= 1"),
    ("aded", {"search": "dfs"}, "search", "one of 'best_first', 'mcts'"),
    ("aded", {"overlay_strength": 0}, "overlay_strength", "a number > 0"),
    ("clover", {"heads": "/nonexistent", "width": "8"}, "width", "an integer >= 1"),
    ("clover", {"heads": "/nonexistent", "depth": 0}, "depth", "an integer >= 1 or None"),
    ("hidden_transfer", {"heads": "/nonexistent", "max_nodes": 0}, "max_nodes", "an integer >= 1 or None"),
    ("m2r2", {"adapter": "/nonexistent", "threshold": "high"}, "threshold", "a number in [0, 1]"),
    ("m2r2", {"adapter": "/nonexistent", "mode": "fast"}, "mode", "one of 'self_spec', 'early_exit'"),
    ("lud", {"adapter": "/nonexistent", "beta": "high"}, "beta", "a number in [0, 1] or None"),
    ("lud", {"adapter": "/nonexistent", "lossless": "yes"}, "lossless", "True or False"),
    ("lora_drop", {"period": 2.5}, "period", "an integer >= 1 or None"),
    ("lora_drop", {"reuse": "both"}, "reuse", "one of 'delta', 'output' or None"),
    ("ead", {"small_model": "/nonexistent", "window": "5"}, "window", "an integer >= 1"),
    ("duo_attention", {"sparsity": "half"}, "sparsity", "a number in [0, 1] or None"),
    ("duo_attention", {"sink": 1.5}, "sink", "an integer >= 0 or None"),
    ("quant_spec", {"k": "6"}, "k", "an integer >= 1"),
    ("quant_spec", {"aded": {"max_nodes": "8"}}, "max_nodes", "an integer >= 1"),
    ("quant_spec", {"aded": "fast"}, "aded", "a dict"),
]


@pytest.mark.parametrize("method,kwargs,name,accepts", WRONG,
                         ids=[f"{m}-{n}-{i}" for i, (m, _, n, _) in enumerate(WRONG)])
def test_wrong_option_type_is_one_clear_error(method, kwargs, name, accepts):
    model = tiny_model("llama", seed=1)
    bad = kwargs[name] if name in kwargs else kwargs["aded"][name]
    msg = _refused(model, ValueError, method, kwargs, names=(name, accepts, repr(bad)))
    assert "pass" in msg  # the fix: a valid example, or leave it out
    # the same check before anything is stored in a generation config
    gc = GenerationConfig()
    with pytest.raises(ValueError, match=name):
        hf_accel.set_generation_config(gc, method, **kwargs)
    assert not hasattr(gc, "hf_accel")


def test_good_values_of_looser_types_are_accepted():
    """float options take ints, int options take numpy integers, Optional takes None."""
    model = tiny_model("llama", seed=1)
    ids, attn = prompts([7], seed=2)
    ref = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False, accel="aded",
                         accel_kwargs={"overlay_strength": 2, "max_nodes": np.int64(8), "min_prob": 0})
    assert torch.equal(out, ref)
    hf_accel.registry.get("lud").Config.from_kwargs("lud", {"adapter": "x", "beta": 1, "k": None})


def test_union_of_int_and_allowed_strings():
    @dataclass
    class Cfg(AccelConfig):
        n: int | str = option(64, min=1, choices=("auto",))
        m: int | Literal["auto"] = option(8, min=2)

    assert Cfg.from_kwargs("x", {"n": "auto", "m": "auto"}).n == "auto"
    assert Cfg.from_kwargs("x", {"n": 3, "m": 2}).m == 2
    for bad in ({"n": "16"}, {"n": 0}, {"n": None}, {"m": "16"}, {"m": 1}, {"m": False}):
        with pytest.raises(ValueError) as info:
            Cfg.from_kwargs("x", bad)
        (key,) = bad
        assert key in str(info.value) and "'auto'" in str(info.value)


def test_an_unresolvable_annotation_leaves_the_other_fields_checked():
    @dataclass
    class Cfg(AccelConfig):
        thing: NotDefinedAnywhere = None  # noqa: F821
        n: int = option(3, min=1)

    assert Cfg.from_kwargs("x", {"thing": object(), "n": 2}).n == 2
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        Cfg.from_kwargs("x", {"n": "2"})


# ---- set_generation_config ---------------------------------------------------------------------------------------


def test_set_generation_config_validates_before_storing(tmp_path):
    model = tiny_model("llama", seed=1)
    snap = _snapshot(model)
    for method, kw, what in [
        ("nosuch", {}, "unknown hf_accel method 'nosuch'"),
        ("aded", {"max_nodes": -1}, "max_nodes must be an integer >= 1"),
        ("aded", {"colour": 1}, "unknown accel_kwargs ['colour']"),
        (["aded", "clover"], {}, "a composition is one KV method"),
        (42, {}, "takes a method name"),
    ]:
        with pytest.raises(ValueError, match=what.replace("[", r"\[").replace("]", r"\]")):
            hf_accel.set_generation_config(model, method, **kw)
        _assert_unchanged(model, snap)
        assert not hasattr(model.generation_config, "hf_accel")
    # a valid setting is stored; a later bad one leaves it as it was
    hf_accel.set_generation_config(model, "aded", max_nodes=16)
    with pytest.raises(ValueError):
        hf_accel.set_generation_config(model, "aded", max_nodes="32")
    assert model.generation_config.hf_accel == {"method": "aded", "max_nodes": 16}
    hf_accel.set_generation_config(model, None)
    assert not hasattr(model.generation_config, "hf_accel")


def test_bad_hf_accel_entry_in_a_generation_config_is_named_as_such():
    model = tiny_model("llama", seed=1)
    msg = _refused(model, ValueError, None, generation_config=GenerationConfig(hf_accel=42, max_new_tokens=4),
                   names=("generation_config", "hf_accel", "42", "set_generation_config"))
    assert "accel= takes" not in msg


# ---- trained parts given as objects in another dtype -------------------------------------------------------------


@pytest.mark.parametrize("method", ["clover", "lora_drop", "hidden_transfer"])
def test_part_object_in_float32_for_a_bfloat16_model(method):
    model = tiny_model("llama", seed=1)
    torch.manual_seed(0)
    part, key = {
        "clover": lambda: (CloverHeads(model, depth=2), "heads"),
        "lora_drop": lambda: (DropLoRAs(model, droppable=[1]), "adapter"),
        "hidden_transfer": lambda: (TransferMaps(model, k=2), "heads"),
    }[method]()
    model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in part.state_dict().items()}
    ids, attn = prompts([9, 6], seed=3)
    out = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False, accel=method,
                         accel_kwargs={key: part})
    assert out.shape == (2, 15)
    # the user's object is left as it was (dtype and values); a copy in the model's dtype was used, once
    for k, v in part.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
    ((_, copy),) = artifacts._CAST[part].values()
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert artifacts.part_from(part, type(part), model, method) is copy
    # the copy follows the object's weights when they change
    with torch.no_grad():
        next(part.parameters()).add_(1.0)
    fresh = artifacts.part_from(part, type(part), model, method)
    assert fresh is not copy
    torch.testing.assert_close(next(fresh.parameters()).float(), next(part.parameters()).bfloat16().float())


def test_part_object_in_the_model_dtype_is_used_as_is():
    model = tiny_model("llama", seed=1)
    heads = CloverHeads(model, depth=2)
    assert artifacts.part_from(heads, CloverHeads, model, "clover") is heads


# ---- caches, trained limits, messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["offloaded", "offloaded_hybrid", "offloaded_hybrid_chunked", "offloaded_static",
                                   "sliding_window", "hybrid"])
def test_offloaded_and_other_caches_are_refused(cache):
    model = tiny_model("llama", seed=1)
    _refused(model, ValueError, "aded", None, cache_implementation=cache,
             names=(f"cache_implementation={cache!r}", "not supported", "leave it unset"))
    _refused(model, ValueError, "duo_attention", None, cache_implementation=cache,
             names=(f"cache_implementation={cache!r}", "leave cache_implementation unset"))


def test_values_beyond_the_trained_part_are_refused():
    model = tiny_model("llama", seed=1)
    maps = TransferMaps(model, k=2)
    _refused(model, ValueError, "hidden_transfer", {"heads": maps, "depth": 3},
             names=("depth=3", "trained for", "depth <= 2"))
    lora = LUDLoRA(model, placeholder_id=3, k=3, rank=2)
    _refused(model, ValueError, "lud", {"adapter": lora, "k": 5}, names=("k=5", "trained for", "k <= 3"))
    ids, attn = prompts([7], seed=2)  # at the limit it runs
    model.generate(ids, attention_mask=attn, max_new_tokens=4, accel="hidden_transfer",
                   accel_kwargs={"heads": maps, "depth": 2})


def test_messages_name_the_problem():
    model = tiny_model("llama", seed=1)
    msg = _refused(model, ValueError, "ead", {"small_model": "/no/such/small-model"},
                   names=("/no/such/small-model", "no folder at that path", "small_model"))
    assert "Repo id" not in msg
    msg = _refused(model, ValueError, "ead", None, names=("needs a small model", "small_model"))
    assert "}}" not in msg
    with pytest.raises(ValueError, match="at least 2 decoder layers") as info:
        RateResiduals(tiny_model("llama", layers=1))
    assert "1..0" not in str(info.value) and "None" not in str(info.value)


# ---- right padding -----------------------------------------------------------------------------------------------


def test_right_padding_warns():
    model = tiny_model("llama", seed=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with pytest.warns(UserWarning, match="right padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, accel="aded")
    left, lmask = prompts([6, 4], seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(left, attention_mask=lmask, max_new_tokens=3, do_sample=False, accel="aded")
    assert not [w for w in caught if "right padding" in str(w.message)]


# ---- the bench's forward counter under threads --------------------------------------------------------------------


def test_forward_counter_counts_only_its_own_thread():
    model = tiny_model("llama", seed=1)
    jobs = {"short": (prompts([6], seed=1), 8), "long": (prompts([9], seed=2), 40)}

    def run(name):
        (ids, attn), n = jobs[name]
        with _ForwardCounter(model) as counter:
            out = model.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return counter.calls, counter.query_tokens, out.shape[1] - ids.shape[1]

    alone = {name: run(name) for name in jobs}
    assert alone["short"][0] == 8 and alone["long"][0] == 40
    for _ in range(3):
        got, errors = {}, []
        barrier = threading.Barrier(2)

        def worker(name):
            try:
                barrier.wait()
                got[name] = run(name)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(n,)) for n in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert got == alone
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_two_threads_loading_one_artifact_get_one_part(tmp_path):
    model = tiny_model("llama", seed=1)
    path = _maps_folder(model, tmp_path / "maps")
    made, got = [], []
    barrier = threading.Barrier(4)

    def make():
        made.append(1)
        return TransferMaps.from_pretrained(path, model)

    def worker():
        barrier.wait()
        got.append(artifacts.reused(model, "test_kind", path, make))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(got) == 4 and all(g is got[0] for g in got)


def test_bench_spelling_in_accel_names_the_accel_kwargs_fix():
    model = tiny_model("llama")
    ids, attn = prompts([6], seed=1)
    with pytest.raises(ValueError, match=r"accel_kwargs=\{'max_nodes': 16\}"):
        model.generate(ids, attention_mask=attn, max_new_tokens=4, do_sample=False, accel="aded(max_nodes=16)")
