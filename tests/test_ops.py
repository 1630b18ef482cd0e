"""The registered operators: schema/fake checks, external row statistics, torch.compile."""
import math

import pytest
import torch

import fastkd
import fastkd.backends.cpp
import fastkd.config
from harness.backends import kernel_backend
from harness.cases import Case
from harness.inputs import make_inputs

pytestmark = pytest.mark.skipif(kernel_backend("cpu") is None, reason="fastkd._C not available")

ops = torch.ops.fastkd


def op_args(n=6, v=257, labels=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype)
    lab = torch.randint(0, v, (n,), generator=g) if labels else None
    if labels:
        lab[1] = -100
    scale = torch.tensor(0.25)
    return s, t, lab, scale


def settings(vocab_size=257, **kw):
    """The packed kernel settings (ints, floats) of a loss config."""
    return fastkd.make_config(**kw).with_vocab_size(vocab_size).kernel_settings()


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_opcheck_forward(divergence):
    s, t, lab, scale = op_args()
    packed = settings(divergence=divergence, temperature=2.0, beta=0.3, alpha=0.6)
    args = (s, t, lab, scale, None, *packed)
    torch.library.opcheck(ops.kd_forward.default, args)
    torch.library.opcheck(ops.kd_forward_inplace.default, (s.clone(),) + args[1:])
    torch.library.opcheck(ops.row_stats.default, (s, t, *packed))


def test_opcheck_scale_grad():
    g = torch.randn(4, 9)
    torch.library.opcheck(ops.scale_grad_.default, (g.clone(), torch.tensor(0.5)))
    torch.library.opcheck(ops.scale_grad_.default, (g.clone(), torch.rand(4)))


def test_scale_grad_skips_one_and_scales_otherwise():
    g = torch.randn(4, 9)
    x = g.clone()
    ops.scale_grad_(x, torch.tensor(1.0))
    assert torch.equal(x, g)
    ops.scale_grad_(x, torch.tensor(0.5))
    assert torch.equal(x, g * 0.5)
    w = torch.tensor([1.0, 2.0, 0.0, -1.0])
    ops.scale_grad_(x, w)
    assert torch.equal(x, g * 0.5 * w[:, None])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_external_row_stats_give_the_same_result(divergence, temperature):
    """The statistics can come from outside (the vocab-parallel variant all-reduces them)."""
    s, t, lab, scale = op_args(dtype=torch.bfloat16)
    packed = settings(divergence=divergence, temperature=temperature, beta=0.3, alpha=0.6)
    stats = ops.row_stats(s, t, *packed)
    assert stats.shape == (6, 5) and stats.dtype == torch.float32
    ref = s.float() / temperature
    torch.testing.assert_close(stats[:, 0], ref.max(-1).values)
    torch.testing.assert_close(stats[:, 1], (ref - stats[:, :1]).exp().sum(-1), rtol=1e-5, atol=0)
    raw = s.float() - temperature * stats[:, :1]
    torch.testing.assert_close(stats[:, 4], raw.exp().sum(-1), rtol=1e-5, atol=0)
    loss_a, grad_a = ops.kd_forward(s, t, lab, scale, None, *packed)
    loss_b, grad_b = ops.kd_forward(s, t, lab, scale, stats, *packed)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_a.float(), grad_b.float(), rtol=1e-2, atol=1e-6)

    # Shard the vocabulary in two and combine the shard statistics, as a vocab-parallel
    # caller would: max over shards, then rescale and add the sums.
    halves = [ops.row_stats(s[:, sl].contiguous(), t[:, sl].contiguous(),
                            *settings(n, temperature=temperature, alpha=0.6))
              for sl, n in ((slice(0, 100), 100), (slice(100, 257), 157))]
    combined = torch.empty_like(stats)
    for col_max, col_sum, factor in ((0, 1, 1.0), (2, 3, 1.0), (0, 4, temperature)):
        m = torch.maximum(halves[0][:, col_max], halves[1][:, col_max])
        combined[:, col_max] = m
        combined[:, col_sum] = sum(h[:, col_sum] * torch.exp(factor * (h[:, col_max] - m)) for h in halves)
    torch.testing.assert_close(combined, stats, rtol=1e-5, atol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_external_row_stats_below_the_row_maximum(divergence):
    """Statistics from outside whose maxima lie below the row's own (the same normalisers:
    max - 30 with the sum-exp times e^30) give the same loss and gradient: the kernel takes
    such a chunk against its own maximum, so that its exponentials cannot overflow."""
    s, t, lab, scale = op_args(dtype=torch.float32)
    s, t = s * 8, t * 8  # rows whose maxima sit well above 0
    packed = settings(divergence=divergence, temperature=1.0, beta=0.3, alpha=0.6)
    stats = ops.row_stats(s, t, *packed)
    shifted = stats.clone()
    shift = 30.0
    for col_max, col_sum in ((0, 1), (2, 3), (0, 4)):
        shifted[:, col_sum] = stats[:, col_sum] * math.exp(shift)
    shifted[:, 0] -= shift
    shifted[:, 2] -= shift
    loss_a, grad_a = ops.kd_forward(s, t, lab, scale, stats, *packed)
    loss_b, grad_b = ops.kd_forward(s, t, lab, scale, shifted, *packed)
    assert torch.isfinite(loss_b).all() and torch.isfinite(grad_b).all()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-7)


