"""The Triton kernels' per-token diagnostics (return_stats=True) where tests/test_return_stats.py
does not reach: the multi-block and vocabulary-split paths (forced with small blocks, as
tests/test_triton_kernels.py does), argmax ties across blocks and splits, in place, the logit
options, rows out of the loss, and the sparse kernel's agreement rules; at the operator level,
against the float64 table of fastkd.stats (stats_rows, sparse_stats_rows).

On a CPU-only machine the kernels run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1); on a GPU every test runs on CUDA tensors.
"""
import pytest
import torch

from harness.backends import kernel_settings
from harness.sparse_cases import kernel_settings as sparse_kernel_settings
from harness.sparse_cases import sparse_config

pytest.importorskip("triton")

import fastkd  # noqa: E402
from fastkd.backends import STATS_WIDTH  # noqa: E402
from fastkd.backends import triton as triton_kd  # noqa: E402
from fastkd.stats import sparse_stats_rows, stats_rows  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_kd.kernels_interpreted()
if not (HAS_CUDA or INTERPRETED):
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if HAS_CUDA else "cpu"
OPS = torch.ops.fastkd

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
V = 150
BLOCK = 32  # V = 150: 5 blocks; the split path then cuts 3 splits of 64, 64 and 22 columns
TOL = 2e-5  # fp32 kernel against the float64 table of the same (fp32-rounded) logits
IGNORE = -100


@pytest.fixture
def paths(monkeypatch):
    """Sets the path of the next launches: ``paths("multi")`` (one program per row, 7 blocks)
    or ``paths("split")`` (3 splits); returns the splits of each split launch so far."""
    log = []
    launch = triton_kd.split.launch

    def logged(*args, **kwargs):
        log.append(args[8].splits)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_kd.split, "launch", logged)

    def choose(path):
        monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", BLOCK)
        monkeypatch.setattr(triton_kd.launch, "SPLIT_OVERRIDE", 3 if path == "split" else None)
        return log

    return choose


