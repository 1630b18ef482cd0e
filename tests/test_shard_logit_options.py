"""The vocab-parallel loss's shard phases (shard_row_stats, shard_row_sums, shard_write_grad)
with the logit options, for each backend that applies them, against the torch backend's
phases (fastkd/backends/reference_shard.py) on the same slice: given the same global row
statistics and row sums, the same outputs (fp32 within 1e-5, float64 within 1e-12).

What the options change in the phases (csrc/kd_params.h, the kernel contract): both sides'
logits are transformed before everything; shard_row_stats adds the sum of s' (column 6,
label smoothing's value term) and the T = 1 sum-exp when only the z-loss asks for it;
shard_write_grad adds c_raw softmax(s') - ce_weight eps/V everywhere, the (1 - eps) one-hot
where the label lies in the slice, and the chain factor of the student's transform.
tests/test_distributed_logit_options.py runs the whole loss on gloo ranks.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastkd
from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS
from fastkd.backends import reference_shard

from harness.backends import kernel_backend, supports
from harness.compare import rel_err

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
PHASE_BACKENDS = [pytest.param("cpu", "cpu", id="cpu"),
                  pytest.param("triton", "cpu", id="triton-interpreted"),
                  pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu)]
ALL = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.1,
           z_loss=1e-3)
OPTIONS = {
    "softcap": dict(softcap=2.0),
    "teacher_uncapped": dict(softcap=2.0, teacher_softcap=None),
    "scales": dict(logit_scale=0.5, teacher_logit_scale=2.0),
    "smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-2),
    "all": ALL,
}
START, WIDTH, COUNTED, V = 30, 45, 40, 70  # the slice: columns [30, 75), of which 40 count (vocab_size 70)


def phases_for(backend, device):
    if not supports(backend, device):
        pytest.skip(f"{backend} does not run on {device} here")
    if backend not in LOGIT_OPTIONS_BACKENDS:
        pytest.skip(f"{backend} does not apply the logit options yet (its operators refuse them)")
    return kernel_backend(backend).shard


def shard_inputs(divergence, options, alpha=0.6, n=7):
    """The float64 slice (student, teacher), global labels, the global row statistics and
    row sums (from the torch phases on the whole counted vocabulary) and the slice's config."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(n, START + WIDTH, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, START + WIDTH, generator=g, dtype=torch.float64) * 3
    t[1, 35] += 40.0  # a very peaked teacher row, its peak in the slice
    s[2, 50] += 40.0  # a very peaked student row
    s[3, 40] = t[3, 40] = float("-inf")  # a masked entry on both sides
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    labels[1], labels[2] = 31, 69  # labels inside the slice too (the others: elsewhere or ignored)
    cfg = fastkd.make_config(divergence=divergence, alpha=alpha, temperature=0.8, beta=0.3, **options)
    whole = cfg.with_vocab_size(V)
    stats = reference_shard.row_stats(s[:, :V], t[:, :V], whole)[:, :5].contiguous()
    sums = None if divergence == "forward_kl" else reference_shard.row_sums(s[:, :V], t[:, :V], stats, whole)
    local = cfg.with_vocab_size(COUNTED, classes=V)
    return (s[:, START:].contiguous(), t[:, START:].contiguous(), labels if alpha != 1.0 else None, stats, sums,
            local)


