"""sparse_kd_loss (top-k / sampled teachers) against the float64 reference and its identities.

The reference (fastkd/sparse_reference.py) is checked by gradcheck and by two identities
that do not go through it: ``tail="bucket"`` is the dense reference loss on the implicit
teacher p~, and a support covering the whole vocabulary is the dense loss. Every kernel
backend that has sparse kernels (``SPARSE_BACKENDS``) is compared with the reference, in
float64 on the same (rounded) input values: fp32 within 1e-5, bf16/fp16 within 1e-2 (loss)
and 2e-2 (gradient), float64 within 1e-12.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import fastkd
from fastkd import sparse_reference
from fastkd._dispatch import get_backend
from fastkd.config import DIVERGENCES, FLOAT_SETTINGS, SPARSE_INT_SETTINGS, TAILS, SparseKDConfig, make_config
from fastkd.sparse import SparseKDLoss, sparse_kd_loss

from harness.compare import rel_err

# Kernel backends with sparse kernels here ("torch" is the reference itself).
SPARSE_BACKENDS = [name for name in ("cpu", "triton")
                   if get_backend(name) is not None and get_backend(name).has("sparse")
                   and get_backend(name).supports(torch.device("cpu"))]
# Those that take float64 input, for the identities checked to 1e-12 (Triton runs fp32 and
# below; tests/test_sparse_triton.py checks it on the same identities in fp32).
F64_BACKENDS = [name for name in SPARSE_BACKENDS if torch.float64 in get_backend(name).dtypes]
TAIL_DIVERGENCES = [(tail, div) for tail, div in itertools.product(TAILS, DIVERGENCES)
                    if tail != "none" or div == "forward_kl"]


def sparse_inputs(n=9, V=1003, K=40, T=2.0, seed=0, dtype=torch.float32, empty=True, neg_inf=True,
                  peaked_teacher=True):
    """Student logits ~ N(0, 3^2) (one row very peaked), the teacher's top-K log-probs at T,
    labels with an ignored token; empty slots (one holding NaN) and -inf log-probs.

    A very peaked teacher row has P = 1 to within rounding, so its tail is empty: reverse
    KL is then +inf (the student has mass outside the K ids), hence ``peaked_teacher``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g) * 3
    t = torch.randn(n, V, generator=g) * 3
    s[1] *= 6
    if peaked_teacher:
        t[1] *= 6
    top = (t / T).log_softmax(-1).topk(K, dim=-1)
    ids, lp = top.indices.clone(), top.values.clone()
    perm = torch.argsort(torch.rand(n, K, generator=g), dim=-1)  # ids in no particular order
    ids, lp = ids.gather(-1, perm), lp.gather(-1, perm)
    if empty:
        ids[0, 3], lp[0, 3] = -1, float("nan")   # never read as a number
        ids[2, 5:], lp[2, 5:] = -7, 0.0          # a shorter support
        ids[3], lp[3] = -1, 0.0                  # no support at all
    if neg_inf:
        lp[4, 0] = float("-inf")                 # a kept id the teacher gives no mass
    labels = torch.randint(0, V, (n,), generator=g)
    labels[-3] = -100
    return s.to(dtype), ids, lp.to(dtype), labels


def run(backend, s, ids, lp, labels=None, **kw):
    if backend == "torch":  # the reference backend, in float64: exact
        s, lp = s.double(), lp.double()
    x = s.detach().clone().requires_grad_(True)
    loss = sparse_kd_loss(x, ids, lp, labels, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def reference(s, ids, lp, labels=None, **kw):
    """The float64 reference on the same values (the rounding of the input is not error)."""
    return run("torch", s.double(), ids, lp.double(), labels, **kw)


# ---------------------------------------------------------------------------------------
# The reference itself.

@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
def test_reference_gradcheck(tail, divergence):
    s, ids, lp, labels = sparse_inputs(n=4, V=11, K=5, T=1.5, neg_inf=False)
    lp = torch.where(ids >= 0, lp, torch.zeros_like(lp))  # gradcheck perturbs s only; NaN slots stay out
    s = (s / 3).double().requires_grad_(True)
    f = lambda x: sparse_reference.sparse_kd_loss(x, ids, lp.double(), labels, divergence=divergence, tail=tail,
                                                  temperature=1.5, alpha=0.7, beta=0.3)
    assert torch.autograd.gradcheck(f, (s,), fast_mode=True)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["torch"] + F64_BACKENDS)
