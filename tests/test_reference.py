"""The reference itself: autograd gradients, closed forms and the conventions of docs/semantics.md."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd import reference

DIVS = ("forward_kl", "reverse_kl", "jsd", "tvd")


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["mean", "none"])  # sum/batchmean only rescale
def test_gradcheck(divergence, reduction):
    s = rand(5, 7).requires_grad_(True)
    t = rand(5, 7, seed=1)
    labels = torch.tensor([0, 3, -100, 6, 2])
    f = lambda x: reference.kd_loss(x, t, labels, divergence=divergence, temperature=1.7, beta=0.3,  # noqa: E731
                                     alpha=0.6, reduction=reduction)
    assert torch.autograd.gradcheck(f, (s,))


def test_gradcheck_with_masked_vocab():
    s = rand(4, 6)
    t = rand(4, 6, seed=1)
    s[:, 2] = t[:, 2] = float("-inf")
    s.requires_grad_(True)
    for div in DIVS:
        f = lambda x: reference.kd_loss(x, t, divergence=div, beta=0.4)  # noqa: E731
        assert torch.autograd.gradcheck(f, (s,))
        (g,) = torch.autograd.grad(f(s), s)
        assert torch.isfinite(g).all() and (g[:, 2] == 0).all()


def test_two_point_closed_forms():
    # p = (0.8, 0.2), q = (0.5, 0.5) via logits log p, log q.
    p = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    s, t = q.log(), p.log()
    fkl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    m = 0.5 * p + 0.5 * q
    jsd = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert reference.kd_loss(s, t, divergence="forward_kl").item() == pytest.approx(fkl, rel=1e-12)
    assert reference.kd_loss(s, t, divergence="reverse_kl").item() == pytest.approx(rkl, rel=1e-12)
    assert reference.kd_loss(s, t, divergence="jsd", beta=0.5).item() == pytest.approx(jsd.item(), rel=1e-12)
    assert reference.kd_loss(s, t, divergence="tvd").item() == pytest.approx(0.3, rel=1e-12)


def test_jsd_beta_endpoints_are_the_kls():
    s, t = rand(6, 9), rand(6, 9, seed=1)
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = reference.kd_loss(s, t, divergence="jsd", beta=beta, temperature=2.0)
        b = reference.kd_loss(s, t, divergence=div, temperature=2.0)
        assert torch.equal(a, b)


def test_jsd_half_is_symmetric_and_bounded():
    s, t = rand(6, 9), rand(6, 9, seed=1)
    a = reference.kd_loss(s, t, divergence="jsd", reduction="none")
    b = reference.kd_loss(t, s, divergence="jsd", reduction="none")
    torch.testing.assert_close(a, b)
    assert (a >= 0).all() and (a <= math.log(2) + 1e-12).all()


def test_identical_distributions_give_zero():
    s = rand(3, 8)
    for div in DIVS:
        assert reference.kd_loss(s, s.clone(), divergence=div).abs().item() < 1e-12


def test_forward_kl_matches_torch_kl_div_and_t_squared():
    s, t = rand(6, 9), rand(6, 9, seed=1)
    T = 3.0
    ours = reference.kd_loss(s, t, temperature=T, reduction="batchmean")
    torch_kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(ours, torch_kl * T * T)
    torch.testing.assert_close(reference.kd_loss(s, t, temperature=T, t_squared=False, reduction="batchmean"), torch_kl)


def test_alpha_mixes_in_cross_entropy_at_temperature_one():
    s, t = rand(6, 9), rand(6, 9, seed=1)
    labels = torch.tensor([1, 2, 3, -100, 0, 8])
    valid = labels != -100
    kd = reference.kd_loss(s, t, labels, temperature=2.0, reduction="none")
    mixed = reference.kd_loss(s, t, labels, temperature=2.0, alpha=0.3, reduction="none")
    ce = F.cross_entropy(s, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(mixed, torch.where(valid, 0.3 * kd + 0.7 * ce, 0.0))
    ce_only = reference.kd_loss(s, t, labels, alpha=0.0)
    torch.testing.assert_close(ce_only, F.cross_entropy(s, labels, ignore_index=-100))


def test_reductions_and_num_items():
    s, t = rand(6, 9), rand(6, 9, seed=1)
    labels = torch.tensor([1, -100, 3, -100, 0, 8])
    rows = reference.kd_loss(s, t, labels, reduction="none")
    assert (rows[labels == -100] == 0).all()
    total = rows.sum()
    torch.testing.assert_close(reference.kd_loss(s, t, labels, reduction="sum"), total)
    torch.testing.assert_close(reference.kd_loss(s, t, labels, reduction="mean"), total / 4)
    torch.testing.assert_close(reference.kd_loss(s, t, labels, reduction="batchmean"), total / 6)
    torch.testing.assert_close(reference.kd_loss(s, t, labels, num_items=10), total / 10)
    torch.testing.assert_close(reference.kd_loss(s, t, labels, num_items=torch.tensor(8)), total / 8)
    all_ignored = torch.full((6,), -100)
    assert reference.kd_loss(s, t, all_ignored).item() == 0.0


def test_vocab_size_equals_slicing_and_zero_grad_past_it():
    s = rand(4, 12).requires_grad_(True)
    t = rand(4, 15, seed=1)
    a = reference.kd_loss(s, t, vocab_size=10, divergence="jsd")
    b = reference.kd_loss(s[:, :10], t[:, :10], divergence="jsd")
    torch.testing.assert_close(a, b)
    (g,) = torch.autograd.grad(a, s)
    assert (g[:, 10:] == 0).all()


def test_three_d_input_same_as_flattened():
    s, t = rand(2, 3, 9), rand(2, 3, 9, seed=1)
    labels = torch.tensor([[1, 2, -100], [0, 4, 8]])
    a = reference.kd_loss(s, t, labels, alpha=0.5, reduction="none")
    assert a.shape == (2, 3)
    b = reference.kd_loss(s.reshape(6, 9), t.reshape(6, 9), labels.reshape(6), alpha=0.5, reduction="none")
    torch.testing.assert_close(a.reshape(6), b)


def test_nan_propagates():
    s, t = rand(3, 5), rand(3, 5, seed=1)
    s[1, 2] = float("nan")
    assert torch.isnan(reference.kd_loss(s, t))
    rows = reference.kd_loss(s, t, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_ignored_row_with_an_infinite_divergence_gets_a_zero_gradient():
    """Reverse KL is +inf on a row where the teacher has a -inf logit and the student mass;
    ignored, that row must give zeros (as the kernels give), not NaN through the mask."""
    s = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, dtype=torch.float64)
    t[0, 2] = float("-inf")
    labels = torch.tensor([-100, 1])
    loss = reference.kd_loss(s, t, labels, divergence="reverse_kl")
    loss.backward()
    assert torch.equal(s.grad[0], torch.zeros(5, dtype=torch.float64))
    x = s.detach()[1:].clone().requires_grad_(True)  # the valid row alone: the same loss and gradient
    reference.kd_loss(x, t[1:], labels[1:], divergence="reverse_kl").backward()
    assert torch.allclose(loss, reference.kd_loss(s.detach()[1:], t[1:], labels[1:], divergence="reverse_kl"))
    assert torch.allclose(s.grad[1:], x.grad, rtol=1e-12, atol=0)
