"""Several teachers (issue 13, item 4; docs/multi_teacher.md): ``teacher_logits`` a sequence of
K tensors or one [K, ..., V] tensor, ``teacher_weights`` per teacher or per token,
``teacher_mode`` mixture | sum. The values are checked against formulas written out here in
float64, independently of fastkd.reference. K > 1 runs on the backends of
MULTI_TEACHER_BACKENDS (torch, and the cpu kernel, which ``auto`` picks for CPU tensors, float64
included: most tests here run on it when fastkd._C is built); each of them is checked against
the reference near the end, and the others refuse several teachers (the dispatch gate).
test_cpu_multi_teacher.py checks the cpu kernel further.
"""
import dataclasses

import pytest
import torch

import fastkd
from fastkd import reference
from fastkd._autograd import fused_multi_kd_loss
from fastkd._checks import Teachers, check_multi_kd_args
from fastkd import _dispatch
from fastkd._dispatch import MULTI_TEACHER_BACKENDS, get_backend

from harness.registry import backend_names

IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = ("mixture", "sum")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n=7, v=13, k=2, seed=0, dtype=torch.float64):
    """Student (requires grad), K teachers, labels with an ignored token, per-token weights
    summing to 1."""
    g = _gen(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_(True)
    ts = [(torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype) for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = IGNORE
    w = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
    return s, ts, labels, w / w.sum(0)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ---------------------------------------------------------------------------------------
# The formulas, written out: probabilities, D(m, q) of the mixture, sum_k w_k D(p_k, q).

def _kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def _divergence(p, q, divergence, beta):
    if divergence == "forward_kl":
        return _kl(p, q)
    if divergence == "reverse_kl":
        return _kl(q, p)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    return 0.5 * (p - q).abs().sum(-1)


def _formula(s, ts, w, labels, mode, divergence, T=2.0, alpha=0.7, beta=0.3, vocab=None):
    """mean over counted tokens of alpha T^2 D + (1 - alpha) CE, D of the mixture or the weighted sum."""
    vocab = vocab or s.shape[-1]
    s = s[..., :vocab].double()
    q = torch.softmax(s / T, -1)
    ps = [torch.softmax(t[..., :vocab].double() / T, -1) for t in ts]
    if mode == "mixture":
        m = sum(w[k][:, None] * p for k, p in enumerate(ps))
        div = _divergence(m, q, divergence, beta)
    else:
        div = sum(w[k] * _divergence(p, q, divergence, beta) for k, p in enumerate(ps))
    valid = labels != IGNORE
    ce = -torch.log_softmax(s, -1).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    rows = alpha * T * T * div + (1 - alpha) * ce
    return rows[valid].sum() / valid.sum()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_and_mode_against_the_formula(divergence, mode):
    s, ts, labels, w = _inputs(k=3)
    kw = dict(temperature=2.0, alpha=0.7, beta=0.3, divergence=divergence, teacher_mode=mode)
    got = fastkd.kd_loss(s, ts, labels, teacher_weights=w, **kw)
    want = _formula(s, ts, w, labels, mode, divergence)
    assert torch.allclose(got, want, rtol=1e-12, atol=0), (got.item(), want.item())
    assert torch.allclose(_grad(got, s), _grad(want, s), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
def test_float32_against_the_float64_formula(mode):
    s, ts, labels, w = _inputs(k=2, n=16, v=101, seed=3)
    s32 = s.detach().float().requires_grad_(True)
    got = fastkd.kd_loss(s32, [t.float() for t in ts], labels, teacher_weights=w.float(), temperature=2.0,
                         alpha=0.7, beta=0.3, divergence="jsd", teacher_mode=mode)
    want = _formula(s, [t.float() for t in ts], w.float(), labels, mode, "jsd")
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    g, g_want = _grad(got, s32).double(), _grad(want, s)
    assert (g - g_want).norm() <= 1e-5 * g_want.norm()


def test_gradcheck_of_the_mixture():
    s, ts, labels, w = _inputs(n=3, v=5, k=2, seed=1)
    s = s.detach().requires_grad_(True)
    for divergence in DIVERGENCES:
        assert torch.autograd.gradcheck(
            lambda x: reference.kd_loss(x, ts, labels, teacher_weights=w, divergence=divergence, temperature=1.5,
                                        alpha=0.6, reduction="sum"), (s,), fast_mode=True)


# ---------------------------------------------------------------------------------------
# The identities of the issue.

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_sum_with_one_teacher_is_the_single_teacher_loss(divergence):
    # A weight tensor of ones forces the several-teachers path with K = 1; on each backend
    # that runs it, the single teacher's loss on the same backend, bit for bit.
    s, ts, labels, _ = _inputs(k=1)
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.7, beta=0.3)
    ones = torch.ones(1, s.shape[0], dtype=torch.float64)
    # (float64 backends; test_triton_multi_teacher.py checks Triton's K = 1 in float32.)
    for backend in [b for b in backend_names("cpu", with_reference=True) if b in MULTI_TEACHER_BACKENDS
                    and torch.float64 in get_backend(b).dtypes]:
        single = fastkd.kd_loss(s, ts[0], labels, backend=backend, **kw)
        g_single = _grad(single, s)
        for mode in MODES:
            several = fastkd.kd_loss(s, ts, labels, teacher_weights=ones, teacher_mode=mode, backend=backend, **kw)
            assert torch.equal(several, single), (backend, mode, several.item(), single.item())
            assert torch.equal(_grad(several, s), g_single), (backend, mode)


@pytest.mark.skipif("cpu" not in backend_names("cpu"), reason="fastkd._C not available")
def test_one_teacher_in_a_sequence_runs_on_the_kernels():
    s, ts, labels, _ = _inputs(k=1, v=211)
    s32, t32 = s.detach().float().requires_grad_(True), ts[0].float()
    single = fastkd.kd_loss(s32, t32, labels, alpha=0.5, backend="cpu")
    g_single = _grad(single, s32)
    for teacher, weights in (([t32], None), ((t32,), [1.0]), (t32[None], None)):
        got = fastkd.kd_loss(s32, teacher, labels, alpha=0.5, teacher_weights=weights, backend="cpu")
        assert torch.equal(got, single)
        assert torch.equal(_grad(got, s32), g_single)


def test_forward_kl_mixture_has_the_gradient_of_the_weighted_sum_of_kls():
    s, ts, labels, w = _inputs(k=3, seed=2)
    kw = dict(temperature=2.0, alpha=0.7, teacher_weights=w)
    mixture = fastkd.kd_loss(s, ts, labels, teacher_mode="mixture", **kw)
    summed = fastkd.kd_loss(s, ts, labels, teacher_mode="sum", **kw)
    assert torch.allclose(_grad(mixture, s), _grad(summed, s), rtol=1e-12, atol=1e-15)
    # The values differ by a constant of the teachers alone (the mixture's entropy against
    # the teachers' mean entropy), the same for any student, and KL(m||q) <= sum_k w_k KL(p_k||q).
    other = torch.randn(s.shape, generator=_gen(9), dtype=torch.float64) * 3
    gap = summed - mixture
    gap_other = (fastkd.kd_loss(other, ts, labels, teacher_mode="sum", **kw)
                 - fastkd.kd_loss(other, ts, labels, teacher_mode="mixture", **kw))
    assert gap.item() > 0 and torch.allclose(gap, gap_other, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_one_hot_routing_equals_each_teacher_on_its_rows(divergence, mode):
    s, ts, labels, _ = _inputs(n=9, k=3, seed=4)
    route = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1])
    onehot = torch.nn.functional.one_hot(route, 3).T  # int64 [K, N]: accepted as is
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.7, reduction="sum")
    routed = fastkd.kd_loss(s, ts, labels, teacher_weights=onehot, teacher_mode=mode, **kw)
    g_routed = _grad(routed, s)
    total, g_want = 0.0, torch.zeros_like(s)
    for k, t in enumerate(ts):
        rows = route == k
        sub = s.detach()[rows].requires_grad_(True)
        part = fastkd.kd_loss(sub, t[rows], labels[rows], **kw)
        total = total + part
        g_want[rows] = _grad(part, sub)
    assert torch.allclose(routed, total, rtol=1e-13)
    assert torch.allclose(g_routed, g_want, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_teacher_with_weight_zero_is_not_read_there(divergence, mode):
    # Routed tokens: the unused teachers' rows hold NaN or -inf (a teacher that was not
    # run there); the loss and gradient equal those with finite rows, bitwise.
    s, ts, labels, _ = _inputs(n=6, k=2, seed=5)
    route = torch.tensor([0, 1, 1, 0, 0, 1])
    weights = torch.stack([route == 0, route == 1]).double()
    junk = [t.clone() for t in ts]
    junk[0][route == 1] = float("nan")
    junk[1][route == 0] = float("-inf")
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, teacher_weights=weights)
    clean = fastkd.kd_loss(s, ts, labels, **kw)
    got = fastkd.kd_loss(s, junk, labels, **kw)
    g = _grad(got, s)
    assert torch.isfinite(got) and torch.isfinite(g).all()
    assert torch.equal(got, clean) and torch.equal(g, _grad(clean, s))


