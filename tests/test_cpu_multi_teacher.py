"""The CPU kernel for several teachers (csrc/cpu/kd_multi_cpu.cpp) where test_multi_teacher.py's
backend tests do not reach: every option at once, float64 to 1e-12, the in-place form, four
teachers, one teacher with per-token weights, routing over NaN rows, rows without teachers,
ignored rows, mixtures whose every teacher underflows, long rows, and one-hot rows against
the one-teacher kernel bit for bit. The truth is fastkd.reference in float64.
"""
import pytest
import torch

import fastkd
from fastkd import reference
from fastkd.config import make_config

from harness.compare import rel_err
from harness.registry import backend_names

pytestmark = pytest.mark.skipif("cpu" not in backend_names("cpu"), reason="fastkd._C is not built here")

IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = ("mixture", "sum")
OPTIONS = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.1,
               z_loss=1e-3)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(n=9, v=67, k=3, seed=0, scale=3.0):
    """float64 student, K teachers, labels with an ignored row (1), per-token weights summing to 1."""
    g = _gen(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    ts = [torch.randn(n, v, generator=g, dtype=torch.float64) * scale for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = IGNORE
    w = torch.softmax(torch.randn(k, n, generator=g, dtype=torch.float64), 0)
    return s, ts, labels, w


def _run(s, teachers, labels, weights, dtype=torch.float32, backend="cpu", **kw):
    """(loss, d loss / d student) of kd_loss on a copy of s in `dtype`."""
    x = s.detach().to(dtype).requires_grad_(True)
    loss = fastkd.kd_loss(x, teachers, labels, teacher_weights=weights, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _reference(s, teachers, labels, weights, **kw):
    """The float64 reference on the teachers as given (rounded ones stay rounded)."""
    w = weights.double() if isinstance(weights, torch.Tensor) else weights
    return _run(s, [t.double() for t in teachers], labels, w, dtype=torch.float64, backend="torch", **kw)


def _close(got, want, tol):
    (loss, grad), (ref_loss, ref_grad) = got, want
    assert rel_err(loss.double(), ref_loss) < tol, (loss, ref_loss)
    assert rel_err(grad.double(), ref_grad) < tol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_option_together_against_the_reference(divergence, mode):
    # Every logit option, the CE term with an ignored row, padded teachers of three dtypes,
    # per-token weights with a routed row and a zero weight: fp32 against float64.
    s, ts, labels, w = _case(seed=DIVERGENCES.index(divergence))
    w[:, 4] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    w[:, 6] = torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64)
    g = _gen(99)
    v = s.shape[1]
    teachers = [torch.cat([t, torch.randn(t.shape[0], pad, generator=g, dtype=torch.float64)], -1).to(dtype)
                for t, pad, dtype in zip(ts, (3, 0, 5), (torch.float32, torch.bfloat16, torch.float16))]
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.6, beta=0.3, vocab_size=v,
              ignore_index=IGNORE, **OPTIONS)
    _close(_run(s, teachers, labels, w.float(), **kw), _reference(s, teachers, labels, w.float(), **kw), 1e-5)


@pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_is_exact(divergence, mode, options):
    s, ts, labels, w = _case(n=7, v=41, k=3, seed=10 + DIVERGENCES.index(divergence))
    w[:, 3] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # a routed row: the one-teacher row
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.6, beta=0.3,
              **(OPTIONS if options else {}))
    got = _run(s, ts, labels, w, dtype=torch.float64, **kw)
    assert got[0].dtype == torch.float64
    _close(got, _reference(s, ts, labels, w, **kw), 1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_inplace_is_the_same_computation(mode):
    s, ts, labels, w = _case(seed=3)
    kw = dict(divergence="jsd", teacher_mode=mode, temperature=2.0, alpha=0.6, beta=0.3)
    cfg = make_config(**kw).with_vocab_size(s.shape[1])
    ints, floats = cfg.multi_kernel_settings()
    x = s.float()
    teachers = [t.float() for t in ts]
    scale = torch.tensor(0.25)
    loss, grad = torch.ops.fastkd.kd_multi_forward(x, teachers, w.float(), labels, scale, ints, floats)
    y = x.clone()
    loss_inplace = torch.ops.fastkd.kd_multi_forward_inplace(y, teachers, w.float(), labels, scale, ints, floats)
    assert torch.equal(loss_inplace, loss) and torch.equal(y, grad)
    # Through kd_loss: the gradient overwrites a non-leaf student.
    leaf = x.clone().requires_grad_(True)
    out = fastkd.kd_loss(leaf * 1.0, teachers, labels, teacher_weights=w.float(), backend="cpu",
                         inplace_backward=True, **kw)
    (g_inplace,) = torch.autograd.grad(out, leaf)
    assert torch.equal(out.detach(), _run(s, teachers, labels, w.float(), **kw)[0])
    assert torch.equal(g_inplace, _run(s, teachers, labels, w.float(), **kw)[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_four_teachers(divergence, mode):
    s, ts, labels, w = _case(n=8, v=131, k=4, seed=20)
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=1.5, alpha=0.8, beta=0.4)
    want = _reference(s, ts, labels, w.float(), **kw)
    _close(_run(s, [t.float() for t in ts], labels, w.float(), **kw), want, 1e-5)
    # Constant weights (stride 0 along the tokens), all four active.
    _close(_run(s, [t.float() for t in ts], labels, [0.1, 0.2, 0.3, 0.4], **kw),
           _reference(s, ts, labels, [0.1, 0.2, 0.3, 0.4], **kw), 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_teacher_with_per_token_weights(divergence):
    # Sum mode: a per-token weighted divergence (zeros included); mixture: weights of 1,
    # which is the one-teacher loss.
    s, ts, labels, _ = _case(k=1, seed=30)
    g = _gen(31)
    w = torch.rand(1, s.shape[0], generator=g, dtype=torch.float64) * 2
    w[0, [0, 5]] = 0.0
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.7, beta=0.3)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        teachers = [ts[0].to(dtype)]
        got = _run(s, teachers, labels, w.to(dtype), dtype=dtype, teacher_mode="sum", **kw)
        _close(got, _reference(s, ts, labels, w, teacher_mode="sum", **kw), tol)
        ones = torch.ones(1, s.shape[0], dtype=dtype)
        mixture = _run(s, teachers, labels, ones, dtype=dtype, **kw)
        single = _run(s, teachers[0], labels, None, dtype=dtype, **kw)
        assert torch.equal(mixture[0], single[0]) and torch.equal(mixture[1], single[1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_routing_does_not_read_the_unused_rows(divergence, mode):
    s, ts, labels, _ = _case(n=10, k=3, seed=40)
    route = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
    onehot = torch.nn.functional.one_hot(route, 3).T.float()
    teachers = [t.float() for t in ts]
    junk = [t.clone() for t in teachers]
    for k, t in enumerate(junk):
        t[route != k] = float("nan") if k != 1 else float("-inf")
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, **OPTIONS)
    loss, grad = _run(s, junk, labels, onehot, **kw)
    clean = _run(s, teachers, labels, onehot, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(loss, clean[0]) and torch.equal(grad, clean[1])
    _close((loss, grad), _reference(s, teachers, labels, onehot, **kw), 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_row_without_teachers_in_sum_mode_has_no_divergence_term(divergence):
    s, ts, labels, w = _case(seed=50)
    w[:, [0, 3]] = 0.0
    w[0, 5] = 0.0  # and a row with two teachers of three
    kw = dict(divergence=divergence, teacher_mode="sum", temperature=2.0, alpha=0.6, z_loss=1e-2,
              reduction="none")
    got = _run(s, [t.float() for t in ts], labels, w.float(), **kw)
    want = _reference(s, ts, labels, w, **kw)
    _close(got, want, 1e-5)
    # Rows 0 and 3: the CE term and the z-loss alone, (1 - alpha) CE + lambda lse^2.
    rows = [0, 3]
    x = s[rows].clone().requires_grad_(True)
    hard = 0.4 * torch.nn.functional.cross_entropy(x, labels[rows], reduction="none") \
        + 1e-2 * torch.logsumexp(x, -1) ** 2
    (g_hard,) = torch.autograd.grad(hard.sum(), x)
    assert torch.allclose(got[0][rows].double(), hard.detach(), rtol=1e-5)
    assert torch.allclose(got[1][rows].double(), g_hard, rtol=1e-4, atol=1e-7)


def test_ignored_rows_read_neither_weights_nor_teachers():
    s, ts, labels, w = _case(seed=60)
    labels[[1, 4]] = IGNORE
    teachers = [t.float() for t in ts]
    bad = w.float().clone()
    bad[:, 4] = float("nan")
    junk = [t.clone() for t in teachers]
    for t in junk:
        t[[1, 4]] = float("nan")
    for mode in MODES:
        kw = dict(divergence="reverse_kl", teacher_mode=mode, temperature=2.0, alpha=0.6, reduction="none")
        loss, grad = _run(s, junk, labels, bad, **kw)
        assert torch.equal(loss[[1, 4]], torch.zeros(2)) and torch.equal(grad[[1, 4]], torch.zeros(2, s.shape[1]))
        clean = _run(s, teachers, labels, w.float(), **kw)
        assert torch.equal(loss, clean[0]) and torch.equal(grad, clean[1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_mixture_whose_teachers_all_underflow(divergence):
    # Teachers peaked far apart at T = 1: at most entries every p_k is below fp32's smallest
    # number, so log sum_k w_k p_k taken from fp32 probabilities would be -inf there (an
    # infinite reverse KL, a NaN JSD gradient). The kernel's log-sum-exp of the differences
    # stays finite and follows the float64 reference.
    g = _gen(70)
    n, v = 6, 96
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ts = [torch.randn(n, v, generator=g, dtype=torch.float64) * 80 for _ in range(2)]
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)[:, None].expand(2, n)
    p = [torch.softmax(t.float(), -1) for t in ts]
    assert ((p[0] == 0) & (p[1] == 0)).float().mean() > 0.5  # the premise
    for mode in MODES:
        kw = dict(divergence=divergence, teacher_mode=mode, temperature=1.0)
        loss, grad = _run(s, [t.float() for t in ts], None, w.float(), **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), mode
        _close((loss, grad), _reference(s, [t.float() for t in ts], None, w.float(), **kw), 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_long_rows(mode):
    # V = 50000: 49 chunks of 1024, maxima that move from chunk to chunk (a rising ramp).
    g = _gen(80)
    n, v = 3, 50000
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ramp = torch.linspace(0, 6, v, dtype=torch.float64)
    ts = [torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + ramp, torch.randn(n, v, generator=g,
                                                                                      dtype=torch.float64) * 3]
    w = torch.tensor([[0.5, 0.2, 1.0], [0.5, 0.8, 0.0]], dtype=torch.float64)
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, beta=0.3)
        teachers = [ts[0].float(), ts[1].bfloat16()]
        _close(_run(s, teachers, None, w.float(), **kw), _reference(s, teachers, None, w.float(), **kw), 1e-5)


@pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_hot_rows_are_the_one_teacher_kernel_bit_for_bit(divergence, mode, options):
    s, ts, labels, _ = _case(n=9, v=301, k=3, seed=90)
    route = torch.tensor([2, 0, 1, 1, 0, 2, 0, 1, 2])
    onehot = torch.nn.functional.one_hot(route, 3).T.float()
    teachers = [ts[0].float(), ts[1].bfloat16(), ts[2].half()]
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.7, beta=0.3, reduction="sum",
              **(OPTIONS if options else {}))
    rows, grad = _run(s, teachers, labels, onehot, teacher_mode=mode, **dict(kw, reduction="none"))
    for k, t in enumerate(teachers):
        mine = route == k
        one_rows, one_grad = _run(s[mine], t[mine], labels[mine], None, **dict(kw, reduction="none"))
        assert torch.equal(rows[mine], one_rows), k
        assert torch.equal(grad[mine], one_grad), k


def test_a_nan_weight_or_a_used_teachers_nan_gives_a_nan_row():
    # The Python layer refuses NaN weights on CPU tensors; the operator itself propagates them.
    s, ts, labels, w = _case(seed=100)
    teachers = [t.float() for t in ts]
    for divergence in DIVERGENCES:
        for mode in MODES:
            ints, floats = make_config(divergence=divergence, teacher_mode=mode).with_vocab_size(
                s.shape[1]).multi_kernel_settings()
            nan_weight = w.float().clone()
            nan_weight[2, 5] = float("nan")
            loss, grad = torch.ops.fastkd.kd_multi_forward(s.float(), teachers, nan_weight, None, torch.tensor(1.0),
                                                           ints, floats)
            assert torch.isnan(loss[5]) and torch.isnan(grad[5]).all(), (divergence, mode)
            assert torch.isfinite(loss[torch.arange(9) != 5]).all(), (divergence, mode)
            nan_teacher = [t.clone() for t in teachers]
            nan_teacher[1][6, 10] = float("nan")
            loss, grad = torch.ops.fastkd.kd_multi_forward(s.float(), nan_teacher, w.float(), None,
                                                           torch.tensor(1.0), ints, floats)
            assert torch.isnan(loss[6]) and torch.isnan(grad[6]).any(), (divergence, mode)


def test_a_mixture_without_teachers_is_the_references_m_equals_0():
    # Weights all 0 in mixture mode (refused in Python on CPU tensors): m = 0, as the reference.
    s, ts, _, w = _case(n=4, v=23, k=2, seed=110)
    w[:, 2] = 0.0
    for divergence in DIVERGENCES:
        cfg = make_config(divergence=divergence, beta=0.3).with_vocab_size(s.shape[1])
        loss, _ = torch.ops.fastkd.kd_multi_forward(s, ts, w, None, torch.tensor(1.0, dtype=torch.float64),
                                                    *cfg.multi_kernel_settings())
        want = reference.multi_loss_per_row(s, ts, w, None, cfg)
        assert torch.allclose(loss, want, rtol=1e-12, atol=0) or torch.equal(loss, want), divergence
