"""Every kernel backend against fastkd.reference in float64, on the shared case list."""
import pytest
import torch

from harness.cases import DIVERGENCES, Case
from harness.compare import check_case
from harness.inputs import make_inputs
from harness.registry import KD_LOSS, OPS, backend_devices, case_ids, ids, runs_case
from harness.results import run_backend

import fastkd

BACKEND_DEVICES = backend_devices()

if not BACKEND_DEVICES:
    raise RuntimeError("no fastkd kernel backend is available: the C++ extension failed to load and triton is missing")

BACKEND_IDS = ids(BACKEND_DEVICES)

# Every sample case on every (backend, device) pair whose backend computes in its dtypes.
CASES = OPS[KD_LOSS].cases
CASE_PARAMS = [pytest.param(case, backend, device, id=f"{case_id}-{backend}@{device}")
               for case, case_id in zip(CASES, case_ids(CASES)) for backend, device in BACKEND_DEVICES
               if runs_case(backend, case)]


@pytest.mark.parametrize("case,backend,device", CASE_PARAMS)
def test_matches_reference(case, backend, device):
    check_case(case, backend, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_nan_propagates(backend, device):
    case = Case(nan_row=True, reduction="mean")
    s, t, labels = make_inputs(case, device)
    loss, grad = run_backend(case, backend, s, t, labels)
    assert torch.isnan(loss).all()
    bad_row = torch.isnan(s.detach().reshape(-1, s.shape[-1])).any(-1)
    assert torch.isnan(grad.reshape(-1, s.shape[-1])[bad_row]).all()
    assert torch.isfinite(grad.reshape(-1, s.shape[-1])[~bad_row]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_nan_in_teacher_propagates(backend, device, divergence):
    case = Case(divergence=divergence, labels=False)
    s, t, _ = make_inputs(case, device)
    t = t.clone()
    t[4, 7] = float("nan")
    loss = fastkd.kd_loss(s, t, backend=backend, divergence=divergence, reduction="none", temperature=2.0)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), divergence=divergence, reduction="none",
                                   temperature=2.0)
    assert torch.isnan(ref[4]) and torch.isnan(loss[4])
    assert torch.isnan(grad[4]).all()
    keep = torch.arange(loss.shape[0], device=loss.device) != 4
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(grad[keep]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_ignored_and_padded_columns_get_zero_gradient(backend, device):
    case = Case(teacher_pad=4, vocab_size=990, alpha=0.6, ignore_frac=0.3)
    s, t, labels = make_inputs(case, device)
    loss = fastkd.kd_loss(s, t, labels, backend=backend, reduction="none", vocab_size=990, alpha=0.6,
                          temperature=2.0)
    loss.sum().backward()
    ignored = labels == -100
    assert (loss[ignored] == 0).all()
    assert (s.grad[ignored] == 0).all()
    assert (s.grad[:, 990:] == 0).all()
    assert (s.grad[~ignored, :990] != 0).any(-1).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_grad_output_scaling_and_accumulation(backend, device):
    """backward multiplies by grad_output; num_items splits a batch into micro-batches."""
    case = Case(alpha=0.6)
    s, t, labels = make_inputs(case, device)
    full = fastkd.kd_loss(s, t, labels, backend=backend, temperature=2.0, alpha=0.6)
    (g_full,) = torch.autograd.grad(full * 3.0, s)
    n_valid = (labels != -100).sum()
    parts, grads = [], []
    for sl in (slice(0, 20), slice(20, None)):
        si = s.detach()[sl].clone().requires_grad_(True)
        li = fastkd.kd_loss(si, t[sl], labels[sl], backend=backend, temperature=2.0, alpha=0.6,
                            num_items=n_valid)
        (gi,) = torch.autograd.grad(li * 3.0, si)
        parts.append(li.detach())
        grads.append(gi)
    torch.testing.assert_close(sum(parts), full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads), g_full / 1.0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_inplace_backward_reuses_the_logits_buffer(backend, device):
    s, t, labels = make_inputs(Case(student_dtype=torch.bfloat16), device)
    leaf = s.detach().clone().requires_grad_(True)
    logits = leaf * 1
    ptr = logits.data_ptr()
    loss = fastkd.kd_loss(logits, t, labels, backend=backend, temperature=2.0, inplace_backward=True)
    loss.backward()
    # The gradient was written over the logits; the leaf's gradient equals the reference's.
    s_ref = s.detach().clone().requires_grad_(True)
    fastkd.kd_loss(s_ref, t, labels, backend=backend, temperature=2.0).backward()
    assert logits.data_ptr() == ptr
    torch.testing.assert_close(logits.detach(), s_ref.grad)
    torch.testing.assert_close(leaf.grad, s_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_second_backward_is_refused(backend, device):
    s, t, labels = make_inputs(Case(), device)
    loss = fastkd.kd_loss(s, t, labels, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_kdloss_module_matches_function(backend, device):
    s, t, labels = make_inputs(Case(alpha=0.6), device)
    crit = fastkd.KDLoss("jsd", beta=0.3, temperature=2.0, alpha=0.6, backend=backend)
    a = crit(s, t, labels)
    b = fastkd.kd_loss(s, t, labels, divergence="jsd", beta=0.3, temperature=2.0, alpha=0.6, backend=backend)
    assert torch.equal(a, b)
    assert "jsd" in repr(crit)
