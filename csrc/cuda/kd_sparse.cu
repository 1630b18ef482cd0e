/*
 * Fused knowledge-distillation loss and gradient against a sparse teacher (fastkd issue
 * 11): per row, K ids with their log-probabilities instead of teacher logits.
 *
 * The math (docs/sparse.md, fastkd/sparse_reference.py; the Triton twin is
 * fastkd/backends/triton/sparse.py). With a = s/T over the first V columns, q = softmax(a),
 * the support S (slots with id >= 0), p_j = exp(lp_j), P = sum_S p, Q = sum_S q:
 *   bucket  bins: the K ids (p_j, q_j) and a tail (1 - P, 1 - Q); D = the divergence on the
 *           bins; off S every gradient entry is q_i * w_off for one row constant:
 *             forward_kl  dD/da_j = q_j - p_j                  w_off = 1 - (1-P)/(1-Q)
 *             reverse_kl  dD/da_j = q_j (h_j - H)              w_off = h_t - H,  h = log q - log p
 *             jsd         dD/da_j = (1-beta) q_j (h_j - H)     w_off = (1-beta)(h_t - H),  h = log q - log m
 *             tvd         dD/da_j = q_j (h_j - H)              w_off = h_t - H,  h = sign(q - p)/2
 *           (H = sum_bins q h, divided by the bins' computed mass)
 *   renorm  the K bins with p/P and q/Q (q/Q is softmax of a over S): w_off = 0
 *   none    D = sum_S p (log p - log q), dD/da_j = P q_j - p_j, w_off = P (forward KL only)
 *   loss = div_weight D + ce_weight (lse(s) - s[label]);
 *   ds   = grad_scale (div_weight/T dD/da + ce_weight (softmax(s) - onehot(label))).
 * With the logit options (kd_params.h; the kOptions instance, has_options in kd_cuda.h), s is
 * the student's transformed logits s' throughout (the teacher's log-probabilities are used
 * as given), the T = 1 terms are label-smoothed and the z-loss's, and the gradient is
 * multiplied by ds'/ds: the write sweep transforms each element again, the support's
 * entries from their raw logits kept in shared memory.
 * 1 - P is -expm1(log P); 1 - Q is Z_off / Z, Z_off the sum-exp over the columns NOT in S
 * (the support's columns are excluded while the row streams, through a shared-memory
 * bitmap), so neither cancels as P, Q -> 1. A support covering all V columns has empty
 * tail bins. An id >= V or a valid id twice: the row's loss and gradient are NaN.
 *
 * One CTA per row, in phases (named as in every fastkd kernel):
 *   support     the K slots: ids, log-probs and the gathers s[id] into shared memory, the
 *               support's bitmap, the duplicate check; before any store (in place: the
 *               gathers and the label's logit are read first).
 *   row_stats   the one read of the row: max and the sum-exp of a off S (and the T = 1 sum
 *               of every column for the CE term), 16-byte packs, kSparseUnroll in flight;
 *               the first stage_packs packs are copied into shared memory on the way.
 *   row_sums    the bins in float64 (K values: free): log P, Z_S, then the divergence sums,
 *               three block reductions; every thread derives the same row constants.
 *   write_grad  the gradient once: q_i w_off (+ CE) for every column, the staged packs from
 *               shared memory and only the rest from global memory (a second read of that
 *               part, likely from L2); then, after a barrier, the K support entries.
 *
 * Traffic, units of N V bytes: 1 read + 1 write + the part of the row that is not staged
 * (at V = 128256 bf16 a row is 250.5 KB, the staging ~200 KB of an H100 SM's 227 KB; so
 * ~0.2 more, mostly L2) + K (ids, log-probs, gathers), against the floor's 2. The staging
 * holds one row per SM at that V (1024 threads); FASTKD_SPARSE_STAGE_KB caps it, to trade
 * staging for a second resident row. Unmeasured: no GPU has run this file.
 *
 * The per-token diagnostics (return_stats; the kStats instance, kd_device.cuh: TokenStats):
 * P, Q and the teacher's best slot (the first of highest log-prob) from the support phase,
 * H(q) and the student's argmax from the write sweep, D as the loss's.
 */
