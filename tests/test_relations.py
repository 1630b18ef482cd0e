"""Relation distillation (fastkd/relations.py, docs/relations.md).

Every loss is compared with its formula written out plainly here in float64 (loops over
pairs and triples of a tiny batch); gradients with gradcheck; the angle's tiles with the
untiled computation; degenerate batches, bad input and the pooling helper by value.
"""
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastkd import _rkd_angle
from fastkd.relations import (RelationDistillation, pool_hidden_states, rkd_angle_loss, rkd_distance_loss,
                              similarity_preserving_loss)

LOSSES = {"rkd_distance": rkd_distance_loss, "rkd_angle": rkd_angle_loss, "similarity": similarity_preserving_loss}
F64 = torch.float64


# ---------------------------------------------------------------------------------------
# The formulas, written directly (float64, Python loops).

def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def norm(v) -> float:
    return math.sqrt(sum(float(a) * float(a) for a in v))


def direct_distance(s, t, reduction="mean"):
    """Park et al. eq. 3-4 over the pairs i < j; all-zero distances normalise to 0."""
    pairs = list(itertools.combinations(range(s.shape[0]), 2))
    if not pairs:
        return 0.0

    def normalised(e):
        d = [norm(e[i] - e[j]) for i, j in pairs]
        mu = sum(d) / len(d)
        return [x / mu if mu > 0 else 0.0 for x in d]

    terms = [huber(a - b) for a, b in zip(normalised(s), normalised(t))]
    return sum(terms) / max(1, len(terms)) if reduction == "mean" else sum(terms)  # no term: 0


def direct_angle(s, t, reduction="mean"):
    """Park et al. eq. 5-6 over ordered triples of distinct indices; the unit vector of a zero
    difference is 0."""
    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        na, nb = norm(a), norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)

    triples = list(itertools.permutations(range(s.shape[0]), 3))
    terms = [huber(cos(s, *ijk) - cos(t, *ijk)) for ijk in triples]
    return sum(terms) / max(1, len(terms)) if reduction == "mean" else sum(terms)  # no term: 0


def direct_similarity(s, t, reduction="mean"):
    """Tung & Mori eq. 1-4: rows of E Eᵀ normalised to unit L2 norm; a zero row stays 0."""
    b = s.shape[0]

    def gram(e):
        g = [[float(e[i] @ e[j]) for j in range(b)] for i in range(b)]
        out = []
        for row in g:
            n = math.sqrt(sum(x * x for x in row))
            out.append([x / n if n > 0 else 0.0 for x in row])
        return out

    gs, gt = gram(s), gram(t)
    total = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b))
    return total / (b * b) if reduction == "mean" else total


DIRECT = {"rkd_distance": direct_distance, "rkd_angle": direct_angle, "similarity": direct_similarity}


def embeddings(b, d_s=3, d_t=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d_s, generator=g, dtype=F64).to(dtype),
            (2.0 * torch.randn(b, d_t, generator=g, dtype=F64)).to(dtype))


# ---------------------------------------------------------------------------------------
# Values and gradients.

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("b", [2, 3, 5, 8])
def test_matches_direct_formula(kind, b, reduction):
    s, t = embeddings(b, seed=b)
    got = LOSSES[kind](s, t, reduction=reduction)
    assert got.dtype == F64 and got.shape == ()
    assert got.item() == pytest.approx(DIRECT[kind](s, t, reduction), rel=1e-12, abs=1e-14)


