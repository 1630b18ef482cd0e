/*
 * Fused knowledge-distillation loss and gradient on the CPU.
 *
 * One token (row) at a time, each thread owning whole rows, in the three phases of every
 * fastkd kernel (named alike in csrc/cuda and the Triton kernels):
 *   row_stats   reads s and t once from memory into a row cache: the scaled logits
 *               a = s/T, b = t/T and their exponentials e_s = exp(a - m_s(c)),
 *               e_t = exp(b - m_t(c)), where m(c) is the running maximum when chunk c was
 *               read (a chunked online softmax). The row statistics (max, sum-exp, and
 *               the CE term's T = 1 sum-exp) fall out.
 *   row_sums    reverse_kl, jsd, tvd only, over the cached row: q and the per-entry h of
 *               the centred gradient into the cache, the divergence's value terms and the
 *               row sums (sum q h, TVD's sign masses) the gradient needs.
 *   write_grad  over the cached row: q = e_s * exp(m_s(c) - lse_s) and likewise p need a
 *               multiply, not an exp; dD/da and the gradient written once in the student's
 *               dtype with the hard-label CE term (forward KL sums its D here), zeros past
 *               vocab_size:
 *                 ds = scale * (w_div * dD/da / T + w_ce * (softmax(s) - onehot)).
 *
 * With q = softmax(a), p = softmax(b), log q = a - lse(a), log p = b - lse(b):
 *   forward_kl  D = sum p (log p - log q)            dD/da = q - p
 *   reverse_kl  D = sum q (log q - log p)            dD/da = q ((log q - log p) - D)
 *   jsd         D = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
 *               dD/da = (1-beta) q (h - sum q h),  h = log q - log m
 *   tvd         D = 1/2 sum |p - q|                  dD/da = q (h - sum q h),  h = sign(q - p)/2
 * Entries with zero probability contribute 0 (0 log 0 = 0), so -inf logits are legal.
 *
 * The logit options (csrc/kd_params.h states their contract) take a second path through
 * the same phases, chosen once per call (RowKernel::run<kOptions>), so the plain path's
 * loops are those of a kernel without them:
 *   row_stats   s and t are transformed on load (x' = cap tanh(scale x / cap), or
 *               scale x; cpu_rows.h: Transform, with fast_math.h's tanh): s'/cap also goes
 *               to the row cache (c.v) for write_grad, and the sweep continues on s', t',
 *               adding sum s' (label smoothing's value term)
 *   write_grad  ds_i = chain_i (w_div dD/da_i / T + c_raw softmax(s')_i - w_ce eps/V) with the
 *               label's entry rewritten once, c_raw = w_ce + 2 z_loss lse', chain_i =
 *               scale (1 - (s'_i/cap)^2) (cpu_rows.h: OptionTerms);
 *               loss += w_ce (lse' - (1 - eps) s'_y - eps/V sum s') + z_loss lse'^2.
 * The T = 1 sum-exp (lse' = T max_s + log sum_raw) is computed when the CE term or the
 * z-loss is on.
 *
 * Precision: fp32/bf16/fp16 input accumulates in fp32 within a chunk of 1024 entries
 * and in double across chunks, so row sums such as sum q h (whose error the centred
 * gradients amplify) are not one long fp32 sum. float64 input runs the same code in
 * double with libm's exp/log.
 *
 * The row statistics can instead come from the caller (`row_stats` argument), which is
 * how a vocab-parallel variant combines shards before the loss sweep.
 */
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../kd_params.h"
#include "cpu_rows.h"
#include "fast_math.h"

namespace fastkd {
namespace cpu {

// The row cache of one thread, in the accumulation type, reused across rows and calls.
template <typename Acc>
struct RowCache {
  Acc* a;       // s / T, kept only when the CE term at T != 1 needs it
  Acc* d;       // (t - s) / T: log p - log q up to a row constant, without the rounding of
                // two large log-probabilities (it sets the precision of the centred gradients)
  Acc* es;      // exp(a - m_s(c)); becomes q in the centred divergences
  Acc* et;      // exp(b - m_t(c)); becomes h in the centred divergences
  Acc* ref_s;   // m_s(c) per chunk, then the chunk's factor exp(m_s(c) - lse_s)
  Acc* ref_t;
  Acc* v;       // the logit options only (else null): the student's s'/kappa (Transform::student)

