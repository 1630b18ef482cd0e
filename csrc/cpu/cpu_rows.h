// Row machinery shared by the CPU kernels (kd_cpu.cpp: dense teachers, sparse_cpu.cpp:
// sparse teachers): the chunked online softmax's pieces and the row scheduler.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "fast_math.h"

namespace fastkd {
namespace cpu {

constexpr int64_t kChunk = 1024;  // entries per chunk: both sides' chunk fits in L1

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

inline int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// Moves a running sum-exp from reference max `old_max` to `new_max`.
template <typename Acc>
inline double rescale(double sum, Acc old_max, Acc new_max, Acc factor) {
  return old_max == new_max || sum == 0.0 ? sum : sum * static_cast<double>(exp_approx(factor * (old_max - new_max)));
}

// sum_i exp(x_i - m) over one chunk, storing the terms; all zero when m = -inf (a chunk
// with nothing but -inf so far: exp(-inf - -inf) would be NaN).
template <typename Acc>
inline Acc exp_chunk(const Acc* x, Acc m, int64_t n, Acc* e) {
  Acc z = 0;
  if (m == kNegInf<Acc>) {
    for (int64_t i = 0; i < n; ++i) e[i] = 0;
    return z;
  }
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) {
    const Acc v = exp_approx(x[i] - m);
    e[i] = v;
    z += v;
  }
  return z;
}

// Rows are handed out a few at a time from a shared counter rather than split into one
// fixed block per thread: on a shared VM a thread that loses its core for a while would
// otherwise leave the others idle (or spinning) until its block is done.
template <typename F>
void for_each_row(int64_t n_rows, const F& f) {
  constexpr int64_t kRowsPerGrab = 4;
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), (n_rows + kRowsPerGrab - 1) / kRowsPerGrab);
  if (n_threads <= 1) {
    for (int64_t r = 0; r < n_rows; ++r) f(r);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    for (int64_t r0 = next.fetch_add(kRowsPerGrab); r0 < n_rows; r0 = next.fetch_add(kRowsPerGrab)) {
      const int64_t r1 = std::min(r0 + kRowsPerGrab, n_rows);
      for (int64_t r = r0; r < r1; ++r) f(r);
    }
  });
}

}  // namespace cpu
}  // namespace fastkd