#include <cmath>

#include "../dispatch.h"
#include "kd_device.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace dev;

constexpr int U = kSparseUnroll;
constexpr double kLn2d = 0.6931471805599453;
constexpr double kLog2ed = 1.4426950408889634;
#define FASTKD_NEG_INF_D (-__builtin_huge_val())

// ---------------------------------------------------------------------------------------
// Block reductions of a few doubles (the support's sums). Every thread gets the result.

template <int N, bool kMax>
FASTKD_DEV void block_reduce(double (&v)[N], double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  const auto warp_reduce = [&]() {
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const double o = __shfl_xor_sync(0xffffffffu, v[i], off);
        v[i] = kMax ? fmax(v[i], o) : v[i] + o;
      }
  };
  warp_reduce();
  __syncthreads();  // the scratch's previous use is over
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = lane < n_warps ? scratch[lane * N + i] : (kMax ? FASTKD_NEG_INF_D : 0.0);
  warp_reduce();
}

// ---------------------------------------------------------------------------------------
// Per-slot math, float64. 0 log 0 = 0; NaN propagates.

FASTKD_DEV double xlogy(double x, double log_ratio) { return x == 0.0 ? 0.0 : x * log_ratio; }

// log(beta e^lp + (1 - beta) e^lq); -inf when both sides are -inf.
FASTKD_DEV double log_mix(double lp, double lq, double log_beta, double log_1mb) {
  const double u = lp + log_beta, v = lq + log_1mb;
  if (isnan(u) || isnan(v)) return u + v;
  const double hi = fmax(u, v), lo = fmin(u, v);
  return hi == FASTKD_NEG_INF_D ? hi : hi + log1p(exp(lo - hi));
}

// One bin's contribution to the divergence's row sums (acc), and its h (centred forms) or
// q - p (tvd), which the gradient needs.
//   forward_kl: acc0 += p (lp - lq)
//   reverse_kl: acc0 += q h, acc1 += q                   h = log q - log p
//   jsd:        acc0 += p (lp - lm), acc1 += q h, acc2 += q    h = log q - log m
//   tvd:        acc0 += |q - p|, acc1..3 += q where q > p, q < p, q == p
FASTKD_DEV double bin_sums(double (&acc)[4], Divergence div, double lp, double lq, double p, double q,
                           double log_beta, double log_1mb) {
  switch (div) {
    case Divergence::ForwardKL:
      acc[0] += xlogy(p, lp - lq);
      return 0.0;
    case Divergence::ReverseKL: {
      const double h = q == 0.0 ? 0.0 : lq - lp;
      acc[0] += q * h;
      acc[1] += q;
      return h;
    }
    case Divergence::JSD: {
      const double lm = log_mix(lp, lq, log_beta, log_1mb);
      const double h = q == 0.0 ? 0.0 : lq - lm;
      acc[0] += xlogy(p, lp - lm);
      acc[1] += q * h;
      acc[2] += q;
      return h;
    }
    default: {  // TVD
      const double d = q - p;
      acc[0] += fabs(d);
      acc[1] += d > 0.0 ? q : 0.0;
      acc[2] += d < 0.0 ? q : 0.0;
      acc[3] += d == 0.0 ? q : 0.0;
      return d;
    }
  }
}

// The row's constants once the bins' sums (tail bin included) are known.
struct SparseConsts {
  double D;       // the divergence
  double centre;  // H (reverse_kl, jsd), or TVD's k_pos
  double k_neg, k_tie;
  double scale;   // 1 - beta (jsd), else 1
};

