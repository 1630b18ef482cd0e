"""vocab_parallel_fused_linear_kd_loss on 2 and 4 CPU ranks (gloo) against the dense loss.

Every rank builds the same full problem (hidden states, both LM heads, labels), keeps its
rows of the heads, and compares the vocab-parallel loss, the hidden-state gradient (full
on every rank) and its rows of the weight and bias gradients with single-process
``fastkd.fused_linear_kd_loss`` on the whole heads. The session's pool of ranks
(harness/ranks.py) runs each case on 4 ranks (the default group) or 2 (a subgroup).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd._dispatch import get_backend
from fastkd.distributed.fused_linear import vocab_parallel_fused_linear_kd_loss

H_S, H_T = 12, 16


def shard_backends():
    """The backends whose per-shard phases exist here; every case runs on each."""
    names = []
    for name in ("torch", "cpu"):
        try:
            if get_backend(name).shard is not None:
                names.append(name)
        except Exception:  # noqa: BLE001 (a backend that cannot load has no phases here)
            pass
    return names


# ---------------------------------------------------------------------------------------
# One problem: the full heads, split by rows.

def problem(n_rows, vocab, dtype, *, lead=None, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    shape = lead or (n_rows,)
    p = dict(hs=randn(*shape, H_S), ws=randn(vocab, H_S, scale=0.5), ht=randn(*shape, H_T),
             wt=randn(vocab, H_T, scale=0.5))
    if bias:
        p["bs"], p["bt"] = randn(vocab, scale=0.3), randn(vocab, scale=0.3)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::3] = -100
    p["labels"] = labels
    return p


def bounds(widths, rank):
    start = sum(widths[:rank])
    return start, start + widths[rank]


def dense(p, **kw):
    """The single-process loss and gradients (hidden, weight, bias) on the whole heads."""
    hs = p["hs"].clone().requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    bs = p["bs"].clone().requires_grad_() if "bs" in p else None
    loss = fastkd.fused_linear_kd_loss(hs, ws, p["ht"], p["wt"], p["labels"], student_bias=bs,
                                       teacher_bias=p.get("bt"), **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def sharded(p, widths, rank, group, **kw):
    """This rank's vocab-parallel loss and gradients (hidden: full; weight, bias: its rows)."""
    lo, hi = bounds(widths, rank)
    hs = p["hs"].clone().requires_grad_()
    ws = p["ws"][lo:hi].clone().requires_grad_()
    bs = p["bs"][lo:hi].clone().requires_grad_() if "bs" in p else None
    bt = p["bt"][lo:hi] if "bt" in p else None
    loss = vocab_parallel_fused_linear_kd_loss(hs, ws, p["ht"], p["wt"][lo:hi], p["labels"], student_bias=bs,
                                               teacher_bias=bt, group=group, **kw)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def compare(p, widths, rank, group, tol, dense_kw=None, **kw):
    lo, hi = bounds(widths, rank)
    want_loss, want_h, want_w, want_b = dense(p, **(dense_kw or kw_without_parallel(kw)))
    loss, gh, gw, gb = sharded(p, widths, rank, group, **kw)
    torch.testing.assert_close(loss, want_loss, **tol, msg=lambda m: f"loss: {m}")
    torch.testing.assert_close(gh, want_h, **tol, msg=lambda m: f"hidden grad: {m}")
    torch.testing.assert_close(gw, want_w[lo:hi], **tol, msg=lambda m: f"weight grad rows {lo}:{hi}: {m}")
    if want_b is not None:
        torch.testing.assert_close(gb, want_b[lo:hi], **tol, msg=lambda m: f"bias grad: {m}")


def kw_without_parallel(kw):
    return {k: v for k, v in kw.items() if k not in ("vocab_start",)}


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


# ---------------------------------------------------------------------------------------
# The cases: ``case_<name>(ctx, backend)``, ctx a harness.ranks.RankContext.

class Counting:
    """Counts the collectives of torch.distributed called inside the block."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "all_to_all",
             "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast_object_list")

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self.saved[name] = original

            def counting(*args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(*args, **kwargs)
            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


DIVERGENCES = [dict(divergence="forward_kl"), dict(divergence="reverse_kl"),
               dict(divergence="jsd", beta=0.3), dict(divergence="tvd")]


def case_divergences_4_ranks_uneven(ctx, backend):
    for dtype in (torch.float64, torch.float32):
        p = problem(23, 37, dtype, bias=True)
        for div in DIVERGENCES:
            compare(p, [5, 12, 9, 11], ctx.rank, None, TOL[dtype], temperature=2.0, alpha=0.6,
                    backend=backend, **div)


def case_divergences_2_ranks(ctx, backend):
    """Run on 2 ranks (a subgroup of the pool): the group's ranks are not the global ones."""
    p = problem(17, 30, torch.float64)
    for div in DIVERGENCES:
        compare(p, [13, 17], ctx.rank, ctx.group, TOL[torch.float64], temperature=1.5, alpha=0.8,
                backend=backend, **div)


