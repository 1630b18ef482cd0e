"""sparse_kd_loss with the logit options (logit_scale, softcap, label_smoothing, z_loss) on
every kernel backend that applies them and has sparse kernels, against the float64
reference (fastkd.sparse_reference) on the same (rounded) inputs.

A sparse teacher's log-probabilities take no transform: the options act on the student's
logits s' = cap tanh(scale s / cap) and on the hard-label terms at T = 1 (the label-smoothed
CE term and the z-loss, which sees the whole vocabulary for every tail). Every tail and
divergence, each option alone and all together: float64 input within 1e-12, fp32 within
1e-5 (the design's tolerance), by relative norm of the loss rows and of the gradient.

The backends are those in fastkd._dispatch.LOGIT_OPTIONS_BACKENDS with sparse kernels that
run on CPU tensors here (Triton joins under TRITON_INTERPRET=1 once it is in that set); the
float64 cases run on those that take float64.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fastkd
from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS, get_backend
from fastkd.config import DIVERGENCES, TAILS

from harness.compare import rel_err
from harness.sparse_cases import reference_rows_and_grad, sparse_inputs


def _sparse_option_backends():
    names = []
    for name in sorted(LOGIT_OPTIONS_BACKENDS - {"torch"}):  # "torch" is the reference itself
        backend = get_backend(name)
        if backend is not None and backend.has("sparse") and backend.supports(torch.device("cpu")):
            names.append(name)
    return names


BACKENDS = _sparse_option_backends()
F64_BACKENDS = [name for name in BACKENDS if torch.float64 in get_backend(name).dtypes]
TAIL_DIVERGENCES = [(tail, div) for tail, div in itertools.product(TAILS, DIVERGENCES)
                    if tail != "none" or div == "forward_kl"]
# Each option alone, then all of them. The logits are N(0, 3^2) with some rows peaked (+15),
# so a cap of 2 saturates many entries (tanh' far from 1).
OPTIONS = {
    "softcap": dict(softcap=2.0),
    "logit_scale": dict(logit_scale=0.5),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "all": dict(logit_scale=1.5, softcap=3.0, label_smoothing=0.1, z_loss=1e-3),
}
N, V, K = 9, 1003, 40


def _options_for(backend):
    # Triton runs interpreted here (slow), and tests/test_triton_logit_options.py already
    # checks each option alone on its sparse kernel: all options together suffice here.
    return ["all"] if backend == "triton" else list(OPTIONS)


def _params(backends):
    return [pytest.param(b, tail, div, name, id=f"{b}-{tail}-{div}-{name}")
            for b in backends for (tail, div) in TAIL_DIVERGENCES for name in _options_for(b)] or [
        pytest.param(None, None, None, None, marks=pytest.mark.skip("no sparse kernel applies the options here"))]


def _inputs(dtype, divergence, seed=0):
    # A kept id with no teacher mass (a -inf log-prob) makes reverse KL infinite: left out there.
    return sparse_inputs(N, V, K, dtype=dtype, seed=seed, neg_inf=divergence != "reverse_kl",
                         lp_dtype=torch.float64 if dtype == torch.float64 else None)


def _run(backend, s, ids, lp, labels, **settings):
    """The kernel's loss rows and d(sum of rows * 0.5)/ds through sparse_kd_loss."""
    x = s.detach().clone().requires_grad_(True)
    rows = fastkd.sparse_kd_loss(x, ids, lp, labels, backend=backend, reduction="none", **settings)
    (grad,) = torch.autograd.grad(rows.sum() * 0.5, x)
    return rows.detach(), grad


def _check(backend, dtype, tol, tail, divergence, options, labels=True, **extra):
    s, ids, lp, lab = _inputs(dtype, divergence)
    lab = lab if labels else None
    settings = dict(divergence=divergence, tail=tail, beta=0.3, **options, **extra)
    ref_rows, ref_grad = reference_rows_and_grad(s, ids, lp, lab, V, grad_scale=0.5, **settings)
    rows, grad = _run(backend, s, ids, lp, lab, **settings)
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    assert torch.isfinite(ref_rows).all()
    assert rel_err(rows, ref_rows) < tol, settings
    assert rel_err(grad, ref_grad) < tol, settings