  static RowCache get(int64_t V, bool options) {
    thread_local std::vector<Acc> storage;
    const int64_t nc = num_chunks(V);
    const size_t need = static_cast<size_t>(4 * V + 2 * nc + (options ? V : 0));
    if (storage.size() < need) storage.resize(need);
    Acc* base = storage.data();
    return RowCache{base,         base + V,          base + 2 * V, base + 3 * V,
                    base + 4 * V, base + 4 * V + nc, options ? base + 4 * V + 2 * nc : nullptr};
  }
};

// Row statistics in the accumulation type (sums across chunks in double).
template <typename Acc>
struct Stats {
  Acc max_s = kNegInf<Acc>;
  double sum_s = 0.0;
  Acc max_t = kNegInf<Acc>;
  double sum_t = 0.0;
  double sum_raw = 0.0;  // sum exp(s - T max_s): the T = 1 softmax of the CE term and z-loss
  double sum_sp = 0.0;   // sum s' (the logit options only): label smoothing's value term
};

// Phase row_stats: one sweep of s and t into the row cache, and the row statistics into
// `st`. With `fixed` set, the maxima come from `st` (external row statistics) and only the
// cache is filled. With the logit options (kOptions), each side's logits are transformed on
// load (s'/kappa also into c.v, for write_grad) and the statistics are those of s', t',
// with sum s' in st.sum_sp; without, the sweep is the plain one. With kStats (return_stats,
// not with `fixed`), each side's argmax and centred sum e (x - m) into side[0] (student) and
// side[1] (teacher); without, the sweep is the one without them.
template <bool kOptions, bool kStats, typename Acc, typename TS, typename TT>
void row_stats(const TS* s, const TT* t, int64_t V, const ExactParams& x, bool with_raw, bool fixed, bool keep_a,
              const RowCache<Acc>& c, Stats<Acc>& st, SideStats<Acc>* side = nullptr) {
  const Acc inv_t = static_cast<Acc>(x.inv_temperature);
  const Acc temp = static_cast<Acc>(x.temperature);
  Acc* const a_row = c.a;
  Acc* const d_row = c.d;
  Acc* const es_row = c.es;
  Acc* const et_row = c.et;
  const Transform<Acc> student = Transform<Acc>::student(x), teacher = Transform<Acc>::teacher(x);
  const Acc kappa = student.capped ? static_cast<Acc>(x.cap_s) : Acc(1);  // s' = kappa v
  double sum_sp = 0.0;
  for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    // a = s / T and b = t / T go where their exponentials will be (exp_chunk works in
    // place), so a reaches the row cache only when the CE term at T != 1 needs it later:
    // one store stream fewer per element.
    Acc* __restrict ac = es_row + c0;
    Acc* __restrict bc = et_row + c0;
    Acc* __restrict dc = d_row + c0;
    Acc cmax_s = kNegInf<Acc>, cmax_t = kNegInf<Acc>;
    if constexpr (kOptions) {
      Acc* __restrict vc = c.v + c0;
      const TS* sc = s + c0;
      const TT* tc = t + c0;
      with_transform(student, [&](const auto fs) {
        with_transform(teacher, [&](const auto ft) {
          Acc ms = kNegInf<Acc>, mt = kNegInf<Acc>, part = 0;
#pragma omp simd reduction(max : ms, mt) reduction(+ : part)
          for (int64_t i = 0; i < n; ++i) {
            const Acc v = fs(static_cast<Acc>(sc[i]));
            const Acc sv = kappa * v, tv = ft(static_cast<Acc>(tc[i]));
            const Acc x = sv * inv_t;
            const Acc y = tv * inv_t;
            vc[i] = v;
            ac[i] = kStats ? std::max(x, kStatsFloor<Acc>) : x;
            bc[i] = kStats ? std::max(y, kStatsFloor<Acc>) : y;
            dc[i] = (tv - sv) * inv_t;
            ms = std::max(ms, x);
            mt = std::max(mt, y);
            part += sv;
          }
          cmax_s = ms;
          cmax_t = mt;
          sum_sp += static_cast<double>(part);
        });
      });
    } else {
#pragma omp simd reduction(max : cmax_s, cmax_t)
      for (int64_t i = 0; i < n; ++i) {
        const Acc sv = static_cast<Acc>(s[c0 + i]), tv = static_cast<Acc>(t[c0 + i]);
        const Acc x = sv * inv_t;
        const Acc y = tv * inv_t;
        ac[i] = kStats ? std::max(x, kStatsFloor<Acc>) : x;  // cpu_rows.h: kStatsFloor
        bc[i] = kStats ? std::max(y, kStatsFloor<Acc>) : y;
        dc[i] = (tv - sv) * inv_t;
        cmax_s = std::max(cmax_s, x);
        cmax_t = std::max(cmax_t, y);
      }
    }
    if (keep_a) std::copy(ac, ac + n, a_row + c0);
    if (!fixed) {
      if (cmax_s > st.max_s) {
        if constexpr (kStats) side[0].raise(ac, c0, n, st.sum_s, st.max_s, cmax_s);
        st.sum_s = rescale(st.sum_s, st.max_s, cmax_s, Acc(1));
        st.sum_raw = rescale(st.sum_raw, st.max_s, cmax_s, temp);
        st.max_s = cmax_s;
      }
      if (cmax_t > st.max_t) {
        if constexpr (kStats) side[1].raise(bc, c0, n, st.sum_t, st.max_t, cmax_t);
        st.sum_t = rescale(st.sum_t, st.max_t, cmax_t, Acc(1));
        st.max_t = cmax_t;
      }
    }
    // Each chunk's reference is at least its own maximum, so that exp_chunk's arguments are
    // <= 0 (fast_math.h: exp_nonpositive); only statistics from outside (fixed) that are not
    // this row's could be lower, and their chunk is then taken against its own maximum.
    const Acc ms = fixed ? std::max(st.max_s, cmax_s) : st.max_s;
    const Acc mt = fixed ? std::max(st.max_t, cmax_t) : st.max_t;
    c.ref_s[k] = ms;
    c.ref_t[k] = mt;
    if (!fixed && with_raw && ms != kNegInf<Acc>) {  // before exp_chunk overwrites a
      Acc zr = 0;
#pragma omp simd reduction(+ : zr)
      for (int64_t i = 0; i < n; ++i) zr += exp_nonpositive(temp * (ac[i] - ms));
      st.sum_raw += static_cast<double>(zr);
    }
    Acc zs = 0, zt = 0;
    const NextChunk rows[] = {{s + c0 + n, sizeof(TS)}, {t + c0 + n, sizeof(TT)}};
    prefetched_blocks<3>(c0, n, V, rows, [&](int64_t o, int64_t m) {
      if constexpr (kStats) {
        zs += exp_chunk(ac + o, ms, m, ac + o, side[0].xlogx);
        zt += exp_chunk(bc + o, mt, m, bc + o, side[1].xlogx);
      } else {
        zs += exp_chunk(ac + o, ms, m, ac + o);
        zt += exp_chunk(bc + o, mt, m, bc + o);
      }
    });
    if (!fixed) {
      st.sum_s += static_cast<double>(zs);
      st.sum_t += static_cast<double>(zt);
    }
  }
  st.sum_sp = sum_sp;
}

// Turns each chunk's reference max into the factor exp(m(c) - lse) that maps its cached
// exponentials to probabilities.
template <typename Acc>
void chunk_factors(Acc* ref, int64_t n_chunks, Acc lse) {
  for (int64_t k = 0; k < n_chunks; ++k) ref[k] = exp_approx(ref[k] - lse);
}

// The centred divergences (reverse KL, JSD, TVD) have dD/da_i = q_i G(h_i) for a
// per-entry h and a few row sums; these hold the sums, and G.
//
// Reverse KL and JSD: G(h_i) = c (h_i - sum_j q_j h_j). When one entry k holds nearly all
// the mass (peaked rows, low temperature), h_k - sum q h cancels catastrophically; for
// that entry the same quantity is written as h_k sum_{j!=k} q_j - sum_{j!=k} q_j h_j,
// sums over the small entries only. At most one entry can have q > 1/2 (exactly).
//
// The fp32 q do not sum to exactly 1, so "sum q h" is taken as sum q h / sum q (over the q
// actually computed): the gradient is then unchanged by a constant shift of h, as the
// exact one is. The peaked threshold is 1/2 + 2^-10, not 1/2: two tied entries of 1/2
// each can both round above 1/2, and the small-entry sums would then exclude both.
template <typename Acc>
constexpr Acc kPeaked = Acc(0.5) + Acc(1.0 / 1024);

template <typename Acc>
struct CentredGrad {
  Acc c, qh, small_q, small_qh, inv_sum_q;
  inline Acc operator()(Acc q, Acc h) const {
    return c * q * (q > kPeaked<Acc> ? (h * small_q - small_qh) * inv_sum_q : h - qh);
  }
};

// TVD: h = sign(q - p)/2 takes three values, so h_i - sum_j q_j h_j = sum_j q_j (h_i - h_j)
// is a sum of the masses on the other sides: exact, where the centred form cancels when
// the student's mass sits where the teacher has none. Here h holds q - p.
template <typename Acc>
struct SignGrad {
  Acc pos, neg, tie;
  inline Acc operator()(Acc q, Acc d) const { return q * (d > Acc(0) ? pos : (d < Acc(0) ? neg : tie)); }
};

// The row sums of one row, or of one slice of it (the vocab-parallel loss adds the slices'),
// in the layout of the shard_row_sums operator (kd_params.h: kRowSumsWidth):
//   reverse KL, JSD  (sum q, sum q h) over the small (q <= 1/2 + 2^-10) entries, the same over
//                    the others, and JSD's sum p (log p - log m) (its KL(p||m) over the row)
//   TVD              (1/2 sum |q - p|, the mass of q where q > p, where q < p, where q = p, 0)
struct RowSums {
  double v[kRowSumsWidth] = {0.0, 0.0, 0.0, 0.0, 0.0};
};

// Phase row_sums of reverse KL and JSD, after row_sums(): sum q, sum q h over the small
// (q <= 1/2 + 2^-10) entries and over the others, in chunks, into sums.v[0..3].
template <typename Acc>
void row_sums_centring(const Acc* w, const Acc* h, int64_t V, RowSums& sums) {
  double small_q = 0.0, small_qh = 0.0, big_q = 0.0, big_qh = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc* wc = w + c0;
    const Acc* hc = h + c0;
    Acc sq = 0, sqh = 0, bq = 0, bqh = 0;
#pragma omp simd reduction(+ : sq, sqh, bq, bqh)
    for (int64_t i = 0; i < n; ++i) {
      const Acc q = wc[i], qh = q * hc[i];
      const bool big = q > kPeaked<Acc>;
      sq += big ? Acc(0) : q;
      sqh += big ? Acc(0) : qh;
      bq += big ? q : Acc(0);
      bqh += big ? qh : Acc(0);
    }
    small_q += sq;
    small_qh += sqh;
    big_q += bq;
    big_qh += bqh;
  }
  sums.v[0] = small_q;
  sums.v[1] = small_qh;
  sums.v[2] = big_q;
  sums.v[3] = big_qh;
}

