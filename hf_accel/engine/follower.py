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

``verify_tree(rows, trees)`` is the intermediate level of a hierarchy (quant_spec): the follower checks a draft tree
in one forward (catch-up + tree attention) and returns its own greedy continuation as far as the tree agrees, plus its
next token. Inside a *section* (``open_section()`` ... ``close_section()``) a follower may be fed tokens that are not
committed yet (a draft it builds on over several rounds); closing the section drops everything after the tokens that
were committed when it opened.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from .. import models
from .cache import SlotCache
from .tree import attention_masks, pack
from .verify import greedy_walk


class Follower:
    def __init__(self, model, batch: int, device, mask_dtype, context=None):
        self.model = model
        self.layout = models.attention_layout(model)
        self.mask_dtype = mask_dtype
        self.device = device
        self.slots = SlotCache(DynamicCache(), batch, device)
        self.done = [0] * batch  # tokens of each row already in the cache
        self.context = context or contextlib.nullcontext
        self.forwards = 0
        self.tokens = 0  # tokens fed, padding excluded (compute estimates)
        self._section = None  # None, or [None | (start slot, chunk lengths, done before)] while a section is open

    def _forward(self, tokens, q_pos, q_valid, visible, last):
        """Logits (B, V) at query index ``last[b]`` of every row, or (B, M, V) when ``last`` is (B, M)."""
        masks = attention_masks(self.layout, self.slots.valid, self.slots.pos, q_pos, q_valid, visible, self.mask_dtype)
        with self.context():
            hidden = models.decoder(self.model)(
                input_ids=tokens, attention_mask=masks, position_ids=q_pos, past_key_values=self.slots.cache,
                use_cache=True,
            ).last_hidden_state
        self.slots.append(q_valid, q_pos)
        self.forwards += 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, last] if last.dim() == 1 else hidden[rows[:, None], last]
        return models.logits_from_hidden(self.model, picked).float()

    def _chunks(self, rows: list) -> list:
        """Each active row's tokens not yet in the cache (its root last); records where a section's committed
        tokens end when this is the section's first forward."""
        chunks = [row.tokens[self.done[b] :] if row is not None else [] for b, row in enumerate(rows)]
        if any(r is not None and not c for r, c in zip(rows, chunks)):
            raise RuntimeError("Follower: a row's last token is already in the cache (rows must grow between calls)")
        if self._section is not None and self._section[0] is None:
            self._section[0] = (self.slots.length, [len(c) for c in chunks], list(self.done))
        return chunks

    def open_section(self) -> None:
        """Tokens fed from now on may be uncommitted; the first forward's catch-up (the rows' tokens as given to it)
        is what stays at ``close_section``."""
        self._section = [None]

    def close_section(self) -> None:
        """Drop every slot fed since the section's first forward except that forward's catch-up chunk without its
        last token (the root: as after ``run``, a row's last token is fed by the next call)."""
        mark, self._section = self._section[0] if self._section else None, None
        if mark is None:
            return
        start, lens, done = mark
        lens = [max(0, n - 1) for n in lens]
        width = max(lens) if lens else 0
        dev = self.device
        index = torch.arange(width, device=dev)[None].expand(len(lens), -1)
        keep = index < torch.tensor(lens, device=dev)[:, None]
        self.slots.keep(start, index.contiguous(), keep)
        self.done = [d + n for d, n in zip(done, lens)]

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
        chunks = self._chunks(rows)
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
        self.tokens += sum(len(c) for c in chunks)
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
            self.tokens += sum(live)
            for b in range(batch):
                if live[b]:
                    self.done[b] += 1
        if not keep:  # keep no appended slot: the cache is cropped back to the committed tokens
            none = torch.zeros(batch, 0, dtype=torch.long, device=dev)
            self.slots.keep(committed, none, none.bool())
            self.done = done_before
        return out

    @torch.no_grad()
    def verify_tree(self, rows: list, trees: list) -> list:
        """Check each active row's draft tree (node 0 = the row's last token) with this model in one forward that also
        catches up. Returns, per active row, this model's greedy continuation: the tree's tokens along its greedy path,
        then its own next token (None for inactive rows). The accepted nodes' KV stays (they count as fed); the
        rejected nodes' is dropped."""
        batch = len(rows)
        chunks = self._chunks(rows)
        sizes = [len(c) + (len(trees[b]) - 1 if rows[b] is not None else 0) for b, c in enumerate(chunks)]
        width = max(1, max(sizes))
        nodes = max(1, max(len(t) for t, r in zip(trees, rows) if r is not None) if any(r is not None for r in rows) else 1)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        pos = torch.zeros(batch, width, dtype=torch.long)
        visible = torch.zeros(batch, width, width, dtype=torch.bool)
        picks = torch.zeros(batch, nodes, dtype=torch.long)
        for b, c in enumerate(chunks):
            n0 = self.done[b]
            pos[b] = n0 + torch.arange(width)
            if rows[b] is None:
                continue
            tree, m = trees[b], len(c)
            if tree.tokens[0] != c[-1]:
                raise ValueError("a draft tree's root must be the row's last token")
            n, packed = len(tree), pack([tree], [True], 0, "cpu")  # the engine's tree tensors (depths, ancestry)
            tokens[b, :m] = torch.tensor(c)
            tokens[b, m : m - 1 + n] = packed.tokens[0, 1:]
            valid[b, : sizes[b]] = True
            pos[b, m - 1 : m - 1 + n] = n0 + m - 1 + packed.depths[0]
            visible[b, :m, :m] = torch.ones(m, m, dtype=torch.bool).tril()
            visible[b, m:, :m] = True  # tree nodes see the whole catch-up chunk ...
            visible[b, m - 1 : m - 1 + n, m - 1 : m - 1 + n] = packed.ancestors[0]  # ... and their ancestors
            picks[b, :n] = m - 1 + torch.arange(n)
        dev = self.device
        start = self.slots.length
        logits = self._forward(tokens.to(dev), pos.to(dev), valid.to(dev), visible.to(dev), picks.to(dev))
        self.tokens += sum(sizes)
        choice = logits.argmax(-1).tolist()
        out, kept = [None] * batch, []
        for b, c in enumerate(chunks):
            if rows[b] is None:
                kept.append([])
                continue
            path, bonus = greedy_walk(trees[b], choice[b])
            path = path[1:]  # accepted nodes, root excluded
            out[b] = [trees[b].tokens[i] for i in path] + [bonus]
            kept.append(list(range(len(c))) + [len(c) - 1 + i for i in path])
            self.done[b] += len(c) + len(path)
        k = max(len(x) for x in kept)
        index = torch.zeros(batch, k, dtype=torch.long)
        keep = torch.zeros(batch, k, dtype=torch.bool)
        for b, x in enumerate(kept):
            index[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            keep[b, : len(x)] = True
        self.slots.keep(start, index.to(dev), keep.to(dev))
        return out


__all__ = ["Follower"]