def _dense(seed=0, n=8, dtype=torch.float32):
    """Logits [n, V] with the argmax cases (blocks of 32 columns, splits of 64): ties across
    blocks, within a split and across splits (the lower column must win), a tie within a block,
    the last column, an ignored row (2) and a label outside [0, V) (row 7: a NaN loss row)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g) * 3
    t = torch.randn(n, V, generator=g) * 3
    s[0, [10, 100]] = 20.0          # the student's maximum in split 0 and split 1: column 10
    t[0, 10] = 21.0                 # agrees only if the kernel keeps the lower column
    t[1, [70, 140]] = 21.0          # the teacher's in split 1 and split 2 (blocks 2 and 4): column 70
    s[1, 70] = 20.0
    s[3, [40, 41]] = 20.0           # within one block
    t[3, 40] = 20.0
    s[4, [33, 64]] = 20.0           # blocks 1 and 2 (splits 0 and 1); the teacher's is the later one:
    t[4, 64] = 20.0                 # disagrees
    s[5, V - 1] = t[5, V - 1] = 25.0  # the last column, in the last (short) block
    s[6, [5, 45]] = 20.0            # blocks 0 and 1 of split 0: column 5
    t[6, 5] = 20.0
    labels = torch.randint(0, V, (n,), generator=g)
    labels[2] = IGNORE
    labels[7] = V
    return s.to(dtype).to(DEVICE), t.to(dtype).to(DEVICE), labels.to(DEVICE)


def _reference(s, t, labels, **settings):
    """The float64 table, with rows out of the loss (ignored, or a label outside [0, V)) blank."""
    cfg = fastkd.make_config(**settings).with_vocab_size(V)
    out = stats_rows(s.double().cpu(), t.double().cpu(), labels.cpu(), cfg)
    out[(labels.cpu() < 0) | (labels.cpu() >= V)] = torch.tensor([float("nan"), float("nan"), 0.0] + [float("nan")] * 2,
                                                                   dtype=out.dtype)
    return out


def _assert_table(got, want, tol=TOL):
    assert got.dtype == torch.float32 and got.shape == (want.shape[0], STATS_WIDTH)
    got = got.double().cpu()
    assert torch.equal(got[:, 2], want[:, 2]), (got[:, 2], want[:, 2])  # agreement: exact 0.0 / 1.0
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=tol, atol=tol)


def _assert_same(a, b):
    """Results of the kernel with and without the stats: identical under the interpreter (the
    same operations), to rounding compiled (another kernel)."""
    if INTERPRETED:
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


# ---------------------------------------------------------------------------------------
# Dense: the multi-block and split paths, every divergence.

PATHS = [("split", d) for d in DIVERGENCES] + [("multi", "forward_kl"), ("multi", "jsd")]


@pytest.mark.parametrize("path, divergence", PATHS)
def test_dense_paths_against_the_float64_table(divergence, path, paths):
    """Each divergence's stats in the split path (each split's entropy sums and part of D, the
    head's agreement and row sums' part); the one-program multi-block path's two ways of
    summing the entropies (per lane; JSD in its block reduction). reverse_kl and tvd take the
    per-lane sums in the multi-block path too: test_dense_options (reverse_kl), test_dense_inplace
    (tvd at T = 1.5, bf16)."""
    splits = paths(path)
    s, t, labels = _dense(seed=DIVERGENCES.index(divergence))
    settings = dict(divergence=divergence, temperature=2.0, alpha=0.6, beta=0.3)
    ints, floats = kernel_settings(V, **settings)
    gs = torch.full((), 0.5, device=DEVICE)
    loss, grad, stats = OPS.triton_kd_forward_stats(s, t, labels, gs, ints, floats)
    _assert_table(stats, _reference(s, t, labels, **settings))
    assert stats[[0, 1, 3, 5, 6], 2].tolist() == [1.0] * 5 and stats[[2, 4, 7], 2].tolist() == [0.0] * 3
    # The loss and gradient are those of the kernel without the stats.
    plain_loss, plain_grad = OPS.triton_kd_forward(s, t, labels, gs, None, ints, floats)
    _assert_same(loss, plain_loss)
    _assert_same(grad, plain_grad)
    assert splits == ([3, 3] if path == "split" else [])


@pytest.mark.parametrize("path, divergence", [("multi", "tvd"), ("split", "jsd")])
def test_dense_inplace(path, divergence, paths):
    """In place, each program reads what the stats need before writing the gradient over its
    row: the same table and gradient as out of place. bf16 at odd V: peeled rows."""
    paths(path)
    s, t, labels = _dense(seed=7, dtype=torch.bfloat16)
    ints, floats = kernel_settings(V, divergence=divergence, temperature=1.5, alpha=0.5)
    gs = torch.ones((), device=DEVICE)
    loss, grad, stats = OPS.triton_kd_forward_stats(s, t, labels, gs, ints, floats)
    x = s.clone()
    loss2, stats2 = OPS.triton_kd_forward_stats_inplace(x, t, labels, gs, ints, floats)
    _assert_same(stats2, stats)
    _assert_same(loss2, loss)
    _assert_same(x, grad)
    _assert_table(stats, _reference(s, t, labels, divergence=divergence, temperature=1.5), tol=5e-5)


@pytest.mark.parametrize("path, divergence, temperature", [("multi", "reverse_kl", 1.0), ("split", "jsd", 2.0),
                                                           ("single", "forward_kl", 1.0)])
def test_dense_options(path, divergence, temperature, paths):
    """Every logit option on: the stats are of the transformed logits (softcaps, scales); label
    smoothing and the z-loss change no column. T = 1 shares the CE term's statistics."""
    if path != "single":
        paths(path)
    s, t, labels = _dense(seed=11)
    settings = dict(divergence=divergence, temperature=temperature, alpha=0.6, beta=0.4, softcap=6.0,
                    logit_scale=1.3, teacher_logit_scale=0.7, teacher_softcap=9.0, label_smoothing=0.1, z_loss=1e-3)
    ints, floats = kernel_settings(V, **settings)
    loss, grad, stats = OPS.triton_kd_forward_stats(s, t, labels, torch.ones((), device=DEVICE), ints, floats)
    _assert_table(stats, _reference(s, t, labels, **settings))
    plain_loss, _ = OPS.triton_kd_forward(s, t, labels, torch.ones((), device=DEVICE), None, ints, floats)
    _assert_same(loss, plain_loss)


