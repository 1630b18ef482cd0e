"""Smoke test of the benchmark harness: a tiny CPU run must produce a JSON with real rows.

It runs in a subprocess because conftest.py sets TRITON_INTERPRET=1 for this process,
and because the harness is a script: this checks the command line a user types.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastkd.ops

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kd.py"


@pytest.mark.skipif(fastkd.ops.get_backend("cpu") is None, reason="fastkd._C not available")
def test_quick_cpu_run_writes_json_with_backend_and_eager_rows(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(HARNESS), "--quick", "--device", "cpu", "--shapes", "16x1001",
           "--divergences", "forward_kl", "--backends", "cpu", "--baselines", "eager",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    files = list(tmp_path.glob("bench_kd_cpu_*.json"))
    assert len(files) == 1, proc.stdout
    data = json.loads(files[0].read_text())
    assert data["meta"]["command"].endswith(" ".join(cmd[2:]))
    assert data["meta"]["machine"]["copy_bandwidth_Bps"] > 0
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"eager", "fastkd[cpu]"}, rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["time_s"] > 0 and all(t > 0 for t in row["times_s"])
        assert row["pct_of_floor"] > 0
    # The fused kernel computes the same loss and gradient as the eager baseline.
    assert rows["fastkd[cpu]"]["loss_rel_err"] < 1e-5
    assert rows["fastkd[cpu]"]["grad_rel_err"] < 1e-5
    assert rows["fastkd[cpu]"]["speedup_vs_eager"] > 0
    assert list(tmp_path.glob("bench_kd_cpu_*.md"))
