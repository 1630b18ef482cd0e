"""Triton-specific properties of fastkd/backends/triton/ that the shared suite cannot see.

On a CPU-only machine the kernels run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); tests marked ``gpu`` need CUDA and
skip without it. The shared case list (harness/cases.py) runs the single-block path at V ~ 1000;
here the multi-block path is forced with a small block size, and the launch configuration,
int64 addressing, scale_grad_, row statistics and the operator registrations are checked.
"""
import contextlib
import math

import pytest
import torch

from harness.backends import kernel_backend, kernel_settings
from harness.cases import DIVERGENCES, LARGE_VOCAB_CENTRED, Case
from harness.compare import check_case, check_rows, dtype_tolerances, fp32_grad_tolerance, rel_err
from harness.inputs import logits_in_dtype, make_inputs
from harness.results import reference_loss_and_grad, reference_result, reference_row_stats, run_backend

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import fastkd  # noqa: E402
from fastkd.backends import triton as triton_kd  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_kd.kernels_interpreted()
if not (HAS_CUDA or INTERPRETED):
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if HAS_CUDA else "cpu"
interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="inspects the Triton interpreter")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

SMALL_BLOCK = 256  # V = 1001 -> 4 blocks per sweep


@pytest.fixture
def small_block(monkeypatch):
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SMALL_BLOCK)
    return SMALL_BLOCK


# ---------------------------------------------------------------------------------------
# Launch configuration

PROBE_VOCABS = [1, 2, 3, 17, 1000, 1001, 2048, 2049, 4097, 8192, 8193, 16384, 16385, 32000, 50257, 128256,
                151936, 152064, 262144]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("vocab", PROBE_VOCABS)
def test_launch_config_bounds(divergence, vocab):
    cfg = triton_kd.launch_config(vocab, torch.bfloat16, torch.float32, divergence)
    assert cfg.block & (cfg.block - 1) == 0 and 1 <= cfg.block <= triton_kd.MAX_BLOCK
    assert cfg.num_warps in (4, 8, 16, 32)
    assert cfg.block // (32 * cfg.num_warps) <= 16  # values of each tensor per thread
    assert cfg.single_block == (triton.next_power_of_2(vocab) <= triton_kd.SINGLE_BLOCK_MAX[divergence])
    if cfg.single_block:
        assert cfg.block >= vocab
    else:
        assert cfg.block < vocab


def test_config_classes_cover_every_launch():
    """The sm_90 compile check enumerates config_classes(); every launch must fall in one,
    and no block in a class may exceed the class's representative (its worst case)."""
    classes = {}
    for d, cfg, _ in triton_kd.config_classes():
        key = (d, cfg.single_block, cfg.num_warps)
        classes[key] = max(classes.get(key, 0), cfg.block)
    for divergence in DIVERGENCES:
        for vocab in PROBE_VOCABS + list(range(1, 70000, 997)):
            cfg = triton_kd.launch_config(vocab, torch.float16, torch.float16, divergence)
            key = (divergence, cfg.single_block, cfg.num_warps)
            assert key in classes, (vocab, cfg)
            assert cfg.block <= classes[key]


def test_block_override_forces_multi_block():
    cfg = triton_kd.launch_config(1001, torch.float32, torch.float32, "jsd", block_override=SMALL_BLOCK)
    assert not cfg.single_block and cfg.block == SMALL_BLOCK
    cfg = triton_kd.launch_config(200, torch.float32, torch.float32, "jsd", block_override=SMALL_BLOCK)
    assert cfg.single_block and cfg.block == 256


# ---------------------------------------------------------------------------------------
# int64 addressing

@triton.jit
def _offset_probe(ROWS, OUT, stride):
    i = tl.program_id(0)
    tl.store(OUT + i, triton_kd.rows.row_offset(tl.load(ROWS + i), stride))


def test_row_offset_is_int64_past_2_31():
    """Row addressing of every kernel goes through _row_offset: int32 rows (as program_id
    gives them) times the row stride must not wrap at 16384 x 151936 > 2^31."""
    rows = torch.tensor([0, 1, 14133, 16383, 2**31 - 1], dtype=torch.int32, device=DEVICE)
    for stride in (151936, 152064, 262144):
        out = torch.zeros(rows.shape, dtype=torch.int64, device=DEVICE)
        _offset_probe[(rows.numel(),)](rows, out, stride)
        assert out.tolist() == [int(r) * stride for r in rows.tolist()]
    assert 16383 * 151936 > 2**31


# ---------------------------------------------------------------------------------------
# Multi-block and single-block paths against the reference

