/*
 * Fused loss and gradient against several teachers on the CPU: kd_multi_forward[_inplace]
 * (csrc/ops.cpp), K <= kMaxKernelTeachers teachers with weights w [K, N]. The formula is in
 * docs/multi_teacher.md, the truth in fastkd/reference.py (multi_loss_per_row); the
 * one-teacher row kernel this builds on, and its notation, in dense_rows.h.
 *
 * Per row, the K weights first. The active teachers are those of weight != 0 (a NaN weight
 * is active, so it reaches the loss); the others' rows are never read.
 *   one active teacher, in sum mode or of weight exactly 1 in mixture mode (routing)
 *               the one-teacher row (RowKernel) with that teacher's row, its divergence
 *               term times w: the one-teacher kernel bit for bit, one teacher read.
 *   otherwise   k active teachers (0..4, a compile-time k):
 *   row_stats   one sweep of s and the k teacher rows into the row cache: the student's
 *               exponentials as for one teacher, and per teacher the exponentials e_j of
 *               b_j = t'_j/T and the differences d_j = b_j - a (the one-teacher cache, k
 *               times). The next chunk of every row is prefetched while the exponentials
 *               compute (cpu_rows.h: prefetched_blocks).
 *   mixture     m = sum_j w_j p_j, per entry m_i = sum_j w_j e_j,i f_j(c) (f_j(c) =
 *               exp(m_j(c) - lse_j), the chunk factor), and
 *                 log m_i - log q_i = logsumexp_j r_j,i,  r_j,i = d_j,i + log w_j - delta_j
 *               (delta_j = lse_j - lse_s), taken as r_top + log(m / w_top p_top) (the teacher
 *               of the largest r; a division and a log, no exp), and where that product
 *               underflows (every p_j does: teachers peaked elsewhere) its chunk is redone
 *               with the exps of r_j - r_top: never the log of a sum of probabilities,
 *               -inf there (reverse KL and JSD weigh log m by q, which need not be small
 *               there). Built from the differences d_j, as the one-teacher kernel's d. Both
 *               are computed on the fly in the sweeps of the one-teacher phases with (p,
 *               log p - log q) replaced by (m, log m - log q): forward KL's write_grad, the
 *               centred divergences' row_sums (then dense_rows.h's centring and write_grad).
 *               No active teacher (weights that do not sum to 1: the Python layer refuses
 *               them on CPU tensors) is m = 0, as in the reference.
 *   sum         every divergence's gradient is linear in the teachers' terms, so one
 *               combination per entry serves all teachers (W = sum_j w_j):
 *                 forward KL  dD/da = W q - sum_j w_j p_j; D = sum_j w_j sum p_j (d_j - delta_j),
 *                             in the write_grad sweep
 *                 reverse KL  the one-teacher row with d = sum_j w_j d_j, delta = sum_j w_j delta_j
 *                 JSD         h = sum_j w_j h_j (h_j = log q - log M_j, dense_rows.h: JsdTerms),
 *                             D = beta sum_j w_j sum p_j (log p_j - log M_j) + (1 - beta) sum q h
 *                 TVD         h = sum_j w_j sign(q - p_j)/2, D = 1/2 sum_j w_j sum |q - p_j|
 *               JSD and TVD then centre h as the one-teacher kernel does: (1 - beta) q (h -
 *               sum q h), q (h - sum q h). A row with no active teacher has no divergence term.
 *   write_grad  the hard-label terms, the label's entry and the loss as for one teacher
 *               (StudentRows::finish).
 *
 * Each teacher has its own element type (converted on load; the switch is per chunk) and
 * width (only the first vocab_size columns are read). Precision as for one teacher: fp32
 * within a chunk and double across chunks, float64 input in double with libm.
 */
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "../kd_op.h"
#include "cpu_rows.h"
#include "dense_rows.h"
#include "fast_math.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr int kMaxTeachers = kMaxKernelTeachers;

// One teacher's row: where it starts and its element type.
struct TeacherRow {
  const void* data;
  at::ScalarType dtype;
  int64_t elem_bytes;
};

// One teacher of the call: TeacherRow of any row.
struct TeacherRows {
  const char* data;
  int64_t row_bytes;
  at::ScalarType dtype;
  int64_t elem_bytes;

  TeacherRow row(int64_t r) const { return TeacherRow{data + r * row_bytes, dtype, elem_bytes}; }
};

// A teacher's row statistics (the student's are in Stats).
template <typename Acc>
struct TeacherStats {
  Acc max = kNegInf<Acc>;
  double sum = 0.0;
};

// The row cache of one thread for k active teachers: the student's arrays of the
// one-teacher RowCache (a, es, v, ref_s), per teacher its exponentials e, differences
// d = b - a and chunk maxima ref, and one chunk of s' (what the d are taken from).
template <typename Acc>
struct MultiCache {
  Acc* a;
  Acc* es;
  Acc* v;  // the logit options only (else null)
  Acc* ref_s;
  Acc* sv;
  Acc* h;  // the mixture's centred divergences: h (the cache's teacher arrays stay as read)
  Acc* e[kMaxTeachers];
  Acc* d[kMaxTeachers];
  Acc* ref[kMaxTeachers];

