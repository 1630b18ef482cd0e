"""The Triton several-teachers kernel (fastkd/backends/triton/multi.py) against the float64 reference.

tests/test_multi_teacher.py runs its backend cases on triton (it is in
fastkd._dispatch.MULTI_TEACHER_BACKENDS) with rows that fit one block. Here the rows are
swept in several blocks (launch.BLOCK_OVERRIDE, as tests/test_triton_kernels.py forces the
multi-block path): every divergence x mode x weights kind (uniform, per token, routed with
NaN in the unused teachers' rows), every logit option at once, K = 4 teachers of mixed
dtypes and padded widths, K = 1 with per-token weights, in place, the operator's row
losses and its contract checks, fused linear, and torch.compile through the fakes.

Under the Triton interpreter on CPU (conftest.py sets TRITON_INTERPRET=1): few rows, V ~ 100-200.
"""
import pytest
import torch

from harness.backends import supports

pytest.importorskip("triton")

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.backends import MAX_KERNEL_TEACHERS  # noqa: E402

if not supports("triton", "cuda" if torch.cuda.is_available() else "cpu"):
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastkd.backends import triton as triton_kd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MODES = ("mixture", "sum")
BLOCK = 64  # V = 130 -> 3 blocks per sweep, the last one partial
ALL_OPTIONS = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.1,
                   z_loss=1e-3)


@pytest.fixture(autouse=True)
def small_block(monkeypatch):
    monkeypatch.setattr(triton_kd.launch, "BLOCK_OVERRIDE", BLOCK)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(weights, n=6, v=130, k=3, seed=0):
    """float64 student and teachers (spread ~3), labels with an ignored token, and the
    weights of the kind asked: None (uniform), per token, or routed one-hot with the unused
    teachers' rows set to NaN (never read)."""
    g = _gen(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ts = [torch.randn(n, v, generator=g, dtype=torch.float64) * 3 for _ in range(k)]
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = IGNORE
    if weights == "uniform":
        return s, ts, labels, None
    if weights == "per-token":
        w = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
        return s, ts, labels, w / w.sum(0)
    route = torch.arange(n) % k
    for j, t in enumerate(ts):
        t[route != j] = float("nan")
    return s, ts, labels, torch.nn.functional.one_hot(route, k).T.double()


def _rows_and_grad(fn, x, **kw):
    """Per-token losses and d(sum_i c_i loss_i)/dx for fixed c (every row's gradient weighs)."""
    x = x.detach().clone().requires_grad_(True)
    rows = fn(x, reduction="none", **kw)
    c = torch.linspace(0.5, 1.5, rows.numel(), dtype=rows.dtype).reshape(rows.shape)
    (g,) = torch.autograd.grad((rows * c).sum(), x)
    return rows.detach(), g


def _check(s, teachers, labels, w, kw, tol=1e-5, s_dtype=torch.float32):
    """The triton rows and gradient (student in ``s_dtype``, teachers as given) against the
    float64 reference on the same (rounded) teachers."""
    w_low = w.float() if isinstance(w, torch.Tensor) else w
    rows, g = _rows_and_grad(lambda x, **a: fastkd.kd_loss(x, teachers, labels, teacher_weights=w_low,
                                                           backend="triton", **a), s.to(s_dtype), **kw)
    want, g_want = _rows_and_grad(lambda x, **a: reference.kd_loss(x, [t.double() for t in teachers], labels,
                                                                   teacher_weights=w_low, **a),
                                  s.to(s_dtype).double(), **kw)
    assert torch.isfinite(rows).all() and torch.isfinite(g).all()
    assert (rows.double() - want).abs().max() <= tol * want.abs().max(), (rows, want)
    assert (g.double() - g_want).norm() <= tol * g_want.norm()
    return rows, g


@pytest.mark.parametrize("weights", ["uniform", "per-token", "routed"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_multi_block_rows_against_the_reference(divergence, mode, weights):
    s, ts, labels, w = _case(weights, seed=DIVERGENCES.index(divergence))
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, beta=0.3)
    rows, g = _check(s, [t.float() for t in ts], labels, w, kw)
    assert rows[1] == 0 and torch.equal(g[1], torch.zeros_like(g[1]))  # the ignored token


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_logit_option_at_once(divergence, mode):
    s, ts, labels, w = _case("per-token", k=2, seed=10 + DIVERGENCES.index(divergence))
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=1.5, alpha=0.6, beta=0.4, **ALL_OPTIONS)
    _check(s, [t.float() for t in ts], labels, w, kw)


@pytest.mark.parametrize("mode, divergence", [("mixture", "jsd"), ("sum", "forward_kl")])
def test_four_teachers_of_mixed_dtypes_and_widths(mode, divergence):
    s, ts, labels, w = _case("per-token", k=4, seed=20)
    g = _gen(21)
    dtypes = (torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)
    pads = (3, 0, 17, 64)  # padded vocabularies: only the first vocab_size columns count
    teachers = [torch.cat([t, torch.randn(t.shape[0], pad, generator=g, dtype=torch.float64) * 50], -1).to(dtype)
                for t, pad, dtype in zip(ts, pads, dtypes)]
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7, beta=0.3, vocab_size=s.shape[-1])
    _check(s, teachers, labels, w, kw)
    # A bf16 student beside them: its gradient in bf16 (the rounding of its store).
    _check(s, teachers, labels, w, dict(kw, divergence="reverse_kl"), tol=1e-2, s_dtype=torch.bfloat16)


