"""The command line and what a new user meets first: model loading in one module, the default model's committed
trained parts, skip lines instead of tracebacks, method options in the demo, the training registry, and
``datastore="auto"`` finding the store after save/reload."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_accel
from conftest import VOCAB, prompts, tiny_model
from hf_accel import cli, loading, registry
from hf_accel.bench import methods as bm
from hf_accel.data import trigram
from hf_accel.default_model import ARTIFACT_KEYS, default_accel_kwargs, default_artifact
from hf_accel.engine import budget
from hf_accel.train import registry as trainers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("HF_ACCEL_CACHE", str(d))
    return d


def _store_for(tok, seed=0) -> trigram.TrigramStore:
    """A small store with repetitive text in the tiny vocabulary, built under ``tok``'s hash."""
    g = np.random.default_rng(seed)
    docs = [np.tile(g.integers(3, VOCAB, 8), 6) for _ in range(40)]
    return trigram.TrigramStore.from_token_docs(docs, VOCAB, meta={"tokenizer_hash": trigram.tokenizer_hash(tok)})


# ---- loading: one module, no import back from the CLI ----------------------------------------------------------


def test_suites_and_scripts_load_through_loading_not_the_cli():
    for f in ["hf_accel/bench/duo.py", "hf_accel/train/duo.py", *map(str, (REPO / "scripts").glob("*.py"))]:
        text = (REPO / f).read_text()
        assert "hf_accel.cli" not in text and "from ..cli" not in text, f
    assert loading.torch_dtype("bf16") is torch.bfloat16 and loading.torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="fp32"):
        loading.torch_dtype("fp8")
    assert loading.quantization("none", "fp32") is None


def test_default_artifacts_found_next_to_the_package(monkeypatch):
    for kind, key in ARTIFACT_KEYS.items():
        path = default_artifact(kind)
        assert path == REPO / "artifacts" / "smollm2-135m" / kind and (path / "model.safetensors").exists()
        assert default_accel_kwargs(kind) == {key: str(path)}
    assert default_accel_kwargs("aded") == {}
    monkeypatch.setenv("HF_ACCEL_ARTIFACTS", "/nonexistent/artifacts")
    assert default_artifact("clover") is None and default_accel_kwargs("clover") == {}
    why = cli._skip_reason("default", "clover", "no trained heads")
    assert why.startswith("no trained heads") and "/nonexistent/artifacts/clover" in why and "clone" in why


def test_bench_methods_take_default_parts_and_skip_missing_ones():
    model = tiny_model("llama")
    defaults = cli._method_defaults("default", registry.available())
    assert defaults["clover"] == {"heads": str(REPO / "artifacts/smollm2-135m/clover")}
    assert cli._method_defaults("some/model", registry.available()) == {}
    # listed explicitly without its trained part: a skip line, not a traceback later
    specs, skipped = bm.parse("vanilla,clover,aded", "cpu", None, model)
    assert [s.label for s in specs] == ["vanilla", "aded"]
    assert skipped[0][0] == "clover" and "heads" in skipped[0][1]
    # the default model's parts fill what an entry leaves out (and an entry's own value wins)
    specs, skipped = bm.parse("clover(depth=2),lora_drop(adapter=/x)", "cpu", None, model, defaults=defaults)
    clover = next(s for s in specs if s.name == "clover")
    assert clover.kwargs == {"heads": defaults["clover"]["heads"], "depth": 2} and clover.label == "clover(depth=2)"
    assert [s for s, _ in skipped] == ["lora_drop(adapter=/x)"]
    specs, skipped = bm.parse("all", "cpu", None, model, defaults=defaults)
    names = {s.name for s in specs}
    assert {"clover", "hidden_transfer", "lora_drop", "lud", "m2r2", "duo_attention"} <= names
    # on a CPU: HF's compiled static baselines, assisted generation without a draft model, and the methods that need
    # a second model are skipped with a reason
    assert {n for n, _ in skipped} == {"vanilla-static", "vanilla-static-naive", "hf-pld+static", "hf-assisted",
                                       "hf-assisted+static", "ead", "quant_spec"}


