"""The logit options (issue 13: logit_scale, softcap, teacher_*, label_smoothing, z_loss) on
the CUDA kernels, against the float64 references, on a GPU. Every test is marked ``gpu`` and
skipped without CUDA; written on a machine without a GPU, so none of them has run yet.

tests/test_cuda.py::test_shared_cases already runs the shared option cases
(harness.cases.LOGIT_OPTION_CASES, small rows) on both kernels. This file adds what those
cannot reach: LLM vocabularies (multi-CTA clusters, whose label-smoothing sum crosses the
cluster exchange; odd V, whose partial packs must keep their padding at -inf under a cap),
saturated and -inf logits under a cap, given row statistics, the sparse-teacher kernel (every
tail and divergence), the vocab-parallel shard phases against the torch backend's, and
in-place backward.
"""
import itertools

import pytest
import torch

from harness.backends import cuda_last_kernel as last_kernel
from harness.backends import kernel_backend, kernel_settings
from harness.compare import assert_close, rel_err
from harness.inputs import logits
from harness.results import backend_result, reference_result
from harness.sparse_cases import reference_rows_and_grad, sparse_inputs
from harness.sparse_cases import kernel_settings as sparse_kernel_settings
from harness.sparse_cases import rel_err as sparse_rel_err

import fastkd
from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS
from fastkd.backends import reference_shard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")

# Gemma 2 (a cap of 30 on both sides) with the hard-label terms; a scaled student with an
# uncapped teacher of its own cap; a scale alone with the z-loss; every option at once.
GEMMA = dict(softcap=30.0, label_smoothing=0.1, z_loss=1e-4)
SCALED = dict(logit_scale=0.5, teacher_softcap=20.0, teacher_logit_scale=1.5)
SCALE_Z = dict(logit_scale=2.0, z_loss=1e-3)
ALL = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.2,
           z_loss=1e-3)
OPTION_SETS = {"gemma": GEMMA, "scaled": SCALED, "scale_z": SCALE_Z, "all": ALL}


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
    if "cuda" not in LOGIT_OPTIONS_BACKENDS:
        pytest.fail("fastkd._dispatch.LOGIT_OPTIONS_BACKENDS lacks 'cuda': its kernels apply the options")


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    """Forces one kernel for the test (read by the C++ glue at every call)."""
    monkeypatch.setenv("FASTKD_CUDA_KERNEL", request.param)
    return request.param


def _labels(n, vocab, g):
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[::5] = -100
    return labels


# ---------------------------------------------------------------------------------------
# Dense kernels at LLM vocabularies.