// The centred gradient c q (h - sum q h) from the row's centring sums.
template <typename Acc>
CentredGrad<Acc> centred_grad(const RowSums& sums, Acc c) {
  const double small_q = sums.v[0], small_qh = sums.v[1];
  const double sum_q = small_q + sums.v[2];
  return CentredGrad<Acc>{c, static_cast<Acc>((small_qh + sums.v[3]) / sum_q), static_cast<Acc>(small_q),
                          static_cast<Acc>(small_qh), static_cast<Acc>(1.0 / sum_q)};
}

// TVD's gradient from its row sums (h = sign(q - p)/2, see SignGrad). D <= 1 is finite, so
// D - D is 0 unless the row holds a NaN, which the sign comparisons would otherwise drop.
template <typename Acc>
SignGrad<Acc> sign_grad(const RowSums& sums) {
  const double q_pos = sums.v[1], q_neg = sums.v[2], q_tie = sums.v[3];
  const Acc nan_or_zero = static_cast<Acc>(sums.v[0] - sums.v[0]);
  return SignGrad<Acc>{static_cast<Acc>(q_neg + 0.5 * q_tie) + nan_or_zero,     // h = +1/2
                       -static_cast<Acc>(q_pos + 0.5 * q_tie) + nan_or_zero,    // h = -1/2
                       static_cast<Acc>(0.5 * (q_neg - q_pos)) + nan_or_zero};  // h = 0
}

