"""hf-accel bench: method parsing, counting, fidelity metrics, reports and the scale projection (tiny models, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import PAD, prompts, tiny_model
from hf_accel import cli
from hf_accel.bench import methods as bm
from hf_accel.bench import project as bp
from hf_accel.bench import report
from hf_accel.bench.runner import Record, _compare, run_bench

ADED = "aded(own-output store)"


def _prompt_lists(lengths, seed=0):
    ids, mask = prompts(lengths, seed=seed)
    return [r[m.bool()].tolist() for r, m in zip(ids, mask)]


# ---- method entries -------------------------------------------------------------------------------


def test_method_entries_parse_options_and_put_vanilla_first():
    specs, skipped = bm.parse("aded(max_nodes=16,search=mcts),hf-pld(prompt_lookup_num_tokens=3)", "cpu", None)
    assert [s.label for s in specs] == ["vanilla", "aded(max_nodes=16,search=mcts)", "hf-pld(prompt_lookup_num_tokens=3)"]
    assert specs[1].kwargs == {"max_nodes": 16, "search": "mcts"}
    assert bm.generate_kwargs(specs[1], None) == {"accel": "aded", "accel_kwargs": {"max_nodes": 16, "search": "mcts"}}
    assert bm.generate_kwargs(specs[2], None) == {"prompt_lookup_num_tokens": 3}
    assert skipped == []
    specs, _ = bm.parse("hf-pld,vanilla", "cpu", None)
    assert [s.label for s in specs] == ["vanilla", "hf-pld"]
    # Python's spellings of booleans / None are values, as JSON's are (lud(lossless=True) is a bool, not a string)
    specs, _ = bm.parse("aded(datastore=None),m2r2(adapter=a/b,k=2)", "cpu", None)
    assert specs[1].kwargs == {"datastore": None} and specs[2].kwargs == {"adapter": "a/b", "k": 2}
    assert bm._value("True") is True and bm._value("false") is False and bm._value("best_first") == "best_first"
    # a list value keeps its commas: the entry splits on commas outside parentheses and brackets
    specs, _ = bm.parse("lora_drop(period=4,droppable=[1,2,3,5]),aded", "cpu", None)
    assert [s.label for s in specs] == ["vanilla", "lora_drop(period=4,droppable=[1,2,3,5])", "aded"]
    assert specs[1].kwargs["droppable"] == [1, 2, 3, 5] and specs[1].kwargs["period"] == 4


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown bench method 'nope'"),
        ("aded(max_nodez=3)", "max_nodez"),
        ("aded(max_nodes)", "write key=value"),
        ("aded(max_nodes=3", "unbalanced"),
        ("lora_drop(droppable=[1,2)", "unbalanced"),
        ("aded,aded", "listed twice"),
        ("hf-assisted", "--draft-model"),
    ],
)
def test_bad_method_entries_fail_before_any_run(text, match):
    with pytest.raises(ValueError, match=match):
        bm.parse(text, "cpu", None)


def test_all_lists_what_it_skips_and_why():
    specs, skipped = bm.parse("all", "cpu", None)
    names = [s.name for s in specs]
    assert names[0] == "vanilla" and "aded" in names and "hf-pld" in names
    reasons = dict(skipped)
    assert "GPU" in reasons["vanilla-static"] and "--draft-model" in reasons["hf-assisted"]
    assert "hf-accel train clover" in reasons["clover"]  # trained methods without their artifact are skipped
    assert "hf-accel train hidden-transfer" in reasons["hidden_transfer"]
    assert "GPU" in reasons["vanilla-static-naive"] and "GPU" in reasons["hf-pld+static"]
    specs, skipped = bm.parse("all", "cuda", "some/draft")
    assert {"vanilla-static", "vanilla-static-naive", "hf-assisted"} <= {s.label for s in specs}
    static_hf = ["hf-pld+static", "hf-assisted+static"]
    if bm.hf_static_assisted_reason() is None:  # transformers 5.24+
        assert set(static_hf) <= {s.label for s in specs}
    else:
        skipped = [s for s in skipped if s[0] not in static_hf]
    assert [name for name, _ in skipped] == ["clover", "duo_attention", "ead", "hidden_transfer", "lora_drop", "lud",
                                              "m2r2", "quant_spec"]
    assert "hf-accel train lora-drop" in reasons["lora_drop"] and "hf-accel train m2r2" in reasons["m2r2"]


# ---- fidelity metrics -----------------------------------------------------------------------------


def test_fidelity_metrics_against_vanilla():
    ref = Record("vanilla", 0, 5, 4, 1.0, [1, 2, 3, 4])
    same = Record("m", 0, 5, 4, 1.0, [1, 2, 3, 4])
    late = Record("m", 0, 5, 4, 1.0, [1, 2, 9, 4])
    short = Record("m", 0, 5, 2, 1.0, [1, 2])
    for r in (same, late, short):
        _compare(r, ref)
    assert (same.token_match, same.prefix_match, same.exact_match) == (1.0, 1.0, True)
    assert (late.token_match, late.prefix_match, late.exact_match) == (0.75, 0.5, False)
    assert (short.token_match, short.prefix_match, short.exact_match) == (0.5, 0.5, False)


# ---- the runner on a tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_run():
    from hf_accel.data.trigram import TrigramStore

    model = tiny_model("llama")
    ps = _prompt_lists([9, 14, 6], seed=3)
    # a datastore of the model's own greedy continuations, so that drafts get accepted
    docs = [model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=PAD)[0].tolist()
            for p in ps]
    store = TrigramStore.from_token_docs(docs, vocab_size=model.config.vocab_size)
    specs, _ = bm.parse("hf-pld", "cpu", None)
    specs.append(bm.MethodSpec(ADED, "aded", {"datastore": store, "max_nodes": 16}))
    run = run_bench(model, ps, specs, max_new_tokens=24, pad_token_id=PAD, progress=False)
    return model, ps, specs, run


def test_every_timed_call_starts_with_the_datastores_lookups_cold(monkeypatch):
    """Two ADED configurations on one store, interleaved per row: the second on a prompt would otherwise find the
    first's lookups cached on the store (on an H200 the first ADED configuration on a prompt drafted ~2x slower)."""
    from hf_accel.bench import runner
    from hf_accel.data.trigram import TrigramStore

    model = tiny_model("llama")
    ps = _prompt_lists([9, 14], seed=3)
    docs = [model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=PAD)[0].tolist()
            for p in ps]
    store = TrigramStore.from_token_docs(docs, vocab_size=model.config.vocab_size)
    specs, _ = bm.parse("", "cpu", None)
    specs += [bm.MethodSpec(f"aded{n}", "aded", {"datastore": store, "max_nodes": n}) for n in (4, 8)]
    at_start, at_end = [], []
    generate = model.generate

    def spy(*a, **kw):
        at_start.append(len(store._pairs))
        out = generate(*a, **kw)
        at_end.append(len(store._pairs))
        return out

    monkeypatch.setattr(model, "generate", spy)
    run = run_bench(model, ps, specs, max_new_tokens=16, pad_token_id=PAD, progress=False, warmup=False,
                    with_nll=False)
    assert len(run["records"]["aded8"]) == 2 and len(at_start) == 6  # 3 methods x 2 rows
    assert at_start == [0] * 6 and max(at_end) > 0  # the ADED calls filled it; each call found it empty
    # the rule itself: every store of the process, emptied
    store.trigram_pairs(int(docs[0][0]), int(docs[0][1]))
    assert store._pairs
    runner.clear_lookup_caches()
    assert not store._pairs