def test_compile_fullgraph_matches_eager():
    case = Case(alpha=0.6, lead=(3, 5), vocab=301)
    s, t, labels = make_inputs(case)

    def step(student, teacher, lab):
        return fastkd.kd_loss(student, teacher, lab, divergence="jsd", beta=0.3, temperature=2.0,
                              alpha=0.6, backend="cpu")

    eager = step(s, t, labels)
    (g_eager,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(s, t, labels)
    (g_comp,) = torch.autograd.grad(out, s)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_out_of_range_label_marks_the_row_nan():
    """Where the Python range check is skipped (GPU, compile), the kernel flags the row."""
    s, t, lab, scale = op_args()
    lab[2] = 257
    loss, grad = ops.kd_forward(s, t, lab, scale, None, *settings(alpha=0.6))
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    keep = torch.arange(6) != 2
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(grad[keep]).all()


def test_settings_cross_the_boundary_in_one_order():
    """csrc/kd_params.h unpacks the settings in the order fastkd/config.py packs them."""
    ext = fastkd.backends.cpp.load_extension()
    assert tuple(ext.int_settings) == fastkd.config.INT_SETTINGS
    assert tuple(ext.float_settings) == fastkd.config.FLOAT_SETTINGS
    cfg = fastkd.make_config(divergence="tvd", temperature=4.0, alpha=0.25, t_squared=False, ignore_index=7)
    ints, floats = cfg.with_vocab_size(33).kernel_settings()
    unpacked = fastkd.config.KernelSettings(ints, floats)
    assert (unpacked.divergence, unpacked.ignore_index, unpacked.vocab_size) == ("tvd", 7, 33)
    assert (unpacked.inv_temperature, unpacked.div_weight, unpacked.ce_weight) == (0.25, 0.25, 0.75)


def _corrupt(int_changes=None, float_changes=None, drop=None):
    """Valid packed settings (forward KL, V = 257) with some entries replaced or one list cut short."""
    ints, floats = settings()
    for name, value in (int_changes or {}).items():
        ints[fastkd.config.INT_SETTINGS.index(name)] = value
    for name, value in (float_changes or {}).items():
        floats[fastkd.config.FLOAT_SETTINGS.index(name)] = value
    if drop == "int":
        ints = ints[:-1]
    elif drop == "float":
        floats = floats[:-1]
    return ints, floats


N_INT, N_FLOAT = len(fastkd.config.INT_SETTINGS), len(fastkd.config.FLOAT_SETTINGS)


@pytest.mark.parametrize("packed, match", [
    (_corrupt({"divergence_id": 9}), "unknown divergence id"),
    (_corrupt(float_changes={"inv_temperature": 0.0}), "inv_temperature must be finite and > 0"),
    (_corrupt(float_changes={"inv_temperature": float("inf")}), "inv_temperature must be finite and > 0"),
    (_corrupt({"divergence_id": 2}, {"beta": 1.5}), r"beta must be in \[0, 1\]"),
    (_corrupt(drop="int"), f"expected {N_INT} int and {N_FLOAT} float settings, got {N_INT - 1} and {N_FLOAT}"),
    (_corrupt(drop="float"), f"expected {N_INT} int and {N_FLOAT} float settings, got {N_INT} and {N_FLOAT - 1}"),
    (_corrupt({"vocab_size": 258}), "vocab_size 258 must be in"),
])
def test_bad_packed_settings_are_refused(packed, match):
    ints, floats = packed
    s, t, lab, scale = op_args()
    with pytest.raises(RuntimeError, match=match):
        ops.kd_forward(s, t, None, scale, None, ints, floats)
    with pytest.raises(RuntimeError, match=match):
        ops.row_stats(s, t, ints, floats)


def test_scale_grad_checks_the_factors_device():
    """The shared entry check (csrc/ops.cpp) refuses a factor on another device than the
    gradient's, except a one-element CPU tensor; a meta factor stands in for another
    device here, and the CPU kernel is called directly (a meta argument would otherwise
    send the call to the fake)."""
    on_cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    grad = torch.ones(3, 4)
    for factor in (torch.ones(3, device="meta"), torch.ones((), device="meta")):
        with pytest.raises(RuntimeError, match="gradient's device"):
            ops.scale_grad_.default.redispatch(on_cpu, grad, factor)
    ops.scale_grad_(grad, torch.full((3,), 2.0))
    assert torch.equal(grad, torch.full((3, 4), 2.0))


def test_cuda_grad_row_stride_matches_the_kernels_layout():
    """The fake's gradient strides (fastkd.backends.cpp.grad_row_stride) follow the rule of
    csrc/cuda/kd_cuda.h's grad_alloc, which tests/test_cuda_plan.py checks in C++."""
    stride = fastkd.backends.cpp.grad_row_stride
    s = torch.empty((4, 50304), device="meta", dtype=torch.bfloat16)
    assert stride(s[:, :50257]) == 50257  # meta, not CUDA: contiguous
    cuda_like = type("T", (), dict(shape=(4, 50257), device=torch.device("cuda"), element_size=lambda self: 2,
                                   stride=lambda self, d: 50304))()
    assert stride(cuda_like) == 50264 and (50264 - 50304) % 8 == 0
    contiguous = type("T", (), dict(shape=(4, 50257), device=torch.device("cuda"), element_size=lambda self: 4,
                                    stride=lambda self, d: 50257))()
    assert stride(contiguous) == 50257


def test_float_settings_must_be_a_float64_host_tensor():
    """The float settings cross as a float64 CPU tensor (a tensor stays symbolic under
    torch.compile); another dtype or layout is refused by name, not read as garbage."""
    ints, floats = settings()
    s, t, _, scale = op_args()
    for bad in (floats.float(), floats[:10].reshape(2, 5), floats.repeat(2)[::2]):
        with pytest.raises(RuntimeError, match="float settings must be a contiguous 1-D float64 CPU tensor"):
            ops.kd_forward(s, t, None, scale, None, ints, bad)
        with pytest.raises(RuntimeError, match="float settings must be a contiguous 1-D float64 CPU tensor"):
            ops.row_stats(s, t, ints, bad)
