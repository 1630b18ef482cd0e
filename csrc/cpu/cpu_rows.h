// Row machinery shared by the CPU kernels (kd_cpu.cpp: dense teachers, sparse_cpu.cpp:
// sparse teachers): the chunked online softmax's pieces and the row scheduler.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "../kd_params.h"
#include "fast_math.h"

namespace fastkd {
namespace cpu {

constexpr int64_t kChunk = 1024;  // entries per chunk: both sides' chunk fits in L1

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

inline int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// Asks for `bytes` from p ahead of their use, into L1 (kLocality 3) or L2 (2): the row_stats
// sweeps fetch a row's next chunk while they compute the current chunk's exponentials
// (prefetched_blocks), so that the memory reads overlap the arithmetic. Without it the
// hardware prefetcher, which runs only while the loads run, left each chunk's first loads
// waiting on memory: the load loop was half of the one-teacher row_stats' time (perf, AMD
// EPYC, 512 x 32000 fp32), and with several teachers, whose rows are read one after the
// other per chunk, about as long as all the rest. Measured there (2 threads, T = 2), forward
// + backward: one teacher 14.6 ms -> 12.3 ms in blocks into L1 (14.1 ms in one burst per
// chunk into L2); a two-teacher mixture 21.3 ms into L2, 23.9 ms into L1 (three rows' next
// chunks crowd L1).
template <int kLocality>
FASTKD_INLINE void prefetch(const void* p, int64_t bytes) {
  // Counted in lines, and given plain pointers (NextChunk), not called from a lambda: GCC 12
  // with Python's -fwrapv dropped these prefetches altogether in both of those other forms.
  const char* c = static_cast<const char*>(p);
  const int64_t lines = (bytes + 63) >> 6;
  for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(c + (l << 6), 0, kLocality);
}

// Where a row's next chunk starts, for prefetched_blocks.
struct NextChunk {
  const void* data;
  int64_t elem_bytes;
};

// The row_stats sweeps' exponentials of the chunk [c0, c0 + n) of a row of V entries, in
// blocks of kPrefetchBlock: entries [o, o + m) of each row's next chunk (rows: where it
// starts; nothing past the row's end) are prefetched (prefetch), then body(o, m) computes the
// block's m entries: a few prefetches between stretches of arithmetic, not one burst that
// waits on memory.
constexpr int64_t kPrefetchBlock = 256;

template <int kLocality, size_t R, typename Body>
FASTKD_INLINE void prefetched_blocks(int64_t c0, int64_t n, int64_t V, const NextChunk (&rows)[R], const Body& body) {
  const int64_t next = c0 + n < V ? std::min(kChunk, V - c0 - n) : 0;  // the next chunk's length
  for (int64_t o = 0; o < n; o += kPrefetchBlock) {
    const int64_t m = std::min(kPrefetchBlock, n - o);
    const int64_t ahead = std::max<int64_t>(std::min(m, next - o), 0);
    for (size_t r = 0; r < R; ++r) {
      prefetch<kLocality>(static_cast<const char*>(rows[r].data) + o * rows[r].elem_bytes, ahead * rows[r].elem_bytes);
    }
    body(o, m);
  }
}

// Moves a running sum-exp from reference max `old_max` to `new_max`.
template <typename Acc>
inline double rescale(double sum, Acc old_max, Acc new_max, Acc factor) {
  return old_max == new_max || sum == 0.0 ? sum : sum * static_cast<double>(exp_approx(factor * (old_max - new_max)));
}

// sum_i exp(x_i - m) over one chunk, storing the terms; all zero when m = -inf (a chunk
// with nothing but -inf so far: exp(-inf - -inf) would be NaN). m >= every x_i that is not
// NaN: the running maximum, with the chunk's own in it (exp_nonpositive).
template <typename Acc>
inline Acc exp_chunk(const Acc* x, Acc m, int64_t n, Acc* e) {
  Acc z = 0;
  if (m == kNegInf<Acc>) {
    for (int64_t i = 0; i < n; ++i) e[i] = 0;
    return z;
  }
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < n; ++i) {
    const Acc v = exp_nonpositive(x[i] - m);
    e[i] = v;
    z += v;
  }
  return z;
}

// What return_stats (kd_params.h: kStatsWidth) gathers of one side of a row during the
// row_stats sweep, the sweep that finds the maximum and forms the exponentials:
//   arg    the first column of the row's maximum. A chunk that raises the running maximum
//          (strictly: an equal maximum in a later chunk leaves the earlier column) is searched
//          for the first entry equal to its maximum while it is in L1: nothing is added to the
//          vectorised max loop, and only the chunks that raise the maximum are searched.
//   xlogx  sum_i e_i (x_i - m), e_i = exp(x_i - m), against the running maximum m that the
//          sum-exp Z uses (moved with it), so that -sum p log p = log Z - xlogx / Z: two terms
//          >= 0, no cancellation of lse against sum p x when the logits are large; an entry
//          with e_i = 0 adds 0 (0 log 0 = 0; a -inf logit is no NaN).
template <typename Acc>
struct SideStats {
  int64_t arg = 0;     // an all -inf row has no maximum: column 0, as torch.argmax
  double xlogx = 0.0;

