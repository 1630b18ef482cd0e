"""The logit options (logit_scale, softcap, label_smoothing, z_loss) through
fastkd.distributed.vocab_parallel_kd_loss on gloo ranks: loss and each rank's gradient
slice against the float64 reference on the whole vocabulary."""
import pytest
import torch

import fastkd
from fastkd.distributed import vocab_parallel_kd_loss


ALL = dict(logit_scale=1.5, softcap=3.0, teacher_logit_scale=0.7, teacher_softcap=5.0, label_smoothing=0.1,
           z_loss=1e-3)


def _widths(total, world):
    weights = list(range(1, world + 1))  # uneven slices
    widths = [max(1, total * w // sum(weights)) for w in weights]
    widths[-1] += total - sum(widths)
    return widths


def _check(ctx, backend, dtype, n=9, v=61, vocab_size=None, labels=True, tol=None, **settings):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    lab = torch.randint(0, vocab_size or v, (n,), generator=g) if labels else None
    if lab is not None:
        lab[::4] = -100
    rank, world = ctx.rank, ctx.world
    widths = _widths(v, world)
    start, width = sum(widths[:rank]), widths[rank]
    s_ref = s.clone().requires_grad_(True)
    ref = fastkd.reference.kd_loss(s_ref, t, lab, vocab_size=vocab_size, **settings)
    ref.sum().backward()
    shard = s.to(dtype)[:, start:start + width].clone().requires_grad_(True)
    out = vocab_parallel_kd_loss(shard, t.to(dtype)[:, start:start + width], lab, vocab_size=vocab_size,
                                 backend=backend, group=ctx.group, **settings)
    out.sum().backward()
    tol = tol or (1e-10 if dtype == torch.float64 else 1e-5)
    err_loss = ((out.double() - ref).norm() / ref.norm()).item()
    g_ref = s_ref.grad[:, start:start + width]
    err_grad = ((shard.grad.double() - g_ref).norm() / g_ref.norm().clamp_min(1e-30)).item()
    assert err_loss <= tol and err_grad <= tol, (backend, dtype, settings, err_loss, err_grad)


SETTINGS = {
    "softcap": dict(softcap=2.0, alpha=0.6),
    "teacher_uncapped": dict(softcap=2.0, teacher_softcap=None, divergence="jsd"),
    "smoothing": dict(label_smoothing=0.2, alpha=0.3, divergence="reverse_kl"),
    "z_loss_no_labels": dict(z_loss=1e-2, labels=False, divergence="tvd"),
    "all_fkl": dict(ALL, alpha=0.6),
    "all_jsd_T": dict(ALL, alpha=0.6, divergence="jsd", temperature=2.0),
    "all_padded": dict(ALL, alpha=0.6, vocab_size=50),
}


def _cases(ctx, backend):
    for settings in SETTINGS.values():
        _check(ctx, backend, torch.float64, **settings)
    _check(ctx, backend, torch.float32, **ALL, alpha=0.5)


def _backends():
    from fastkd._dispatch import LOGIT_OPTIONS_BACKENDS
    return sorted(b for b in ("cpu", "torch") if b in LOGIT_OPTIONS_BACKENDS)


@pytest.mark.parametrize("backend", _backends())
def test_vocab_parallel_logit_options(gloo_ranks, backend):
    gloo_ranks.run(_cases, backend, size=2)