def test_a_used_teachers_nan_reaches_the_loss():
    s, ts, labels, w = _inputs(k=2)
    ts[1][0, 3] = float("nan")
    for mode in MODES:
        assert torch.isnan(fastkd.kd_loss(s, ts, labels, teacher_weights=w, teacher_mode=mode))


def test_per_token_weights_equal_constant_weights_and_each_row_alone():
    s, ts, labels, w = _inputs(k=3, seed=6)
    n = s.shape[0]
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.7)
    const = fastkd.kd_loss(s, ts, labels, teacher_weights=[0.2, 0.5, 0.3], **kw)
    as_tensor = fastkd.kd_loss(s, ts, labels, teacher_weights=torch.tensor([0.2, 0.5, 0.3],
                                                                           dtype=torch.float64)[:, None].expand(3, n),
                               **kw)
    assert torch.equal(const, as_tensor) and torch.equal(_grad(const, s), _grad(as_tensor, s))
    uniform = fastkd.kd_loss(s, ts, labels, **kw)
    assert torch.equal(uniform, fastkd.kd_loss(s, ts, labels, teacher_weights=[1 / 3] * 3, **kw))
    # Per-token weights: each token's loss is that of its own constant weights.
    rows = fastkd.kd_loss(s, ts, labels, teacher_weights=w, reduction="none", **kw)
    for i in range(n):
        one = fastkd.kd_loss(s[i:i + 1], [t[i:i + 1] for t in ts], labels[i:i + 1],
                             teacher_weights=w[:, i].tolist(), reduction="sum", **kw)
        assert torch.allclose(rows[i], one, rtol=1e-12, atol=0), i