def test_angle_covers_both_huber_branches():
    """Angles of a 2-D student against a 2-D teacher differ by more than 1 for some triples,
    so the comparison above exercises Smooth-L1's linear part too."""
    s, t = embeddings(8, d_s=2, d_t=2, seed=3)
    u = torch.nn.functional.normalize
    diffs = []
    for i, j, k in itertools.permutations(range(8), 3):
        cs = float(u(s[i] - s[j], dim=0) @ u(s[k] - s[j], dim=0))
        ct = float(u(t[i] - t[j], dim=0) @ u(t[k] - t[j], dim=0))
        diffs.append(abs(cs - ct))
    assert max(diffs) > 1 and min(diffs) < 1
    assert rkd_angle_loss(s, t).item() == pytest.approx(direct_angle(s, t), rel=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("b", [4, 6])
def test_gradcheck(kind, b, reduction):
    s, t = embeddings(b, seed=10 + b)
    s.requires_grad_(True)
    extra = {"block_size": 2} if kind == "rkd_angle" else {}
    assert torch.autograd.gradcheck(lambda x: LOSSES[kind](x, t, reduction=reduction, **extra), (s,))


def test_gradcheck_angle_row_tiles():
    s, t = embeddings(6, seed=4)
    s.requires_grad_(True)
    gram_t = t - t.mean(0)
    gram_t = gram_t @ gram_t.T

    def loss(x):
        c = x - x.mean(0)
        return _rkd_angle.AngleLoss.apply(c @ c.T, gram_t, 1.0 / 120, 2, 4)

    assert torch.autograd.gradcheck(loss, (s,))


def untiled_angle(s, t):
    """The angle loss as one [B, B, B] autograd expression (the paper's formula, differentiated
    by autograd), the comparison for the tiled, hand-differentiated kernel."""
    def cosines(e):
        diff = e[None, :, :] - e[:, None, :]                  # [j, i] = e_i - e_j
        unit = diff / diff.norm(dim=2, keepdim=True).clamp_min(1e-300)
        return unit @ unit.transpose(1, 2)                    # [j, i, k]
    b = s.shape[0]
    i, j, k = torch.meshgrid(torch.arange(b), torch.arange(b), torch.arange(b), indexing="ij")
    distinct = (i != j) & (j != k) & (i != k)
    x = (cosines(s) - cosines(t))[distinct]
    return torch.nn.functional.smooth_l1_loss(x, torch.zeros_like(x), reduction="mean")


@pytest.mark.parametrize("tile", [(1, 1), (1, 4), (2, 3), (3, 13), (4, 13), (13, 13), (20, 13), (5, 2)])
def test_angle_tiles_equal_untiled(tile):
    s, t = embeddings(13, d_s=4, d_t=6, seed=7)
    s.requires_grad_(True)
    expect = untiled_angle(s, t)
    (expect_grad,) = torch.autograd.grad(expect, s)
    c_s, c_t = s - s.mean(0), t - t.mean(0)
    got = _rkd_angle.AngleLoss.apply(c_s @ c_s.T, c_t @ c_t.T, 1.0 / (13 * 12 * 11), *tile)
    (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("block_size", [1, 2, 5, 7, 13, 100, None])
def test_angle_block_size_is_invisible(block_size):
    s, t = embeddings(13, d_s=4, d_t=6, seed=8)
    s.requires_grad_(True)
    loss = rkd_angle_loss(s, t, block_size=block_size)
    torch.testing.assert_close(loss, untiled_angle(s, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(untiled_angle(s, t), s)[0],
                               rtol=1e-10, atol=1e-14)


def test_automatic_tiles():
    """None picks several anchors with all rows while a plane B^2 fits TILE_ELEMENTS, else one
    anchor and a block of rows; both give the untiled result."""
    assert _rkd_angle.tile_shape(256) == (4, 256)
    assert _rkd_angle.tile_shape(1024) == (1, 256)
    assert _rkd_angle.tile_shape(1000, block_size=3) == (3, 1000)
    assert _rkd_angle.tile_shape(1024, device_type="cuda") == (16, 1024)
    assert _rkd_angle.tile_shape(8192, device_type="cuda") == (1, 2048)


def test_automatic_row_tiles_equal_untiled(monkeypatch):
    monkeypatch.setattr(_rkd_angle, "TILE_ELEMENTS", 40)
    assert _rkd_angle.tile_shape(11) == (1, 3)
    s, t = embeddings(11, seed=9)
    s.requires_grad_(True)
    loss = rkd_angle_loss(s, t)
    torch.testing.assert_close(loss, untiled_angle(s, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(untiled_angle(s, t), s)[0],
                               rtol=1e-10, atol=1e-14)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("block_size,bound", [(2, 2 * 40 * 40), (None, 40 * 40)])
def test_angle_memory_is_one_tile(monkeypatch, block_size, bound):
    """Forward and backward create no tensor larger than max(B^2, one tile): never B^3."""
    monkeypatch.setattr(_rkd_angle, "TILE_ELEMENTS", 200)        # automatic tiles: 1 x 5 x 40
    s, t = embeddings(40, d_s=8, d_t=8, seed=1, dtype=torch.float32)
    s.requires_grad_(True)
    with LargestTensor() as mode:
        rkd_angle_loss(s, t, block_size=block_size).backward()
    assert 40 * 40 <= mode.largest <= bound


# ---------------------------------------------------------------------------------------
# Precision of low-precision inputs.

@pytest.mark.parametrize("kind", LOSSES)
def test_float32_with_a_large_shared_offset(kind):
    """LLM hidden states share a large common component; distances and angles are computed
    after centring, so fp32 still matches float64 (without centring the distances lose ~4 digits)."""
    s, t = embeddings(24, d_s=16, d_t=32, seed=5)
    s32, t32 = (s + 100.0).float(), (t - 300.0).float()
    got = LOSSES[kind](s32, t32)
    expect = LOSSES[kind](s32.double(), t32.double())
    assert got.dtype == torch.float32
    assert abs(got.item() - expect.item()) <= 1e-5 * abs(expect.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", LOSSES)
def test_half_inputs_accumulate_in_float32(kind, dtype):
    s, t = embeddings(16, d_s=8, d_t=12, seed=6, dtype=dtype)
    s.requires_grad_(True)
    got = LOSSES[kind](s, t)
    assert got.dtype == torch.float32
    expect = LOSSES[kind](s.detach().double(), t.double())
    assert abs(got.item() - expect.item()) <= 1e-5 * abs(expect.item())
    got.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad).all()


def test_mixed_dtypes():
    s, t = embeddings(6, seed=2)
    assert rkd_distance_loss(s.float(), t.to(torch.bfloat16)).dtype == torch.float32
    assert rkd_angle_loss(s.float(), t).dtype == F64


# ---------------------------------------------------------------------------------------
# The teacher is a constant.

@pytest.mark.parametrize("kind", LOSSES)
def test_teacher_that_requires_grad_is_refused(kind):
    s, t = embeddings(5)
    with pytest.raises(ValueError, match="teacher requires grad.*torch.no_grad"):
        LOSSES[kind](s, t.requires_grad_(True))


@pytest.mark.parametrize("kind", LOSSES)
def test_only_the_student_gets_a_gradient(kind):
    s, t = embeddings(5)
    weight = torch.eye(5, dtype=F64, requires_grad=True)          # a teacher "model"
    with torch.no_grad():
        teacher = t @ weight
    s.requires_grad_(True)
    LOSSES[kind](s, teacher).backward()
    assert weight.grad is None and s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# Degenerate batches: finite values, finite gradients.

def value_and_grad(fn, s, t):
    s = s.clone().requires_grad_(True)
    loss = fn(s, t)
    loss.backward()
    return loss, s.grad


@pytest.mark.parametrize("kind,b", [(k, b) for k in LOSSES for b in (0, 1)] + [("rkd_angle", 2)])
def test_too_few_samples_give_zero(kind, b):
    s, t = embeddings(b)
    loss, grad = value_and_grad(LOSSES[kind], s, t)
    assert loss.item() == 0.0 and loss.dtype == F64
    assert grad.shape == s.shape and (grad == 0).all()


def test_two_samples_distance_and_similarity_are_defined():
    s, t = embeddings(2)
    assert rkd_distance_loss(s, t).item() == 0.0                   # one pair: both normalise to 1
    assert similarity_preserving_loss(s, t).item() == pytest.approx(direct_similarity(s, t), rel=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_identical_student_embeddings(kind, dtype):
    """All student rows equal: distances and mean 0, unit vectors 0. The value follows the
    conventions of the direct formulas, and the gradient is finite."""
    s, t = embeddings(6, dtype=dtype)
    s = s[:1].expand(6, -1).contiguous()
    loss, grad = value_and_grad(LOSSES[kind], s, t)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(DIRECT[kind](s.double(), t.double()), rel=1e-6)


@pytest.mark.parametrize("kind", LOSSES)
def test_identical_everything_is_zero(kind):
    e = torch.ones(5, 4, dtype=F64)
    loss, grad = value_and_grad(LOSSES[kind], e, e.clone())
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_two_coincident_samples(kind):
    """Rows 1 and 3 of both sides coincide (a duplicated prompt): finite, as the direct formula."""
    s, t = embeddings(6, seed=12)
    s[3], t[3] = s[1], t[1]
    loss, grad = value_and_grad(LOSSES[kind], s, t)
    assert torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(DIRECT[kind](s, t), rel=1e-10)


@pytest.mark.parametrize("kind", LOSSES)
def test_zero_vectors(kind):
    s, t = embeddings(5, seed=13)
    s[2] = 0.0
    t[0] = 0.0
    loss, grad = value_and_grad(LOSSES[kind], s, t)
    assert torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(DIRECT[kind](s, t), rel=1e-10)
    z = torch.zeros(4, 3, dtype=F64)
    loss, grad = value_and_grad(LOSSES[kind], z, z.clone())
    assert loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("kind", LOSSES)
def test_nan_propagates(kind):
    s, t = embeddings(5)
    s[1, 0] = float("nan")
    assert torch.isnan(LOSSES[kind](s, t))


# ---------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("kind", LOSSES)
def test_bad_input(kind):
    fn = LOSSES[kind]
    s, t = embeddings(4)
    with pytest.raises(ValueError, match=r"student must have shape \[B, D\].*\(4, 3, 1\).*pool"):
        fn(s[..., None], t)
    with pytest.raises(ValueError, match=r"teacher must have shape \[B, D\].*\(4,\)"):
        fn(s, t[:, 0])
    with pytest.raises(ValueError, match=r"same batch size B, got shapes \(4, 3\) and \(3, 5\)"):
        fn(s, t[:3])
    with pytest.raises(TypeError, match="student must be a floating tensor"):
        fn(s.long(), t)
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        fn(s, t.tolist())
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(s, t, reduction="none")
    with pytest.raises(ValueError, match="teacher is on meta"):
        fn(s, torch.empty(4, 5, device="meta"))


@pytest.mark.parametrize("block_size,error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_block_size(block_size, error):
    s, t = embeddings(4)
    with pytest.raises(error, match="block_size"):
        rkd_angle_loss(s, t, block_size=block_size)


def test_no_host_sync(no_host_sync):
    s, t = embeddings(7, dtype=torch.float32)
    s.requires_grad_(True)
    for fn in LOSSES.values():
        fn(s, t).backward()
    h = torch.randn(3, 5, 4, requires_grad=True)
    labels = torch.tensor([[1, 1, -100, 2, 3]] * 3)
    RelationDistillation([("rkd_distance", 1.0), ("rkd_angle", 2.0)])(h, torch.randn(3, 5, 6), labels).backward()


# ---------------------------------------------------------------------------------------
# Pooling hidden states.

def hidden_and_masks():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=F64)
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 1, 2, -100, -100], [-100] * 5])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return hidden, labels, attention


def mean_of(hidden, rows_tokens):
    return torch.stack([hidden[r, toks].mean(0) if toks else torch.zeros(hidden.shape[2], dtype=hidden.dtype)
                        for r, toks in enumerate(rows_tokens)])


def test_pool_by_labels():
    hidden, labels, _ = hidden_and_masks()
    torch.testing.assert_close(pool_hidden_states(hidden, labels),
                               mean_of(hidden, [[2, 3, 4], [1, 2], []]), rtol=1e-13, atol=1e-15)


def test_pool_by_attention_mask_and_both():
    hidden, labels, attention = hidden_and_masks()
    torch.testing.assert_close(pool_hidden_states(hidden, attention_mask=attention),
                               mean_of(hidden, [[0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1]]), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pool_hidden_states(hidden, labels, attention.bool()),
                               mean_of(hidden, [[2, 3], [1, 2], []]), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pool_hidden_states(hidden), hidden.mean(1), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(pool_hidden_states(hidden, labels.masked_fill(labels == -100, 5), ignore_index=5),
                               mean_of(hidden, [[2, 3, 4], [1, 2], []]), rtol=1e-13, atol=1e-15)


def test_pool_masked_tokens_do_not_leak():
    """A row without valid tokens is 0, a NaN at a masked token stays out, and masked tokens
    get a zero gradient."""
    hidden, labels, _ = hidden_and_masks()
    hidden[0, 0] = float("nan")
    hidden.requires_grad_(True)
    pooled = pool_hidden_states(hidden, labels)
    assert torch.isfinite(pooled).all() and (pooled[2] == 0).all()
    pooled.sum().backward()
    expect = (labels != -100).to(F64) / (labels != -100).sum(1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(hidden.grad, expect[..., None].expand_as(hidden), rtol=1e-13, atol=1e-15)


def test_pool_half_precision_sums_in_float32():
    hidden = (1000 + torch.arange(512, dtype=torch.float32)).reshape(1, 512, 1).to(torch.bfloat16)
    pooled = pool_hidden_states(hidden)
    assert pooled.dtype == torch.float32
    assert pooled.item() == pytest.approx(hidden.float().mean().item(), rel=1e-6)


def test_pool_bad_input():
    hidden, labels, attention = hidden_and_masks()
    with pytest.raises(ValueError, match=r"hidden must have shape \[B, S, H\]"):
        pool_hidden_states(hidden[0])
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 5\)"):
        pool_hidden_states(hidden, labels[:, :4])
    with pytest.raises(TypeError, match="attention_mask must be an integer or bool tensor"):
        pool_hidden_states(hidden, attention_mask=attention.float())
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        pool_hidden_states(hidden, labels.tolist())


# ---------------------------------------------------------------------------------------
# The module.

def test_module_single_and_weighted_kinds():
    s, t = embeddings(7, seed=21)
    for kind, fn in LOSSES.items():
        torch.testing.assert_close(RelationDistillation(kind)(s, t), fn(s, t), rtol=0, atol=0)
    module = RelationDistillation([("rkd_distance", 25.0), ("rkd_angle", 50.0), ("similarity", 0.5)], block_size=3)
    expect = 25 * direct_distance(s, t) + 50 * direct_angle(s, t) + 0.5 * direct_similarity(s, t)
    assert module(s, t).item() == pytest.approx(expect, rel=1e-12)
    assert "('rkd_angle', 50)" in repr(module) and "block_size=3" in repr(module)


def test_module_pools_hidden_states():
    hidden, labels, _ = hidden_and_masks()
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 5, 6, generator=g, dtype=F64)
    labels = labels.clone()
    labels[2, 4] = 3                                             # every row has a valid token
    student = hidden.clone().requires_grad_(True)
    module = RelationDistillation([("rkd_distance", 1.0), ("rkd_angle", 2.0)])
    loss = module(student, teacher, labels)
    ps, pt = pool_hidden_states(hidden, labels), pool_hidden_states(teacher, labels)
    assert loss.item() == pytest.approx(direct_distance(ps, pt) + 2 * direct_angle(ps, pt), rel=1e-12)
    loss.backward()
    assert (student.grad[labels == -100] == 0).all() and student.grad.abs().sum() > 0
    # A [B, D] teacher with [B, S, H] student hidden states.
    assert module(hidden, pt, labels).item() == pytest.approx(loss.item(), rel=1e-12)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        RelationDistillation("rkd")
    with pytest.raises(TypeError, match=r"kind must be one of .* list of \(kind, weight\) pairs"):
        RelationDistillation([])
    with pytest.raises(TypeError, match=r"kind\[1\] must be a \(kind, weight\) pair"):
        RelationDistillation([("rkd_angle", 1.0), "similarity"])
    with pytest.raises(ValueError, match=r"kind\[0\]\[0\] must be one of"):
        RelationDistillation([("angle", 1.0)])
    with pytest.raises(ValueError, match=r"kind\[0\]\[1\] \(weight\) must be finite"):
        RelationDistillation([("rkd_angle", float("nan"))])
    with pytest.raises(ValueError, match="pooling must be one of"):
        RelationDistillation("similarity", pooling="max")
    with pytest.raises(ValueError, match="block_size"):
        RelationDistillation("rkd_angle", block_size=0)
    s, t = embeddings(4)
    with pytest.raises(ValueError, match=r"labels mask the tokens .*\(ranks 2 and 2\)"):
        RelationDistillation("similarity")(s, t, torch.zeros(4, 3, dtype=torch.long))


def test_angle_pairs_below_fp32_resolution_count_as_coincident():
    """Three fp32 embeddings 1e-5 apart around a norm of ~30: their differences are below what
    the Gram matrix resolves (about 3e-3 relative), so they count as one point, as exact
    duplicates do in float64, instead of giving noise cosines (up to ~1000 without the guard)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 32, generator=g) + 5
    t = torch.randn(16, 48, generator=g)
    exact = s.clone()
    exact[3] = exact[5] = exact[1]
    near = exact.clone()
    near[3] += 1e-5 * torch.randn(32, generator=g)
    near[5] += 1e-5 * torch.randn(32, generator=g)
    near.requires_grad_(True)
    loss = rkd_angle_loss(near, t)
    loss.backward()
    expect = rkd_angle_loss(exact.double(), t.double()).item()
    assert abs(loss.item() - expect) <= 1e-5 * expect
    assert near.grad.abs().max() < 1e-2


def test_angle_under_torch_compile():
    """The hand-differentiated angle Function traced by torch.compile(fullgraph=True) gives the
    eager gradient (whole-batch tiles: an in-place update of dG's diagonal once broke this)."""
    torch._dynamo.reset()
    s, t = embeddings(8, d_s=5, d_t=7, seed=3, dtype=torch.float32)
    s.requires_grad_(True)

    def loss(x):
        return rkd_angle_loss(x, t, block_size=8)

    (expect,) = torch.autograd.grad(loss(s), s)
    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True)(s), s)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
