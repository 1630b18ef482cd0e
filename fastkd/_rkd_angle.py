"""The RKD angle loss of two Gram matrices, in tiles of anchors, fused with its gradient.

Everything is written with the (centred) Gram matrix ``G = C Cᵀ`` of each side, so no
``[B, B, D]`` tensor of differences exists. For anchor ``j`` and points ``i, k``:

    N[j,i,k] = <c_i - c_j, c_k - c_j> = G[i,k] - G[j,i] - G[j,k] + G[j,j]
    sq[j,i]  = |c_i - c_j|^2          = G[i,i] + G[j,j] - 2 G[j,i]
    u[j,i]   = sq[j,i]^(-1/2)           (0 where the pair is coincident, see below)
    cos[j,i,k] = N[j,i,k] u[j,i] u[j,k]      (Park et al. 2019, eq. 5)

    loss = scale * sum over distinct (i, j, k) of huber(cos_s[j,i,k] - cos_t[j,i,k])

with ``huber`` PyTorch's Smooth-L1 at beta = 1. Triples with ``i == j`` or ``k == j`` have
``u[j,j] = 0`` (so cos 0 on both sides, loss 0, gradient 0); those with ``i == k`` are set
to cos 0 on both sides explicitly (there cos is 1 on both sides up to rounding). So the sum
over the whole cube equals the sum over the B(B-1)(B-2) triples of distinct indices.

For one anchor, with ``a = u[j, :]`` and ``p = a * (G[j, :] - G[j,j]/2)``, the cosines are a
scaled Gram matrix plus a rank-2 term, which is how a tile is computed (one product, one
in-place scaling, one batched rank-2 update)::

    cos[j,i,k] = a_i a_k G[i,k] - p_i a_k - a_i p_k

The gradient with respect to ``G_s`` (autograd carries it on to the student through
``G = C Cᵀ``), with ``W = scale * clamp(cos_s - cos_t, -1, 1)`` (zero on the masked triples):

    A[j,i,k]  = W u[j,i] u[j,k]                               (dL/dN)
    dG[i,k]  += sum_j A[j,i,k]
    dG[j,i]  -= sum_k A[j,i,k] + sum_k A[j,k,i]
    dG[j,j]  += sum_{i,k} A[j,i,k]
    gsq[j,i]  = -1/2 u[j,i]^2 (sum_k W cos_s[j,i,k] + sum_k W cos_s[j,k,i])   (dL/dsq)

and at the end ``dG -= 2 gsq`` and ``dG[a,a] += sum_b gsq[a,b] + sum_b gsq[b,a]``. (dL/dsq
follows from du/dsq = -u^3/2 and u[j,i] * dL/du[j,i] = the two sums of W cos_s.)

Tiles: ``cos[j, i, :]`` for ``j`` in a block of ``block_j`` anchors and ``i`` in a block of
``block_i`` rows, so a tile temporary has ``block_j * block_i * B`` elements and about six
exist at a time: memory O(block_j block_i B) beyond the O(B^2) Gram matrices, in forward
and backward alike. The forward pass computes the gradient tile by tile and keeps only
``dG`` ``[B, B]`` for backward (double backward is therefore not supported). The automatic
tile has about ``TILE_ELEMENTS`` elements on a CPU (1 MiB of fp32: elementwise passes then
run from cache, about four times faster than 16 MiB tiles) and ``TILE_ELEMENTS_GPU`` on
other devices (64 MiB of fp32, so each of the ~25 kernel launches of a tile has enough
work; a choice, not yet measured on a GPU).

Coincident pairs: ``sq`` from the Gram matrix carries a rounding error of a few
eps * (G[i,i] + G[j,j]); below that the direction of ``c_i - c_j`` is noise and ``u^2``
would turn it into an arbitrarily large gradient. A pair with
``sq <= COINCIDENT_EPS * eps(dtype) * (G[i,i] + G[j,j])`` is therefore treated as one point:
its unit vector is 0 (cos 0), which is what an exactly coincident pair gets too.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

TILE_ELEMENTS = 1 << 18
TILE_ELEMENTS_GPU = 1 << 24
COINCIDENT_EPS = 64.0


def tile_shape(batch: int, block_size=None, device_type: str = "cpu") -> Tuple[int, int]:
    """``(block_j, block_i)``: anchors and rows per tile.

    A given ``block_size`` is the number of anchors, with all B rows (tiles of
    ``block_size * B^2`` elements); None picks tiles of about ``TILE_ELEMENTS`` (CPU) or
    ``TILE_ELEMENTS_GPU`` (other devices): several anchors with all rows while one anchor's
    plane fits, else one anchor and a block of rows.
    """
    if block_size is not None:
        return block_size, batch
    elements = TILE_ELEMENTS if device_type == "cpu" else TILE_ELEMENTS_GPU
    plane = batch * batch
    if plane <= elements:
        return elements // plane, batch
    return 1, max(1, elements // batch)


def inverse_distances(gram: torch.Tensor) -> torch.Tensor:
    """``u[a,b] = 1/|c_a - c_b|``, 0 on the diagonal and for pairs within rounding of each other."""
    diag = gram.diagonal()
    scale = diag[:, None] + diag[None, :]
    sq = scale - 2 * gram
    # Written so that NaN fails the test and propagates (NaN <= x is False).
    coincident = sq <= (COINCIDENT_EPS * torch.finfo(gram.dtype).eps) * scale
    return torch.where(coincident, 0.0, torch.rsqrt(torch.where(coincident, 1.0, sq)))


class _Anchors:
    """The per-anchor vectors of one side for anchors ``[lo, hi)``: ``a = u[j, :]`` and
    ``p = a * (G[j, :] - G[j, j] / 2)``."""

    def __init__(self, gram: torch.Tensor, u: torch.Tensor, lo: int, hi: int):
        rows = gram[lo:hi]
        self.a = u[lo:hi]
        self.p = self.a * (rows - 0.5 * rows.diagonal(offset=lo)[:, None])
        self.right = torch.stack((-self.a, -self.p), 1)          # [bj, 2, B]

    def cosines(self, gram: torch.Tensor, ilo: int, ihi: int) -> torch.Tensor:
        """``cos[j, i, k]`` for the tile's anchors, rows ``i`` in ``[ilo, ihi)``, all ``k``;
        the ``i == k`` entries set to 0."""
        a_rows = self.a[:, ilo:ihi]
        cos = a_rows[:, :, None] * gram[None, ilo:ihi]
        cos.mul_(self.a[:, None, :])
        cos.baddbmm_(torch.stack((self.p[:, ilo:ihi], a_rows), 2), self.right)
        cos.diagonal(offset=ilo, dim1=1, dim2=2).zero_()
        return cos


def loss_and_grad(gram_s, gram_t, scale: float, block_j: int, block_i: int, want_grad: bool):
    """``(loss, dloss/dG_s or None)`` as in the module docstring, one tile at a time."""
    batch = gram_s.shape[0]
    u_s, u_t = inverse_distances(gram_s), inverse_distances(gram_t)
    # Tile sums are added in float64: thousands of tiles would lose digits in fp32.
    total = torch.zeros((), dtype=torch.float64, device=gram_s.device)
    dgram = torch.zeros_like(gram_s) if want_grad else None
    r = torch.zeros_like(gram_s) if want_grad else None      # u[j,i] dL/du[j,i] / scale
    # dG[j,j] is accumulated apart: an in-place add to the diagonal of a slice of dgram (among
    # the other in-place updates below) gave a wrong gradient under torch.compile of the
    # autograd.Function (torch 2.13, whole-batch tiles; not reduced to a minimal case).
    ddiag = gram_s.new_zeros(batch) if want_grad else None
    for jlo in range(0, batch, block_j):
        jhi = min(jlo + block_j, batch)
        side_s, side_t = _Anchors(gram_s, u_s, jlo, jhi), _Anchors(gram_t, u_t, jlo, jhi)
        for ilo in range(0, batch, block_i):
            ihi = min(ilo + block_i, batch)
            cos_s = side_s.cosines(gram_s, ilo, ihi)
            cos_t = side_t.cosines(gram_t, ilo, ihi)
            total += F.smooth_l1_loss(cos_s, cos_t, reduction="sum", beta=1.0)
            if not want_grad:
                continue
            # W without the scale (applied once at the end), in the teacher's buffer.
            w = torch.sub(cos_s, cos_t, out=cos_t).clamp_(-1.0, 1.0)
            wc = cos_s.mul_(w)
            r[jlo:jhi, ilo:ihi] += wc.sum(2)
            r[jlo:jhi] += wc.sum(1)
            del wc, cos_s
            a = w.mul_(side_s.a[:, ilo:ihi, None]).mul_(side_s.a[:, None, :])    # dL/dN
            dgram[ilo:ihi] += a.sum(0)
            row_sums = a.sum(2)
            dgram[jlo:jhi, ilo:ihi] -= row_sums
            dgram[jlo:jhi] -= a.sum(1)
            ddiag[jlo:jhi] += row_sums.sum(1)
    total = (total * scale).to(gram_s.dtype)
    if not want_grad:
        return total, None
    gsq = -0.5 * u_s * u_s * r
    dgram -= 2 * gsq
    dgram.diagonal().add_(ddiag + gsq.sum(1) + gsq.sum(0))
    return total, dgram.mul_(scale)


class AngleLoss(torch.autograd.Function):
    """``loss(G_s, G_t)`` as in the module docstring; the teacher's ``G_t`` is a constant."""

    @staticmethod
    def forward(ctx, gram_s, gram_t, scale: float, block_j: int, block_i: int):
        loss, dgram = loss_and_grad(gram_s, gram_t, scale, block_j, block_i, ctx.needs_input_grad[0])
        if dgram is not None:
            ctx.save_for_backward(dgram)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (dgram,) = ctx.saved_tensors
        return dgram * grad_output, None, None, None, None