def test_one_teacher_with_per_token_weights():
    s, ts, labels, _ = _case("uniform", k=1, seed=30)
    w = torch.rand(1, s.shape[0], generator=_gen(31), dtype=torch.float64) * 2
    w[0, 3] = 0.0  # a token without a divergence term: its CE alone (and its teacher row NaN, unread)
    ts[0][3] = float("nan")
    for divergence in ("jsd", "tvd"):  # (every divergence: test_multi_teacher.py's K = 1 case)
        kw = dict(divergence=divergence, teacher_mode="sum", temperature=2.0, alpha=0.7, beta=0.3)
        _check(s, [ts[0].float()], labels, w, kw)
    # In mixture mode the one weight is 1: the single-teacher loss.
    t = torch.randn(s.shape, generator=_gen(32), dtype=torch.float64).float()
    ones = torch.ones(1, s.shape[0])
    several = _rows_and_grad(lambda x, **a: fastkd.kd_loss(x, [t], labels, teacher_weights=ones, backend="triton",
                                                           divergence="jsd", **a), s.float())
    single = _rows_and_grad(lambda x, **a: fastkd.kd_loss(x, t, labels, backend="triton", divergence="jsd", **a),
                            s.float())
    for a, b in zip(several, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode, divergence", [("mixture", "reverse_kl"), ("sum", "jsd")])
def test_unused_rows_are_not_read_and_change_nothing(mode, divergence):
    # Routed tokens: the NaN (or -inf) rows of the unused teachers give bitwise the loss and
    # gradient of finite rows there.
    s, ts, labels, w = _case("routed", seed=40)
    clean = [torch.where(t.isnan(), torch.randn(t.shape, generator=_gen(41), dtype=torch.float64), t).float()
             for t in ts]
    junk = [c.clone() for c in clean]
    for j, t in enumerate(junk):
        t[w[j] == 0] = float("nan") if j % 2 else float("-inf")
    kw = dict(divergence=divergence, teacher_mode=mode, temperature=2.0, alpha=0.7)
    want = _rows_and_grad(lambda x, **a: fastkd.kd_loss(x, clean, labels, teacher_weights=w.float(), backend="triton",
                                                        **a), s.float(), **kw)
    got = _rows_and_grad(lambda x, **a: fastkd.kd_loss(x, junk, labels, teacher_weights=w.float(), backend="triton",
                                                       **a), s.float(), **kw)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # A used teacher's NaN reaches its row, and that row alone.
    bad = [c.clone() for c in clean]
    bad[0][0, 5] = float("nan")  # token 0 is routed to teacher 0
    rows = fastkd.kd_loss(s.float(), bad, labels, teacher_weights=w.float(), backend="triton", reduction="none", **kw)
    assert rows[0].isnan() and torch.isfinite(rows[1:]).all()


@pytest.fixture
def loaded_addresses(monkeypatch):
    """Every address the interpreted kernels load (a list of numpy arrays, one per load)."""
    if not triton_kd.kernels_interpreted():
        pytest.skip("inspects the Triton interpreter")
    import numpy as np
    from triton.runtime import interpreter

    seen = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording(self, ptrs, mask, other, *args):
        seen.append(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64).ravel())
        return original(self, ptrs, mask, other, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording)
    return seen