template <typename Acc>
constexpr Acc kNearHalf = Acc(0.5);  // where expm1_small / log1p_small hold
template <>
constexpr double kNearHalf<double> = std::numeric_limits<double>::infinity();  // libm: everywhere
template <typename Acc>
constexpr Acc kNearLog1p = Acc(0.3);
template <>
constexpr double kNearLog1p<double> = std::numeric_limits<double>::infinity();

// JSD's per-entry terms from q, p and dl = log p - log q: h = log q - log m (0 where q = 0)
// and p (log p - log m), with log p - log m = -log beta - softplus(-x) (x = dl +
// log(beta/(1-beta))). h = -log1p(beta expm1(dl)) near p = q, exact there where
// -log(1-beta) - softplus(x) subtracts O(1) values to get an O(dl) result; elsewhere
// (|dl| > 1/2, where h varies by O(1)) the softplus form. Shared with the several-teachers
// kernel, which sums these over its teachers.
template <typename Acc>
struct JsdTerms {
  Acc log_r, beta, l1b, neg_log_beta;

  explicit JsdTerms(const ExactParams& x)
      : log_r(static_cast<Acc>(x.log_beta - x.log_one_minus_beta)),
        beta(static_cast<Acc>(x.beta)),
        l1b(static_cast<Acc>(x.log_one_minus_beta)),
        neg_log_beta(static_cast<Acc>(-x.log_beta)) {}

  FASTKD_INLINE void operator()(Acc q, Acc pt, Acc dl, Acc& h, Acc& p_term) const {
    const Acc z = dl + log_r;
    Acc sp_pos, sp_neg;  // softplus(x), softplus(-x)
    softplus_pair(z, &sp_pos, &sp_neg);
    p_term = pt == Acc(0) ? Acc(0) : pt * (neg_log_beta - sp_neg);  // p (log p - log m)
    const Acc u = beta * expm1_small(dl);
    const bool near = std::abs(dl) <= kNearHalf<Acc> && std::abs(u) <= kNearLog1p<Acc>;
    const Acc far = -l1b - sp_pos;  // p = 0 (-inf teacher logit): -log(1-beta), as it should
    h = q == Acc(0) ? Acc(0) : (near ? -log1p_small(u) : far);
  }
};

// One chunk of JSD's pass: q into w, h into h (which held e_t); returns sum p (log p - log m).
template <typename Acc>
Acc jsd_chunk(Acc* __restrict w, Acc* __restrict h, const Acc* __restrict d, int64_t c0, int64_t n, Acc fs,
              Acc ft, Acc delta, const ExactParams& x) {
  const JsdTerms<Acc> terms(x);
  Acc part = 0;
#pragma omp simd reduction(+ : part)
  for (int64_t i = c0; i < c0 + n; ++i) {
    const Acc q = w[i] * fs, pt = h[i] * ft;
    Acc hi, p_term;
    terms(q, pt, d[i] - delta, hi, p_term);  // d - delta = log p - log q
    part += p_term;
    w[i] = q;
    h[i] = hi;
  }
  return part;
}

// Phase row_sums of the centred divergences: the cached row's q (into c.es) and per-entry
// h (into c.et), written from d = log p - log q + delta (delta = lse_t - lse_s, a row
// constant) rather than from the two log-probabilities, whose O(10) magnitudes would round
// h to 1e-6 absolute where h - sum q h is O(0.01) (a student close to its teacher):
//   reverse KL  h = log q - log p = delta - d: centring drops the constant, h' = -d.
//   JSD         h = log q - log m = -log1p(beta expm1(log p - log q)), see below;
//               log p - log m = -log(beta) - softplus(-x), x = log p - log q + log(beta/(1-beta)).
// Returns TVD's row sums and JSD's sum p (log p - log m) (its KL(p||m));
// row_sums_centring adds reverse KL's and JSD's centring sums.
template <typename Acc>
RowSums row_sums(const RowCache<Acc>& c, int64_t V, Acc delta, Divergence divergence, const ExactParams& x) {
  // Locals, not c.member inside the loops: a store through w could alias the struct,
  // which would reload the pointer each iteration and stop vectorisation.
  Acc* __restrict w = c.es;
  Acc* __restrict h = c.et;
  const Acc* __restrict d = c.d;
  double total = 0.0;
  RowSums sums;
  for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[k], ft = c.ref_t[k];
    if (divergence == Divergence::ReverseKL) {
#pragma omp simd
      for (int64_t i = c0; i < c0 + n; ++i) {
        const Acc q = w[i] * fs;
        w[i] = q;
        h[i] = q == Acc(0) ? Acc(0) : -d[i];
      }
    } else if (divergence == Divergence::JSD) {
      total += jsd_chunk(w, h, d, c0, n, fs, ft, delta, x);
    } else {  // TVD
      Acc d_sum = 0, pos = 0, neg = 0, tie = 0;
#pragma omp simd reduction(+ : d_sum, pos, neg, tie)
      for (int64_t i = c0; i < c0 + n; ++i) {
        const Acc q = w[i] * fs, pt = h[i] * ft;
        const Acc dq = q - pt;
        d_sum += Acc(0.5) * std::abs(dq);
        pos += dq > Acc(0) ? q : Acc(0);
        neg += dq < Acc(0) ? q : Acc(0);
        tie += dq == Acc(0) ? q : Acc(0);
        w[i] = q;
        h[i] = dq;
      }
      total += d_sum;
      sums.v[1] += pos;
      sums.v[2] += neg;
      sums.v[3] += tie;
    }
  }
  sums.v[divergence == Divergence::TVD ? 0 : 4] = total;
  return sums;
}

