"""Bad input gets a ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import fastkd

V = 11


def inputs(n=4, v=V, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randn(n, v, generator=g, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    return s, t, labels


@pytest.fixture(params=["cpu", "torch"])
def backend(request):
    return request.param


def call(backend, s, t, labels=None, **kw):
    return fastkd.kd_loss(s, t, labels, backend=backend, **kw)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="2"), TypeError, "temperature"),
    (dict(beta=1.5), ValueError, "beta must be <= 1"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(alpha=1.2), ValueError, "alpha"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(vocab_size=V + 1), ValueError, "vocab_size must be in"),
    (dict(vocab_size=0), ValueError, "vocab_size must be in"),
    (dict(vocab_size=3.0), TypeError, "vocab_size must be an int"),
    (dict(num_items=0), ValueError, "num_items must be > 0"),
    (dict(num_items=5, reduction="sum"), ValueError, "num_items only applies"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(t_squared=1), TypeError, "t_squared"),
])
def test_bad_keywords(backend, kw, exc, match):
    s, t, labels = inputs()
    with pytest.raises(exc, match=match):
        call(backend, s, t, labels, **kw)


def test_unknown_backend():
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.kd_loss(s, t, labels, backend="gpu")


def test_backend_for_wrong_device():
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="cuda"):
        fastkd.kd_loss(s, t, labels, backend="cuda")


def test_env_backend_override(monkeypatch):
    s, t, labels = inputs()
    monkeypatch.setenv("FASTKD_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of"):
        fastkd.kd_loss(s, t, labels)
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.api.resolve_backend("auto", s.device) == "torch"
    assert fastkd.api.resolve_backend("cpu", s.device) == "cpu"  # explicit argument wins
    monkeypatch.delenv("FASTKD_BACKEND")
    assert fastkd.api.resolve_backend("auto", s.device) == "cpu"


def test_alpha_without_labels(backend):
    s, t, _ = inputs()
    with pytest.raises(ValueError, match="alpha=0.5 .* needs labels"):
        call(backend, s, t, None, alpha=0.5)


def test_mismatched_token_shapes(backend):
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="same leading"):
        call(backend, s, t[:3], labels)


def test_mismatched_vocab_needs_vocab_size(backend):
    s, _, labels = inputs()
    t = torch.randn(4, V + 2)
    with pytest.raises(ValueError, match="pass vocab_size="):
        call(backend, s, t, labels)
    call(backend, s, t, labels, vocab_size=V)  # and with it, it works


@pytest.mark.parametrize("bad_labels,exc,match", [
    (torch.zeros(3, dtype=torch.long), ValueError, "labels must have shape"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, "labels must have shape"),
    (torch.zeros(4), TypeError, "labels must be an int64"),
    ([0, 1, 2, 3], TypeError, "labels must be a torch.Tensor"),
    (torch.tensor([0, 1, 2, V]), ValueError, r"labels must be in \[0, 11\)"),
    (torch.tensor([0, -1, 2, 3]), ValueError, "found -1"),
])
def test_bad_labels(backend, bad_labels, exc, match):
    s, t, _ = inputs()
    with pytest.raises(exc, match=match):
        call(backend, s, t, bad_labels)


def test_label_range_respects_vocab_size(backend):
    s, _, _ = inputs()
    t = torch.randn(4, V + 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\)"):
        call(backend, s, t, torch.tensor([0, 1, 9, 2]), vocab_size=9)


def test_ignore_index_label_is_not_out_of_range(backend):
    s, t, _ = inputs()
    call(backend, s, t, torch.tensor([0, -100, 2, 3]))
    call(backend, s, t, torch.tensor([0, 7, 2, 3]), ignore_index=7)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_logits(backend, dtype):
    s = torch.ones(4, V, dtype=dtype)
    with pytest.raises(TypeError, match="student_logits must be a floating tensor"):
        call(backend, s, torch.randn(4, V))
    with pytest.raises(TypeError, match="teacher_logits must be a floating tensor"):
        call(backend, torch.randn(4, V), s)


def test_zero_dim_inputs(backend):
    with pytest.raises(ValueError, match="0-dim"):
        call(backend, torch.tensor(1.0), torch.tensor(1.0))


def test_non_tensor_inputs(backend):
    with pytest.raises(TypeError, match="student_logits must be a torch.Tensor"):
        call(backend, [[1.0, 2.0]], torch.randn(1, 2))


def test_teacher_requiring_grad_is_refused(backend):
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        call(backend, s, t.requires_grad_(True), labels)


def test_float64_only_on_cpu_and_torch():
    s, t, labels = inputs(dtype=torch.float64)
    for b in ("cpu", "torch"):
        assert torch.isfinite(fastkd.kd_loss(s, t, labels, backend=b))


def test_inplace_backward_type():
    s, t, labels = inputs()
    with pytest.raises(TypeError, match="inplace_backward"):
        fastkd.kd_loss(s, t, labels, inplace_backward="yes")


# ---------------------------------------------------------------------------------------
# Consistency of the checks across entry points (issue: small inconsistencies).

def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.KDLoss("kl")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastkd.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.KDLoss(backend="gpu")
    with pytest.raises(ValueError, match="divergence must be one of"):
        fastkd.FusedLinearKDLoss("kl")


@pytest.mark.parametrize("bad", [torch.tensor(0), torch.tensor(0.0), torch.tensor(-3.0)])
def test_num_items_tensor_zero_raises_like_the_number(backend, bad):
    s, t, labels = inputs()
    with pytest.raises(ValueError, match="num_items must be > 0"):
        call(backend, s, t, labels, num_items=bad)


def test_num_items_cpu_tensor_is_read_on_the_host():
    from fastkd._args import check_num_items

    assert check_num_items(torch.tensor(12), "mean") == 12.0
    assert isinstance(check_num_items(torch.tensor([7.0]), "mean"), float)


def test_numpy_scalars_are_numbers(backend):
    np = pytest.importorskip("numpy")
    s, t, labels = inputs()
    a = call(backend, s, t, labels, temperature=np.float32(2.0), alpha=np.float64(0.5), beta=np.float32(0.3),
             divergence="jsd", num_items=np.int64(3), ignore_index=np.int64(-100))
    b = call(backend, s, t, labels, temperature=2.0, alpha=0.5, beta=0.3, divergence="jsd", num_items=3)
    torch.testing.assert_close(a, b)


def test_empty_vocabulary_is_a_clear_error(backend):
    s = torch.randn(4, 0, requires_grad=True)
    t = torch.randn(4, 0)
    with pytest.raises(ValueError, match="empty vocabulary dimension"):
        call(backend, s, t)


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