  static MultiCache get(int64_t V, int k, bool options) {
    thread_local std::vector<Acc> storage;
    const int64_t nc = num_chunks(V);
    const int64_t slots = std::max(k, 1);  // no active teacher: the mixture's m = 0 still goes in e[0]
    const size_t need = static_cast<size_t>((3 + (options ? 1 : 0) + 2 * slots) * V + (1 + slots) * nc + kChunk);
    if (storage.size() < need) storage.resize(need);
    Acc* next = storage.data();
    const auto take = [&](int64_t n) {
      Acc* p = next;
      next += n;
      return p;
    };
    MultiCache c{};
    c.a = take(V);
    c.es = take(V);
    c.v = options ? take(V) : nullptr;
    c.ref_s = take(nc);
    c.sv = take(kChunk);
    c.h = take(V);
    for (int64_t j = 0; j < slots; ++j) {
      c.e[j] = take(V);
      c.d[j] = take(V);
      c.ref[j] = take(nc);
    }
    return c;
  }

  // The one-teacher cache over the student's arrays and teacher 0's (where the sum mode's
  // combinations go), or with h for et (the mixture's centred divergences).
  RowCache<Acc> view() const { return RowCache<Acc>{a, d[0], es, e[0], ref_s, ref[0], v}; }
  RowCache<Acc> mixture_view() const { return RowCache<Acc>{a, d[0], es, h, ref_s, ref[0], v}; }
};

template <typename Acc>
struct Identity {
  FASTKD_INLINE Acc operator()(Acc x) const { return x; }
};

// One chunk of the student for row_stats: s' into sv, a = s'/T into a (exp_chunk makes it
// the exponentials), with the options s'/kappa into v and sum s' added to sum_sp; returns max a.
template <bool kOptions, typename Acc, typename TS, typename F>
FASTKD_INLINE Acc student_chunk(const TS* __restrict s, int64_t n, const F f, Acc kappa, Acc inv_t,
                                Acc* __restrict sv, Acc* __restrict a, Acc* __restrict v, double& sum_sp) {
  Acc ms = kNegInf<Acc>;
  if constexpr (kOptions) {
    Acc part = 0;
#pragma omp simd reduction(max : ms) reduction(+ : part)
    for (int64_t i = 0; i < n; ++i) {
      const Acc vi = f(static_cast<Acc>(s[i]));
      const Acc x = kappa * vi;
      const Acc y = x * inv_t;
      v[i] = vi;
      sv[i] = x;
      a[i] = y;
      ms = std::max(ms, y);
      part += x;
    }
    sum_sp += static_cast<double>(part);
  } else {
#pragma omp simd reduction(max : ms)
    for (int64_t i = 0; i < n; ++i) {
      const Acc x = static_cast<Acc>(s[i]);
      const Acc y = x * inv_t;
      sv[i] = x;
      a[i] = y;
      ms = std::max(ms, y);
    }
  }
  return ms;
}

// One chunk of one teacher (element type TT) for row_stats: b = t'/T into b, d = (t' - s')/T
// (rounded once, as for one teacher); returns max b.
template <typename Acc, typename TT, typename F>
Acc teacher_chunk_of(const TT* __restrict t, int64_t n, const F f, Acc inv_t, const Acc* __restrict sv,
                     Acc* __restrict b, Acc* __restrict d) {
  Acc mt = kNegInf<Acc>;
#pragma omp simd reduction(max : mt)
  for (int64_t i = 0; i < n; ++i) {
    const Acc tv = f(static_cast<Acc>(t[i]));
    const Acc y = tv * inv_t;
    b[i] = y;
    d[i] = (tv - sv[i]) * inv_t;
    mt = std::max(mt, y);
  }
  return mt;
}

// The same for a TeacherRow: its element type switched on once per chunk.
template <bool kOptions, typename Acc>
Acc teacher_chunk(const TeacherRow& t, int64_t c0, int64_t n, const Transform<Acc>& transform, Acc inv_t,
                  const Acc* sv, Acc* b, Acc* d) {
  Acc mt = kNegInf<Acc>;
  FASTKD_SCALAR_TYPE_SWITCH(t.dtype, TT, "fastkd_multi_teacher", {
    const TT* tc = static_cast<const TT*>(t.data) + c0;
    if constexpr (kOptions) {
      with_transform(transform, [&](const auto f) { mt = teacher_chunk_of(tc, n, f, inv_t, sv, b, d); });
    } else {
      mt = teacher_chunk_of(tc, n, Identity<Acc>{}, inv_t, sv, b, d);
    }
  });
  return mt;
}

