"""``return_stats=True`` (issue 13, item 5; docs/diagnostics.md): the per-token diagnostics from
the loss's own pass, on every backend that writes them (fastkd._dispatch.STATS_BACKENDS),
against ``fastkd.kd_stats`` / ``fastkd.sparse_kd_stats`` in float64. The loss and gradient of
a call with stats are those of the call without.
"""
import pytest
import torch

import fastkd
from fastkd._dispatch import STATS_BACKENDS, get_backend

from harness.registry import backend_names

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
IGNORE = -100
RUNNING = [b for b in backend_names("cpu", with_reference=True) if b in STATS_BACKENDS]
PENDING = [b for b in backend_names("cpu") if b not in STATS_BACKENDS]
# The sparse and fused-linear forms run where the backend has those kernels.
# (The harness registry has no sparse op: the backends are asked whether they have sparse kernels.)
SPARSE_RUNNING = [b for b in RUNNING if b == "torch" or get_backend(b).has("sparse")]
LINEAR_RUNNING = [b for b in RUNNING if b in backend_names("cpu", op="fused_linear_kd_loss", with_reference=True)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense_inputs(n=9, v=67, width=None, seed=0):
    """Logits with an ignored token, an exact tie for the student's maximum (row 3: the first
    column must win), an exact tie for the teacher's (row 4), and rows that agree (5, 6)."""
    g = _gen(seed)
    width = width or v
    s = torch.randn(n, width, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, width, generator=g, dtype=torch.float64) * 3
    s[3, [5, 40]] = 20.0
    t[3, 5] = 25.0
    t[4, [7, 30]] = 22.0
    s[4, 30] = 21.0                       # the student's argmax is the teacher's second tied column
    s[5, 11] = t[5, 11] = 18.0
    s[6, v - 1] = t[6, v - 1] = 19.0      # the last counted column
    if width > v:
        s[:, v:] = 50.0                   # padded columns: never the argmax, never counted
        t[:, v:] = 50.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = IGNORE
    return s, t, labels


def _assert_stats(got, want, atol):
    assert torch.equal(got.valid, want.valid)
    assert torch.equal(got.top1_agree, want.top1_agree), (got.top1_agree, want.top1_agree)
    for name in got._fields:
        if name in ("valid", "top1_agree"):
            continue
        g, w = getattr(got, name).double(), getattr(want, name)
        assert torch.equal(g.isnan(), w.isnan()), name
        ok = ~w.isnan()
        assert torch.allclose(g[ok], w[ok], rtol=atol, atol=atol), (name, (g[ok] - w[ok]).abs().max())


@pytest.mark.parametrize("backend", RUNNING)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [{}, dict(softcap=8.0, logit_scale=1.5, teacher_logit_scale=0.5)],
                         ids=["plain", "options"])
