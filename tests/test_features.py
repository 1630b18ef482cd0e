"""Feature distillation (fastkd/features.py) against direct float64 formulas.

The formulas below are written out here, independently of the chunked implementation
(which computes its gradients by hand): per token mse = sum (s - t)^2, cosine =
1 - s.t / (max(|s|, 1e-8) max(|t|, 1e-8)), l1 = sum |s - t|, smooth_l1 = sum of PyTorch's
elementwise smooth L1; normalize standardises both sides over H first. Reference gradients
come from autograd through these formulas.
"""
import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastkd.features import FeatureDistillation, feature_loss

from harness import processes

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("mse", "cosine", "l1", "smooth_l1")


# ---------------------------------------------------------------------------------------
# The reference: direct formulas in float64.

def standardize(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def ref_rows(s, t, kind, normalize=False, beta=1.0):
    s, t = s.double(), t.double()
    if normalize:
        s, t = standardize(s), standardize(t)
    d = s - t
    if kind == "mse":
        return (d * d).sum(-1)
    if kind == "l1":
        return d.abs().sum(-1)
    if kind == "smooth_l1":
        a = d.abs()
        if beta == 0:
            return a.sum(-1)
        return torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta).sum(-1)
    ns = torch.sqrt((s * s).sum(-1)).clamp_min(1e-8)
    nt = torch.sqrt((t * t).sum(-1)).clamp_min(1e-8)
    return 1.0 - (s * t).sum(-1) / (ns * nt)


def ref_reduce(rows, labels, reduction, num_items=None, ignore_index=-100):
    valid = torch.ones(rows.shape, dtype=torch.bool) if labels is None else labels != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / max(1, rows.numel())
    if num_items is not None:
        return rows.sum() / float(num_items)
    return rows.sum() / max(1, int(valid.sum()))


def ref_loss(s, t, labels=None, kind="mse", reduction="mean", num_items=None, normalize=False, beta=1.0):
    return ref_reduce(ref_rows(s, t, kind, normalize, beta), labels, reduction, num_items)