def test_an_ignored_tokens_weights_do_not_matter():
    s, ts, labels, w = _inputs(k=2)
    bad = w.clone()
    bad[:, 2] = torch.tensor([float("nan"), -3.0])  # token 2 is ignored: not checked, not used
    for mode in MODES:
        want = fastkd.kd_loss(s, ts, labels, teacher_weights=w, teacher_mode=mode)
        got = fastkd.kd_loss(s, ts, labels, teacher_weights=bad, teacher_mode=mode)
        assert torch.equal(got, want) and torch.equal(_grad(got, s), _grad(want, s))


def test_mixed_dtypes_and_padded_widths():
    s, ts, labels, w = _inputs(n=8, v=29, k=3, seed=7)
    g = _gen(8)
    pads = (5, 0, 2)
    teachers = [torch.cat([t, torch.randn(t.shape[0], pad, generator=g, dtype=torch.float64)], -1).to(dtype)
                for t, pad, dtype in zip(ts, pads, (torch.bfloat16, torch.float32, torch.float16))]
    s32 = s.detach().float().requires_grad_(True)
    for mode in MODES:
        got = fastkd.kd_loss(s32, teachers, labels, teacher_weights=w.float(), vocab_size=29, teacher_mode=mode,
                             temperature=2.0, alpha=0.7, beta=0.3, divergence="jsd")
        want = _formula(s, teachers, w.float(), labels, mode, "jsd", vocab=29)
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()), mode
        g32, g64 = _grad(got, s32).double(), _grad(want, s)
        assert (g32 - g64).norm() <= 1e-5 * g64.norm(), mode
    with pytest.raises(ValueError, match=r"teacher_logits\[0\] has 34.*pass vocab_size="):
        fastkd.kd_loss(s32, teachers, labels)