@pytest.mark.parametrize("vocab,dtype,options", [
    (128256, torch.bfloat16, "gemma"),   # Llama 3: 8 CTAs
    (262144, torch.bfloat16, "gemma"),   # Gemma: 16 CTAs, label smoothing's sum over 16 ranks
    (262144, torch.bfloat16, "all"),
    (50257, torch.bfloat16, "all"),      # odd V: rows off 16 bytes, partial packs at both ends
    (50257, torch.bfloat16, "scaled"),
    (32000, torch.float16, "scale_z"),   # fp16: 2 CTAs
    (20001, torch.float32, "gemma"),     # fp32, 3 CTAs, the 1e-5 bar
    (20001, torch.float32, "all"),
    (20001, torch.float32, "scaled"),
], ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_vocab_with_options(divergence, vocab, dtype, options, kernel):
    g = torch.Generator(device="cuda").manual_seed(vocab + len(options))
    n = 12
    s, t = logits((n, vocab), dtype, g), logits((n, vocab), dtype, g)
    labels = _labels(n, vocab, g)
    kw = dict(divergence=divergence, temperature=1.5, alpha=0.6, reduction="sum", **OPTION_SETS[options])
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    assert_close(loss, grad, *reference_result(s, t, labels, **kw), low_precision=dtype != torch.float32)
    assert last_kernel().startswith(kernel + "["), last_kernel()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_z_loss_without_labels_and_t_1(divergence, kernel):
    """The z-loss needs no labels; at T = 1 the T = 1 softmax is q itself (raw_is_q)."""
    g = torch.Generator(device="cuda").manual_seed(21)
    s, t = logits((10, 32000), torch.bfloat16, g), logits((10, 32000), torch.bfloat16, g)
    kw = dict(divergence=divergence, temperature=1.0, z_loss=1e-2, softcap=30.0, reduction="none")
    loss, grad = backend_result(s, t, None, "cuda", **kw)
    assert_close(loss, grad, *reference_result(s, t, None, **kw), low_precision=True)


@pytest.mark.parametrize("vocab", [32000, 50257])
def test_saturated_and_masked_logits_under_a_cap(vocab, kernel):
    """Logits of +-1e4 saturate the cap (tanh = +-1, derivative 0: no inf / inf), and -inf
    logits become -cap (finite: they count, as in the reference), with label smoothing's sum
    finite too; the padded columns of a partial pack still count for nothing."""
    g = torch.Generator(device="cuda").manual_seed(22)
    n = 8
    s, t = logits((n, vocab), torch.float32, g), logits((n, vocab), torch.float32, g)
    s[0, :50] = 1e4
    s[1, 100:200] = -1e4
    s[2, 7] = float("-inf")
    t[2, 9] = float("-inf")
    s[3, :] = float("-inf")  # the whole row at -cap: a uniform student
    labels = _labels(n, vocab, g)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.5, softcap=5.0, label_smoothing=0.1, z_loss=1e-3,
              reduction="none")
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, grad, *reference_result(s, t, labels, **kw), low_precision=False)
    assert (grad[0, :50] == 0).all()  # saturated: the chain factor is 0


def test_a_huge_cap_equals_no_cap(kernel):
    g = torch.Generator(device="cuda").manual_seed(23)
    s, t = logits((8, 128256), torch.float32, g), logits((8, 128256), torch.float32, g)
    labels = _labels(8, 128256, g)
    kw = dict(divergence="reverse_kl", temperature=2.0, alpha=0.7)
    loss_a, grad_a = backend_result(s, t, labels, "cuda", **kw)
    loss_b, grad_b = backend_result(s, t, labels, "cuda", softcap=1e6, **kw)
    assert rel_err(loss_b, loss_a) < 1e-5 and rel_err(grad_b, grad_a) < 1e-5


@pytest.mark.parametrize("options", ["gemma", "all"])
@pytest.mark.parametrize("vocab", [128256, 50257])
def test_inplace_with_options_is_exact(vocab, options, kernel):
    g = torch.Generator(device="cuda").manual_seed(24)
    s, t = logits((16, vocab), torch.bfloat16, g), logits((16, vocab), torch.bfloat16, g)
    labels = _labels(16, vocab, g)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.5, **OPTION_SETS[options])
    loss_a, grad_a = backend_result(s, t, labels, "cuda", inplace=False, **kw)
    loss_b, grad_b = backend_result(s, t, labels, "cuda", inplace=True, **kw)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)


