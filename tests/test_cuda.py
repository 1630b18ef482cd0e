"""The CUDA kernels (csrc/cuda) against fastkd.reference in float64, on a GPU.

Every test is marked ``gpu`` and skipped without CUDA. ``test_correctness.py`` already
runs the shared case list on the ``cuda`` backend with the automatic kernel choice; this
file forces each kernel in turn (``FASTKD_CUDA_KERNEL``: the two-pass kernel everywhere,
the cluster kernel on sm_90) and adds what the small shared cases cannot reach:
vocabularies of 32k-262k (multi-CTA clusters), N * V > 2^31, in-place backward and
padded/strided rows at those sizes, row statistics, and a sync-free backward.
"""
import pytest
import torch

from harness.backends import cuda_kernel_plan as plan
from harness.backends import cuda_last_kernel as last_kernel
from harness.backends import kernel_backend, kernel_settings
from harness.cases import ALL_CASES, DIVERGENCES, LARGE_VOCAB_CENTRED
from harness.compare import assert_close, check_case, fp32_grad_tolerance, rel_err
from harness.inputs import logits, make_inputs
from harness.results import backend_result, reference_loss_and_grad, reference_result, run_backend
from harness.registry import runs_case

import fastkd

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


KERNELS = [
    "twopass",
    pytest.param("cluster", marks=pytest.mark.skipif(not _is_sm90(), reason="cluster kernel needs sm_90")),
]