def test_dense_stats_against_kd_stats(backend, divergence, options):
    s, t, labels = _dense_inputs(seed=DIVERGENCES.index(divergence))
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.6, beta=0.3, **options)
    want = fastkd.kd_stats(s, t, labels, **kw)
    x = s.float().requires_grad_(True)
    loss, stats = fastkd.kd_loss(x, t.float(), labels, backend=backend, return_stats=True, **kw)
    assert isinstance(stats, fastkd.KDStats)
    _assert_stats(stats, want, atol=2e-5)
    assert stats.teacher_entropy.dtype == torch.float32
    # The loss and gradient are those of the call without stats.
    (g,) = torch.autograd.grad(loss, x)
    x2 = s.float().requires_grad_(True)
    plain = fastkd.kd_loss(x2, t.float(), labels, backend=backend, **kw)
    (g2,) = torch.autograd.grad(plain, x2)
    assert torch.allclose(loss, plain, rtol=1e-6, atol=0) and torch.allclose(g, g2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", RUNNING)
def test_dense_stats_padded_vocab_low_precision_inplace_and_shape(backend):
    s, t, labels = _dense_inputs(v=61, width=64, seed=5)
    kw = dict(divergence="jsd", temperature=1.5, vocab_size=61, reduction="none")
    x = s.bfloat16().reshape(3, 3, 64).mul(1.0).requires_grad_(False)
    want = fastkd.kd_stats(x.double(), t.bfloat16().double().reshape(3, 3, 64), labels.reshape(3, 3), **kw)
    leaf = s.bfloat16().reshape(3, 3, 64).requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf, so inplace_backward may overwrite it
    loss, stats = fastkd.kd_loss(logits, t.bfloat16().reshape(3, 3, 64), labels.reshape(3, 3), backend=backend,
                                 inplace_backward=True, return_stats=True, **kw)
    assert loss.shape == (3, 3) and stats.divergence.shape == (3, 3) and stats.valid.shape == (3, 3)
    _assert_stats(stats, want, atol=2e-5)
    loss.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_the_torch_stats_are_kd_stats_exactly_in_float64():
    s, t, labels = _dense_inputs(seed=3)
    loss, stats = fastkd.kd_loss(s, t, labels, backend="torch", return_stats=True, temperature=2.0, alpha=0.5)
    _assert_stats(stats, fastkd.kd_stats(s, t, labels, temperature=2.0), atol=0.0)
    assert stats.divergence.dtype == torch.float64


def _sparse_inputs(n=8, v=53, k=5, seed=0):
    g = _gen(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) - 0.25
    ids[1, 3:] = -1                               # empty slots
    ids[4] = -1                                   # no valid id: never agrees
    logprobs[6, [1, 3]] = logprobs[6].max() + 1   # a tie for the teacher's best slot: the first wins
    s[6, ids[6, 3]] = 30.0                        # the student picks the second tied id
    s[7, ids[7, logprobs[7].argmax()]] = 30.0     # agrees
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = IGNORE
    return s, ids, logprobs, labels


@pytest.mark.parametrize("backend", SPARSE_RUNNING)
@pytest.mark.parametrize("tail, divergence", [(t, d) for t in ("bucket", "renorm") for d in DIVERGENCES]
                         + [("none", "forward_kl")])
def test_sparse_stats_against_sparse_kd_stats(backend, tail, divergence):
    s, ids, logprobs, labels = _sparse_inputs(seed=DIVERGENCES.index(divergence))
    kw = dict(divergence=divergence, tail=tail, temperature=2.0, alpha=0.7, softcap=9.0)
    want = fastkd.sparse_kd_stats(s, ids, logprobs, labels, **kw)
    x = s.float().requires_grad_(True)
    loss, stats = fastkd.sparse_kd_loss(x, ids, logprobs.float(), labels, backend=backend, return_stats=True, **kw)
    assert isinstance(stats, fastkd.SparseKDStats)
    assert not stats.top1_agree[4] and not stats.top1_agree[6] and stats.top1_agree[7]
    _assert_stats(stats, want, atol=2e-5)
    plain = fastkd.sparse_kd_loss(s.float(), ids, logprobs.float(), labels, backend=backend, **kw)
    assert torch.allclose(loss, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", LINEAR_RUNNING)
def test_fused_linear_stats_are_those_of_the_logits(backend):
    g = _gen(11)
    hs = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    ws = torch.randn(70, 16, generator=g, dtype=torch.float64) * 0.7
    ht = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    wt = torch.randn(72, 12, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, 70, (2, 5), generator=g)
    labels[0, 1] = IGNORE
    kw = dict(divergence="tvd", temperature=2.0, vocab_size=70, alpha=0.5)
    want = fastkd.kd_stats(hs @ ws.T, ht @ wt.T, labels, **kw)
    for reduction in ("mean", "none"):
        h = hs.float().requires_grad_(True)
        loss, stats = fastkd.fused_linear_kd_loss(h, ws.float(), ht.float(), wt.float(), labels, chunk_size=3,
                                                  backend=backend, return_stats=True, reduction=reduction, **kw)
        _assert_stats(stats, want, atol=2e-5)
        loss.sum().backward()
        assert h.grad is not None
    ids = torch.stack([torch.randperm(70, generator=g)[:4] for _ in range(10)]).reshape(2, 5, 4)
    lp = torch.log_softmax(torch.randn(2, 5, 4, generator=g, dtype=torch.float64), -1) - 0.1
    if backend in SPARSE_RUNNING:
        skw = dict(temperature=2.0, vocab_size=70, alpha=0.5)
        want = fastkd.sparse_kd_stats(hs @ ws.T, ids, lp, labels, **skw)
        _, stats = fastkd.fused_linear_sparse_kd_loss(hs.float(), ws.float(), ids, lp.float(), labels,
                                                      chunk_size=4, backend=backend, return_stats=True, **skw)
        _assert_stats(stats, want, atol=2e-5)


def test_modules_take_return_stats():
    s, t, labels = _dense_inputs()
    loss, stats = fastkd.KDLoss(temperature=2.0)(s, t, labels, return_stats=True)
    assert torch.allclose(stats.divergence[stats.valid], fastkd.kd_stats(s, t, labels, temperature=2.0)
                          .divergence[stats.valid])
    s2, ids, lp, labels2 = _sparse_inputs()
    loss, stats = fastkd.SparseKDLoss()(s2, ids, lp, labels2, return_stats=True)
    assert isinstance(stats, fastkd.SparseKDStats)
    hs, ws = torch.randn(4, 6), torch.randn(9, 6)
    loss, stats = fastkd.FusedLinearKDLoss()(hs, ws, hs, ws, return_stats=True)
    assert torch.allclose(stats.divergence, torch.zeros(4), atol=1e-6) and stats.top1_agree.all()


def test_bad_return_stats():
    s, t, labels = _dense_inputs()
    with pytest.raises(TypeError, match="return_stats"):
        fastkd.kd_loss(s, t, labels, return_stats=1)
    with pytest.raises(ValueError, match="return_stats takes one teacher, got 2"):
        fastkd.kd_loss(s, [t, t], labels, return_stats=True)
    hs, ws = torch.randn(4, 6), torch.randn(9, 6)
    with pytest.raises(ValueError, match="return_stats takes one teacher, got 2"):
        fastkd.fused_linear_kd_loss(hs, ws, [hs, hs], [ws, ws], return_stats=True)


@pytest.mark.parametrize("backend", PENDING or [pytest.param(None, marks=pytest.mark.skip("all backends have them"))])
def test_pending_backends_refuse_return_stats(backend):
    s, t, labels = _dense_inputs()
    with pytest.raises(NotImplementedError, match=f"backend '{backend}' does not compute return_stats"):
        fastkd.kd_loss(s.float(), t.float(), labels, backend=backend, return_stats=True)
    # auto runs them on a backend that has them
    _, stats = fastkd.kd_loss(s.float(), t.float(), labels, return_stats=True)
    _assert_stats(stats, fastkd.kd_stats(s, t, labels), atol=2e-5)


COMPILED = [b for b in RUNNING if b != "torch"]


@pytest.mark.parametrize("backend", COMPILED or [pytest.param(None, marks=pytest.mark.skip("no kernel writes stats"))])
def test_torch_compile_fullgraph(backend):
    s, t, labels = _dense_inputs()
    s, t = s.float(), t.float()

    def f(x, y, lab, T):
        loss, stats = fastkd.kd_loss(x, y, lab, temperature=T, backend=backend, return_stats=True)
        return loss, stats.teacher_entropy, stats.top1_agree

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for T in (1.0, 2.0):
        got, want = compiled(s, t, labels, T), f(s, t, labels, T)
        assert torch.allclose(got[0], want[0]) and torch.equal(got[2], want[2])
        assert torch.allclose(got[1].nan_to_num(), want[1].nan_to_num())
