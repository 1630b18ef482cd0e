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
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
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
    const Acc ms = st.max_s, mt = st.max_t;
    c.ref_s[k] = ms;
    c.ref_t[k] = mt;
    if (!fixed && with_raw && ms != kNegInf<Acc>) {  // before exp_chunk overwrites a
      Acc zr = 0;
#pragma omp simd reduction(+ : zr)
      for (int64_t i = 0; i < n; ++i) zr += exp_approx(temp * (ac[i] - ms));
      st.sum_raw += static_cast<double>(zr);
    }
    Acc zs, zt;
    if constexpr (kStats) {
      zs = exp_chunk(ac, ms, n, ac, side[0].xlogx);
      zt = exp_chunk(bc, mt, n, bc, side[1].xlogx);
    } else {
      zs = exp_chunk(ac, ms, n, ac);
      zt = exp_chunk(bc, mt, n, bc);
    }
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

// One chunk of JSD's pass: q into w, h into h (which held e_t); returns sum p (log p - log m),
// with log p - log m = -log beta - softplus(-x) (x = log p - log q + log(beta/(1-beta))).
// h = log q - log m = -log1p(beta expm1(log p - log q)) near p = q, exact there where
// -log(1-beta) - softplus(x) subtracts O(1) values to get an O(log p - log q) result;
// elsewhere (|log p - log q| > 1/2, where h varies by O(1)) the softplus form.
template <typename Acc>
Acc jsd_chunk(Acc* __restrict w, Acc* __restrict h, const Acc* __restrict d, int64_t c0, int64_t n, Acc fs,
              Acc ft, Acc delta, const ExactParams& x) {
  const Acc log_r = static_cast<Acc>(x.log_beta - x.log_one_minus_beta);
  const Acc beta = static_cast<Acc>(x.beta);
  const Acc l1b = static_cast<Acc>(x.log_one_minus_beta);
  const Acc neg_log_beta = static_cast<Acc>(-x.log_beta);
  Acc part = 0;
#pragma omp simd reduction(+ : part)
  for (int64_t i = c0; i < c0 + n; ++i) {
    const Acc q = w[i] * fs, pt = h[i] * ft;
    const Acc dl = d[i] - delta;  // log p - log q
    const Acc z = dl + log_r;
    Acc sp_pos, sp_neg;  // softplus(x), softplus(-x)
    softplus_pair(z, &sp_pos, &sp_neg);
    part += pt == Acc(0) ? Acc(0) : pt * (neg_log_beta - sp_neg);  // p (log p - log m)
    const Acc u = beta * expm1_small(dl);
    const bool near = std::abs(dl) <= kNearHalf<Acc> && std::abs(u) <= kNearLog1p<Acc>;
    const Acc far = -l1b - sp_pos;  // p = 0 (-inf teacher logit): -log(1-beta), as it should
    w[i] = q;
    h[i] = q == Acc(0) ? Acc(0) : (near ? -log1p_small(u) : far);
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
  FASTKD_INLINE Acc operator()(int64_t i, Acc, Acc div) const { return div + gce * exp_approx(temp * a[i] - lse_raw); }
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

template <typename TS, typename TT>
struct RowKernel {
  // Double for float64 input, float otherwise (bf16/fp16 are converted on load).
  using Acc = std::conditional_t<std::is_same<TS, double>::value || std::is_same<TT, double>::value, double, float>;

  const TS* s;
  int64_t s_stride;
  const TT* t;
  int64_t t_stride;
  const int64_t* labels;
  const Acc* stats_in;    // [N, kRowStatsWidth] or nullptr: the row statistics from outside
  Acc* loss;              // [N]: float64 for float64 input, else float32; nullptr: not wanted
  TS* grad;               // rows of width g_width; may alias s (in-place backward)
  int64_t g_stride;
  int64_t g_width;
  KDParams p;        // divergence, ignore_index, vocab_size
  ExactParams x;     // the float settings, cast to Acc where used
  double grad_scale;
  // The vocab-parallel shard phases: labels are global ids and this slice starts at
  // vocab_start (a label elsewhere is no error: its one-hot is another slice's); the row
  // sums come from outside (sums_in), or are the output (sums_out, and no gradient).
  bool shard = false;
  int64_t vocab_start = 0;
  const Acc* sums_in = nullptr;  // [N, kRowSumsWidth]
  Acc* sums_out = nullptr;       // [N, kRowSumsWidth]
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

  void operator()(int64_t row) const {
    if (has_logit_options(x)) {
      run<true>(row);
    } else {
      run<false>(row);
    }
  }

  // One row; kOptions: the logit options' path (csrc/kd_params.h: the kernel contract),
  // chosen per call so that the plain path's loops are those of a kernel without them.
  template <bool kOptions>
  void run(int64_t row) const {
    const int64_t V = p.vocab_size;
    const TS* srow = s + row * s_stride;
    TS* grow = grad + row * g_stride;
    const bool with_ce = x.ce_weight != 0.0;
    const bool with_z = kOptions && x.z_loss != 0.0;
    const bool with_raw = with_ce || with_z;  // the T = 1 normaliser lse' is needed
    int64_t label = -1;  // the label's column in this row (slice), or -1 where it has none
    if (labels != nullptr) {
      label = labels[row];
      if (label == p.ignore_index) {
        set_loss(row, Acc(0));
        fill_grad_row(grow, 0.0f);
        blank_stats(row);
        return;
      }
      if (shard) {
        label -= vocab_start;
        if (label < 0 || label >= V) label = -1;
      } else if (label < 0 || label >= V) {  // never silently a number: NaN marks the bad row
        set_loss(row, std::numeric_limits<Acc>::quiet_NaN());
        fill_grad_row(grow, std::numeric_limits<float>::quiet_NaN());
        blank_stats(row);
        return;
      }
    }
    const bool label_here = with_ce && label >= 0;
    // row_stats, or the caller's statistics and the row cache. The plain path keeps a = s/T
    // for the CE term at T != 1; the options' path has s' in the cache anyway (c.v).
    const RowCache<Acc> c = RowCache<Acc>::get(V, kOptions);
    const bool need_raw = with_raw && x.temperature != 1.0;
    const bool keep_a = !kOptions && need_raw;
    Stats<Acc> st;
    SideStats<Acc> side[2];  // return_stats: the student's, the teacher's
    if (stats_in != nullptr) {
      const Acc* r = stats_in + row * kRowStatsWidth;
      st.max_s = r[0];
      st.sum_s = r[1];
      st.max_t = r[2];
      st.sum_t = r[3];
      st.sum_raw = r[4];
      row_stats<kOptions, false>(srow, t + row * t_stride, V, x, false, /*fixed=*/true, keep_a, c, st);
    } else if (stats_out != nullptr) {
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
    const Acc temp = static_cast<Acc>(x.temperature);
    const Acc lse_raw = with_raw ? temp * st.max_s + static_cast<Acc>(std::log(st.sum_raw)) : Acc(0);
    // The label's q (and, plain, its raw logit), read before the gradient sweep: in place,
    // grow is srow.
    const Acc s_label = !kOptions && label_here ? static_cast<Acc>(srow[label]) : Acc(0);
    const Acc q_label = label_here ? c.es[label] * c.ref_s[label / kChunk] : Acc(0);
    // The gradient's factors: the reduction's scale, and with the options the student's
    // logit scale (the constant part of the chain factor), folded into every coefficient.
    const double f = kOptions ? grad_scale * x.scale_s : grad_scale;
    const Acc gdiv = static_cast<Acc>(f * x.div_weight * x.inv_temperature);
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
    Acc D, div_grad_label = 0;
    if (p.divergence == Divergence::ForwardKL) {
      with_terms([&](const auto terms) { D = write_grad_forward_kl(c, V, delta, gdiv, terms, grow); });
      if (label_here) div_grad_label = q_label - c.et[label] * c.ref_t[label / kChunk];
    } else {
      RowSums sums = row_sums(c, V, delta, p.divergence, x);
      if (p.divergence != Divergence::TVD) row_sums_centring(c.es, c.et, V, sums);
      // The cache holds reverse KL's h as log q - log p - delta (row_sums); the row-sums
      // table, shared with the other backends, holds sums of q (log q - log p).
      const double h_shift = p.divergence == Divergence::ReverseKL ? static_cast<double>(delta) : 0.0;
      if (sums_out != nullptr) {
        Acc* o = sums_out + row * kRowSumsWidth;
        for (int i = 0; i < kRowSumsWidth; ++i) o[i] = static_cast<Acc>(sums.v[i]);
        o[1] = static_cast<Acc>(sums.v[1] + h_shift * sums.v[0]);
        o[3] = static_cast<Acc>(sums.v[3] + h_shift * sums.v[2]);
        return;
      }
      if (sums_in != nullptr) {
        const Acc* r = sums_in + row * kRowSumsWidth;
        for (int i = 0; i < kRowSumsWidth; ++i) sums.v[i] = static_cast<double>(r[i]);
        sums.v[1] -= h_shift * sums.v[0];
        sums.v[3] -= h_shift * sums.v[2];
      }
      if (p.divergence == Divergence::TVD) {
        const SignGrad<Acc> grad_of = sign_grad<Acc>(sums);
        D = static_cast<Acc>(sums.v[0]);
        with_terms([&](const auto terms) { write_grad_centred(c, V, grad_of, gdiv, terms, grow); });
        if (label_here) div_grad_label = grad_of(c.es[label], c.et[label]);
      } else {
        const bool jsd = p.divergence == Divergence::JSD;
        const Acc beta = jsd ? static_cast<Acc>(x.beta) : Acc(0);
        const CentredGrad<Acc> grad_of = centred_grad(sums, Acc(1) - beta);
        // D = the rest + (1 - beta) sum q h; the rest is reverse KL's delta, JSD's beta KL(p||m).
        const double rest = jsd ? x.beta * sums.v[4] : static_cast<double>(delta);
        D = static_cast<Acc>(rest + static_cast<double>((Acc(1) - beta) * grad_of.qh));
        with_terms([&](const auto terms) { write_grad_centred(c, V, grad_of, gdiv, terms, grow); });
        if (label_here) div_grad_label = grad_of(c.es[label], c.et[label]);
      }
    }
    Acc row_loss = static_cast<Acc>(x.div_weight) * D;
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
    if (stats_out != nullptr) {
      // H(p), H(q), top-1 agreement, D (before div_weight), 0: kd_params.h, kStatsWidth.
      Acc* o = stats_out + row * kStatsWidth;
      o[0] = static_cast<Acc>(side[1].entropy(st.sum_t));
      o[1] = static_cast<Acc>(side[0].entropy(st.sum_s));
      o[2] = side[0].arg == side[1].arg ? Acc(1) : Acc(0);
      o[3] = D;
      o[4] = Acc(0);
    }
  }
};

template <typename TS, typename TT>
void run_rows(const RowKernel<TS, TT>& k, int64_t n_rows) {
  for_each_row(n_rows, [&](int64_t r) { k(r); });
}

// Phase row_stats alone, into `out` rows of `width` entries of type Out: the five RowStats
// (the row_stats operator: float32, width 5), and with width kShardStatsWidth the value term
// of forward / reverse KL and label smoothing's sum of s' (the shard_row_stats operator: the
// loss dtype). With the logit options, the statistics of the transformed logits.
template <bool kOptions, typename TS, typename TT, typename Out>
void stats_rows(const TS* s, int64_t s_stride, const TT* t, int64_t t_stride, int64_t n_rows, int64_t V,
                const ExactParams& x, Divergence divergence, bool with_raw, int64_t width, Out* out) {
  using Acc = typename RowKernel<TS, TT>::Acc;
  const bool with_value = width == kShardStatsWidth;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    const RowCache<Acc> c = RowCache<Acc>::get(V, kOptions);
    for (int64_t r = begin; r < end; ++r) {
      Stats<Acc> st;
      const bool raw_differs = with_raw && x.temperature != 1.0;
      row_stats<kOptions, false>(s + r * s_stride, t + r * t_stride, V, x, raw_differs, /*fixed=*/false,
                                 /*keep_a=*/false, c, st);
      if (!raw_differs) st.sum_raw = with_raw ? st.sum_s : 0.0;
      Out* o = out + r * width;
      o[0] = static_cast<Out>(st.max_s);
      o[1] = static_cast<Out>(st.sum_s);
      o[2] = static_cast<Out>(st.max_t);
      o[3] = static_cast<Out>(st.sum_t);
      o[4] = static_cast<Out>(st.sum_raw);
      if (with_value) {
        const bool kl = divergence == Divergence::ForwardKL || divergence == Divergence::ReverseKL;
        o[5] = kl ? static_cast<Out>(value_term(c, V, st, divergence)) : Out(0);
        o[6] = kOptions && x.label_smoothing > 0.0 ? static_cast<Out>(st.sum_sp) : Out(0);
      }
    }
  });
}

// Dispatch over the (student, teacher) dtype pair.
template <typename F>
void dispatch_pair(at::ScalarType ss, at::ScalarType ts, const F& f) {
  FASTKD_SCALAR_TYPE_SWITCH(ss, TS, "fastkd_student",
                            FASTKD_SCALAR_TYPE_SWITCH(ts, TT, "fastkd_teacher", f(TS{}, TT{})));
}

// A RowKernel over the call's tensors; `stats` (the row statistics from outside) must be
// in the kernel's accumulation type, `loss` too (or undefined: not wanted).
template <typename TS, typename TT>
RowKernel<TS, TT> row_kernel(const ForwardArgs& args, const at::Tensor& stats, const at::Tensor& loss,
                             at::Tensor& grad) {
  using Acc = typename RowKernel<TS, TT>::Acc;
  return RowKernel<TS, TT>{args.student.data_ptr<TS>(), args.student.stride(0),
                           args.teacher.data_ptr<TT>(), args.teacher.stride(0),
                           args.labels ? args.labels->data_ptr<int64_t>() : nullptr,
                           stats.defined() ? stats.data_ptr<Acc>() : nullptr,
                           loss.defined() ? loss.data_ptr<Acc>() : nullptr,
                           grad.defined() ? grad.data_ptr<TS>() : nullptr,
                           grad.defined() ? grad.stride(0) : 0, grad.defined() ? grad.size(1) : 0,
                           args.params, args.exact,
                           args.grad_scale.defined() ? args.grad_scale.to(at::kDouble).item<double>() : 1.0};
}

// The accumulation type's tensor of the row statistics (the row_stats argument of
// kd_forward is float32 for every input; float64 input reads it in double).
at::Tensor stats_in_acc(const ForwardArgs& args) {
  if (!args.row_stats) return at::Tensor();
  const bool f64 = args.student.scalar_type() == at::kDouble || args.teacher.scalar_type() == at::kDouble;
  return args.row_stats->to(f64 ? at::kDouble : at::kFloat).contiguous();
}

void op_forward(const ForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  if (args.student.size(0) == 0) return;
  const at::Tensor stats = stats_in_acc(args);
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, stats, loss, grad);
    // The diagnostics are in the loss dtype, the kernel's accumulation type (ops.cpp: kd_forward_stats).
    if (args.stats) k.stats_out = args.stats->data_ptr<typename decltype(k)::Acc>();
    run_rows(k, args.student.size(0));
  });
}