@pytest.fixture(autouse=True)
def cuda_backend():
    if kernel_backend("cuda") is None:
        pytest.fail("a CUDA device is present but fastkd._C was built without its CUDA kernels")


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Forces one kernel for the test (read by the C++ glue at every call)."""
    monkeypatch.setenv("FASTKD_CUDA_KERNEL", request.param)
    return request.param


def cluster_refusal(s, t, **kw):
    """Why a forced cluster kernel refuses these logits (the plan op raises what the call
    would), or None when it runs them."""
    try:
        plan(s, t, **kw)
    except RuntimeError as exc:
        assert "FASTKD_CUDA_KERNEL=cluster" in str(exc), exc
        return str(exc)
    return None


def assert_ran(kernel, s, t, **kw):
    """The last forward launch was the forced kernel, with the plan the plan op gives."""
    ran = last_kernel()
    assert ran.startswith(kernel + "["), ran
    assert ran == plan(s, t, **kw), (ran, plan(s, t, **kw))


# ---------------------------------------------------------------------------------------
# The shared case list, once per kernel (the cluster kernel runs these small rows with a
# one-CTA cluster, its masking of partial packs included).

@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_shared_cases(case, kernel):
    if not runs_case("cuda", case):
        pytest.skip("the cuda backend does not apply the logit options yet")
    s, t, _ = make_inputs(case, "cuda")  # what check_case makes: the same layouts
    if kernel == "cluster" and (why := cluster_refusal(s, t)) is not None:
        # Mixed dtypes: a forced cluster kernel is an error, never a silent two-pass run.
        with pytest.raises(RuntimeError, match="FASTKD_CUDA_KERNEL=cluster"):
            check_case(case, "cuda", "cuda")
        assert "dtypes differ" in why or "aligned" in why, why
        return
    check_case(case, "cuda", "cuda")
    assert last_kernel().startswith(kernel + "["), last_kernel()


# ---------------------------------------------------------------------------------------
# Vocabularies of LLMs: multi-CTA clusters (C = 2 .. 16), every divergence.

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab,dtype", [
    (128256, torch.bfloat16),   # Llama 3: 8 CTAs
    (262144, torch.bfloat16),   # Gemma 3: 16 CTAs
    (32000, torch.float16),     # Llama 2: 2 CTAs
    (50257, torch.bfloat16),    # GPT-2: odd V, rows not 16-byte aligned
    (20001, torch.float32),     # fp32, 3 CTAs
])
@pytest.mark.parametrize("alpha,temperature", [(1.0, 2.0), (0.6, 1.0), (0.6, 0.7)])
def test_large_vocab(divergence, vocab, dtype, alpha, temperature, kernel):
    g = torch.Generator(device="cuda").manual_seed(vocab + 7 * len(divergence))
    n = 24
    s, t = logits((n, vocab), dtype, g), logits((n, vocab), dtype, g)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[::5] = -100
    kw = dict(divergence=divergence, temperature=temperature, alpha=alpha, reduction="mean")
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    assert_close(loss, grad, *reference_result(s, t, labels, **kw), low_precision=dtype != torch.float32)
    assert_ran(kernel, s, t)


# fp32 reverse KL / JSD: the gradient within 1e-5 of float64, or 2x PyTorch's own fp32
# error (on the GPU) where larger; the shared cases at V = 32000, and at T = 1 also at
# 128256 (cluster: 16 CTAs of fp32) and 262144 (the two-pass kernel's longest rows).
FP32_CENTRED = LARGE_VOCAB_CENTRED + [
    c.replace(vocab=v, lead=(8,)) for v in (128256, 262144) for c in LARGE_VOCAB_CENTRED if c.temperature == 1.0
]


@pytest.mark.parametrize("case", FP32_CENTRED, ids=[c.id for c in FP32_CENTRED])
def test_fp32_centred_gradient_large_vocab(case, kernel):
    s, t, labels = make_inputs(case, "cuda")
    _, ref_grad = reference_loss_and_grad(case, s, t, labels)
    _, grad = run_backend(case, "cuda", s, t, labels)
    err = rel_err(grad, ref_grad)
    tol = fp32_grad_tolerance(case, s, t, labels, ref_grad, device="cuda")
    assert err < tol, f"grad rel err {err:.3g} >= {tol:.3g} ({last_kernel()})"
    assert last_kernel().startswith(kernel + "["), last_kernel()


@pytest.mark.parametrize("vocab", [128256, 50257])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_vocabulary_entries(vocab, divergence, kernel):
    """-inf logits (masked tokens) on both sides: zero probability, no NaN."""
    g = torch.Generator(device="cuda").manual_seed(11)
    n = 16
    s, t = logits((n, vocab), torch.bfloat16, g), logits((n, vocab), torch.bfloat16, g)
    masked = torch.rand(vocab, device="cuda", generator=g) < 0.1
    masked[0] = False
    s[:, masked] = float("-inf")
    t[:, masked] = float("-inf")
    labels = torch.zeros(n, dtype=torch.long, device="cuda")
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.6, reduction="sum")
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, grad, *reference_result(s, t, labels, **kw), low_precision=True)


@pytest.mark.parametrize("vocab", [128256, 32000])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_inplace_backward_large(vocab, divergence, kernel):
    g = torch.Generator(device="cuda").manual_seed(5)
    n = 32
    s, t = logits((n, vocab), torch.bfloat16, g), logits((n, vocab), torch.bfloat16, g)
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[3] = -100
    kw = dict(divergence=divergence, temperature=2.0, alpha=0.5)
    loss_a, grad_a = backend_result(s, t, labels, "cuda", inplace=False, **kw)
    loss_b, grad_b = backend_result(s, t, labels, "cuda", inplace=True, **kw)
    assert_ran(kernel, s, t, inplace=True)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)


def test_padded_and_strided_rows(kernel):
    """Qwen-style padded teacher (vocab_size=), a student that is a strided view, and
    labels: the gradient past vocab_size is zero."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n, v, vt = 20, 151936, 152064
    s_buf = logits((n, v + 64), torch.bfloat16, g)
    s = s_buf[:, 8:8 + v]  # row stride v + 64, starts 16 bytes in
    t = logits((n, vt), torch.bfloat16, g)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    kw = dict(divergence="forward_kl", temperature=2.0, alpha=0.7, vocab_size=v)
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    ref_loss, ref_grad = reference_result(s, t, labels, **kw)
    assert_close(loss, grad, ref_loss, ref_grad, low_precision=True)
    # The student's rows start 16 bytes in and are 16-byte multiples apart; the teacher's
    # are 16-byte aligned and 152064 columns apart, so the teacher's relative offset is
    # 8 columns (16 bytes) on every row: whole packs for all three tensors.
    assert_ran(kernel, s, t, vocab_size=v)
    assert "t_part=8,g_part=8" in last_kernel() or kernel == "cluster", last_kernel()

    # Student wider than vocab_size: its extra columns get exactly zero gradient.
    wide = logits((n, vt), torch.bfloat16, g).requires_grad_(True)
    out = fastkd.kd_loss(wide, t, labels, backend="cuda", vocab_size=v, temperature=2.0, alpha=0.7)
    out.backward()
    assert (wide.grad[:, v:] == 0).all()
    r_loss, r_grad = reference_result(wide.detach()[:, :v], t, labels, **kw)
    assert_close(out.detach().double(), wide.grad[:, :v].double(), r_loss, r_grad, low_precision=True)