@pytest.mark.parametrize("divergence, sweeps", [("forward_kl", 2), ("jsd", 3)])
def test_each_used_teacher_row_is_read_once_per_sweep_and_no_other(divergence, sweeps, loaded_addresses):
    # The traffic of docs/multi_teacher.md's plan, counted address by address: a teacher of
    # weight 0 in a row is never read there (one-hot routing reads one teacher), a used one
    # once per sweep and only its first vocab_size columns; the weights of an ignored token
    # are not read either.
    import numpy as np

    s, ts, labels, _ = _case("uniform", n=5, v=130, seed=90)
    labels[1], labels[4] = 3, IGNORE
    w = torch.tensor([[1.0, 0.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.5, 0.3], [0.0, 0.0, 1.0, 0.0, 0.7]])
    w[:, 4] = float("nan")  # an ignored token's weights: never read (the kernel takes this tensor as is)
    teachers = [torch.cat([t, t[:, :7]], -1).float() for t in ts]  # 7 padded columns, never read
    fastkd.kd_loss(s.float(), teachers, labels, teacher_weights=w, divergence=divergence, vocab_size=130,
                   backend="triton")
    counts = {}
    for addresses in loaded_addresses:
        for a, c in zip(*np.unique(addresses, return_counts=True)):
            counts[int(a)] = counts.get(int(a), 0) + int(c)
    for k, t in enumerate(teachers):
        for r in range(t.shape[0]):
            row = [counts.get(t.data_ptr() + (r * t.stride(0) + j) * 4, 0) for j in range(t.shape[1])]
            used = r != 4 and w[k, r] != 0
            assert row[:130] == [sweeps if used else 0] * 130, (k, r)
            assert row[130:] == [0] * 7, (k, r)
    weight_reads = [[counts.get(w.data_ptr() + (k * w.stride(0) + r) * 4, 0) for r in range(5)] for k in range(3)]
    assert weight_reads == [[1, 1, 1, 1, 0]] * 3


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_in_place_equals_out_of_place(divergence):
    s, ts, labels, w = _case("per-token", seed=50)
    teachers = [t.bfloat16() for t in ts]
    out = []
    for inplace in (False, True):
        leaf = s.float().requires_grad_(True)
        x = leaf * 1.0  # a non-leaf, which the in-place backward may overwrite
        loss = fastkd.kd_loss(x, teachers, labels, teacher_weights=w.float(), divergence=divergence,
                              teacher_mode="sum", alpha=0.5, inplace_backward=inplace, backend="triton")
        out.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _operator_args(n=5, v=40, k=2, seed=60):
    g = _gen(seed)
    s = torch.randn(n, v, generator=g)
    ts = [torch.randn(n, v, generator=g) for _ in range(k)]
    w = torch.softmax(torch.randn(k, n, generator=g), 0)
    labels = torch.randint(0, v, (n,), generator=g)
    cfg = fastkd.make_config(divergence="reverse_kl", alpha=0.5, teacher_mode="mixture").with_vocab_size(v)
    return s, ts, w, labels, cfg


def test_operator_rows_weight_strides_and_labels():
    s, ts, w, labels, cfg = _operator_args()
    one = torch.ones(())
    ints, floats = cfg.multi_kernel_settings()
    op = torch.ops.fastkd.triton_kd_multi_forward
    loss, grad = op(s, ts, w, labels, one, ints, floats)
    want = reference.multi_loss_per_row(s.double(), [t.double() for t in ts], w.double(), labels, cfg)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # Weights by their strides: transposed storage, and constants as stride 0 along N.
    w_t = w.T.contiguous().T
    assert w_t.stride() != w.stride()
    assert torch.equal(op(s, ts, w_t, labels, one, ints, floats)[0], loss)
    const = torch.tensor([[0.25], [0.75]]).expand(2, s.shape[0])
    assert torch.equal(op(s, ts, const, labels, one, ints, floats)[0],
                       op(s, ts, const.contiguous(), labels, one, ints, floats)[0])
    # Ignored token: zero loss and gradient whatever its weights; a label outside [0, V): NaN.
    bad = labels.clone()
    bad[1], bad[3] = IGNORE, s.shape[1]
    w_nan = w.clone()
    w_nan[:, 1] = float("nan")
    loss_b, grad_b = op(s, ts, w_nan, bad, one, ints, floats)
    assert loss_b[1] == 0 and not grad_b[1].any()
    assert loss_b[3].isnan() and grad_b[3].isnan().all()
    assert torch.equal(loss_b[[0, 2, 4]], loss[[0, 2, 4]]) and torch.equal(grad_b[[0, 2, 4]], grad[[0, 2, 4]])
    # In place: the gradient written over the student, the same values.
    x = s.clone()
    assert torch.equal(torch.ops.fastkd.triton_kd_multi_forward_inplace(x, ts, w, labels, one, ints, floats), loss)
    assert torch.equal(x, grad)


