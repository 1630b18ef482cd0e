/*
 * What the softcap's two tanh per entry cost the CPU kernel's row_stats loop, alone: the
 * loop that transforms a row of both sides, with fast_math.h's tanh_approx (the kernel's),
 * and with the scale only (no cap). One thread, 512 rows of 32000 entries per side, best
 * of 7. docs/logit_options.md (Cost) has the numbers and what follows from them.
 *
 *   g++ -O3 -fopenmp -march=native -fno-trapping-math -fno-math-errno -mprefer-vector-width=512 \
 *       -std=c++20 benchmarks/tanh_cost.cpp -o /tmp/tanh_cost && OMP_NUM_THREADS=1 /tmp/tanh_cost
 */
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include "../csrc/cpu/fast_math.h"

namespace {

using fastkd::cpu::tanh_approx;

constexpr float kCap = 30.0f;

__attribute__((noinline)) void kernel_tanh(const float* s, const float* t, float* vs, float* vt, long n, float mul) {
#pragma omp simd
  for (long i = 0; i < n; ++i) {
    vs[i] = tanh_approx(mul * s[i]);
    vt[i] = kCap * tanh_approx(mul * t[i]);
  }
}

__attribute__((noinline)) void scale_only(const float* s, const float* t, float* vs, float* vt, long n, float mul) {
#pragma omp simd
  for (long i = 0; i < n; ++i) {
    vs[i] = mul * s[i];
    vt[i] = mul * t[i];
  }
}

}  // namespace

int main() {
  constexpr long kVocab = 32000;
  constexpr int kRows = 512;
  std::vector<float> s(kVocab), t(kVocab), vs(kVocab), vt(kVocab);
  for (long i = 0; i < kVocab; ++i) {  // logits up to +-9 (a cap of 30 keeps them off saturation)
    s[i] = 9.0f * std::sin(i * 0.37f) * std::cos(i * 0.011f);
    t[i] = 9.0f * std::cos(i * 0.91f);
  }
  using Loop = void (*)(const float*, const float*, float*, float*, long, float);
  const auto worst_error = [&](Loop loop) {
    loop(s.data(), t.data(), vs.data(), vt.data(), kVocab, 1.0f / kCap);
    double worst = 0.0;
    for (long i = 0; i < kVocab; ++i) {
      const double want = std::tanh(static_cast<double>(s[i]) / kCap);
      if (want != 0.0) worst = std::max(worst, std::abs((vs[i] - want) / want));
    }
    return worst;
  };
  const auto time = [&](Loop loop, const char* name, bool with_error) {
    double best = 1e30;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < kRows; ++r) loop(s.data(), t.data(), vs.data(), vt.data(), kVocab, 1.0f / kCap);
      best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("%-16s %6.2f ms", name, best);
    if (with_error) std::printf("   worst relative error of the student's tanh %.2g", worst_error(loop));
    std::printf("\n");
  };
  std::printf("%d rows x %ld entries per side, one thread, best of 7\n", kRows, kVocab);
  time(scale_only, "scale only", false);
  time(kernel_tanh, "tanh_approx", true);
  return 0;
}