def test_a_stacked_tensor_is_the_sequence():
    g = _gen(10)
    s = torch.randn(2, 3, 17, generator=g, dtype=torch.float64, requires_grad=True)
    stacked = torch.randn(3, 2, 3, 17, generator=g, dtype=torch.float64)
    w = torch.softmax(torch.randn(3, 2, 3, generator=g, dtype=torch.float64), 0)
    for reduction in ("mean", "none"):
        a = fastkd.kd_loss(s, stacked, teacher_weights=w, reduction=reduction, divergence="reverse_kl")
        b = fastkd.kd_loss(s, list(stacked.unbind(0)), teacher_weights=w, reduction=reduction,
                           divergence="reverse_kl")
        assert a.shape == b.shape and torch.equal(a, b)
    # A 1-D student (one token) and [K, V] teachers.
    one = fastkd.kd_loss(s[0, 0], stacked[:, 0, 0], teacher_weights=[0.5, 0.25, 0.25])
    assert torch.equal(one, fastkd.kd_loss(s[0, :1], stacked[:, 0, :1], teacher_weights=[0.5, 0.25, 0.25]))


# ---------------------------------------------------------------------------------------
# fused_linear_kd_loss with several heads, the module forms, the fused autograd path.

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_with_two_heads_is_kd_loss_on_the_logits(reduction):
    g = _gen(11)
    d = torch.float64
    hs = torch.randn(2, 5, 8, generator=g, dtype=d, requires_grad=True)
    ws = torch.randn(13, 8, generator=g, dtype=d, requires_grad=True)
    bs = torch.randn(13, generator=g, dtype=d, requires_grad=True)
    ht = [torch.randn(2, 5, 6, generator=g, dtype=d), torch.randn(2, 5, 4, generator=g, dtype=d)]
    wt = [torch.randn(13, 6, generator=g, dtype=d), torch.randn(15, 4, generator=g, dtype=d)]  # a padded head
    bt = [None, torch.randn(15, generator=g, dtype=d)]
    w = torch.softmax(torch.randn(2, 2, 5, generator=g, dtype=d), 0)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    labels[0, 1] = IGNORE
    kw = dict(vocab_size=13, divergence="jsd", temperature=2.0, alpha=0.6, reduction=reduction)
    got = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, teacher_weights=w,
                                      chunk_size=3, **kw)
    grads = torch.autograd.grad(got.sum(), (hs, ws, bs))
    logits = [ht[0] @ wt[0].T, ht[1] @ wt[1].T + bt[1]]
    want = fastkd.kd_loss(hs @ ws.T + bs, logits, labels, teacher_weights=w, **kw)
    want_grads = torch.autograd.grad(want.sum(), (hs, ws, bs))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    for a, b in zip(grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    module = fastkd.FusedLinearKDLoss(chunk_size=3, **kw)
    assert torch.allclose(module(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, teacher_weights=w), got,
                          rtol=1e-14, atol=0)


def test_fused_linear_one_head_in_a_sequence_is_the_single_teacher():
    g = _gen(12)
    hs, ws = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(13, 8, generator=g)
    ht, wt = torch.randn(6, 5, generator=g), torch.randn(13, 5, generator=g)
    a = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, temperature=2.0)
    b = fastkd.fused_linear_kd_loss(hs, ws, [ht], [wt], temperature=2.0)
    assert torch.equal(a, b) and torch.equal(_grad(a, hs), _grad(b, hs))