// Phase row_stats of K active teachers: one sweep of s and the K teacher rows (read once)
// into the cache; the student's statistics into st (as dense_rows.h: row_stats), each
// teacher's into ts. with_raw: the T = 1 sum-exp differs from sum_s (T != 1) and is wanted.
template <bool kOptions, int K, typename Acc, typename TS>
void multi_row_stats(const TS* s, const TeacherRow* t, int64_t V, const ExactParams& x, bool with_raw,
                     bool keep_a, const MultiCache<Acc>& c, Stats<Acc>& st, TeacherStats<Acc>* ts) {
  const Acc inv_t = static_cast<Acc>(x.inv_temperature);
  const Acc temp = static_cast<Acc>(x.temperature);
  const Transform<Acc> student = Transform<Acc>::student(x), teacher = Transform<Acc>::teacher(x);
  const Acc kappa = student.capped ? static_cast<Acc>(x.cap_s) : Acc(1);  // s' = kappa v
  double sum_sp = 0.0;
  for (int64_t j = 0, c0 = 0; c0 < V; ++j, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    Acc* const ac = c.es + c0;
    Acc cmax_s;
    if constexpr (kOptions) {
      with_transform(student, [&](const auto f) {
        cmax_s = student_chunk<true>(s + c0, n, f, kappa, inv_t, c.sv, ac, c.v + c0, sum_sp);
      });
    } else {
      cmax_s = student_chunk<false>(s + c0, n, Identity<Acc>{}, kappa, inv_t, c.sv, ac, static_cast<Acc*>(nullptr),
                                    sum_sp);
    }
    Acc cmax_t[K > 0 ? K : 1];
    for (int k = 0; k < K; ++k) {
      cmax_t[k] = teacher_chunk<kOptions>(t[k], c0, n, teacher, inv_t, c.sv, c.e[k] + c0, c.d[k] + c0);
    }
    if (keep_a) std::copy(ac, ac + n, c.a + c0);
    if (cmax_s > st.max_s) {
      st.sum_s = rescale(st.sum_s, st.max_s, cmax_s, Acc(1));
      st.sum_raw = rescale(st.sum_raw, st.max_s, cmax_s, temp);
      st.max_s = cmax_s;
    }
    for (int k = 0; k < K; ++k) {
      if (cmax_t[k] > ts[k].max) {
        ts[k].sum = rescale(ts[k].sum, ts[k].max, cmax_t[k], Acc(1));
        ts[k].max = cmax_t[k];
      }
    }
    const Acc ms = st.max_s;
    c.ref_s[j] = ms;
    for (int k = 0; k < K; ++k) c.ref[k][j] = ts[k].max;
    if (with_raw && ms != kNegInf<Acc>) {  // before exp_chunk overwrites a
      Acc zr = 0;
#pragma omp simd reduction(+ : zr)
      for (int64_t i = 0; i < n; ++i) zr += exp_nonpositive(temp * (ac[i] - ms));
      st.sum_raw += static_cast<double>(zr);
    }
    Acc zs = 0, zt[K > 0 ? K : 1] = {};
    NextChunk rows[K + 1];
    rows[0] = {s + c0 + n, sizeof(TS)};
    for (int k = 0; k < K; ++k) {
      rows[k + 1] = {static_cast<const char*>(t[k].data) + (c0 + n) * t[k].elem_bytes, t[k].elem_bytes};
    }
    prefetched_blocks<2>(c0, n, V, rows, [&](int64_t o, int64_t m) {
      zs += exp_chunk(ac + o, ms, m, ac + o);
      for (int k = 0; k < K; ++k) {
        Acc* e = c.e[k] + c0 + o;
        zt[k] += exp_chunk(e, ts[k].max, m, e);
      }
    });
    st.sum_s += static_cast<double>(zs);
    for (int k = 0; k < K; ++k) ts[k].sum += static_cast<double>(zt[k]);
  }
  st.sum_sp = sum_sp;
}

// The mixture of a row (the file's header): its per-row constants, and per entry m and
// log m - log q from the teachers' cached values there (the sweeps below compute it on the
// fly, no pass of its own). log m - log q = logsumexp_j r_j, r_j = d_j + log w_j - delta_j =
// log(w_j p_j / q), two ways:
//   fast  r_top + log(m / P_top), P_top = w_top p_top the largest product (the one of the
//         largest r) and m / P_top in [1, K]: a division and a log, no exp, from the cached
//         products. It needs P_top a normal float: where it is not (every product underflows:
//         teachers peaked elsewhere) the entry is counted as bad and the sweep redoes its
//         chunk safe.
//   safe  r_top + log sum_j exp(r_j - r_top): K - 1 exps and a log (float64: always).
template <int K, typename Acc>
struct Mixture {
  static constexpr int kSlots = K > 0 ? K : 1;
  Acc w[kSlots] = {};
  Acc lse[kSlots] = {};
  Acc shift[kSlots] = {};  // r_j = d_j + shift_j

  Mixture(const Acc* weights, const double* delta, const Acc* lse_t) {
    for (int k = 0; k < K; ++k) {
      w[k] = weights[k];
      lse[k] = lse_t[k];
      shift[k] = static_cast<Acc>(std::log(static_cast<double>(weights[k])) - delta[k]);
    }
  }

  // w_j f_j(c): chunk c's exponentials to w_j p_j.
  void factors(const MultiCache<Acc>& c, int64_t chunk, Acc (&wf)[kSlots]) const {
    for (int k = 0; k < K; ++k) wf[k] = w[k] * exp_approx(c.ref[k][chunk] - lse[k]);
  }

  // m = sum_j w_j p_j (no teacher: 0), the products into wp.
  static FASTKD_INLINE Acc products(const Acc (&wf)[kSlots], Acc e0, Acc e1, Acc e2, Acc e3, Acc (&wp)[kSlots]) {
    if constexpr (K == 0) return Acc(0);
    wp[0] = wf[0] * e0;
    if constexpr (K > 1) wp[1] = wf[1] * e1;
    if constexpr (K > 2) wp[2] = wf[2] * e2;
    if constexpr (K > 3) wp[3] = wf[3] * e3;
    Acc m = wp[0];
    for (int k = 1; k < K; ++k) m += wp[k];
    return m;
  }

