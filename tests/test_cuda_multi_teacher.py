"""Several teachers on the CUDA kernel (csrc/cuda/kd_multi.cu), against the float64 reference,
on a GPU. Every test is marked ``gpu`` and skipped without CUDA; written on a machine without
a GPU, so none of them has run yet (the kernel is compile-checked only; its arithmetic is
emulated on the CPU by tests/test_cuda_multi_emulation.py).

Until ``"cuda"`` is in ``fastkd._dispatch.MULTI_TEACHER_BACKENDS``, ``kd_loss(...,
backend="cuda")`` refuses several teachers: the autouse fixture below adds it for these tests,
so they run the kernel either way.

Covered: every divergence x teacher mode x weights kind (uniform, per-teacher numbers with
stride-0 weights, per token, routed one-hot with NaN in the unused teachers' rows, partial:
1 < active < K), K = 1..4, the logit options, CE with alpha and ignore_index, a padded
vocabulary, mixed teacher dtypes (read as given, or copied to float32), in-place backward,
long rows (V = 128256), routing against the one-teacher kernel, and the parity with the
``cpu`` and ``triton`` backends where they run several teachers.
"""
import pytest
import torch

import fastkd
from fastkd import _dispatch, reference

from harness.backends import kernel_backend
from harness.compare import assert_close, rel_err
from harness.inputs import logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = ("mixture", "sum")
WEIGHTS = ("uniform", "numbers", "per-token", "routed", "partial")
ALL_OPTIONS = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.2,
                   z_loss=1e-3)
GEMMA = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4)


@pytest.fixture(autouse=True)
def cuda_runs_several_teachers(monkeypatch):
    kernels = kernel_backend("cuda")
    if kernels is None:
        pytest.fail("a CUDA device is present but fastkd._C was built without its CUDA kernels")
    if kernels.multi_forward is None:
        pytest.fail("fastkd._C has no kd_multi_forward operator: rebuild it")
    monkeypatch.setattr(_dispatch, "MULTI_TEACHER_BACKENDS", _dispatch.MULTI_TEACHER_BACKENDS | {"cuda"})


def last_kernel() -> str:
    return torch.ops.fastkd.cuda_last_kernel()


