"""The Triton sparse-teacher kernel (fastkd/backends/triton/sparse.py) against the float64
reference (fastkd/sparse_reference.py).

On a CPU-only machine it runs under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 first); on a GPU every test runs on CUDA tensors. The sweeps are
forced to small blocks (launch.BLOCK_OVERRIDE) so that V ~ 300 takes several blocks, with
support ids falling in every block and at block edges.
"""
import math

import pytest
import torch

from harness.sparse_cases import kernel_settings, reference_rows_and_grad, rel_err, sparse_inputs

pytest.importorskip("triton")

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.backends import triton as triton_kd  # noqa: E402
from fastkd.sparse import sparse_kd_loss  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not (HAS_CUDA or triton_kd.kernels_interpreted()):
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if HAS_CUDA else "cpu"

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = [(d, t) for t in ("bucket", "renorm") for d in DIVERGENCES] + [("forward_kl", "none")]
FP32_TOL = 1e-5
LOW_TOL = {"loss": 1e-2, "grad": 2e-2}


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", 64)


def op(s, ids, lps, labels, grad_scale, vocab, inplace=False, **settings):
    ints, floats = kernel_settings(vocab, **settings)
    if inplace:
        return torch.ops.fastkd.triton_sparse_kd_forward_inplace(s, ids, lps, labels, grad_scale, ints, floats), s
    return torch.ops.fastkd.triton_sparse_kd_forward(s, ids, lps, labels, grad_scale, ints, floats)


def check(s, ids, lps, labels, vocab, tol_loss=FP32_TOL, tol_grad=FP32_TOL, inplace=False, **settings):
    scale = torch.tensor(0.25, device=DEVICE)
    ref_rows, ref_grad = reference_rows_and_grad(s, ids, lps, labels, vocab, 0.25, **settings)
    rows, grad = op(s.clone() if inplace else s, ids, lps, labels, scale, vocab, inplace=inplace, **settings)
    assert rows.dtype == torch.float32 and grad.dtype == s.dtype and grad.shape == s.shape
    assert rel_err(rows, ref_rows) < tol_loss, (rel_err(rows, ref_rows), settings)
    assert rel_err(grad, ref_grad) < tol_grad, (rel_err(grad, ref_grad), settings)
    return rows, grad


# ---------------------------------------------------------------------------------------
# Every tail and divergence, with the CE term, ignored tokens, empty slots (NaN log-probs),
# a -inf log-prob, ids in random slot order, several blocks per row.

@pytest.mark.parametrize("divergence,tail", MODES, ids=[f"{d}-{t}" for d, t in MODES])
def test_modes_fp32(divergence, tail):
    s, ids, lps, labels = sparse_inputs(5, 301, 24, seed=len(divergence) + len(tail), device=DEVICE,
                                        neg_inf=divergence != "reverse_kl")
    check(s, ids, lps, labels, 301, divergence=divergence, tail=tail, temperature=1.5, alpha=0.7, beta=0.3)