  // log m - log q (no teacher: -inf); `bad`: the fast form does not hold here.
  template <bool kSafe>
  static FASTKD_INLINE Acc log_ratio(const Acc (&shift)[kSlots], Acc d0, Acc d1, Acc d2, Acc d3,
                                     const Acc (&wp)[kSlots], Acc m, bool& bad) {
    bad = false;
    if constexpr (K == 0) {
      return kNegInf<Acc>;
    } else if constexpr (K == 1) {
      return d0 + shift[0];
    } else {
      Acc r[K];
      r[0] = d0 + shift[0];
      r[1] = d1 + shift[1];
      if constexpr (K > 2) r[2] = d2 + shift[2];
      if constexpr (K > 3) r[3] = d3 + shift[3];
      Acc top = r[0], p_top = wp[0];
      for (int k = 1; k < K; ++k) {
        const bool higher = r[k] > top;
        top = higher ? r[k] : top;
        p_top = higher ? wp[k] : p_top;
      }
      Acc l;
      if constexpr (kSafe || std::is_same<Acc, double>::value) {
        Acc sum = 0;
        for (int k = 0; k < K; ++k) sum += exp_nonpositive(r[k] - top);
        l = log_1_to_4(sum);
      } else {
        if constexpr (K == 2) {
          l = log_1_to_2(m / p_top);  // [1, 2] (to rounding): one select fewer
        } else {
          l = log_1_to_4(m / p_top);
        }
        bad = !(p_top >= std::numeric_limits<Acc>::min()) && p_top == p_top;  // underflow, not NaN
      }
      // An infinite top is the result: +inf where q = 0 and some p > 0, -inf where every p = 0.
      const bool infinite = top == std::numeric_limits<Acc>::infinity() || top == kNegInf<Acc>;
      bad = bad && !infinite;
      return infinite ? top : top + l;
    }
  }
};

// Teacher j's cache arrays (j >= K: null, never read: the `K > j ?` guards fold away).
#define FASTKD_TEACHER_ARRAYS(c)                                   \
  const Acc* __restrict e1 = K > 1 ? (c).e[1] : nullptr;           \
  const Acc* __restrict e2 = K > 2 ? (c).e[2] : nullptr;           \
  const Acc* __restrict e3 = K > 3 ? (c).e[3] : nullptr;           \
  const Acc* __restrict d0 = (c).d[0];                             \
  const Acc* __restrict d1 = K > 1 ? (c).d[1] : nullptr;           \
  const Acc* __restrict d2 = K > 2 ? (c).d[2] : nullptr;           \
  const Acc* __restrict d3 = K > 3 ? (c).d[3] : nullptr
#define FASTKD_TEACHER_E(i) (K > 1 ? e1[i] : Acc(0)), (K > 2 ? e2[i] : Acc(0)), (K > 3 ? e3[i] : Acc(0))
#define FASTKD_TEACHER_D(i) d0[i], (K > 1 ? d1[i] : Acc(0)), (K > 2 ? d2[i] : Acc(0)), (K > 3 ? d3[i] : Acc(0))

// Runs sweep(fast) over a chunk, and again sweep(safe) where the fast form did not hold
// somewhere in it (Mixture: bad entries). sweep(kind) returns (value term, bad entries).
template <typename Sweep>
FASTKD_INLINE double fast_or_safe(const Sweep& sweep) {
  const auto fast = sweep(std::false_type{});
  return fast.second == 0 ? static_cast<double>(fast.first) : static_cast<double>(sweep(std::true_type{}).first);
}

// Mixture, forward KL: write_grad with the mixture on the fly, gdiv (q - m) with the
// hard-label terms into g, and D = sum m (log m - log q) (0 log 0 = 0: an m = 0 entry adds 0).
template <int K, typename Acc, typename TS, typename Terms>
Acc write_grad_forward_kl_mixture(const MultiCache<Acc>& c, int64_t V, const Mixture<K, Acc>& mix, Acc gdiv,
                                  const Terms terms, TS* g) {
  using Mix = Mixture<K, Acc>;
  // terms by value: a reference could alias g, and the reloads would stop vectorisation.
  const Acc* __restrict es = c.es;
  const Acc* __restrict e0 = c.e[0];
  FASTKD_TEACHER_ARRAYS(c);
  Acc shift[Mix::kSlots];
  std::copy(mix.shift, mix.shift + Mix::kSlots, shift);
  double total = 0.0;
  for (int64_t j = 0, c0 = 0; c0 < V; ++j, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[j];
    Acc wf[Mix::kSlots] = {};
    mix.factors(c, j, wf);
    total += fast_or_safe([&](auto safe) {
      Acc part = 0;
      int bad = 0;
#pragma omp simd reduction(+ : part, bad)
      for (int64_t i = c0; i < c0 + n; ++i) {
        const Acc q = es[i] * fs;
        Acc wp[Mix::kSlots];
        const Acc m = Mix::products(wf, K > 0 ? e0[i] : Acc(0), FASTKD_TEACHER_E(i), wp);
        bool bad_here;
        const Acc lr = Mix::template log_ratio<decltype(safe)::value>(shift, FASTKD_TEACHER_D(i), wp, m, bad_here);
        bad += bad_here ? 1 : 0;
        part += m == Acc(0) ? Acc(0) : m * lr;  // == 0, not > 0: NaN must reach D
        g[i] = static_cast<TS>(terms(i, q, gdiv * (q - m)));
      }
      return std::make_pair(part, bad);
    });
  }
  return static_cast<Acc>(total);
}

