/*
 * Fused loss and gradient against a sparse teacher (K ids and log-probs per token) on the CPU.
 *
 * The math is pinned in fastkd/sparse_reference.py and docs/sparse.md; per row, with
 * a = s/T over the vocab_size columns, S the valid ids (id >= 0), lp_j their log-probs:
 *
 *   row_stats   ONE read of the student row into the thread's row cache: chunked online
 *               softmax as in kd_cpu.cpp (e_i = exp(a_i - m(c))), except that the support's
 *               entries are set to -inf before the exponentials, so the running sum is
 *               sum_off = sum_{i not in S} exp(a_i - M): the student's tail 1 - Q comes from
 *               the complement's own sum, never as 1 - Q (which cancels as Q -> 1). The K
 *               support logits are gathered on the way (in double), and with the CE term at
 *               T != 1 the full T = 1 sum-exp.
 *   row_sums    over the K + 1 bins only, in double: log q_j = a_j - lse with
 *               lse = M + log(sum_off + sum_S); log(1 - Q) = log sum_off - log(sum_off + sum_S);
 *               lse_P = logsumexp_S lp, log(1 - P) = log(-expm1(lse_P)) (exact as P -> 1; a
 *               P >= 1 leaves the teacher's tail empty); both tails empty when S is the whole
 *               vocabulary. Then D and dD/da per bin:
 *     bucket    bins (p_j, q_j) and (1 - P, 1 - Q); the dense divergence on them. It is the
 *               dense loss on the implicit teacher p~ (p on S, q (1-P)/(1-Q) off S), so every
 *               entry off S has dD/da_i = q_i c_off with one per-row factor:
 *                 forward_kl  support q_j - p_j                c_off = 1 - (1-P)/(1-Q)
 *                 reverse_kl  support q_j (h_j - D)           c_off = h_tail - D,  h = log q - log p
 *                 jsd         support (1-b) q_j (h_j - H)      c_off = (1-b)(h_tail - H), h = log q - log m,
 *                                                                      H = sum_bins q h
 *                 tvd         support q_j (h_j - H)           c_off = h_tail - H,  h = sign(q - p)/2
 *     renorm    bins p_j / P and q^_j = exp(a_j - lse_S): the same formulas on the K bins,
 *               c_off = 0; no row_stats pass at all unless the CE term needs the softmax.
 *               An empty support (no id, or P = 0) contributes 0.
 *     none      D = sum_S p (lp - log q) (forward KL only): support P q_j - p_j, c_off = P.
 *   write_grad  ONE write of the gradient row from the cache: g_i = scale (w_div/T q_i c_off +
 *               w_ce softmax(s)_i); then the K support entries and the label entry are
 *               rewritten with their own values (computed in double), zeros past vocab_size.
 *               A gradient of 32 MiB or more is written with non-temporal stores (fp32,
 *               AVX), which skip the read-for-ownership of each line written.
 *
 * Two units of memory traffic per row (read s, write g) against the dense kernel's three
 * (s, t, g). Empty slots (id < 0) are never read as numbers; an id >= vocab_size or an id
 * twice in a row gives that row a NaN loss and gradient (the Python layer raises on CPU
 * tensors before), as an out-of-range label does. 0 log 0 = 0 throughout.
 *
 * The logit options (csrc/kd_params.h) apply to the student only (the teacher's log-probs
 * are used as given): as in kd_cpu.cpp, a second path (run<kOptions>) transforms each chunk
 * of s in row_stats (s'/cap kept for write_grad, sum s' added up) and the support and label
 * logits in double; every formula above then reads s' for s, and write_grad multiplies each
 * entry by its chain factor, with the hard-label terms c_raw softmax(s')_i - w_ce eps/V
 * (c_raw = w_ce + 2 z_loss lse'), the label's -w_ce (1 - eps), and the loss's
 * w_ce (lse' - (1 - eps) s'_y - eps/V sum s') + z_loss lse'^2. The row sweep runs for every
 * tail when the CE term or the z-loss is on (lse' is over the whole vocabulary).
 *
 * Precision: fp32/bf16/fp16 input sums in fp32 within 1024-entry chunks and in double
 * across them; the K + 1 bins are in double; float64 input runs in double with libm.
 */
