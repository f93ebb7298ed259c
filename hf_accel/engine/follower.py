"""A model that follows a request's committed tokens with its own KV cache and drafts greedy chains from them.

For drafters that are themselves a (partial) causal LM: M2R2's accelerated stream (the target's lower layers),
a small draft model. Each ``draft(rows, k)``:

1. catches up, in one forward, the tokens each row committed since the last call (per-row counts differ: the
   chunk is right-padded and padding slots are masked out, as in the engine's SlotCache);
2. drafts ``k`` tokens per row greedily (the first from the catch-up forward, then one forward per token);
3. drops the drafted tokens' KV again, so the cache holds exactly the committed tokens.

Masks and logical positions are built like the engine's (engine/tree.attention_masks), so padding, sliding
windows and batch > 1 behave the same. ``context`` (optional) is entered around every forward: M2R2 uses it to
route the layers through its control.
"""

from __future__ import annotations

import contextlib

import torch

from .. import models
from .cache import SlotCache, new_cache
from .tree import attention_masks


class Follower:
    def __init__(self, model, batch: int, device, mask_dtype, context=None):
        self.model = model
        self.layout = models.attention_layout(model)
        self.mask_dtype = mask_dtype
        self.device = device
        self.slots = SlotCache(new_cache(), batch, device)
        self.done = [0] * batch  # tokens of each row already in the cache
        self.context = context or contextlib.nullcontext
        self.forwards = 0

    def _forward(self, tokens, q_pos, q_valid, visible, last):
        masks = attention_masks(self.layout, self.slots.valid, self.slots.pos, q_pos, q_valid, visible, self.mask_dtype)
        with self.context():
            hidden = models.decoder(self.model)(
                input_ids=tokens, attention_mask=masks, position_ids=q_pos, past_key_values=self.slots.cache,
                use_cache=True,
            ).last_hidden_state
        self.slots.append(q_valid, q_pos)
        self.forwards += 1
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return models.logits_from_hidden(self.model, picked).float()

    @torch.no_grad()
    def draft(self, rows: list, k: int) -> list:
        """Greedy chains of ``k`` tokens after each active row's last token (None for inactive rows); the drafted
        tokens' KV is dropped again."""
        return self.run(rows, lambda b, logits: (int(logits.argmax()), True), k, keep=False)

    @torch.no_grad()
    def run(self, rows: list, choose, limit, keep: bool = True) -> list:
        """Tokens after each active row's last token (None for inactive rows), one forward per token after the
        catch-up. ``choose(b, logits (V,)) -> (token, go_on)`` picks row b's next token from this model's logits;
        a row stops after a token with ``go_on`` False or after ``limit`` tokens (an int, or one per row).
        ``keep``: the generated tokens' KV stays (they are about to be committed as they are; the last one, never
        fed, is caught up next time); else it is dropped."""
        batch = len(rows)
        limits = [limit] * batch if isinstance(limit, int) else list(limit)
        chunks = [row.tokens[self.done[b] :] if row is not None else [] for b, row in enumerate(rows)]
        width = max(1, max(len(c) for c in chunks))
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        pos = torch.zeros(batch, width, dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for b, c in enumerate(chunks):
            if c:
                tokens[b, : len(c)] = torch.tensor(c)
                valid[b, : len(c)] = True
                last[b] = len(c) - 1
            pos[b] = self.done[b] + torch.arange(width)
        dev = self.device
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()[None].expand(batch, -1, -1)
        logits = self._forward(tokens.to(dev), pos.to(dev), valid.to(dev), causal, last.to(dev))
        for b, c in enumerate(chunks):
            self.done[b] += len(c)
        committed, done_before = self.slots.length, list(self.done)
        out = [[] if r is not None else None for r in rows]
        live = [r is not None and limits[b] > 0 for b, r in enumerate(rows)]
        one = torch.ones(batch, 1, 1, dtype=torch.bool, device=dev)
        zero = torch.zeros(batch, dtype=torch.long, device=dev)
        while True:
            feed = torch.zeros(batch, dtype=torch.long)
            for b in range(batch):
                if live[b]:
                    tok, go_on = choose(b, logits[b])
                    out[b].append(tok)
                    feed[b] = tok
                    live[b] = go_on and len(out[b]) < limits[b]
            if not any(live):
                break
            q_valid = torch.tensor(live, dtype=torch.bool, device=dev)[:, None]
            q_pos = torch.tensor([self.done[b] for b in range(batch)], device=dev)[:, None]
            logits = self._forward(feed[:, None].to(dev), q_pos, q_valid, one, zero)
            for b in range(batch):
                if live[b]:
                    self.done[b] += 1
        if not keep:  # keep no appended slot: the cache is cropped back to the committed tokens
            none = torch.zeros(batch, 0, dtype=torch.long, device=dev)
            self.slots.keep(committed, none, none.bool())
            self.done = done_before
        return out


__all__ = ["Follower"]