// Mixture, phase row_sums of the centred divergences: the one-teacher row_sums
// (dense_rows.h) with (p, log p - log q) = (m, log m - log q) computed on the fly: q into es
// and h into c.h (reverse KL h = log q - log m, JSD's JsdTerms, TVD q - m); returns TVD's row
// sums, or JSD's sum m (log m - log M) in v[4]. A chunk redone safe reads its q from es.
template <int K, typename Acc>
RowSums mixture_row_sums(const MultiCache<Acc>& c, int64_t V, const Mixture<K, Acc>& mix, Divergence divergence,
                         const ExactParams& x) {
  using Mix = Mixture<K, Acc>;
  Acc* __restrict w = c.es;
  Acc* __restrict h = c.h;
  const Acc* __restrict e0 = c.e[0];
  FASTKD_TEACHER_ARRAYS(c);
  Acc shift[Mix::kSlots];
  std::copy(mix.shift, mix.shift + Mix::kSlots, shift);
  const JsdTerms<Acc> jsd(x);
  double total = 0.0;
  RowSums sums;
  for (int64_t j = 0, c0 = 0; c0 < V; ++j, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[j];
    Acc wf[Mix::kSlots] = {};
    mix.factors(c, j, wf);
    if (divergence == Divergence::TVD) {  // as dense_rows.h's row_sums; no log
      Acc d_sum = 0, pos = 0, neg = 0, tie = 0;
#pragma omp simd reduction(+ : d_sum, pos, neg, tie)
      for (int64_t i = c0; i < c0 + n; ++i) {
        const Acc q = w[i] * fs;
        Acc wp[Mix::kSlots];
        const Acc dq = q - Mix::products(wf, K > 0 ? e0[i] : Acc(0), FASTKD_TEACHER_E(i), wp);
        d_sum += Acc(0.5) * std::abs(dq);
        pos += dq > Acc(0) ? q : Acc(0);
        neg += dq < Acc(0) ? q : Acc(0);
        tie += dq == Acc(0) ? q : Acc(0);
        w[i] = q;
        h[i] = dq;
      }
      total += static_cast<double>(d_sum);
      sums.v[1] += pos;
      sums.v[2] += neg;
      sums.v[3] += tie;
      continue;
    }
    // Reverse KL or JSD (kind), fast or safe: one chunk, q into es and h into c.h.
    const auto chunk = [&](auto kind, auto safe, Acc f) {
      constexpr bool kReverse = decltype(kind)::value;
      Acc part = 0;
      int bad = 0;
#pragma omp simd reduction(+ : part, bad)
      for (int64_t i = c0; i < c0 + n; ++i) {
        const Acc q = w[i] * f;
        Acc wp[Mix::kSlots];
        const Acc m = Mix::products(wf, K > 0 ? e0[i] : Acc(0), FASTKD_TEACHER_E(i), wp);
        bool bad_here;
        const Acc lr = Mix::template log_ratio<decltype(safe)::value>(shift, FASTKD_TEACHER_D(i), wp, m, bad_here);
        bad += bad_here ? 1 : 0;
        Acc hi;
        if constexpr (kReverse) {
          hi = q == Acc(0) ? Acc(0) : -lr;
        } else {
          Acc m_term;
          jsd(q, m, lr, hi, m_term);
          part += m_term;
        }
        w[i] = q;
        h[i] = hi;
      }
      return std::make_pair(part, bad);
    };
    // The safe sweep of a chunk reads q from es, which the fast one wrote.
    if (divergence == Divergence::ReverseKL) {
      fast_or_safe([&](auto safe) { return chunk(std::true_type{}, safe, decltype(safe)::value ? Acc(1) : fs); });
    } else {
      total += fast_or_safe(
          [&](auto safe) { return chunk(std::false_type{}, safe, decltype(safe)::value ? Acc(1) : fs); });
    }
  }
  sums.v[divergence == Divergence::TVD ? 0 : 4] = total;
  return sums;
}

// Mixture: the divergence part of a row (the one-teacher phases on the mixture).
template <int K, typename Acc, typename TS, typename WithTerms>
DivergencePart<Acc> mixture_divergence(const MultiCache<Acc>& c, int64_t V, const Mixture<K, Acc>& mix,
                                       Divergence divergence, const ExactParams& x, Acc gdiv,
                                       const WithTerms& with_terms, TS* g, int64_t label) {
  const RowCache<Acc> view = c.mixture_view();
  if (divergence == Divergence::ForwardKL) {
    DivergencePart<Acc> out;
    if (label >= 0) {
      const int64_t j = label / kChunk;
      Acc wf[Mixture<K, Acc>::kSlots] = {};
      mix.factors(c, j, wf);
      Acc m = 0;
      for (int k = 0; k < K; ++k) m += wf[k] * c.e[k][label];
      out.label_grad = c.es[label] * c.ref_s[j] - m;
    }
    with_terms([&](const auto terms) { out.value = write_grad_forward_kl_mixture<K>(c, V, mix, gdiv, terms, g); });
    return out;
  }
  RowSums sums = mixture_row_sums<K>(c, V, mix, divergence, x);
  if (divergence != Divergence::TVD) row_sums_centring(view.es, view.et, V, sums);
  return centred_divergence(view, V, sums, divergence, Acc(0), x, gdiv, with_terms, g, label);
}

