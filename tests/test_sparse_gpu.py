"""The sparse-teacher kernels on a GPU (backend ``cuda``: csrc/cuda/kd_sparse.cu; backend
``triton``: fastkd/backends/triton/sparse.py) against the float64 reference, at the
vocabularies of LLMs. Every test is marked ``gpu`` and skipped without CUDA.

What the interpreter tests (tests/test_sparse_triton.py) cannot reach: rows of 32k-262k
columns (the CUDA kernel's shared-memory staging, partial and whole), odd V (rows off 16
bytes), K up to 1024, fp32 rows too long to stage, the staging limit
FASTKD_SPARSE_STAGE_KB, and the CUDA kernel's NaN rows.
"""
import pytest
import torch

from harness.sparse_cases import kernel_settings, reference_rows_and_grad, rel_err, sparse_inputs

import fastkd  # noqa: F401
from fastkd._dispatch import get_backend
from fastkd.sparse import sparse_kd_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BACKENDS = ["cuda", "triton"]
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2), torch.float16: (1e-2, 2e-2)}


@pytest.fixture(params=BACKENDS)
def backend(request):
    kernels = get_backend(request.param)
    if kernels is None or kernels.sparse_forward is None:
        pytest.fail(f"a CUDA device is present but backend {request.param!r} has no sparse kernels")
    return request.param


def run_op(backend, s, ids, lps, labels, vocab, inplace=False, grad_scale=1.0, **settings):
    ints, floats = kernel_settings(vocab, **settings)
    scale = torch.tensor(grad_scale, device="cuda")
    prefix = "" if backend == "cuda" else "triton_"
    if inplace:
        op = getattr(torch.ops.fastkd, prefix + "sparse_kd_forward_inplace")
        return op(s, ids, lps, labels, scale, ints, floats), s
    return getattr(torch.ops.fastkd, prefix + "sparse_kd_forward")(s, ids, lps, labels, scale, ints, floats)


def check(backend, s, ids, lps, labels, vocab, rows=None, **settings):
    """The whole batch through the kernel; rows `rows` (default all) against float64."""
    loss, grad = run_op(backend, s, ids, lps, labels, vocab, grad_scale=0.5, **settings)
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all()
    idx = torch.arange(s.shape[0], device="cuda") if rows is None else torch.as_tensor(rows, device="cuda")
    ref_rows, ref_grad = reference_rows_and_grad(s[idx], ids[idx], lps[idx], None if labels is None else labels[idx],
                                                 vocab, 0.5, **settings)
    tol_loss, tol_grad = TOL[s.dtype]
    assert rel_err(loss[idx], ref_rows) < tol_loss, (rel_err(loss[idx], ref_rows), settings)
    assert rel_err(grad[idx], ref_grad) < tol_grad, (rel_err(grad[idx], ref_grad), settings)
    if s.shape[1] > vocab:
        assert torch.all(grad[:, vocab:] == 0)
    return loss, grad


