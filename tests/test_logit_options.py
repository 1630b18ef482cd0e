"""The logit options (logit_scale, softcap, label_smoothing, z_loss) of the float64 reference,
against formulas written out independently of it; the kernels are checked against the
reference on the shared case list (harness.cases.LOGIT_OPTION_CASES, test_correctness.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference
from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS
from fastkd.config import SAME_AS_STUDENT, make_config

from harness.registry import backend_names

IGNORE = -100


def _inputs(n=6, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = IGNORE
    return s, t, labels


def _capped(x, scale, cap):
    return cap * torch.tanh(scale * x / cap) if cap is not None else scale * x


@pytest.mark.parametrize("scale,cap,t_scale,t_cap", [(1.0, 2.0, 1.0, 2.0), (1.5, 3.0, 0.7, None),
                                                     (0.5, None, 2.0, 4.0)])
def test_transforms_equal_the_loss_on_transformed_logits(scale, cap, t_scale, t_cap):
    # The loss with the options equals the plain loss on c tanh(m x / c), and its gradient
    # is that loss's gradient times the chain factor m (1 - tanh^2), written out here.
    s, t, labels = _inputs()
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.6, reduction="sum")
    loss = reference.kd_loss(s, t, labels, logit_scale=scale, softcap=cap, teacher_logit_scale=t_scale,
                             teacher_softcap=t_cap, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    s_prime = _capped(s.detach(), scale, cap).requires_grad_(True)
    plain = reference.kd_loss(s_prime, _capped(t, t_scale, t_cap), labels, **kw)
    (g_prime,) = torch.autograd.grad(plain, s_prime)
    chain = scale * (1 - torch.tanh(scale * s.detach() / cap) ** 2) if cap is not None else scale
    assert torch.allclose(loss, plain, rtol=1e-13, atol=0)
    assert torch.allclose(grad, g_prime * chain, rtol=1e-12, atol=1e-15)


def test_a_large_softcap_is_no_softcap():
    s, t, labels = _inputs()
    base = reference.kd_loss(s, t, labels, alpha=0.5, temperature=2.0)
    capped = reference.kd_loss(s, t, labels, alpha=0.5, temperature=2.0, softcap=1e7)
    assert torch.allclose(capped, base, rtol=1e-10)


def test_the_teacher_takes_the_students_options_by_default():
    s, t, labels = _inputs()
    default = reference.kd_loss(s, t, labels, softcap=2.0, logit_scale=1.5)
    explicit = reference.kd_loss(s, t, labels, softcap=2.0, logit_scale=1.5, teacher_softcap=2.0,
                                 teacher_logit_scale=1.5)
    uncapped = reference.kd_loss(s, t, labels, softcap=2.0, logit_scale=1.5, teacher_softcap=None)
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, uncapped)
    cfg = make_config(softcap=2.0)
    assert cfg.teacher_softcap is SAME_AS_STUDENT and cfg.teacher_cap == 2.0
    assert make_config(softcap=2.0, teacher_softcap=None).teacher_cap is None


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_label_smoothing_is_pytorchs(eps):
    # alpha = 0: the loss is the smoothed CE alone, written as (1 - eps) CE + eps mean_i(-log q_i).
    s, t, labels = _inputs()
    loss = reference.kd_loss(s, t, labels, alpha=0.0, label_smoothing=eps, softcap=4.0, reduction="none")
    s_prime = _capped(s, 1.0, 4.0)
    log_q = s_prime - torch.logsumexp(s_prime, -1, keepdim=True)
    valid = labels != IGNORE
    safe = torch.where(valid, labels, 0)
    want = (1 - eps) * -log_q.gather(1, safe[:, None])[:, 0] + eps * -log_q.mean(-1)
    want = torch.where(valid, want, 0.0)
    assert torch.allclose(loss, want, rtol=1e-13, atol=1e-15)
    (g,) = torch.autograd.grad(loss.sum(), s)
    (g_want,) = torch.autograd.grad(want.sum(), s)
    assert torch.allclose(g, g_want, rtol=1e-12, atol=1e-15)


def test_z_loss_is_added_unscaled_with_its_gradient():
    s, t, labels = _inputs()
    lam = 0.01
    kw = dict(alpha=0.7, temperature=2.0, softcap=3.0, reduction="sum")
    with_z = reference.kd_loss(s, t, labels, z_loss=lam, **kw)
    without = reference.kd_loss(s, t, labels, **kw)
    s_prime = _capped(s.detach(), 1.0, 3.0)
    lse = torch.logsumexp(s_prime, -1)
    valid = labels != IGNORE
    assert torch.allclose(with_z - without, lam * (lse[valid] ** 2).sum(), rtol=1e-12)
    (g_z,) = torch.autograd.grad(with_z, s)
    (g_0,) = torch.autograd.grad(without, s)
    chain = 1 - torch.tanh(s.detach() / 3.0) ** 2
    want = 2 * lam * lse[:, None] * torch.softmax(s_prime, -1) * chain * valid[:, None]
    assert torch.allclose(g_z - g_0, want, rtol=1e-10, atol=1e-14)


def test_z_loss_without_labels_counts_every_token():
    s, t, _ = _inputs()
    lam = 0.1
    z = reference.kd_loss(s, t, z_loss=lam, reduction="mean") - reference.kd_loss(s, t, reduction="mean")
    assert torch.allclose(z, lam * (torch.logsumexp(s.detach(), -1) ** 2).mean(), rtol=1e-12)


def test_sparse_reference_transforms_the_student_only():
    s, t, labels = _inputs()
    k = 5
    logp = torch.log_softmax(t, -1)
    top = logp.topk(k, -1)
    kw = dict(alpha=0.6, temperature=1.0, tail="bucket", label_smoothing=0.1, z_loss=1e-2)
    got = fastkd.sparse_reference.sparse_kd_loss(s, top.indices, top.values, labels, softcap=2.0, logit_scale=1.5,
                                                 **kw)
    plain = fastkd.sparse_reference.sparse_kd_loss(_capped(s, 1.5, 2.0), top.indices, top.values, labels, **kw)
    assert torch.allclose(got, plain, rtol=1e-13)


# ---------------------------------------------------------------------------------------
# Bad settings: refused when the config is made (so a module fails at construction).

@pytest.mark.parametrize("kw,exc,match", [
    (dict(softcap=0.0), ValueError, "softcap must be > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be finite"),
    (dict(softcap="30"), TypeError, "softcap must be a real number"),
    (dict(teacher_softcap=0.0), ValueError, "teacher_softcap must be > 0"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    (dict(teacher_logit_scale=-2.0), ValueError, "teacher_logit_scale must be > 0"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be <= 1"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be >= 0"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be >= 0"),
    (dict(z_loss=float("inf")), ValueError, "z_loss must be finite"),
])
def test_bad_options_are_refused(kw, exc, match):
    s, t, labels = _inputs()
    with pytest.raises(exc, match=match):
        fastkd.kd_loss(s, t, labels, **kw)
    with pytest.raises(exc, match=match):
        fastkd.KDLoss(**kw)


@pytest.mark.parametrize("name", ["teacher_softcap", "teacher_logit_scale"])
def test_a_sparse_teacher_refuses_teacher_transforms(name):
    with pytest.raises(ValueError, match=f"{name} does not apply to a sparse teacher"):
        fastkd.SparseKDLoss(**{name: 2.0})


def test_the_repr_shows_the_options_set():
    r = repr(fastkd.KDLoss(softcap=30.0, teacher_softcap=None, z_loss=1e-4))
    assert "softcap=30.0" in r and "teacher_softcap=None" in r and "z_loss=0.0001" in r
    assert "teacher_logit_scale" not in r and "label_smoothing" not in r


# ---------------------------------------------------------------------------------------
# A backend whose kernels do not apply the options refuses them; auto picks one that does.

def test_a_backend_without_the_options_refuses_them(monkeypatch):
    import fastkd._dispatch as dispatch

    if "cpu" not in backend_names("cpu"):
        pytest.skip("fastkd._C not available")
    monkeypatch.setattr(dispatch, "LOGIT_OPTIONS_BACKENDS", {"torch"})
    s, t, labels = _inputs()
    with pytest.raises(NotImplementedError, match="does not apply logit_scale, softcap"):
        fastkd.kd_loss(s.float(), t.float(), labels, softcap=2.0, backend="cpu")
    got = fastkd.kd_loss(s.float(), t.float(), labels, softcap=2.0, alpha=0.5)  # auto: torch
    want = reference.kd_loss(s, t, labels, softcap=2.0, alpha=0.5)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
    assert fastkd.kd_loss(s.float(), t.float(), labels, backend="cpu").isfinite()  # options off: runs


def test_every_backend_applies_the_options():
    assert set(backend_names("cpu", with_reference=True)) <= LOGIT_OPTIONS_BACKENDS


def test_auto_applies_the_options():
    s, t, labels = _inputs()
    got = fastkd.kd_loss(s.float(), t.float(), labels, softcap=2.0, label_smoothing=0.1, alpha=0.5)
    want = reference.kd_loss(s, t, labels, softcap=2.0, label_smoothing=0.1, alpha=0.5)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5)