@pytest.mark.parametrize("options", list(OPTION_SETS), ids=list(OPTION_SETS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_given_row_stats_with_options(divergence, options):
    """The row_stats operator computes the transformed logits' statistics (its T = 1 column
    also for the z-loss), and kd_forward given them (the two-pass kernel, which then sums s'
    for label smoothing in its write sweep) equals the fused pass and the reference."""
    g = torch.Generator(device="cuda").manual_seed(25)
    n, v = 17, 30011
    s, t = logits((n, v), torch.float32, g), logits((n, v), torch.float32, g)
    labels = _labels(n, v, g)
    settings = dict(divergence=divergence, temperature=2.0, alpha=0.6, **OPTION_SETS[options])
    packed = kernel_settings(v, **settings)
    stats = torch.ops.fastkd.row_stats(s, t, *packed)
    cfg = fastkd.make_config(**settings).with_vocab_size(v)
    # The torch shard phase's statistics of the whole row are the row's (its T = 1 column only
    # where the CE term or the z-loss needs it, as the operator's).
    want = reference_shard.row_stats(s.double().cpu(), t.double().cpu(), cfg)[:, :5]
    assert rel_err(stats.double().cpu(), want) < 1e-5
    scale = torch.full((), 0.25, device="cuda")
    loss_a, grad_a = torch.ops.fastkd.kd_forward(s, t, labels, scale, None, *packed)
    loss_b, grad_b = torch.ops.fastkd.kd_forward(s, t, labels, scale, stats, *packed)
    assert last_kernel().startswith("twopass["), last_kernel()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-9)
    ref_loss, ref_grad = reference_result(s, t, labels, reduction="none", **settings)
    assert_close(loss_b.double(), grad_b.double() * 4.0, ref_loss, ref_grad, low_precision=False)


# ---------------------------------------------------------------------------------------
# The sparse-teacher kernel: the student's transform and the hard-label terms.

SPARSE_OPTION_SETS = {
    "softcap": dict(softcap=30.0),
    "scale_smooth": dict(logit_scale=2.0, label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "all": dict(logit_scale=0.8, softcap=20.0, label_smoothing=0.2, z_loss=1e-3),
}
TAILS_DIVERGENCES = [(tail, d) for tail in ("bucket", "renorm") for d in DIVERGENCES] + [("none", "forward_kl")]


def _sparse_check(s, ids, lps, labels, vocab, **settings):
    ints, floats = sparse_kernel_settings(vocab, **settings)
    scale = torch.tensor(0.5, device="cuda")
    loss, grad = torch.ops.fastkd.sparse_kd_forward(s, ids, lps, labels, scale, ints, floats)
    ref_rows, ref_grad = reference_rows_and_grad(s, ids, lps, labels, vocab, 0.5, **settings)
    tol_loss, tol_grad = (1e-5, 1e-5) if s.dtype == torch.float32 else (1e-2, 2e-2)
    assert sparse_rel_err(loss, ref_rows) < tol_loss, (sparse_rel_err(loss, ref_rows), settings)
    assert sparse_rel_err(grad, ref_grad) < tol_grad, (sparse_rel_err(grad, ref_grad), settings)
    if s.shape[1] > vocab:
        assert torch.all(grad[:, vocab:] == 0)
    return loss, grad


@pytest.mark.parametrize("options", list(SPARSE_OPTION_SETS), ids=list(SPARSE_OPTION_SETS))
@pytest.mark.parametrize("tail,divergence", TAILS_DIVERGENCES)
def test_sparse_every_tail_and_divergence(tail, divergence, options):
    s, ids, lps, labels = sparse_inputs(12, 32000, 64, dtype=torch.bfloat16, seed=31, device="cuda",
                                        neg_inf=divergence != "reverse_kl")
    _sparse_check(s, ids, lps, labels, 32000, divergence=divergence, tail=tail, temperature=1.5, alpha=0.7, beta=0.3,
                  **SPARSE_OPTION_SETS[options])


@pytest.mark.parametrize("options", ["softcap", "all"])
@pytest.mark.parametrize("vocab,dtype,k,width", [
    (50257, torch.bfloat16, 100, None),       # odd V: partial packs under the cap
    (128256, torch.float32, 64, None),        # fp32, staged in part, the rest re-read
    (151936, torch.bfloat16, 64, 152064),     # a padded vocabulary
])
def test_sparse_llm_vocabularies(vocab, dtype, k, width, options):
    s, ids, lps, labels = sparse_inputs(8, vocab, k, dtype=dtype, seed=32, device="cuda", width=width)
    _sparse_check(s, ids, lps, labels, vocab, divergence="jsd", tail="bucket", temperature=2.0, alpha=0.5,
                  **SPARSE_OPTION_SETS[options])


@pytest.mark.parametrize("stage_kb", ["0", ""])
def test_sparse_z_loss_reads_the_row_under_renorm(stage_kb, monkeypatch):
    """renorm without the CE term skips the row; the z-loss needs it (lse of the whole row),
    whether the row is staged in shared memory or not."""
    monkeypatch.setenv("FASTKD_SPARSE_STAGE_KB", stage_kb)
    s, ids, lps, labels = sparse_inputs(8, 32000, 64, dtype=torch.float32, seed=33, device="cuda")
    _, grad = _sparse_check(s, ids, lps, None, 32000, divergence="forward_kl", tail="renorm", z_loss=1e-2,
                            softcap=20.0)
    assert torch.count_nonzero(grad[:, :1000]) > 900  # off the support too


def test_sparse_inplace_with_options_is_exact():
    s, ids, lps, labels = sparse_inputs(8, 50257, 64, dtype=torch.bfloat16, seed=34, device="cuda")
    ints, floats = sparse_kernel_settings(50257, divergence="tvd", tail="bucket", alpha=0.6,
                                          **SPARSE_OPTION_SETS["all"])
    scale = torch.ones((), device="cuda")
    loss, grad = torch.ops.fastkd.sparse_kd_forward(s, ids, lps, labels, scale, ints, floats)
    s2 = s.clone()
    loss2 = torch.ops.fastkd.sparse_kd_forward_inplace(s2, ids, lps, labels, scale, ints, floats)
    assert torch.equal(loss, loss2) and torch.equal(grad, s2)


# ---------------------------------------------------------------------------------------
# The vocab-parallel shard phases against the torch backend's (fastkd/backends/reference_shard.py).

SHARD_OPTION_SETS = {
    "cap_smooth_z": dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-2),
    "scaled": dict(logit_scale=1.5, teacher_softcap=3.0),
    "teacher_z": dict(teacher_logit_scale=0.7, z_loss=1e-3),
    "all": ALL,
}


def _shard_inputs(divergence, alpha, options):
    """A slice [30, 75) of a 90-column row of which 70 count: the global statistics and row
    sums from the torch phases on the whole (counted) row, the slice's config carrying the
    whole vocabulary's classes (label smoothing's eps / V)."""
    n, v, a, w = 7, 90, 30, 45
    g = torch.Generator().manual_seed(41)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    s[2, 40] += 30.0  # a peaked student row, its peak in the slice
    t[1, 5] += 30.0   # a peaked teacher row, its peak outside
    t[0, 33] = float("-inf")
    labels = torch.randint(0, 70, (n,), generator=g)
    labels[1], labels[2], labels[4] = 31, 69, -100
    cfg = fastkd.make_config(divergence=divergence, alpha=alpha, temperature=0.8, beta=0.3, **SHARD_OPTION_SETS[options])
    whole = cfg.with_vocab_size(70)
    stats = reference_shard.row_stats(s[:, :70], t[:, :70], whole)[:, :5].contiguous()
    sums = reference_shard.row_sums(s[:, :70], t[:, :70], stats, whole) if divergence != "forward_kl" else None
    local = cfg.with_vocab_size(40, classes=70)
    return s[:, a:a + w].contiguous(), t[:, a:a + w].contiguous(), labels, stats, sums, local, a


@pytest.mark.parametrize("options", list(SHARD_OPTION_SETS), ids=list(SHARD_OPTION_SETS))
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_shard_phases_with_options_match_the_torch_backend(divergence, alpha, options):
    phases = kernel_backend("cuda").shard
    s, t, labels, stats, sums, cfg, start = _shard_inputs(divergence, alpha, options)
    gs, gt = s.float().cuda(), t.float().cuda()
    want = reference_shard.row_stats(s, t, cfg)
    got = phases.row_stats(gs, gt, cfg)
    assert got.shape == want.shape == (7, 7) and got.dtype == torch.float32
    assert rel_err(got.double().cpu(), want) < 1e-5, (got, want)
    if sums is not None:
        want = reference_shard.row_sums(s, t, stats, cfg)
        got = phases.row_sums(gs, gt, stats.float().cuda(), cfg)
        assert rel_err(got.double().cpu(), want) < 1e-5, (got, want)
    scale = torch.full((), 0.25, dtype=torch.float64)
    want = reference_shard.write_grad(s, t, labels, scale, stats, sums, start, cfg)
    got = phases.write_grad(gs, gt, labels.cuda(), scale.float().cuda(), stats.float().cuda(),
                            None if sums is None else sums.float().cuda(), start, cfg)
    assert got.shape == gs.shape and rel_err(got.double().cpu(), want) < 1e-5
    assert torch.count_nonzero(got[:, 40:]) == 0  # past the slice's counted columns
    assert torch.count_nonzero(got[4]) == 0       # an ignored row


def test_shard_phases_at_a_real_slice_width():
    """A quarter of Llama 3's vocabulary (32064 columns) in bf16, every option: the two-pass
    sweeps' partial packs and block reductions at width, against the torch phases in float64."""
    g = torch.Generator(device="cuda").manual_seed(42)
    n, v, w = 6, 128256, 32064
    s, t = logits((n, v), torch.bfloat16, g), logits((n, v), torch.bfloat16, g)
    labels = _labels(n, v, g)
    cfg = fastkd.make_config(divergence="jsd", alpha=0.5, temperature=2.0, **ALL)
    s64, t64 = s.double(), t.double()
    whole = cfg.with_vocab_size(v)
    stats = reference_shard.row_stats(s64, t64, whole)[:, :5].contiguous()
    sums = reference_shard.row_sums(s64, t64, stats, whole)
    local, start = cfg.with_vocab_size(w, classes=v), 2 * w
    ls, lt = s[:, start:start + w].contiguous(), t[:, start:start + w].contiguous()
    phases = kernel_backend("cuda").shard
    want = reference_shard.row_stats(ls.double(), lt.double(), local)
    assert rel_err(phases.row_stats(ls, lt, local).double(), want) < 1e-5
    want = reference_shard.row_sums(ls.double(), lt.double(), stats, local)
    assert rel_err(phases.row_sums(ls, lt, stats.float(), local).double(), want) < 1e-5
    scale = torch.full((), 0.25, dtype=torch.float64, device="cuda")
    want = reference_shard.write_grad(ls.double(), lt.double(), labels, scale, stats, sums, start, local)
    got = phases.write_grad(ls, lt, labels, scale.float(), stats.float(), sums.float(), start, local)
    assert rel_err(got.double(), want) < 2e-2  # a bf16 gradient


# ---------------------------------------------------------------------------------------
# Every combination of the options alone and in pairs on one size: the per-row branches.

PAIRS = [dict(a, **b) for a, b in itertools.combinations(
    [dict(softcap=2.0), dict(logit_scale=0.5), dict(teacher_softcap=4.0), dict(teacher_logit_scale=2.0),
     dict(label_smoothing=0.3), dict(z_loss=1e-2)], 2)]


@pytest.mark.parametrize("options", PAIRS, ids=["+".join(o) for o in PAIRS])
def test_pairs_of_options(options, kernel):
    g = torch.Generator(device="cuda").manual_seed(43)
    s, t = logits((9, 20001), torch.float32, g), logits((9, 20001), torch.float32, g)
    labels = _labels(9, 20001, g)
    kw = dict(divergence="forward_kl", temperature=0.7, alpha=0.4, reduction="none", **options)
    loss, grad = backend_result(s, t, labels, "cuda", **kw)
    assert_close(loss, grad, *reference_result(s, t, labels, **kw), low_precision=False)