def test_kdloss_module_and_repr():
    s, ts, labels, w = _inputs(k=2)
    crit = fastkd.KDLoss("jsd", teacher_mode="sum", temperature=2.0)
    r = repr(crit)
    assert "teacher_mode='sum'" in r and "temperature=2.0" in r
    assert "teacher_mode" not in repr(fastkd.KDLoss())  # the default is left out
    got = crit(s, ts, labels, teacher_weights=w)
    want = fastkd.kd_loss(s, ts, labels, teacher_weights=w, divergence="jsd", teacher_mode="sum", temperature=2.0)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"teacher_mode must be one of \('mixture', 'sum'\)"):
        fastkd.KDLoss(teacher_mode="average")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_fused_autograd_path_for_kernels(reduction, inplace):
    # The path a backend with fused several-teachers kernels takes (MultiKDLossFunction):
    # here with the torch backend's multi_forward, against its autograd graph.
    s, ts, labels, w = _inputs(k=3, seed=13)
    cfg = fastkd.make_config(divergence="reverse_kl", temperature=2.0, alpha=0.7, reduction=reduction)
    cfg, weights, num_items = check_multi_kd_args(s, Teachers(tuple(ts), w, ("a", "b", "c")), labels, cfg)
    fused_only = dataclasses.replace(get_backend("torch"), differentiable_multi_loss=None)
    x = (s.detach() * 1.0).requires_grad_(True)
    y = x * 1.0  # a non-leaf, which inplace may overwrite
    got = fused_multi_kd_loss(y, ts, weights, labels, cfg, num_items, fused_only, inplace)
    want = reference.multi_kd_loss_with_config(s, ts, weights, labels, cfg, num_items)
    gw = torch.linspace(0.5, 2.0, s.shape[0], dtype=torch.float64) if reduction == "none" else None
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    g_got = torch.autograd.grad(got, x, gw)[0]
    g_want = torch.autograd.grad(want, s, gw)[0]
    assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-16)