// The per-row constants of the sum mode's sweeps: the active teachers' weights, their
// chunk factors' lse_j and delta_j = lse_j - lse_s.
template <int K, typename Acc>
struct SumRow {
  const Acc* w;
  const double* delta;
  const Acc* lse;

  Acc weight_total() const {
    Acc total = 0;
    for (int k = 0; k < K; ++k) total += w[k];
    return total;
  }
  // w_j f_j(c) for chunk c, or f_j(c) alone.
  void factors(const MultiCache<Acc>& c, int64_t chunk, bool weighted, Acc* out) const {
    for (int k = 0; k < K; ++k) {
      const Acc f = exp_approx(c.ref[k][chunk] - lse[k]);
      out[k] = weighted ? w[k] * f : f;
    }
  }
};

// Sum mode, forward KL: gdiv (W q - sum_j w_j p_j) with the hard-label terms into g, in one
// sweep with D = sum_j w_j sum_i p_j,i (d_j,i - delta_j) (0 log 0 = 0: a p = 0 entry adds 0).
// Per entry d - delta = log p - log q, not sum p d - delta: with large logits (|delta| ~ 100)
// the latter's fp32 sum p, 1 to 1e-7, costs 1e-5 of the value.
// K = 0 (no active teacher) leaves the hard-label terms alone, D = 0.
template <int K, typename Acc, typename TS, typename Terms>
Acc write_grad_forward_kl_sum(const MultiCache<Acc>& c, int64_t V, const SumRow<K, Acc>& row, Acc gdiv,
                              const Terms terms, TS* g) {
  // terms by value: a reference could alias g, and the reloads would stop vectorisation.
  const Acc* __restrict es = c.es;
  const Acc* __restrict e0 = c.e[0];
  FASTKD_TEACHER_ARRAYS(c);
  const Acc W = row.weight_total();
  Acc delta[K > 0 ? K : 1] = {};
  for (int k = 0; k < K; ++k) delta[k] = static_cast<Acc>(row.delta[k]);
  double pd = 0.0;
  for (int64_t j = 0, c0 = 0; c0 < V; ++j, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[j];
    Acc wf[K > 0 ? K : 1] = {};
    row.factors(c, j, /*weighted=*/true, wf);
    Acc part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c0 + n; ++i) {
      const Acc q = es[i] * fs;
      Acc mw = 0;
      // == 0, not > 0: NaN must reach D.
      if constexpr (K > 0) {
        const Acc p = wf[0] * e0[i];
        mw += p;
        part += p == Acc(0) ? Acc(0) : p * (d0[i] - delta[0]);
      }
      if constexpr (K > 1) {
        const Acc p = wf[1] * e1[i];
        mw += p;
        part += p == Acc(0) ? Acc(0) : p * (d1[i] - delta[1]);
      }
      if constexpr (K > 2) {
        const Acc p = wf[2] * e2[i];
        mw += p;
        part += p == Acc(0) ? Acc(0) : p * (d2[i] - delta[2]);
      }
      if constexpr (K > 3) {
        const Acc p = wf[3] * e3[i];
        mw += p;
        part += p == Acc(0) ? Acc(0) : p * (d3[i] - delta[3]);
      }
      g[i] = static_cast<TS>(terms(i, q, gdiv * (W * q - mw)));
    }
    pd += static_cast<double>(part);
  }
  return static_cast<Acc>(pd);
}

// One teacher's weighted terms of JSD or TVD in sum mode (centred_sum_cache): its h into h
// and its value term into part, from p and dl = log p - log q.
template <bool kJsd, typename Acc>
FASTKD_INLINE void add_sum_terms(const JsdTerms<Acc>& jsd, Acc q, Acc pt, Acc dl, Acc w, Acc& h, Acc& part) {
  if constexpr (kJsd) {
    Acc hk, p_term;
    jsd(q, pt, dl, hk, p_term);
    h += w * hk;
    part += w * p_term;
  } else {
    const Acc dq = q - pt;
    h += w * (dq > Acc(0) ? Acc(0.5) : (dq < Acc(0) ? Acc(-0.5) : Acc(0)));
    part += w * (Acc(0.5) * std::abs(dq));
  }
}

// Sum mode, JSD and TVD: q into es and h = sum_j w_j h_j into e[0] (h_j JSD's log q - log M_j,
// TVD's sign(q - p_j)/2); returns the value terms, sum_j w_j sum p_j (log p_j - log M_j) for
// JSD, 1/2 sum_j w_j sum |q - p_j| for TVD.
template <int K, bool kJsd, typename Acc>
double centred_sum_cache(const MultiCache<Acc>& c, int64_t V, const SumRow<K, Acc>& row, const ExactParams& x) {
  const JsdTerms<Acc> jsd(x);
  Acc* __restrict es = c.es;
  Acc* __restrict e0 = c.e[0];  // read, then h written over it
  FASTKD_TEACHER_ARRAYS(c);
  Acc w[K], delta[K];
  for (int k = 0; k < K; ++k) {
    w[k] = row.w[k];
    delta[k] = static_cast<Acc>(row.delta[k]);
  }
  double total = 0.0;
  for (int64_t j = 0, c0 = 0; c0 < V; ++j, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[j];
    Acc f[K];
    row.factors(c, j, /*weighted=*/false, f);
    Acc part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c0 + n; ++i) {
      const Acc q = es[i] * fs;
      Acc h = 0;
      add_sum_terms<kJsd>(jsd, q, e0[i] * f[0], d0[i] - delta[0], w[0], h, part);
      if constexpr (K > 1) add_sum_terms<kJsd>(jsd, q, e1[i] * f[1], d1[i] - delta[1], w[1], h, part);
      if constexpr (K > 2) add_sum_terms<kJsd>(jsd, q, e2[i] * f[2], d2[i] - delta[2], w[2], h, part);
      if constexpr (K > 3) add_sum_terms<kJsd>(jsd, q, e3[i] * f[3], d3[i] - delta[3], w[3], h, part);
      es[i] = q;
      e0[i] = h;
    }
    total += static_cast<double>(part);
  }
  return total;
}