def test_bucket_is_the_dense_loss_on_the_implicit_teacher(backend, divergence):
    """bucket == kd_loss(s, T log p~) with p~ = p on S, q (1-P)/(1-Q) off S, a constant."""
    T = 2.0
    s, ids, lp, labels = sparse_inputs(T=T, neg_inf=False)
    s, lp = s.double(), lp.double()
    log_pt = sparse_reference.implicit_teacher_logprobs(s, ids, lp, temperature=T)
    assert torch.allclose(log_pt.exp().sum(-1), torch.ones(s.shape[0], dtype=torch.float64), atol=1e-12)
    kw = dict(divergence=divergence, temperature=T, alpha=0.8, beta=0.3)
    loss, grad = run(backend, s, ids, lp, labels, **kw)
    x = s.clone().requires_grad_(True)
    dense = fastkd.reference.kd_loss(x, T * log_pt, labels, **kw)
    (dense_grad,) = torch.autograd.grad(dense, x)
    assert rel_err(loss, dense.detach()) < 1e-12
    assert rel_err(grad, dense_grad) < 1e-12


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", ["torch"] + F64_BACKENDS)
def test_full_support_is_the_dense_loss(backend, divergence, tail):
    """K = V (ids in any order): the tail bin is empty (0 log 0 = 0) and renorm changes
    nothing, so the loss is kd_loss's; fp32 log-probs whose P rounds away from 1 included."""
    T, V = 1.5, 211
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, V, generator=g) * 3, torch.randn(5, V, generator=g) * 3
    lp_full = (t / T).log_softmax(-1)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(5)])
    lp = lp_full.gather(-1, ids)
    kw = dict(divergence=divergence, temperature=T)
    loss, grad = run(backend, s.double(), ids, lp.double(), tail=tail, **kw)
    x = s.double().requires_grad_(True)
    dense = fastkd.reference.kd_loss(x, t.double(), **kw)
    (dense_grad,) = torch.autograd.grad(dense, x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # The support's log-probs are fp32-rounded, so the teacher differs from t by 1e-7.
    assert rel_err(loss, dense.detach()) < 1e-5
    assert rel_err(grad, dense_grad) < 1e-5
    loss32, grad32 = run(backend, s, ids, lp, tail=tail, **kw)  # P != 1 in fp32 rounding
    assert torch.isfinite(loss32).all() and torch.isfinite(grad32).all()


# ---------------------------------------------------------------------------------------
# Kernels against the reference.

@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_fp32_matches_reference(backend, tail, divergence):
    for T, alpha in ((1.0, 1.0), (2.0, 0.6)):
        # A kept id with no teacher mass makes reverse KL infinite: left out there.
        s, ids, lp, labels = sparse_inputs(T=T, neg_inf=divergence != "reverse_kl",
                                           peaked_teacher=divergence != "reverse_kl")
        kw = dict(divergence=divergence, tail=tail, temperature=T, alpha=alpha, beta=0.3)
        ref_loss, ref_grad = reference(s, ids, lp, labels, **kw)
        loss, grad = run(backend, s, ids, lp, labels, **kw)
        assert loss.dtype == torch.float32 and grad.dtype == torch.float32
        assert torch.isfinite(ref_loss).all()
        assert rel_err(loss, ref_loss) < 1e-5, (T, alpha)
        assert rel_err(grad, ref_grad) < 1e-5, (T, alpha)


@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
def test_float64_on_cpu_within_1e12(tail, divergence):
    if "cpu" not in SPARSE_BACKENDS:
        pytest.skip("no cpu sparse kernel in this build")
    s, ids, lp, labels = sparse_inputs(T=2.0)
    kw = dict(divergence=divergence, tail=tail, temperature=2.0, alpha=0.6)
    ref_loss, ref_grad = reference(s, ids, lp, labels, **kw)
    loss, grad = run("cpu", s.double(), ids, lp.double(), labels, **kw)
    assert loss.dtype == torch.float64
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_low_precision_input(backend, tail, dtype):
    s, ids, lp, labels = sparse_inputs(dtype=dtype)
    kw = dict(tail=tail, temperature=2.0, alpha=0.8)
    ref_loss, ref_grad = reference(s, ids, lp, labels, **kw)
    loss, grad = run(backend, s, ids, lp, labels, **kw)
    assert grad.dtype == dtype
    assert rel_err(loss, ref_loss) < 1e-2 and rel_err(grad.double(), ref_grad) < 2e-2


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_p_close_to_one_without_cancellation(backend, divergence):
    """K = 1024 of V = 2048 with 1 - P ~ 2e-6 and 1 - Q ~ 2e-5: the fp32 kernel is within
    1e-5 of float64, where forming 1 - sum p in fp32 is off by percents (checked below)."""
    V, K = 2048, 1024
    g = torch.Generator().manual_seed(5)
    t, s = torch.randn(4, V, generator=g), torch.randn(4, V, generator=g)
    t[:, :K] += 13.0
    s[:, :K] += 11.0
    lp = t.log_softmax(-1)[:, :K].contiguous()
    ids = torch.arange(K).repeat(4, 1)
    tail_p = -torch.expm1(lp.double().logsumexp(-1))
    assert (tail_p > 1e-6).all() and (tail_p < 1e-5).all()
    naive = 1.0 - lp.exp().sum(-1)  # fp32, what an unfused implementation writes
    naive_err = (naive.double() - tail_p).abs() / tail_p
    assert naive_err.max() > 1e-2
    if backend == "triton":  # the interpreter runs a row's 1024 slots slowly: the worst row only
        worst = naive_err.argmax().reshape(1)
        s, ids, lp = s[worst], ids[worst], lp[worst]
    kw = dict(divergence=divergence, reduction="sum")
    ref_loss, ref_grad = reference(s, ids, lp, **kw)
    loss, grad = run(backend, s, ids, lp, **kw)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", ["torch"] + SPARSE_BACKENDS)
def test_empty_slots_change_nothing(backend):
    """Padding a support with empty slots (any log-prob, NaN included) is the same loss; a
    token with no support at all has D = 0 and no divergence gradient."""
    s, ids, lp, labels = sparse_inputs(n=6, empty=False, neg_inf=False)
    perm = torch.randperm(ids.shape[1] + 7, generator=torch.Generator().manual_seed(1))  # empties anywhere
    pad_ids = torch.cat([ids, torch.full((6, 7), -1)], dim=-1)[:, perm]
    pad_lp = torch.cat([lp, torch.full((6, 7), float("nan"))], dim=-1)[:, perm]
    for tail in TAILS:
        a = run(backend, s, ids, lp, labels, tail=tail, alpha=0.5)
        b = run(backend, s, pad_ids, pad_lp, labels, tail=tail, alpha=0.5)
        assert rel_err(b[0], a[0]) < 1e-6 and rel_err(b[1], a[1]) < 1e-6, tail
        none_ids = torch.full_like(ids, -1)
        loss, grad = run(backend, s, none_ids, lp, tail=tail, reduction="none")
        assert torch.equal(loss, torch.zeros_like(loss)), tail
        assert grad.abs().max() < 1e-6, tail


@pytest.mark.parametrize("backend", ["torch"] + SPARSE_BACKENDS)
def test_neg_inf_logprobs_and_logits(backend):
    """-inf log-probs (kept ids without teacher mass) and -inf student logits off the
    support (a masked vocabulary, labels excluded) are legal: finite loss and gradient, as
    the reference; reverse KL is +inf where the teacher has no mass and the student has."""
    s, ids, lp, labels = sparse_inputs(neg_inf=True)
    lp[5, :3] = float("-inf")
    keep = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, ids.clamp_min(0), True)
    keep.scatter_(-1, labels.clamp_min(0)[:, None], True)
    s = s.masked_fill(~keep & (torch.arange(s.shape[1]) % 3 == 0), float("-inf"))
    for tail, div in TAIL_DIVERGENCES:
        kw = dict(tail=tail, divergence=div, alpha=0.7, reduction="none")
        ref_loss, ref_grad = reference(s, ids, lp, labels, **kw)
        loss, grad = run(backend, s, ids, lp, labels, **kw)
        finite = torch.ones_like(loss, dtype=torch.bool)
        if div == "reverse_kl":
            finite[[4, 5]] = False
            assert torch.isposinf(loss[[4, 5]]).all() and torch.isposinf(ref_loss[[4, 5]]).all()
        assert torch.isfinite(loss[finite]).all() and torch.isfinite(grad[finite]).all(), (tail, div)
        assert rel_err(loss[finite], ref_loss[finite]) < 1e-5, (tail, div)
        assert rel_err(grad[finite], ref_grad[finite]) < 1e-5, (tail, div)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_reductions_ignored_tokens_and_num_items(backend, reduction):
    s, ids, lp, labels = sparse_inputs(n=12)
    s, ids, lp, labels = s.reshape(3, 4, -1), ids.reshape(3, 4, -1), lp.reshape(3, 4, -1), labels.reshape(3, 4)
    labels[0, :2] = -100
    kw = dict(reduction=reduction, alpha=0.5, temperature=2.0)
    ref_loss, ref_grad = reference(s, ids, lp, labels, **kw)
    loss, grad = run(backend, s, ids, lp, labels, **kw)
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    assert grad[0, :2].abs().max() == 0  # ignored tokens: no gradient from any term
    if reduction == "mean":
        loss_n, grad_n = run(backend, s, ids, lp, labels, num_items=37, **kw)
        n_valid = int((labels != -100).sum())
        torch.testing.assert_close(loss_n, loss * n_valid / 37)
        torch.testing.assert_close(grad_n, grad * n_valid / 37)
        all_ignored = torch.full_like(labels, -100)
        zero, _ = run(backend, s, ids, lp, all_ignored, **kw)
        assert zero.item() == 0.0


