"""csrc/cpu/fast_math.h on its own: compiled with the build's flags into a small driver.

exp_nonpositive is exp_approx without the overflow side (the CPU kernels' softmax sweeps use
it, their arguments being x - max <= 0): it must give exp_approx's bits for every x <= 88,
0 for -inf, and NaN for NaN.
"""
import os
import shutil

import pytest

from fastkd.backends import cpp_build

from harness import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include "fast_math.h"
using namespace fastkd::cpu;
static unsigned bits(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
int main() {
  long checked = 0, differ = 0;
  // Floats in [-100, 88] by their bit patterns, every 61st: [-100, -0] then [0, 88].
  const unsigned ranges[2][2] = {{0x80000000u, 0xC2C80000u}, {0x00000000u, 0x42B00000u}};
  for (const auto& range : ranges) {
    for (unsigned u = range[0]; u <= range[1]; u += 61) {
      float x;
      std::memcpy(&x, &u, 4);
      ++checked;
      if (bits(exp_nonpositive(x)) != bits(exp_approx(x))) ++differ;
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  const bool specials = exp_nonpositive(-inf) == 0.0f && std::isnan(exp_nonpositive(std::nanf(""))) &&
                        exp_nonpositive(0.0f) == 1.0f;
  std::printf("%ld %ld %d\n", checked, differ, specials ? 1 : 0);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_exp_nonpositive_is_exp_approx_below_overflow(tmp_path):
    src = tmp_path / "driver.cpp"
    src.write_text(DRIVER)
    exe = tmp_path / "driver"
    flags = [f for f in cpp_build.cxx_flags() if not f.startswith("-D") and f != "-fopenmp"]
    processes.run(["g++", *flags, "-std=c++20", "-I", os.path.join(ROOT, "csrc", "cpu"), str(src), "-o", str(exe)],
                  check=True, capture_output=True, text=True, timeout=300)
    checked, differ, specials = map(int, processes.run([str(exe)], check=True, capture_output=True,
                                                       text=True, timeout=300).stdout.split())
    assert checked > 30_000_000
    assert differ == 0
    assert specials == 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_tanh_cost_benchmark_builds_and_is_accurate(tmp_path):
    """benchmarks/tanh_cost.cpp (docs/logit_options.md's evidence that the CPU softcap is
    bound by the tanh) compiles against the kernel's header and times what it says: the
    kernel's tanh, as accurate as the softcap tests require (5e-7 relative)."""
    exe = tmp_path / "tanh_cost"
    flags = [f for f in cpp_build.cxx_flags() if not f.startswith("-D")]
    processes.run(["g++", *flags, "-std=c++20", os.path.join(ROOT, "benchmarks", "tanh_cost.cpp"), "-o", str(exe)],
                  check=True, timeout=300)
    out = processes.run([str(exe)], check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["scale", "tanh_approx"], out
    assert float(out.split("error of the student's tanh")[1].split()[0]) < 5e-7, out