def case_batch_dims_and_chunks(ctx, backend):
    p = problem(0, 29, torch.float64, lead=(3, 7))
    for chunk_size in (4, 5, "auto"):
        compare(p, [7, 8, 6, 8], ctx.rank, None, TOL[torch.float64], divergence="jsd", beta=0.5, alpha=0.5,
                chunk_size=chunk_size, backend=backend)


def case_padded_vocab(ctx, backend):
    # 40 rows of which 29 count: rank 2 holds 29..30 partly, rank 3 (31..39) none at all.
    p = problem(19, 40, torch.float64, bias=True)
    p["labels"] = torch.where(p["labels"] < 0, p["labels"], p["labels"] % 29)  # valid labels below vocab_size
    for div in DIVERGENCES:
        compare(p, [10, 10, 11, 9], ctx.rank, None, TOL[torch.float64], vocab_size=29, alpha=0.7,
                backend=backend, **div)


def case_reductions_and_num_items(ctx, backend):
    p = problem(13, 26, torch.float64)
    for kw in (dict(reduction="sum"), dict(reduction="batchmean"), dict(reduction="none"),
               dict(num_items=40), dict(num_items=torch.tensor(17.0))):
        compare(p, [6, 7, 6, 7], ctx.rank, None, TOL[torch.float64], divergence="reverse_kl", alpha=0.5,
                temperature=3.0, backend=backend, **kw)


def case_no_labels(ctx, backend):
    p = problem(11, 24, torch.float64)
    p["labels"] = None
    for div in DIVERGENCES:
        compare(p, [6, 6, 6, 6], ctx.rank, None, TOL[torch.float64], backend=backend, **div)


def case_vocab_start_given(ctx, backend):
    p = problem(9, 21, torch.float64)
    widths = [4, 6, 5, 6]
    start = bounds(widths, ctx.rank)[0]
    compare(p, widths, ctx.rank, None, TOL[torch.float64], dense_kw=dict(divergence="tvd", alpha=0.5),
            divergence="tvd", alpha=0.5, vocab_start=start, backend=backend)


def case_collectives_per_call(ctx, backend):
    """Handshake + 2 (KL) or 3 (JSD, TVD) per chunk + the hidden gradient's all-reduce;
    a regression to an all-gather of the logits would add collectives and fail here."""
    p = problem(12, 20, torch.float32)
    widths = [5, 5, 5, 5]
    for div, rounds in (("forward_kl", 2), ("reverse_kl", 3), ("jsd", 3), ("tvd", 3)):
        for chunk_size, chunks in ((12, 1), (5, 3)):
            for start, hidden_grad, handshake in ((None, True, 1), (bounds(widths, ctx.rank)[0], False, 0)):
                lo, hi = bounds(widths, ctx.rank)
                hs = p["hs"].clone().requires_grad_(hidden_grad)
                ws = p["ws"][lo:hi].clone().requires_grad_()
                with Counting() as c:
                    loss = vocab_parallel_fused_linear_kd_loss(
                        hs, ws, p["ht"], p["wt"][lo:hi], p["labels"], divergence=div, alpha=0.5,
                        chunk_size=chunk_size, vocab_start=start, backend=backend)
                    loss.backward()
                want = ["all_gather"] * handshake + ["all_reduce"] * (rounds * chunks + hidden_grad)
                assert sorted(c.calls) == sorted(want), (div, chunk_size, start, c.calls, want)


def case_bad_input_raises_everywhere(ctx, backend):
    """Input wrong on one rank only: every rank raises the same error, no rank hangs."""
    p = problem(8, 20, torch.float32)
    lo, hi = bounds([5, 5, 5, 5], ctx.rank)

    def call(hs=p["hs"], labels=p["labels"], ht=p["ht"], **kw):
        return vocab_parallel_fused_linear_kd_loss(hs, p["ws"][lo:hi], ht, p["wt"][lo:hi], labels,
                                                   alpha=0.5, backend=backend, **kw)

    # Fewer tokens on rank 1 (its own check passes: its hidden states agree with its labels).
    n = 7 if ctx.rank == 1 else 8
    with pytest.raises(ValueError, match="rows"):
        call(hs=p["hs"][:n], ht=p["ht"][:n], labels=p["labels"][:n])
    # A label past the global vocabulary on rank 3 only (each rank checks its own labels
    # against the global size; the ranks also disagree on the labels).
    labels = p["labels"].clone()
    if ctx.rank == 3:
        labels[1] = 20
    with pytest.raises(ValueError, match="labels"):
        call(labels=labels)
    # A local error on rank 0 (a teacher that requires grad) is raised on every rank.
    ht = p["ht"].clone().requires_grad_(ctx.rank == 0)
    with pytest.raises(ValueError, match="teacher_hidden requires grad"):
        call(ht=ht)
    # A label past the global vocabulary everywhere.
    labels = p["labels"].clone()
    labels[0] = 25
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        call(labels=labels)
    # Heads split differently for the two sides: a local error, raised on every rank.
    with pytest.raises(ValueError, match="same vocabulary rows"):
        vocab_parallel_fused_linear_kd_loss(p["hs"], p["ws"][lo:hi], p["ht"], p["wt"][lo:hi + (ctx.rank == 2)],
                                            p["labels"], alpha=0.5, backend=backend)
    # The process group still works after every error.
    compare(p, [5, 5, 5, 5], ctx.rank, None, TOL[torch.float32], alpha=0.5, backend=backend)


