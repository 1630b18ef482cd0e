"""fastkd.kd_stats / sparse_kd_stats against formulas written out in float64 (docs/diagnostics.md)."""
import math

import pytest
import torch

import fastkd
from fastkd.stats import KDStats, SparseKDStats, kd_stats, sparse_kd_stats


def _transform(x, scale=1.0, cap=None):
    x = x.double() * scale
    return x if cap is None else cap * torch.tanh(x / cap)


def _entropy64(logits, T):
    p = torch.softmax(logits / T, dim=-1)
    return -(p * torch.log(p)).sum(-1)  # no zero probabilities in these cases


def _kl64(t, s, T):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    return (p * (p.log() - q.log())).sum(-1)


def _pair(shape=(5, 11), V=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (3 * torch.randn(shape, generator=g)).to(dtype)
    t = (3 * torch.randn(shape, generator=g)).to(dtype)
    return s, t


def test_fields_against_float64_formulas():
    s, t = _pair()
    r = kd_stats(s, t, temperature=2.0)
    assert isinstance(r, KDStats)
    S, Tt = s.double(), t.double()
    torch.testing.assert_close(r.teacher_entropy.double(), _entropy64(Tt, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.student_entropy.double(), _entropy64(S, 2.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.divergence.double(), _kl64(Tt, S, 2.0), rtol=1e-5, atol=1e-6)
    assert torch.equal(r.top1_agree, S.argmax(-1) == Tt.argmax(-1))
    assert r.valid.all()
    assert r.teacher_entropy.dtype == torch.float32 and r.top1_agree.dtype == torch.bool


def test_agreement_happens_and_fails():
    # A case where some tokens agree and some do not, so the comparison is not vacuous.
    s, t = _pair((40, 7), seed=3)
    t[:20] = s[:20] + 0.01 * torch.randn(20, 7)
    r = kd_stats(s, t)
    assert r.top1_agree[:20].all() and not r.top1_agree.all()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_is_kd_loss_unweighted(divergence):
    s, t = _pair(dtype=torch.float64)
    labels = torch.arange(5)  # alpha < 1 needs labels, as in kd_loss; alpha does not weigh D here
    r = kd_stats(s, t, labels, divergence=divergence, temperature=1.5, beta=0.3, alpha=0.7)
    ref = fastkd.reference.kd_loss(s, t, divergence=divergence, temperature=1.5, beta=0.3, t_squared=False,
                                   reduction="none")
    torch.testing.assert_close(r.divergence, ref, rtol=1e-12, atol=1e-12)


def test_vocab_size_padding_ignores_extra_columns():
    s, t = _pair((4, 9), dtype=torch.float64)
    pad_s = torch.cat([s, torch.full((4, 3), 50.0, dtype=torch.float64)], -1)  # huge: would win argmax
    pad_t = torch.cat([t, torch.full((4, 5), 50.0, dtype=torch.float64)], -1)
    r = kd_stats(pad_s, pad_t, vocab_size=9)
    torch.testing.assert_close(r.teacher_entropy, _entropy64(t, 1.0))
    torch.testing.assert_close(r.student_entropy, _entropy64(s, 1.0))
    assert torch.equal(r.top1_agree, s.argmax(-1) == t.argmax(-1))
    torch.testing.assert_close(r.divergence, _kl64(t, s, 1.0))


def test_logit_options_change_entropies_as_the_reference_says():
    s, t = _pair((6, 13), dtype=torch.float64)
    s, t = 10 * s, 10 * t  # large enough for a cap of 5 to matter
    kw = dict(softcap=5.0, logit_scale=0.7, teacher_softcap=8.0, teacher_logit_scale=1.3, temperature=1.5)
    r = kd_stats(s, t, **kw)
    s2, t2 = _transform(s, 0.7, 5.0), _transform(t, 1.3, 8.0)
    torch.testing.assert_close(r.student_entropy, _entropy64(s2, 1.5))
    torch.testing.assert_close(r.teacher_entropy, _entropy64(t2, 1.5))
    torch.testing.assert_close(r.divergence, _kl64(t2, s2, 1.5))
    plain = kd_stats(s, t, temperature=1.5)
    assert (r.student_entropy - plain.student_entropy).abs().max() > 0.1  # the cap did change them
    ref = fastkd.reference.kd_loss(s, t, t_squared=False, reduction="none", **kw)
    torch.testing.assert_close(r.divergence, ref)


def test_ties_take_the_first_index():
    V = 6
    t = torch.zeros(3, V, dtype=torch.float64)
    t[:, 1] = t[:, 3] = 2.0  # teacher ties between columns 1 and 3: its argmax is 1
    s = torch.zeros(3, V, dtype=torch.float64)
    s[0, 1] = 2.0            # student's max at 1: agrees
    s[1, 3] = 2.0            # student's max at 3: does not (3 is the teacher's second maximum)
    s[2, 1] = s[2, 3] = 1.0  # student ties too: first index 1 on both sides, agrees
    assert kd_stats(s, t).top1_agree.tolist() == [True, False, True]


def test_ignored_tokens_are_nan_and_not_valid():
    s, t = _pair((2, 4, 8))
    labels = torch.tensor([[1, -100, 2, 3], [-100, 0, 5, -100]])
    r = kd_stats(s, t, labels)
    ignored = labels == -100
    assert torch.equal(r.valid, ~ignored)
    for x in (r.teacher_entropy, r.student_entropy, r.divergence):
        assert torch.isnan(x[ignored]).all() and torch.isfinite(x[~ignored]).all()
    assert not r.top1_agree[ignored].any()
    full = kd_stats(s, t)
    torch.testing.assert_close(r.teacher_entropy[~ignored], full.teacher_entropy[~ignored])
    r7 = kd_stats(s, t, torch.where(ignored, 7, labels), ignore_index=7)
    assert torch.equal(r7.valid, ~ignored)


def test_chunking_invariance():
    s, t = _pair((37, 29))
    labels = torch.arange(37) % 5 - 1
    labels[labels == -1] = -100
    big = kd_stats(s, t, labels, chunk_size=4096, divergence="jsd")
    for chunk in (1, 4, 36):
        small = kd_stats(s, t, labels, chunk_size=chunk, divergence="jsd")
        for a, b in zip(small, big):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _largest_allocation(fn) -> int:
    """The largest CPU allocation (bytes) of any one operator while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_no_float32_tokens_by_vocab_temporary_beyond_one_chunk():
    N, V, chunk = 512, 256, 16
    s, t = _pair((N, V), dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(V)[:8] for _ in range(N)])
    lp = torch.log_softmax(torch.randn(N, 8), -1)
    for call in (lambda c: kd_stats(s, t, chunk_size=c, softcap=3.0),
                 lambda c: sparse_kd_stats(s, ids, lp, chunk_size=c, softcap=3.0)):
        # Below one byte per logit: no [tokens, vocab] temporary of any float dtype (the largest
        # allocations left are one chunk's [16, V] and the id check's [N, K] sort).
        assert _largest_allocation(lambda: call(chunk)) < N * V
        # The measure can see a [tokens, vocab] float32 temporary: one chunk of all tokens has one.
        assert _largest_allocation(lambda: call(N)) >= N * V * 4


def test_bf16_and_3d_input():
    s, t = _pair((2, 3, 17), dtype=torch.bfloat16)
    r = kd_stats(s, t, temperature=2.0)
    assert r.teacher_entropy.shape == (2, 3) and r.teacher_entropy.dtype == torch.float32
    torch.testing.assert_close(r.teacher_entropy.double(), _entropy64(t.double(), 2.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.student_entropy.double(), _entropy64(s.double(), 2.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.divergence.double(), _kl64(t.double(), s.double(), 2.0), rtol=1e-5, atol=1e-5)


def test_no_graph_and_empty_input():
    s, t = _pair()
    s.requires_grad_(True)
    r = kd_stats(s, t)
    assert not r.divergence.requires_grad
    e = kd_stats(torch.zeros(0, 5), torch.zeros(0, 5))
    assert e.teacher_entropy.shape == (0,) and e.top1_agree.dtype == torch.bool


def test_errors():
    s, t = _pair()
    with pytest.raises(ValueError, match="one teacher"):
        kd_stats(s, [t, t])
    with pytest.raises(ValueError, match="one teacher"):
        kd_stats(s, torch.stack([t, t]))
    with pytest.raises(ValueError, match="chunk_size"):
        kd_stats(s, t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        kd_stats(s, t, chunk_size=2.5)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        kd_stats(s, t[:, :5])
    with pytest.raises(ValueError, match="softcap"):
        kd_stats(s, t, softcap=-1.0)
    with pytest.raises(TypeError, match="kd_stats"):
        kd_stats(s, t, nonsense=1)


# ---------------------------------------------------------------------------------------
# Sparse teachers.

def _sparse_case(N=6, V=12, K=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(N, V, generator=g)).to(dtype)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    full = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    lp = full.gather(-1, ids).to(dtype)
    return s, ids, lp


def test_sparse_fields_against_float64_formulas():
    s, ids, lp = _sparse_case()
    ids[0, 2] = -1  # an empty slot
    r = sparse_kd_stats(s, ids, lp, temperature=1.5, softcap=4.0)
    assert isinstance(r, SparseKDStats)
    s2 = _transform(s, 1.0, 4.0)
    q = torch.softmax(s2 / 1.5, -1)
    valid = ids >= 0
    safe = ids.clamp_min(0)
    P = torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1)
    Q = torch.where(valid, q.gather(-1, safe), torch.zeros_like(lp)).sum(-1)
    torch.testing.assert_close(r.teacher_mass, P)
    torch.testing.assert_close(r.student_mass, Q)
    torch.testing.assert_close(r.student_entropy, _entropy64(s2, 1.5))
    best = safe.gather(-1, torch.where(valid, lp, torch.full_like(lp, -math.inf)).argmax(-1, keepdim=True))
    assert torch.equal(r.top1_agree, s2.argmax(-1) == best.squeeze(-1))
    ref = fastkd.sparse_reference.sparse_kd_loss(s, ids, lp, temperature=1.5, softcap=4.0, t_squared=False,
                                                 reduction="none")
    torch.testing.assert_close(r.divergence, ref)


def test_sparse_agreement_ignored_chunks_and_errors():
    s, ids, lp = _sparse_case(N=8, seed=2)
    # Make the teacher's best id the student's argmax on the first half.
    ids[:4, 0] = s[:4].argmax(-1)
    ids[:4, 1:] = torch.stack([torch.tensor([i for i in range(12) if i != a][:3]) for a in ids[:4, 0].tolist()])
    lp[:4] = torch.log(torch.tensor([0.6, 0.1, 0.1, 0.1], dtype=torch.float64))
    lp[4:, 0] = -math.inf
    ids[7] = -1  # no id at all: never agrees
    labels = torch.tensor([0, 1, -100, 3, 4, 5, 6, 7])
    r = sparse_kd_stats(s, ids, lp, labels, tail="renorm")
    assert r.top1_agree[[0, 1, 3]].all() and not r.top1_agree[2] and not r.top1_agree[7]
    assert torch.isnan(r.teacher_mass[2]) and not r.valid[2]
    assert r.teacher_mass[7] == 0 and r.student_mass[7] == 0
    one = sparse_kd_stats(s, ids, lp, labels, tail="renorm", chunk_size=1)
    for a, b in zip(one, r):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        sparse_kd_stats(s, ids, lp, teacher_logit_scale=2.0)
    with pytest.raises(ValueError, match="teacher_ids"):
        sparse_kd_stats(s, ids + 20, lp)


def test_sparse_bf16_3d_and_vocab_size():
    s, ids, lp = _sparse_case(N=6, dtype=torch.float32)
    padded = torch.cat([s, torch.full((6, 2), 50.0)], -1).bfloat16()  # extra columns must not count
    r = sparse_kd_stats(padded.reshape(2, 3, 14), ids.reshape(2, 3, 4), lp.reshape(2, 3, 4), vocab_size=12)
    assert r.student_mass.shape == (2, 3) and r.student_mass.dtype == torch.float32
    s64 = padded[:, :12].double()
    q = torch.softmax(s64, -1)
    torch.testing.assert_close(r.student_mass.reshape(-1).double(), q.gather(-1, ids).sum(-1), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(r.student_entropy.reshape(-1).double(), _entropy64(s64, 1.0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(r.teacher_mass.reshape(-1).double(), lp.double().exp().sum(-1), rtol=1e-6,
                               atol=1e-6)


def test_exports():
    assert fastkd.kd_stats is kd_stats and fastkd.sparse_kd_stats is sparse_kd_stats
    assert {"kd_stats", "sparse_kd_stats", "KDStats", "SparseKDStats"} <= set(fastkd.__all__)