def check_phases(phases, divergence, options, dtype, device, tol, alpha=0.6):
    s, t, labels, stats, sums, cfg = shard_inputs(divergence, options, alpha)
    gs, gt = s.to(device, dtype), t.to(device, dtype)
    s, t = gs.double().cpu(), gt.double().cpu()  # the reference on the very values the kernel reads
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gstats = stats.to(device, acc)
    gsums = None if sums is None else sums.to(device, acc)
    glabels = None if labels is None else labels.to(device)
    got = phases.row_stats(gs, gt, cfg)
    want = reference_shard.row_stats(s, t, cfg)
    assert got.shape == want.shape and got.dtype == acc
    assert rel_err(got.cpu().double(), want) < tol, (got, want)
    if sums is not None:
        got = phases.row_sums(gs, gt, gstats, cfg)
        assert rel_err(got.cpu().double(), reference_shard.row_sums(s, t, stats, cfg)) < tol
    scale = torch.full((), 0.25, dtype=torch.float64)
    got = phases.write_grad(gs, gt, glabels, scale.to(device, acc), gstats, gsums, START, cfg)
    want = reference_shard.write_grad(s, t, labels, scale, stats, sums, START, cfg)
    assert got.shape == gs.shape and got.dtype == dtype
    assert rel_err(got.cpu().double(), want) < tol
    assert torch.count_nonzero(got[:, COUNTED:]) == 0  # past vocab_size


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend,device", PHASE_BACKENDS)
def test_fp32_phases_match_the_torch_backend(backend, device, divergence, option):
    check_phases(phases_for(backend, device), divergence, OPTIONS[option], torch.float32, device, 1e-5)


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cpu_phases_are_exact_in_float64(divergence, option):
    check_phases(phases_for("cpu", "cpu"), divergence, OPTIONS[option], torch.float64, "cpu", 1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend,device", PHASE_BACKENDS)
def test_z_loss_without_labels(backend, device, divergence):
    """No labels (alpha 1): the z-loss alone asks for the T = 1 sum-exp (column 4) and adds
    2 lambda lse' softmax(s') to every row's gradient."""
    phases = phases_for(backend, device)
    check_phases(phases, divergence, dict(z_loss=1e-2, softcap=2.0), torch.float32, device, 1e-5, alpha=1.0)
    s, t, _, _, _, cfg = shard_inputs(divergence, dict(z_loss=1e-2), alpha=1.0)
    stats = phases.row_stats(s.to(device, torch.float32), t.to(device, torch.float32), cfg).cpu()
    assert (stats[:, 4] > 0).all()  # computed, though there is no CE term
    assert (stats[:, 6] == 0).all()  # no label smoothing: no sum of s'


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-7), (torch.float64, 1e-15)])
@pytest.mark.parametrize("backend,device", PHASE_BACKENDS)
def test_softcap_values_elementwise(backend, device, dtype, tol):
    """The kernel's transformed logit, entry by entry: shard_row_stats' column 6 (the sum of
    s') of one-column rows is s' = cap tanh(scale s / cap) itself. Relative error (the fused
    tanh is ~1e-7 relative in fp32), +-inf to +-cap exactly, NaN to NaN."""
    phases = phases_for(backend, device)
    if dtype not in kernel_backend(backend).dtypes:
        pytest.skip(f"{backend} does not take {dtype}")
    # One row per value, a program each: the Triton interpreter takes a coarser grid (its
    # tanh is checked on a fine one by test_triton_logit_options.py's elementwise test).
    fine = not (backend == "triton" and device == "cpu")
    x = torch.cat([torch.linspace(-60.0, 60.0, 20001 if fine else 1201, dtype=torch.float64),
                   torch.logspace(-30, 1, 301 if fine else 32, dtype=torch.float64),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)])
    s = x.to(dtype)[:, None]
    cfg = fastkd.make_config(softcap=3.0, logit_scale=1.5, label_smoothing=0.1, alpha=0.5).with_vocab_size(1)
    got = phases.row_stats(s.to(device), s.to(device), cfg)[:, 6].cpu().double()
    want = 3.0 * torch.tanh(1.5 * s.double()[:, 0] / 3.0)
    finite = torch.isfinite(x)
    assert torch.equal(got[~finite].isnan(), want[~finite].isnan())
    assert torch.equal(got[torch.isinf(x)], want[torch.isinf(x)])  # +-cap exactly
    err = ((got[finite] - want[finite]).abs() / want[finite].abs().clamp_min(1e-300))
    assert err.max().item() < tol, x[finite][err.argmax()].item()
    assert torch.equal(got[finite] == 0, want[finite] == 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("option", ["all", "z_loss"])
def test_cpu_row_stats_operator_with_options(option, divergence, temperature):
    """The C++ row_stats operator (statistics a caller may combine across slices) gives the
    transformed logits' statistics, the T = 1 sum-exp for the z-loss alone too, and
    kd_forward with them reproduces the fused pass exactly."""
    kernel_backend("cpu")  # loads the extension
    ops = torch.ops.fastkd
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 257, generator=g) * 3, torch.randn(6, 257, generator=g) * 3
    labels = torch.randint(0, 257, (6,), generator=g)
    labels[1] = -100
    alpha = 1.0 if option == "z_loss" else 0.6  # the z-loss alone: no CE term asks for column 4
    cfg = fastkd.make_config(divergence=divergence, temperature=temperature, alpha=alpha, **OPTIONS[option])
    packed = cfg.with_vocab_size(257).kernel_settings()
    stats = ops.row_stats(s, t, *packed)
    want = reference_shard.row_stats(s.double(), t.double(), cfg.with_vocab_size(257))[:, :5]
    assert rel_err(stats.double(), want) < 1e-5
    scale = torch.tensor(0.25)
    loss_a, grad_a = ops.kd_forward(s, t, labels, scale, None, *packed)
    loss_b, grad_b = ops.kd_forward(s, t, labels, scale, stats, *packed)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
