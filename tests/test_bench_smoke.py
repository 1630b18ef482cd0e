"""Smoke tests of the benchmark: tiny CPU runs must produce a JSON with real rows.

They run in a subprocess because conftest.py sets TRITON_INTERPRET=1 for this process,
and because the benchmark is a script: this checks the command line a user types. The
subprocess imports the fastkd this test imported.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import fastkd

from harness import processes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kd.py"


def cpu_kernel_available() -> bool:
    x = torch.zeros(1, 2)
    try:
        fastkd.kd_loss(x, x, backend="cpu")  # an explicit backend that cannot run raises ValueError
    except ValueError:
        return False
    return True


needs_cpu_kernel = pytest.mark.skipif(not cpu_kernel_available(), reason="fastkd._C not available")


def run_bench(out: Path, *options: str):
    """Run bench_kd.py with `options` writing to `out`; its command and its one JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(fastkd.__file__).resolve().parents[1]),
                                         *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(BENCH), *options, "--out", str(out)]
    proc = processes.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.glob("bench_*.json"))
    assert len(files) == 1, proc.stdout
    data = json.loads(files[0].read_text())
    assert data["meta"]["command"].endswith(" ".join(cmd[2:]))
    assert data["meta"]["machine"]["copy_bandwidth_Bps"] > 0
    assert files[0].with_suffix(".md").exists()
    return files[0].name, {r["impl"]: r for r in data["rows"]}, data["meta"]


def check_rows(rows, fastkd_rows):
    for row in rows.values():
        assert "error" not in row, row
        assert row["time_s"] > 0 and all(t > 0 for t in row["times_s"])
        assert row["pct_of_floor"] > 0
    # The fastkd rows compute the same loss and gradient as the eager baseline.
    for name in fastkd_rows:
        assert rows[name]["loss_rel_err"] < 1e-5, rows[name]
        assert rows[name]["grad_rel_err"] < 1e-5, rows[name]
        assert rows[name]["speedup_vs_eager"] > 0


@needs_cpu_kernel
def test_quick_cpu_run_writes_json_with_backend_and_eager_rows(tmp_path):
    name, rows, _ = run_bench(tmp_path, "--quick", "--device", "cpu", "--shapes", "16x1001",
                              "--divergences", "forward_kl", "--backends", "cpu", "--baselines", "eager")
    assert name.startswith("bench_kd_cpu_")
    assert set(rows) == {"eager", "fastkd[cpu]"}, rows
    check_rows(rows, ["fastkd[cpu]"])


@needs_cpu_kernel
def test_quick_fused_linear_cpu_run_with_ce_and_fresh_process_memory(tmp_path):
    name, rows, meta = run_bench(tmp_path, "--quick", "--device", "cpu", "--op", "fused_linear",
                                 "--shapes", "16x32x48x1001", "--divergences", "forward_kl", "--alpha", "0.5",
                                 "--backends", "cpu", "--baselines", "eager", "--isolate-memory")
    assert name.startswith("bench_fused_linear_cpu_")
    assert meta["alpha"] == 0.5 and meta["machine"]["matmul_flops"] > 0
    assert "fresh process" in meta["memory"]
    assert set(rows) == {"eager", "fastkd[cpu]", "logits+fastkd[cpu]"}, rows
    check_rows(rows, ["fastkd[cpu]", "logits+fastkd[cpu]"])
    for row in rows.values():  # measured by the fresh processes
        assert isinstance(row["peak_extra_bytes"], int) and row["peak_extra_bytes"] >= 0, row
