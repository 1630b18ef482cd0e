"""Which (backend, device) pairs the shared correctness suite runs on.

Without a GPU, Triton kernels run through its interpreter on CPU tensors; the variable
must be set before triton (and so fastkd) is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd._dispatch  # noqa: E402


def backend_devices():
    pairs = []
    for name, device in (("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")):
        kernels = fastkd._dispatch.get_backend(name)
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if kernels is not None and kernels.supports(torch.device(device)):
            pairs.append((name, device))
    return pairs


BACKEND_DEVICES = backend_devices()
