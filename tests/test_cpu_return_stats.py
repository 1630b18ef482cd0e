"""The CPU kernels' per-token diagnostics (return_stats=True; csrc/cpu/kd_cpu.cpp,
csrc/cpu/sparse_cpu.cpp, cpu_rows.h: SideStats) where tests/test_return_stats.py does not
reach: rows long enough for many 1024-entry chunks, float64 to 1e-12, every dtype, argmax
ties inside one vector, across vectors and across chunks, -inf logits, one-hot teachers,
the CE options (which must not change the stats), the stats table itself, and the sparse
kernel's agreement rules. The truth is fastkd.stats (stats_rows / sparse_stats_rows in float64).
"""
import math

import pytest
import torch

import fastkd
from fastkd._dispatch import STATS_BACKENDS, get_backend
from fastkd.config import SparseKDConfig, make_config
from fastkd.stats import sparse_stats_rows, stats_rows

pytestmark = pytest.mark.skipif(get_backend("cpu") is None or "cpu" not in STATS_BACKENDS,
                                reason="the C++ extension is not built, or its kernels write no stats")

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
IGNORE = -100
NEG_INF = float("-inf")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _table(student, teacher, labels=None, **kw):
    """The CPU kernel's stats table [N, 5] (and loss, grad) through the operator."""
    cfg = make_config("kd_loss", vocab_size=kw.pop("vocab_size", student.shape[-1]), **kw)
    n = student.shape[0]
    loss, grad, stats = get_backend("cpu").forward_stats(student, teacher, labels, torch.tensor(1.0 / n), cfg)
    return loss, grad, stats, cfg


def _want(student, teacher, labels, cfg):
    """The float64 truth of the table, from the inputs as the kernel read them."""
    return stats_rows(student.double(), teacher.double(), labels, cfg)


def _close(got, want, tol):
    """NaN and infinities where the truth has them, agreement exactly, the rest to `tol` (relative
    above 1, absolute below)."""
    got = got.double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got[:, 2], want[:, 2]), (got[:, 2], want[:, 2])
    inf = want.isinf()  # reverse KL against a teacher's zero where the student has mass
    assert torch.equal(got[inf], want[inf])
    ok = ~want.isnan() & ~inf
    err = ((got - want).abs() / (want.abs() + 1.0))[ok]
    assert err.numel() == 0 or err.max() <= tol, err.max()


# ---------------------------------------------------------------------------------------
# Dense


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_long_rows_every_divergence(divergence):
    """V = 50000: 49 chunks, the running maxima raised many times; a tie for the maximum 45000
    columns apart (the first must win), and the operator's table against stats_rows."""
    g = _gen(DIVERGENCES.index(divergence))
    n, v = 5, 50000
    s = torch.randn(n, v, generator=g) * 4
    t = torch.randn(n, v, generator=g) * 4
    s[0, [300, 45300]] = 40.0                 # tie across chunks; the teacher agrees with the first
    t[0, 300] = 40.0
    s[1, [17, 49999]] = 40.0                  # the student's first; the teacher's is the last column
    t[1, 49999] = 40.0
    t[2, torch.arange(0, v, 997)] = 30.0      # many tied teacher maxima; the student picks column 0
    s[2, 0] = 30.0
    labels = torch.tensor([1, 2, 3, IGNORE, 4])
    loss, grad, got, cfg = _table(s, t, labels, divergence=divergence, temperature=2.0, beta=0.3)
    want = _want(s, t, labels, cfg)
    _close(got, want, 1e-5)
    assert got[:3, 2].tolist() == [1.0, 0.0, 1.0]
    assert got[3, 2] == 0.0 and got[3, [0, 1, 3, 4]].isnan().all()
    assert torch.equal(got[[0, 1, 2, 4], 4], torch.zeros(4))
    # The loss and gradient are those of the kernel without stats.
    plain_loss, plain_grad = get_backend("cpu").forward(s, t, labels, torch.tensor(1.0 / n), cfg)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0) and torch.allclose(grad, plain_grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [{}, dict(softcap=20.0, logit_scale=1.3, teacher_logit_scale=0.7)],
                         ids=["plain", "options"])
def test_float64_to_1e12(divergence, options):
    g = _gen(7)
    n, v = 6, 3000
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t[1] = NEG_INF
    t[1, 2500] = 1.0                          # one-hot teacher, past the first chunks of -inf
    s[2, 5:900] = NEG_INF                     # -inf student logits (not where the teacher peaks for reverse KL)
    t[2, 5:900] = NEG_INF
    labels = torch.tensor([0, 1, IGNORE, 3, 4, 5])
    _, _, got, cfg = _table(s, t, labels, divergence=divergence, temperature=1.7, beta=0.4, **options)
    assert got.dtype == torch.float64
    _close(got, _want(s, t, labels, cfg), 1e-12)
    if not options:                           # (a softcap makes the teacher's -inf logits -cap)
        assert got[1, 0] == 0.0               # H(p) of a one-hot teacher: exactly 0