def test_runner_counts_forwards_and_checks_outputs(bench_run):
    model, ps, specs, run = bench_run
    recs = run["records"]
    assert set(recs) == {s.label for s in specs} and all(len(v) == len(ps) for v in recs.values())
    for r in recs["vanilla"]:
        # vanilla: the prefill yields the first token, then one forward per token
        assert r.target_forwards == r.new_tokens and r.verify_width == 1.0
        assert r.tokens_per_forward == 1.0 and r.accepted_per_forward == 0.0
        assert r.kv_cache_bytes > 0  # the returned cache is found (past_key_values to 5.23, cache from 5.24)
    aded = recs[ADED]
    for r, v in zip(aded, recs["vanilla"]):
        assert r.tokens == v.tokens and r.exact_match and r.token_match == 1.0  # lossless, float32
        assert r.draft_seconds is not None and r.verify_seconds is not None and r.kv_cache_bytes > 0
        assert r.target_forwards <= r.new_tokens and r.verify_width >= 1.0
        assert r.nll == pytest.approx(v.nll)  # same tokens, same NLL
    assert sum(r.accepted_tokens for r in aded) > 0  # the repeated prompts give ADED something to accept
    for r in recs["hf-pld"]:
        assert r.exact_match


def test_nll_is_the_models_teacher_forced_loss(bench_run):
    model, ps, specs, run = bench_run
    r = run["records"]["vanilla"][0]
    new = r.tokens[0]
    ids = torch.tensor([ps[0] + new])
    with torch.no_grad():
        logits = model(ids).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    manual = -sum(lp[len(ps[0]) - 1 + i, t].item() for i, t in enumerate(new)) / len(new)
    assert r.nll == pytest.approx(manual, rel=1e-4)
    assert r.greedy_agreement == 1.0  # vanilla greedy's tokens are the model's argmax, teacher-forced (fp32)


