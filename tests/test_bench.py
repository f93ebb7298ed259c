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


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown bench method 'nope'"),
        ("aded(max_nodez=3)", "max_nodez"),
        ("aded(max_nodes)", "write key=value"),
        ("aded(max_nodes=3", "unbalanced"),
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


def test_runner_counts_forwards_and_checks_outputs(bench_run):
    model, ps, specs, run = bench_run
    recs = run["records"]
    assert set(recs) == {s.label for s in specs} and all(len(v) == len(ps) for v in recs.values())
    for r in recs["vanilla"]:
        # vanilla: the prefill yields the first token, then one forward per token
        assert r.target_forwards == r.new_tokens and r.verify_width == 1.0
        assert r.tokens_per_forward == 1.0 and r.accepted_per_forward == 0.0
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
