"""The harness's one door into fastkd's internals.

Everything in tests/harness that needs more than fastkd's public API (``fastkd.kd_loss``,
``fastkd.fused_linear_kd_loss``, the Modules, ``fastkd.reference``) goes through this
file, so that moving an internal module means editing this file alone. Today it uses:

* ``fastkd._dispatch.get_backend(name)`` and the returned kernel backend's ``supports(device)``;
* the operator ``torch.ops.fastkd.cuda_kernel_plan`` (which CUDA kernel a call would run);
* ``KDConfig.kernel_settings()``, the settings as the operators take them.

Without a GPU, Triton kernels run through its interpreter on CPU tensors: the variable
must be set before triton (and so any fastkd backend) is imported, which is why conftest.py
imports this module first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_backend(name: str):
    """fastkd's kernel backend ``name``, or None where it cannot be loaded here."""
    from fastkd import _dispatch

    return _dispatch.get_backend(name)


def supports(name: str, device) -> bool:
    """Whether the kernel backend ``name`` loads here and takes tensors on ``device``."""
    kernels = kernel_backend(name)
    return kernels is not None and kernels.supports(torch.device(device))


def cuda_kernel_plan(student, teacher, vocab_size=None, with_row_stats=False, inplace=False) -> str:
    """The CUDA kernel (and its launch) that a call on these logits would run; raises
    what the call would raise for a forced kernel that cannot run."""
    s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    return torch.ops.fastkd.cuda_kernel_plan(s2, t2, with_row_stats, vocab_size or s2.shape[-1], inplace)


def cuda_last_kernel() -> str:
    """The plan of the last CUDA forward kernel launched in this process ('' before any)."""
    return torch.ops.fastkd.cuda_last_kernel()


def kernel_settings(vocab_size: int, **settings):
    """(ints, floats): the loss settings packed as the operators take them."""
    import fastkd

    return fastkd.make_config(**settings).with_vocab_size(vocab_size).kernel_settings()
