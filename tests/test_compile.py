"""torch.compile(fullgraph=True) through kd_loss and fused_linear_kd_loss when the float
settings change between calls (temperature, alpha and beta schedules) and with
dynamic=True: the argument checks must be traceable, not Python branches on symbolic
values, and a new value must not recompile (the float settings reach the operators as a
tensor, fastkd/config.py: pack_floats)."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastkd
from harness.backends import kernel_backend, supports
from harness.cases import Case
from harness.inputs import make_inputs

needs_cpu = pytest.mark.skipif(kernel_backend("cpu") is None, reason="fastkd._C not available")
needs_triton = pytest.mark.skipif(not supports("triton", "cpu"), reason="Triton cannot run on CPU tensors here")


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _kd(s, t, labels, T, alpha):
    return fastkd.kd_loss(s, t, labels, divergence="jsd", beta=0.3, temperature=T, alpha=alpha, backend="cpu")


@needs_cpu
def test_kd_loss_beta_schedule_keeps_jsd_special_cases():
    """beta = 0 / 1 must still give forward / reverse KL when beta is a traced value."""
    torch._dynamo.reset()
    s, t, _ = make_inputs(Case(lead=(6,), vocab=211))
    f = torch.compile(lambda s, t, b: fastkd.kd_loss(s, t, divergence="jsd", beta=b, temperature=2.0,
                                                     backend="cpu"), fullgraph=True, dynamic=True)
    for b, same_as in [(0.3, None), (0.0, "forward_kl"), (0.7, None), (1.0, "reverse_kl")]:
        out = f(s, t, b)
        ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), divergence=same_as or "jsd", beta=b,
                                       temperature=2.0)
        assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item()), (b, out.item(), ref.item())


@needs_cpu
def test_kd_loss_dynamic_shapes_and_num_items():
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda s, t, lab, n: fastkd.kd_loss(s, t, lab, temperature=2.0, alpha=0.5, num_items=n, backend="cpu"),
        fullgraph=True, dynamic=True)
    for rows, n in [(7, 11.0), (9, 13.0), (12, 20.0)]:
        s, t, labels = make_inputs(Case(lead=(rows,), vocab=257))
        out = compiled(s, t, labels, n)
        eager = fastkd.kd_loss(s, t, labels, temperature=2.0, alpha=0.5, num_items=n, backend="cpu")
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(_grad(out, s), _grad(eager, s))


@needs_cpu
def test_bad_value_still_fails_under_compile():
    torch._dynamo.reset()
    s, t, _ = make_inputs(Case(lead=(4,), vocab=64, labels=False))
    f = torch.compile(lambda s, t, T: fastkd.kd_loss(s, t, temperature=T, backend="cpu"), fullgraph=True,
                      dynamic=True)
    f(s, t, 1.0)
    f(s, t, 2.0)
    from fastkd.config import _CHECK_MESSAGES_TRACEABLE

    # The message is traced from torch 2.12 on; before, the check fires without it.
    with pytest.raises(Exception, match="temperature must be > 0" if _CHECK_MESSAGES_TRACEABLE else ""):
        f(s, t, -1.0)


def test_triton_launcher_resolves_jsd_special_cases():
    """The Triton launcher gets beta as a number at run time and must resolve it itself."""
    pytest.importorskip("fastkd.backends.triton")
    if not supports("triton", "cpu"):
        pytest.skip("Triton cannot run on CPU tensors here")
    s, t, _ = make_inputs(Case(lead=(4,), vocab=97, labels=False))
    one = torch.ones(())
    for beta, same_as in [(0.0, "forward_kl"), (1.0, "reverse_kl")]:
        # A config keeps "jsd" when beta is symbolic; build that case by hand.
        ints, floats = fastkd.make_config(divergence="jsd", temperature=2.0).with_vocab_size(97).kernel_settings()
        floats[fastkd.config.FLOAT_SETTINGS.index("beta")] = beta
        loss, _ = torch.ops.fastkd.triton_kd_forward(s.detach(), t, None, one, None, ints, floats)
        ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), divergence=same_as, temperature=2.0,
                                       reduction="none")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Schedules: every step a new value of one float setting, compiled once.
#
# The bound on compiled frames: with dynamic=None the first call compiles with the values
# as constants and the second distinct value recompiles once with them symbolic
# (automatic dynamic), which every later value reuses: 2. With dynamic=True one frame is
# traced, but dynamo may call the backend twice for it (it restarts the analysis once to
# specialise the untouched defaults, which never change): again at most 2. Before the
# float settings travelled as a tensor, every new value recompiled (12 values: the 9th
# raised FailOnRecompileLimitHit under fullgraph=True). The counting backend is aot_eager:
# dynamo and AOT autograd (where the specialisation happened), without inductor's time.
MAX_FRAMES = 2
STEPS = 12
# (temperature, alpha, beta) per step: 12 distinct values of each; beta's include jsd's
# special cases 0 and 1 (and pass through them while T and alpha change).
TEMPERATURES = [1.0 + 0.25 * i for i in range(STEPS)]
SCHEDULE = list(zip(TEMPERATURES, [0.2 + 0.07 * i for i in range(STEPS)],
                    [0.3, 0.0, 0.1, 0.2, 0.4, 0.5, 1.0, 0.6, 0.7, 0.8, 0.9, 0.95]))
BACKENDS = [pytest.param("cpu", marks=needs_cpu), "torch", pytest.param("triton", marks=needs_triton)]


def _reference_divergence(beta):
    # jsd at beta 0 / 1 is forward / reverse KL (TRL's special cases), which the kernels
    # must resolve at run time when beta is a traced value.
    return {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")


def _compiled(fn, dynamic):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True, dynamic=dynamic), counter


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_schedule_does_not_recompile(backend, dynamic):
    """Temperature, alpha and beta (jsd) each take 12 distinct values, all changing at every
    step: values and gradients equal eager and the float64 reference at each step."""
    s, t, labels = make_inputs(Case(alpha=0.7, lead=(2, 3), vocab=97))

    def step(s, t, labels, T, alpha, beta):
        return fastkd.kd_loss(s, t, labels, divergence="jsd", temperature=T, alpha=alpha, beta=beta, backend=backend)

    compiled, counter = _compiled(step, dynamic)
    for T, alpha, beta in SCHEDULE:
        out = compiled(s, t, labels, T, alpha, beta)
        eager = step(s, t, labels, T, alpha, beta)
        torch.testing.assert_close(out, eager)
        grad = _grad(out, s)
        torch.testing.assert_close(grad, _grad(eager, s))
        s64 = s.detach().double().requires_grad_(True)
        ref = fastkd.reference.kd_loss(s64, t.double(), labels, divergence=_reference_divergence(beta),
                                       temperature=T, alpha=alpha, beta=beta)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(grad.double(), _grad(ref, s64), rtol=2e-5, atol=1e-7)
    assert counter.frame_count <= MAX_FRAMES, (
        f"{counter.frame_count} compiled frames for {STEPS} steps: a float setting was specialised")


# Under the Triton interpreter the chunked fused-linear path is slow: dynamic=True only.
# The torch backend is not here: its chunks call torch.autograd.grad inside the autograd
# Function, which torch.compile does not trace (with constant settings too).
@pytest.mark.parametrize("backend, dynamic", [pytest.param("cpu", None, marks=needs_cpu),
                                              pytest.param("cpu", True, marks=needs_cpu),
                                              pytest.param("triton", True, marks=needs_triton)])
def test_fused_linear_schedule_does_not_recompile(backend, dynamic):
    """Temperature, alpha and beta all change at every step (one frame must serve them all)."""
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(10, 16, generator=g, requires_grad=True)
    ws = torch.randn(89, 16, generator=g, requires_grad=True)
    ht, wt = torch.randn(10, 24, generator=g), torch.randn(89, 24, generator=g)
    labels = torch.randint(0, 89, (10,), generator=g)

    def step(hs, ws, T, alpha, beta):
        return fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, divergence="jsd", temperature=T, alpha=alpha,
                                           beta=beta, backend=backend)

    compiled, counter = _compiled(step, dynamic)
    for T, alpha, beta in SCHEDULE:
        out = compiled(hs, ws, T, alpha, beta)
        eager = step(hs, ws, T, alpha, beta)
        torch.testing.assert_close(out, eager)
        grads = torch.autograd.grad(out, (hs, ws))
        torch.testing.assert_close(grads, torch.autograd.grad(eager, (hs, ws)))
        hs64, ws64 = (x.detach().double().requires_grad_(True) for x in (hs, ws))
        divergence = _reference_divergence(beta)
        ref = fastkd.reference.kd_loss(hs64 @ ws64.T, (ht @ wt.T).double(), labels, divergence=divergence,
                                       temperature=T, alpha=alpha, beta=beta)
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=1e-6)
        ref_grads = torch.autograd.grad(ref, (hs64, ws64))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert counter.frame_count <= MAX_FRAMES, f"{counter.frame_count} compiled frames for {STEPS} steps"


@needs_cpu
def test_temperature_schedule_under_inductor():
    """The issue's case end to end, inductor included: a new T at every step, one frame."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(lambda s, t, T: fastkd.kd_loss(s, t, temperature=T, backend="cpu"), backend=counter,
                      fullgraph=True)
    s, t, _ = make_inputs(Case(lead=(4,), vocab=16, labels=False))
    for T in TEMPERATURES:
        out = f(s, t, T)
        ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), temperature=T)
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-7)
    assert counter.frame_count <= MAX_FRAMES