FASTKD_DEV SparseConsts sparse_consts(Divergence div, const double (&acc)[4], double beta) {
  SparseConsts k{0.0, 0.0, 0.0, 0.0, 1.0};
  switch (div) {
    case Divergence::ForwardKL:
      k.D = acc[0];
      break;
    case Divergence::ReverseKL:
      k.D = acc[0];
      k.centre = acc[0] / acc[1];
      break;
    case Divergence::JSD:
      k.D = beta * acc[0] + (1.0 - beta) * acc[1];
      k.centre = acc[1] / acc[2];
      k.scale = 1.0 - beta;
      break;
    default: {  // TVD: h_i - H as the masses on the other sides (exact, as the dense kernels)
      k.D = 0.5 * acc[0];
      const double nan_or_zero = k.D - k.D;
      k.centre = acc[2] + 0.5 * acc[3] + nan_or_zero;       // q > p
      k.k_neg = -(acc[1] + 0.5 * acc[3]) + nan_or_zero;     // q < p
      k.k_tie = 0.5 * (acc[2] - acc[1]) + nan_or_zero;      // q == p
    }
  }
  return k;
}

// dD/da of a bin given its h (or q - p for tvd): the support's gradient, and (divided by
// q) the off-support factor. Forward KL is handled by the callers (q - p, or P q - p).
FASTKD_DEV double centred_grad(Divergence div, const SparseConsts& k, double q, double h_or_d) {
  if (div == Divergence::TVD) return q * (h_or_d > 0.0 ? k.centre : h_or_d < 0.0 ? k.k_neg : k.k_tie);
  return k.scale * q * (h_or_d - k.centre);
}

// ---------------------------------------------------------------------------------------
// Loads of the support's inputs.

FASTKD_DEV int64_t load_id(const SparseKDLaunch& a, int64_t row, int64_t j) {
  return a.ids_int64 ? static_cast<const int64_t*>(a.ids)[row * a.ids_stride + j]
                     : int64_t(static_cast<const int32_t*>(a.ids)[row * a.ids_stride + j]);
}

FASTKD_DEV float load_logprob(const SparseKDLaunch& a, int64_t row, int64_t j) {
  const int64_t at = row * a.lp_stride + j;
  switch (a.lp_type) {
    case ElemType::BF16: return load_elem(static_cast<const __nv_bfloat16*>(a.logprobs) + at);
    case ElemType::F16: return load_elem(static_cast<const __half*>(a.logprobs) + at);
    default: return static_cast<const float*>(a.logprobs)[at];
  }
}

// The support's phase after row_stats: the bins in float64 (log P, Z_S, the divergence's
// sums: three block reductions), the row constants every thread derives alike, and each
// slot's gradient (divergence part, times gdiv) into slot_g.
struct SupportResult {
  float ls;      // log2 of q's normaliser (bits)
  float w_off;   // dD/da_i = q_i w_off off the support
  double D;      // the divergence
};

// With the per-token diagnostics (kStats): the support's masses and this thread's candidate
// for the teacher's best slot.
struct SupportStatsResult : SupportResult {
  float mass_p;        // P = sum_S p
  float mass_q;        // Q = sum_S q
  uint32_t best_slot;  // the lowest of this thread's slots whose log-prob is the row's highest
                       // (kNoColumn: none); the block's minimum is the first slot among ties
  bool any_valid;      // a valid id (a row without one never agrees)
};

template <bool kStats>
using SupportResultOf = typename std::conditional<kStats, SupportStatsResult, SupportResult>::type;

