"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs.

The bad inputs of kd_loss (and KDLoss's settings) are listed once, as ErrorCases, in
harness/cases.py (KD_LOSS_ERRORS); fused_linear_kd_loss's are checked in
test_fused_linear.py. Here: that list on every backend of the registry's error list, and
the checks that are not one bad input (environment, valid edge cases, signatures).
"""
import pytest
import torch

import fastkd
from harness.inputs import ERROR_VOCAB as V
from harness.inputs import small_kd_inputs as inputs
from harness.registry import KD_LOSS, OPS, check_error_case, error_params


@pytest.mark.parametrize("error,backend", error_params(KD_LOSS))
def test_bad_input(error, backend):
    check_error_case(error, backend)


@pytest.mark.parametrize("op,backend", [(op, b) for op, info in OPS.items() for b in info.error_backends])
def test_good_input_of_the_error_cases_is_valid(op, backend):
    """Each ErrorCase breaks a valid call: unbroken, it runs and gives a finite loss."""
    info = OPS[op]
    kw = {} if backend is None else dict(backend=backend)
    assert torch.isfinite(info.function(**info.good_input(), **kw)).all()


@pytest.fixture(params=OPS[KD_LOSS].error_backends)
def backend(request):
    return request.param


def call(backend, s, t, labels=None, **kw):
    return fastkd.kd_loss(s, t, labels, backend=backend, **kw)


def test_env_backend_override(monkeypatch):
    s, t, labels = inputs()
    monkeypatch.setenv("FASTKD_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of"):
        fastkd.kd_loss(s, t, labels)
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.resolve_backend("auto", s.device) == "torch"
    assert fastkd.resolve_backend("cpu", s.device) == "cpu"  # explicit argument wins
    monkeypatch.delenv("FASTKD_BACKEND")
    assert fastkd.resolve_backend("auto", s.device) == "cpu"


def test_mismatched_vocab_works_with_vocab_size(backend):
    s, _, labels = inputs()
    t = torch.randn(4, V + 2)
    call(backend, s, t, labels, vocab_size=V)  # without it: the ErrorCase "mismatched-vocab"


def test_ignore_index_label_is_not_out_of_range(backend):
    s, t, _ = inputs()
    call(backend, s, t, torch.tensor([0, -100, 2, 3]))
    call(backend, s, t, torch.tensor([0, 7, 2, 3]), ignore_index=7)


def test_float64_only_on_cpu_and_torch():
    s, t, labels = inputs(dtype=torch.float64)
    for b in ("cpu", "torch"):
        assert torch.isfinite(fastkd.kd_loss(s, t, labels, backend=b))


def test_num_items_cpu_tensor_is_read_on_the_host():
    from fastkd._checks import check_num_items

    assert check_num_items(torch.tensor(12), "mean") == 12.0
    assert isinstance(check_num_items(torch.tensor([7.0]), "mean"), float)


def test_numpy_scalars_are_numbers(backend):
    np = pytest.importorskip("numpy")
    s, t, labels = inputs()
    a = call(backend, s, t, labels, temperature=np.float32(2.0), alpha=np.float64(0.5), beta=np.float32(0.3),
             divergence="jsd", num_items=np.int64(3), ignore_index=np.int64(-100))
    b = call(backend, s, t, labels, temperature=2.0, alpha=0.5, beta=0.3, divergence="jsd", num_items=3)
    torch.testing.assert_close(a, b)


def test_fused_linear_accepts_every_kd_loss_keyword():
    import inspect

    kd = set(inspect.signature(fastkd.kd_loss).parameters) - {"student_logits", "teacher_logits", "labels"}
    fl = set(inspect.signature(fastkd.fused_linear_kd_loss).parameters)
    assert kd <= fl, kd - fl
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(5, 8, generator=g, requires_grad=True), torch.randn(13, 8, generator=g)
    ht, wt = torch.randn(5, 6, generator=g), torch.randn(13, 6, generator=g)
    a = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, inplace_backward=True)
    b = fastkd.fused_linear_kd_loss(hs, ws, ht, wt)
    torch.testing.assert_close(a, b)