@pytest.mark.parametrize("backend,tail,divergence,option", _params(F64_BACKENDS))
def test_float64_within_1e12(backend, tail, divergence, option):
    for temperature, alpha in ((1.0, 0.6), (2.0, 0.6), (2.0, 1.0)):
        _check(backend, torch.float64, 1e-12, tail, divergence, OPTIONS[option], temperature=temperature,
               alpha=alpha)


@pytest.mark.parametrize("backend,tail,divergence,option", _params(BACKENDS))
def test_fp32_within_1e5(backend, tail, divergence, option):
    for temperature, alpha in ((1.0, 0.6), (2.0, 0.6)):
        _check(backend, torch.float32, 1e-5, tail, divergence, OPTIONS[option], temperature=temperature,
               alpha=alpha)


@pytest.mark.parametrize("tail,divergence", TAIL_DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS or [pytest.param(None, marks=pytest.mark.skip("none here"))])
def test_z_loss_without_labels(backend, tail, divergence):
    """No labels, no CE term: the z-loss on every row, with a softcap (renorm then needs the
    full-vocabulary sweep it otherwise skips)."""
    dtype = torch.float64 if backend in F64_BACKENDS else torch.float32
    _check(backend, dtype, 1e-12 if dtype == torch.float64 else 1e-5, tail, divergence,
           dict(z_loss=1e-2, softcap=2.0), labels=False, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS or [pytest.param(None, marks=pytest.mark.skip("none here"))])
def test_inplace_backward_with_options(backend):
    s, ids, lp, labels = _inputs(torch.float32, "forward_kl")
    settings = dict(temperature=2.0, alpha=0.6, **OPTIONS["all"])
    want = fastkd.sparse_kd_loss(s.clone().requires_grad_(True), ids, lp, labels, backend=backend, **settings)
    x = s.clone().requires_grad_(True)
    y = x * 1.0  # a non-leaf the kernel may overwrite
    got = fastkd.sparse_kd_loss(y, ids, lp, labels, backend=backend, inplace_backward=True, **settings)
    got.backward()
    _, ref_grad = reference_rows_and_grad(s, ids, lp, labels, V, grad_scale=1.0 / (labels != -100).sum().item(),
                                          **settings)
    assert rel_err(got.detach(), want.detach()) < 1e-6
    assert rel_err(x.grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS or [pytest.param(None, marks=pytest.mark.skip("none here"))])
def test_masked_logits_under_a_cap(backend):
    """A -inf student logit under a softcap is -cap: finite loss, and exactly zero gradient
    there (tanh' = 0), as in the reference; without a cap and with label smoothing the loss
    is +inf (PyTorch's cross_entropy), NaN nowhere."""
    s, ids, lp, labels = _inputs(torch.float32, "forward_kl")
    labels[:] = 5
    s[:, 900:] = float("-inf")  # a masked end of the vocabulary, where the support has no id
    keep = ids < 900
    ids, lp = torch.where(keep, ids, -1), torch.where(keep, lp, 0.0)
    settings = dict(tail="bucket", temperature=2.0, alpha=0.6, softcap=3.0, label_smoothing=0.1, z_loss=1e-3)
    rows, grad = _run(backend, s, ids, lp, labels, **settings)
    ref_rows, ref_grad = reference_rows_and_grad(s, ids, lp, labels, V, grad_scale=0.5, **settings)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[:, 900:]) == 0
    assert rel_err(rows, ref_rows) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    uncapped = dict(settings, softcap=None)
    rows, grad = _run(backend, s, ids, lp, labels, **uncapped)
    ref_rows, ref_grad = reference_rows_and_grad(s, ids, lp, labels, V, grad_scale=0.5, **uncapped)
    assert torch.isinf(rows).all() and torch.isinf(ref_rows).all() and not torch.isnan(grad).any()
    assert rel_err(grad, ref_grad) < 1e-5