def test_greedy_agreement_counts_steps_off_the_models_choice():
    model = tiny_model("llama")
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 4:].tolist()
    changed = list(greedy)
    changed[2] = (changed[2] + 1) % 96  # the third step is off the model's choice
    from hf_accel.bench.runner import nll_of

    _, agree = nll_of(model, prompt, changed[:3])
    assert agree == pytest.approx(2 / 3)


def test_aggregates_reports_and_plots(bench_run, tmp_path):
    model, ps, specs, run = bench_run
    agg = report.aggregate(run["records"], "vanilla")
    assert agg["vanilla"]["speedup"] == pytest.approx(1.0) and agg["vanilla"]["speedup_median"] == pytest.approx(1.0)
    a = agg[ADED]
    assert a["exact_match"] == 1.0 and a["tokens_per_forward"] > 1.0
    assert a["forwards_per_token"] == pytest.approx(1 / a["tokens_per_forward"])
    tot = run["records"][ADED]
    assert a["tok_s"] == pytest.approx(sum(r.new_tokens for r in tot) / sum(r.seconds for r in tot))
    result = {
        "environment": report.environment(model, "fp32", "hf-accel bench --test"),
        "config": {"prompt_source": "test", "prompts": len(ps), "max_new_tokens": 24},
        "skipped": [("vanilla-static", "why")],
        "warmup_seconds": run["warmup_seconds"],
        "methods": agg,
    }
    files = report.write(result, run["records"], tmp_path)
    names = {f.name for f in files}
    assert {"results.json", "results.md", "speedup.png", "tokens_per_forward.png", "fidelity_vs_speedup.png"} <= names
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["per_prompt"]) == set(agg) and data["environment"]["command"] == "hf-accel bench --test"
    for key in ("torch", "transformers", "hf_accel", "device", "dtype", "date"):
        assert data["environment"][key]
    md = (tmp_path / "results.md").read_text()
    assert f"| {ADED} |" in md and "`vanilla-static` (why)" in md
    assert all((tmp_path / n).stat().st_size > 1000 for n in names if n.endswith(".png"))


# ---- projection -----------------------------------------------------------------------------------


def test_interpolation_and_projection_formula():
    table = {1: 1.0, 2: 2.0, 4: 2.0, 8: 4.0}
    assert bp.interp(table, 1) == 1.0 and bp.interp(table, 3) == 2.0 and bp.interp(table, 6) == 3.0
    assert bp.interp(table, 16) == 8.0  # extrapolated from the last two points
    bench = {512: {1: 10.0, 2: 10.0, 4: 12.0}}
    methods = {
        "vanilla": {"decode_seconds_per_forward": 11.0, "verify_width": 1.0, "new_tokens": 101, "target_forwards": 101,
                    "prompts": 1},
        "m": {"decode_seconds_per_forward": 13.0, "verify_width": 4.0, "new_tokens": 101, "target_forwards": 26,
              "prompts": 1},
        "compiled": {"decode_seconds_per_forward": None},
    }
    prof = bp.profiles(methods, {"eager": bench, "graphed": None})
    assert set(prof) == {"vanilla", "m"}
    assert prof["vanilla"]["overhead_s"] == pytest.approx(1.0) and prof["m"]["overhead_s"] == pytest.approx(1.0)
    assert prof["m"]["tau"] == pytest.approx(4.0)
    rows = bp.project(prof, {"big": {512: {1: 3.0, 2: 3.0, 4: 5.0}}}, {"big": 100.0}, bandwidth=1000.0)
    m = next(r for r in rows if r["method"] == "m")
    # vanilla (3 + 1) s per token; m (5 + 1) / 4 = 1.5 s per token
    assert m["projected_speedup"] == pytest.approx(4.0 / 1.5) and m["projected_tok_s"] == pytest.approx(1 / 1.5)
    assert m["roofline_tok_s"] == pytest.approx(10.0)