MULTI_BLOCK_CASES = [
    Case(divergence=d, alpha=0.6, temperature=2.0) for d in DIVERGENCES          # CE at T != 1
] + [
    Case(divergence=d, temperature=1.0, alpha=a) for d, a in (("jsd", 0.6), ("tvd", 1.0))  # CE at T == 1
] + [
    Case(divergence=d, neg_inf="both", alpha=0.6) for d in DIVERGENCES
] + [
    Case(divergence="reverse_kl", neg_inf="student", alpha=0.6),
    Case(student_dtype=torch.bfloat16, teacher_dtype=torch.float32, divergence="jsd", beta=0.3),
    Case(teacher_pad=7, vocab_size=990, divergence="tvd", alpha=0.6),
    Case(inplace=True, divergence="reverse_kl", alpha=0.6),
    Case(inplace=True, divergence="forward_kl", student_dtype=torch.float16, alpha=0.6),
    Case(noncontiguous=True, divergence="jsd"),
    Case(nan_row=True, divergence="forward_kl", reduction="none"),
    Case(nan_row=True, divergence="jsd", reduction="none"),
    Case(ignore_frac=1.0, alpha=0.6, divergence="tvd"),
]


def _few_rows(cases, rows=(9,)):
    """The interpreter's time grows with the rows, the paths' coverage does not: 9 rows
    (some ignored, some peaked) instead of the default 37, where a case sets no shape."""
    return [c.replace(lead=rows) if c.lead == Case().lead else c for c in cases]


MULTI_BLOCK_CASES = _few_rows(MULTI_BLOCK_CASES)


@pytest.mark.parametrize("case", MULTI_BLOCK_CASES, ids=[c.id for c in MULTI_BLOCK_CASES])
def test_multi_block_matches_reference(case, small_block):
    assert not triton_kd.launch_config(case.vocab_size or case.vocab, case.student_dtype, case.student_dtype,
                                       case.divergence, triton_kd.launch.BLOCK_OVERRIDE).single_block
    check_case(case, "triton", DEVICE)


@pytest.mark.parametrize("case", LARGE_VOCAB_CENTRED, ids=[c.id for c in LARGE_VOCAB_CENTRED])
def test_fp32_centred_gradient_large_vocab(case):
    """fp32 reverse KL / JSD at V = 32000 (the multi-block path: 16 blocks of 2048): the
    gradient within 1e-5 of float64, or within 2x PyTorch's own fp32 error where larger."""
    assert not triton_kd.launch_config(case.vocab, torch.float32, torch.float32, case.divergence).single_block
    s, t, labels = make_inputs(case, DEVICE)
    _, ref_grad = reference_loss_and_grad(case, s, t, labels)
    _, grad = run_backend(case, "triton", s, t, labels)
    err = rel_err(grad, ref_grad)
    tol = fp32_grad_tolerance(case, s, t, labels, ref_grad)
    assert err < tol, f"grad rel err {err:.3g} >= {tol:.3g}"


@pytest.mark.parametrize("path", ["single", "multi"])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_tied_top_entries_get_their_gradient(divergence, path, monkeypatch):
    """Two equal top logits holding (almost) all the mass: q = 1/2 each, which rounding can
    push above 1/2 for both. The peaked-entry formula assumes at most one such entry and
    gave both a zero gradient; the exact one is q_i (h_i - sum q h), not 0."""
    g = torch.Generator().manual_seed(4)
    if path == "multi":
        monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", 128)
        n, v = 48, 300
    else:
        n, v = 200, 2
    a = torch.randn(n, 1, generator=g, dtype=torch.float64) * 30
    s = torch.full((n, v), -1e4, dtype=torch.float64)  # exp(-1e4 / T) = 0 in fp32 and fp64
    s[:, :2] = a
    s[:, v - 1] = a[:, 0]
    s[:, 0] = -1e4
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        check_rows(s.float().to(DEVICE), t.float().to(DEVICE), None, "triton", divergence=divergence,
                   temperature=temperature)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_multi_block_leading_masked_blocks(divergence, monkeypatch):
    """Rows whose first blocks are all -inf (the running max starts at -inf: anchor at 0)
    and whose live logits are far below 0 (the first real anchor is very negative)."""
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", 128)
    g = torch.Generator().manual_seed(3)
    n, v = 6, 700
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3 - 300.0
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3 - 250.0
    s[:3, :300] = float("-inf")      # both sides masked over the first blocks
    t[:3, :300] = float("-inf")
    s[3, :5] = t[3, :5] = float("-inf")              # masked entries inside a live block
    s[4, 128:256] = t[4, 128:256] = float("-inf")    # a fully masked block in the middle
    labels = torch.full((n,), 650, dtype=torch.int64)
    check_rows(s.float().to(DEVICE), t.float().to(DEVICE), labels.to(DEVICE), "triton", divergence=divergence,
               temperature=2.0, alpha=0.6)


def test_single_block_zeroes_student_columns_past_the_block():
    """V = 1000 fits a 1024-column block, the student is 1100 wide: columns 1024..1099 are
    written by the tail loop, with zeros."""
    case = Case(vocab=1100, vocab_size=1000, alpha=0.6, divergence="jsd")
    assert triton_kd.launch_config(1000, torch.float32, torch.float32, "jsd").single_block
    check_case(case, "triton", DEVICE)
    s, t, labels = make_inputs(case, DEVICE)
    loss = fastkd.kd_loss(s, t, labels, backend="triton", vocab_size=1000, alpha=0.6, divergence="jsd")
    (grad,) = torch.autograd.grad(loss, s)
    assert (grad[:, 1000:] == 0).all()