// From the gradient-buffer cache: a freed gradient of the same size is reused without
// the page faults of fresh memory.
at::Tensor op_empty_grad(const at::Tensor& student) {
  return cached_empty(student.size(0), student.size(1), student.options());
}

// with_raw: the T = 1 sum-exp is wanted (the CE term or the z-loss is on).
template <typename Out>
void stats_of(const ForwardArgs& args, bool with_raw, int64_t width, at::Tensor& out) {
  const at::Tensor& student = args.student;
  const at::Tensor& teacher = args.teacher;
  const bool options = has_logit_options(args.exact);
  dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s0, auto t0) {
    using TS = decltype(s0);
    using TT = decltype(t0);
    auto rows = options ? &stats_rows<true, TS, TT, Out> : &stats_rows<false, TS, TT, Out>;
    rows(student.data_ptr<TS>(), student.stride(0), teacher.data_ptr<TT>(), teacher.stride(0), student.size(0),
         args.params.vocab_size, args.exact, args.params.divergence, with_raw, width, out.data_ptr<Out>());
  });
}

// ops.cpp asks for the CE term's column by ce_weight; the z-loss needs it too.
void op_row_stats(const ForwardArgs& args, bool with_raw, at::Tensor& out) {
  stats_of<float>(args, with_raw, kRowStatsWidth, out);
}