def test_dense_without_labels_and_all_ignored(paths):
    """No labels: every row counts; every label ignored: a blank table (NaN, agreement 0)."""
    paths("split")
    s, t, labels = _dense(seed=3)
    s, t = s[:4], t[:4]
    ints, floats = kernel_settings(V, temperature=2.0)
    gs = torch.ones((), device=DEVICE)
    _, _, stats = OPS.triton_kd_forward_stats(s, t, None, gs, ints, floats)
    _assert_table(stats, _reference(s, t, torch.zeros(4, dtype=torch.int64), temperature=2.0))
    _, _, blank = OPS.triton_kd_forward_stats(s, t, torch.full((4,), IGNORE, device=DEVICE), gs, ints, floats)
    assert blank[:, 2].eq(0).all() and blank[:, [0, 1, 3, 4]].isnan().all()


# ---------------------------------------------------------------------------------------
# Sparse: P, Q, H(q), D and the agreement rules.

SV = 150
SPARSE_BLOCK = 32  # 5 blocks: the student's argmax and the support ids in several


def _put(ids, row, slot, value):
    """ids[row, slot] = value, swapped with the slot that already holds it (no id twice)."""
    same = (ids[row] == value).nonzero()
    if len(same):
        ids[row, same[0, 0]] = ids[row, slot]
    ids[row, slot] = value


