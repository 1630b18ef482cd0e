"""CI compiles every CUDA source for sm_90a and sm_80 (compile only: CI has nvcc, no GPU)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_cuda_sources_compile_for_sm90a_and_sm80():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, ".ci", "compile_cuda.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("kd_cluster.cu", "kd_twopass.cu", "kd_scale_grad.cu", "kd_sparse.cu", "kd_multi.cu", "kd_cuda.cpp"):
        assert name in proc.stdout