// The shard operators (the stats and sums tensors are in the loss dtype, checked by ops.cpp).
void op_shard_row_stats(const ForwardArgs& args, at::Tensor& out) {
  const bool with_raw = args.exact.ce_weight != 0.0 || args.exact.z_loss != 0.0;
  if (out.scalar_type() == at::kDouble) {
    stats_of<double>(args, with_raw, kShardStatsWidth, out);
  } else {
    stats_of<float>(args, with_raw, kShardStatsWidth, out);
  }
}

void op_shard_row_sums(const ForwardArgs& args, at::Tensor& out) {
  if (args.student.size(0) == 0) return;
  at::Tensor none;
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, *args.row_stats, none, none);
    k.sums_out = out.data_ptr<typename decltype(k)::Acc>();
    run_rows(k, args.student.size(0));
  });
}

void op_shard_write_grad(const ForwardArgs& args, at::Tensor& grad) {
  if (args.student.size(0) == 0) return;
  at::Tensor none;
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, *args.row_stats, none, grad);
    k.shard = true;
    k.vocab_start = args.vocab_start;
    k.sums_in = args.row_sums ? args.row_sums->data_ptr<typename decltype(k)::Acc>() : nullptr;
    run_rows(k, args.student.size(0));
  });
}

template <typename T>
void scale_rows(T* g, int64_t n_rows, int64_t width, int64_t stride, const double* f, bool per_row) {
  using Acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Acc fr = static_cast<Acc>(f[per_row ? r : 0]);
      if (fr == Acc(1)) continue;
      T* row = g + r * stride;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) row[i] = static_cast<T>(static_cast<Acc>(row[i]) * fr);
    }
  });
}

