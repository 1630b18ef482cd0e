"""The several-teachers CUDA kernel's formulas (csrc/cuda/kd_multi.cu), emulated in fp32 on
the CPU (tests/harness/multi_emulation.py), against the float64 reference.

No GPU has run kd_multi.cu: these tests check its arithmetic as written out step for step
in the emulation (the mixture's log-sum-exp over the active slots, the sum mode's per-entry
combination, the centring, the value sums, the logit options, NaN and -inf handling),
not the CUDA code. tests/test_cuda_multi_teacher.py runs the kernel itself on a GPU.
"""
import pytest
import torch

import fastkd
from fastkd import reference
from fastkd._checks import Teachers, check_multi_kd_args

from harness.multi_emulation import emulate_multi_forward

IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = ("mixture", "sum")
WEIGHTS = ("uniform", "per-token", "routed", "partial")


def _case(k, weights, seed, n=9, v=97, widths=None):
    """Student, K teachers (float64 values), labels with an ignored token, weights [K, N] of a kind:
    uniform 1/K; per token (summing to 1); routed (one-hot, the unused rows NaN); partial (one
    teacher off per token, its rows NaN: 1 < active < K)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ts = [torch.randn(n, (widths or {}).get(j, v), generator=g, dtype=torch.float64) * 3 for j in range(k)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = IGNORE
    if weights == "uniform":
        w = torch.full((k, n), 1.0 / k, dtype=torch.float64)
    elif weights == "per-token":
        w = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
        w = w / w.sum(0)
    else:
        w = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
        off = torch.arange(n) % k
        if weights == "routed":
            w = torch.nn.functional.one_hot(off, k).T.double()
        else:
            w[off, torch.arange(n)] = 0.0
            w = w / w.sum(0).clamp_min(1e-30)
        for j in range(k):  # a teacher's rows where its weight is 0: never read
            ts[j][w[j] == 0] = float("nan")
    return s, ts, labels, w


def _compare(s, ts, labels, w, rtol=2e-5, **settings):
    """Emulated loss rows and gradient (grad_scale 1: the gradient of the rows' sum) against
    the float64 reference's; returns the relative errors."""
    cfg = fastkd.make_config(**settings)
    names = tuple(f"teacher_logits[{j}]" for j in range(len(ts)))
    cfg, weights, _ = check_multi_kd_args(s, Teachers(tuple(ts), w, names), labels, cfg)
    s32 = s.float()
    ts32 = [t.float() for t in ts]
    got, g_got = emulate_multi_forward(s32, ts32, weights.float(), labels, torch.ones(()),
                                       *cfg.multi_kernel_settings())
    x = s32.double().requires_grad_(True)
    want = reference.multi_loss_per_row(x[:, :cfg.vocab_size], [t.double()[:, :cfg.vocab_size] for t in ts32],
                                        weights.float(), labels, cfg)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    want = want.detach()
    assert torch.isfinite(want).all() and torch.isfinite(g_want).all()
    loss_err = ((got.double() - want).norm() / want.norm()).item()
    grad_err = ((g_got.double() - g_want).norm() / g_want.norm()).item()
    assert loss_err <= rtol and grad_err <= rtol, (loss_err, grad_err)
    return got, g_got


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_mode_and_weights(divergence, mode, weights):
    k = 3
    s, ts, labels, w = _case(k, weights, seed=DIVERGENCES.index(divergence) * 7 + WEIGHTS.index(weights))
    _compare(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, beta=0.3)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_to_four_teachers(divergence, k):
    for mode in MODES:
        s, ts, labels, w = _case(k, "per-token", seed=30 + k)
        _compare(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=0.7, alpha=1.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logit_options(divergence):
    s, ts, labels, w = _case(3, "partial", seed=41)
    for mode in MODES:
        _compare(s, ts, labels, w, divergence=divergence, teacher_mode=mode, temperature=1.5, alpha=0.6,
                 logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.2,
                 z_loss=1e-3)
        _compare(s, ts, None, w, divergence=divergence, teacher_mode=mode, temperature=1.0, z_loss=1e-2,
                 softcap=30.0)  # the z-loss without labels; T = 1: the CE softmax is q


def test_sum_mode_with_weights_of_zero_in_a_row_has_no_divergence():
    s, ts, labels, w = _case(2, "per-token", seed=50)
    w[:, 4] = 0.0
    for t in ts:
        t[4] = float("nan")
    for divergence in DIVERGENCES:
        got, g = _compare(s, ts, labels, w, divergence=divergence, teacher_mode="sum", alpha=0.5)
        assert torch.isfinite(got[4]) and torch.isfinite(g[4]).all()


def test_padded_teacher_widths_and_negative_infinity():
    s, ts, labels, w = _case(2, "per-token", seed=60, widths={1: 104})
    ts[0][:, 5] = float("-inf")  # a zero probability of one teacher: the mixture stays finite
    ts[1][:, 7] = float("-inf")
    ts[1][:, 97:] = 1e4  # padding past vocab_size: never read
    for divergence in ("forward_kl", "jsd", "tvd"):  # reverse KL of a -inf teacher entry is infinite in sum mode
        for mode in MODES:
            _compare(s, ts, labels, w, divergence=divergence, teacher_mode=mode, vocab_size=97)


def test_nan_reaches_the_row():
    s, ts, labels, w = _case(2, "per-token", seed=70)
    cfg = fastkd.make_config(teacher_mode="mixture")
    cfg, weights, _ = check_multi_kd_args(s, Teachers(tuple(ts), w, ("a", "b")), labels, cfg)
    weights = weights.float().clone()
    weights[0, 3] = float("nan")  # a NaN weight is active
    t1 = ts[1].float().clone()
    t1[5, 11] = float("nan")  # a NaN in a used teacher
    for mode in MODES:
        cfg = fastkd.make_config(teacher_mode=mode, vocab_size=97)
        loss, grad = emulate_multi_forward(s.float(), [ts[0].float(), t1], weights, labels, torch.ones(()),
                                           *cfg.multi_kernel_settings())
        for row in (3, 5):
            assert torch.isnan(loss[row]) and torch.isnan(grad[row]).any(), (mode, row)
        assert torch.isfinite(loss[[0, 2, 4, 6]]).all()
