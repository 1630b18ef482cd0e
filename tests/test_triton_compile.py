"""Every Triton kernel configuration the launcher can pick compiles for sm_90 without spilling.

No GPU needed: .ci/triton_sm90_check.py compiles each configuration class of
``fastkd.backends.triton.config_classes()`` (x dtype-pair class) with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, assembles the PTX with ``ptxas -v`` for sm_90a (triton's
own ptxas with its flags, and the CUDA toolkit's when on PATH) and fails on any spill.
It runs in a subprocess without TRITON_INTERPRET: conftest.py sets that variable for the
CPU-only suite, and under it @triton.jit builds interpreter objects that cannot be compiled.
"""
import os
import sys

import pytest

from harness import processes

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "triton_sm90_check.py")


def _nvidia_backend_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # backend not packaged, or no ptxas bundled
        return False


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_sm90_configs_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = processes.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=780)
    print(proc.stdout)  # the table: pytest -s shows it
    assert proc.returncode == 0, f"sm_90 compile check failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "0 spill or fail to assemble" in proc.stdout