def make_case(lead=(3, 7), width=13, dtype=torch.float64, seed=0, ignored=True, teacher_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    t = (s + 0.7 * torch.randn(*lead, width, generator=g, dtype=torch.float64)) * teacher_scale
    labels = torch.randint(0, 50, lead, generator=g)
    if ignored:
        labels.view(-1)[::4] = -100
    return s.to(dtype).requires_grad_(), t.to(dtype), labels


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grad_of(loss, x, grad_output=None):
    (g,) = torch.autograd.grad(loss, x, grad_output)
    return g


# ---------------------------------------------------------------------------------------
# Values and gradients against the formulas.

@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_value_and_gradient_match_formula_float64(kind, normalize):
    s, t, labels = make_case(teacher_scale=30.0 if normalize else 1.0)
    for chunk_size in (None, 2, 5):
        out = feature_loss(s, t, labels, kind=kind, normalize=normalize, smooth_l1_beta=0.6, chunk_size=chunk_size)
        ref = ref_loss(s, t, labels, kind, normalize=normalize, beta=0.6)
        assert out.dtype == torch.float64
        assert abs(out.item() - ref.item()) <= 1e-12 * abs(ref.item()), (chunk_size, out.item(), ref.item())
        assert rel(grad_of(out, s), grad_of(ref, s)) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_float32_within_float32_rounding(kind):
    s, t, labels = make_case(lead=(4, 33), width=257, dtype=torch.float32, seed=1)
    out = feature_loss(s, t, labels, kind=kind, chunk_size=16)
    ref = ref_loss(s, t, labels, kind)
    assert out.dtype == torch.float32
    assert rel(out, ref) < 1e-5
    g = grad_of(out, s)
    assert g.dtype == torch.float32
    assert rel(g, grad_of(ref, s)) < 1e-5


def test_documented_relation_to_torch_losses():
    """mse is F.mse_loss * H (F.mse_loss also divides by H); likewise l1 and smooth_l1;
    cosine is 1 - F.cosine_similarity, including at a zero vector."""
    s, t, _ = make_case(lead=(6,), width=11)
    H = s.shape[-1]
    torch.testing.assert_close(feature_loss(s, t), F.mse_loss(s, t) * H, rtol=1e-13, atol=0)
    torch.testing.assert_close(feature_loss(s, t, kind="l1"), F.l1_loss(s, t) * H, rtol=1e-13, atol=0)
    torch.testing.assert_close(feature_loss(s, t, kind="smooth_l1", smooth_l1_beta=0.3),
                               F.smooth_l1_loss(s, t, beta=0.3) * H, rtol=1e-13, atol=0)
    s0 = s.detach().clone()
    s0[2] = 0.0
    torch.testing.assert_close(feature_loss(s0, t, kind="cosine", reduction="none"),
                               1 - F.cosine_similarity(s0, t, dim=-1), rtol=1e-13, atol=1e-15)


def test_smooth_l1_beta_zero_is_l1():
    s, t, labels = make_case(seed=3)
    a = feature_loss(s, t, labels, kind="smooth_l1", smooth_l1_beta=0.0)
    b = feature_loss(s, t, labels, kind="l1")
    assert a.item() == pytest.approx(b.item(), rel=1e-14)
    assert torch.equal(grad_of(a, s), grad_of(b, s))


def test_cosine_zero_vectors_are_finite():
    """A zero student (or teacher, or both) vector: value 1, finite gradient (that of the
    clamped formula: -t / (eps |t|) for a zero student), never NaN."""
    s, t, _ = make_case(lead=(4,), width=9)
    s = s.detach().clone()
    t = t.clone()
    s[0] = 0.0
    t[1] = 0.0
    s[2] = 0.0
    t[2] = 0.0
    s.requires_grad_()
    rows = feature_loss(s, t, kind="cosine", reduction="none")
    torch.testing.assert_close(rows[:3], torch.ones(3, dtype=torch.float64))
    g = grad_of(rows.sum(), s)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[0], -t[0] / (1e-8 * t[0].norm()))
    assert torch.equal(g[1], torch.zeros_like(g[1]))  # zero teacher: cos = 0 for every s
    assert torch.equal(g[2], torch.zeros_like(g[2]))
    torch.testing.assert_close(g[3], grad_of(ref_rows(s, t, "cosine")[3], s)[3])


# ---------------------------------------------------------------------------------------
# Masks and reductions.

@pytest.mark.parametrize("reduction,num_items", [
    ("mean", None), ("mean", 17), ("mean", 6.5), ("mean", torch.tensor(9.0)), ("sum", None),
    ("batchmean", None), ("none", None)])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_reductions_and_masks(kind, reduction, num_items):
    s, t, labels = make_case(seed=4)
    out = feature_loss(s, t, labels, kind=kind, reduction=reduction, num_items=num_items, chunk_size=4)
    ref = ref_loss(s, t, labels, kind, reduction, num_items)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = grad_of(out, s, grad_out)
    torch.testing.assert_close(g, grad_of(ref, s, grad_out), rtol=1e-12, atol=1e-14)
    ignored = labels == -100
    assert torch.equal(g[ignored], torch.zeros_like(g[ignored]))
    if reduction == "none":
        assert torch.equal(out[ignored], torch.zeros_like(out[ignored]))


def test_custom_ignore_index_and_no_labels():
    s, t, labels = make_case(seed=5)
    labels = torch.where(labels == -100, 7, labels)
    labels[0, 0] = 7
    out = feature_loss(s, t, labels, ignore_index=7)
    ref = ref_reduce(ref_rows(s, t, "mse"), labels, "mean", ignore_index=7)
    assert out.item() == pytest.approx(ref.item(), rel=1e-13)
    assert feature_loss(s, t).item() == pytest.approx(ref_rows(s, t, "mse").mean().item(), rel=1e-13)