def test_torch_compile_fullgraph_with_two_teachers():
    torch._dynamo.reset()
    s, ts, labels, w = _inputs(k=2, dtype=torch.float32)

    def loss(s, t0, t1, labels, w):
        return (fastkd.kd_loss(s, [t0, t1], labels, teacher_weights=[0.25, 0.75], temperature=2.0, alpha=0.7)
                + fastkd.kd_loss(s, torch.stack([t0, t1]), labels, teacher_weights=w, teacher_mode="sum",
                                 divergence="jsd"))

    compiled = torch.compile(loss, fullgraph=True)
    args = (ts[0], ts[1], labels, w.float())
    got, want = compiled(s, *args), loss(s, *args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(_grad(got, s), _grad(want, s))


# ---------------------------------------------------------------------------------------
# Bad input.

def _bad_cases():
    s, ts, labels, w = _inputs(k=2)
    n = s.shape[0]
    off = w.clone()
    off[0, 4] += 0.1
    neg = w.clone()
    neg[1, 0] = -0.5
    stacked = torch.stack(ts)
    return [
        ("weights-K", dict(teacher_weights=[0.2, 0.3, 0.5]), ValueError,
         "teacher_weights has 3 entries but there are 2 teachers"),
        ("weights-tensor-K", dict(teacher_weights=torch.full((3, n), 1 / 3, dtype=torch.float64)), ValueError,
         r"teacher_weights must have shape \[K, ...\] = \(2, 7\)"),
        ("weights-negative", dict(teacher_weights=[1.5, -0.5]), ValueError, r"teacher_weights\[1\] must be >= 0"),
        ("weights-negative-sum", dict(teacher_weights=[1.5, -0.5], teacher_mode="sum"), ValueError,
         r"teacher_weights\[1\] must be >= 0"),
        ("weights-tensor-negative", dict(teacher_weights=neg, teacher_mode="sum"), ValueError,
         r"teacher_weights must be finite and >= 0, found -0.5 \(teacher 1, token 0"),
        ("weights-not-one", dict(teacher_weights=[0.5, 0.6]), ValueError, "teacher_weights must sum to 1"),
        ("weights-tensor-not-one", dict(teacher_weights=off), ValueError,
         "teacher_weights must sum to 1 .* at token 4"),
        ("one-teacher-weight-not-one", dict(teacher_logits=[ts[0]], teacher_weights=[0.5]), ValueError,
         "teacher_weights must sum to 1"),
        ("weights-requires-grad", dict(teacher_weights=w.clone().requires_grad_(True)), ValueError,
         "teacher_weights requires grad"),
        ("weights-string", dict(teacher_weights="uniform"), TypeError, "teacher_weights must be None, a sequence"),
        ("weights-tensor-entries", dict(teacher_weights=[torch.tensor(0.5), torch.tensor(0.5)]), TypeError,
         r"teacher_weights\[0\] must be a real number"),
        ("stacked-lead", dict(teacher_logits=stacked[:, :5]), ValueError, "K stacked teachers"),
        ("sequence-lead", dict(teacher_logits=[ts[0], ts[1][:5]]), ValueError,
         r"student_logits and teacher_logits\[1\] must have the same leading"),
        ("teacher-requires-grad", dict(teacher_logits=[ts[0], ts[1].clone().requires_grad_(True)]), ValueError,
         r"teacher_logits\[1\] requires grad"),
        ("stacked-requires-grad", dict(teacher_logits=stacked.clone().requires_grad_(True)), ValueError,
         r"teacher_logits requires grad"),
        ("teacher-int", dict(teacher_logits=[ts[0], ts[1].long()]), TypeError,
         r"teacher_logits\[1\] must be a floating tensor"),
        ("empty", dict(teacher_logits=[]), ValueError, "teacher_logits is an empty sequence"),
        ("mode", dict(teacher_mode="average"), ValueError, "teacher_mode must be one of"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, change, exc, match = case
    s, ts, labels, _ = _inputs(k=2)
    kw = dict(change)
    teachers = kw.pop("teacher_logits", ts)
    with pytest.raises(exc, match=match):
        fastkd.kd_loss(s, teachers, labels, **kw)
    with pytest.raises(exc, match=match):  # the reference checks the same way
        reference.kd_loss(s, teachers, labels, **kw)


def test_mixture_weights_within_rounding_are_accepted():
    s, ts, labels, _ = _inputs(k=3)
    third = torch.full((3, s.shape[0]), 1 / 3, dtype=torch.bfloat16)  # 0.3340 each: sums to 1.002
    # Within K eps of bfloat16: accepted, and used as given (not renormalised).
    kw = dict(temperature=2.0, alpha=0.7, beta=0.3, divergence="jsd")
    with_third = fastkd.kd_loss(s, ts, labels, teacher_weights=third, **kw)
    assert torch.allclose(with_third, _formula(s, ts, third.double(), labels, "mixture", "jsd"), rtol=1e-12)
    # Python floats that sum to 1 only to rounding (0.1 + 0.2 + 0.7 = 0.9999999999999999).
    fastkd.kd_loss(s, ts, labels, teacher_weights=[0.1, 0.2, 0.7])
    with pytest.raises(ValueError, match="must sum to 1"):
        fastkd.kd_loss(s, ts, labels, teacher_weights=third.double() * 1.01)


def test_numpy_and_integer_weights_are_numbers():
    np = pytest.importorskip("numpy")
    s, ts, labels, _ = _inputs(k=2)
    want = fastkd.kd_loss(s, ts, labels, teacher_weights=[0.25, 0.75], teacher_mode="sum")
    assert torch.equal(fastkd.kd_loss(s, ts, labels, teacher_weights=[np.float32(0.25), np.float64(0.75)],
                                      teacher_mode="sum"), want)
    routed = fastkd.kd_loss(s, ts, labels, teacher_weights=[0, 1])  # ints: teacher 1 alone
    assert torch.equal(routed, fastkd.kd_loss(s, ts[1], labels))  # auto: the same backend


def test_fused_linear_bad_heads():
    g = _gen(14)
    hs, ws = torch.randn(4, 8, generator=g), torch.randn(13, 8, generator=g)
    ht, wt = torch.randn(4, 5, generator=g), torch.randn(13, 5, generator=g)
    with pytest.raises(TypeError, match="both as sequences"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht, ht], wt)
    with pytest.raises(ValueError, match="same length K >= 1"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht, ht], [wt])
    with pytest.raises(ValueError, match="teacher_bias must be None or a sequence of 2"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht, ht], [wt, wt], teacher_bias=torch.zeros(13))
    with pytest.raises(ValueError, match=r"teacher_weight\[1\] must have shape \[V, 5\]"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht, ht], [wt, torch.randn(13, 6)])
    with pytest.raises(ValueError, match=r"teacher_hidden\[0\] requires grad"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht.requires_grad_(True), ht.detach()], [wt, wt])
    with pytest.raises(ValueError, match="teacher_weights must sum to 1"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht.detach(), ht.detach()], [wt, wt], teacher_weights=[0.5, 0.4])


