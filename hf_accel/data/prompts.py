"""Bench prompts: MT-Bench first turns, or a user's JSONL file, as lists of token ids."""

from __future__ import annotations

import json
from pathlib import Path

from . import mtbench
from .chat import encode  # noqa: F401  (re-exported: data.prompts.encode)


def load(source: str, tokenizer, start: int = 0, limit: int | None = None) -> list:
    """``source`` is ``mtbench`` or a .jsonl path whose lines hold ``{"prompt": ...}`` (sent through the chat
    template when the tokenizer has one) or ``{"text": ...}`` (tokenized as is)."""
    if source == "mtbench":
        return mtbench.prompts(tokenizer, start=start, limit=limit)
    path = Path(source)
    if not path.exists():
        raise ValueError(f"--prompts {source!r}: not 'mtbench' and no such file")
    out = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                out.append(encode(tokenizer, obj["prompt"], chat=True))
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                out.append(encode(tokenizer, obj["text"], chat=False))
            else:
                raise ValueError(f'{path}:{n}: each line needs a "prompt" or "text" string')
    out = out[start:]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise ValueError(f"--prompts {source!r}: no prompts left after --start/--limit")
    return out