# ---- demo ------------------------------------------------------------------------------------------------------


def test_demo_accepts_method_options_skips_missing_parts_and_reports_per_prompt(tmp_path, word_tokenizer, capsys,
                                                                               cache):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    rc = cli.main(["demo", "--model", str(tmp_path / "m"), "--methods", "aded(max_nodes=8,search=mcts),clover",
                   "--prompts", "2", "--max-new-tokens", "6", "--no-datastore"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipped clover: no trained heads" in out and "warm-up" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("q0")]
    assert len(lines) == 2 and all("vanilla" in ln and "tok/s" in ln and "identical: yes" in ln for ln in lines)
    assert "== aded(max_nodes=8,search=mcts):" in out and "identical 2/2" in out
    with pytest.raises(SystemExit, match="unknown bench method"):
        cli.main(["demo", "--model", str(tmp_path / "m"), "--methods", "nope"])
    with pytest.raises(SystemExit, match="not an hf_accel method"):
        cli.main(["demo", "--model", str(tmp_path / "m"), "--methods", "hf-pld"])


def test_methods_prints_one_line_per_method(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == registry.available()
    assert all(("lossless" in ln or "lossy" in ln) and "needs" in ln for ln in lines)
    assert cli._lossless("m2r2", {}) and not cli._lossless("m2r2", {"mode": "early_exit"})
    assert cli._lossless("lud", {"lossless": True}) and not cli._lossless("lud", {})
    assert cli._lossless("aded", {}) and not cli._lossless("lora_drop", {})


# ---- train: the registry ---------------------------------------------------------------------------------------


def test_training_registry_declares_every_trainer():
    for name in trainers.TRAINERS:
        mod = trainers.module(name)
        assert callable(getattr(mod, "add_arguments", None)), name
        assert callable(getattr(mod, "build", None)) or callable(getattr(mod, "run", None)), name
        assert name == "draft" or name in registry.available()  # CLI names are the registry's
    assert trainers.canonical("hidden-transfer") == "hidden_transfer" and trainers.canonical("duo") == "duo_attention"
    assert trainers.defaults("duo")["seq_len"] == 2048 and trainers.defaults("clover")["batch"] == 8
    with pytest.raises(ValueError, match="hf-accel train takes"):
        trainers.canonical("nope")


@pytest.mark.parametrize("spelling", ["hidden-transfer", "hidden_transfer"])
def test_train_dispatches_through_the_registry(tmp_path, word_tokenizer, capsys, cache, spelling):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    rc = cli.main(["train", spelling, "--model", str(tmp_path / "m"), "--out", str(tmp_path / "a"), "--steps", "2",
                   "--samples", "6", "--max-new-tokens", "6", "--prompt-max", "64", "--gen-batch", "6",
                   "--heldout", "0.34", "--batch", "2", "--eval-every", "1", "--device", "cpu", "--no-progress", "--depth", "2",
                   "--anchors", "4"])
    assert rc == 0
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["kind"] == "hidden_transfer" and meta["settings"]["k"] == 2 and meta["metrics"]["steps"] == 2
    assert "accel_kwargs={'heads':" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # clover's own options are not hidden transfer's
        cli.main(["train", "clover", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b"), "--anchors", "3"])


# ---- ADED datastore="auto" -------------------------------------------------------------------------------------


def test_auto_store_found_after_set_generation_config_save_and_reload(tmp_path, word_tokenizer, cache):
    model = tiny_model("llama")
    ids, mask = prompts([12])
    store = _store_for(word_tokenizer)
    path = store.save(trigram.default_path(trigram.tokenizer_hash(word_tokenizer)))
    hf_accel.set_generation_config(model, "aded")
    # saved with its tokenizer: found by the tokenizer's hash (the key the store is built under)
    model.save_pretrained(tmp_path / "with_tok")
    word_tokenizer.save_pretrained(tmp_path / "with_tok")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "with_tok").eval()
    # flat step costs: the auto budget drafts whatever pays, not what this (maybe loaded) CPU's timings say
    budget.set_costs(m2, {w: 1.0 for w in budget.buckets(64)}, batch=1, engine="dynamic")
    out = m2.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    st = hf_accel.stats(out)
    assert st.extra["datastore"] == str(path) and st.extra["datastore_found"] == "tokenizer hash"
    assert st.tokens_per_forward > 1.0  # the store's drafts were used
    ref = tiny_model("llama").generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)  # vanilla
    assert torch.equal(out, ref)
    # saved without it: the only cached store of its vocabulary size ...
    model.save_pretrained(tmp_path / "no_tok")
    m3 = AutoModelForCausalLM.from_pretrained(tmp_path / "no_tok").eval()
    out = m3.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    st = hf_accel.stats(out)
    assert st.extra["datastore"] == str(path) and st.extra["datastore_found"] == "the only store of this vocabulary size"
    assert torch.equal(out, ref)
    # ... not when two stores have that size, then the index entry the CLI writes for the model it built the store
    # for (shape key)
    _store_for(word_tokenizer, seed=2).save(trigram.store_dir() / "another.safetensors")
    out = m3.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert hf_accel.stats(out).extra["datastore"] is None and torch.equal(out, ref)
    loading.register_datastore(model, path)
    out = m3.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    st = hf_accel.stats(out)
    assert st.extra["datastore"] == str(path) and st.extra["datastore_found"] == "datastore index (model shape)"
    assert torch.equal(out, ref)
    # a store made for another tokenizer is not taken for a model whose own tokenizer is known
    other = _store_for(word_tokenizer, seed=1)
    other.meta["tokenizer_hash"] = "0" * 16
    other.save(path)
    from hf_accel.adapters import aded

    aded._load_store.cache_clear()  # loaded stores are cached by path
    out = m2.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert hf_accel.stats(out).extra["datastore"] is None


def test_datastore_build_progress_and_index(tmp_path, word_tokenizer, cache, capsys, monkeypatch):
    from hf_accel.data import sharegpt

    monkeypatch.setattr(sharegpt, "assistant_turns", lambda limit=None: (f"w{10 + i % 20} w{40 + i % 20} w5" for i in
                                                                         range(300)))
    store = trigram.build_from_sharegpt(word_tokenizer, batch=64)
    assert store.meta["turns"] == 300 and store.meta["tokens"] == 300 * 4  # 3 words + EOS each
    assert store.trigram(5, 1) is None and store.bigram(5) == ([1], [1.0])
    err = capsys.readouterr().err
    assert "tokenizing" in err and "counting trigrams" in err
    p = store.save(trigram.store_dir() / "x.safetensors")
    trigram.register(p, ["some/model", "config:abc"])
    trigram.register(p, ["some/model"])  # re-registering keeps one line per key
    assert (trigram.store_dir() / "index.txt").read_text().count("some/model") == 1
    assert trigram.indexed("config:abc") == p and trigram.indexed("other") is None


@pytest.mark.real
def test_bench_default_model_runs_trained_methods_from_the_committed_artifacts(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["bench", "--model", "default", "--methods", "vanilla,clover,m2r2", "--limit", "1",
                   "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu", "--no-progress", "--no-nll",
                   "--no-datastore", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data["methods"]) == ["vanilla", "clover", "m2r2"] and data["skipped"] == []
    # lossless in fp32: identical to vanilla greedy
    assert data["methods"]["clover"]["token_match"] == 1.0 and data["methods"]["m2r2"]["token_match"] == 1.0


def test_cli_module_and_parser_import_no_suite():
    """The parser is cheap: suites, plotting, training and peft are imported by the handlers that need them."""
    import subprocess
    import sys

    code = ("import sys, hf_accel.cli as c\n"
            "try:\n    c.main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in sys.modules if m.startswith(('matplotlib', 'peft', 'hf_accel.bench', "
            "'hf_accel.train.loop', 'hf_accel.train.clover', 'hf_accel.train.duo'))]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