// Sum mode: the divergence part of a row with K >= 2 active teachers (or none).
template <int K, typename Acc, typename TS, typename WithTerms>
DivergencePart<Acc> sum_divergence(const MultiCache<Acc>& c, int64_t V, const SumRow<K, Acc>& row,
                                   Divergence divergence, const ExactParams& x, Acc gdiv, const WithTerms& with_terms,
                                   TS* g, int64_t label) {
  DivergencePart<Acc> out;
  const RowCache<Acc> view = c.view();
  if (K == 0 || divergence == Divergence::ForwardKL) {
    if (label >= 0) {  // before the sweep: the cache is not written, but read here alike
      const int64_t j = label / kChunk;
      Acc wf[K > 0 ? K : 1] = {};
      row.factors(c, j, /*weighted=*/true, wf);
      const Acc q = c.es[label] * c.ref_s[j];
      Acc mw = 0;
      for (int k = 0; k < K; ++k) mw += wf[k] * c.e[k][label];
      out.label_grad = row.weight_total() * q - mw;
    }
    with_terms([&](const auto terms) { out.value = write_grad_forward_kl_sum<K>(c, V, row, gdiv, terms, g); });
    return out;
  }
  if constexpr (K > 0) {
    if (divergence == Divergence::ReverseKL) {
      // The one-teacher row of d = sum_j w_j d_j and delta = sum_j w_j delta_j (h = -d,
      // D = delta + sum q h): sum_j w_j KL(q||p_j), its gradient q (h - sum q h).
      Acc* __restrict d0 = c.d[0];
      const Acc* __restrict d1 = K > 1 ? c.d[1] : nullptr;
      const Acc* __restrict d2 = K > 2 ? c.d[2] : nullptr;
      const Acc* __restrict d3 = K > 3 ? c.d[3] : nullptr;
      Acc w[K];
      double delta = 0.0;
      for (int k = 0; k < K; ++k) {
        w[k] = row.w[k];
        delta += static_cast<double>(row.w[k]) * row.delta[k];
      }
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) {
        Acc d = w[0] * d0[i];
        if constexpr (K > 1) d += w[1] * d1[i];
        if constexpr (K > 2) d += w[2] * d2[i];
        if constexpr (K > 3) d += w[3] * d3[i];
        d0[i] = d;
      }
      return teacher_divergence(view, V, static_cast<Acc>(delta), divergence, x, gdiv, with_terms, g, label);
    }
    RowSums sums;
    if (divergence == Divergence::JSD) {
      sums.v[4] = centred_sum_cache<K, true>(c, V, row, x);
      row_sums_centring(view.es, view.et, V, sums);
      return centred_divergence(view, V, sums, divergence, Acc(0), x, gdiv, with_terms, g, label);
    }
    // TVD: the centred form of h (three values per teacher, so many per row); D <= W is
    // finite, and D - D carries a NaN of the row into the gradient as for one teacher.
    const double total = centred_sum_cache<K, false>(c, V, row, x);
    row_sums_centring(view.es, view.et, V, sums);
    sums.v[1] += total - total;
    const CentredGrad<Acc> grad_of = centred_grad(sums, Acc(1));
    out.value = static_cast<Acc>(total);
    with_terms([&](const auto terms) { write_grad_centred(view, V, grad_of, gdiv, terms, g); });
    if (label >= 0) out.label_grad = grad_of(view.es[label], view.et[label]);
  }
  return out;
}

template <typename TS, typename Acc>
struct MultiRowKernel : StudentRows<TS, Acc> {
  using Base = StudentRows<TS, Acc>;
  using Base::p;
  using Base::s;
  using Base::s_stride;
  using Base::x;

  int K = 0;
  TeacherRows teachers[kMaxTeachers] = {};
  const Acc* weights = nullptr;  // [K, N] with strides
  int64_t w_stride_k = 0;
  int64_t w_stride_n = 0;
  // Teacher j's one-teacher row (RowKernel<TS, T_j, Acc>) of a row, its divergence term
  // times a factor.
  std::function<void(int64_t, double)> one_teacher[kMaxTeachers];

  void operator()(int64_t row) const {
    if (has_logit_options(x)) {
      run<true>(row);
    } else {
      run<false>(row);
    }
  }