def test_out_of_range_label_gives_nan_row():
    """The range check on the logits' device: labels outside [0, V) give a NaN loss and a
    NaN gradient row (the Python layer rejects them on the CPU, so call the op directly)."""
    s, t, _ = make_inputs(Case(lead=(4,)), DEVICE)
    labels = torch.tensor([3, 1001, -100, -5], dtype=torch.int64, device=DEVICE)
    grad_scale = torch.ones((), device=DEVICE)
    loss, grad = torch.ops.fastkd.triton_kd_forward(s.detach(), t, labels, grad_scale, None,
                                                    *kernel_settings(1001, temperature=2.0, alpha=0.6))
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0 and torch.isnan(loss[3])
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all() and (grad[2] == 0).all()
    assert torch.isnan(grad[3]).all()


# ---------------------------------------------------------------------------------------
# Peeled rows: odd V, rows not on 16 bytes (the multi-block sweeps peel the head)

def _rows_at(n, v, dtype, offset=0, stride=None, seed=0):
    """[n, v] logits in rows of ``stride`` elements starting ``offset`` elements into a
    buffer whose other entries are sentinels (checked untouched by in-place writes)."""
    g = torch.Generator().manual_seed(seed)
    stride = stride or v
    buf = torch.full((offset + n * stride + 8,), 1234.0, dtype=dtype, device=DEVICE)
    rows = buf[offset:offset + n * stride].view(n, stride)[:, :v]
    rows.copy_(torch.randn(n, v, generator=g, dtype=torch.float64).mul_(3).to(dtype))
    return buf, rows


def test_peel_columns():
    """The launch decision: no peel where the JIT proves rows aligned, where no one lead
    aligns every tensor, or for the fp32 pairs that would spill; else the narrowest
    dtype's elements in 16 bytes."""
    peel = triton_kd.launch.peel_columns
    _, a = _rows_at(4, 32000, torch.bfloat16)
    _, b = _rows_at(4, 32000, torch.bfloat16)
    assert peel(32000, "jsd", a, b, torch.empty_like(a)) == 0               # aligned: the JIT vectorises
    _, a = _rows_at(4, 50257, torch.bfloat16)
    _, b = _rows_at(4, 50257, torch.bfloat16)
    assert peel(50257, "jsd", a, b, torch.empty_like(a)) == 8
    assert peel(50257, None, a, b) == 8                                      # the row_stats kernel
    _, b32 = _rows_at(4, 50257, torch.float32, offset=4, stride=50261)
    assert peel(50257, "tvd", a, b32) == 8                                   # mixed: bf16 sets the period
    _, b1 = _rows_at(4, 50257, torch.bfloat16, offset=1)
    assert peel(50257, "jsd", a, b1) == 0                                    # leads differ: no common head
    _, b2 = _rows_at(4, 50257, torch.bfloat16, stride=50259)
    assert peel(50257, "jsd", a, b2) == 0                                    # strides differ by 2 columns
    assert peel(50257, "jsd", a, b, torch.empty(4, 50260, dtype=torch.bfloat16)[:, :50257]) == 0  # the gradient's
    _, a32 = _rows_at(4, 32001, torch.float32)
    _, c32 = _rows_at(4, 32001, torch.float32, offset=4, stride=32005)
    assert peel(32001, "forward_kl", a32, c32) == 4                          # leads and strides agree mod 4
    assert peel(32001, "tvd", a32, c32) == 0                                 # fp32 tvd: PEEL_FP32
    _, f = _rows_at(4, 1001, torch.float32, offset=3, stride=1006)
    assert peel(1001, "jsd", f, f, f) == 4 and triton_kd.launch.base_lead(f, 4) == 3   # in place


