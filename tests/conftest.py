"""Tiny random models of every family in the matrix, built offline from configs, and shared helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hf_accel  # noqa: E402,F401
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

VOCAB = 96
PAD, EOS, BOS = 0, 1, 2

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, tie_word_embeddings=False)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.25,
)

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", **_DECODER),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1, **_DECODER),
    "qwen3": dict(model_type="qwen3", head_dim=8, **_DECODER),
    "mistral": dict(model_type="mistral", sliding_window=7, head_dim=8, **_DECODER),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=8,
        sliding_window=5,
        query_pre_attn_scalar=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        **_DECODER,
    ),
    "phi3": dict(model_type="phi3", **_DECODER),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=512, initializer_range=0.25),
    "opt": dict(
        model_type="opt",
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
        init_std=0.25,
    ),
}
FAMILIES = list(FAMILY_CONFIGS)


def _copy_into(dst, src):
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class EagerGraph:
    """A captured CUDA graph's stand-in on CPU: ``replay`` runs the recorded function again and writes its results
    into the outputs of the capture (a caller keeping a view of them sees them overwritten, as on a GPU; a request
    that filled other tensors than the ones the capture read gets the capture's values)."""

    def __init__(self, fn):
        from hf_accel.engine import capture

        self.fn = fn
        with capture.CAPTURE_LOCK:  # as engine/capture.record
            self.out = fn()
        self.replays = 0

    def pool(self):
        return None

    def replay(self):
        from hf_accel.engine import capture

        self.replays += 1
        # a GPU replay runs no Python (checks no dynamo guard): here the recorded (maybe compiled) function runs
        # again, so not while another thread's capture compiles (see engine/capture.CAPTURE_LOCK)
        with capture.CAPTURE_LOCK:
            _copy_into(self.out, self.fn())


def eager_graphs(monkeypatch, compile_backend: str | None = None) -> list:
    """Turn the static engine's graph path on for CPU, with :class:`EagerGraph` behind the one capture entry point
    (engine/capture.record); returns the list of graphs recorded from then on. Layer plans' and static followers'
    steps are compiled before their capture on a GPU: here not at all (``compile_backend`` None), or through dynamo with that backend and
    ``fullgraph=True`` (e.g. "aot_eager": no C++ build; a graph break is an error)."""
    from hf_accel.engine import backends, capture, follower, plans, sampling

    for mod in (plans, follower, sampling):  # the layer plans', static followers' and samplers' captured steps
        if compile_backend is None:
            monkeypatch.setattr(mod, "compiled_copy", lambda fn, options, name: fn)
        else:
            opts = (("backend", compile_backend), ("fullgraph", True))
            monkeypatch.setattr(mod, "compiled_copy", lambda fn, options, name: backends.compiled_copy(fn, opts, name))
    records = []

    def record(fn, device, warmup=2, pool=None):
        g = EagerGraph(fn)
        records.append(g)
        return g, g.out

    monkeypatch.setattr(capture, "graphs_supported", lambda device: True)
    monkeypatch.setattr(capture, "record", record)
    return records


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB, layers: int | None = None, **overrides):
    spec = dict(FAMILY_CONFIGS[family])
    mt = spec.pop("model_type")
    spec.update(_COMMON)
    spec["vocab_size"] = vocab
    if layers is not None:
        spec["n_layer" if family == "gpt2" else "num_hidden_layers"] = layers
    spec.update(overrides)
    attn = "eager" if family == "gemma2" else "sdpa"
    cfg = AutoConfig.for_model(mt, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model


def prompts(lengths, seed: int = 0, vocab: int = VOCAB):
    """Left-padded batch of prompts with some repetition inside (so drafts get accepted too)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        base = torch.randint(3, vocab, (max(2, n // 2),), generator=g).tolist()
        rows.append((base * 3)[:n])
    width = max(lengths)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def train_seqs(n=24, length=40, seed=0):
    """Token sequences with repetition inside (learnable in a few steps), for training-harness tests."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(3, VOCAB, (8,), generator=g).tolist()
        out.append((base * 6)[: length - int(torch.randint(0, 10, (1,), generator=g))])
    return out


@pytest.fixture(scope="session")
def word_tokenizer():
    """A WordLevel tokenizer over the tiny vocabulary: token i <-> word 'w{i}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.padding_side = "left"
    return tok