// What write_grad adds to the divergence's part div = gdiv dD/da_i of each entry, as one
// inlined functor per case (chosen once per row, so each case's loop is branch-free):
//   NoHardTerms   div                                   (no CE term)
//   CeOnQ         div + gce q_i                         (CE at T = 1: softmax(s) is q)
//   CeRaw         div + gce exp(T a_i - lse_raw)        (CE at T != 1)
//   OptionTerms   chain_i (div + c_raw softmax(s')_i - smooth)   (the logit options: cpu_rows.h)
// The one-hot part of the CE term is not here: write_grad leaves the label's entry to the
// row kernel, which rewrites it once.
template <typename Acc>
struct NoHardTerms {
  FASTKD_INLINE Acc operator()(int64_t, Acc, Acc div) const { return div; }
};

template <typename Acc>
struct CeOnQ {
  Acc gce;
  FASTKD_INLINE Acc operator()(int64_t, Acc q, Acc div) const { return div + gce * q; }
};

template <typename Acc>
struct CeRaw {
  Acc gce, temp, lse_raw;
  const Acc* a;  // s / T (the row cache's a)
  FASTKD_INLINE Acc operator()(int64_t i, Acc, Acc div) const { return div + gce * exp_nonpositive(temp * a[i] - lse_raw); }
};

// Phase write_grad of forward KL: dD/da = q - p needs no row sum, so its divergence and the
// gradient share one sweep, writing the gradient (with the hard-label terms) straight to
// the output row.
template <typename Acc, typename TS, typename Terms>
Acc write_grad_forward_kl(const RowCache<Acc>& c, int64_t V, Acc delta, Acc gdiv, const Terms terms, TS* g) {
  // D = sum p (log p - log q) = sum p d - delta (sum p = 1). terms by value: a reference
  // could alias g, and the reloads would stop vectorisation.
  const Acc* __restrict es = c.es;
  const Acc* __restrict et = c.et;
  const Acc* __restrict d = c.d;
  double pd = 0.0;
  for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const Acc fs = c.ref_s[k], ft = c.ref_t[k];
    Acc part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c0 + n; ++i) {
      const Acc q = es[i] * fs, pt = et[i] * ft;
      part += pt == Acc(0) ? Acc(0) : pt * d[i];  // == 0, not > 0: NaN must reach D
      g[i] = static_cast<TS>(terms(i, q, gdiv * (q - pt)));
    }
    pd += part;
  }
  return static_cast<Acc>(pd - static_cast<double>(delta));
}

// Phase write_grad of the centred divergences: ds_i = terms(gdiv G(q_i, h_i)).
template <typename Acc, typename TS, typename G, typename Terms>
void write_grad_centred(const RowCache<Acc>& c, int64_t V, const G grad_of, Acc gdiv, const Terms terms, TS* g) {
  // grad_of and terms by value: a reference could alias g, and the reloads would stop vectorisation.
  const Acc* __restrict w = c.es;
  const Acc* __restrict h = c.et;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) g[i] = static_cast<TS>(terms(i, w[i], gdiv * grad_of(w[i], h[i])));
}

// The forward KL / reverse KL value term of a slice against its own maxima (the shard
// statistics' last column): sum_i e_t,i (b_i - a_i) or sum_i e_s,i (a_i - b_i), over the row
// cache that row_stats() filled (each chunk's exponentials are against the running max of
// their chunk, moved here to the final one).
template <typename Acc>
double value_term(const RowCache<Acc>& c, int64_t V, const Stats<Acc>& st, Divergence divergence) {
  const bool forward = divergence == Divergence::ForwardKL;
  const Acc* __restrict e = forward ? c.et : c.es;
  const Acc* __restrict d = c.d;
  const Acc* ref = forward ? c.ref_t : c.ref_s;
  const Acc m = forward ? st.max_t : st.max_s;
  if (m == kNegInf<Acc>) return 0.0;
  double total = 0.0;
  for (int64_t k = 0, c0 = 0; c0 < V; ++k, c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    if (ref[k] == kNegInf<Acc>) continue;  // nothing but -inf so far: all e are 0
    Acc part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c0 + n; ++i) part += e[i] == Acc(0) ? Acc(0) : e[i] * d[i];  // == 0: NaN reaches it
    total += static_cast<double>(exp_approx(ref[k] - m)) * static_cast<double>(part);
  }
  return forward ? total : -total;  // d = b - a
}

// What a row's divergence part hands back to StudentRows::finish: D, dD/da at the label's
// column (when the row has a label term), and whether the row is done (the shard operator
// that outputs row sums writes no gradient).
template <typename Acc>
struct DivergencePart {
  Acc value = 0;
  Acc label_grad = 0;
  bool done = false;
};

// The centred divergences' write_grad from their row sums (RowSums; the cache holds q in es
// and h in et, row_sums): TVD's exact sign form, or reverse KL's and JSD's centred gradient
// (1 - beta) q (h - sum q h), D = the rest + (1 - beta) sum q h, the rest being reverse KL's
// delta, JSD's beta KL(p||m) (sums.v[4]). Writes gdiv dD/da with the hard-label terms into g;
// `label`: the column whose dD/da is wanted, or -1.
template <typename Acc, typename TS, typename WithTerms>
DivergencePart<Acc> centred_divergence(const RowCache<Acc>& c, int64_t V, const RowSums& sums, Divergence divergence,
                                       Acc delta, const ExactParams& x, Acc gdiv, const WithTerms& with_terms,
                                       TS* g, int64_t label) {
  DivergencePart<Acc> out;
  if (divergence == Divergence::TVD) {
    const SignGrad<Acc> grad_of = sign_grad<Acc>(sums);
    out.value = static_cast<Acc>(sums.v[0]);
    with_terms([&](const auto terms) { write_grad_centred(c, V, grad_of, gdiv, terms, g); });
    if (label >= 0) out.label_grad = grad_of(c.es[label], c.et[label]);
  } else {
    const bool jsd = divergence == Divergence::JSD;
    const Acc beta = jsd ? static_cast<Acc>(x.beta) : Acc(0);
    const CentredGrad<Acc> grad_of = centred_grad(sums, Acc(1) - beta);
    const double rest = jsd ? x.beta * sums.v[4] : static_cast<double>(delta);
    out.value = static_cast<Acc>(rest + static_cast<double>((Acc(1) - beta) * grad_of.qh));
    with_terms([&](const auto terms) { write_grad_centred(c, V, grad_of, gdiv, terms, g); });
    if (label >= 0) out.label_grad = grad_of(c.es[label], c.et[label]);
  }
  return out;
}