@pytest.mark.parametrize("divergence,tail", [("jsd", "bucket"), ("reverse_kl", "renorm"), ("forward_kl", "none")])
def test_no_labels_t_squared_off(divergence, tail):
    s, ids, lps, _ = sparse_inputs(4, 200, 16, seed=3, device=DEVICE, neg_inf=divergence != "reverse_kl")
    check(s, ids, lps, None, 200, divergence=divergence, tail=tail, temperature=0.7, t_squared=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,tail", [("forward_kl", "bucket"), ("tvd", "renorm"), ("jsd", "bucket")])
def test_low_precision(dtype, divergence, tail):
    s, ids, lps, labels = sparse_inputs(4, 257, 20, dtype=dtype, seed=5, device=DEVICE)
    check(s, ids, lps, labels, 257, LOW_TOL["loss"], LOW_TOL["grad"], divergence=divergence, tail=tail,
          temperature=2.0, alpha=0.8)


def test_int32_ids_and_mixed_logprob_dtype():
    s, ids, lps, labels = sparse_inputs(4, 190, 12, seed=8, device=DEVICE, ids_dtype=torch.int32,
                                        lp_dtype=torch.bfloat16, neg_inf=False)
    check(s, ids, lps, labels, 190, 1e-5, 1e-5, divergence="reverse_kl", tail="bucket", alpha=0.5)


@pytest.mark.parametrize("divergence,tail", [("forward_kl", "bucket"), ("jsd", "renorm")])
def test_inplace_equals_out_of_place(divergence, tail):
    s, ids, lps, labels = sparse_inputs(4, 230, 16, seed=9, device=DEVICE)
    kw = dict(divergence=divergence, tail=tail, alpha=0.6, temperature=1.0)
    scale = torch.tensor(0.5, device=DEVICE)
    rows, grad = op(s, ids, lps, labels, scale, 230, **kw)
    rows2, grad2 = op(s.clone(), ids, lps, labels, scale, 230, inplace=True, **kw)
    assert torch.equal(rows, rows2) and torch.equal(grad, grad2)


def test_padded_vocabulary():
    """Only the first vocab_size columns count; the student's extra columns get zero gradient."""
    s, ids, lps, labels = sparse_inputs(4, 250, 16, seed=10, device=DEVICE, width=270)
    _, grad = check(s, ids, lps, labels, 250, divergence="tvd", tail="bucket", alpha=0.5)
    assert torch.all(grad[:, 250:] == 0)


# ---------------------------------------------------------------------------------------
# The tail bin's edge cases.

def test_p_near_one_student_near_teacher():
    """1 - P ~ 1e-6 and Q -> P: the tails come from -expm1(log P) and the excluded sum-exp,
    not from 1 - sum (which is off by 100% in fp32); D is tiny, so only exact tails pass."""
    n, vocab, k = 2, 512, 256
    g = torch.Generator(device=DEVICE).manual_seed(11)
    t = torch.randn(n, vocab, generator=g, device=DEVICE)
    t[:, :k] += 13.8  # the top k hold 1 - O(1e-6) of the mass
    s = (t + 0.02 * torch.randn(n, vocab, generator=g, device=DEVICE)).float()
    log_p = torch.log_softmax(t.double(), -1)
    lp, ids = log_p.topk(k, -1)
    tail = -torch.expm1(torch.logsumexp(lp, -1))
    assert (tail > 1e-7).all() and (tail < 1e-5).all()
    for divergence in ("forward_kl", "reverse_kl"):
        check(s, ids, lp.float(), None, vocab, divergence=divergence, tail="bucket")


def test_full_support_equals_dense():
    """K = V (every id once): the tail bins are empty, and the loss is dense kd_loss's."""
    n, vocab = 3, 96
    s, ids, lps, labels = sparse_inputs(n, vocab, vocab, seed=12, device=DEVICE, empty_slots=0, neg_inf=False)
    for divergence in DIVERGENCES:
        kw = dict(divergence=divergence, temperature=1.0, alpha=0.6, beta=0.4)
        rows, grad = check(s, ids, lps, labels, vocab, tail="bucket", **kw)
        teacher = torch.empty(n, vocab, dtype=torch.float64, device=DEVICE).scatter_(-1, ids, lps.double())
        s64 = s.double().requires_grad_(True)
        dense = reference.kd_loss(s64, teacher, labels, reduction="sum", **kw)
        dense.backward()
        assert math.isclose(rows.double().sum().item(), dense.item(), rel_tol=1e-5)
        assert rel_err(grad * 4, s64.grad) < 1e-5


def test_sampled_teacher_gradient_is_q_minus_w():
    """Random-sampling KD: log-weights summing to 1 (P = 1) give q - w on the support and q off it."""
    n, vocab, k = 3, 150, 10
    s, ids, _, _ = sparse_inputs(n, vocab, k, seed=13, device=DEVICE, empty_slots=0)
    g = torch.Generator(device=DEVICE).manual_seed(14)
    w = torch.softmax(torch.randn(n, k, generator=g, device=DEVICE).double(), -1)
    rows, grad = op(s, ids, w.log().float(), None, torch.tensor(1.0, device=DEVICE), vocab, tail="bucket")
    q = torch.softmax(s.double(), -1)
    expect = q.clone()
    expect.scatter_(-1, ids, q.gather(-1, ids) - w)
    assert rel_err(grad, expect) < 1e-5


def test_renorm_empty_support_is_zero():
    s, ids, lps, labels = sparse_inputs(3, 120, 8, seed=15, device=DEVICE, empty_slots=0)
    ids[1] = -1
    lps[2] = float("-inf")  # P = 0
    check(s, ids, lps, labels, 120, divergence="jsd", tail="renorm", alpha=0.5)
    rows, grad = op(s, ids, lps, None, torch.tensor(1.0, device=DEVICE), 120, divergence="jsd", tail="renorm")
    assert rows[1] == 0 and rows[2] == 0 and torch.all(grad[1:] == 0)


def test_bad_rows_are_nan_never_a_number():
    """An id >= vocab_size, a valid id twice (the Python layer raises for CPU tensors; the
    operators are called directly here) or a label out of range: that row's loss and
    gradient are NaN; ignored rows are 0; the other rows are untouched."""
    s, ids, lps, labels = sparse_inputs(6, 140, 8, seed=16, device=DEVICE, empty_slots=0, ignore_frac=0.0)
    ids[1, 2] = 140          # out of range
    ids[2, 5] = ids[2, 0]    # duplicate
    ids[3, :2] = -1          # two empty slots: not a duplicate
    labels[4] = 140          # bad label
    labels[5] = -100         # ignored
    rows, grad = op(s, ids, lps, labels, torch.tensor(1.0, device=DEVICE), 140, alpha=0.5, tail="bucket")
    for r in (1, 2, 4):
        assert torch.isnan(rows[r]) and torch.isnan(grad[r]).all()
    assert rows[5] == 0 and torch.all(grad[5] == 0)
    good = [0, 3]
    ref_rows, ref_grad = reference_rows_and_grad(s[good], ids[good], lps[good], labels[good], 140, alpha=0.5)
    assert rel_err(rows[good], ref_rows) < FP32_TOL and rel_err(grad[good], ref_grad) < FP32_TOL


def test_public_api_backend_triton_matches_torch():
    """sparse_kd_loss(backend="triton") through autograd (mean over valid tokens, [2, 3] tokens)."""
    s, ids, lps, labels = sparse_inputs(6, 211, 16, seed=17, device=DEVICE, empty_slots=0)
    s, ids, lps, labels = s.reshape(2, 3, -1), ids.reshape(2, 3, -1), lps.reshape(2, 3, -1), labels.reshape(2, 3)
    out = {}
    for backend in ("triton", "torch"):
        x = s.double() if backend == "torch" else s.clone()
        x.requires_grad_(True)
        loss = sparse_kd_loss(x, ids, lps, labels, divergence="jsd", alpha=0.8, temperature=2.0, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), x.grad)
    assert math.isclose(out["triton"][0].item(), out["torch"][0].item(), rel_tol=1e-5)
    assert rel_err(out["triton"][1], out["torch"][1]) < 1e-5