PEELED_LAYOUTS = {
    # name: (student dtype, teacher dtype, student offset/stride, teacher offset/stride, vocab_size, in place)
    "bf16": (torch.bfloat16, torch.bfloat16, (0, None), (0, None), None, False),
    "mixed-vocab_size": (torch.bfloat16, torch.float32, (0, None), (8, 1009), 995, False),
    "fp32-inplace-odd-offset": (torch.float32, torch.float32, (3, 1006), (7, 1010), None, True),
    "fp16-inplace-odd-offset": (torch.float16, torch.float16, (5, 1005), (13, 1013), 990, True),
}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("layout", list(PEELED_LAYOUTS))
def test_peeled_rows_match_reference(layout, divergence, small_block):
    """V = 1001 in blocks of 256, 16 rows (every lead): rows whose starts are not on 16
    bytes, at odd offsets and strides, in and out of place, CE with ignored rows, the
    gradient past vocab_size zero; per-row loss and gradient against float64, and an
    in-place write touches nothing outside the student's rows."""
    s_dtype, t_dtype, (s_off, s_stride), (t_off, t_stride), vocab_size, inplace = PEELED_LAYOUTS[layout]
    n, v = 16, 1001
    s_buf, s = _rows_at(n, v, s_dtype, s_off, s_stride, seed=1)
    _, t = _rows_at(n, v, t_dtype, t_off, t_stride, seed=2)
    vs = vocab_size or v
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, vs, (n,), generator=g).to(DEVICE)
    labels[::5] = -100
    settings = dict(divergence=divergence, temperature=2.0, alpha=0.6, beta=0.3)
    grad_out = s if inplace else torch.empty_like(s)  # as forward allocates it
    peels = triton_kd.launch.peel_elements(divergence, s.element_size(), t.element_size()) > 0
    assert (triton_kd.launch.peel_columns(vs, divergence, s, t, grad_out) > 0) == peels  # fp32: PEEL_FP32
    assert not triton_kd.launch_config(vs, s_dtype, t_dtype, divergence, SMALL_BLOCK).single_block
    packed = kernel_settings(vs, **settings)
    gs = torch.ones((), device=DEVICE)
    ref_loss, ref_grad = reference_result(s, t, labels, reduction="none", ignore_index=-100,
                                          vocab_size=vocab_size, **settings)
    if inplace:
        outside = s_buf.clone()
        outside.view(-1)[s_off:s_off + n * (s_stride or v)].view(n, -1)[:, :v] = 0
        loss = torch.ops.fastkd.triton_kd_forward_inplace(s, t, labels, gs, None, *packed)
        grad = s
        kept = s_buf.clone()
        kept.view(-1)[s_off:s_off + n * (s_stride or v)].view(n, -1)[:, :v] = 0
        assert torch.equal(kept, outside), "an in-place write left the student's rows"
    else:
        loss, grad = torch.ops.fastkd.triton_kd_forward(s, t, labels, gs, None, *packed)
    loss_tol, grad_tol = dtype_tolerances({s_dtype, t_dtype} != {torch.float32})
    assert rel_err(loss.double().cpu(), ref_loss) < loss_tol
    assert rel_err(grad.double().cpu(), ref_grad) < grad_tol
    if vocab_size:
        assert (grad[:, vocab_size:] == 0).all()


@pytest.mark.parametrize("layout", ["bf16", "fp32-inplace-odd-offset"])
def test_peeled_row_stats(layout, small_block):
    """The row_stats operator on peeled rows equals its unpeeled sweep (teacher and student
    leads that disagree: no peel) to rounding, and the float64 statistics."""
    s_dtype, t_dtype, (s_off, s_stride), (t_off, t_stride), _, _ = PEELED_LAYOUTS[layout]
    _, s = _rows_at(16, 1001, s_dtype, s_off, s_stride, seed=1)
    _, t = _rows_at(16, 1001, t_dtype, t_off, t_stride, seed=2)
    packed = kernel_settings(1001, temperature=2.0, alpha=0.6)
    assert triton_kd.launch.peel_columns(1001, None, s, t) > 0
    out = triton_kd.row_stats(s, t, *packed)
    ref = reference_row_stats(s.cpu(), t.cpu(), 2.0, True)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-6, atol=0)
    _, t_off_by_one = _rows_at(16, 1001, t_dtype, t_off + 1, t_stride, seed=2)
    assert triton_kd.launch.peel_columns(1001, None, s, t_off_by_one) == 0
    torch.testing.assert_close(triton_kd.row_stats(s, t_off_by_one, *packed), out, rtol=1e-6, atol=0)


@pytest.mark.parametrize("vocab,dtype,divergence",
                         [(50257, torch.bfloat16, "jsd"), (32001, torch.float32, "forward_kl")])
def test_peeled_llm_vocab(vocab, dtype, divergence):
    """The odd vocabularies of GPT-2 (50257) and others (32001) at the real block size
    (multi block, 2048 columns): peeled, against float64."""
    _, s = _rows_at(3, vocab, dtype, seed=4)
    _, t = _rows_at(3, vocab, dtype, seed=5)
    assert triton_kd.launch.peel_columns(vocab, divergence, s, t, torch.empty_like(s)) > 0
    check_rows(s, t, torch.tensor([5, -100, vocab - 1], device=DEVICE), "triton", divergence=divergence,
               temperature=2.0, alpha=0.6)


# ---------------------------------------------------------------------------------------
# Vocabulary split: few rows at a large V, a row's columns across programs (split.py)

def _check_split(n_rows, vocab, cfg, override=None):
    split = triton_kd.launch.vocab_splits(n_rows, vocab, cfg, override)
    if split.splits == 1:
        return split
    assert split.chunk % cfg.block == 0                                      # whole blocks, one lead
    assert (split.splits - 1) * split.chunk < vocab <= split.splits * split.chunk  # no split past V
    assert split.splits <= triton_kd.launch.MAX_SPLITS
    return split