# ---------------------------------------------------------------------------------------
# Every backend that runs several teachers (MULTI_TEACHER_BACKENDS), in float32 / bfloat16,
# against the float64 reference: a backend added to the gate is checked here at once.

RUNNING = [b for b in backend_names("cpu", with_reference=True) if b in MULTI_TEACHER_BACKENDS]
WEIGHTS = ("uniform", "numbers", "per-token", "routed")


def _backend_case(weights, seed, n=12, v=257, k=3):
    s, ts, labels, w = _inputs(n=n, v=v, k=k, seed=seed)
    if weights == "uniform":
        return s, ts, labels, None
    if weights == "numbers":
        return s, ts, labels, [0.5, 0.2, 0.3]
    if weights == "per-token":
        return s, ts, labels, w
    route = torch.arange(n) % k
    onehot = torch.nn.functional.one_hot(route, k).T.double()
    for j, t in enumerate(ts):  # an unused teacher's rows are NaN: never read
        t[route != j] = float("nan")
    return s, ts, labels, onehot


@pytest.mark.parametrize("backend", RUNNING)
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_backends_against_the_reference(backend, divergence, mode, weights):
    s, ts, labels, w = _backend_case(weights, seed=DIVERGENCES.index(divergence))
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, beta=0.3)
    want = reference.kd_loss(s, ts, labels, teacher_weights=w, **kw)
    g_want = _grad(want, s)
    for s_dtype, t_dtypes, tol in ((torch.float32, (torch.float32,) * 3, (1e-5, 1e-5)),
                                   (torch.float32, (torch.bfloat16, torch.float32, torch.float16), (1e-2, 2e-2))):
        x = s.detach().to(s_dtype).requires_grad_(True)
        teachers = [t.to(d) for t, d in zip(ts, t_dtypes)]
        w_low = w.float() if isinstance(w, torch.Tensor) else w
        got = fastkd.kd_loss(x, teachers, labels, teacher_weights=w_low, backend=backend, **kw)
        if t_dtypes[0] == torch.float32:
            ref, g_ref = want, g_want
        else:  # against the reference on the rounded teachers: the backend's error alone
            x64 = s.detach().requires_grad_(True)
            ref = reference.kd_loss(x64, [t.double() for t in teachers], labels, teacher_weights=w_low, **kw)
            g_ref = _grad(ref, x64)
        assert abs(got.item() - ref.item()) <= tol[0] * abs(ref.item()), (got.item(), ref.item())
        g = _grad(got, x).double()
        assert (g - g_ref).norm() <= tol[1] * g_ref.norm()


RUNNING_LINEAR = [b for b in backend_names("cpu", op="fused_linear_kd_loss", with_reference=True)
                  if b in MULTI_TEACHER_BACKENDS]