def test_cli_bench_end_to_end_with_projection(tmp_path, word_tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("\n".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 40 + 3}" for j in range(12))})
                               for i in range(3)) + "\n")
    out = tmp_path / "out"
    rc = cli.main([
        "bench", "--model", str(tmp_path / "m"), "--methods", "hf-pld,aded(datastore=null),aded(datastore=null,max_nodes=8)+static", "--prompts", str(pfile),
        "--limit", "2", "--max-new-tokens", "8", "--dtype", "fp32", "--device", "cpu", "--out", str(out),
        "--no-progress", "--project-shape", "tiny", "--project-prefixes", "16,32", "--project-ks", "1,2,4",
        "--project-reps", "1",
    ])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["prompts"] == 2 and list(data["methods"]) == [
        "vanilla", "hf-pld", "aded(datastore=null)", "aded(datastore=null,max_nodes=8)+static"]
    proj = data["projection"]
    assert set(proj["forward_seconds"]) == set(proj["graphed_forward_seconds"]) == {"bench-model", "tiny"}
    assert {(r["shape"], r["prefix"], r["method"]) for r in proj["rows"]} == {
        (s, p, m) for s in ("bench-model", "tiny") for p in (16, 32) for m in data["methods"]}
    assert {r["timings"] for r in proj["rows"] if r["method"].endswith("+static")} == {"graphed"}
    assert data["methods"]["aded(datastore=null,max_nodes=8)+static"]["exact_match"] == 1.0
    for p in data["per_prompt"]["aded(datastore=null)"]:  # the auto budget's choices reach the results
        ms = p["method_stats"]
        assert 0 < ms["budget_calibration"] and ms["budget_draft_seconds"] >= 0
        # one chosen width per decode step (the prompt's prefill is the other target forward)
        assert sum(v for k, v in ms.items() if k.startswith("budget_steps_w")) == p["target_forwards"] - 1
    assert not any(k.startswith("budget_") for p in data["per_prompt"]["aded(datastore=null,max_nodes=8)+static"]
                   for k in p["method_stats"])
    assert all(r["projected_tok_s"] > 0 and math.isfinite(r["projected_speedup"]) for r in proj["rows"])
    assert (out / "projection.png").exists() and "Scale projection" in (out / "results.md").read_text()
    # projection only, from the saved results
    rc = cli.main([
        "bench", "--model", str(tmp_path / "m"), "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / "p2"),
        "--project-from", str(out / "results.json"), "--project-shape", "tiny", "--project-prefixes", "16",
        "--project-ks", "1,2", "--project-reps", "1", "--no-progress",
    ])
    assert rc == 0 and (tmp_path / "p2" / "projection.json").exists()


def test_prompt_file_errors(tmp_path, word_tokenizer):
    from hf_accel.data import prompts as bprompts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match='"prompt" or "text"'):
        bprompts.load(str(bad), word_tokenizer)
    with pytest.raises(ValueError, match="no such file"):
        bprompts.load(str(tmp_path / "missing.jsonl"), word_tokenizer)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"text": "w5 w6 w7"}\n{"prompt": "w8"}\n')
    assert bprompts.load(str(ok), word_tokenizer) == [[5, 6, 7], [8]]


def test_two_model_methods_report_large_share_and_plot_it(tmp_path):
    """EAD in the bench: its own figures (large_share, switches) reach the report, with a quality vs large-model
    share plot."""
    from hf_accel.bench.runner import run_bench

    model = tiny_model("llama")
    small = tiny_model("llama", seed=3)
    small.save_pretrained(tmp_path / "small")
    specs, _ = bm.parse(f"ead(small_model={tmp_path / 'small'},threshold=100.0,min_run=2)", "cpu", None)
    ps = [p.tolist() for p in prompts((8, 10), seed=1)[0]]
    run = run_bench(model, ps, specs, max_new_tokens=12, pad_token_id=PAD, progress=False, warmup=False)
    agg = report.aggregate(run["records"], "vanilla")
    label = specs[1].label
    st = agg[label]["method_stats"]
    assert 0 < st["large_share"] < 1 and st["switches"] >= 1 and "large_share" not in agg["vanilla"]["method_stats"]
    result = {"environment": report.environment(model, "fp32", "test"), "skipped": [], "warmup_seconds": {},
              "config": {"prompt_source": "test", "prompts": 2, "max_new_tokens": 12}, "methods": agg}
    names = {f.name for f in report.write(result, run["records"], tmp_path / "out")}
    assert "quality_vs_large_share.png" in names
    assert "large_share" in (tmp_path / "out" / "results.md").read_text()


# ---- batches, sampling, baselines, labels, dtype (issue 20) ----------------------------------------