def test_noncontiguous_vocab_stride(kernel):
    """A student with stride 2 along the vocabulary (copied by the Python layer)."""
    g = torch.Generator(device="cuda").manual_seed(4)
    n, v = 12, 32000
    s = logits((n, 2 * v), torch.bfloat16, g)[:, ::2]
    t = logits((v, n), torch.bfloat16, g).t()  # column-major teacher
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    kw = dict(divergence="reverse_kl", temperature=1.5, alpha=0.8)
    assert_close(*backend_result(s, t, labels, "cuda", **kw), *reference_result(s, t, labels, **kw),
                 low_precision=True)


def test_more_than_2_31_elements(kernel):
    """int64 offsets: N * V > 2^31 (13 GB of bf16 in all); a few rows, the last ones
    past the 2^31st element, against the reference computed on those rows alone."""
    free, _ = torch.cuda.mem_get_info()
    v = 131072
    n = (1 << 31) // v + 16
    if free < 4 * n * v * 2:
        pytest.skip("needs ~18 GB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(1)
    s = torch.randn((n, v), device="cuda", dtype=torch.bfloat16, generator=g).mul_(3)
    t = torch.randn((n, v), device="cuda", dtype=torch.bfloat16, generator=g).mul_(3)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    assert n * v > 2**31
    kw = dict(divergence="forward_kl", temperature=2.0, alpha=0.6)
    s.requires_grad_(True)
    loss = fastkd.kd_loss(s, t, labels, backend="cuda", reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    rows = torch.tensor([0, n // 2, n - 3, n - 2, n - 1], device="cuda")
    assert rows[-1].item() * v > 2**31
    ref_loss, ref_grad = reference_result(s.detach()[rows], t[rows], labels[rows], reduction="none", **kw)
    assert_close(loss.detach()[rows].double(), grad[rows].double(), ref_loss, ref_grad, low_precision=True)


# ---------------------------------------------------------------------------------------
# Row statistics, backward scaling, sync-freedom, kernel choice.

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.0, 0.6])  # alpha < 1: the CE column
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_row_stats_match_cpu(dtype, alpha, temperature):
    g = torch.Generator(device="cuda").manual_seed(2)
    s, t = logits((33, 5003), dtype, g), logits((33, 5003), dtype, g)
    packed = kernel_settings(5003, temperature=temperature, alpha=alpha)
    got = torch.ops.fastkd.row_stats(s, t, *packed)
    want = torch.ops.fastkd.row_stats(s.cpu(), t.cpu(), *packed)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_given_row_stats_reproduce_the_loss(divergence):
    """kd_forward with row_stats supplied (the vocab-parallel path) equals the fused pass."""
    g = torch.Generator(device="cuda").manual_seed(8)
    n, v = 17, 30011
    s, t = logits((n, v), torch.float32, g), logits((n, v), torch.float32, g)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    scale = torch.full((), 0.25, device="cuda")
    packed = kernel_settings(v, divergence=divergence, temperature=2.0, alpha=0.6)
    stats = torch.ops.fastkd.row_stats(s, t, *packed)
    loss_a, grad_a = torch.ops.fastkd.kd_forward(s, t, labels, scale, None, *packed)
    loss_b, grad_b = torch.ops.fastkd.kd_forward(s, t, labels, scale, stats, *packed)
    assert last_kernel().startswith("twopass["), last_kernel()  # given statistics: the two-pass kernel
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad(dtype):
    g = torch.Generator(device="cuda").manual_seed(9)
    buf = logits((37, 1001), dtype, g)
    orig = buf.clone()
    grad = buf[:, 3:1000]  # unaligned rows, row stride 1001
    before = grad.clone()
    torch.ops.fastkd.scale_grad_(grad, torch.ones((), device="cuda"))
    assert torch.equal(grad, before)  # 1: untouched
    torch.ops.fastkd.scale_grad_(grad, torch.full((), 0.5, device="cuda"))
    assert torch.equal(grad, before * 0.5)  # halving is exact
    torch.ops.fastkd.scale_grad_(grad, torch.ones((), device="cuda").expand(37))  # reduction="none"
    assert torch.equal(grad, before * 0.5)
    factors = torch.rand(37, device="cuda", generator=g)
    factors[::3] = 1.0
    torch.ops.fastkd.scale_grad_(grad, factors)
    assert torch.equal(grad, ((before * 0.5).float() * factors[:, None]).to(dtype))
    # The columns around the view were never written.
    assert torch.equal(buf[:, :3], orig[:, :3]) and torch.equal(buf[:, 1000:], orig[:, 1000:])


def test_scale_grad_checks_the_factors_device():
    grad = torch.zeros((4, 10), device="cuda")
    with pytest.raises(RuntimeError, match="gradient's device"):
        torch.ops.fastkd.scale_grad_(grad, torch.ones(4))  # per-row factors on the host
    torch.ops.fastkd.scale_grad_(grad, torch.ones(()))  # a host scalar is fine
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="gradient's device"):
            torch.ops.fastkd.scale_grad_(grad, torch.ones((), device="cuda:1"))


@pytest.mark.parametrize("offset,width", [(0, 50257), (3, 50304), (1, 50257 + 64)])
def test_gradient_has_the_students_alignment(offset, width):
    """kd_forward's gradient starts at the student's offset modulo 16 bytes, its rows are
    congruent to the student's, and its strides are those of the registered fake."""
    from fastkd.backends.cpp import grad_row_stride

    g = torch.Generator(device="cuda").manual_seed(12)
    v = 50257
    s = logits((6, width), torch.bfloat16, g)[:, offset:offset + v]
    t = logits((6, v), torch.bfloat16, g)
    _, grad = torch.ops.fastkd.kd_forward(s, t, None, torch.ones((), device="cuda"), None, *kernel_settings(v))
    assert grad.stride() == (grad_row_stride(s), 1)
    assert (grad.data_ptr() - s.data_ptr()) % 16 == 0
    assert (grad.stride(0) - s.stride(0)) % 8 == 0
    assert "g_part=8" in last_kernel() or last_kernel().startswith("cluster"), last_kernel()


@pytest.mark.parametrize("t_extra", [1, 2, 4])
def test_teacher_with_its_own_lead(t_extra, kernel):
    """A teacher whose rows are t_extra columns further apart than the student's: the
    two-pass kernel reads it in narrower parts (still vectorised for 2 and 4); a forced
    cluster kernel refuses it."""
    g = torch.Generator(device="cuda").manual_seed(13)
    n, v = 9, 32000
    s = logits((n, v), torch.bfloat16, g)
    t = logits((n, v + t_extra), torch.bfloat16, g)[:, :v]
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.6)
    if kernel == "cluster":
        with pytest.raises(RuntimeError, match="FASTKD_CUDA_KERNEL=cluster.*teacher"):
            backend_result(s, t, labels, "cuda", **kw)
        return
    assert_close(*backend_result(s, t, labels, "cuda", **kw), *reference_result(s, t, labels, **kw),
                 low_precision=True)
    assert_ran(kernel, s, t)
    assert f"t_part={t_extra}," in last_kernel(), last_kernel()