// slot_s holds the student's raw logits (the final write of the support needs them for
// the transform's chain factor); with the options each read here transforms it (K
// elements a row). kStats: also the diagnostics' part of the support (SupportStatsResult).
template <bool kOptions, bool kStats>
__device__ __noinline__ SupportResultOf<kStats> support_phase(const SparseKDLaunch& a, const RowStatsBase2& st, float c,
                                                              float gdiv, const int32_t* slot_id, const float* slot_s,
                                                              const float* slot_lp, float* slot_g,
                                                              double* sums_scratch) {
  const KDParams& p = a.p;
  const auto logit = [&](int64_t j) { return kOptions ? student_logit(slot_s[j], p) : slot_s[j]; };
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t K = a.k, V = p.vocab_size;
  const Divergence div = p.divergence;
  const double x_scale = double(p.inv_temperature) * kLog2ed;  // a in bits, per unit of s
  const double anchor = ref_point(st.ms, c);
  // Round 1: the maxima of log p and of a over S.
  double mx[2] = {FASTKD_NEG_INF_D, FASTKD_NEG_INF_D};
  for (int64_t j = tid; j < K; j += nt) {
    if (slot_id[j] < 0) continue;
    mx[0] = fmax(mx[0], double(slot_lp[j]));
    mx[1] = fmax(mx[1], double(logit(j)) * x_scale);
  }
  block_reduce<2, true>(mx, sums_scratch);
  const double ref_p = mx[0] == FASTKD_NEG_INF_D ? 0.0 : mx[0];
  const double ref_x = mx[1] == FASTKD_NEG_INF_D ? 0.0 : mx[1];
  // Round 2: sum exp(lp - max), Z_S at the row's anchor, the renormalised Z_S, |S|.
  double sums[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t j = tid; j < K; j += nt) {
    if (slot_id[j] < 0) continue;
    const double x = double(logit(j)) * x_scale;
    sums[0] += exp(double(slot_lp[j]) - ref_p);
    sums[1] += exp2(x - anchor);
    sums[2] += exp2(x - ref_x);
    sums[3] += 1.0;
  }
  block_reduce<4, false>(sums, sums_scratch);
  const double log_mass_p = mx[0] == FASTKD_NEG_INF_D ? FASTKD_NEG_INF_D : ref_p + log(sums[0]);
  const double z = double(st.zs) + sums[1];
  const double lse2 = anchor + log2(z);             // log2 of q's normaliser, bits
  const double lse2_support = ref_x + log2(sums[2]);  // renorm: over S only
  const bool renorm = p.tail == Tail::Renorm, none = p.tail == Tail::None;
  const bool renorm_empty = renorm && log_mass_p == FASTKD_NEG_INF_D;
  const double P = exp(log_mass_p);
  const double log_beta = log(double(p.beta)), log_1mb = log1p(-double(p.beta));
  // Round 3: the divergence's sums over the support's bins.
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t j = tid; j < K; j += nt) {
    if (slot_id[j] < 0) continue;
    const double x = double(logit(j)) * x_scale;
    const double lq = (x - (renorm ? lse2_support : lse2)) * kLn2d;
    const double lp = double(slot_lp[j]) - (renorm && !renorm_empty ? log_mass_p : 0.0);
    bin_sums(acc, none ? Divergence::ForwardKL : div, lp, lq, exp(lp), exp(lq), log_beta, log_1mb);
  }
  block_reduce<4, false>(acc, sums_scratch);
  // The tail bin (bucket): 1 - P = -expm1(log P), 1 - Q = Z_off / Z; empty when S covers V.
  double w_off = 0.0, tail_h = 0.0, q_t = 0.0, p_t = 0.0;
  if (p.tail == Tail::Bucket) {
    const bool full = sums[3] >= double(V);
    p_t = (full || log_mass_p >= 0.0) ? 0.0 : -expm1(log_mass_p);
    q_t = full ? 0.0 : double(st.zs) / z;
    tail_h = bin_sums(acc, div, log(p_t), log(q_t), p_t, q_t, log_beta, log_1mb);
  }
  const SparseConsts k = sparse_consts(none ? Divergence::ForwardKL : div, acc, double(p.beta));
  if (none) w_off = P;
  else if (p.tail == Tail::Bucket)
    w_off = div == Divergence::ForwardKL ? (q_t > 0.0 ? 1.0 - p_t / q_t : 0.0) : centred_grad(div, k, 1.0, tail_h);

  // The support's own gradient (divergence part) into its slots.
  for (int64_t j = tid; j < K; j += nt) {
    if (slot_id[j] < 0) continue;
    const double x = double(logit(j)) * x_scale;
    const double lq = (x - (renorm ? lse2_support : lse2)) * kLn2d;
    const double lp = double(slot_lp[j]) - (renorm && !renorm_empty ? log_mass_p : 0.0);
    const double q = exp(lq), pj = exp(lp);
    double w;
    if (renorm_empty) w = 0.0;
    else if (none) w = P * q - pj;
    else if (div == Divergence::ForwardKL) w = q - pj;
    else {
      double unused[4] = {0.0, 0.0, 0.0, 0.0};
      w = centred_grad(div, k, q, bin_sums(unused, div, lp, lq, pj, q, log_beta, log_1mb));
    }
    slot_g[j] = gdiv * float(w);
  }

  SupportResultOf<kStats> result;
  result.ls = float(lse2);
  result.w_off = float(w_off);
  result.D = renorm_empty ? 0.0 : k.D;
  if constexpr (kStats) {
    result.mass_p = float(P);
    result.mass_q = float(sums[1] / z);
    result.any_valid = sums[3] > 0.0;
    // The teacher's best slot: the first whose log-prob is the highest (fastkd/stats.py: the
    // argmax over the slots, empty ones at -inf; with no finite log-prob, the first slot).
    result.best_slot = kNoColumn;
    for (int64_t j = tid; j < K; j += nt)
      if (double(slot_lp[j]) == mx[0]) result.best_slot = min(result.best_slot, uint32_t(j));
  }
  return result;
}