#include <ATen/ATen.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kd_op.h"
#include "cpu_rows.h"
#include "fast_math.h"
#include "grad_buffer_cache.h"

namespace fastkd {
namespace cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// One valid support slot of a row. Slots are sorted by id (the sweep masks them chunk by
// chunk, and a repeated id shows up as two neighbours).
struct Slot {
  int64_t id;
  double lp;  // the teacher's log-prob
  double s;   // the student's raw logit at id, read before any write to the row
  double g;   // dD/da at id
  int64_t k;  // the slot's place in the row as given (return_stats: the first slot among ties)
};

// Reads row `row`'s slots into `out`; false when an id is >= V or repeated.
using SlotLoader = bool (*)(const void* ids, const void* lp, int64_t row, int64_t K, int64_t V,
                            std::vector<Slot>& out);

template <typename TI, typename TL>
bool load_slots(const void* ids_v, const void* lp_v, int64_t row, int64_t K, int64_t V, std::vector<Slot>& out) {
  const TI* ids = static_cast<const TI*>(ids_v) + row * K;
  const TL* lp = static_cast<const TL*>(lp_v) + row * K;
  out.clear();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;  // an empty slot: its log-prob is never read
    if (id >= V) return false;
    out.push_back(Slot{id, static_cast<double>(lp[k]), 0.0, 0.0, k});
  }
  std::sort(out.begin(), out.end(), [](const Slot& x, const Slot& y) { return x.id < y.id; });
  for (size_t k = 1; k < out.size(); ++k)
    if (out[k].id == out[k - 1].id) return false;
  return true;
}

SlotLoader slot_loader(at::ScalarType ids, at::ScalarType lp) {
  SlotLoader f = nullptr;
  FASTKD_SCALAR_TYPE_SWITCH(lp, TL, "fastkd_sparse_logprobs", {
    f = ids == at::kLong ? &load_slots<int64_t, TL> : &load_slots<int32_t, TL>;
  });
  return f;
}

// log(exp(x) + exp(y)), -inf when both are.
inline double log_add_exp(double x, double y) {
  const double m = std::max(x, y);
  if (m == -kInf) return -kInf;
  return m + std::log1p(std::exp(-std::abs(x - y)));
}

// logsumexp of the slots' log-probs: -inf for an empty (or all -inf) support, NaN if one is NaN.
double logsumexp_lp(const std::vector<Slot>& slots) {
  double m = -kInf;
  for (const Slot& sl : slots) {
    if (std::isnan(sl.lp)) return kNaN;
    m = std::max(m, sl.lp);
  }
  if (m == -kInf) return -kInf;
  double z = 0.0;
  for (const Slot& sl : slots) z += std::exp(sl.lp - m);
  return m + std::log(z);
}