def test_vocab_splits():
    """The launch decision: split only multi-block rows, only while the rows alone leave
    the GPU short of SPLIT_PROGRAMS programs, into splits of at least SPLIT_MIN_BLOCKS
    blocks; an override asks for a count (bounded by one block per split)."""
    launch = triton_kd.launch
    cfg = triton_kd.launch_config(128256, torch.bfloat16, torch.bfloat16, "forward_kl")
    assert launch.vocab_splits(4, 1000, triton_kd.launch_config(1000, torch.float32, torch.float32, "jsd")).splits == 1
    assert launch.vocab_splits(launch.SPLIT_PROGRAMS, 128256, cfg).splits == 1     # enough rows
    assert launch.vocab_splits(8192, 128256, cfg).splits == 1
    for n in (1, 16, 64, 128, 256):
        split = _check_split(n, 128256, cfg)
        assert split.splits > 1 and split.chunk >= launch.SPLIT_MIN_BLOCKS * cfg.block
        # the programs wanted, or as many splits as their minimum length allows
        assert n * split.splits >= launch.SPLIT_PROGRAMS or split.chunk < 2 * launch.SPLIT_MIN_BLOCKS * cfg.block
    small = triton_kd.launch_config(16385, torch.float32, torch.float32, "jsd")
    assert launch.vocab_splits(1, 12000, small).splits == 1                       # < 2 x SPLIT_MIN_BLOCKS blocks
    cfg = triton_kd.launch_config(1001, torch.float32, torch.float32, "jsd", block_override=128)
    assert _check_split(37, 1001, cfg, 3) == launch.VocabSplit(3, 384)
    assert _check_split(37, 1001, cfg, 100).splits == 8                           # one block each
    assert launch.vocab_splits(37, 1001, cfg, 1).splits == 1
    for n in range(1, 300, 7):
        for vocab in PROBE_VOCABS + [65537, 100003, 200000]:
            for divergence in DIVERGENCES:
                _check_split(n, vocab, triton_kd.launch_config(vocab, torch.bfloat16, torch.bfloat16, divergence))


SPLIT_BLOCK = 128  # V = 1001: 8 blocks, 3 splits of 3, 3 and 2 blocks


@pytest.fixture
def split_launches(monkeypatch):
    """Forces the split path at V ~ 1000 (blocks of SPLIT_BLOCK, 3 splits); records the
    VocabSplit of each split launch."""
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SPLIT_BLOCK)
    monkeypatch.setattr(triton_kd.launch, "SPLIT_OVERRIDE", 3)
    log = []
    launch = triton_kd.split.launch

    def logged(*args, **kwargs):
        log.append(args[8])
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_kd.split, "launch", logged)
    return log


SPLIT_CASES = [
    Case(divergence=d, alpha=0.6, temperature=2.0) for d in DIVERGENCES                # CE at T != 1
] + [
    Case(divergence=d, alpha=0.6, temperature=1.0) for d in DIVERGENCES                # CE at T == 1
] + [
    Case(divergence=d, temperature=0.5) for d in DIVERGENCES                           # no CE
] + [
    Case(divergence=d, student_dtype=torch.bfloat16, alpha=0.6, beta=0.3) for d in DIVERGENCES
] + [
    Case(divergence=d, inplace=True, alpha=0.6) for d in DIVERGENCES
] + [
    Case(divergence=d, vocab=1100, vocab_size=1000, teacher_pad=3, alpha=0.6) for d in ("forward_kl", "tvd")
] + [
    Case(divergence="jsd", student_dtype=torch.bfloat16, teacher_dtype=torch.float32, inplace=True, vocab=1100,
         vocab_size=1000, alpha=0.6),
    Case(divergence="reverse_kl", vocab=4097, lead=(5,), alpha=0.6),                  # 33 blocks: 3 of 11
    Case(divergence="jsd", neg_inf="both", alpha=0.6),
    Case(divergence="tvd", noncontiguous=True, alpha=0.6),
    Case(divergence="forward_kl", ignore_frac=1.0, alpha=0.6),
    Case(divergence="reverse_kl", labels=False),
]
SPLIT_CASES = _few_rows(SPLIT_CASES)


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.id for c in SPLIT_CASES])
def test_split_matches_reference(case, split_launches):
    """The split path against float64 under the tolerance policy: every divergence, CE at
    T != 1 and T == 1 and none, ignored rows, bf16 (peeled rows at V = 1001), in place,
    a padded student (vocab_size < V: zeros past it), masked entries."""
    check_case(case, "triton", DEVICE)
    assert split_launches and all(split.splits == 3 for split in split_launches), split_launches


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("inplace", [False, True])
def test_split_agrees_with_one_program_per_row(divergence, inplace, monkeypatch):
    """Split and one-program-per-row launches of the same rows agree to rounding (the sums
    are added in another order), per row, with ignored rows and an out-of-range label."""
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SPLIT_BLOCK)
    s, t, labels = make_inputs(Case(lead=(9,), alpha=0.6, ignore_frac=0.3), DEVICE)
    s = s.detach()
    labels[4] = 1001
    gs = torch.full((), 0.5, device=DEVICE)
    tail = kernel_settings(1001, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.6)
    op = torch.ops.fastkd.triton_kd_forward_inplace if inplace else torch.ops.fastkd.triton_kd_forward
    out = {}
    for splits in (None, 4):
        monkeypatch.setattr(triton_kd.launch, "SPLIT_OVERRIDE", splits)
        x = s.clone()
        result = op(x, t, labels, gs, None, *tail)
        out[splits] = (result, x) if inplace else result
    (loss_a, grad_a), (loss_b, grad_b) = out[None], out[4]
    assert torch.isnan(loss_b[4]) and torch.isnan(grad_b[4]).all()
    torch.testing.assert_close(loss_b, loss_a, rtol=2e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-8, equal_nan=True)