def test_forced_cluster_that_cannot_run_raises(monkeypatch):
    """Mixed dtypes and given row statistics under FASTKD_CUDA_KERNEL=cluster: an error
    naming the reason, on any device (off sm_90 the device itself is the reason)."""
    monkeypatch.setenv("FASTKD_CUDA_KERNEL", "cluster")
    g = torch.Generator(device="cuda").manual_seed(14)
    s, t = logits((4, 32000), torch.bfloat16, g), logits((4, 32000), torch.float32, g)
    with pytest.raises(RuntimeError, match="FASTKD_CUDA_KERNEL=cluster"):
        fastkd.kd_loss(s, t, backend="cuda")
    with pytest.raises(RuntimeError, match="FASTKD_CUDA_KERNEL=cluster"):
        plan(s, s, with_row_stats=True)


def test_forward_backward_do_not_synchronize(kernel):
    g = torch.Generator(device="cuda").manual_seed(6)
    s = logits((64, 32000), torch.bfloat16, g).requires_grad_(True)
    t = logits((64, 32000), torch.bfloat16, g)
    labels = torch.randint(0, 32000, (64,), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "none"):
            loss = fastkd.kd_loss(s, t, labels, backend="cuda", temperature=2.0, alpha=0.5, reduction=reduction)
            loss.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(s.grad).all()


@pytest.mark.skipif(not _is_sm90(), reason="cluster kernel needs sm_90")
def test_auto_picks_the_cluster_kernel_on_hopper(monkeypatch):
    monkeypatch.delenv("FASTKD_CUDA_KERNEL", raising=False)
    for v, c in [(32000, 2), (128256, 8), (151936, 10), (262144, 16)]:
        s = torch.empty((4, v), device="cuda", dtype=torch.bfloat16)
        assert plan(s, s).startswith(f"cluster[C={c},"), (v, plan(s, s))
    s = torch.empty((4, 128256), device="cuda", dtype=torch.bfloat16)
    assert plan(s, s, with_row_stats=True).startswith("twopass")
    assert plan(s, s.float()).startswith("twopass")  # mixed dtypes


def test_float64_is_refused_with_a_clear_error():
    s = torch.randn(4, 10, device="cuda", dtype=torch.float64)
    with pytest.raises((TypeError, RuntimeError), match="float64"):
        fastkd.kd_loss(s, s.clone(), backend="cuda")