def test_operator_and_dispatch_refuse_what_they_cannot_run():
    s, ts, w, labels, cfg = _operator_args()
    one = torch.ones(())
    ints, floats = cfg.multi_kernel_settings()
    op = torch.ops.fastkd.triton_kd_multi_forward
    with pytest.raises(ValueError, match=r"weights must be a torch.float32 \[K, N\] = \[2, 5\]"):
        op(s, ts, w.double(), labels, one, ints, floats)
    with pytest.raises(ValueError, match=r"weights must be .* got a torch.float32 \(3, 5\)"):
        op(s, ts, torch.cat([w, w[:1]]), labels, one, ints, floats)
    with pytest.raises(ValueError, match="1 to 4 teachers, got 5"):
        op(s, ts * 2 + ts[:1], torch.full((5, 5), 0.2), labels, one, ints, floats)
    with pytest.raises(ValueError, match="unknown teacher mode id"):
        op(s, ts, w, labels, one, ints[:-1] + [2], floats)
    with pytest.raises(ValueError, match=r"vocab_size 40 must be in \[1, min\(40, 39\)\]"):
        op(s, [ts[0], ts[1][:, :39]], w, labels, one, ints, floats)
    many = [ts[0]] * (MAX_KERNEL_TEACHERS + 1)
    with pytest.raises(NotImplementedError, match="runs at most 4 teachers in one call, got 5"):
        fastkd.kd_loss(s, many, labels, backend="triton")
    with pytest.raises(TypeError, match="float64 logits are supported by"):
        fastkd.kd_loss(s.double(), [t.double() for t in ts], labels, backend="triton")


def test_fused_linear_on_triton():
    g = _gen(70)
    hs = torch.randn(8, 16, generator=g, requires_grad=True)
    ws = torch.randn(130, 16, generator=g) * 0.5
    ht = [torch.randn(8, 12, generator=g), torch.randn(8, 8, generator=g).bfloat16()]
    wt = [torch.randn(130, 12, generator=g) * 0.5, (torch.randn(132, 8, generator=g) * 0.5).bfloat16()]
    w = torch.softmax(torch.randn(2, 8, generator=g), 0)
    labels = torch.randint(0, 130, (8,), generator=g)
    for mode in MODES:  # two chunks of 4 tokens: the kernel in place on each, with its weights' columns
        kw = dict(divergence="jsd", teacher_mode=mode, temperature=2.0, alpha=0.7, vocab_size=130)
        got = fastkd.fused_linear_kd_loss(hs, ws, ht, wt, labels, teacher_weights=w, chunk_size=4, backend="triton",
                                          **kw)
        x = hs.detach().double().requires_grad_(True)
        want = reference.kd_loss(x @ ws.double().T, [h.double() @ m.double().T for h, m in zip(ht, wt)], labels,
                                 teacher_weights=w, **kw)
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
        (g_got,), (g_want,) = torch.autograd.grad(got, hs), torch.autograd.grad(want, x)
        assert (g_got.double() - g_want).norm() <= 1e-5 * g_want.norm()


def test_torch_compile_fullgraph_traces_the_operators():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    s, ts, labels, w = _case("per-token", n=4, v=70, k=2, seed=80)
    s = s.float().requires_grad_(True)
    teachers = [t.float() for t in ts]

    def loss(s, t0, t1, labels, w, temperature):
        return fastkd.kd_loss(s, [t0, t1], labels, teacher_weights=w, teacher_mode="sum", temperature=temperature,
                              alpha=0.7, backend="triton")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True)
    for temperature in (1.5, 2.5, 3.0):
        got = compiled(s, *teachers, labels, w.float(), temperature)
        want = loss(s, *teachers, labels, w.float(), temperature)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (g_got,), (g_want,) = torch.autograd.grad(got, s), torch.autograd.grad(want, s)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)
    assert counter.frame_count <= 2  # the first temperature specialised, then one dynamic frame


def test_opcheck_of_the_operators():
    s, ts, w, labels, cfg = _operator_args(n=3, v=20, seed=90)
    args = ([ts[0], ts[1].bfloat16()], w, labels, torch.ones(()), *cfg.multi_kernel_settings())
    torch.library.opcheck(torch.ops.fastkd.triton_kd_multi_forward.default, (s,) + args)
    torch.library.opcheck(torch.ops.fastkd.triton_kd_multi_forward_inplace.default, (s.clone(),) + args)