def test_split_out_of_range_label_gives_nan_row(split_launches):
    """As the one-program kernel: labels outside [0, V) give a NaN loss and gradient row,
    ignored rows zeros, in every split's columns."""
    s, t, _ = make_inputs(Case(lead=(4,)), DEVICE)
    labels = torch.tensor([3, 1001, -100, -5], dtype=torch.int64, device=DEVICE)
    loss, grad = torch.ops.fastkd.triton_kd_forward(s.detach(), t, labels, torch.ones((), device=DEVICE), None,
                                                    *kernel_settings(1001, temperature=2.0, alpha=0.6))
    assert split_launches
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0 and torch.isnan(loss[3])
    assert torch.isfinite(grad[0]).all() and torch.isnan(grad[1]).all() and (grad[2] == 0).all()
    assert torch.isnan(grad[3]).all()


def test_split_does_not_sync(split_launches, no_host_sync):
    s, t, labels = make_inputs(Case(lead=(4,), alpha=0.6), DEVICE)
    gs = torch.ones((), device=DEVICE)
    torch.ops.fastkd.triton_kd_forward(s.detach(), t, labels, gs, None,
                                       *kernel_settings(1001, divergence="jsd", temperature=2.0, alpha=0.6))
    assert split_launches


# ---------------------------------------------------------------------------------------
# scale_grad_

@interpreter_only
@pytest.mark.parametrize("grad_output", ["scalar", "per_row", "expanded"])
def test_scale_grad_skips_when_one(grad_output, store_counter, no_host_sync):
    grad = torch.randn(5, 300).to(torch.bfloat16)
    before = grad.clone()
    go = {"scalar": torch.ones(()), "per_row": torch.ones(5), "expanded": torch.ones(()).expand(5)}[grad_output]
    torch.ops.fastkd.triton_scale_grad_(grad, go)
    assert store_counter.count == 0, "grad_output == 1 must not touch the gradient"
    assert torch.equal(grad, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scale_grad_scales(dtype):
    # fp32 products are exact; 16-bit ones within one rounding (the interpreter truncates
    # fp32 -> bf16 where the GPU rounds to nearest).
    rtol = 0.0 if dtype == torch.float32 else 1e-2
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(6, 5000, generator=g).to(dtype=dtype, device=DEVICE)
    untouched = buf[:, 4500:].clone()
    grad = buf[:, :4500]  # row stride 5000: the in-place gradient lives in the logits buffer
    expected = grad.float() * 3.0
    torch.ops.fastkd.triton_scale_grad_(grad, torch.tensor(3.0, device=DEVICE))
    torch.testing.assert_close(grad.float(), expected, rtol=rtol, atol=0)
    assert torch.equal(buf[:, 4500:], untouched)

    per_row = torch.tensor([1.0, 2.0, 0.5, 1.0, -1.0, 0.0], device=DEVICE)
    before = grad.float().clone()
    torch.ops.fastkd.triton_scale_grad_(grad, per_row)
    torch.testing.assert_close(grad.float(), before * per_row[:, None], rtol=rtol, atol=0)
    assert torch.equal(grad[0].float(), before[0]) and torch.equal(grad[3].float(), before[3])


@pytest.mark.parametrize("factor", [65536.0, 65536.0 * 0.37])
@pytest.mark.parametrize("per_row", [False, True])
def test_scale_grad_fp16_factor_above_fp16_max(factor, per_row):
    """A float32 factor beyond fp16's range (65536 x scale, as a loss-scaled backward passes)
    multiplies an fp16 gradient in fp32 and rounds once: never the factor cast to fp16 (inf)."""
    g = torch.Generator().manual_seed(2)
    grad = (torch.randn(4, 3000, generator=g) * 1e-3).half()
    grad[0, :8] = torch.tensor([6e-8, -6e-8, 1e-6, 3e-5, 0.5, -0.9, 1.0, -2.0])  # subnormals .. overflow
    grad = grad.to(DEVICE)
    factors = torch.full((4,) if per_row else (), factor, dtype=torch.float32)
    if per_row:
        factors[2] = 1.0  # untouched row
    expected = (grad.float().cpu() * (factors[:, None] if per_row else factors)).half()
    torch.ops.fastkd.triton_scale_grad_(grad, factors.to(DEVICE))
    assert torch.equal(grad.cpu(), expected)
    assert torch.isfinite(grad[1:]).all()


@pytest.mark.parametrize("factor", ["meta", "rows"])
def test_scale_grad_checks_factor(factor):
    """grad_output on another device than the gradient (here 'meta') or with neither 1 nor N
    elements is an error that names it, before any kernel reads it. The launcher is called
    directly: through the operator, a meta argument dispatches to the fake implementation
    (on a GPU, a factor on cuda:1 or the CPU reaches the launcher and its check)."""
    grad = torch.randn(4, 300, device=DEVICE)
    bad = torch.tensor(2.0, device="meta") if factor == "meta" else torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="grad_output must"):
        triton_kd.scale_grad.scale_grad_(grad, bad)


