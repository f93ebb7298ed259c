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
        return models.logits_from_hidden(self.model, picked).argmax(-1)

    @torch.no_grad()
    def draft(self, rows: list, k: int) -> list:
        """Greedy chains of ``k`` tokens after each active row's last token (None for inactive rows)."""
        batch = len(rows)
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
        nxt = self._forward(tokens.to(dev), pos.to(dev), valid.to(dev), causal, last.to(dev))
        for b, c in enumerate(chunks):
            self.done[b] += len(c)
        committed = self.slots.length
        active = torch.tensor([r is not None for r in rows], dtype=torch.bool, device=dev)[:, None]
        cur = torch.tensor([self.done[b] for b in range(batch)], device=dev)[:, None]
        out = [nxt]
        one = torch.ones(batch, 1, 1, dtype=torch.bool, device=dev)
        zero = torch.zeros(batch, dtype=torch.long, device=dev)
        for j in range(1, k):
            nxt = self._forward(out[-1][:, None], cur + j - 1, active, one, zero)
            out.append(nxt)
        self.slots.truncate(committed)
        drafts = torch.stack(out, 1).tolist()
        return [drafts[b] if rows[b] is not None else None for b in range(batch)]


__all__ = ["Follower"]