  // The chunk x[0, n) starting at column c0 raised the running maximum from old_max (with
  // sum-exp `sum` against it) to its own maximum new_max.
  void raise(const Acc* x, int64_t c0, int64_t n, double sum, Acc old_max, Acc new_max) {
    if (sum != 0.0) {
      xlogx = (xlogx + (static_cast<double>(old_max) - static_cast<double>(new_max)) * sum) *
              static_cast<double>(exp_approx(old_max - new_max));
    }
    // The lowest i with x_i == new_max, as a vectorised min (no early exit: 1/16 of the
    // scalar search's steps); n <= kChunk fits int32 lanes.
    int32_t first = static_cast<int32_t>(n - 1);
#pragma omp simd reduction(min : first)
    for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) first = std::min(first, x[i] == new_max ? i : first);
    arg = c0 + first;
  }

  // -sum p log p, given the sum-exp Z against the final maximum.
  double entropy(double sum) const { return std::log(sum) - xlogx / sum; }
};

// Where the row_stats sweeps with SideStats store a -inf logit (x_i = max(x_i, kStatsFloor),
// the lowest finite value; nothing else changes): its e_i is 0 as before, and e_i (x_i - m)
// is 0 * finite = 0, not 0 * -inf = NaN, without a clamp in the exp loop, which is bound by
// its vector ALU ops (the max loop that stores x is bound by memory: a max there is free).
// The running maxima are taken before the floor, so a row of -inf keeps its -inf maximum.
// (x_i - m overflows to -inf only for a maximum m above 1e31 in float: NaN entropies there.)
template <typename Acc>
constexpr Acc kStatsFloor = std::numeric_limits<Acc>::lowest();

// exp_chunk that also adds sum_i e_i (x_i - m) to `xlogx` (SideStats); x_i >= kStatsFloor or NaN.
template <typename Acc>
inline Acc exp_chunk(const Acc* x, Acc m, int64_t n, Acc* e, double& xlogx) {
  if (m == kNegInf<Acc>) return exp_chunk(x, m, n, e);
  Acc z = 0, zu = 0;
#pragma omp simd reduction(+ : z, zu)
  for (int64_t i = 0; i < n; ++i) {
    const Acc u = x[i] - m;
    const Acc v = exp_nonpositive(u);
    e[i] = v;
    z += v;
    zu += v * u;
  }
  xlogx += static_cast<double>(zu);
  return z;
}

// Whether the logit options are on (csrc/kd_params.h): the kernels then take their
// options' path, chosen once per call, so the plain path's loops stay those without them.
inline bool has_logit_options(const ExactParams& x) {
  return x.scale_s != 1.0 || x.cap_s > 0.0 || x.scale_t != 1.0 || x.cap_t > 0.0 || x.label_smoothing != 0.0 ||
         x.z_loss != 0.0;
}