def test_backward_with_grad_output(small_block):
    """loss * 3 and reduction='none' with a weighted sum: backward goes through scale_grad_."""
    s, t, labels = make_inputs(Case(alpha=0.6), DEVICE)
    loss = fastkd.kd_loss(s, t, labels, backend="triton", temperature=2.0, alpha=0.6, reduction="none")
    w = torch.linspace(0.5, 2.0, loss.numel(), device=DEVICE)
    (grad,) = torch.autograd.grad((loss * w).sum(), s)
    ref = fastkd.kd_loss(s, t, labels, backend="torch", temperature=2.0, alpha=0.6, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Row statistics (the vocab-parallel building block)

@pytest.mark.parametrize("with_ce", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=["fp32", "bf16-fp16"])
def test_row_stats(with_ce, temperature, dtypes):
    case = Case(lead=(9,), vocab=1001, teacher_pad=6, student_dtype=dtypes[0], teacher_dtype=dtypes[1])
    s, t, _ = make_inputs(case, DEVICE)
    s = s.detach()
    packed = kernel_settings(995, temperature=temperature, alpha=0.6 if with_ce else 1.0)
    out = triton_kd.row_stats(s, t, *packed)
    assert out.shape == (9, 5) and out.dtype == torch.float32
    ref = reference_row_stats(s[:, :995].cpu(), t[:, :995].cpu(), temperature, with_ce)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-6, atol=0)
    cpu = kernel_backend("cpu")
    if cpu is not None:
        theirs = torch.ops.fastkd.row_stats(s.cpu(), t.cpu(), *packed)
        torch.testing.assert_close(out.cpu(), theirs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("path", ["single", "multi"])
def test_external_row_stats_match_computed(divergence, path, monkeypatch):
    """Forward with row_stats from the row_stats op equals forward computing them: the
    exponentials are anchored the same way, so the multi-block path (same sweep, same
    block) is bitwise equal, the single-block path equal to rounding."""
    if path == "multi":
        monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SMALL_BLOCK)
    s, t, labels = make_inputs(Case(lead=(12,), alpha=0.6, ignore_frac=0.2), DEVICE)
    s = s.detach()
    args = (labels, torch.full((), 0.1, device=DEVICE))
    tail = kernel_settings(1001, divergence=divergence, temperature=2.0, beta=0.3, alpha=0.6)
    stats = triton_kd.row_stats(s, t, *tail)
    loss_a, grad_a = torch.ops.fastkd.triton_kd_forward(s, t, *args, None, *tail)
    loss_b, grad_b = torch.ops.fastkd.triton_kd_forward(s, t, *args, stats, *tail)
    if path == "multi":
        assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    else:
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Operator registration, host syncs

def _op_samples():
    s, t, labels = make_inputs(Case(lead=(4,), vocab=70, ignore_frac=0.25), DEVICE)
    s = s.detach()
    gs = torch.full((), 0.25, device=DEVICE)
    return s, t, labels, gs


def test_opcheck_operators():
    """Schemas, fake (meta) implementations and mutation declarations agree with the kernels."""
    s, t, labels, gs = _op_samples()
    tail = kernel_settings(70, divergence="jsd", temperature=2.0, beta=0.4, alpha=0.5)
    torch.library.opcheck(torch.ops.fastkd.triton_kd_forward, (s, t, labels, gs, None, *tail))
    torch.library.opcheck(torch.ops.fastkd.triton_kd_forward_inplace, (s.clone(), t, labels, gs, None, *tail))
    torch.library.opcheck(torch.ops.fastkd.triton_scale_grad_, (s.clone(), torch.tensor(2.0, device=DEVICE)))
    torch.library.opcheck(torch.ops.fastkd.triton_row_stats, (s, t, *tail))


def test_forward_and_backward_do_not_sync(no_host_sync):
    """Neither the launcher nor the ops read a device value on the host."""
    s, t, labels, gs = _op_samples()
    loss, grad = torch.ops.fastkd.triton_kd_forward(s, t, labels, gs, None,
                                                    *kernel_settings(70, divergence="tvd", temperature=2.0))
    torch.ops.fastkd.triton_kd_forward_inplace(s.clone(), t, labels, gs, None,
                                               *kernel_settings(70, divergence="reverse_kl", temperature=2.0))
    torch.ops.fastkd.triton_scale_grad_(grad, gs)