def test_launch_shape():
    for vocab, k in [(1, 1), (300, 24), (128256, 64), (262144, 1024), (50, 1500)]:
        block, k_block, warps = triton_kd.sparse.launch_shape(vocab, k)
        assert k_block >= max(k, 16) and k_block & (k_block - 1) == 0
        assert block & (block - 1) == 0 and warps in (4, 8, 16, 32)


@pytest.mark.parametrize("inplace", [False, True])
def test_operators_schema_and_fake(inplace):
    """The registered operators' schemas (mutation of the student only in place) and fake
    implementations (torch.compile traces through them) agree with what the kernel does."""
    s, ids, lps, labels = sparse_inputs(3, 40, 6, seed=18, device=DEVICE)
    ints, floats = kernel_settings(40, alpha=0.5)
    op = (torch.ops.fastkd.triton_sparse_kd_forward_inplace if inplace else torch.ops.fastkd.triton_sparse_kd_forward)
    torch.library.opcheck(op.default, (s.clone(), ids, lps, labels, torch.tensor(1.0, device=DEVICE), ints, floats),
                          test_utils=("test_schema", "test_faketensor"))


def test_fixed_grid_matches_one_program_per_row(monkeypatch):
    """launch.SPARSE_PROGRAMS: two programs taking 7 rows in turn (reusing their scratch row
    of sorted ids) give bit for bit the one-program-per-row result."""
    s, ids, lps, labels = sparse_inputs(7, 190, 12, seed=19, device=DEVICE, neg_inf=False)
    kw = dict(divergence="reverse_kl", tail="bucket", alpha=0.5)
    scale = torch.tensor(1.0, device=DEVICE)
    rows, grad = op(s, ids, lps, labels, scale, 190, **kw)
    monkeypatch.setattr(triton_kd.launch, "SPARSE_PROGRAMS", 2)
    rows2, grad2 = op(s, ids, lps, labels, scale, 190, **kw)
    assert torch.equal(rows, rows2) and torch.equal(grad, grad2)