// Phase row_sums: D over the bins (log pi[b], log kappa[b]), b < B, and dD/da per bin into
// g[b] (for a bin of one entry, that entry's gradient); for a tail bin (the last, when
// `tail_bin`) g holds instead the factor per unit of q of the entries it stands for.
// 0 log 0 = 0: tested as "== 0" so that a NaN still reaches D.
double bins_divergence(Divergence div, double beta, const double* lpi, const double* lka, int64_t B, bool tail_bin,
                       double* g) {
  double D = 0.0;
  const int64_t last = tail_bin ? B - 1 : -1;
  if (div == Divergence::ForwardKL) {
    for (int64_t b = 0; b < B; ++b) {
      const double pi = std::exp(lpi[b]), ka = std::exp(lka[b]);
      D += pi == 0.0 ? 0.0 : pi * (lpi[b] - lka[b]);
      // The tail's entries have q_i - p~_i = q_i (1 - pi/kappa): -expm1 keeps r ~ 1 exact.
      g[b] = b == last ? (ka == 0.0 ? 0.0 : -std::expm1(lpi[b] - lka[b])) : ka - pi;
    }
    return D;
  }
  // The centred divergences: dD/da = c kappa (h - H), H = sum kappa h.
  double c = 1.0, H = 0.0;
  thread_local std::vector<double> h;
  h.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const double pi = std::exp(lpi[b]), ka = std::exp(lka[b]);
    if (div == Divergence::ReverseKL) {
      h[b] = ka == 0.0 ? 0.0 : lka[b] - lpi[b];
      D += ka * h[b];
    } else if (div == Divergence::JSD) {
      const double lm = log_add_exp(std::log(beta) + lpi[b], std::log1p(-beta) + lka[b]);
      h[b] = ka == 0.0 ? 0.0 : lka[b] - lm;
      D += beta * (pi == 0.0 ? 0.0 : pi * (lpi[b] - lm)) + (1.0 - beta) * ka * h[b];
    } else {  // TVD
      const double d = ka - pi;
      h[b] = d > 0.0 ? 0.5 : (d < 0.0 ? -0.5 : (d == d ? 0.0 : kNaN));
      D += 0.5 * std::abs(d);
    }
    H += ka * h[b];
  }
  if (div == Divergence::JSD) c = 1.0 - beta;
  for (int64_t b = 0; b < B; ++b) {
    const double ka = std::exp(lka[b]);
    g[b] = b == last ? (ka == 0.0 ? 0.0 : c * (h[b] - H)) : c * ka * (h[b] - H);
  }
  return D;
}

// g[i] = c * (e[i] * f) (the rounding of the plain loop) with non-temporal stores where the ISA has them: a gradient much larger
// than the caches is not read again soon, and a plain store first reads each line it
// writes (read-for-ownership), a third unit of traffic. fp32 only; others store plainly.
template <typename TS, typename Acc>
inline void write_streaming(TS* __restrict g, const Acc* __restrict e, int64_t n, Acc c, Acc f) {
  int64_t i = 0;
#if defined(__AVX__)
  if constexpr (std::is_same<TS, float>::value && std::is_same<Acc, float>::value) {
    for (; i < n && (reinterpret_cast<uintptr_t>(g + i) & 31) != 0; ++i) g[i] = c * (e[i] * f);
    const __m256 cv = _mm256_set1_ps(c), fv = _mm256_set1_ps(f);
    for (; i + 8 <= n; i += 8)
      _mm256_stream_ps(g + i, _mm256_mul_ps(cv, _mm256_mul_ps(_mm256_loadu_ps(e + i), fv)));
  }
#endif
#pragma omp simd
  for (int64_t j = i; j < n; ++j) g[j] = static_cast<TS>(c * (e[j] * f));
}

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Gradients at least this large are streamed (see write_streaming).
constexpr int64_t kStreamBytes = 32 << 20;

template <typename TS>
struct SparseRowKernel {
  using Acc = std::conditional_t<std::is_same<TS, double>::value, double, float>;

  const TS* s;
  int64_t s_stride;
  SlotLoader load;
  const void* ids;
  const void* lp;
  int64_t K;
  const int64_t* labels;
  void* loss;     // [N] float64 when the student or the log-probs are float64, else float32
  bool loss_f64;
  TS* grad;       // may alias s
  int64_t g_stride;
  int64_t g_width;
  KDParams p;
  ExactParams x;
  double grad_scale;
  bool stream;    // write the gradient with non-temporal stores (a gradient far larger than the caches)
  // return_stats: the per-token diagnostics [N, kStatsWidth] in the loss's dtype, or nullptr.
  void* stats = nullptr;

  // Row `row` of the diagnostics: P, H(q), agreement, D, Q (kd_params.h: kStatsWidth).
  void put_stats(int64_t row, double P, double Hq, bool agree, double D, double Q) const {
    const double v[kStatsWidth] = {P, Hq, agree ? 1.0 : 0.0, D, Q};
    for (int i = 0; i < kStatsWidth; ++i) {
      if (loss_f64)
        static_cast<double*>(stats)[row * kStatsWidth + i] = v[i];
      else
        static_cast<float*>(stats)[row * kStatsWidth + i] = static_cast<float>(v[i]);
    }
  }