def test_all_ignored_gives_zero_not_nan():
    s, t, labels = make_case(seed=6)
    labels = torch.full_like(labels, -100)
    t = t.clone()
    t[0, 0] = float("nan")  # an ignored token's NaN must not leak into the loss or gradient
    out = feature_loss(s, t, labels, kind="cosine", normalize=True)
    assert out.item() == 0.0
    assert torch.equal(grad_of(out, s), torch.zeros_like(s))


def test_nan_in_a_valid_token_propagates():
    s, t, labels = make_case(seed=6, ignored=False)
    t = t.clone()
    t[1, 2, 3] = float("nan")
    out = feature_loss(s, t, labels)
    assert torch.isnan(out)


def test_chunked_equals_single_chunk():
    s, t, labels = make_case(lead=(5, 9), width=31, dtype=torch.float32, seed=7)
    for kind in KINDS:
        whole = feature_loss(s, t, labels, kind=kind, normalize=True, chunk_size=45)
        g_whole = grad_of(whole, s)
        for chunk_size in (1, 4, 44, None):
            part = feature_loss(s, t, labels, kind=kind, normalize=True, chunk_size=chunk_size)
            # Same per-token arithmetic; only the order of the final sum differs.
            torch.testing.assert_close(part, whole, rtol=1e-6, atol=0)
            torch.testing.assert_close(grad_of(part, s), g_whole, rtol=0, atol=0)