def test_kdloss_module_in_a_compiled_step_with_a_schedule():
    """A module keeps its settings (compiled as constants); a schedule calls kd_loss."""
    torch._dynamo.reset()
    s, t, labels = make_inputs(Case(alpha=0.5, lead=(5,), vocab=64))
    crit = fastkd.KDLoss(temperature=2.0, alpha=0.5, backend="torch")
    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda s, t, lab, T: crit(s, t, lab) + fastkd.kd_loss(s, t, lab, temperature=T, alpha=0.5,
                                                                          backend="torch"),
                      backend=counter, fullgraph=True)
    for T in TEMPERATURES:
        out = f(s, t, labels, T)
        eager = crit(s, t, labels) + fastkd.kd_loss(s, t, labels, temperature=T, alpha=0.5, backend="torch")
        torch.testing.assert_close(out, eager)
    assert counter.frame_count <= MAX_FRAMES


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_logit_option_schedule(backend):
    """A softcap / label-smoothing / z-loss schedule under fullgraph=True: values equal eager
    and float64 at every step, and no recompile after the second value."""
    from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS

    if backend not in LOGIT_OPTIONS_BACKENDS:
        pytest.skip(f"{backend} does not apply the logit options yet")
    if backend == "cpu" and kernel_backend("cpu") is None:
        pytest.skip("fastkd._C not available")
    torch._dynamo.reset()
    s, t, labels = make_inputs(Case(lead=(6,), vocab=211))
    counter = CompileCounterWithBackend("inductor" if backend == "cpu" else "eager")

    def loss(s, t, lab, cap, eps, lam):
        return fastkd.kd_loss(s, t, lab, temperature=2.0, alpha=0.5, softcap=cap, label_smoothing=eps, z_loss=lam,
                              backend=backend)

    f = torch.compile(loss, fullgraph=True, dynamic=True, backend=counter)
    for cap, eps, lam in [(3.0, 0.1, 1e-3), (5.0, 0.0, 0.0), (2.0, 0.3, 1e-2), (30.0, 1.0, 0.5), (4.0, 0.05, 0.0)]:
        out = f(s, t, labels, cap, eps, lam)
        eager = loss(s, t, labels, cap, eps, lam)
        ref = fastkd.reference.kd_loss(s.detach().double(), t.double(), labels, temperature=2.0, alpha=0.5,
                                       softcap=cap, label_smoothing=eps, z_loss=lam)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(_grad(out, s), _grad(eager, s))
        assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item()), (cap, eps, lam, out.item(), ref.item())
    assert counter.frame_count <= 2, counter.frame_count