@pytest.mark.parametrize("backend", ["torch"] + SPARSE_BACKENDS)
def test_vocab_size_cut(backend):
    """Only the first vocab_size student columns count; the rest get zero gradient; an id
    at or past vocab_size is an error."""
    s, ids, lp, labels = sparse_inputs(V=1003)
    wide = torch.cat([s, torch.randn(s.shape[0], 37) * 3], dim=-1)
    loss, grad = run(backend, wide, ids, lp, labels, vocab_size=1003, alpha=0.5)
    ref_loss, ref_grad = reference(s, ids, lp, labels, alpha=0.5)
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad[:, :1003], ref_grad) < 1e-5
    assert torch.equal(grad[:, 1003:], torch.zeros_like(grad[:, 1003:]))
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 1000\)"):
        sparse_kd_loss(wide, ids, lp, vocab_size=1000, backend=backend)


@pytest.mark.parametrize("backend", ["torch"] + F64_BACKENDS)
def test_rs_kd_gradient_is_q_minus_w(backend):
    """Random-sampling KD: unique sampled ids with importance weights summing to 1 (P = 1),
    tail bucket, forward KL: the gradient is q - w (w zero off the samples), unbiased."""
    V, K = 500, 30
    g = torch.Generator().manual_seed(7)
    s = torch.randn(3, V, generator=g, dtype=torch.float64) * 2
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(3)])
    w = torch.rand(3, K, generator=g, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    loss, grad = run(backend, s, ids, w.log(), reduction="sum", t_squared=False)
    expected = s.softmax(-1) - torch.zeros_like(s).scatter(-1, ids, w)
    assert torch.isfinite(loss).all()
    assert rel_err(grad, expected) < 1e-12


@pytest.mark.parametrize("backend", ["torch"] + SPARSE_BACKENDS)
def test_tail_none_is_not_clamped(backend):
    """tail='none' on inconsistent input (the student gives the support more mass than the
    teacher's log-probs) is negative and stays negative."""
    s = torch.tensor([[5.0, 5.0, 0.0, 0.0]])
    ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.3, 0.3]]))
    loss, _ = run(backend, s, ids, lp, tail="none", reduction="sum")
    ref_loss, _ = reference(s, ids, lp, tail="none", reduction="sum")
    assert ref_loss.item() < 0 and abs(loss.item() - ref_loss.item()) < 1e-6


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_inplace_backward(backend):
    s, ids, lp, labels = sparse_inputs()
    kw = dict(alpha=0.6, temperature=2.0, backend=backend)
    leaf = s.clone().requires_grad_(True)
    sparse_kd_loss(leaf * 1, ids, lp, labels, **kw).backward()
    expected = leaf.grad.clone()
    leaf.grad = None
    logits = leaf * 1
    loss = sparse_kd_loss(logits, ids, lp, labels, inplace_backward=True, **kw)
    assert torch.allclose(logits.detach(), expected)  # overwritten in the forward call
    loss.backward()
    assert rel_err(leaf.grad, expected) < 1e-6
    with pytest.raises(ValueError, match="inplace_backward=True would overwrite"):
        sparse_kd_loss(leaf, ids, lp, labels, inplace_backward=True, **kw)