def test_non_contiguous_and_mixed_dtypes():
    s, t, labels = make_case(lead=(6, 4), width=10, seed=8)
    s_nc = s.detach().transpose(0, 1).requires_grad_()  # [4, 6, 10], non-contiguous
    t_nc = t.transpose(0, 1).float()
    out = feature_loss(s_nc, t_nc, labels.t(), chunk_size=5)
    ref = ref_loss(s_nc, t_nc, labels.t())
    assert out.item() == pytest.approx(ref.item(), rel=1e-7)
    g = grad_of(out, s_nc)
    assert g.shape == s_nc.shape and g.dtype == torch.float64
    torch.testing.assert_close(g, grad_of(ref, s_nc), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------
# gradcheck on tiny float64 cases.

@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    s, t, labels = make_case(lead=(2, 3), width=5, seed=10)
    for normalize in (False, True):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda x: feature_loss(x, t, labels, kind=kind, normalize=normalize, reduction=reduction,
                                       smooth_l1_beta=0.5, chunk_size=4), (s,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_projection(reduction):
    from torch.func import functional_call

    g = torch.Generator().manual_seed(11)
    fd = FeatureDistillation({1: 2, -1: 0}, 4, 6, kind="cosine", normalize=True, reduction=reduction,
                             chunk_size=2).double()
    students = tuple(torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    teachers = tuple(torch.randn(2, 3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    w0, w1 = (p.detach().clone().requires_grad_() for p in fd.projections.parameters())

    def f(s1, s2, a, b):
        states = (students[0], s1, s2)
        return functional_call(fd, {"projections.0.weight": a, "projections.1.weight": b},
                               (states, teachers, labels))

    assert torch.autograd.gradcheck(f, (students[1], students[2], w0, w1))


# ---------------------------------------------------------------------------------------
# Teacher constant, projections, the module.

def test_teacher_that_requires_grad_is_an_error():
    s, t, labels = make_case()
    with pytest.raises(ValueError, match="teacher requires grad.*constant"):
        feature_loss(s, t.clone().requires_grad_(), labels)


def hf_outputs(layers, lead, width, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    states = tuple(torch.randn(*lead, width, generator=g, dtype=torch.float64, requires_grad=requires_grad)
                   for _ in range(layers))
    return SimpleNamespace(hidden_states=states)


def test_module_matches_formula_with_projections():
    lead, hs, ht = (2, 5), 6, 9
    student = hf_outputs(4, lead, hs, seed=12, requires_grad=True)  # embeddings + 3 blocks
    teacher = hf_outputs(7, lead, ht, seed=13)                       # embeddings + 6 blocks
    labels = torch.randint(0, 9, lead, generator=torch.Generator().manual_seed(1))
    labels[1, 3:] = -100
    fd = FeatureDistillation({1: 2, 2: 4, -1: -1}, hs, ht, kind="smooth_l1", normalize=True,
                             layer_weights=[0.5, 0.25, 2.0], chunk_size=3).double()
    assert len(fd.projections) == 3
    assert sum(p.numel() for p in fd.parameters()) == 3 * hs * ht
    loss = fd(student.hidden_states, teacher.hidden_states, labels)
    loss.backward()

    weights = [p.detach().clone().requires_grad_() for p in fd.projections.parameters()]
    s_states = [x.detach().clone().requires_grad_() for x in student.hidden_states]
    ref = sum(w * ref_loss(s_states[i] @ W.t(), teacher.hidden_states[j], labels, "smooth_l1", normalize=True)
              for (i, j), w, W in zip([(1, 2), (2, 4), (3, 6)], [0.5, 0.25, 2.0], weights))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for p, w in zip(fd.projections.parameters(), weights):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, w.grad, rtol=1e-11, atol=1e-13)
    for x, y in zip(student.hidden_states, s_states):
        if y.grad is None:
            assert x.grad is None
        else:
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-11, atol=1e-13)
    assert all(x.grad is None for x in teacher.hidden_states)


def test_module_default_weights_same_width_and_reductions():
    lead, h = (3, 4), 8
    student = hf_outputs(3, lead, h, seed=14, requires_grad=True)
    teacher = hf_outputs(5, lead, h, seed=15)
    fd = FeatureDistillation([(0, 0), (2, 4), (2, 3)], h, h, kind="mse")
    assert len(fd.projections) == 0 and not list(fd.parameters())
    S, T = student.hidden_states, teacher.hidden_states
    ref = (ref_loss(S[0], T[0]) + ref_loss(S[2], T[4]) + ref_loss(S[2], T[3])) / 3
    assert fd(S, T).item() == pytest.approx(ref.item(), rel=1e-13)
    rows = FeatureDistillation({2: 4}, h, h, reduction="none", layer_weights=[3.0])(S, T)
    torch.testing.assert_close(rows, 3.0 * ref_rows(S[2], T[4], "mse"))
    fd_items = FeatureDistillation({1: 1}, h, h)
    assert fd_items(S, T, num_items=5).item() == pytest.approx(ref_rows(S[1], T[1], "mse").sum().item() / 5)


def test_projection_modes_and_inits():
    assert len(FeatureDistillation({1: 1}, 8, 8, projection="always").projections) == 1
    assert len(FeatureDistillation({1: 1}, 8, 8, projection="auto").projections) == 0
    eye = FeatureDistillation({1: 1}, 8, 8, projection="always", projection_init="identity")
    assert torch.equal(eye.projections[0].weight, torch.eye(8))
    ortho = FeatureDistillation({1: 1}, 4, 10, projection_init="orthogonal").projections[0].weight
    torch.testing.assert_close(ortho.t() @ ortho, torch.eye(4), atol=1e-5, rtol=0)  # norm-preserving
    xavier = FeatureDistillation({1: 1, 2: 2}, 16, 48).projections
    bound = (6.0 / (16 + 48)) ** 0.5
    for lin in xavier:
        assert lin.weight.shape == (48, 16) and lin.bias is None
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
    assert not torch.equal(xavier[0].weight, xavier[1].weight)


def test_projection_dtype_and_low_precision_student():
    """bf16 hidden states with an fp32 projection (a module not cast): fp32 compute,
    gradients in each tensor's dtype."""
    lead, hs, ht = (4, 16), 24, 40
    g = torch.Generator().manual_seed(16)
    s = torch.randn(*lead, hs, generator=g).bfloat16().requires_grad_()
    t = torch.randn(*lead, ht, generator=g).bfloat16()
    fd = FeatureDistillation({0: 0}, hs, ht, normalize=True)
    loss = fd((s,), (t,))
    loss.backward()
    W = fd.projections[0].weight.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ref = ref_loss(s64 @ W.t(), t, normalize=True)
    ref.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    assert rel(loss, ref) < 1e-5  # the inputs are bf16 values, the arithmetic fp32
    assert rel(s.grad, s64.grad) < 1e-2
    assert rel(fd.projections[0].weight.grad, W.grad) < 1e-5


# ---------------------------------------------------------------------------------------
# Low precision.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_within_tolerance(kind, dtype):
    s, t, labels = make_case(lead=(8, 128), width=96, dtype=dtype, seed=17)
    out = feature_loss(s, t, labels, kind=kind, normalize=kind == "mse")
    ref = ref_loss(s, t, labels, kind, normalize=kind == "mse")
    assert out.dtype == torch.float32
    assert rel(out, ref) < 1e-2
    g = grad_of(out, s)
    assert g.dtype == dtype
    # fp16: the 1/N scale is applied in backward in fp32, so entries of size 2(s-t)/N
    # (~1e-3 here) keep fp16's relative precision.
    assert rel(g, grad_of(ref, s)) < 2e-2


def test_fp16_small_gradients_do_not_flush_to_zero():
    g = torch.Generator().manual_seed(18)
    s = torch.randn(8192, 8, generator=g).half()
    t = (s.float() + 1e-2 * torch.randn(8192, 8, generator=g)).half()
    s.requires_grad_()
    out = feature_loss(s, t)
    grad = grad_of(out, s)
    ref = grad_of(ref_loss(s, t), s)  # entries ~ 2e-2 / 8192 ~ 2e-6: fp16 subnormals if scaled first
    assert rel(grad, ref) < 2e-3


# ---------------------------------------------------------------------------------------
# Backward once (in-place rescaling of the stored gradient).

def test_second_backward_after_rescaling_raises():
    s, t, labels = make_case()
    loss = feature_loss(s, t, labels)
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated again"):
        (2.0 * loss).backward()


def test_second_backward_with_unit_grad_output_is_correct():
    s, t, labels = make_case()
    loss = feature_loss(s, t, labels)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)


# ---------------------------------------------------------------------------------------
# torch.compile.

def _losses(s, t, labels):
    return feature_loss(s, t, labels, kind="smooth_l1", normalize=True, smooth_l1_beta=0.5, num_items=11)


def test_compile_fullgraph_dynamic_without_recompiles():
    """Without a projection the compiled loss is one chunk, so dynamic=True gives one graph
    for every token count (a chunk loop would specialise it on N)."""
    torch._dynamo.reset()
    compiled = torch.compile(_losses, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (5, 7):
            s, t, labels = make_case(lead=(2, n), width=6, dtype=torch.float32, seed=n)
            out = compiled(s, t, labels)
            eager = _losses(s, t, labels)
            torch.testing.assert_close(out, eager)
            torch.testing.assert_close(grad_of(out, s), grad_of(eager, s))
            ref = ref_loss(s, t, labels, "smooth_l1", num_items=11, normalize=True, beta=0.5)
            assert rel(out, ref) < 1e-5


def test_compile_fullgraph_module_with_projection():
    """Traced whole (dynamo + AOTAutograd; the aot_eager backend spares this test inductor's
    code generation, which the test above exercises)."""
    torch._dynamo.reset()
    fd = FeatureDistillation({1: 2, -1: -1}, 6, 8, kind="cosine", normalize=True, chunk_size=4)
    compiled = torch.compile(fd, fullgraph=True, backend="aot_eager")
    S = hf_outputs(3, (2, 5), 6, seed=30, requires_grad=True).hidden_states
    T = hf_outputs(4, (2, 5), 8, seed=31).hidden_states
    labels = torch.tensor([[1, -100, 2, 3, 4], [5, 6, -100, -100, 7]])
    out = compiled(S, T, labels)
    out.backward()
    got = [S[1].grad.clone(), S[2].grad.clone()] + [p.grad.clone() for p in fd.parameters()]
    fd.zero_grad()
    for x in S:
        x.grad = None
    eager = fd(S, T, labels)
    eager.backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(got, [S[1].grad, S[2].grad] + [p.grad for p in fd.parameters()]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Memory: a fresh process, peak resident set above the inputs (benchmarks/harness/memory.py).

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {root!r})
    from benchmarks.harness.memory import peak_extra_bytes
    from fastkd.features import FeatureDistillation, feature_loss
    torch.set_num_threads(1)
    which, N, H, Ht = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, H, generator=g).requires_grad_()
    t = torch.randn(N, Ht, generator=g)
    fd = FeatureDistillation({{0: 0}}, H, Ht)
    def run():
        if which == "feature_loss":
            loss = feature_loss(s, t)
        elif which == "plain":
            loss = ((s - t) ** 2).sum(-1).mean()
        else:
            loss = fd((s,), (t,))
        loss.backward()
    def clear():
        s.grad = None
        fd.zero_grad(set_to_none=True)
    # warm-up on a few rows: thread pools, lazy initialisation
    small = s[:8].detach().requires_grad_()
    feature_loss(small, t[:8, :H]).backward() if Ht == H else fd((small,), (t[:8],)).backward()
    print(json.dumps({{"peak": peak_extra_bytes(run, clear, torch.device("cpu"))}}))
""")


def peak_extra(which, n, h, ht):
    script = MEMORY_SCRIPT.format(root=str(ROOT))
    proc = processes.run([sys.executable, "-c", script, which, str(n), str(h), str(ht)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    if peak is None:
        pytest.skip("the peak resident set cannot be reset here (/proc/self/clear_refs, Linux only)")
    return peak


# [chunk, H] fp32 temporaries (2 MiB each at the CPU's chunk size) that the malloc heap
# keeps after they are freed: measured 4-14 MiB over the gradient for feature_loss and
# 9-21 MiB over the gradients with a projection (first full-size call of a process).
SLACK = 24 << 20


def test_memory_feature_loss_one_gradient_buffer():
    """forward + backward at N=8192, H=4096 fp32: the gradient (128 MiB) and small chunk
    temporaries. Plain autograd, measured the same way, needs several [N, H] tensors,
    which shows the measurement sees torch's allocations."""
    n, h = 8192, 4096
    one = n * h * 4
    ours = peak_extra("feature_loss", n, h, h)
    assert one <= ours <= one + SLACK, ours / one
    plain = peak_extra("plain", n, h, h)
    assert plain >= 2 * one, plain / one


def test_memory_projection_never_materialises_projected_states():
    """Projection 128 -> 2048 at N=16384: the projected [N, 2048] fp32 tensor would be
    128 MiB; the op holds the student's gradient (8 MiB), the weight gradient (1 MiB) and
    chunk temporaries."""
    n, hs, ht = 16384, 128, 2048
    ours = peak_extra("projection", n, hs, ht)
    assert ours <= n * hs * 4 + 2 * ht * hs * 4 + SLACK, ours / 2**20
    assert ours < n * ht * 4 / 4


# ---------------------------------------------------------------------------------------
# Bad input.

def test_feature_loss_errors():
    s, t, labels = make_case()
    with pytest.raises(ValueError, match="width 13 but teacher has width 12"):
        feature_loss(s, t[..., :12], labels)
    with pytest.raises(ValueError, match="same leading \\(token\\) shape"):
        feature_loss(s, t[:, :5], labels)
    with pytest.raises(ValueError, match="labels must have shape \\(3, 7\\)"):
        feature_loss(s, t, labels[:, :5])
    with pytest.raises(TypeError, match="labels must be an int64"):
        feature_loss(s, t, labels.float())
    with pytest.raises(TypeError, match="student must be a torch.Tensor"):
        feature_loss(s.tolist(), t)
    with pytest.raises(TypeError, match="teacher must be a floating tensor"):
        feature_loss(s, t.long())
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_loss(s, t, kind="kl")
    with pytest.raises(ValueError, match="reduction must be one of"):
        feature_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="num_items only applies to reduction='mean'"):
        feature_loss(s, t, reduction="sum", num_items=4)
    with pytest.raises(ValueError, match="num_items must be > 0"):
        feature_loss(s, t, num_items=0)
    with pytest.raises(ValueError, match="chunk_size must be None .* or a positive int"):
        feature_loss(s, t, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        feature_loss(s, t, chunk_size=2.5)
    with pytest.raises(ValueError, match="smooth_l1_beta must be >= 0"):
        feature_loss(s, t, kind="smooth_l1", smooth_l1_beta=-1.0)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        feature_loss(s, t, normalize=1)


def test_module_construction_errors():
    with pytest.raises(ValueError, match="student_hidden_size=6 and teacher_hidden_size=8 differ but projection=None"):
        FeatureDistillation({1: 1}, 6, 8, projection=None)
    with pytest.raises(ValueError, match="student_hidden_size=6 and teacher_hidden_size=8 differ"):
        FeatureDistillation({1: 1}, 6, 8, projection="none")
    with pytest.raises(ValueError, match="projection must be one of"):
        FeatureDistillation({1: 1}, 6, 8, projection="linear")
    with pytest.raises(ValueError, match="'identity' needs equal widths"):
        FeatureDistillation({1: 1}, 6, 8, projection_init="identity")
    with pytest.raises(ValueError, match="projection_init must be one of"):
        FeatureDistillation({1: 1}, 6, 8, projection_init="kaiming")
    with pytest.raises(ValueError, match="at least one"):
        FeatureDistillation({}, 6, 6)
    with pytest.raises(TypeError, match="layer_map must be a dict"):
        FeatureDistillation(3, 6, 6)
    with pytest.raises(ValueError, match="pairs"):
        FeatureDistillation([(1, 2, 3)], 6, 6)
    with pytest.raises(TypeError, match="layer_map indices must be ints"):
        FeatureDistillation({1: 2.0}, 6, 6)
    with pytest.raises(ValueError, match="one entry per layer_map pair \\(2\\)"):
        FeatureDistillation({1: 1, 2: 2}, 6, 6, layer_weights=[1.0])
    with pytest.raises(ValueError, match="layer_weights\\[1\\] must be >= 0"):
        FeatureDistillation({1: 1, 2: 2}, 6, 6, layer_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="student_hidden_size must be a positive int"):
        FeatureDistillation({1: 1}, 0, 6)
    with pytest.raises(ValueError, match="kind must be one of"):
        FeatureDistillation({1: 1}, 6, 6, kind="kl")


def test_module_forward_errors():
    lead = (2, 5)
    S = hf_outputs(3, lead, 6, seed=20, requires_grad=True).hidden_states
    T = hf_outputs(4, lead, 8, seed=21).hidden_states
    fd = FeatureDistillation({1: 3}, 6, 8)
    with pytest.raises(ValueError, match="pair \\(1, 3\\): index 3 is out of range for teacher_hidden_states, "
                                         "which has 3 entries"):
        fd(S, T[:3])
    with pytest.raises(ValueError, match="index -4 is out of range for student_hidden_states, which has 3"):
        FeatureDistillation({-4: 1}, 6, 8)(S, T)
    with pytest.raises(TypeError, match="output_hidden_states=True"):
        fd(None, T)
    with pytest.raises(TypeError, match="tuple or list"):
        fd(S[0], T)
    with pytest.raises(ValueError, match="teacher_hidden_states\\[3\\] has width 8 but teacher_hidden_size=10"):
        FeatureDistillation({1: 3}, 6, 10)(S, T)
    with pytest.raises(ValueError, match="student_hidden_states\\[1\\] and teacher_hidden_states\\[3\\] must have "
                                         "the same leading"):
        fd(S, tuple(x[:, :4] for x in T))
    with pytest.raises(ValueError, match="labels must have shape \\(2, 5\\)"):
        fd(S, T, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="teacher_hidden_states\\[3\\] requires grad"):
        fd(S, T[:3] + (T[3].clone().requires_grad_(),))
    two = FeatureDistillation({1: 3, 2: 2}, 6, 8)
    with pytest.raises(ValueError, match="student_hidden_states\\[2\\] has leading \\(token\\) shape"):
        two((S[0], S[1], S[2][:, :4]), (T[0], T[1], T[2][:, :4], T[3]))