def test_rows_of_two_count_every_real_token_to_eos_and_match_batch_one():
    """--batch 2: rows of two left-padded prompts; each sequence counted up to and including its eos, padding
    after it not counted; the same tokens as batch 1 (fp32), so vanilla and a lossless method match per row."""
    from hf_accel.bench.runner import make_rows, real_tokens

    model = tiny_model("llama")
    ps = _prompt_lists([7, 12, 5], seed=11)
    free = model.generate(torch.tensor([ps[0]]), max_new_tokens=10, do_sample=False, pad_token_id=PAD)[0, 7:].tolist()
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token that first appears at i
    model.generation_config.eos_token_id = free[cut]  # sequence 0 now ends there, inclusive
    singles = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=PAD)[0, len(p):]
               .tolist() for p in ps]
    singles = [real_tokens(s, {free[cut]}) for s in singles]
    assert len(singles[0]) == cut + 1
    assert make_rows(ps, 2) == [[0, 1], [2]]
    specs, skipped = bm.parse("hf-pld,aded(datastore=null)", "cpu", None, batch=2)
    assert [s.label for s in specs] == ["vanilla", "aded(datastore=null)"]
    assert skipped and skipped[0][0] == "hf-pld" and "batch 1" in skipped[0][1]
    run = run_bench(model, ps, specs, max_new_tokens=10, pad_token_id=PAD, progress=False, batch=2)
    for label in ("vanilla", "aded(datastore=null)"):
        r0, r1 = run["records"][label]
        assert (r0.batch, r1.batch, r0.prompts, r1.prompts) == (2, 1, [0, 1], [2])
        assert r0.tokens == singles[:2] and r1.tokens == singles[2:]
        assert r0.row_new_tokens == [len(singles[0]), len(singles[1])]
        assert r0.new_tokens == len(singles[0]) + len(singles[1]) and r0.tok_s == pytest.approx(r0.new_tokens / r0.seconds)
        assert r0.token_match == 1.0 and r0.exact_match and r0.sequence_match == [1.0, 1.0]
    v = run["records"]["vanilla"][0]
    assert v.target_forwards == max(v.row_new_tokens) and v.tokens_per_forward == pytest.approx(1.0)
    agg = report.aggregate(run["records"], "vanilla")
    assert agg["vanilla"]["new_tokens"] == sum(len(s) for s in singles) and agg["vanilla"]["prompts"] == 3
    assert agg["vanilla"]["rows"] == 2 and agg["vanilla"]["new_tokens_per_row"] == [v.new_tokens, len(singles[2])]


def test_sampling_settings_reach_every_method_and_the_report(monkeypatch, tmp_path):
    model = tiny_model("llama")
    ps = _prompt_lists([6, 9], seed=5)
    calls = []
    real = type(model).generate

    def spy(self, *a, **kw):
        calls.append(kw)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "generate", spy)
    settings = bm.Settings(do_sample=True, temperature=0.7, top_p=0.9, top_k=5, seed=3)
    specs, _ = bm.parse("hf-pld,aded(datastore=null)", "cpu", None)
    run = run_bench(model, ps, specs, max_new_tokens=8, pad_token_id=PAD, progress=False, settings=settings,
                    with_nll=False)
    timed = [c for c in calls if c.get("max_new_tokens") == 8]
    assert len(timed) >= 3 * 2 and {c.get("accel") for c in timed} == {None, "aded"}
    assert {c.get("prompt_lookup_num_tokens") for c in timed} == {None, 10}
    for c in timed:
        assert (c["do_sample"], c["temperature"], c["top_p"], c["top_k"]) == (True, 0.7, 0.9, 5)
    monkeypatch.undo()
    # the seed: vanilla's row 1 is the draw of seed 3 + 1
    torch.manual_seed(4)
    direct = model.generate(torch.tensor([ps[1]]), max_new_tokens=8, do_sample=True, temperature=0.7, top_p=0.9,
                            top_k=5, pad_token_id=PAD)[0, len(ps[1]):].tolist()
    from hf_accel.bench.runner import eos_ids, real_tokens

    assert run["records"]["vanilla"][1].tokens == [real_tokens(direct, eos_ids(model))]
    agg = report.aggregate(run["records"], "vanilla", sampled=True)
    assert all(a["token_match"] is None and a["exact_match"] is None for a in agg.values())
    result = {"environment": report.environment(model, "fp32", "t"), "skipped": [], "warmup_seconds": {},
              "config": {"prompt_source": "test", "prompts": 2, "max_new_tokens": 8, "do_sample": True,
                         "decoding": settings.describe(), "reference": "vanilla"}, "methods": agg}
    md = report.markdown(result)
    assert "sampling (temperature 0.7, top-p 0.9, top-k 5, seed 3" in md and "| n/a |" in md and "n/a under sampling" in md