def test_torch_compile_fullgraph():
    """kd_loss traces into one graph through the autograd Function and the custom ops."""
    s, t, labels = make_inputs(Case(lead=(8,), vocab=300, alpha=0.6), DEVICE)

    def loss_fn(s, t, labels):
        return fastkd.kd_loss(s, t, labels, divergence="jsd", temperature=2.0, alpha=0.6, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(s, t, labels)
    (grad,) = torch.autograd.grad(loss, s)
    ref = loss_fn(s, t, labels)
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_backend_registered_and_supports():
    backend = kernel_backend("triton")
    assert backend.name == "triton" and backend.scale_grad_ is torch.ops.fastkd.triton_scale_grad_
    assert backend.supports(torch.device("cuda"))
    assert backend.supports(torch.device("cpu")) == INTERPRETED


# ---------------------------------------------------------------------------------------
# Device guard: every launch runs on the tensors' device, not the current one

@pytest.fixture
def launch_log(monkeypatch):
    """[(kernel name, device of the innermost active launch guard or None)] per launch:
    ``launch.device_guard`` wrapped to record the device it is entered with, and the
    interpreter's launch entry (every ``kernel[grid](...)``) wrapped to log it."""
    from triton.runtime.interpreter import InterpretedFunction

    active, log = [], []
    guard = triton_kd.launch.device_guard

    @contextlib.contextmanager
    def recording_guard(device):
        with guard(device):
            active.append(device)
            try:
                yield
            finally:
                active.pop()

    run = InterpretedFunction.run

    def logged_run(self, *args, **kwargs):
        log.append((self.__name__, active[-1] if active else None))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(triton_kd.launch, "device_guard", recording_guard)
    monkeypatch.setattr(InterpretedFunction, "run", logged_run)
    return log


@interpreter_only
@pytest.mark.parametrize("path", ["single", "multi", "split"])
def test_every_launch_runs_under_the_tensors_device_guard(path, launch_log, monkeypatch):
    """forward, forward_inplace, row_stats and scale_grad_ each launch inside a guard for
    their tensors' device (on CUDA: torch.cuda.device(tensor.device); here the CPU's); the
    split path's three kernels too (forward_inplace without row_stats splits)."""
    if path != "single":
        monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", SMALL_BLOCK)
    if path == "split":
        monkeypatch.setattr(triton_kd.launch, "SPLIT_OVERRIDE", 2)
    s, t, labels, gs = _op_samples() if path == "single" else (*make_inputs(Case(lead=(4,)), DEVICE)[:3],
                                                               torch.ones((), device=DEVICE))
    s = s.detach()
    tail = kernel_settings(s.shape[1], divergence="jsd", temperature=2.0, alpha=0.6)
    stats = triton_kd.row_stats(s, t, *tail)
    _, grad = torch.ops.fastkd.triton_kd_forward(s, t, labels, gs, stats, *tail)
    torch.ops.fastkd.triton_kd_forward_inplace(s.clone(), t, labels, gs, None, *tail)
    torch.ops.fastkd.triton_scale_grad_(grad, torch.tensor(2.0, device=DEVICE))
    names = [name for name, _ in launch_log]
    assert {"row_stats_kernel", "kd_forward_kernel", "scale_grad_kernel"} <= set(names), names
    if path == "split":
        assert {"split_row_stats_kernel", "split_row_sums_kernel", "split_write_grad_kernel"} <= set(names), names
    assert all(device == s.device for _, device in launch_log), launch_log


def test_device_guard_is_the_tensors_cuda_device():
    """On CUDA tensors the guard is torch.cuda.device of their device (checked without
    entering it, which needs a GPU); on CPU tensors it does nothing."""
    guard = triton_kd.launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with triton_kd.launch.device_guard(torch.device("cpu")):
        pass


# ---------------------------------------------------------------------------------------
# On a GPU (skipped without CUDA)

@gpu
@needs_cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_bf16_llama3_vocab(divergence, inplace):
    """bf16 at V = 128256 (multi-block path), every divergence, against float64."""
    n, v = 64, 128256
    s = logits_in_dtype(n, v, torch.bfloat16, 0)
    t = logits_in_dtype(n, v, torch.bfloat16, 1)
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    case = Case(lead=(n,), vocab=v, student_dtype=torch.bfloat16, divergence=divergence, alpha=0.6,
                temperature=2.0, inplace=inplace)
    ref_loss, ref_grad = reference_loss_and_grad(case, s, t, labels)
    loss, grad = run_backend(case, "triton", s.requires_grad_(True), t, labels)
    assert rel_err(loss, ref_loss) < 1e-2
    assert rel_err(grad, ref_grad) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_gpu_more_than_2_31_elements(divergence):
    """16384 x 151936 bf16 (2.49e9 elements per tensor, ~15 GB in all): rows past the 2^31
    element boundary are right (int64 addressing), checked on a few rows against float64."""
    n, v = 16384, 151936
    assert n * v > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs ~20 GiB of free GPU memory")
    s = logits_in_dtype(n, v, torch.bfloat16, 2)
    t = logits_in_dtype(n, v, torch.bfloat16, 3)
    labels = torch.randint(0, v, (n,), device="cuda")
    gs = torch.ones((), device="cuda")
    loss, grad = torch.ops.fastkd.triton_kd_forward(s, t, labels, gs, None,
                                                    *kernel_settings(v, divergence=divergence, temperature=2.0, alpha=0.6))
    first_past = -(-2**31 // v)  # first row starting past element 2^31 (14135); the one before straddles it
    assert (first_past - 1) * v < 2**31 < first_past * v
    rows = torch.tensor([0, first_past - 1, first_past, n - 1], device="cuda")
    case = Case(lead=(len(rows),), vocab=v, student_dtype=torch.bfloat16, divergence=divergence, alpha=0.6,
                temperature=2.0, reduction="sum")
    ref_loss_rows, ref_grad = reference_loss_and_grad(case.replace(reduction="none"), s[rows], t[rows], labels[rows])
    assert rel_err(loss[rows].double().cpu(), ref_loss_rows) < 1e-2
    assert rel_err(grad[rows].double().cpu(), ref_grad) < 2e-2
    assert math.isfinite(loss.sum().item())