# ---------------------------------------------------------------------------------------
# Errors, settings, module.

def test_bad_ids_and_settings_raise():
    s, ids, lp, labels = sparse_inputs()
    dup = ids.clone()
    dup[1, 4] = dup[1, 7]
    with pytest.raises(ValueError, match="must not repeat an id"):
        sparse_kd_loss(s, dup, lp)
    far = ids.clone()
    far[2, 0] = 1003
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 1003\)"):
        sparse_kd_loss(s, far, lp)
    with pytest.raises(TypeError, match="teacher_ids must be an int32 or int64"):
        sparse_kd_loss(s, ids.float(), lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be a floating tensor"):
        sparse_kd_loss(s, ids, ids)
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape of teacher_ids"):
        sparse_kd_loss(s, ids, lp[:, :-1])
    with pytest.raises(ValueError, match="teacher_ids must have shape"):
        sparse_kd_loss(s, ids[:-1], lp[:-1])
    with pytest.raises(ValueError, match="tail='none' is forward KL only"):
        sparse_kd_loss(s, ids, lp, tail="none", divergence="jsd")
    with pytest.raises(ValueError, match="tail must be one of"):
        sparse_kd_loss(s, ids, lp, tail="clamp")
    with pytest.raises(ValueError, match="teacher_logprobs requires grad"):
        sparse_kd_loss(s, ids, lp.clone().requires_grad_(True))
    with pytest.raises(TypeError, match="unexpected keyword argument 'tail'"):
        fastkd.kd_loss(s, s, tail="bucket")
    with pytest.raises(ValueError, match="tail='none' is forward KL only"):
        SparseKDLoss("tvd", tail="none")


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_kernel_marks_rows_it_cannot_trust_nan(backend):
    """Where the Python checks do not run (GPU, compile), the operators give a row with a
    repeated or out-of-range id a NaN loss and gradient; the other rows are untouched."""
    s, ids, lp, _ = sparse_inputs(n=4, empty=False, neg_inf=False)
    ids[1, 2] = ids[1, 3]
    ids[2, 0] = s.shape[1]
    cfg = make_config(config=SparseKDConfig).with_vocab_size(s.shape[1])
    loss, grad = get_backend(backend).sparse_forward(s, ids, lp, None, torch.ones(()), cfg)
    assert torch.isnan(loss[1:3]).all() and torch.isnan(grad[1:3]).all()
    assert torch.isfinite(loss[[0, 3]]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_settings_order_matches_the_extension():
    if "cpu" not in SPARSE_BACKENDS:
        pytest.skip("no cpu sparse kernel in this build")
    from fastkd.backends.cpp import load_extension

    assert tuple(load_extension().sparse_int_settings) == SPARSE_INT_SETTINGS
    ints, floats = make_config(config=SparseKDConfig, tail="renorm", divergence="tvd").with_vocab_size(9).kernel_settings()
    assert ints == [3, -100, 9, 1] and tuple(load_extension().float_settings) == FLOAT_SETTINGS and len(floats) == len(FLOAT_SETTINGS)


def test_module_and_signature():
    import inspect

    crit = SparseKDLoss("jsd", tail="renorm", beta=0.3)
    assert crit.config.tail == "renorm" and "tail='renorm'" in repr(crit)
    assert "tail" in inspect.signature(sparse_kd_loss).parameters
    assert "tail" not in inspect.signature(fastkd.kd_loss).parameters
    assert "tail:" in sparse_kd_loss.__doc__ and "tail:" not in fastkd.kd_loss.__doc__
    s, ids, lp, labels = sparse_inputs()
    torch.testing.assert_close(crit(s, ids, lp, labels),
                               sparse_kd_loss(s, ids, lp, labels, divergence="jsd", tail="renorm", beta=0.3))
    assert math.isfinite(float(crit(s, ids.int(), lp.to(torch.bfloat16))))  # int32 ids, bf16 log-probs


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The sparse operators' fakes let torch.compile(fullgraph=True) trace the whole call."""
    s, ids, lp, labels = sparse_inputs(n=6, V=300, K=10)
    f = torch.compile(lambda x, T: sparse_kd_loss(x, ids, lp, labels, temperature=T, alpha=0.5, backend=backend),
                      fullgraph=True)
    x = s.clone().requires_grad_(True)
    out = f(x, 2.0)
    (grad,) = torch.autograd.grad(out, x)
    ref_loss, ref_grad = reference(s, ids, lp, labels, temperature=2.0, alpha=0.5)
    assert rel_err(out.detach(), ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("tail", ["bucket", "none"])
def test_streamed_gradient_is_the_same(tail):
    """A gradient of 32 MiB or more is written with non-temporal stores (csrc/cpu/
    sparse_cpu.cpp): the same bits as two calls on halves of the rows, which store plainly,
    for rows that start at any alignment (odd V, a row stride that is not V)."""
    if "cpu" not in SPARSE_BACKENDS:
        pytest.skip("no cpu sparse kernel in this build")
    n, V, K = 300, 30001, 16
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(n, V + 3, generator=g) * 3)[:, 1:V + 1]   # rows start 4 bytes past any alignment
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    lp = torch.randn(n, K, generator=g).log_softmax(-1) - 0.5
    cfg = make_config(config=SparseKDConfig, tail=tail, temperature=2.0).with_vocab_size(V)
    cpu = get_backend("cpu")
    loss, grad = cpu.sparse_forward(s, ids, lp, None, torch.ones(()), cfg)
    assert grad.numel() * 4 >= 32 << 20
    halves = [cpu.sparse_forward(s[r], ids[r], lp[r], None, torch.ones(()), cfg)
              for r in (slice(0, n // 2), slice(n // 2, n))]
    assert torch.equal(loss, torch.cat([h[0] for h in halves]))
    assert torch.equal(grad, torch.cat([h[1] for h in halves]))