def test_headline_is_against_the_strongest_baseline_with_eager_vanilla_beside():
    assert bm.headline_reference(["vanilla", "aded"]) == "vanilla"
    assert bm.headline_reference(["vanilla", "hf-pld", "vanilla-static", "aded+static"]) == "vanilla-static"
    recs = {"vanilla": [Record("vanilla", 0, 4, 10, 1.0, [[5] * 10])],
            "vanilla-static": [Record("vanilla-static", 0, 4, 10, 0.25, [[5] * 10])],
            "m": [Record("m", 0, 4, 10, 0.125, [[5] * 10])]}
    for r in recs.values():
        _compare(r[0], recs["vanilla"][0])
    agg = report.aggregate(recs, "vanilla-static")
    assert agg["vanilla-static"]["speedup"] == pytest.approx(1.0) and agg["m"]["speedup"] == pytest.approx(2.0)
    assert agg["m"]["speedup_vs_vanilla"] == pytest.approx(8.0) and agg["vanilla"]["speedup"] == pytest.approx(0.25)
    result = {"environment": {"model": "m", "device": "d", "dtype": "bf16", "date": "x", "torch": "t",
                              "transformers": "5", "hf_accel": "0", "command": "c"}, "skipped": [],
              "warmup_seconds": {}, "methods": agg,
              "config": {"prompt_source": "p", "prompts": 1, "max_new_tokens": 10, "reference": "vanilla-static",
                         "max_cache_len": 300, "warmup_shapes": 1}}
    md = report.markdown(result)
    assert "speedup vs vanilla-static | x vanilla" in md and "| m | 80.0 [80.0–80.0] | **2.00x** | 8.00x |" in md
    assert "max_cache_len=300" in md and "near-tie" in md  # how the baseline ran; the bf16 caveat


