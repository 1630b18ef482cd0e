"""examples/tensor_parallel_distill.py under torchrun with 2 CPU ranks (gloo), quick mode.

The example trains the tiny LM's student with its LM heads split by vocabulary over the
two ranks (vocab_parallel_fused_linear_kd_loss) and, on rank 0, the same student on one
process with the dense loss; this test reads both printed curves and compares them.
"""
import os
import re
import sys

from harness.scripts import ROOT
from harness import processes


def test_tensor_parallel_example_matches_one_process():
    # `python -m torch.distributed.run` is the torchrun command, run by this interpreter
    # (a `torchrun` on PATH may belong to another Python).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "tensor_parallel_distill.py"), "--quick"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = processes.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-4000:]}"
    assert "split over 2 rank(s)" in out and "loss: fused_linear" in out, out

    rows = [tuple(map(float, m.groups()[1:])) for m in
            re.finditer(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.e+-]+)\s*$", out, re.M)]
    assert len(rows) >= 10, out
    dense, parallel = [r[0] for r in rows], [r[1] for r in rows]
    # The same curve, step for step (4 decimals printed: equal to the last digit, or 1e-4).
    assert max(abs(a - b) for a, b in zip(dense, parallel)) <= 1.01e-4, out
    # And a curve worth comparing: the student learns (quick mode: 2.29 -> 1.09).
    assert parallel[-1] < parallel[0] - 0.5, out
    m = re.search(r"max \|diff\| over the (\d+) steps: ([\d.e+-]+)", out)
    assert m and int(m.group(1)) == 25 and float(m.group(2)) <= 1e-4, out
    assert "curves match" in out, out