// One side's logit transform (csrc/kd_params.h: the logit options) as the row sweeps apply
// it: x' = outer tanh(mul x) with a cap (mul = scale / cap), x' = mul x without (mul = scale).
// The student's sweeps store s'/cap = tanh(scale s / cap) (outer = 1): its chain factor is
// then scale (1 - v^2), exactly 0 where the tanh saturates (a -inf logit becomes -cap); the
// teacher's store t' itself (outer = cap).
template <typename Acc>
struct Transform {
  Acc mul;
  Acc outer;
  bool capped;

  // The student's: v = s' / kappa, kappa = cap with a cap, 1 without.
  static Transform student(const ExactParams& x) {
    const bool capped = x.cap_s > 0.0;
    return Transform{static_cast<Acc>(capped ? x.scale_s * x.inv_cap_s : x.scale_s), Acc(1), capped};
  }
  static Transform teacher(const ExactParams& x) {
    const bool capped = x.cap_t > 0.0;
    return Transform{static_cast<Acc>(capped ? x.scale_t * x.inv_cap_t : x.scale_t), static_cast<Acc>(x.cap_t),
                     capped};
  }
};

// A Transform as an inlined functor of one case, chosen once per chunk (with_transform), so
// the loops that apply it are branch-free.
template <typename Acc>
struct Capped {
  Acc mul, outer;
  FASTKD_INLINE Acc operator()(Acc x) const { return outer * tanh_approx(mul * x); }
};

template <typename Acc>
struct Scaled {
  Acc mul;
  FASTKD_INLINE Acc operator()(Acc x) const { return mul * x; }
};

template <typename Acc, typename F>
FASTKD_INLINE void with_transform(const Transform<Acc>& t, const F& f) {
  if (t.capped) {
    f(Capped<Acc>{t.mul, t.outer});
  } else {
    f(Scaled<Acc>{t.mul});
  }
}

// out[i] = f(x[i]) over one chunk, in the accumulation type.
template <typename Acc, typename T>
FASTKD_INLINE void transform_chunk(const T* __restrict x, int64_t n, const Transform<Acc>& f,
                                   Acc* __restrict out) {
  with_transform(f, [&](const auto g) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g(static_cast<Acc>(x[i]));
  });
}

// The logit options' terms (csrc/kd_params.h, the kernel contract): c_raw = ce_weight + 2
// z_loss lse' and smooth = ce_weight eps / V, both times scale_s and the reduction's scale,
// and with a cap the per-entry chain factor 1 - v_i^2 (v = s'/cap = tanh(scale s / cap)).
// softmax(s')_i is q_i at T = 1 (kRawIsQ; also used when c_raw is 0), else exp(kappa v_i - lse').
template <typename Acc, bool kCapped, bool kRawIsQ>
struct OptionTerms {
  const Acc* v;
  Acc kappa, c_raw, smooth, lse_raw;
  FASTKD_INLINE Acc raw(int64_t i, Acc q) const { return kRawIsQ ? q : exp_nonpositive(kappa * v[i] - lse_raw); }
  FASTKD_INLINE Acc chain(int64_t i) const { return kCapped ? Acc(1) - v[i] * v[i] : Acc(1); }
  FASTKD_INLINE Acc operator()(int64_t i, Acc q, Acc div) const {
    const Acc g = div + c_raw * raw(i, q) - smooth;
    return kCapped ? g * chain(i) : g;
  }
};

// Calls f(terms) with the OptionTerms of a row's case.
template <typename Acc, typename F>
void with_option_terms(const Acc* v, Acc kappa, Acc c_raw, Acc smooth, Acc lse_raw, bool capped, bool raw_is_q,
                       const F& f) {
  if (capped && raw_is_q) f(OptionTerms<Acc, true, true>{v, kappa, c_raw, smooth, lse_raw});
  else if (capped) f(OptionTerms<Acc, true, false>{v, kappa, c_raw, smooth, lse_raw});
  else if (raw_is_q) f(OptionTerms<Acc, false, true>{v, kappa, c_raw, smooth, lse_raw});
  else f(OptionTerms<Acc, false, false>{v, kappa, c_raw, smooth, lse_raw});
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