  // The diagnostics of a row that does not count (ignored, or a NaN row): NaN, no agreement.
  void blank_stats(int64_t row) const {
    if (stats != nullptr) put_stats(row, kNaN, kNaN, false, kNaN, kNaN);
  }

  void put_loss(int64_t row, double v) const {
    if (loss_f64)
      static_cast<double*>(loss)[row] = v;
    else
      static_cast<float*>(loss)[row] = static_cast<float>(v);
  }

  void fill_row(TS* g, double v, int64_t from) const {
    const TS t = static_cast<TS>(v);
    for (int64_t i = from; i < g_width; ++i) g[i] = t;
  }

  // Phase row_stats: the row into `e` (exp(a_i - m(c)), 0 at the support), m(c) into `ref`;
  // plain, `a` = s/T kept where given; with the logit options, the student's transformed
  // row s'/kappa into `a` (Transform::student), a = s'/T, and sum s' into sum_sp. Returns M
  // and the sums through the references. With kStats (return_stats), the student's argmax
  // and its centred sum e (a - M) off the support into `side` (cpu_rows.h: SideStats).
  template <bool kOptions, bool kStats>
  void row_stats(const TS* srow, int64_t V, const std::vector<Slot>& slots, bool need_raw, Acc* e, Acc* a,
                 Acc* ref, Acc& M, double& sum_off, double& sum_raw, double& sum_sp, SideStats<Acc>* side) const {
    const Acc inv_t = static_cast<Acc>(x.inv_temperature);
    const Acc temp = static_cast<Acc>(x.temperature);
    const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    const Transform<Acc> student = Transform<Acc>::student(x);
    const Acc kappa = student.capped ? static_cast<Acc>(x.cap_s) : Acc(1);  // s' = kappa v
    M = neg_inf;
    sum_off = 0.0;
    sum_raw = 0.0;
    sum_sp = 0.0;
    size_t next = 0;  // the first slot not yet masked
    for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      Acc* __restrict ac = e + c0;
      Acc cmax = neg_inf;
      if constexpr (kOptions) {
        Acc* __restrict vc = a + c0;
        transform_chunk(srow + c0, n, student, vc);
        Acc part = 0;
#pragma omp simd reduction(max : cmax) reduction(+ : part)
        for (int64_t i = 0; i < n; ++i) {
          const Acc sv = kappa * vc[i];
          const Acc v = sv * inv_t;
          ac[i] = kStats ? std::max(v, kStatsFloor<Acc>) : v;  // cpu_rows.h: kStatsFloor
          cmax = std::max(cmax, v);
          part += sv;
        }
        sum_sp += static_cast<double>(part);
      } else {
#pragma omp simd reduction(max : cmax)
        for (int64_t i = 0; i < n; ++i) {
          const Acc v = static_cast<Acc>(srow[c0 + i]) * inv_t;
          ac[i] = kStats ? std::max(v, kStatsFloor<Acc>) : v;
          cmax = std::max(cmax, v);
        }
        if (a != nullptr) std::copy(ac, ac + n, a + c0);
      }
      if (cmax > M) {
        if constexpr (kStats) side->raise(ac, c0, n, sum_off, M, cmax);  // before the support is masked
        sum_off = rescale(sum_off, M, cmax, Acc(1));
        sum_raw = rescale(sum_raw, M, cmax, temp);
        M = cmax;
      }
      ref[k] = M;
      if (need_raw && M != neg_inf) {  // the CE term's T = 1 sum: every entry, support included
        Acc zr = 0;
#pragma omp simd reduction(+ : zr)
        for (int64_t i = 0; i < n; ++i) zr += exp_nonpositive(temp * (ac[i] - M));
        sum_raw += static_cast<double>(zr);
      }
      const Acc masked = kStats ? kStatsFloor<Acc> : neg_inf;  // the support's e: 0 (cpu_rows.h: kStatsFloor)
      for (; next < slots.size() && slots[next].id < c0 + n; ++next) ac[slots[next].id - c0] = masked;
      Acc z = 0;
      const NextChunk rows[] = {{srow + c0 + n, sizeof(TS)}};
      prefetched_blocks<3>(c0, n, V, rows, [&](int64_t o, int64_t m) {
        if constexpr (kStats) {
          z += exp_chunk(ac + o, M, m, ac + o, side->xlogx);
        } else {
          z += exp_chunk(ac + o, M, m, ac + o);
        }
      });
      sum_off += static_cast<double>(z);
    }
  }

  void operator()(int64_t row) const {
    if (has_logit_options(x)) {
      run<true>(row);
    } else {
      run<false>(row);
    }
  }

  // The student's transformed logit s' at a raw logit, in double (the support and label
  // entries; the row sweeps use transform_chunk, with the same tanh), and the part of its
  // chain factor ds'/ds = scale (1 - tanh^2) that is not the constant scale.
  void transformed(double raw, double& sp, double& tanh_factor) const {
    if (x.cap_s > 0.0) {
      const double v = tanh_approx(raw * (x.scale_s * x.inv_cap_s));
      sp = x.cap_s * v;
      tanh_factor = 1.0 - v * v;
    } else {
      sp = x.scale_s * raw;
      tanh_factor = 1.0;
    }
  }

  // One row; kOptions: the logit options' path (csrc/kd_params.h: the kernel contract; a
  // sparse teacher's log-probabilities take no transform), chosen per call so that the
  // plain path's loops are those of a kernel without them.
  template <bool kOptions>
  void run(int64_t row) const {
    const int64_t V = p.vocab_size;
    const TS* srow = s + row * s_stride;
    TS* grow = grad + row * g_stride;
    const bool with_ce = x.ce_weight != 0.0;
    const bool with_z = kOptions && x.z_loss != 0.0;
    const bool with_raw = with_ce || with_z;  // the T = 1 normaliser lse' is needed
    int64_t label = -1;
    if (labels != nullptr) {
      label = labels[row];
      if (label == p.ignore_index) {
        put_loss(row, 0.0);
        fill_row(grow, 0.0, 0);
        blank_stats(row);
        return;
      }
      if (label < 0 || label >= V) {
        put_loss(row, kNaN);
        fill_row(grow, kNaN, 0);
        blank_stats(row);
        return;
      }
    }
    thread_local std::vector<Slot> slots;
    if (!load(ids, lp, row, K, V, slots)) {  // an id >= V or twice: NaN marks the row
      put_loss(row, kNaN);
      fill_row(grow, kNaN, 0);
      blank_stats(row);
      return;
    }
    const int64_t B = static_cast<int64_t>(slots.size());
    // Every value of the row the fix-ups need, before any write (in place, grow is srow):
    // the support's and the label's logits, transformed (s') with the options, and the
    // tanh factors of their chain factors.
    double s_label = with_ce ? static_cast<double>(srow[label]) : 0.0, factor_label = 1.0;
    for (Slot& sl : slots) sl.s = static_cast<double>(srow[sl.id]);
    thread_local std::vector<double> factors;  // options only
    if constexpr (kOptions) {
      factors.resize(B);
      for (int64_t b = 0; b < B; ++b) transformed(slots[b].s, slots[b].s, factors[b]);
      if (with_ce) transformed(s_label, s_label, factor_label);
    }
    const double inv_t = x.inv_temperature, temp = x.temperature;
    const bool need_stats = p.tail != Tail::Renorm || with_raw;
    // return_stats needs the sweep for H(q), Q and the student's argmax: with the renorm tail
    // and no CE term or z-loss, the one read of the row the loss itself skips.
    const bool sweep = need_stats || stats != nullptr;
    const bool need_raw = with_raw && temp != 1.0;

    // Phase row_stats.
    const int64_t nc = num_chunks(V);
    thread_local std::vector<Acc> cache;
    const bool with_a = kOptions || need_raw;  // a = s/T (plain, CE at T != 1), or v = s'/kappa
    const size_t need = static_cast<size_t>((with_a ? 2 : 1) * V + nc);
    if (cache.size() < need) cache.resize(need);
    Acc* const e = cache.data();
    Acc* const ref = e + V;
    Acc* const a = with_a ? ref + nc : nullptr;
    Acc M = 0;
    double sum_off = 0.0, sum_raw = 0.0, sum_sp = 0.0, lse = 0.0, lse_raw = 0.0, sum_s = 0.0;
    SideStats<Acc> side;  // return_stats: the student's argmax and centred sum off the support
    double xlogx_support = 0.0;  // return_stats: sum_S e_j (a_j - M), beside sum_S
    if (sweep) {
      if (stats != nullptr) {
        row_stats<kOptions, true>(srow, V, slots, need_raw, e, a, ref, M, sum_off, sum_raw, sum_sp, &side);
      } else {
        row_stats<kOptions, false>(srow, V, slots, need_raw, e, a, ref, M, sum_off, sum_raw, sum_sp, nullptr);
      }
      for (const Slot& sl : slots) {
        const double u = sl.s * inv_t - static_cast<double>(M), e_j = std::exp(u);
        sum_s += e_j;
        if (stats != nullptr) xlogx_support += e_j == 0.0 ? 0.0 : e_j * u;  // 0 log 0 = 0
      }
      const double log_all = std::log(sum_off + sum_s);
      lse = static_cast<double>(M) + log_all;
      lse_raw = need_raw ? temp * static_cast<double>(M) + std::log(sum_raw) : lse;
      // Phase row_sums needs log(1 - Q) = log sum_off - log(sum_off + sum_S).
      sum_raw = std::log(sum_off) - log_all;  // reused: log(1 - Q), -inf when sum_off = 0
    }
    const double log_tail_q = sum_raw;

    // Phase row_sums: the K + 1 (bucket) or K (renorm, none) bins.
    thread_local std::vector<double> lpi, lka, gb;
    lpi.resize(B + 1);
    lka.resize(B + 1);
    gb.resize(B + 1);
    const double lse_p = logsumexp_lp(slots);
    double D = 0.0, c_off = 0.0;
    if (p.tail == Tail::Bucket) {
      const bool whole = B == V;  // S is the vocabulary: both tails empty, whatever 1 - P rounded to
      for (int64_t b = 0; b < B; ++b) {
        lpi[b] = slots[b].lp;
        lka[b] = slots[b].s * inv_t - lse;
      }
      lpi[B] = whole || !(lse_p < 0.0) ? (std::isnan(lse_p) ? kNaN : -kInf) : std::log(-std::expm1(lse_p));
      lka[B] = whole ? -kInf : log_tail_q;
      D = bins_divergence(p.divergence, x.beta, lpi.data(), lka.data(), B + 1, true, gb.data());
      c_off = gb[B];
    } else if (p.tail == Tail::Renorm) {
      double m = -kInf;
      for (const Slot& sl : slots) m = std::max(m, sl.s * inv_t);
      if (B > 0 && lse_p != -kInf) {
        double z = 0.0;
        for (const Slot& sl : slots) z += std::exp(sl.s * inv_t - m);
        const double lse_s = m + std::log(z);
        for (int64_t b = 0; b < B; ++b) {
          lpi[b] = slots[b].lp - lse_p;
          lka[b] = slots[b].s * inv_t - lse_s;
        }
        D = bins_divergence(p.divergence, x.beta, lpi.data(), lka.data(), B, false, gb.data());
      } else {
        std::fill(gb.begin(), gb.end(), 0.0);
      }
    } else {  // None: forward KL over S against the full-vocabulary q
      const double P = std::exp(lse_p);
      for (int64_t b = 0; b < B; ++b) {
        const double pj = std::exp(slots[b].lp), lq = slots[b].s * inv_t - lse;
        D += pj == 0.0 ? 0.0 : pj * (slots[b].lp - lq);
        gb[b] = P * std::exp(lq) - pj;
      }
      c_off = P;
    }
    for (int64_t b = 0; b < B; ++b) slots[b].g = gb[b];

    // Phase write_grad: the whole row, then the support and the label. With the options the
    // student's logit scale (the constant part of the chain factor) is folded into every
    // coefficient: dL/ds'_i = gdiv dD/da_i + c_raw softmax(s')_i - ce_weight ((1 - eps)[i = y] + eps/V).
    const double f = kOptions ? grad_scale * x.scale_s : grad_scale;
    const double gdiv = f * x.div_weight * inv_t;
    const double gce = f * x.ce_weight;
    const double gz = with_z ? f * 2.0 * x.z_loss * lse_raw : 0.0;
    const double c_raw = (with_ce ? gce : 0.0) + gz;
    const double smooth = with_ce ? gce * x.smooth_per_class : 0.0;
    const bool capped = x.cap_s > 0.0;
    if (need_stats) {
      for (int64_t k = 0; k < nc; ++k) ref[k] = exp_approx(ref[k] - static_cast<Acc>(lse));
      const Acc coef = static_cast<Acc>(gdiv * c_off), ce = static_cast<Acc>(gce);
      const Acc t_acc = static_cast<Acc>(temp), lse_raw_acc = static_cast<Acc>(lse_raw);
      const Acc* __restrict ec = e;
      if constexpr (kOptions) {
        with_option_terms(static_cast<const Acc*>(a), capped ? static_cast<Acc>(x.cap_s) : Acc(1),
                          static_cast<Acc>(c_raw), static_cast<Acc>(smooth), lse_raw_acc, capped,
                          !need_raw || c_raw == 0.0, [&](const auto terms) {
          for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
            const int64_t n = std::min(kChunk, V - c0);
            const Acc fk = ref[k];
            TS* __restrict gc = grow + c0;
#pragma omp simd
            for (int64_t i = c0; i < c0 + n; ++i) {
              const Acc q = ec[i] * fk;
              gc[i - c0] = static_cast<TS>(terms(i, q, coef * q));
            }
          }
        });
      } else {
        for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
          const int64_t n = std::min(kChunk, V - c0);
          const Acc fk = ref[k];
          TS* __restrict gc = grow + c0;
          if (with_ce && need_raw) {
            const Acc* __restrict ac = a + c0;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i)
              gc[i] = static_cast<TS>(coef * (ec[c0 + i] * fk) + ce * exp_nonpositive(t_acc * ac[i] - lse_raw_acc));
          } else if (with_ce) {
            const Acc both = coef + ce;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) gc[i] = static_cast<TS>(both * (ec[c0 + i] * fk));
          } else if (stream) {
            write_streaming(gc, ec + c0, n, coef, fk);
          } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) gc[i] = static_cast<TS>(coef * (ec[c0 + i] * fk));
          }
        }
        if (stream) store_fence();  // the fix-ups below write to lines just streamed
      }
    } else {
      fill_row(grow, 0.0, 0);
    }
    // The support entries (the row sweep zeroed them), each rounded once.
    const Slot* label_slot = nullptr;
    for (int64_t b = 0; b < B; ++b) {
      const Slot& sl = slots[b];
      const double sm = with_raw ? std::exp(sl.s - lse_raw) : 0.0;
      if (sl.id == label) label_slot = &sl;
      double g = gdiv * sl.g + c_raw * sm - smooth;
      if constexpr (kOptions) {
        g *= factors[b];
      }
      grow[sl.id] = static_cast<TS>(g);
    }
    double row_loss = x.div_weight * D;
    if (with_ce) {
      const double div_label = label_slot != nullptr ? label_slot->g : std::exp(s_label * inv_t - lse) * c_off;
      const double sm = std::exp(s_label - lse_raw);
      if constexpr (kOptions) {
        const double eps = x.label_smoothing;
        double ce_row = lse_raw - (1.0 - eps) * s_label;
        if (eps > 0.0) ce_row -= x.smooth_per_class * sum_sp;
        row_loss += x.ce_weight * ce_row;
        // The one-hot -gce (1 - eps) and gce softmax(s')_y as gce (softmax_y - 1) + gce eps,
        // exact as softmax_y -> 1 (a peaked row).
        double g = gdiv * div_label + gce * (sm - 1.0) + (gce * eps - smooth) + gz * sm;
        g *= factor_label;
        grow[label] = static_cast<TS>(g);
      } else {
        row_loss += x.ce_weight * (lse_raw - s_label);
        grow[label] = static_cast<TS>(gdiv * div_label + gce * (sm - 1.0));
      }
    }
    if (with_z) row_loss += x.z_loss * lse_raw * lse_raw;
    fill_row(grow, 0.0, V);
    put_loss(row, row_loss);
    if (stats != nullptr) write_stats(row, slots, side.arg, side.xlogx + xlogx_support, sum_off + sum_s, sum_s, lse_p, D);
  }

  // return_stats of a counted row: P = exp(lse_p); H(q) = log Z - sum e (a - M) / Z over the
  // vocabulary (`xlogx`: SideStats off the support plus the support's, in double); Q =
  // sum_S / Z; agreement of the student's argmax with the teacher's best id (the valid
  // slot of highest log-prob, the first slot as given among ties; NaN ranks first, and with
  // every log-prob -inf the first slot as given, as torch.argmax over the K slots), never
  // without a valid id.
  void write_stats(int64_t row, const std::vector<Slot>& slots, int64_t student_arg, double xlogx, double Z,
                   double sum_s, double lse_p, double D) const {
    const Slot* best = nullptr;
    for (const Slot& sl : slots) {
      const bool better = best == nullptr ||
                          (std::isnan(sl.lp) ? !std::isnan(best->lp) || sl.k < best->k
                                             : !std::isnan(best->lp) && (sl.lp > best->lp || (sl.lp == best->lp && sl.k < best->k)));
      if (better) best = &sl;
    }
    int64_t best_id = -1;
    if (best != nullptr) {
      best_id = best->id;
      // Every log-prob -inf: torch.argmax picks slot 0, valid or not (an empty slot's id reads as 0).
      if (best->lp == -kInf && best->k != 0) best_id = 0;
    }
    put_stats(row, std::exp(lse_p), std::log(Z) - xlogx / Z, best_id >= 0 && best_id == student_arg, D, sum_s / Z);
  }
};

}  // namespace

