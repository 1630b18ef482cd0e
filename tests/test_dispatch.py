"""The choice of backend (fastkd/_dispatch.py), with stand-in backends where a device is
missing here: which backend `auto` picks per device, and what an explicit name gets."""
import dataclasses

import pytest
import torch

from fastkd import _dispatch
from fastkd.backends import KernelBackend


def _standin(name, device_type, dtypes=(torch.float32,)):
    never = lambda *a, **k: pytest.fail("a stand-in backend ran")  # noqa: E731
    return KernelBackend(name, never, never, never, lambda d: d.type == device_type, dtypes)


@pytest.fixture
def gpu_backends(monkeypatch):
    """A registry as on a CUDA machine: cuda and triton kernels both loadable."""
    _dispatch._register_all()
    registry = dict(_dispatch._BACKENDS)
    registry["cuda"] = _standin("cuda", "cuda")
    registry["triton"] = _standin("triton", "cuda")
    monkeypatch.setattr(_dispatch, "_BACKENDS", registry)
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    return registry


def test_auto_on_cuda_picks_triton_until_the_cuda_kernels_pass_on_a_gpu(gpu_backends):
    cuda = torch.device("cuda")
    assert _dispatch.resolve_backend("auto", cuda) == "triton"
    assert _dispatch.resolve_backend("cuda", cuda) == "cuda"  # by name, the CUDA kernels run
    del gpu_backends["triton"]
    assert _dispatch.resolve_backend("auto", cuda) == "torch"


def test_dtype_a_backend_lacks_is_refused_naming_those_that_have_it(gpu_backends):
    with pytest.raises(TypeError, match=r"float64 logits are supported by 'torch'.*, not 'cuda'"):
        _dispatch.backend_for("cuda", torch.device("cuda"), torch.float64)
    assert _dispatch.backend_for("cuda", torch.device("cuda"), torch.float32).name == "cuda"


def test_explicit_backend_on_the_wrong_device_is_an_error(gpu_backends):
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu tensors"):
        _dispatch.resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend("gpu", torch.device("cpu"))


def test_every_backend_fills_the_contract():
    _dispatch._register_all()
    for backend in _dispatch._BACKENDS.values():
        for field in dataclasses.fields(KernelBackend):
            # Optional: the torch backend's autograd graphs, the sparse kernels (a backend
            # without them is skipped by auto for sparse_kd_loss) and several teachers (the
            # backends of MULTI_TEACHER_BACKENDS only).
            # The per-token diagnostics: the backends of STATS_BACKENDS.
            if field.name not in ("differentiable_loss", "differentiable_sparse_loss", "sparse_forward",
                                  "sparse_forward_inplace", "multi_forward", "multi_forward_inplace",
                                  "differentiable_multi_loss", "forward_stats", "forward_stats_inplace",
                                  "sparse_forward_stats", "sparse_forward_stats_inplace"):
                assert getattr(backend, field.name) is not None, (backend.name, field.name)
        assert (backend.sparse_forward is None) == (backend.sparse_forward_inplace is None), backend.name
        if backend.name in _dispatch.MULTI_TEACHER_BACKENDS:
            assert backend.multi_forward is not None and backend.multi_forward_inplace is not None, backend.name
        if backend.name in _dispatch.STATS_BACKENDS:
            assert backend.forward_stats is not None and backend.forward_stats_inplace is not None, backend.name
            if backend.sparse_forward is not None:
                assert backend.sparse_forward_stats is not None, backend.name
                assert backend.sparse_forward_stats_inplace is not None, backend.name
    assert _dispatch.get_backend("torch").differentiable_loss is not None
    assert _dispatch.get_backend("torch").differentiable_sparse_loss is not None
