"""inplace_backward=True overwrites the student logits with their gradient in the forward
call. Every misuse must either give the right gradient or raise; none may corrupt a
gradient silently."""
import pytest
import torch

import fastkd
from harness.cases import Case
from harness.inputs import make_inputs
from harness.registry import backend_devices, ids

BACKEND_DEVICES = backend_devices()
BACKEND_IDS = ids(BACKEND_DEVICES)


def _inputs(device):
    s, t, labels = make_inputs(Case(alpha=0.6, lead=(9,), vocab=301), device)
    return s.detach(), t, labels


def _kd(x, t, labels, backend, inplace=True):
    return fastkd.kd_loss(x, t, labels, temperature=2.0, alpha=0.6, backend=backend, inplace_backward=inplace)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_logits_saved_by_an_earlier_op_raise(backend, device):
    """y = x.exp() saves y for its backward: overwriting y must be caught, not give a wrong x.grad."""
    s, t, labels = _inputs(device)
    x = (s / 4).requires_grad_(True)
    y = x.exp()
    loss = _kd(y, t, labels, backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_second_loss_that_saved_the_logits_raises(backend, device):
    """A loss built before the in-place call that saved the logits sees them overwritten."""
    s, t, labels = _inputs(device)
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1
    other = (logits ** 2).mean()  # saves `logits`
    loss = _kd(logits, t, labels, backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_second_loss_that_did_not_save_the_logits_is_exact(backend, device):
    """Earlier consumers that keep no copy of the logits (a non-in-place fastkd loss, a
    linear term) are unaffected: the summed gradient is right."""
    s, t, labels = _inputs(device)
    leaf = s.clone().requires_grad_(True)
    logits = leaf * 1
    first = fastkd.kd_loss(logits, t, labels, divergence="jsd", temperature=2.0, alpha=0.6, backend=backend)
    linear = logits.sum() * 0.01
    loss = _kd(logits, t, labels, backend)
    (first + linear + loss).backward()

    ref_leaf = s.clone().double().requires_grad_(True)
    t64 = t.double()
    ref = (fastkd.reference.kd_loss(ref_leaf, t64, labels, divergence="jsd", temperature=2.0, alpha=0.6)
           + ref_leaf.sum() * 0.01
           + fastkd.reference.kd_loss(ref_leaf, t64, labels, temperature=2.0, alpha=0.6))
    ref.backward()
    torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_leaf_that_requires_grad_is_refused(backend, device):
    s, t, labels = _inputs(device)
    param = torch.nn.Parameter(s.clone())
    before = param.detach().clone()
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        _kd(param, t, labels, backend)
    with pytest.raises(ValueError, match="leaf tensor that requires grad"):
        _kd(param.view(3, 3, -1), t.view(3, 3, -1), labels.view(3, 3), backend)  # a view writes the leaf too
    assert torch.equal(param.detach(), before)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_no_overwrite_without_autograd(backend, device):
    """Under no_grad (evaluation) or for logits that need no gradient, nothing is overwritten."""
    s, t, labels = _inputs(device)
    x = s.clone()
    with torch.no_grad():
        _kd(x, t, labels, backend)
    assert torch.equal(x, s)
    _kd(x, t, labels, backend)
    assert torch.equal(x, s)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_version_counter_is_bumped(backend, device):
    s, t, labels = _inputs(device)
    logits = s.clone().requires_grad_(True) * 1
    v = logits._version
    _kd(logits, t, labels, backend)
    assert logits._version > v


def test_overwrite_happens_in_the_forward_call():
    """Documented: a loss taken *after* the call reads the gradient, not the logits; no
    version counter can catch that, so the docstring says it plainly."""
    s, t, labels = _inputs("cpu")
    logits = s.clone().requires_grad_(True) * 1
    _kd(logits, t, labels, "cpu")
    assert not torch.equal(logits.detach(), s)
    assert "forward call" in fastkd.kd_loss.__doc__