void sparse_forward(const SparseForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  const int64_t n_rows = args.student.size(0);
  if (n_rows == 0) return;
  const double grad_scale = args.grad_scale.to(at::kDouble).item<double>();
  const SlotLoader load = slot_loader(args.ids.scalar_type(), args.logprobs.scalar_type());
  FASTKD_SCALAR_TYPE_SWITCH(args.student.scalar_type(), TS, "fastkd_sparse_student", {
    SparseRowKernel<TS> k{args.student.data_ptr<TS>(), args.student.stride(0), load, args.ids.data_ptr(),
                          args.logprobs.data_ptr(), args.ids.size(1),
                          args.labels ? args.labels->data_ptr<int64_t>() : nullptr, loss.data_ptr(),
                          loss.scalar_type() == at::kDouble, grad.data_ptr<TS>(), grad.stride(0), grad.size(1),
                          args.params, args.exact, grad_scale,
                          n_rows * grad.size(1) * static_cast<int64_t>(sizeof(TS)) >= kStreamBytes};
    if (args.stats) k.stats = args.stats->data_ptr();  // the loss's dtype (ops.cpp: sparse_kd_forward_stats)
    for_each_row(n_rows, [&](int64_t r) { k(r); });
  });
}

}  // namespace cpu
}  // namespace fastkd
