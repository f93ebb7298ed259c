"""Prompt text to token ids, through the chat template where the tokenizer has one."""

from __future__ import annotations


def encode(tokenizer, text: str, chat: bool) -> list:
    """Token ids of ``text``: as a user turn through the chat template (when ``chat`` and the tokenizer has
    one), else tokenized as is."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]