// Phases row_sums and write_grad of one teacher's divergence over the row cache (es, et the
// chunked exponentials with their chunk factors in ref_s, ref_t; d = b - a; delta = lse_t -
// lse_s), writing gdiv dD/da with the hard-label terms (with_terms) into g. `label`: the
// column whose dD/da is wanted, or -1. The vocab-parallel shards take the row sums from
// outside (sums_in) or output them (sums_out: no gradient), [kRowSumsWidth] each or null.
template <typename Acc, typename TS, typename WithTerms>
DivergencePart<Acc> teacher_divergence(const RowCache<Acc>& c, int64_t V, Acc delta, Divergence divergence,
                                       const ExactParams& x, Acc gdiv, const WithTerms& with_terms, TS* g,
                                       int64_t label, const Acc* sums_in = nullptr, Acc* sums_out = nullptr) {
  if (divergence == Divergence::ForwardKL) {
    DivergencePart<Acc> out;
    with_terms([&](const auto terms) { out.value = write_grad_forward_kl(c, V, delta, gdiv, terms, g); });
    if (label >= 0) out.label_grad = c.es[label] * c.ref_s[label / kChunk] - c.et[label] * c.ref_t[label / kChunk];
    return out;
  }
  RowSums sums = row_sums(c, V, delta, divergence, x);
  if (divergence != Divergence::TVD) row_sums_centring(c.es, c.et, V, sums);
  // The cache holds reverse KL's h as log q - log p - delta (row_sums); the row-sums
  // table, shared with the other backends, holds sums of q (log q - log p).
  const double h_shift = divergence == Divergence::ReverseKL ? static_cast<double>(delta) : 0.0;
  if (sums_out != nullptr) {
    for (int i = 0; i < kRowSumsWidth; ++i) sums_out[i] = static_cast<Acc>(sums.v[i]);
    sums_out[1] = static_cast<Acc>(sums.v[1] + h_shift * sums.v[0]);
    sums_out[3] = static_cast<Acc>(sums.v[3] + h_shift * sums.v[2]);
    DivergencePart<Acc> out;
    out.done = true;
    return out;
  }
  if (sums_in != nullptr) {
    for (int i = 0; i < kRowSumsWidth; ++i) sums.v[i] = static_cast<double>(sums_in[i]);
    sums.v[1] -= h_shift * sums.v[0];
    sums.v[3] -= h_shift * sums.v[2];
  }
  return centred_divergence(c, V, sums, divergence, delta, x, gdiv, with_terms, g, label);
}

// Double for float64 input, float otherwise (bf16/fp16 are converted on load).
template <typename TS, typename TT>
using AccOf = std::conditional_t<std::is_same<TS, double>::value || std::is_same<TT, double>::value, double, float>;

// The student's side of a row kernel, shared by the one-teacher kernel (RowKernel below)
// and the several-teachers kernel (kd_multi_cpu.cpp): the label check, and around a
// divergence part, phase write_grad's hard-label terms, the row's loss and its padding.
template <typename TS, typename Acc_>
struct StudentRows {
  using Acc = Acc_;

  const TS* s;
  int64_t s_stride;
  const int64_t* labels;
  Acc* loss;              // [N]: float64 for float64 input, else float32; nullptr: not wanted
  TS* grad;               // rows of width g_width; may alias s (in-place backward)
  int64_t g_stride;
  int64_t g_width;
  KDParams p;        // divergence, ignore_index, vocab_size
  ExactParams x;     // the float settings, cast to Acc where used
  double grad_scale;
  // The vocab-parallel shard phases: labels are global ids and this slice starts at
  // vocab_start (a label elsewhere is no error: its one-hot is another slice's).
  bool shard = false;
  int64_t vocab_start = 0;
  // return_stats: the per-token diagnostics [N, kStatsWidth] (kd_params.h), or nullptr.
  Acc* stats_out = nullptr;

  // The diagnostics of a row that does not count (ignored, or a NaN row): NaN, and no agreement.
  void blank_stats(int64_t row) const {
    if (stats_out == nullptr) return;
    Acc* o = stats_out + row * kStatsWidth;
    for (int i = 0; i < kStatsWidth; ++i) o[i] = std::numeric_limits<Acc>::quiet_NaN();
    o[2] = Acc(0);
  }

  void fill_grad_row(TS* g, float value) const {
    const TS v = static_cast<TS>(value);
    for (int64_t i = 0; i < g_width; ++i) g[i] = v;
  }

  void set_loss(int64_t row, Acc value) const {
    if (loss != nullptr) loss[row] = value;
  }