def test_long_labels_get_short_names_and_a_key_without_layout_warnings(tmp_path):
    import warnings

    long = "lora_drop(artifact=/very/long/path/to/artifacts/smollm2-135m/lora_drop,period=2)+static"
    labels = ["vanilla", "aded", long, "clover(heads=/another/long/artifact/path/clover)"]
    short = report.short_labels(labels)
    assert short == {"vanilla": "vanilla", "aded": "aded", long: "M3", labels[3]: "M4"}
    assert f"M3 = {long[:60]}" in report.label_key(short).replace("\n", "")
    recs = {m: [Record(m, i, 4, 8, 0.5 + 0.1 * j, [[3] * 8]) for i in range(2)] for j, m in enumerate(labels)}
    for rs in recs.values():
        for r, v in zip(rs, recs["vanilla"]):
            _compare(r, v)
            r.nll, r.greedy_agreement = 1.0, 0.9
    result = {"environment": {"model": "m", "device": "cpu", "dtype": "fp32"}, "config": {"batch": 1},
              "methods": report.aggregate(recs, "vanilla")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = report.plots(result, tmp_path)
    assert all(f.stat().st_size > 1000 for f in files)


def test_bench_dtype_defaults_per_device_and_questions():
    assert cli.bench_default_dtype("cpu") == "fp32"
    assert cli.bench_default_dtype("cuda") == "bf16" and cli.bench_default_dtype("cuda:1") == "bf16"
    assert cli._bench_questions("60-64") == [60, 61, 62, 63, 64]
    assert cli._bench_questions("3,7-8") == [3, 7, 8]
    with pytest.raises(SystemExit, match="increasing range"):
        cli._bench_questions("9-2")


def test_each_static_baseline_keeps_its_own_cache_size():
    from hf_accel.bench.runner import _CacheLengths

    class M:
        pass

    m, lengths = M(), _CacheLengths()
    m._previous_max_cache_length = 300  # whatever ran last
    with lengths(m, "vanilla-static-naive"):
        assert not hasattr(m, "_previous_max_cache_length")  # a user's first call: none yet
        m._previous_max_cache_length = 120  # what transformers sets in the call
    assert m._previous_max_cache_length == 300 and lengths.values["vanilla-static-naive"] == 120
    with lengths(m, "hf-pld+static"):
        m._previous_max_cache_length = 400
    with lengths(m, "vanilla-static-naive"):
        assert m._previous_max_cache_length == 120  # not hf-pld+static's larger cache
        m._previous_max_cache_length = 150
    assert (m._previous_max_cache_length, lengths.values["vanilla-static-naive"]) == (300, 150)


def test_a_method_failing_its_warm_up_is_skipped_with_the_error(tmp_path):
    model = tiny_model("llama")
    ps = _prompt_lists([6, 7], seed=2)
    specs = [bm.MethodSpec("vanilla", "vanilla"), bm.MethodSpec("broken", "aded", {"datastore": str(tmp_path / "none")})]
    logged = []
    run = run_bench(model, ps, specs, max_new_tokens=4, pad_token_id=PAD, progress=False, with_nll=False,
                    log=logged.append)
    assert list(run["records"]) == ["vanilla"] and run["skipped"][0][0] == "broken"
    assert "failed in warm-up" in run["skipped"][0][1] and logged


def test_warmup_only_runs_every_warm_up_and_no_timed_row(tmp_path, word_tokenizer, capsys):
    model = tiny_model("llama")
    ps = _prompt_lists([6, 7], seed=2)
    specs = [bm.MethodSpec("vanilla", "vanilla"), bm.MethodSpec("aded", "aded", {"datastore": None})]
    calls = []
    run = run_bench(model, ps, specs, max_new_tokens=4, pad_token_id=PAD, progress=False, with_nll=False,
                    log=calls.append, warmup_only=True)
    assert run["rows_done"] == 0 and all(not r for r in run["records"].values())
    assert set(run["warmup_seconds"]) == {"vanilla", "aded"} and [c.split(":")[0] for c in calls] == [
        "warm-up vanilla", "warm-up aded"]
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("\n".join(json.dumps({"text": f"w{i} w{i + 3} w9 w4"}) for i in range(2)) + "\n")
    rc = cli.main(["bench", "--model", str(tmp_path / "m"), "--methods", "aded(datastore=null)", "--prompts", str(pfile),
                   "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress",
                   "--warmup-only"])
    assert rc == 0 and "warm-up only: vanilla" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"] == {}  # no timed row


def test_projection_timings_and_arithmetic_on_cpu(monkeypatch):
    """The projection path as far as a CPU runs it: eager and (uncaptured) static-step timings of a tiny shape,
    then the profiles and rows; a failed capture drops the graphed rows instead of ending the run."""
    model = bp.build_shape("tiny", torch.device("cpu"), torch.float32)
    eager = bp.time_forwards(model, ks=(1, 2, 4), prefixes=(8, 16), reps=1, progress=False)
    graphed = bp.time_forwards_graphed(model, ks=(1, 2, 4), prefixes=(8, 16), reps=1, progress=False)
    for t in (eager, graphed):
        assert set(t) == {8, 16} and all(set(v) == {1, 2, 4} and min(v.values()) > 0 for v in t.values())
    methods = {
        "vanilla": {"decode_seconds_per_forward": 2 * eager[16][1], "verify_width": 1.0, "new_tokens": 9,
                    "target_forwards": 9, "prompts": 1, "static": False},
        "m+static": {"decode_seconds_per_forward": 2 * graphed[16][4], "verify_width": 4.0, "new_tokens": 9,
                     "target_forwards": 3, "prompts": 1, "static": True},
    }
    proj = bp.run_projection(model, methods, ["tiny"], torch.float32, ks=(1, 2, 4), prefixes=(8,), reps=1,
                             progress=False)
    assert {r["method"] for r in proj["rows"]} == {"vanilla", "m+static"}
    assert proj["profiles"]["m+static"]["tau"] == pytest.approx(4.0)
    monkeypatch.setattr(bp, "time_forwards_graphed", lambda *a, **k: None)
    proj = bp.run_projection(model, methods, ["tiny"], torch.float32, ks=(1, 2), prefixes=(8,), reps=1,
                             progress=False)
    assert {r["method"] for r in proj["rows"]} == {"vanilla"} and proj["graphed_forward_seconds"] == {}


def test_cli_bench_batch_and_sampling_are_recorded(tmp_path, word_tokenizer):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("\n".join(json.dumps({"text": " ".join(f"w{(5 * i + j) % 40 + 3}" for j in range(6 + i))})
                               for i in range(4)) + "\n")
    out = tmp_path / "out"
    rc = cli.main(["bench", "--model", str(tmp_path / "m"), "--methods", "aded(datastore=null)", "--prompts", str(pfile),
                   "--questions", "1-3", "--batch", "2", "--max-new-tokens", "6", "--device", "cpu", "--do-sample",
                   "--temperature", "0.8", "--top-p", "0.95", "--top-k", "7", "--seed", "5", "--out", str(out),
                   "--no-progress", "--no-nll"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert (cfg["batch"], cfg["rows"], cfg["prompts"], cfg["questions"]) == (2, 2, 3, "1-3")
    assert (cfg["do_sample"], cfg["temperature"], cfg["top_p"], cfg["top_k"], cfg["seed"]) == (True, 0.8, 0.95, 7, 5)
    assert data["environment"]["dtype"] == "fp32" and cfg["reference"] == "vanilla"  # CPU default; no static baseline
    assert [r["prompts"] for r in data["per_prompt"]["vanilla"]] == [[0, 1], [2]]
    assert data["methods"]["aded(datastore=null)"]["token_match"] is None
    md = (out / "results.md").read_text()
    assert "batch 2 (rows of 2 prompts, left padded)" in md and "top-k 7, seed 5" in md


def test_hf_static_prompt_lookup_runs_where_transformers_allows_it_else_is_skipped_with_the_reason():
    model = tiny_model("llama")
    ps = _prompt_lists([9, 14, 6], seed=3)
    specs, skipped = bm.parse("hf-pld+static,vanilla-static", "cpu", None)
    reason = bm.hf_static_assisted_reason()
    if reason is not None:  # transformers < 5.24
        assert skipped == [("hf-pld+static", reason)] and "5.24" in reason
        return
    assert [s.label for s in specs] == ["vanilla", "hf-pld+static", "vanilla-static"] and not skipped
    assert bm.generate_kwargs(specs[1], None, bm.Settings(max_cache_len=26))["max_cache_len"] == 26 + bm.ASSISTED_HEADROOM
    run = run_bench(model, ps, specs, max_new_tokens=12, pad_token_id=PAD, progress=False, with_nll=False)
    assert not run["skipped"] and run["max_cache_len"] == 14 + 12
    for label in ("hf-pld+static", "vanilla-static"):
        assert all(r.exact_match for r in run["records"][label])
    # each static baseline kept its own cache size: vanilla-static's fixed one, not prompt lookup's larger one
    kv = {label: {r.kv_cache_bytes for r in recs} for label, recs in run["records"].items()}
    assert len(kv["vanilla-static"]) == 1 and max(kv["vanilla-static"]) < min(kv["hf-pld+static"])


def test_all_and_all_static_mix_with_entries():
    specs, skipped = bm.parse("all,all+static,aded(max_nodes=16)+static", "cpu", None)
    labels = [s.label for s in specs]
    assert labels[0] == "vanilla" and "aded" in labels and "aded+static" in labels
    assert labels[-1] == "aded(max_nodes=16)+static" and len(set(labels)) == len(labels)
    assert all(s.static for s in specs if s.label.endswith("+static"))
    reasons = dict(skipped)
    assert "hf-accel train clover" in reasons["clover+static"]  # no artifact: skipped as in 'all'
    for name in bm.registry.available():  # a method the static engine refuses is skipped with its reason
        why = bm.registry.get(name).static_refusal({})
        if why and not bm.registry.get(name).missing_artifacts(None, {}):
            assert reasons[f"{name}+static"] == why


def _bench_cli_setup(tmp_path, word_tokenizer, n=5):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("\n".join(json.dumps({"text": " ".join(f"w{(5 * i + j) % 40 + 3}" for j in range(6 + i))})
                               for i in range(n)) + "\n")
    return ["bench", "--model", str(tmp_path / "m"), "--methods", "aded(datastore=null)", "--prompts", str(pfile),
            "--limit", str(n), "--max-new-tokens", "5", "--device", "cpu", "--out", str(tmp_path / "out"),
            "--no-progress", "--no-nll"]


def test_a_bench_killed_in_its_third_row_leaves_the_first_two_rows_report(tmp_path, word_tokenizer, monkeypatch,
                                                                           capsys):
    from hf_accel.bench import runner

    argv = _bench_cli_setup(tmp_path, word_tokenizer)
    real = runner.run_once

    def run_once(*a, **kw):  # the timed generate call of the third row fails (warm-up calls pass no prompt_ids)
        if kw.get("prompt_ids") is not None and kw.get("prompt_index") == 2:
            raise RuntimeError("killed in row 3")
        return real(*a, **kw)

    monkeypatch.setattr(runner, "run_once", run_once)
    with pytest.raises(RuntimeError, match="killed in row 3"):
        cli.main(argv)
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["progress"] == {"rows_done": 2, "rows": 5, "partial": True}
    labels = ["vanilla", "aded(datastore=null)"]
    assert list(data["methods"]) == labels and list(data["per_prompt"]) == labels
    for label in labels:
        m = data["methods"][label]
        assert m["rows"] == 2 and len(m["new_tokens_per_row"]) == 2 and m["tok_s"] > 0
        assert [r["prompt"] for r in data["per_prompt"][label]] == [0, 1]
    assert data["methods"]["aded(datastore=null)"]["token_match"] == pytest.approx(1.0)  # compared per row
    md = (out / "results.md").read_text()
    assert "partial: 2 of 5 rows" in md and "| aded(datastore=null) |" in md
    assert not list(out.glob("*.png")) and not list(out.glob("*.tmp"))  # plots only at the end; renames done
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("row ")]
    assert [line.split(":")[0] for line in rows] == ["row 1/5", "row 2/5"]
    assert "vanilla " in rows[0] and "aded(datastore=null) " in rows[0] and rows[0].endswith("tok/s")


def test_a_finished_bench_report_has_no_partial_line(tmp_path, word_tokenizer):
    argv = _bench_cli_setup(tmp_path, word_tokenizer, n=3)
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "progress" not in data and data["methods"]["vanilla"]["rows"] == 3
    assert "partial" not in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "speedup.png").exists()


def test_the_report_records_the_graphed_widths_when_set(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.delenv("HF_ACCEL_GRAPH_WIDTHS", raising=False)
    assert report.environment(model, "fp32", "cmd")["graph_widths"] is None
    monkeypatch.setenv("HF_ACCEL_GRAPH_WIDTHS", "8,16,32,64")
    assert report.environment(model, "fp32", "cmd")["graph_widths"] == "8,16,32,64"
