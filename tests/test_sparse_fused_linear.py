"""fused_linear_sparse_kd_loss against the float64 sparse reference on materialised logits,
and its memory: no [tokens, vocab] tensor and no teacher logits at all."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

import fastkd
from fastkd._dispatch import get_backend
from fastkd.fused_linear_sparse import FusedLinearSparseKDLoss, fused_linear_sparse_kd_loss
from fastkd.sparse import sparse_kd_loss

from harness.compare import rel_err
from harness import processes

BACKENDS = ["torch"] + [name for name in ("cpu",) if get_backend(name) is not None and get_backend(name).has("sparse")]


def linear_inputs(n=37, H=16, V=501, K=20, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)])
    ids[0, :5] = -1
    lp = torch.randn(n, K, generator=g, dtype=torch.float64).log_softmax(-1) - 0.2  # P ~ 0.82
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = -100
    cast = lambda x: x.to(dtype).requires_grad_(True)
    return cast(hs), cast(ws), cast(bias), ids, lp.to(dtype), labels


def reference_result(hs, ws, bias, ids, lp, labels, weights, **kw):
    """The sparse reference in float64 on hidden @ weight.T + bias, from the same values."""
    h, w, b = (x.detach().double().requires_grad_(True) for x in (hs, ws, bias))
    out = sparse_kd_loss(h @ w.T + b, ids, lp.double(), labels, backend="torch", **kw)
    grads = torch.autograd.grad((out * weights.double()).sum(), (h, w, b))
    return out.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("tail,divergence", [("bucket", "forward_kl"), ("bucket", "jsd"), ("renorm", "tvd"),
                                             ("none", "forward_kl"), ("bucket", "reverse_kl")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_materialised_logits(backend, tail, divergence, reduction):
    hs, ws, bias, ids, lp, labels = linear_inputs()
    kw = dict(tail=tail, divergence=divergence, alpha=0.7, temperature=1.5, reduction=reduction)
    out = fused_linear_sparse_kd_loss(hs, ws, ids, lp, labels, student_bias=bias, chunk_size=7, backend=backend,
                                      **kw)
    weights = torch.randn(out.shape, dtype=torch.float64) if reduction == "none" else torch.ones(())
    grads = torch.autograd.grad((out * weights).sum(), (hs, ws, bias))
    ref, ref_grads = reference_result(hs, ws, bias, ids, lp, labels, weights, **kw)
    assert rel_err(out.detach(), ref) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-12


def test_fp32_bf16_and_chunking():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        hs, ws, bias, ids, lp, labels = linear_inputs(dtype=dtype)
        results = []
        for chunk in (1, 10, "auto"):
            out = fused_linear_sparse_kd_loss(hs, ws, ids, lp, labels, student_bias=bias, alpha=0.5, chunk_size=chunk)
            results.append((out.detach(), torch.autograd.grad(out, (hs, ws, bias))))
        ref, ref_grads = reference_result(hs, ws, bias, ids, lp, labels, torch.ones(()), alpha=0.5)
        for out, grads in results:
            assert rel_err(out.double(), ref) < tol / 2
            for g, r in zip(grads, ref_grads):
                assert g.dtype == dtype and rel_err(g.double(), r) < tol


def test_vocab_size_module_and_errors():
    hs, ws, bias, ids, lp, labels = linear_inputs(V=501)
    crit = FusedLinearSparseKDLoss("jsd", tail="renorm", vocab_size=480, chunk_size=9)
    ids = ids % 480
    ids = torch.stack([row if len(set(row.tolist())) == len(row) else torch.randperm(480)[:row.numel()]
                       for row in ids])
    labels = labels % 480
    out = crit(hs, ws, ids, lp, labels)
    grads = torch.autograd.grad(out, (hs, ws))
    h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
    ref = sparse_kd_loss(h @ w.T, ids, lp, labels, divergence="jsd", tail="renorm", vocab_size=480, backend="torch")
    ref_grads = torch.autograd.grad(ref, (h, w))
    assert rel_err(out.detach(), ref.detach()) < 1e-12
    assert all(rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))
    assert torch.equal(grads[1][480:], torch.zeros_like(grads[1][480:]))
    assert "tail='renorm'" in repr(crit)
    with pytest.raises(ValueError, match=r"teacher_ids must be in \[0, 480\)"):
        crit(hs, ws, ids + 100, lp, labels)
    with pytest.raises(ValueError, match="student_weight must have shape"):
        fused_linear_sparse_kd_loss(hs, ws[:, :3], ids, lp)
    with pytest.raises(ValueError, match="teacher_ids must have shape"):
        fused_linear_sparse_kd_loss(hs, ws, ids[:3], lp[:3])


PEAK_SCRIPT = textwrap.dedent("""
    import json, torch, fastkd
    from fastkd.fused_linear_sparse import fused_linear_sparse_kd_loss
    torch.manual_seed(0)
    N, H, V, K = 2048, 256, 32000, 64

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    hs = torch.randn(N, H, requires_grad=True)
    ws = (torch.randn(V, H) / 16).requires_grad_(True)
    ids = (torch.arange(K) * 499 + torch.randint(0, 499, (N, 1))) % V   # K distinct ids per token
    lp = torch.randn(N, K).log_softmax(-1) - 0.1
    labels = torch.randint(0, V, (N,))
    fused_linear_sparse_kd_loss(hs[:8], ws, ids[:8], lp[:8], labels[:8]).backward()   # warm up
    hs.grad = ws.grad = None
    with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to the current RSS
        f.write("5")
    base = status("VmRSS")
    loss = fused_linear_sparse_kd_loss(hs, ws, ids, lp, labels, alpha=0.5)
    loss.backward()
    print(json.dumps({"peak_extra": status("VmHWM") - base, "finite": bool(torch.isfinite(loss))}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_below_one_chunk_budget():
    """2048 tokens x 32000 vocab: the logits would be 250 MiB; the op's peak extra memory
    is one chunk of student logits (the 64 MiB CPU budget, no teacher chunk) plus the
    gradients it returns (weight V x H x 4 = 31 MiB, hidden 2 MiB), with 16 MiB of slack."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               MALLOC_MMAP_THRESHOLD_="131072")
    run = processes.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, env=env,
                        timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    logits_bytes = 2048 * 32000 * 4
    assert result["finite"]
    allowed = fastkd.fused_linear.CPU_CHUNK_BUDGET + (32000 + 2048) * 256 * 4 + (16 << 20)
    assert result["peak_extra"] < min(allowed, 0.5 * logits_bytes), \
        f"peak extra {result['peak_extra'] / 2**20:.0f} MiB vs one logits tensor {logits_bytes / 2**20:.0f} MiB"