@pytest.mark.parametrize("backend", RUNNING_LINEAR)
@pytest.mark.parametrize("mode", MODES)
def test_fused_linear_backends_against_the_reference(backend, mode):
    g = _gen(16)
    hs = torch.randn(10, 16, generator=g, requires_grad=True)
    ws = torch.randn(101, 16, generator=g) * 0.5
    ht = [torch.randn(10, 12, generator=g), torch.randn(10, 8, generator=g).bfloat16()]
    wt = [torch.randn(101, 12, generator=g) * 0.5, (torch.randn(104, 8, generator=g) * 0.5).bfloat16()]
    route = torch.arange(10) % 2
    w = torch.stack([route == 0, route == 1]).float() * 0.8 + 0.1  # per token, sums to 1
    kw = dict(divergence="reverse_kl", teacher_mode=mode, temperature=2.0, vocab_size=101)
    got = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, teacher_weights=w, chunk_size=4, backend=backend, **kw)
    x = hs.detach().double().requires_grad_(True)
    want = reference.kd_loss(x @ ws.double().T, [h.double() @ m.double().T for h, m in zip(ht, wt)],
                             teacher_weights=w, **kw)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    g_got, g_want = _grad(got, hs).double(), _grad(want, x)
    assert (g_got - g_want).norm() <= 1e-5 * g_want.norm()


# ---------------------------------------------------------------------------------------
# Dispatch: K > 1 runs on the backends of MULTI_TEACHER_BACKENDS; the others refuse it.

PENDING = [b for b in backend_names("cpu") if b not in MULTI_TEACHER_BACKENDS]


@pytest.mark.parametrize("backend", PENDING or [pytest.param(None, marks=pytest.mark.skip("all backends run them"))])
def test_pending_backends_refuse_several_teachers(backend):
    s, ts, labels, w = _inputs(k=2, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match=f"backend '{backend}' does not run several teachers"):
        fastkd.kd_loss(s, ts, labels, backend=backend)
    with pytest.raises(NotImplementedError, match="does not run several teachers"):  # K = 1, per-token weights
        fastkd.kd_loss(s, ts[:1], labels, teacher_weights=torch.ones(1, s.shape[0]), backend=backend)
    g = _gen(15)
    hs, ws = torch.randn(4, 8, generator=g), torch.randn(13, 8, generator=g)
    ht, wt = torch.randn(4, 5, generator=g), torch.randn(13, 5, generator=g)
    with pytest.raises(NotImplementedError, match="does not run several teachers"):
        fastkd.fused_linear_kd_loss(hs, ws, [ht, ht], [wt, wt], backend=backend)


def test_auto_runs_several_teachers_on_a_backend_that_reads_them():
    s, ts, labels, w = _inputs(k=2, dtype=torch.float32)
    want_backend = "cpu" if "cpu" in backend_names("cpu") else "torch"  # csrc/cpu/kd_multi_cpu.cpp
    assert _dispatch.backend_for("auto", torch.device("cpu"), torch.float32, several_teachers=2).name == want_backend
    got = fastkd.kd_loss(s, ts, labels, teacher_weights=w.float(), alpha=0.7, temperature=2.0)
    want = reference.kd_loss(s.detach().double(), [t.double() for t in ts], labels, teacher_weights=w.float(),
                             alpha=0.7, temperature=2.0)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_weights_off_the_cpu_are_not_read(no_host_sync):
    # Tensors on another device (meta here, a GPU in training) are not read on the host:
    # the weight checks that need values run on CPU tensors only.
    s = torch.randn(2, 3, 11, device="meta", requires_grad=True)
    teachers = torch.randn(2, 2, 3, 11, device="meta")
    labels = torch.zeros(2, 3, dtype=torch.int64, device="meta")
    w = torch.rand(2, 2, 3, device="meta")
    for mode in MODES:
        out = fastkd.kd_loss(s, teachers, labels, teacher_weights=w, teacher_mode=mode, alpha=0.5)
        assert out.device.type == "meta" and out.shape == ()
    out = fastkd.kd_loss(s, [teachers[0], teachers[1]], teacher_weights=[0.5, 0.5], reduction="none")
    assert out.shape == (2, 3)