  // The label's column in this row (slice) into `label`, -1 where it has none; false when
  // the row is done already: an ignored row (zero loss and gradient), or a label out of
  // range (never silently a number: NaN marks the bad row).
  bool row_label(int64_t row, int64_t& label) const {
    label = -1;
    if (labels == nullptr) return true;
    label = labels[row];
    const int64_t V = p.vocab_size;
    if (label == p.ignore_index) {
      set_loss(row, Acc(0));
      fill_grad_row(grad + row * g_stride, 0.0f);
      blank_stats(row);
      return false;
    }
    if (shard) {
      label -= vocab_start;
      if (label < 0 || label >= V) label = -1;
    } else if (label < 0 || label >= V) {
      set_loss(row, std::numeric_limits<Acc>::quiet_NaN());
      fill_grad_row(grad + row * g_stride, std::numeric_limits<float>::quiet_NaN());
      blank_stats(row);
      return false;
    }
    return true;
  }

  // Phase write_grad of a row whose cache row_stats filled (c.es, c.ref_s: the student's
  // exponentials and their chunk factors; c.a, c.v where the hard-label terms read them):
  // `divergence(gdiv, with_terms, g, label_column)` writes gdiv dD/da with the hard-label
  // terms and returns its DivergencePart (teacher_divergence, or a mixture's); then the
  // label's entry, the padding and the loss. div_factor scales the divergence term (a
  // teacher's weight in a sum of divergences; 1 for one teacher, exactly). With `side`
  // (return_stats: the student's and the teacher's SideStats from row_stats), the row's
  // diagnostics into stats_out.
  template <bool kOptions, typename Div>
  void finish(int64_t row, const RowCache<Acc>& c, const Stats<Acc>& st, Acc lse_s, int64_t label,
              double div_factor, const Div& divergence, const SideStats<Acc>* side = nullptr) const {
    const int64_t V = p.vocab_size;
    const TS* srow = s + row * s_stride;
    TS* grow = grad + row * g_stride;
    const bool with_ce = x.ce_weight != 0.0;
    const bool with_z = kOptions && x.z_loss != 0.0;
    const bool with_raw = with_ce || with_z;  // the T = 1 normaliser lse' is needed
    const bool need_raw = with_raw && x.temperature != 1.0;
    const bool label_here = with_ce && label >= 0;
    const Acc temp = static_cast<Acc>(x.temperature);
    const Acc lse_raw = with_raw ? temp * st.max_s + static_cast<Acc>(std::log(st.sum_raw)) : Acc(0);
    // The label's q (and, plain, its raw logit), read before the gradient sweep: in place,
    // grow is srow.
    const Acc s_label = !kOptions && label_here ? static_cast<Acc>(srow[label]) : Acc(0);
    const Acc q_label = label_here ? c.es[label] * c.ref_s[label / kChunk] : Acc(0);
    // The gradient's factors: the reduction's scale, and with the options the student's
    // logit scale (the constant part of the chain factor), folded into every coefficient.
    const double f = kOptions ? grad_scale * x.scale_s : grad_scale;
    const double div_weight = x.div_weight * div_factor;
    const Acc gdiv = static_cast<Acc>(f * div_weight * x.inv_temperature);
    const Acc gce = static_cast<Acc>(f * x.ce_weight);
    // dL/ds'_i = c_raw softmax(s')_i - ce_weight ((1 - eps) [i = y] + eps / V) + the divergence's.
    const Acc gz = with_z ? static_cast<Acc>(f * 2.0 * x.z_loss) * lse_raw : Acc(0);
    const Acc c_raw = (with_ce ? gce : Acc(0)) + gz;
    const Acc smooth = with_ce ? static_cast<Acc>(f * x.ce_weight * x.smooth_per_class) : Acc(0);
    const bool capped = x.cap_s > 0.0;
    const Acc kappa = capped ? static_cast<Acc>(x.cap_s) : Acc(1);
    // Calls f(terms) with the hard-label terms of this row's case (the functors above).
    const auto with_terms = [&](const auto& body) {
      if constexpr (kOptions) {
        with_option_terms(static_cast<const Acc*>(c.v), kappa, c_raw, smooth, lse_raw, capped,
                          !need_raw || c_raw == Acc(0), body);
      } else if (with_ce && !need_raw) {
        body(CeOnQ<Acc>{gce});
      } else if (with_ce) {
        body(CeRaw<Acc>{gce, temp, lse_raw, c.a});
      } else {
        body(NoHardTerms<Acc>{});
      }
    };
    // row_sums (the centred divergences only), then write_grad.
    const DivergencePart<Acc> div = divergence(gdiv, with_terms, grow, label_here ? label : int64_t(-1));
    if (div.done) return;
    const Acc div_grad_label = div.label_grad;
    Acc row_loss = static_cast<Acc>(div_weight) * div.value;
    if constexpr (kOptions) {
      // loss += ce_weight (lse' - (1 - eps) s'_y - eps/V sum s') + z_loss lse'^2.
      const Acc* v = c.v;
      if (with_ce) {
        Acc ce = lse_raw;
        if (label_here) ce -= static_cast<Acc>(1.0 - x.label_smoothing) * (kappa * v[label]);
        if (x.label_smoothing > 0.0) ce -= static_cast<Acc>(x.smooth_per_class * st.sum_sp);
        row_loss += static_cast<Acc>(x.ce_weight) * ce;
      }
      if (with_z) row_loss += static_cast<Acc>(x.z_loss) * lse_raw * lse_raw;
      if (label_here) {
        // The label's entry, rounded once: the one-hot -gce (1 - eps) and gce softmax(s')_y
        // as gce (softmax_y - 1) + gce eps, exact as softmax_y -> 1 (a peaked row).
        const Acc sm = need_raw ? exp_approx(kappa * v[label] - lse_raw) : q_label;
        const Acc eps = static_cast<Acc>(x.label_smoothing);
        Acc g = gdiv * div_grad_label + gce * (sm - Acc(1)) + (gce * eps - smooth) + gz * sm;
        if (capped) g *= Acc(1) - v[label] * v[label];
        grow[label] = static_cast<TS>(g);
      }
    } else {
      if (with_ce) row_loss += static_cast<Acc>(x.ce_weight) * (lse_raw - s_label);
      if (label_here) {
        // The one-hot part, added in the accumulation type so the label entry is rounded once.
        const Acc sm_label = need_raw ? exp_approx(temp * c.a[label] - lse_raw) : q_label;
        grow[label] = static_cast<TS>(gdiv * div_grad_label + gce * (sm_label - Acc(1)));
      }
    }
    for (int64_t i = V; i < g_width; ++i) grow[i] = static_cast<TS>(0.0f);
    set_loss(row, row_loss);
    if (stats_out != nullptr && side != nullptr) {
      // H(p), H(q), top-1 agreement, D (before div_weight), 0: kd_params.h, kStatsWidth.
      Acc* o = stats_out + row * kStatsWidth;
      o[0] = static_cast<Acc>(side[1].entropy(st.sum_t));
      o[1] = static_cast<Acc>(side[0].entropy(st.sum_s));
      o[2] = side[0].arg == side[1].arg ? Acc(1) : Acc(0);
      o[3] = div.value;
      o[4] = Acc(0);
    }
  }
};