// ---------------------------------------------------------------------------------------
// The kernel.

// kOptions: the instance that applies the logit options (has_options; kd_device.cuh): the
// student's transform, label smoothing, the z-loss. The teacher arrives as log-probabilities:
// its transforms were applied before (p.scale_t is 1, p.cap_t 0 for a sparse config).
// kStats: the instance that also writes the per-token diagnostics (token_stats: P, H(q),
// the agreement of the student's argmax with the teacher's best id, D, Q), launched with
// kOptions: H(q) and the student's argmax from the write sweep (which then always reads the
// row, renorm included), P, Q and the best slot from the support's phase.
template <typename TS, int VEC, bool kOptions, bool kStats>
__global__ void __launch_bounds__(kSparseMaxThreads) kd_sparse_kernel(const SparseKDLaunch a, const SparsePlan plan,
                                                                      float* token_stats) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ RowStatsBase2 stats_scratch[32];
  __shared__ __align__(16) double sums_scratch[32 * 4];  // also label smoothing's float4 block_sum, before
                                                         // support_phase (whose reductions open with a barrier)

  const KDParams& p = a.p;
  const int64_t row = blockIdx.x;
  const int64_t V = p.vocab_size, K = a.k;
  const int tid = threadIdx.x, nt = blockDim.x;
  const TS* srow = static_cast<const TS*>(a.student) + row * a.s_stride;
  TS* grow = static_cast<TS*>(a.grad) + row * a.g_stride;
  int64_t label;
  const RowKind kind = classify_row(a.labels, row, p, /*vocab_start=*/0, label);
  if (kind != RowKind::Normal) {
    fill_span(grow, 0, a.g_width, row_fill_value(kind), tid, nt);
    if (tid == 0) {
      a.loss[row] = row_fill_value(kind);
      if constexpr (kStats) store_blank_token_stats(token_stats + row * kStatsWidth);
    }
    return;
  }
  const bool ce = p.ce_weight != 0.f;
  const bool hard = ce || (kOptions && p.z_loss != 0.f);  // a term at T = 1: the row's sum-exp is needed
  const bool smooth = kOptions && ce && p.label_smoothing > 0.f;
  const Logits<kOptions> L{p};
  const float s_label = (ce && tid == 0) ? L.s(load_elem(srow + label), 1u, 0) : 0.f;
  const int lead = row_lead<TS, VEC>(srow);
  const int64_t packs = (V + lead + VEC - 1) / VEC;

  uint4* stage = reinterpret_cast<uint4*>(smem);
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(smem + plan.stage_packs * 16);
  int32_t* slot_id = reinterpret_cast<int32_t*>(bitmap + plan.bitmap_words);
  float* slot_s = reinterpret_cast<float*>(slot_id + K);
  float* slot_lp = slot_s + K;
  float* slot_g = slot_lp + K;

  // --- support: slots into shared memory, the bitmap of their columns (pack positions).
  for (int64_t w = tid; w < plan.bitmap_words; w += nt) bitmap[w] = 0u;
  __syncthreads();
  int bad = 0;
  for (int64_t j = tid; j < K; j += nt) {
    const int64_t id = load_id(a, row, j);
    const bool valid = id >= 0, live = valid && id < V;
    bad |= valid && id >= V;
    slot_id[j] = live ? int32_t(id) : (valid ? int32_t(-2) : int32_t(-1));
    // An empty slot's log-prob is never read (it may be NaN).
    slot_lp[j] = live ? load_logprob(a, row, j) : FASTKD_NEG_INF;
    slot_s[j] = live ? load_elem(srow + id) : FASTKD_NEG_INF;
    if (live) atomicOr(&bitmap[(id + lead) >> 5], 1u << ((id + lead) & 31));
  }
  __syncthreads();
  // A valid id twice (K^2 / 2 compares over the CTA: 2 per thread at K = 64).
  for (int64_t j = tid; j < K; j += nt) {
    const int32_t id = slot_id[j];
    if (id < 0) continue;
    for (int64_t i = 0; i < j; ++i) bad |= slot_id[i] == id;
  }

  // --- row_stats: the one read of the row; the support's columns stay out of z_s. renorm
  // without the CE term or z-loss needs no full-row statistic: no read at all, the row's
  // gradient is zero off the support. With the options, label smoothing's sum of s' over the
  // row on the way (read only when smoothing).
  const float c = kLog2e * p.inv_temperature;
  const bool raw = hard && p.temperature != 1.0f;
  // kStats reads the row in any case (H(q), the student's argmax, Q), its gradient still 0 off
  // the support where the row is not otherwise read (zero_off).
  const bool zero_off = p.tail == Tail::Renorm && !hard;
  const bool sweep = !zero_off || kStats;
  RowStatsBase2 st = empty_stats();
  float sum_s = 0.f;
  for (int64_t base = tid; sweep && base < packs; base += int64_t(nt) * U) {
    Pack<TS, VEC> sp[U];
    uint32_t live[U];  // the lanes in the row (Logits)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t idx = base + int64_t(u) * nt;
      const int64_t col0 = idx * VEC - lead;
      if (col0 >= 0 && col0 + VEC <= V) {
        // Staged packs are read from memory once (streaming); the others stay cacheable
        // for write_grad's second read.
        sp[u] = idx < plan.stage_packs ? load_pack<TS, VEC, true>(srow + col0) : load_pack<TS, VEC, false>(srow + col0);
        live[u] = all_lanes<VEC>();
      } else {
        sp[u] = load_pack_masked<TS, VEC>(srow, col0, V);  // -inf outside the row (and past it)
        live[u] = live_lanes<VEC>(col0, V);
      }
      if (idx < plan.stage_packs) stage[idx] = sp[u].raw;
    }
    float ms = st.ms;
    if constexpr (kOptions) {  // monotone: the transform of the packs' maximum
      float m = FASTKD_NEG_INF;
#pragma unroll
      for (int u = 0; u < U; ++u) m = fmaxf(m, sp[u].max());
      ms = fmaxf(ms, L.max_s(m));
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) ms = fmaxf(ms, sp[u].max());
    }
    st.zs *= rescale(st.ms, ms, c);
    if (raw) st.zraw *= rescale(st.ms, ms, kLog2e);
    st.ms = ms;
    const float rs = ref_point(ms, c), rr = ref_point(ms, kLog2e);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t idx = base + int64_t(u) * nt;
      // The pack's VEC bits of the bitmap (VEC divides 32; positions idx*VEC ...).
      const uint32_t member = idx < packs ? bitmap[(idx * VEC) >> 5] >> ((idx * VEC) & 31) : 0u;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float s = L.s(sp[u].get(j), live[u], j);
        if constexpr (kOptions) sum_s += (live[u] >> j) & 1u ? s : 0.f;  // label smoothing's
        const float e = ex2(fmaf(s, c, -rs));
        st.zs += (member >> j) & 1u ? 0.f : e;
        if (raw) st.zraw += ex2(fmaf(s, kLog2e, -rr));
      }
    }
  }
  st = block_combine(st, c, stats_scratch);
  if (smooth) sum_s = block_sum(make_float4(sum_s, 0.f, 0.f, 0.f), reinterpret_cast<float4*>(sums_scratch)).x;
  if (__syncthreads_or(bad)) {
    fill_span(grow, 0, a.g_width, __int_as_float(0x7fc00000), tid, nt);
    if (tid == 0) {
      a.loss[row] = __int_as_float(0x7fc00000);
      if constexpr (kStats) store_blank_token_stats(token_stats + row * kStatsWidth);
    }
    return;
  }

  // --- row_sums: the bins, float64 (a call of its own: its registers stay out of the sweeps').
  RowConsts rc;
  set_param_consts(rc, p, *a.grad_scale);
  rc.c = c;
  rc.raw_is_q = p.temperature == 1.0f;
  const SupportResultOf<kStats> sup =
      support_phase<kOptions, kStats>(a, st, c, rc.gdiv, slot_id, slot_s, slot_lp, slot_g, sums_scratch);
  rc.ls = sup.ls;
  rc.lraw = rc.raw_is_q ? rc.ls : ref_point(st.ms, kLog2e) + lg2(st.zraw);
  set_raw_consts(rc, p, *a.grad_scale);
  const double D = sup.D;
  const float w_off = sup.w_off;

  // --- write_grad: q_i w_off (+ CE) over the row, from the staged packs where it can.
  // kStats: H(q)'s sum and the student's argmax (TokenStats; arg_t unused) on the way.
  const float w_off32 = w_off;
  TokenStats ts = empty_token_stats();
  for (int64_t base = tid; base < packs; base += int64_t(nt) * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t idx = base + int64_t(u) * nt;
      if (idx >= packs) break;
      const int64_t col0 = idx * VEC - lead;
      const bool inside = col0 >= 0 && col0 + VEC <= V;
      float g[VEC];
      if (!sweep) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] = 0.f;
      } else {
        Pack<TS, VEC> sp;
        if (idx < plan.stage_packs) sp.raw = stage[idx];
        else if (inside) sp = load_pack<TS, VEC, true>(srow + col0);
        else sp = load_pack_masked<TS, VEC>(srow, col0, V);
        const uint32_t live = inside ? all_lanes<VEC>() : live_lanes<VEC>(col0, V);
        const int64_t label_lane = label - col0;
        const bool has_label = rc.ce && uint64_t(label_lane) < uint64_t(VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float d;
          const float s = L.s(sp.get(j), live, j, d);
          const float q = ex2(fmaf(s, c, -rc.ls));
          g[j] = rc.gdiv * (q * w_off32);
          if constexpr (kStats) {
            if (zero_off) g[j] = 0.f;  // as without the diagnostics, whatever the row holds
            ts.hq += xlog2x(fmaf(s, c, -rc.ls));
            argmax_add(ts.arg_s, s, st.ms, uint32_t(col0 + j), (live >> j) & 1u);
          }
          if (kOptions ? rc.hard : rc.ce) {
            const float r = rc.raw_is_q ? q : ex2(fmaf(s, kLog2e, -rc.lraw));
            g[j] = add_hard_label_grad<kOptions>(g[j], r, has_label && j == label_lane, rc);
          }
          if constexpr (kOptions) g[j] *= d;
        }
      }
      if (inside) {
        if (plan.g_part == VEC) store_pack<TS, VEC>(grow + col0, g);
        else store_pack_parts<TS, VEC>(grow + col0, g, plan.g_part);
      } else {
        store_pack_masked<TS, VEC>(grow, col0, V, g);
      }
    }
  }
  fill_span(grow, V, a.g_width, 0.f, tid, nt);  // student columns past vocab_size
  __syncthreads();  // the support's stores land after the sweep's stores of the same columns
  for (int64_t j = tid; j < K; j += nt) {
    const int32_t id = slot_id[j];
    if (id < 0) continue;
    float g = slot_g[j];
    float d;
    const float s = L.s(slot_s[j], 1u, 0, d);
    if (kOptions ? rc.hard : rc.ce) {
      const float r = rc.raw_is_q ? ex2(fmaf(s, c, -rc.ls)) : ex2(fmaf(s, kLog2e, -rc.lraw));
      g = add_hard_label_grad<kOptions>(g, r, id == label, rc);
    }
    if constexpr (kOptions) g *= d;
    reinterpret_cast<typename Elem<TS>::Bits*>(grow)[id] = Elem<TS>::bits(g);
  }
  if (tid == 0) a.loss[row] = add_hard_label_loss<kOptions>(p.div_weight * float(D), rc, p, s_label, sum_s);
  if constexpr (kStats) {
    // In the support's scratch, free since the barrier above (the static shared memory, and
    // with it the room left for the row's staging, stays that of the other instances).
    ts.arg_t = sup.best_slot;
    ts = block_reduce(ts, reinterpret_cast<TokenStats*>(sums_scratch));
    if (tid == 0) {
      // The teacher's best id (an empty slot stands for id 0, as in fastkd/stats.py); a row
      // without a valid id never agrees.
      const int32_t best = ts.arg_t < uint32_t(K) ? slot_id[ts.arg_t] : int32_t(-1);
      const bool agree = sup.any_valid && uint32_t(best >= 0 ? best : 0) == ts.arg_s;
      store_token_stats(token_stats + row * kStatsWidth, sup.mass_p, ts.hq, agree, float(D), sup.mass_q);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Launcher.

int device_smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 48 * 1024;
  }
  return bytes;
}