def _sparse(seed=0, n=9, k=6):
    """A top-k teacher with the agreement cases: no valid id (row 1), the teacher's best slots
    tied (row 3: the first slot wins, the student picks it; row 4: the student picks the
    second), the student's maximum tied across blocks (row 5: the lower column is the
    teacher's best id; row 6: the higher one is), empty slots before the best (row 0), an
    ignored row (2)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, SV, generator=g) * 3
    ids = torch.stack([torch.randperm(SV, generator=g)[:k] for _ in range(n)])
    lps = torch.log_softmax(torch.randn(n, k, generator=g), -1) - 0.3
    ids[0, :2] = -1
    lps[0, :2] = float("nan")                    # never read
    ids[1] = -1
    for row, slot in ((3, 1), (4, 4)):
        lps[row, [1, 4]] = lps[row].max() + 1.0  # slots 1 and 4 tie: slot 1 is the best
        _put(ids, row, 1, 7)
        _put(ids, row, 4, 140)
        s[row, ids[row, slot]] = 30.0
    _put(ids, 5, 0, 20)
    _put(ids, 6, 0, 120)
    lps[5, 0] = lps[6, 0] = 0.0                  # above every other slot (log-probs < -0.3)
    s[5, [20, 120]] = 30.0                       # blocks 0 and 3: column 20 wins, agrees
    s[6, [20, 120]] = 30.0                       # the teacher's best is 120: disagrees
    labels = torch.randint(0, SV, (n,), generator=g)
    labels[2] = IGNORE
    assert all(len(set(row.tolist()) - {-1}) == (row >= 0).sum() for row in ids)
    return s.to(DEVICE), ids.to(DEVICE), lps.to(DEVICE), labels.to(DEVICE)


def _sparse_reference(s, ids, lps, labels, **settings):
    cfg = sparse_config(**settings).with_vocab_size(SV)
    return sparse_stats_rows(s.double().cpu(), ids.cpu(), lps.double().cpu(), labels.cpu(), cfg)


@pytest.mark.parametrize("tail, divergence, alpha", [("bucket", "tvd", 0.6), ("renorm", "jsd", 1.0),
                                                     ("none", "forward_kl", 0.6)])
def test_sparse_against_the_float64_table(tail, divergence, alpha, monkeypatch):
    """Every tail (renorm without the CE term reads no full-row statistic for the loss: with
    the stats the kernel sweeps the row anyway), the agreement rules, in place."""
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SPARSE_BLOCK)
    s, ids, lps, labels = _sparse()
    settings = dict(tail=tail, divergence=divergence, temperature=2.0, alpha=alpha, beta=0.3)
    ints, floats = sparse_kernel_settings(SV, **settings)
    gs = torch.full((), 0.5, device=DEVICE)
    loss, grad, stats = OPS.triton_sparse_kd_forward_stats(s, ids, lps, labels, gs, ints, floats)
    _assert_table(stats, _sparse_reference(s, ids, lps, labels, **settings))
    assert stats[:, 2].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0] + stats[7:, 2].tolist()
    assert stats[1, 0] == 0.0 and stats[1, 4] == 0.0  # no valid id: P = Q = 0
    plain_loss, plain_grad = OPS.triton_sparse_kd_forward(s, ids, lps, labels, gs, ints, floats)
    _assert_same(loss, plain_loss)
    _assert_same(grad, plain_grad)
    x = s.clone()
    loss2, stats2 = OPS.triton_sparse_kd_forward_stats_inplace(x, ids, lps, labels, gs, ints, floats)
    _assert_same(stats2, stats)
    _assert_same(x, grad)


def test_sparse_options_and_a_bad_row(monkeypatch):
    """The student's logit options (the teacher's log-probs are used as given), and a row with a
    valid id twice: its loss is NaN, its stats blank, the other rows' untouched."""
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SPARSE_BLOCK)
    s, ids, lps, labels = _sparse(seed=4)
    settings = dict(divergence="reverse_kl", temperature=1.0, alpha=0.5, softcap=7.0, logit_scale=1.4,
                    label_smoothing=0.1, z_loss=1e-3)
    ints, floats = sparse_kernel_settings(SV, **settings)
    want = _sparse_reference(s, ids, lps, labels, **settings)
    ids[8, 1] = ids[8, 2]  # (after the reference, which would take the row)
    loss, _, stats = OPS.triton_sparse_kd_forward_stats(s, ids, lps, labels, torch.ones((), device=DEVICE), ints,
                                                        floats)
    assert torch.isnan(loss[8])
    want[8] = torch.tensor([float("nan"), float("nan"), 0.0, float("nan"), float("nan")], dtype=want.dtype)
    _assert_table(stats, want)


# ---------------------------------------------------------------------------------------
# The operators' registrations.

def test_operators_pass_opcheck():
    """Schemas, fake implementations (torch.compile traces them) and the in-place mutations.
    (No ignored row: opcheck compares its outputs without equal_nan.)"""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 20, generator=g).to(DEVICE)
    t = torch.randn(3, 20, generator=g).to(DEVICE)
    labels = torch.tensor([1, 19, 5], device=DEVICE)
    gs = torch.ones((), device=DEVICE)
    ints, floats = kernel_settings(20, temperature=2.0, alpha=0.5)
    torch.library.opcheck(OPS.triton_kd_forward_stats.default, (s, t, labels, gs, ints, floats))
    torch.library.opcheck(OPS.triton_kd_forward_stats_inplace.default, (s.clone(), t, labels, gs, ints, floats))
    ids = torch.tensor([[1, 2, -1], [3, 4, 5], [0, 6, 7]], device=DEVICE)
    lps = torch.log_softmax(torch.randn(3, 3, generator=g), -1).to(DEVICE)
    sints, sfloats = sparse_kernel_settings(20, temperature=2.0, alpha=0.5)
    torch.library.opcheck(OPS.triton_sparse_kd_forward_stats.default, (s, ids, lps, labels, gs, sints, sfloats))
    torch.library.opcheck(OPS.triton_sparse_kd_forward_stats_inplace.default,
                          (s.clone(), ids, lps, labels, gs, sints, sfloats))