  template <bool kOptions>
  void run(int64_t row) const {
    int64_t label;
    if (!this->row_label(row, label)) return;  // an ignored row's weights are not read
    Acc w[kMaxTeachers];
    TeacherRow t[kMaxTeachers];
    int first = -1, n = 0;
    for (int k = 0; k < K; ++k) {
      const Acc wk = weights[k * w_stride_k + row * w_stride_n];
      if (wk != Acc(0)) {  // NaN is active: it reaches the loss
        if (first < 0) first = k;
        w[n] = wk;
        t[n] = teachers[k].row(row);
        ++n;
      }
    }
    const bool sum = p.teacher_mode == TeacherMode::Sum;
    if (n == 1 && (sum || w[0] == Acc(1))) {
      one_teacher[first](row, sum ? static_cast<double>(w[0]) : 1.0);
      return;
    }
    switch (n) {
      case 0: several<kOptions, 0>(row, label, t, w); break;
      case 1: several<kOptions, 1>(row, label, t, w); break;
      case 2: several<kOptions, 2>(row, label, t, w); break;
      case 3: several<kOptions, 3>(row, label, t, w); break;
      default: several<kOptions, 4>(row, label, t, w); break;
    }
  }

  // A row with K active teachers (t, w) other than the one-teacher rows.
  template <bool kOptions, int K>
  void several(int64_t row, int64_t label, const TeacherRow* t, const Acc* w) const {
    const int64_t V = p.vocab_size;
    const bool with_raw = x.ce_weight != 0.0 || (kOptions && x.z_loss != 0.0);
    const bool need_raw = with_raw && x.temperature != 1.0;
    const bool keep_a = !kOptions && need_raw;  // as RowKernel::run
    const MultiCache<Acc> c = MultiCache<Acc>::get(V, K, kOptions);
    Stats<Acc> st;
    TeacherStats<Acc> ts[K > 0 ? K : 1];
    multi_row_stats<kOptions, K>(s + row * s_stride, t, V, x, need_raw, keep_a, c, st, ts);
    if (with_raw && !need_raw) st.sum_raw = st.sum_s;
    const Acc lse_s = st.max_s + static_cast<Acc>(std::log(st.sum_s));
    Acc lse[K > 0 ? K : 1];
    double delta[K > 0 ? K : 1];
    for (int k = 0; k < K; ++k) {
      lse[k] = ts[k].max + static_cast<Acc>(std::log(ts[k].sum));
      delta[k] = (static_cast<double>(ts[k].max) - static_cast<double>(st.max_s)) +
                 (std::log(ts[k].sum) - std::log(st.sum_s));
    }
    chunk_factors(c.ref_s, num_chunks(V), lse_s);
    const RowCache<Acc> view = c.view();
    const Divergence divergence = p.divergence;
    if (p.teacher_mode == TeacherMode::Mixture) {
      const Mixture<K, Acc> mix(w, delta, lse);
      this->template finish<kOptions>(
          row, view, st, lse_s, label, 1.0, [&](Acc gdiv, const auto& with_terms, TS* g, int64_t column) {
            return mixture_divergence<K>(c, V, mix, divergence, x, gdiv, with_terms, g, column);
          });
    } else {
      const SumRow<K, Acc> sum_row{w, delta, lse};
      this->template finish<kOptions>(
          row, view, st, lse_s, label, 1.0, [&](Acc gdiv, const auto& with_terms, TS* g, int64_t column) {
            return sum_divergence<K>(c, V, sum_row, divergence, x, gdiv, with_terms, g, column);
          });
    }
  }
};

template <typename TS, typename Acc>
void multi_rows(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  MultiRowKernel<TS, Acc> k;
  static_cast<StudentRows<TS, Acc>&>(k) = StudentRows<TS, Acc>{
      args.student.data_ptr<TS>(), args.student.stride(0),
      args.labels ? args.labels->data_ptr<int64_t>() : nullptr, loss.data_ptr<Acc>(), grad.data_ptr<TS>(),
      grad.stride(0), grad.size(1), args.params, args.exact, args.grad_scale.to(at::kDouble).item<double>()};
  const StudentRows<TS, Acc> student = k;
  k.K = static_cast<int>(args.teachers.size());
  k.weights = args.weights.data_ptr<Acc>();
  k.w_stride_k = args.weights.stride(0);
  k.w_stride_n = args.weights.stride(1);
  for (int j = 0; j < k.K; ++j) {
    const at::Tensor& teacher = args.teachers[j];
    k.teachers[j] = TeacherRows{static_cast<const char*>(teacher.data_ptr()),
                                teacher.stride(0) * static_cast<int64_t>(teacher.element_size()),
                                teacher.scalar_type(), static_cast<int64_t>(teacher.element_size())};
    FASTKD_SCALAR_TYPE_SWITCH(teacher.scalar_type(), TT, "fastkd_multi_teacher", {
      const RowKernel<TS, TT, Acc> one{student, teacher.data_ptr<TT>(), teacher.stride(0), nullptr};
      k.one_teacher[j] = [one](int64_t row, double factor) { one(row, factor); };
    });
  }
  for_each_row(args.student.size(0), [&](int64_t r) { k(r); });
}

#undef FASTKD_TEACHER_ARRAYS
#undef FASTKD_TEACHER_E
#undef FASTKD_TEACHER_D

}  // namespace

void multi_forward(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  // The loss dtype (ops.cpp: the weights') is float64 when any input is: double throughout.
  const bool exact = args.weights.scalar_type() == at::kDouble;
  FASTKD_SCALAR_TYPE_SWITCH(args.student.scalar_type(), TS, "fastkd_multi_student", {
    if (exact) {
      multi_rows<TS, double>(args, loss, grad);
    } else if constexpr (!std::is_same<TS, double>::value) {
      multi_rows<TS, float>(args, loss, grad);
    }
  });
}

}  // namespace cpu
}  // namespace fastkd