// Room for the dynamic shared memory: the opt-in limit less this kernel's static arrays.
constexpr size_t kStaticSmem = sizeof(RowStatsBase2) * 32 + sizeof(double) * 32 * 4;

}  // namespace

SparsePlan sparse_plan_for(const SparseKDLaunch& a) {
  const RowLayout s = row_layout(a.student, a.s_stride, a.s_type);
  const RowLayout g = row_layout(a.grad, a.g_stride, a.s_type);
  const size_t room = size_t(device_smem_optin()) - kStaticSmem - 1024;  // 1 KB: the runtime's reserve
  return plan_sparse(a.p.vocab_size, a.k, s, g, a.n_rows, room, a.stage_limit);
}

cudaError_t launch_kd_sparse(const SparseKDLaunch& a, float* token_stats, cudaStream_t stream) {
  if (a.n_rows <= 0) return cudaSuccess;
  if (a.n_rows > 0x7fffffff || a.k < 0 || a.k > 0x7fffffff) return cudaErrorInvalidValue;
  const SparsePlan plan = sparse_plan_for(a);
  if (plan.refused != nullptr) return cudaErrorInvalidValue;
  if (token_stats != nullptr && a.p.vocab_size > kMaxStatsVocab) return cudaErrorInvalidValue;
  // The options path only where one is on, or with the diagnostics (their instance has it).
  const bool stats = token_stats != nullptr, options = stats || has_options(a.p);
  FASTKD_ELEM_TYPE_SWITCH(a.s_type, TS, {
    constexpr int kVec = 16 / int(sizeof(TS));
    if (plan.vec != kVec) return cudaErrorInvalidValue;
    auto kernel = stats     ? kd_sparse_kernel<TS, kVec, true, true>
                  : options ? kd_sparse_kernel<TS, kVec, true, false>
                            : kd_sparse_kernel<TS, kVec, false, false>;
    if (plan.smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<dim3(unsigned(a.n_rows)), dim3(plan.threads), plan.smem, stream>>>(a, plan, token_stats);
    return cudaGetLastError();
  });
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkd
