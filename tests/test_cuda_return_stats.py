"""``return_stats=True`` on the CUDA kernels (issue 13, item 5; docs/diagnostics.md): the
per-token diagnostics written by the kernels' kStats instances in the loss's own pass, against
``fastkd.kd_stats`` / ``fastkd.sparse_kd_stats`` in float64 on the same values, on a GPU.

Every test is marked ``gpu`` and skipped without CUDA; written on a machine without a GPU (the
kernels were compile-checked for sm_80 and sm_90a only), so none of them has run yet.

Until ``"cuda"`` joins ``fastkd._dispatch.STATS_BACKENDS`` the API refuses return_stats on it;
the fixture below adds it for these tests, so that they run the whole path (kd_loss ->
kd_forward_stats -> the kernel). Covered: every divergence, the logit options, exact ties
(the first column wins, also when the tied columns lie in different threads, warps and
cluster CTAs), -inf logits, padded vocabularies, rows of V = 128256 on both dense kernels
(two-pass and, on sm_90, the cluster kernel), fp32 / bf16 / fp16, in-place backward, and the
sparse kernel (every tail and divergence, empty slots, a row without valid ids, a support
covering the vocabulary, a row staged in part). The loss and gradient of a call with stats
equal those without, to fp32 rounding: the stats instance is the options path's (with the
options off its CE gradient is rounded in another order, so not bit for bit).
"""
import pytest
import torch

import fastkd
from fastkd import _dispatch

from harness.backends import cuda_last_kernel as last_kernel
from harness.backends import kernel_backend, kernel_settings
from harness.compare import rel_err
from harness.inputs import logits
from harness.sparse_cases import sparse_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
IGNORE = -100
OPTIONS = dict(softcap=20.0, logit_scale=1.5, teacher_logit_scale=0.8, label_smoothing=0.1, z_loss=1e-4)
# fp32 arithmetic against float64: entropies are sums of V terms, D (forward KL) a
# difference of log-normalisers; a relative-norm bar per field, and a bar per row. Loose
# against fp32's reach, tight against the bugs they are for (a wrong column, sign, factor).
FIELD_REL = 1e-4
ROW_ABS = 5e-4


def _is_sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


KERNELS = [
    "twopass",
    pytest.param("cluster", marks=pytest.mark.skipif(not _is_sm90(), reason="cluster kernel needs sm_90")),
]


@pytest.fixture(autouse=True)
def cuda_stats(monkeypatch):
    if kernel_backend("cuda") is None:
        pytest.fail("a CUDA device is present but fastkd._C was built without its CUDA kernels")
    monkeypatch.setattr(_dispatch, "STATS_BACKENDS", set(_dispatch.STATS_BACKENDS) | {"cuda"})


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Forces one dense kernel for the test (read by the C++ glue at every call)."""
    monkeypatch.setenv("FASTKD_CUDA_KERNEL", request.param)
    return request.param


def _labels(n, vocab, g):
    """Labels with rows 7, 12, ... ignored (the rows _put_ties sets up stay counted)."""
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[7::5] = IGNORE
    return labels


def _close_runner_up(x, rel=1e-5):
    """Rows whose two largest values are distinct but within ``rel`` (float64 reference values):
    fp32 and float64 may order them differently, so their argmax is not compared."""
    top = x.topk(2, dim=-1).values
    return (top[:, 0] != top[:, 1]) & ((top[:, 0] - top[:, 1]).abs() <= rel * top[:, 0].abs().clamp_min(1.0))


def _transformed(x, scale, cap):
    y = x * scale
    return cap * torch.tanh(y / cap) if cap else y


def _assert_stats(got, want, skip_agree=None):
    assert torch.equal(got.valid.cpu(), want.valid.cpu())
    agree_got, agree_want = got.top1_agree.cpu(), want.top1_agree.cpu()
    if skip_agree is not None:
        keep = ~skip_agree.cpu()
        agree_got, agree_want = agree_got[keep], agree_want[keep]
    assert torch.equal(agree_got, agree_want), (agree_got, agree_want)
    for name in got._fields:
        if name in ("valid", "top1_agree"):
            continue
        g, w = getattr(got, name).double().cpu(), getattr(want, name).double().cpu()
        assert getattr(got, name).dtype == torch.float32, name
        assert torch.equal(g.isnan(), w.isnan()), name
        assert torch.equal(g[w.isinf()], w[w.isinf()]), name
        ok = torch.isfinite(w)
        if ok.any():
            assert rel_err(g[ok], w[ok]) < FIELD_REL, (name, rel_err(g[ok], w[ok]))
            assert ((g[ok] - w[ok]).abs() <= ROW_ABS * (1 + w[ok].abs())).all(), (name, (g[ok] - w[ok]).abs().max())


def _assert_same_loss(loss, grad, loss2, grad2, low_precision):
    """The call with stats against the call without: the same up to fp32 rounding (the stats
    instance is the options path's, which unrolls the two-pass sweeps by one pack, not two,
    and rounds the CE gradient in another order; a bf16 gradient may round the other way)."""
    assert rel_err(loss.double(), loss2.double()) < 2e-6
    assert torch.allclose(loss, loss2, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert rel_err(grad.double(), grad2.double()) < (2e-3 if low_precision else 1e-5)


def _dense_call(s, t, labels, inplace=False, **kw):
    """(loss, grad, stats) with return_stats, and (loss, grad) of the same call without."""
    out = []
    for stats in (True, False):
        leaf = s.detach().clone().requires_grad_(True)
        x = leaf * 1 if inplace else leaf
        res = fastkd.kd_loss(x, t, labels, backend="cuda", inplace_backward=inplace, return_stats=stats, **kw)
        loss = res[0] if stats else res
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        out.append((loss.detach(), grad, res[1] if stats else None))
    (loss, grad, stats), (loss2, grad2, _) = out
    return loss, grad, stats, loss2, grad2


def _put_ties(s, t, vocab, far):
    """Exact ties for the maximum: row 0 the student's (columns 3 and `far`), row 1 the
    teacher's, row 2 both sides on the same pair (they agree, on the first); row 3 the
    student's maximum at the last counted column, the teacher's there too."""
    s[0, 3] = s[0, far] = 40.0
    t[1, 5] = t[1, far] = 40.0
    s[1, far] = 39.0
    s[2, 4] = s[2, far] = t[2, 4] = t[2, far] = 41.0
    s[3, vocab - 1] = t[3, vocab - 1] = 42.0


# ---------------------------------------------------------------------------------------
# Dense kernels.

@pytest.mark.parametrize("vocab,dtype", [
    (128256, torch.bfloat16),   # Llama 3: 8 CTAs in the cluster kernel
    (50257, torch.bfloat16),    # odd V: rows off 16 bytes, partial packs at both ends
    (32000, torch.float16),
    (20001, torch.float32),
    (67, torch.float32),        # a short row (the two-pass kernel's few threads; forced cluster: 1 CTA)
], ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])
def test_dense_stats(divergence, vocab, dtype, options, kernel):
    g = torch.Generator(device="cuda").manual_seed(vocab + 7 * DIVERGENCES.index(divergence))
    n = 10
    s, t = logits((n, vocab), None, g), logits((n, vocab), None, g)
    _put_ties(s, t, vocab, far=vocab - 2 if vocab < 1000 else vocab // 2 + 1)  # another CTA / warp
    s[4, :7] = t[4, :7] = float("-inf")    # masked columns count for nothing (p = q = 0: D finite
    s[5, 10:20] = t[5, 10:20] = float("-inf")  # for every divergence; the first column is masked in row 4)
    s, t = s.to(dtype), t.to(dtype)
    labels = _labels(n, vocab, g)
    kw = dict(divergence=divergence, temperature=1.7, alpha=0.6, beta=0.3, **(OPTIONS if options else {}))
    loss, grad, stats, loss2, grad2 = _dense_call(s, t, labels, **kw)
    assert last_kernel().startswith(kernel + "["), last_kernel()
    want = fastkd.kd_stats(s.double(), t.double(), labels, **kw)
    skip = None
    if options:
        sd = _transformed(s.double(), 1.5, 20.0)
        td = _transformed(t.double(), 0.8, 20.0)
        skip = _close_runner_up(sd) | _close_runner_up(td)
    _assert_stats(stats, want, skip)
    if not options:  # exact ties: the first column wins, whatever thread or CTA holds the other
        assert not stats.top1_agree[0] and not stats.top1_agree[1] and stats.top1_agree[2] and stats.top1_agree[3]
    _assert_same_loss(loss, grad, loss2, grad2, dtype != torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ties_across_every_cta_of_a_cluster(divergence, kernel):
    """The maximum tied in every CTA's part of the row (V = 262144 bf16: 16 CTAs): the
    cluster's combine keeps the lowest column; so does the two-pass kernel's block reduction."""
    vocab = 262144
    g = torch.Generator(device="cuda").manual_seed(31)
    s, t = logits((4, vocab), None, g), logits((4, vocab), None, g)
    cols = torch.arange(16, device="cuda") * (vocab // 16) + 11
    s[0, cols.flip(0)] = 50.0             # the lowest in rank 0
    s[1, cols[5:]] = 50.0                 # the lowest in rank 5
    t[1, cols[5]] = 50.0                  # agrees with it
    t[2, cols[9:]] = 50.0
    s[2, cols[10]] = 50.0                 # the student's maximum is the teacher's second tied column
    s, t = s.bfloat16(), t.bfloat16()
    kw = dict(divergence=divergence, temperature=1.0)
    loss, grad, stats, loss2, grad2 = _dense_call(s, t, None, **kw)
    _assert_stats(stats, fastkd.kd_stats(s.double(), t.double(), None, **kw))
    assert stats.top1_agree[1] and not stats.top1_agree[2]
    _assert_same_loss(loss, grad, loss2, grad2, True)


def test_padded_vocab_and_inplace(kernel):
    """Columns past vocab_size (larger than every counted logit) are never an argmax nor
    counted; in-place backward writes the gradient over the student after the stats are read."""
    vocab, width = 128250, 128256
    g = torch.Generator(device="cuda").manual_seed(32)
    s, t = logits((9, width), None, g), logits((9, width), None, g)
    s[:, vocab:] = 90.0
    t[:, vocab:] = 90.0
    _put_ties(s, t, vocab, far=vocab // 3)
    s, t = s.bfloat16(), t.bfloat16()
    labels = _labels(9, vocab, g)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.5, vocab_size=vocab)
    loss, grad, stats, loss2, grad2 = _dense_call(s, t, labels, inplace=True, **kw)
    _assert_stats(stats, fastkd.kd_stats(s.double(), t.double(), labels, **kw))
    _assert_same_loss(loss, grad, loss2, grad2, True)
    assert (grad[:, vocab:] == 0).all()


def test_ignored_rows_and_shape(kernel):
    g = torch.Generator(device="cuda").manual_seed(33)
    s, t = logits((2, 3, 4096), torch.bfloat16, g), logits((2, 3, 4096), torch.bfloat16, g)
    labels = torch.randint(0, 4096, (2, 3), device="cuda", generator=g)
    labels[0, 1] = labels[1, 2] = IGNORE
    loss, stats = fastkd.kd_loss(s, t, labels, backend="cuda", return_stats=True, reduction="none")
    assert stats.teacher_entropy.shape == (2, 3) and loss.shape == (2, 3)
    for field in (stats.teacher_entropy, stats.student_entropy, stats.divergence):
        assert field[0, 1].isnan() and field[1, 2].isnan() and not field[0, 0].isnan()
    assert not stats.top1_agree[0, 1] and not stats.valid[0, 1]
    _assert_stats(stats, fastkd.kd_stats(s.double(), t.double(), labels))


def test_the_operator_table(kernel):
    """The raw [N, 5] table: column 4 is 0 for a dense teacher, NaN (and agreement 0) at an
    ignored row; the stats operator's loss and gradient are kd_forward's."""
    g = torch.Generator(device="cuda").manual_seed(34)
    s, t = logits((6, 20001), torch.float32, g), logits((6, 20001), torch.float32, g)
    labels = _labels(6, 20001, g)
    labels[2] = IGNORE
    ints, floats = kernel_settings(20001, temperature=2.0, alpha=0.5)
    scale = torch.ones((), device="cuda")
    loss, grad, table = torch.ops.fastkd.kd_forward_stats(s, t, labels, scale, ints, floats)
    assert table.shape == (6, 5) and table.dtype == torch.float32
    valid = labels != IGNORE
    assert (table[valid, 4] == 0).all() and table[2, [0, 1, 3, 4]].isnan().all() and table[2, 2] == 0
    assert not table[valid].isnan().any() and set(table[:, 2].tolist()) <= {0.0, 1.0}
    loss2, grad2 = torch.ops.fastkd.kd_forward(s, t, labels, scale, None, ints, floats)
    _assert_same_loss(loss, grad, loss2, grad2, False)


# ---------------------------------------------------------------------------------------
# The sparse kernel.

def _sparse_call(s, ids, lps, labels, inplace=False, **kw):
    out = []
    for stats in (True, False):
        leaf = s.detach().clone().requires_grad_(True)
        x = leaf * 1 if inplace else leaf
        res = fastkd.sparse_kd_loss(x, ids, lps, labels, backend="cuda", inplace_backward=inplace,
                                    return_stats=stats, **kw)
        loss = res[0] if stats else res
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        out.append((loss.detach(), grad, res[1] if stats else None))
    (loss, grad, stats), (loss2, grad2, _) = out
    return loss, grad, stats, loss2, grad2


def _sparse_ties(s, ids, lps):
    """Row 2: the teacher's best log-prob tied in slots 1 and 3, the student's argmax at slot
    3's id (no agreement: the first slot wins); row 3: the student's argmax at the best id;
    row 4: no valid id (never agrees)."""
    lps[2, [1, 3]] = lps[2].nan_to_num(float("-inf")).max() + 0.5
    s[2, ids[2, 3]] = 60.0
    s[3, ids[3, lps[3].nan_to_num(float("-inf")).argmax()]] = 60.0
    ids[4] = -1


@pytest.mark.parametrize("tail,divergence", [(t, d) for t in ("bucket", "renorm") for d in DIVERGENCES]
                         + [("none", "forward_kl")])
@pytest.mark.parametrize("vocab,k,dtype", [(128256, 64, torch.bfloat16), (20001, 16, torch.float32),
                                           (257, 257, torch.float32)],  # a support covering the vocabulary
                         ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])
def test_sparse_stats(tail, divergence, vocab, k, dtype, options):
    s, ids, lps, labels = sparse_inputs(10, vocab, k, dtype=torch.float32, seed=vocab + k, device="cuda")
    if k < vocab:
        _sparse_ties(s, ids, lps)
    s = s.to(dtype)
    lps = lps.to(dtype)
    kw = dict(divergence=divergence, tail=tail, temperature=1.5, alpha=0.7,
              **(dict(softcap=20.0, logit_scale=1.5, z_loss=1e-4) if options else {}))
    loss, grad, stats, loss2, grad2 = _sparse_call(s, ids, lps, labels, **kw)
    want = fastkd.sparse_kd_stats(s.double(), ids, lps.double(), labels, **kw)
    skip = _close_runner_up(_transformed(s.double(), 1.5, 20.0)) if options else None
    _assert_stats(stats, want, skip)
    if k < vocab and labels[2] != IGNORE and labels[3] != IGNORE:
        assert not stats.top1_agree[2] and stats.top1_agree[3]
    if labels[4] != IGNORE:
        assert not stats.top1_agree[4] and stats.teacher_mass[4] == 0
    _assert_same_loss(loss, grad, loss2, grad2, dtype != torch.float32)


@pytest.mark.parametrize("stage_kb", ["0", "16"])
def test_sparse_stats_partly_staged_renorm_and_inplace(stage_kb, monkeypatch):
    """A row read back from global memory (little or no staging), renorm without the CE term
    (whose gradient never reads the row: the stats instance reads it, for H(q), Q and the
    argmax, and still writes 0 off the support), in place."""
    monkeypatch.setenv("FASTKD_SPARSE_STAGE_KB", stage_kb)
    s, ids, lps, labels = sparse_inputs(8, 128256, 32, dtype=torch.float32, seed=41, device="cuda", neg_inf=False)
    _sparse_ties(s, ids, lps)
    s = s.bfloat16()
    kw = dict(divergence="reverse_kl", tail="renorm", temperature=2.0)
    loss, grad, stats, loss2, grad2 = _sparse_call(s, ids, lps, None, inplace=True, **kw)
    _assert_stats(stats, fastkd.sparse_kd_stats(s.double(), ids, lps.double(), None, **kw))
    # Renorm without the CE term: 0 off the support, the support's entries from the same
    # float64 math (the options path's transform is x * 1 here): bit for bit.
    assert torch.equal(loss.nan_to_num(), loss2.nan_to_num()) and torch.equal(grad.nan_to_num(), grad2.nan_to_num())
