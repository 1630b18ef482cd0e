"""Device-aware input makers: logits, labels, layouts, and the inputs of each case type.

Every maker draws from a seeded ``torch.Generator``; where it draws (CPU or GPU) is the
generator's device, so a GPU test draws its 262k-column rows on the GPU.
"""
from __future__ import annotations

import torch

from harness.cases import Case, LinearCase

IGNORE_INDEX = -100
ERROR_VOCAB = 11  # the vocabulary of small_kd_inputs: error cases name it in their messages


def logits(shape, dtype, generator, *, peaked=0.25, draw_dtype=torch.float32) -> torch.Tensor:
    """Logits ~ N(0, 3^2) drawn in ``draw_dtype`` on the generator's device, a fraction
    ``peaked`` of the rows sharply peaked (+15) on one random entry; cast to ``dtype``
    (None: left in ``draw_dtype``)."""
    device = generator.device
    x = torch.randn(shape, generator=generator, dtype=draw_dtype, device=device) * 3.0
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] > 0:
        hot = torch.rand(rows.shape[0], generator=generator, device=device) < peaked
        where = torch.randint(0, shape[-1], (rows.shape[0],), generator=generator, device=device)
        rows[hot, where[hot]] += 15.0
    return x if dtype is None else x.to(dtype)


def logits_in_dtype(n, v, dtype, seed, device="cuda") -> torch.Tensor:
    """N(0, 3^2) logits, every fourth row peaked on entry 7; drawn in ``dtype``, with no
    fp32 temporary (for tensors of 2^31 elements)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, v, device=device, dtype=dtype, generator=g).mul_(3.0)
    x[::4, 7] += 15.0
    return x


def labels(lead, n_cols, generator, ignore_frac, ignore_index=IGNORE_INDEX) -> torch.Tensor:
    """Labels uniform in [0, n_cols), a fraction ``ignore_frac`` set to ``ignore_index``."""
    out = torch.randint(0, n_cols, lead, generator=generator)
    out[torch.rand(lead, generator=generator) < ignore_frac] = ignore_index
    return out


def with_vocab_stride(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """The same values with stride ``stride`` along the vocabulary (kernels need a copy)."""
    buf = x.new_zeros(x.shape[:-1] + (stride * x.shape[-1],))
    buf[..., ::stride] = x
    return buf[..., ::stride]


def in_wider_rows(x: torch.Tensor, before: int = 2, after: int = 3) -> torch.Tensor:
    """The same values as a row-strided slice of a wider buffer (kernels need no copy)."""
    n = x.shape[-1]
    buf = x.new_zeros(x.shape[:-1] + (n + before + after,))
    buf[..., before:before + n] = x
    return buf[..., before:before + n]


def make_inputs(case: Case, device="cpu", seed: int = 0):
    """(student, teacher, labels) for a case; student requires grad."""
    g = torch.Generator().manual_seed(seed)
    V = case.vocab
    Vt = V + case.teacher_pad
    s = logits(case.lead + (V,), None, g, draw_dtype=torch.float64)
    t = logits(case.lead + (Vt,), None, g, draw_dtype=torch.float64)
    n_cols = case.vocab_size or V
    if case.neg_inf is not None and s.numel() > 0:
        masked = torch.rand(n_cols, generator=g) < 0.1
        masked[0] = False  # keep at least one live entry so every row is a distribution
        if case.neg_inf in ("both", "student"):
            s[..., :n_cols][..., masked] = float("-inf")
        if case.neg_inf in ("both", "teacher"):
            t[..., :n_cols][..., masked] = float("-inf")
    lab = None
    if case.labels:
        lab = labels(case.lead, n_cols, g, case.ignore_frac)
        if case.neg_inf in ("both", "student"):
            lab[lab != IGNORE_INDEX] = 0  # column 0 is never masked: finite CE
    if case.nan_row and s.numel() > 0:
        flat = s.reshape(-1, V)
        valid_rows = (lab.reshape(-1) != IGNORE_INDEX).nonzero() if lab is not None else torch.tensor([[0]])
        flat[valid_rows[0, 0], 3] = float("nan")
    tdt = case.teacher_dtype or case.student_dtype
    s = s.to(device=device, dtype=case.student_dtype)
    t = t.to(device=device, dtype=tdt)
    if case.noncontiguous:
        # Same values, other layouts: the student with stride 2 along the vocabulary (the
        # kernels need a copy), the teacher a row-strided slice of a wider buffer (no copy).
        s, t = with_vocab_stride(s), in_wider_rows(t)
    if lab is not None:
        lab = lab.to(device)
    return s.detach().requires_grad_(True), t, lab


def make_linear_inputs(case: LinearCase, seed: int = 0) -> dict:
    """Hidden ~ N(0, 1) and heads scaled so that logits ~ N(0, 3^2), a quarter of the
    tokens sharply peaked (through the bias) on one vocabulary entry."""
    g = torch.Generator().manual_seed(seed)
    vs, vt = case.vocab + case.student_pad, case.vocab + case.teacher_pad

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    hs, ht = draw(*case.lead, case.hs), draw(*case.lead, case.ht)
    ws, wt = draw(vs, case.hs, scale=3 / case.hs ** 0.5), draw(vt, case.ht, scale=3 / case.ht ** 0.5)
    bs = bt = None
    if case.bias:
        bs, bt = draw(vs), draw(vt)
        bt[torch.randint(0, vt, (3,), generator=g)] += 12.0
    lab = labels(case.lead, case.vocab, g, 0.2) if case.labels else None

    def cast(x, grad):
        return None if x is None else x.to(case.dtype).requires_grad_(grad)

    return dict(student_hidden=cast(hs, True), student_weight=cast(ws, True), student_bias=cast(bs, True),
                teacher_hidden=cast(ht, False), teacher_weight=cast(wt, False), teacher_bias=cast(bt, False),
                labels=lab)


def near_converged_bf16(divergence, seed=0, n=48, h=64, v=1001) -> dict:
    """fused_linear_kd_loss inputs: a student close to its teacher, in bf16: the regime
    where rounding the logits to bf16 (the known flaw of a public fused-linear JSD) wrecks
    the gradient, since q - p is then small compared with the rounding error of logits of
    size ~10."""
    g = torch.Generator().manual_seed(seed)
    ht, wt = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 4 / h ** 0.5
    hs = ht + 0.02 * torch.randn(n, h, generator=g)
    ws = wt + 0.02 * torch.randn(v, h, generator=g) / h ** 0.5
    lab = torch.randint(0, v, (n,), generator=g)
    bf = torch.bfloat16
    return dict(student_hidden=hs.to(bf).requires_grad_(True), student_weight=ws.to(bf).requires_grad_(True),
                student_bias=None, teacher_hidden=ht.to(bf), teacher_weight=wt.to(bf), teacher_bias=None,
                labels=lab)


def small_kd_inputs(n=4, v=ERROR_VOCAB, dtype=torch.float32):
    """(student, teacher, labels): a few seeded rows, the good input the error cases break."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, v, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randn(n, v, generator=g, dtype=dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    return s, t, lab


def small_linear_inputs() -> dict:
    """fused_linear_kd_loss's good input for the error cases: [2, 5] tokens, fp32."""
    return make_linear_inputs(LinearCase(dtype=torch.float32, lead=(2, 5)))