// Backward: grad *= grad_output, computed in fp32 (double for fp64) and rounded once to
// the gradient's dtype, so a factor beyond fp16's range (a GradScaler's 65536) does not
// overflow before it meets the small gradient entries. Skipped when the factor is 1 (the
// common `loss.backward()`); reading the scalar costs nothing on the CPU.
void op_scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "fastkd: scale_grad_ needs a 2-D gradient with unit inner stride");
  const int64_t n_rows = grad.size(0), width = grad.size(1);
  const bool per_row = grad_output.numel() != 1;
  TORCH_CHECK(!per_row || grad_output.numel() == n_rows, "fastkd: grad_output must have 1 or ", n_rows,
              " elements, got ", grad_output.numel());
  const at::Tensor factor = grad_output.to(at::kDouble).contiguous().reshape({-1});
  const double* f = factor.data_ptr<double>();
  if (!per_row && f[0] == 1.0) return;
  FASTKD_SCALAR_TYPE_SWITCH(grad.scalar_type(), scalar_t, "fastkd_scale_grad", {
    scale_rows(grad.data_ptr<scalar_t>(), n_rows, width, grad.stride(0), f, per_row);
  });
}

}  // namespace

const DeviceOps& device_ops() {
  static const DeviceOps ops{&op_empty_grad,      &op_forward,        &op_row_stats,        &op_scale_grad,
                             &op_shard_row_stats, &op_shard_row_sums, &op_shard_write_grad, &sparse_forward,
                             /*multi_forward=*/nullptr,
                             /*forward_writes_stats=*/true,  // return_stats: RowKernel::stats_out
                             /*sparse_forward_writes_stats=*/true};  // SparseRowKernel::stats
  return ops;
}

}  // namespace cpu
}  // namespace fastkd