@pytest.mark.parametrize("s_dtype, t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.bfloat16), (torch.float32, torch.float64)])
def test_every_dtype(s_dtype, t_dtype):
    g = _gen(3)
    n, v = 7, 2100
    s = (torch.randn(n, v, generator=g) * 3).to(s_dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(t_dtype)
    s[0, [10, 1800]] = 12.0                   # ties across chunks survive every dtype's rounding
    t[0, 1800] = 12.0
    labels = torch.arange(n)
    labels[4] = IGNORE
    _, _, got, cfg = _table(s, t, labels, divergence="jsd", temperature=2.0)
    f64 = torch.float64 in (s_dtype, t_dtype)
    assert got.dtype == (torch.float64 if f64 else torch.float32)
    _close(got, _want(s, t, labels, cfg), 1e-12 if s_dtype == t_dtype == torch.float64 else 1e-5)
    assert got[0, 2] == 0.0                   # the student's first maximum is column 10


def test_ties_inside_and_across_vectors_and_chunks():
    """The same maximum in columns of one vector, of neighbouring vectors, on both sides of a
    chunk boundary, in far-apart chunks, and a later chunk that ties the maximum before a
    higher one: the lowest column of the maximum wins on each side."""
    v = 4100
    cases = [  # (student's maxima, teacher's maxima, agree?)
        ([3, 9], [3], True),                  # one 16-lane vector
        ([9, 3], [9], False),                 # the same, given in the other order: still column 3
        ([15, 16], [16], False),              # neighbouring vectors
        ([1023, 1024], [1023], True),         # the chunk boundary
        ([5, 4095], [4095], False),           # the first and the last chunk
        ([2048, 4099], [2048, 4099], True),   # both sides tie alike
        (list(range(32, 48)), [32], True),    # a whole vector tied
    ]
    s = torch.randn(len(cases) + 1, v, generator=_gen(1))
    t = torch.randn(len(cases) + 1, v, generator=_gen(2))
    for row, (sm, tm, _) in enumerate(cases):
        s[row, sm] = 9.0
        t[row, tm] = 9.0
    # A chunk ties the running maximum (column 100) and a later chunk raises it (column 3000).
    last = len(cases)
    s[last, [100, 1500]] = 9.0
    s[last, 3000] = 9.5
    t[last, 3000] = 9.0
    for dtype in (torch.float32, torch.float64):
        _, _, got, cfg = _table(s.to(dtype), t.to(dtype), temperature=3.0)
        assert got[:, 2].tolist() == [float(a) for *_, a in cases] + [1.0]
        assert torch.equal(got[:, 2], (s.argmax(-1) == t.argmax(-1)).to(got.dtype))  # torch.argmax's rule
        _close(got, _want(s.to(dtype), t.to(dtype), None, cfg), 1e-5)


def test_inf_logits_and_one_hot_teachers():
    """-inf logits are legal (0 log 0 = 0): finite entropies, no NaN; a one-hot teacher (one
    finite logit, or one logit far above the rest) has entropy exactly 0."""
    v = 5000
    g = _gen(5)
    s = torch.randn(6, v, generator=g) * 2
    t = torch.randn(6, v, generator=g) * 2
    s[0, 1000:4000] = NEG_INF                 # a masked vocabulary slice, on both sides
    t[0, 1000:4000] = NEG_INF
    t[1] = NEG_INF
    t[1, 3333] = 5.0                          # one-hot teacher after three chunks of -inf
    t[2] = -1e4
    t[2, 7] = 0.0                             # one-hot to float precision
    s[3, :2048] = NEG_INF                     # the student's first two chunks all -inf
    t[4, ::2] = NEG_INF                       # every other lane
    s[5] = NEG_INF
    s[5, 4999] = 0.0                          # one-hot student: H(q) = 0
    for divergence in ("forward_kl", "jsd"):
        _, _, got, cfg = _table(s, t, divergence=divergence, temperature=2.0)
        want = _want(s, t, None, cfg)
        assert not got[:, :3].isnan().any()
        assert got[1, 0] == 0.0 and got[2, 0] == 0.0 and got[5, 1] == 0.0
        assert got[1, 2] == float(s[1].argmax() == 3333)
        _close(got, want, 1e-5)


@pytest.mark.parametrize("divergence", ("forward_kl", "tvd"))
def test_ce_term_label_smoothing_z_loss_change_no_stat(divergence):
    """The hard-label terms weigh the loss only: the table is that of the plain call (to the
    rounding of the options' path, which label smoothing and the z-loss take)."""
    g = _gen(9)
    s = torch.randn(6, 2500, generator=g) * 3
    t = torch.randn(6, 2500, generator=g) * 3
    labels = torch.tensor([1, IGNORE, 3, 4, 5, 6])
    base = dict(divergence=divergence, temperature=2.0)
    _, _, plain, cfg = _table(s, t, labels, **base)
    want = _want(s, t, labels, cfg)
    _close(plain, want, 1e-5)
    for extra in (dict(alpha=0.3), dict(alpha=0.3, temperature=1.0), dict(alpha=0.5, label_smoothing=0.1),
                  dict(z_loss=1e-3), dict(alpha=0.2, label_smoothing=0.2, z_loss=1e-4)):
        _, _, got, _ = _table(s, t, labels, **{**base, **extra})
        if "temperature" in extra:
            _close(got, _want(s, t, labels, make_config("kd_loss", vocab_size=2500, **{**base, **extra})), 1e-5)
            continue
        assert torch.equal(got[:, 2], plain[:, 2])
        assert torch.allclose(got, plain, rtol=2e-6, atol=2e-6, equal_nan=True), extra


def test_kd_loss_return_stats_runs_the_cpu_kernel():
    """kd_loss(backend='cpu', return_stats=True) reads the kernel's table: the same numbers as
    the operator, in the KDStats fields."""
    g = _gen(4)
    s = torch.randn(2, 3, 1500, generator=g)
    t = torch.randn(2, 3, 1500, generator=g)
    labels = torch.tensor([[0, IGNORE, 2], [3, 4, 5]])
    loss, stats = fastkd.kd_loss(s, t, labels, backend="cpu", return_stats=True, divergence="reverse_kl",
                                 temperature=1.5)
    _, _, table, _ = _table(s.reshape(6, -1), t.reshape(6, -1), labels.reshape(-1), divergence="reverse_kl",
                            temperature=1.5)
    assert torch.equal(stats.teacher_entropy.reshape(-1).nan_to_num(), table[:, 0].nan_to_num())
    assert torch.equal(stats.divergence.reshape(-1).nan_to_num(), table[:, 3].nan_to_num())
    assert torch.equal(stats.top1_agree.reshape(-1), table[:, 2] > 0.5)


# ---------------------------------------------------------------------------------------
# Sparse


def _sparse_table(student, ids, logprobs, labels=None, **kw):
    cfg = make_config("sparse_kd_loss", config=SparseKDConfig, vocab_size=student.shape[-1], **kw)
    n = student.shape[0]
    loss, grad, stats = get_backend("cpu").sparse_forward_stats(student, ids, logprobs, labels,
                                                                torch.tensor(1.0 / n), cfg)
    return loss, grad, stats, cfg


def _sparse_inputs(n, v, k, seed, dtype=torch.float32):
    g = _gen(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = (torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) - 0.3).to(dtype)
    return s, ids, lp


@pytest.mark.parametrize("tail, divergence", [("bucket", d) for d in DIVERGENCES] + [("renorm", "jsd"),
                                              ("renorm", "forward_kl"), ("none", "forward_kl")])
def test_sparse_long_rows_and_float64(tail, divergence):
    """V = 50000 in float32 and V = 3000 in float64 (to 1e-12), with a student tie across chunks
    and -inf student logits; renorm without the CE term runs the sweep for the stats alone
    (its loss and gradient stay those without stats)."""
    for v, dtype, tol in ((50000, torch.float32, 1e-5), (3000, torch.float64, 1e-12)):
        s, ids, lp = _sparse_inputs(5, v, 20, seed=v, dtype=dtype)
        s[0, [ids[0, 0].item(), v - 1]] = 40.0          # the student's first maximum is the support's
        lp[0, 0] = 0.0 - 0.01
        s[1, : v // 2] = NEG_INF                        # -inf off (and maybe on) the support
        labels = torch.tensor([0, 1, IGNORE, 3, 4])
        loss, grad, got, cfg = _sparse_table(s, ids, lp, labels, tail=tail, divergence=divergence, temperature=2.0)
        want = sparse_stats_rows(s.double(), ids, lp.double(), labels, cfg)
        assert got.dtype == dtype
        _close(got, want, tol)
        assert got[0, 2] == 1.0
        plain_loss, plain_grad = get_backend("cpu").sparse_forward(s, ids, lp, labels, torch.tensor(1.0 / 5), cfg)
        assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0, equal_nan=True)
        assert torch.allclose(grad, plain_grad, rtol=1e-5, atol=1e-12, equal_nan=True)


def test_sparse_agreement_rules():
    """The teacher's best id is the valid slot of highest log-prob, the FIRST SLOT AS GIVEN
    among ties (not the lowest id); a row without a valid id never agrees; with every
    log-prob -inf, slot 0 as torch.argmax picks it (an empty slot 0 reads as id 0)."""
    v = 300
    s = torch.randn(8, v, generator=_gen(12))
    ids = torch.tensor([[40, 7, 100, -1]] * 8)
    lp = torch.tensor([[-1.0, -1.0, -2.0, 0.0]] * 8)    # slots 0 and 1 tie; slot 3 is empty
    s[0, 40] = 9.0                                      # the first tied slot's id: agrees
    s[1, 7] = 9.0                                       # the second tied slot's id (the lower id): does not
    ids[2] = -1                                         # no valid id: never agrees
    s[2, 0] = 9.0
    lp[3] = torch.tensor([-3.0, -1.0, -1.0, 5.0])       # slot 1 beats slot 2 (a tie); the empty slot's 5 is not read
    s[3, 7] = 9.0
    ids[4] = torch.tensor([-1, 7, 100, 250])            # every log-prob -inf, slot 0 empty: id 0
    lp[4] = NEG_INF
    s[4, 0] = 9.0
    ids[5] = torch.tensor([-1, 7, 100, 250])            # the same, the student elsewhere
    lp[5] = NEG_INF
    s[5, 250] = 9.0
    ids[6] = torch.tensor([250, 3, 100, 7])             # every log-prob -inf, slot 0 valid: its id
    lp[6] = NEG_INF
    s[6, 250] = 9.0
    s[7, [7, 200]] = 9.0                                # the student's tie: column 7 wins; the teacher's best
    ids[7] = torch.tensor([7, 200, 3, 4])
    lp[7] = torch.tensor([-0.5, -2.0, -3.0, -4.0])
    for tail in ("bucket", "renorm"):
        _, _, got, cfg = _sparse_table(s, ids, lp, tail=tail, temperature=1.0)
        assert got[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
        _close(got, sparse_stats_rows(s.double(), ids, lp.double(), None, cfg), 1e-5)


def test_sparse_every_dtype_and_inplace():
    s, ids, lp = _sparse_inputs(6, 2000, 8, seed=21)
    labels = torch.tensor([0, IGNORE, 2, 3, 4, 5])
    for s_dtype, lp_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                              (torch.float32, torch.float64), (torch.float64, torch.float32)):
        x, y = s.to(s_dtype), lp.to(lp_dtype)
        loss, stats = fastkd.sparse_kd_loss(x, ids, y, labels, backend="cpu", return_stats=True, temperature=2.0)
        cfg = make_config("sparse_kd_loss", config=SparseKDConfig, vocab_size=2000, temperature=2.0)
        want = sparse_stats_rows(x.double(), ids, y.double(), labels, cfg)
        f64 = torch.float64 in (s_dtype, lp_dtype)
        assert stats.student_entropy.dtype == (torch.float64 if f64 else torch.float32)
        got = torch.stack([stats.teacher_mass, stats.student_entropy, stats.top1_agree.to(stats.student_mass.dtype),
                           stats.divergence, stats.student_mass], -1)
        got[1, 2] = 0.0
        _close(got, want, 1e-12 if s_dtype == lp_dtype == torch.float64 else 1e-5)
    # inplace_backward: the stats are read before the row is overwritten.
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1.0
    loss, stats = fastkd.sparse_kd_loss(logits, ids, lp, labels, backend="cpu", return_stats=True,
                                        inplace_backward=True, temperature=2.0)
    cfg = make_config("sparse_kd_loss", config=SparseKDConfig, vocab_size=2000, temperature=2.0)
    assert torch.allclose(stats.student_entropy.nan_to_num(),
                          sparse_stats_rows(s.double(), ids, lp.double(), labels, cfg)[:, 1].float().nan_to_num(),
                          rtol=1e-5, atol=1e-5)
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert math.isfinite(loss.item())


def test_bench_return_stats_runs(capsys):
    """benchmarks/bench_return_stats.py on a tiny shape (its numbers are not checked)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_return_stats.py"
    spec = importlib.util.spec_from_file_location("bench_return_stats", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--shape", "8x300", "--reps", "1", "--sparse", "4", "--tails", "bucket,renorm",
                    "--threads", "1", "--cpu-time"])
    finally:
        torch.set_num_threads(threads)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("dense", "sparse"))]
    assert len(rows) == 12  # (dense, bucket, renorm) x (forward_kl, jsd) x (off, on)