@pytest.mark.parametrize("divergence,tail", [("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("jsd", "bucket"),
                                             ("tvd", "bucket"), ("jsd", "renorm"), ("forward_kl", "none")])
@pytest.mark.parametrize("vocab,dtype,k", [
    (128256, torch.bfloat16, 64),    # Llama 3: a row of 250.5 KB, staged in part
    (32000, torch.bfloat16, 64),     # staged whole
    (50257, torch.bfloat16, 100),    # odd V: rows off 16 bytes
    (262144, torch.bfloat16, 1024),  # Gemma 3, K = 1024
    (128256, torch.float32, 64),     # fp32: 501 KB, mostly re-read
])
def test_llm_vocabularies(backend, divergence, tail, vocab, dtype, k):
    s, ids, lps, labels = sparse_inputs(16, vocab, k, dtype=dtype, seed=vocab % 97, device="cuda",
                                        neg_inf=divergence != "reverse_kl")
    check(backend, s, ids, lps, labels, vocab, divergence=divergence, tail=tail, temperature=1.5, alpha=0.8,
          beta=0.3)


@pytest.mark.parametrize("stage_kb", ["0", "64", ""])
def test_cuda_staging_limit_gives_the_same_result(stage_kb, monkeypatch):
    """The staged part of the row is read from shared memory, the rest from global memory:
    the result must not depend on where the split falls."""
    monkeypatch.setenv("FASTKD_SPARSE_STAGE_KB", stage_kb)
    s, ids, lps, labels = sparse_inputs(8, 128256, 64, dtype=torch.bfloat16, seed=3, device="cuda")
    check("cuda", s, ids, lps, labels, 128256, divergence="jsd", tail="bucket", alpha=0.5)
    plan = torch.ops.fastkd.cuda_last_kernel()
    assert plan.startswith("sparse["), plan
    if stage_kb == "0":
        assert "stage_packs=0/" in plan


def test_padded_vocabulary_and_int32_ids(backend):
    s, ids, lps, labels = sparse_inputs(8, 151936, 64, dtype=torch.bfloat16, seed=4, device="cuda", width=152064,
                                        ids_dtype=torch.int32)
    check(backend, s, ids, lps, labels, 151936, divergence="forward_kl", tail="bucket", alpha=0.7)


def test_inplace_matches(backend):
    s, ids, lps, labels = sparse_inputs(8, 50257, 64, dtype=torch.bfloat16, seed=5, device="cuda")
    kw = dict(divergence="tvd", tail="bucket", alpha=0.6)
    loss, grad = run_op(backend, s, ids, lps, labels, 50257, **kw)
    loss2, grad2 = run_op(backend, s.clone(), ids, lps, labels, 50257, inplace=True, **kw)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)


def test_p_near_one_student_near_teacher(backend):
    """K = 1024 of V = 32000 holding 1 - O(1e-6) of the teacher's mass, the student close to
    the teacher (D tiny): only cancellation-free tails pass."""
    n, vocab, k = 8, 32000, 1024
    g = torch.Generator(device="cuda").manual_seed(6)
    t = torch.randn(n, vocab, generator=g, device="cuda")
    t[:, :k] += 17.0
    s = t + 0.02 * torch.randn(n, vocab, generator=g, device="cuda")
    lp, ids = torch.log_softmax(t.double(), -1).topk(k, -1)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        check(backend, s, ids, lp.float(), None, vocab, divergence=divergence, tail="bucket")


def test_bad_rows_are_nan(backend):
    s, ids, lps, labels = sparse_inputs(6, 32000, 64, dtype=torch.bfloat16, seed=7, device="cuda", empty_slots=0,
                                        ignore_frac=0.0)
    ids[1, 2] = 32000
    ids[2, 5] = ids[2, 0]
    labels[4] = 32000
    labels[5] = -100
    loss, grad = run_op(backend, s, ids, lps, labels, 32000, alpha=0.5)
    for r in (1, 2, 4):
        assert torch.isnan(loss[r]) and torch.isnan(grad[r].float()).all()
    assert loss[5] == 0 and torch.all(grad[5] == 0)
    assert torch.isfinite(loss[[0, 3]]).all()


def test_public_api_mean_reduction(backend):
    s, ids, lps, labels = sparse_inputs(32, 32000, 64, dtype=torch.bfloat16, seed=8, device="cuda")
    out = {}
    for name in (backend, "torch"):
        x = (s.double() if name == "torch" else s.clone()).requires_grad_(True)
        loss = sparse_kd_loss(x, ids, lps, labels, divergence="forward_kl", alpha=0.9, temperature=2.0, backend=name)
        loss.backward()
        out[name] = (loss.detach(), x.grad)
    assert abs(out[backend][0].item() - out["torch"][0].item()) <= 1e-2 * abs(out["torch"][0].item())
    assert rel_err(out[backend][1], out["torch"][1]) < 2e-2