def case_hidden_grad_wanted_on_some_ranks(ctx, backend):
    """student_hidden requiring grad on some ranks only: the ranks that require it would
    all-reduce its gradient in backward and wait there for the others until the group's
    timeout. Every rank raises the same ValueError from the handshake instead."""
    p = problem(8, 20, torch.float32)
    lo, hi = bounds([9, 11], ctx.rank)

    def call(requires_grad, grad_mode=True):
        hs = p["hs"].clone().requires_grad_(requires_grad)
        with torch.set_grad_enabled(grad_mode):
            loss = vocab_parallel_fused_linear_kd_loss(hs, p["ws"][lo:hi].clone().requires_grad_(), p["ht"],
                                                       p["wt"][lo:hi], p["labels"], alpha=0.5, group=ctx.group,
                                                       backend=backend)
            loss.backward()

    message = (r"vocab_parallel_fused_linear_kd_loss: the ranks disagree on whether student_hidden requires "
               r"grad \(with grad mode on\): yes on rank 1, no on rank 0")
    with pytest.raises(ValueError, match=message):
        call(requires_grad=ctx.rank == 1)
    with pytest.raises(ValueError, match=message):  # grad mode counts: off on rank 0
        call(requires_grad=True, grad_mode=ctx.rank == 1)
    # The group still works, and when no rank wants the hidden gradient nothing waits.
    call(requires_grad=False)
    compare(p, [9, 11], ctx.rank, ctx.group, TOL[torch.float32], alpha=0.5, backend=backend)


def case_low_precision_matches_dense(ctx, backend):
    """bf16 heads on the CPU (upcast to fp32 once, as the dense loss does)."""
    p = problem(10, 24, torch.bfloat16)
    lo, hi = bounds([6, 6, 6, 6], ctx.rank)
    want = dense(p, divergence="forward_kl", alpha=0.5, temperature=2.0)
    got = sharded(p, [6, 6, 6, 6], ctx.rank, None, divergence="forward_kl", alpha=0.5, temperature=2.0,
                  backend=backend)
    tol = dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    torch.testing.assert_close(got[2], want[2][lo:hi], **tol)
    assert got[1].dtype == got[2].dtype == torch.bfloat16


def case_triton_float32(ctx, backend):
    """The Triton per-shard phases (TRITON_INTERPRET=1 without a GPU; float32 only) in the
    chunk loop, on 2 ranks: divergences with CE and biases on uneven slices, several
    chunks, and a padded vocabulary that counts only part of the second slice, against
    the dense loss. (A slice wholly past vocab_size runs no kernel at all: the padded_vocab
    cases check it. Two ranks cost half the interpreter time of four.)"""
    p = problem(14, 37, torch.float32, bias=True)
    for div in DIVERGENCES:
        compare(p, [14, 23], ctx.rank, ctx.group, TOL[torch.float32],
                dense_kw=dict(temperature=2.0, alpha=0.6, **div), temperature=2.0, alpha=0.6, chunk_size=7,
                backend="triton", **div)
    p = problem(9, 40, torch.float32)
    p["labels"] = torch.where(p["labels"] < 0, p["labels"], p["labels"] % 29)
    compare(p, [20, 20], ctx.rank, ctx.group, TOL[torch.float32],
            dense_kw=dict(vocab_size=29, alpha=0.7, divergence="jsd"), vocab_size=29, alpha=0.7, divergence="jsd",
            backend="triton")


CASES = ("divergences_4_ranks_uneven", "divergences_2_ranks", "batch_dims_and_chunks", "padded_vocab",
         "reductions_and_num_items", "no_labels", "vocab_start_given", "collectives_per_call",
         "bad_input_raises_everywhere", "low_precision_matches_dense")
SIZES = {"divergences_2_ranks": 2}  # the others run on all 4 ranks


def triton_runs_here() -> bool:
    """Triton kernels run on a GPU, or on CPU tensors under TRITON_INTERPRET=1 (which
    conftest sets without a GPU, and the spawned ranks inherit)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def test_triton_shard_phases_in_the_chunk_loop(gloo_ranks):
    if not triton_runs_here():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (and triton)")
    gloo_ranks.run(case_triton_float32, "triton", size=2)


def test_hidden_grad_wanted_on_some_ranks_raises_everywhere(gloo_ranks):
    # Before the handshake compared it, this call hung until the group's timeout: the
    # harness fails it after `timeout` (or GRACE_S after the first rank's failure).
    gloo_ranks.run(case_hidden_grad_wanted_on_some_ranks, "torch", size=2, timeout=60)


def test_shard_phases_exist():
    assert "torch" in shard_backends(), shard_backends()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", CASES)
def test_vocab_parallel_fused_linear(gloo_ranks, backend, name):
    if backend not in shard_backends():
        pytest.skip(f"backend {backend!r} has no vocab-parallel phases in this build")
    gloo_ranks.run(globals()[f"case_{name}"], backend, size=SIZES.get(name))