// The one-teacher row kernel: row_stats into the row cache, then teacher_divergence inside
// StudentRows::finish. Acc: double for float64 input, float otherwise (bf16/fp16 are
// converted on load); the several-teachers kernel may ask for double with float teachers.
template <typename TS, typename TT, typename Acc_ = AccOf<TS, TT>>
struct RowKernel : StudentRows<TS, Acc_> {
  using Base = StudentRows<TS, Acc_>;
  using Acc = Acc_;
  using Base::grad_scale;
  using Base::p;
  using Base::s;
  using Base::s_stride;
  using Base::x;

  const TT* t;
  int64_t t_stride;
  const Acc* stats_in;    // [N, kRowStatsWidth] or nullptr: the row statistics from outside
  // The vocab-parallel shard phases: the row sums come from outside (sums_in), or are the
  // output (sums_out, and no gradient).
  const Acc* sums_in = nullptr;  // [N, kRowSumsWidth]
  Acc* sums_out = nullptr;       // [N, kRowSumsWidth]

  // One row; div_factor scales its divergence term (StudentRows::finish).
  void operator()(int64_t row, double div_factor = 1.0) const {
    if (has_logit_options(x)) {
      run<true>(row, div_factor);
    } else {
      run<false>(row, div_factor);
    }
  }

  // One row; kOptions: the logit options' path (csrc/kd_params.h: the kernel contract),
  // chosen per call so that the plain path's loops are those of a kernel without them.
  template <bool kOptions>
  void run(int64_t row, double div_factor) const {
    int64_t label;
    if (!this->row_label(row, label)) return;
    const int64_t V = p.vocab_size;
    const TS* srow = s + row * s_stride;
    const bool with_ce = x.ce_weight != 0.0;
    const bool with_z = kOptions && x.z_loss != 0.0;
    const bool with_raw = with_ce || with_z;  // the T = 1 normaliser lse' is needed
    // row_stats, or the caller's statistics and the row cache. The plain path keeps a = s/T
    // for the CE term at T != 1; the options' path has s' in the cache anyway (c.v).
    const RowCache<Acc> c = RowCache<Acc>::get(V, kOptions);
    const bool need_raw = with_raw && x.temperature != 1.0;
    const bool keep_a = !kOptions && need_raw;
    Stats<Acc> st;
    SideStats<Acc> side[2];  // return_stats: the student's, the teacher's
    const bool with_stats = this->stats_out != nullptr;
    if (stats_in != nullptr) {
      const Acc* r = stats_in + row * kRowStatsWidth;
      st.max_s = r[0];
      st.sum_s = r[1];
      st.max_t = r[2];
      st.sum_t = r[3];
      st.sum_raw = r[4];
      row_stats<kOptions, false>(srow, t + row * t_stride, V, x, false, /*fixed=*/true, keep_a, c, st);
    } else if (with_stats) {
      row_stats<kOptions, true>(srow, t + row * t_stride, V, x, need_raw, /*fixed=*/false, keep_a, c, st, side);
    } else {
      row_stats<kOptions, false>(srow, t + row * t_stride, V, x, need_raw, /*fixed=*/false, keep_a, c, st);
    }
    if (with_raw && !need_raw) st.sum_raw = st.sum_s;
    const Acc lse_s = st.max_s + static_cast<Acc>(std::log(st.sum_s));
    const Acc lse_t = st.max_t + static_cast<Acc>(std::log(st.sum_t));
    // lse_t - lse_s in double, rounded once (it shifts every d of the row).
    const Acc delta = static_cast<Acc>((static_cast<double>(st.max_t) - static_cast<double>(st.max_s)) +
                                       (std::log(st.sum_t) - std::log(st.sum_s)));
    const int64_t nc = num_chunks(V);
    chunk_factors(c.ref_s, nc, lse_s);
    chunk_factors(c.ref_t, nc, lse_t);
    const Acc* row_sums_in = sums_in != nullptr ? sums_in + row * kRowSumsWidth : nullptr;
    Acc* row_sums_out = sums_out != nullptr ? sums_out + row * kRowSumsWidth : nullptr;
    this->template finish<kOptions>(
        row, c, st, lse_s, label, div_factor, [&](Acc gdiv, const auto& with_terms, TS* g, int64_t column) {
          return teacher_divergence(c, V, delta, p.divergence, x, gdiv, with_terms, g, column, row_sums_in,
                                    row_sums_out);
        },
        with_stats && stats_in == nullptr ? side : nullptr);
  }
};

}  // namespace cpu
}  // namespace fastkd