def _case(n, v, k, weights, seed, s_dtype=torch.bfloat16, t_dtypes=None, widths=None):
    """Student, K teachers, labels (every fifth ignored), weights of a kind on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t_dtypes = t_dtypes or (s_dtype,) * k
    s = logits((n, v), s_dtype, g)
    ts = [logits((n, (widths or {}).get(j, v)), t_dtypes[j], g) for j in range(k)]
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = -100
    rows = torch.arange(n, device="cuda")
    if weights == "uniform":
        w = None
    elif weights == "numbers":
        w = [float(x) for x in torch.linspace(1.0, 2.0, k).div(torch.linspace(1.0, 2.0, k).sum())]
    else:
        w = torch.rand(k, n, device="cuda", generator=g) + 0.1
        if weights == "routed":
            w = torch.nn.functional.one_hot(rows % k, k).T.float()
        elif weights == "partial" and k > 1:
            w[rows % k, rows] = 0.0
        w = w / w.sum(0)
        for j, t in enumerate(ts):  # a teacher's rows where its weight is 0: never read
            t[w[j] == 0] = float("nan")
    return s, ts, labels, w


def _result(s, ts, labels, w, backend="cuda", inplace=False, **kw):
    """Per-row loss and gradient (of their sum) of a backend, in float64."""
    x0 = (s.detach().clone() if inplace else s.detach()).requires_grad_(True)
    x = x0 * 1 if inplace else x0  # in-place backward writes into a non-leaf's buffer
    loss = fastkd.kd_loss(x, ts, labels, teacher_weights=w, backend=backend, inplace_backward=inplace,
                          reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    return loss.detach().double(), grad.double()


def _reference(s, ts, labels, w, **kw):
    """The float64 reference on the same (rounded) values, on the GPU."""
    x = s.detach().double().requires_grad_(True)
    loss = reference.kd_loss(x, [t.double() for t in ts], labels, teacher_weights=w, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def _check(s, ts, labels, w, low_precision=None, **kw):
    loss, grad = _result(s, ts, labels, w, **kw)
    low = low_precision if low_precision is not None else s.dtype != torch.float32
    assert_close(loss, grad, *_reference(s, ts, labels, w, **kw), low_precision=low)
    assert last_kernel().startswith("multi["), last_kernel()
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_mode_and_weights(divergence, mode, weights, dtype):
    # V = 4099: odd, so rows are off 16 bytes and packs straddle both ends of a row.
    s, ts, labels, w = _case(40, 4099, 3, weights, seed=DIVERGENCES.index(divergence), s_dtype=dtype)
    _check(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, beta=0.3)
    assert "teachers=read" in last_kernel()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_to_four_teachers(divergence, mode, k):
    s, ts, labels, w = _case(24, 32000, k, "per-token", seed=10 + k)
    _check(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=1.5, alpha=0.8)
    assert last_kernel().startswith(f"multi[K={k},"), last_kernel()


@pytest.mark.parametrize("options", ["all", "gemma"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logit_options(divergence, mode, options):
    s, ts, labels, w = _case(24, 50257, 2, "partial", seed=20, s_dtype=torch.float32)
    kw = ALL_OPTIONS if options == "all" else GEMMA
    _check(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=1.5, alpha=0.6, **kw)
    # The z-loss needs no labels; at T = 1 the CE softmax is q itself.
    _check(s, ts, None, w, divergence=divergence, teacher_mode=mode, temperature=1.0, z_loss=1e-2, softcap=30.0)


@pytest.mark.parametrize("s_dtype,t_dtypes,how", [
    (torch.bfloat16, (torch.bfloat16, torch.float32), "copied"),   # several dtypes: float32 copies
    (torch.bfloat16, (torch.float32, torch.float32), "read"),      # bf16 student, fp32 teachers: built
    (torch.float32, (torch.bfloat16, torch.bfloat16), "read"),     # fp32 student, bf16 teachers: built
    (torch.float32, (torch.float16, torch.float16), "copied"),     # not built: float32 copies
    (torch.float16, (torch.bfloat16, torch.float16), "copied"),
], ids=["bf16+mixed", "bf16+f32", "f32+bf16", "f32+f16", "f16+mixed"])
@pytest.mark.parametrize("mode", MODES)
def test_teacher_dtypes(s_dtype, t_dtypes, how, mode):
    s, ts, labels, w = _case(24, 32003, 2, "per-token", seed=30, s_dtype=s_dtype, t_dtypes=t_dtypes)
    for divergence in DIVERGENCES:
        _check(s, ts, labels, w, low_precision=True, divergence=divergence, teacher_mode=mode, temperature=2.0)
        assert f"teachers={how}" in last_kernel(), last_kernel()


def test_padded_vocabulary():
    # Teachers wider than vocab_size (their padding is never read: 1e4 there would dominate),
    # and a student whose padded columns get zero gradient.
    s, ts, labels, w = _case(24, 32064, 2, "per-token", seed=40, widths={0: 32064, 1: 32128})
    labels = torch.where(labels >= 0, labels % 32000, labels)
    for t in ts:
        t[:, 32000:] = 1e4
    for mode in MODES:
        loss, grad = _result(s, ts, labels, w, teacher_mode=mode, vocab_size=32000)
        ref_loss, ref_grad = _reference(s[:, :32000], [t[:, :32000] for t in ts], labels, w, teacher_mode=mode)
        assert_close(loss, grad[:, :32000], ref_loss, ref_grad, low_precision=True)
        assert torch.equal(grad[:, 32000:], torch.zeros_like(grad[:, 32000:]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_inplace_backward(divergence, mode):
    s, ts, labels, w = _case(24, 32000, 3, "partial", seed=50)
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.5)
    loss, grad = _result(s, ts, labels, w, inplace=True, **kw)
    assert_close(loss, grad, *_reference(s, ts, labels, w, **kw), low_precision=True)
    loss2, grad2 = _result(s, ts, labels, w, **kw)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)  # the same kernel, in place or not


@pytest.mark.parametrize("weights", ["per-token", "routed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_llm_vocabulary(divergence, mode, weights):
    s, ts, labels, w = _case(16, 128256, 2, weights, seed=60)
    _check(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_routing_equals_the_one_teacher_kernel_on_each_teachers_rows(divergence):
    s, ts, labels, w = _case(30, 32000, 3, "routed", seed=70, s_dtype=torch.float32)
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.7)
    for mode in MODES:
        loss, grad = _result(s, ts, labels, w, teacher_mode=mode, **kw)
        for j, t in enumerate(ts):
            rows = w[j] == 1
            one, g_one = _result(s[rows], t[rows], labels[rows], None, **kw)
            assert rel_err(loss[rows], one) < 1e-5 and rel_err(grad[rows], g_one) < 1e-5, (mode, j)


def test_nan_weight_and_nan_in_a_used_teacher_reach_the_row():
    s, ts, labels, w = _case(20, 4099, 2, "per-token", seed=80, s_dtype=torch.float32)
    labels[:] = 1
    w[0, 3] = float("nan")
    ts[1][5, 11] = float("nan")
    for mode in MODES:
        loss, grad = _result(s, ts, labels, w, teacher_mode=mode)
        for row in (3, 5):
            assert torch.isnan(loss[row]) and torch.isnan(grad[row]).any(), (mode, row)
        others = [r for r in range(20) if r not in (3, 5)]
        assert torch.isfinite(loss[others]).all() and torch.isfinite(grad[others]).all()


def test_sum_mode_row_without_teachers_has_only_its_hard_label_terms():
    s, ts, labels, w = _case(20, 4099, 2, "per-token", seed=90, s_dtype=torch.float32)
    w[:, 4] = 0.0
    for t in ts:
        t[4] = float("nan")
    _check(s, ts, labels, w, teacher_mode="sum", divergence="jsd", alpha=0.5)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_parity_with_the_other_kernels(backend, divergence, mode):
    kernels = kernel_backend(backend)
    if kernels is None or kernels.multi_forward is None or backend not in _dispatch.MULTI_TEACHER_BACKENDS:
        pytest.skip(f"the {backend} backend does not run several teachers in this build")
    device = "cuda" if backend == "triton" else "cpu"
    s, ts, labels, w = _case(24, 32000, 3, "partial", seed=100, s_dtype=torch.float32)
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7)
    loss, grad = _result(s, ts, labels, w, **kw)
    other, g_other = _result(s.to(device), [t.to(device) for t in ts], labels.to(device), w.to(device),
                             backend=backend, **kw)
    assert rel_err(loss.cpu(), other.cpu()) < 1e-5 and rel_err(grad.cpu(), g_other.cpu()) < 1e-5
