"""The sampler draws from the distribution its parameters define: chi-square tests against a
float64 reference over thousands of draws on a small vocabulary, and exact penalty arithmetic."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from meshserve.layers.sampler import Sampler, SamplingBatch

V = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def reference_probs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """float64, HF order: temperature, top-k, top-p, min-p."""
    x = LOGITS.double().numpy() / temperature
    order = np.argsort(-x)
    keep = np.ones(V, dtype=bool)
    if top_k:
        keep[order[top_k:]] = False
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if top_p < 1.0:
        sorted_p = p[order]
        before = np.cumsum(sorted_p) - sorted_p
        drop = before >= top_p
        drop[0] = False
        keep[order[drop]] = False
        p = p * keep
        p /= p.sum()
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0.0)
        p /= p.sum()
    return p


def draw(n_rows: int, rounds: int, **kw) -> np.ndarray:
    sampler = Sampler(torch.device("cpu"), seed=1234)
    counts = np.zeros(V)
    for _ in range(rounds):
        b = SamplingBatch(temperature=torch.full((n_rows,), kw.get("temperature", 1.0)))
        if kw.get("top_k"):
            b.top_k, b.max_top_k = torch.full((n_rows,), kw["top_k"]), kw["top_k"]
        if kw.get("top_p", 1.0) < 1.0:
            b.top_p = torch.full((n_rows,), kw["top_p"])
        if kw.get("min_p"):
            b.min_p = torch.full((n_rows,), kw["min_p"])
        tokens, _ = sampler(LOGITS.repeat(n_rows, 1), b)
        counts += np.bincount(tokens.numpy(), minlength=V)
    return counts


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=1.2, min_p=0.1),
    dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_draws_match_reference_distribution(kw):
    counts = draw(2000, 10, **kw)
    p = reference_probs(**kw)
    assert counts[p == 0].sum() == 0, f"sampled tokens the reference excludes: {counts}"
    support = p > 0
    if support.sum() > 1:
        stat, pvalue = chisquare(counts[support], counts.sum() * p[support])
        assert pvalue > 1e-3, f"chi-square p={pvalue:.2e}: counts {counts} vs expected {counts.sum() * p}"


def test_greedy_rows_take_argmax_among_random_rows():
    sampler = Sampler(torch.device("cpu"))
    b = SamplingBatch(temperature=torch.tensor([0.0, 1.0, 0.0]))
    logits = torch.randn(3, 50)
    tokens, _ = sampler(logits, b)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 100)
    s1, s2 = Sampler(torch.device("cpu"), seed=1), Sampler(torch.device("cpu"), seed=2)
    b1 = SamplingBatch(temperature=torch.ones(4), seeded_rows=[(2, 77)])
    b2 = SamplingBatch(temperature=torch.ones(1), seeded_rows=[(0, 77)])
    t1, _ = s1(logits, b1)
    t2, _ = s2(logits[2:3], b2)
    assert t1[2] == t2[0]


def test_penalties_match_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    out_tokens = [[1, 1, 3], [4]]
    prompt_tokens = [[5, 6], [1]]
    rp, pp, fp = torch.tensor([1.3, 0.8]), torch.tensor([0.5, -0.2]), torch.tensor([0.25, 1.0])
    counts = torch.zeros(2, 10)
    seen = torch.zeros(2, 10, dtype=torch.bool)
    for r in range(2):
        for t in out_tokens[r]:
            counts[r, t] += 1
        seen[r, out_tokens[r] + prompt_tokens[r]] = True
    b = SamplingBatch(temperature=torch.zeros(2), all_greedy=True, repetition_penalty=rp, presence_penalty=pp,
                      frequency_penalty=fp, output_counts=counts, seen_mask=seen)
    got = Sampler(torch.device("cpu"))._apply_penalties(logits, b)
    ref = logits.double().clone()
    for r in range(2):
        for t in range(10):
            if seen[r, t]:
                ref[r, t] = ref[r, t] / rp[r] if ref[r, t] > 0 else ref[r, t] * rp[r]
            c = out_tokens[r].count(t)
            ref[r, t] -= fp[r] * c + pp[r] * (c > 0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_logprobs_are_raw_log_softmax_with_chosen_first():
    logits = torch.randn(3, 20)
    b = SamplingBatch(temperature=torch.zeros(3), all_greedy=True, max_num_logprobs=4,
                      logit_bias=torch.zeros(3, 20).index_fill_(1, torch.tensor([7]), 50.0))
    tokens, (ids, vals, ranks) = Sampler(torch.device("cpu"))(logits, b)
    assert (tokens == 7).all()  # the bias moved the choice, not the reported logprobs
    ref = torch.log_softmax(logits.double(), -1)
    assert (ids[:, 0] == 7).all()
    torch.testing.assert_close(vals[:, 0].double(), ref[:, 7], rtol=0, atol=1e-5)
    top = ref.topk(4, dim=-1)
    assert torch.equal(ids[:, 1:], top.indices)
    # the chosen token's place in the vocabulary by the raw distribution (vLLM's rank), not 1
    assert ranks.tolist() == ((ref > ref[:, 7:8]).sum(1) + 1).tolist()


@pytest.mark.parametrize("max_k", [1, 7, 50])
def test_top_p_within_top_k_equals_the_full_sort(max_k):
    """The top-k-bounded top-p (one topk of the batch's largest k, no vocabulary sort) keeps exactly
    the tokens the full-sort path keeps, row by row, for mixed k and p (float64 cut-offs)."""
    g = torch.Generator().manual_seed(max_k)
    B, vocab = 16, 1000
    logits = torch.randn(B, vocab, generator=g, dtype=torch.float64) * 3
    top_k = torch.randint(1, max_k + 1, (B,), generator=g)
    top_k[0] = max_k
    top_p = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05
    fast = Sampler._top_p_within_top_k(logits, top_k, top_p, max_k)
    full = Sampler._top_k_top_p(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(full))
    assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(fast)])
    # and against an independent float64 loop: keep the smallest prefix of the k best whose mass
    # before the token is < p, within the top-k renormalised distribution
    for r in range(B):
        order = torch.argsort(logits[r], descending=True)[: int(top_k[r])]
        p = torch.softmax(logits[r, order], dim=0)
        before = torch.cumsum(p, 0) - p
        keep = order[(before < top_p[r]) | (torch.arange(len(order)) == 0)]
        expect = torch.zeros(vocab, dtype=torch.bool)
        expect[keep] = True
        assert torch.equal(torch.isfinite(fast[r]), expect), r


def test_sampler_takes_the_top_k_bounded_path_only_when_every_row_has_a_top_k(monkeypatch):
    calls = []
    real = Sampler._top_p_within_top_k
    monkeypatch.setattr(Sampler, "_top_p_within_top_k",
                        staticmethod(lambda *a: calls.append("bounded") or real(*a)))
    sampler = Sampler(torch.device("cpu"), seed=0)
    logits = torch.randn(3, 100)
    b = SamplingBatch(temperature=torch.ones(3), top_k=torch.tensor([5, 3, 100]), max_top_k=100,
                      top_p=torch.full((3,), 0.9))
    sampler(logits, b)  # one row without top-k (k = vocab): the full sort
    assert calls == []
    b.top_k, b.max_top_k = torch.tensor([5, 3, 8]), 8
    tokens, _ = sampler(logits, b)
    assert calls == ["bounded"]
    ranks = logits.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of every token per row
    assert all(int(ranks[r, tokens[r]]) < int(b.top_k[r]) for r in range(3))


def test_all_greedy_takes_the_argmax_in_the_model_dtype():
    """The all-greedy fast path skips the fp32 copy: same ids as the argmax of the fp32 logits,
    ties included (bf16 has many), first maximal index as torch documents."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 1000, generator=g) * 4).to(torch.bfloat16)
    logits[1, 10] = logits[1, 500] = logits[1].max() + 1  # an exact tie
    tokens, lp = Sampler(torch.device("cpu"))(logits, SamplingBatch(temperature=torch.zeros(6), all_greedy=True))
    assert lp is None and tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.float().argmax(dim=-1)) and tokens[1] == 10
