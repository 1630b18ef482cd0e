/*
 * Several teachers (docs/multi_teacher.md, "Kernel plan"): loss and gradient against K <=
 * kMaxKernelTeachers teachers per call, weighted per token, on the two-pass kernel's phases
 * (kd_twopass.cu). Compile-checked only: no GPU has run this file yet.
 *
 * One CTA per row. The row's K weights are read first; the teachers whose weight is not 0
 * there (a NaN weight counts as not 0, so NaN reaches the loss) are the row's active
 * teachers, na of them, in slots 0 .. na-1 in their given order. An inactive teacher's row
 * is never read (it may hold NaN or garbage), so per-token one-hot routing reads one teacher
 * row per token: the single-teacher traffic. The statistics sweep unrolls the slots (every
 * active teacher's pack loaded with the student's) behind branches `slot < na`, the same
 * for the whole CTA; the later sweeps loop over the na active slots at run time (Slots, in
 * shared memory), so a row computes with its active teachers only.
 *
 * Phases, each a sweep over the student's row and the active teachers' rows:
 *   row_stats   the student's (max, sum-exp) and T = 1 sum (CE, z-loss), and each active
 *               teacher's (max_k, sum_k), in one sweep (1 + na streams), one block reduction.
 *   row_sums    reverse_kl, jsd, tvd: the centring sums of dD/da = q (h - sum q h).
 *   write_grad  the gradient, written once (the last read of every row: streaming loads),
 *               the value sums of the loss, zeros past vocab_size.
 * Traffic, in rows: forward KL 2 (1 + na) reads + 1 write, the others 3 (1 + na) + 1.
 *
 * The teachers' term per entry i (base-2 units as kd_device.cuh: c = log2(e) / T,
 * log2 p_k,i = t_k,i c - lt_k, log2 q_i = s_i c - ls), with the row's weights w_k and
 * W = sum_k w_k over the active teachers:
 *   mixture  log2 m_i = log2 sum_k 2^(a_k,i),  a_k,i = t_k,i c - (lt_k - log2 w_k) = log2(w_k p_k,i),
 *            a log-sum-exp over the slots (never the log of a sum of probabilities, which is
 *            -inf wherever every p_k,i underflows); with one active teacher log2 m = a_0
 *            (no log-sum-exp). Then each divergence is its one-teacher form with p := m:
 *              forward_kl  D = sum m (log m - log q)            dD/da = W q - m
 *              reverse_kl  h = log q - log m                     dD/da = q (h - sum q h)
 *              jsd         h = log q - log M, M = beta m + (1 - beta) q,
 *                          D = beta sum m log(m / M) + (1 - beta) sum q h,   dD/da = (1 - beta) q (h - sum q h)
 *              tvd         h = sign(q - m) / 2, D = sum |q - m| / 2          dD/da = q (h - sum q h)
 *   sum      sum_k w_k D(p_k, q): each gradient is linear in the teachers' terms, so one
 *            per-entry combination replaces h and one set of row sums serves every teacher:
 *              forward_kl  dD/da = W q - sum_k w_k p_k,   D = sum_k w_k sum p_k (log p_k - log q)
 *              reverse_kl  H = sum_k w_k (log q - log p_k)
 *              jsd         H = sum_k w_k (log q - log M_k), M_k = beta p_k + (1 - beta) q,
 *                          D = beta sum_k w_k sum p_k log(p_k / M_k) + (1 - beta) sum q H
 *              tvd         H = sum_k w_k sign(q - p_k) / 2,  D = sum_k w_k sum |q - p_k| / 2
 *            with dD/da = q (H - sum q H) ((1 - beta) times that for jsd).
 * The centred forms use the two-pass kernel's centring (kd_device.cuh: small/big q split at
 * kPeak, sums divided by the fp32 mass of q); TVD takes it too (the one-teacher kernels'
 * exact sign masses do not extend to a weighted sum of signs). A row with no active teacher
 * (sum mode, every weight 0; or an all-zero mixture, which the weights' contract excludes)
 * has no divergence term: the sum mode's zero combination, D = 0 and dD/da = 0.
 *
 * Options (kOptions, kd_params.h), labels, ignore_index, vocab_size and padded widths,
 * in place, grad_scale: as in the two-pass kernel, with every teacher transformed alike
 * (teacher_logit_scale, teacher_softcap).
 *
 * Template instances: (student dtype, teacher dtype, kOptions), the dtype pairs of
 * multi_teacher_type_built (kd_cuda.h; 6 pairs: 12 kernels), the divergence and the teacher
 * mode switched per row inside (8 bodies each). The number of teachers and which are active
 * are run-time values of the row, not template parameters: a kernel templated on K = 1..4
 * (or on the active count) multiplies the instances, and unrolling the later sweeps over the
 * four slots made this file compile as long as the whole two-pass file (kd_twopass.cu)
 * without saving an instruction per entry. Registers: 72 to 126 per thread (ptxas, sm_80 and sm_90a),
 * no spills, hence 256 threads and two CTAs per SM (kd_cuda.h: kMultiMaxThreads).
 */
#include "../dispatch.h"
#include "kd_device.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace dev;

constexpr int KS = kMaxKernelTeachers;  // teacher slots

// ---------------------------------------------------------------------------------------
// The row's active teachers, compacted into slots (unrolled: the arrays stay in registers).

template <typename TT>
struct Active {
  const TT* row[KS];  // slot j's teacher row, j < n
  float w[KS];        // its weight
  float wsum;         // W = sum of the active weights
  int n;              // na
};

template <typename TT>
FASTKD_DEV Active<TT> active_teachers(const MultiKDLaunch& a, int64_t row) {
  Active<TT> t;
  t.n = 0;
  t.wsum = 0.f;
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    t.row[j] = nullptr;
    t.w[j] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    const float w = k < a.k ? a.weights[k * a.w_stride_k + row * a.w_stride_n] : 0.f;
    if (w != 0.f) {  // NaN is active: it must reach the loss
      const TT* r = static_cast<const TT*>(a.teachers[k]) + row * a.t_strides[k];
#pragma unroll
      for (int j = 0; j < KS; ++j) {
        if (j == t.n) {
          t.row[j] = r;
          t.w[j] = w;
        }
      }
      ++t.n;
      t.wsum += w;
    }
  }
  return t;
}

// One teacher pack of columns [col0, col0 + VEC): aligned and inside the row, aligned to
// t_part columns only, or straddling the row's ends (columns outside [0, V) read -inf).
template <bool kStreaming, typename TT, int VEC>
FASTKD_DEV Pack<TT, VEC> load_teacher(const TT* row, int64_t col0, bool inside, int t_part, int64_t V) {
  if (!inside) return load_pack_masked<TT, VEC>(row, col0, V);
  if (t_part == VEC) return load_pack<TT, VEC, kStreaming>(row + col0);
  return load_pack_parts<TT, VEC, kStreaming>(row + col0, t_part);
}

// The statistics sweep: calls f(sp, tp, live) over the packs of the row this thread owns
// (thread x: packs x, x + blockDim, ...), the student's pack and every active teacher's
// pack of the same columns (tp[j] for j < t.n), all loads issued before any use. `live`
// says which lanes are the row's.
template <typename TS, typename TT, int VEC, typename F>
FASTKD_DEV void stats_sweep(const TS* srow, const Active<TT>& t, int lead, int t_part, int64_t V, F&& f) {
  const int64_t packs = (V + lead + VEC - 1) / VEC;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const int64_t col0 = i * VEC - lead;
    const bool inside = col0 >= 0 && col0 + VEC <= V;
    Pack<TS, VEC> sp;
    Pack<TT, VEC> tp[KS];
    uint32_t live;
    if (inside) {
      sp = load_pack<TS, VEC, false>(srow + col0);
      live = all_lanes<VEC>();
    } else {
      sp = load_pack_masked<TS, VEC>(srow, col0, V);
      live = live_lanes<VEC>(col0, V);
    }
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      if (j < t.n) tp[j] = load_teacher<false, TT, VEC>(t.row[j], col0, inside, t_part, V);
      else tp[j].raw = {};
    }
    f(sp, tp, live);
  }
}

// The active teachers of the row for the later sweeps, in shared memory (thread 0 writes
// them once the statistics are known): those sweeps loop over the slots at run time, so
// that each teacher's per-entry code is compiled once, not once per slot (which made the
// kernel's compile time that of the whole two-pass file).
template <typename TT>
struct Slots {
  const TT* row[KS];
  float off[KS];  // slot j's entry is t c - off[j]: log2 p_j (sum), log2(w_j p_j) (mixture)
  float w[KS];
};

// The later sweeps: calls f(sp, t0, live, col0, inside) over the packs of the row this
// thread owns, with the student's pack and the first active teacher's (when na > 0), loaded
// together; teacher_side loads the other slots' packs. kStreaming: the row's last read.
template <bool kStreaming, typename TS, typename TT, int VEC, typename F>
FASTKD_DEV void sweep_row(const TS* srow, const Slots<TT>& slots, int na, int lead, int t_part, int64_t V, F&& f) {
  const int64_t packs = (V + lead + VEC - 1) / VEC;
  for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
    const int64_t col0 = i * VEC - lead;
    const bool inside = col0 >= 0 && col0 + VEC <= V;
    Pack<TS, VEC> sp;
    Pack<TT, VEC> t0;
    uint32_t live;
    if (inside) {
      sp = load_pack<TS, VEC, kStreaming>(srow + col0);
      live = all_lanes<VEC>();
    } else {
      sp = load_pack_masked<TS, VEC>(srow, col0, V);
      live = live_lanes<VEC>(col0, V);
    }
    if (na > 0) t0 = load_teacher<kStreaming, TT, VEC>(slots.row[0], col0, inside, t_part, V);
    else t0.raw = {};
    f(sp, t0, live, col0, inside);
  }
}

// ---------------------------------------------------------------------------------------
// Phase row_stats: the student's (max, sum-exp, T = 1 sum-exp) and each active teacher's
// (max, sum-exp), raw maxima and base-2 sums as RowStatsBase2.

struct MultiStats {
  float ms, zs, zraw;
  float mt[KS], zt[KS];
};

FASTKD_DEV MultiStats empty_multi_stats() {
  MultiStats st;
  st.ms = FASTKD_NEG_INF;
  st.zs = st.zraw = 0.f;
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    st.mt[j] = FASTKD_NEG_INF;
    st.zt[j] = 0.f;
  }
  return st;
}

// (m, z) += (m2, z2): one side's max and sum-exp at scale c (combine() of kd_device.cuh).
FASTKD_DEV void combine_side(float& m, float& z, float m2, float z2, float c) {
  const float M = fmaxf(m, m2);
  z = scaled_sum(z, rescale(m, M, c), z2, rescale(m2, M, c));
  m = M;
}

FASTKD_DEV void combine(MultiStats& x, const MultiStats& y, float c, int na) {
  const float ms = fmaxf(x.ms, y.ms);
  x.zraw = scaled_sum(x.zraw, rescale(x.ms, ms, kLog2e), y.zraw, rescale(y.ms, ms, kLog2e));
  combine_side(x.ms, x.zs, y.ms, y.zs, c);
#pragma unroll
  for (int j = 0; j < KS; ++j)
    if (j < na) combine_side(x.mt[j], x.zt[j], y.mt[j], y.zt[j], c);
}

FASTKD_DEV MultiStats shfl_xor(const MultiStats& v, int lane_mask, int na) {
  MultiStats r = v;
  r.ms = __shfl_xor_sync(0xffffffffu, v.ms, lane_mask);
  r.zs = __shfl_xor_sync(0xffffffffu, v.zs, lane_mask);
  r.zraw = __shfl_xor_sync(0xffffffffu, v.zraw, lane_mask);
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    if (j < na) {  // the same for every lane
      r.mt[j] = __shfl_xor_sync(0xffffffffu, v.mt[j], lane_mask);
      r.zt[j] = __shfl_xor_sync(0xffffffffu, v.zt[j], lane_mask);
    }
  }
  return r;
}

FASTKD_DEV void warp_combine(MultiStats& v, float c, int na) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) combine(v, shfl_xor(v, off, na), c, na);
}

// Every thread gets the row's statistics (block_combine of kd_device.cuh).
FASTKD_DEV MultiStats block_combine(MultiStats v, float c, int na, MultiStats* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  warp_combine(v, c, na);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : empty_multi_stats();
  warp_combine(v, c, na);
  return v;
}

// One pack of each stream into the running statistics (the online softmax, one rescale of
// a side's sums per pack). kRaw: the student's T = 1 sum too.
template <bool kRaw, typename TS, typename TT, int VEC, bool kOptions>
FASTKD_DEV void stats_add(MultiStats& st, const Pack<TS, VEC>& sp, const Pack<TT, VEC> (&tp)[KS], int na, float c,
                          const Logits<kOptions>& L, uint32_t live) {
  const float ms = fmaxf(st.ms, L.max_s(sp.max()));
  st.zs *= rescale(st.ms, ms, c);
  if (kRaw) st.zraw *= rescale(st.ms, ms, kLog2e);
  st.ms = ms;
  const float rs = ref_point(ms, c), rr = ref_point(ms, kLog2e);
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const float s = L.s(sp.get(e), live, e);
    st.zs += ex2(fmaf(s, c, -rs));
    if (kRaw) st.zraw += ex2(fmaf(s, kLog2e, -rr));
  }
#pragma unroll
  for (int j = 0; j < KS; ++j) {
    if (j < na) {
      const float mt = fmaxf(st.mt[j], L.max_t(tp[j].max()));
      st.zt[j] *= rescale(st.mt[j], mt, c);
      st.mt[j] = mt;
      const float rt = ref_point(mt, c);
#pragma unroll
      for (int e = 0; e < VEC; ++e) st.zt[j] += ex2(fmaf(L.t(tp[j].get(e), live, e), c, -rt));
    }
  }
}

// ---------------------------------------------------------------------------------------
// The teachers' term per entry.

// The sign of d as TVD's h (1/2, -1/2 or 0), NaN for NaN (it must reach the gradient).
FASTKD_DEV float half_sign(float d) { return d > 0.f ? 0.5f : (d < 0.f ? -0.5f : d); }

// The teachers' side at the VEC entries of one pack, given the student's log2 q (lq) and q:
//   mixture              y = log2 m
//   sum   forward_kl     y = sum_j w_j p_j,                 v = sum_j w_j p_j (log2 p_j - log2 q)
//         reverse_kl     y = sum_j w_j (log2 q - log2 p_j)
//         jsd            y = sum_j w_j (log2 q - log2 M_j),  v = sum_j w_j p_j (log2 p_j - log2 M_j)
//         tvd            y = sum_j w_j sign(q - p_j) / 2,    v = sum_j w_j |q - p_j| / 2
// A run-time loop over the na active slots (`t0`: slot 0's pack, loaded with the student's),
// each slot's pack loaded while the one before it is used.
template <Divergence DIV, TeacherMode MODE, bool kStreaming, typename TT, int VEC, bool kOptions>
FASTKD_DEV void teacher_side(float (&y)[VEC], float (&v)[VEC], const float (&lq)[VEC], const float (&q)[VEC],
                             const Pack<TT, VEC>& t0, const Slots<TT>& slots, int na, int64_t col0, bool inside,
                             int t_part, int64_t V, const RowConsts& k, const Logits<kOptions>& L, uint32_t live) {
  constexpr bool kMix = MODE == TeacherMode::Mixture;
  // Mixture: an online log-sum-exp over the slots per entry, y the running max and S the sum
  // of 2^(a - y). `!(a <= y)` takes a NaN term as the new maximum, so NaN propagates (fmaxf
  // would drop it); a -inf term (a zero probability, a padded lane) adds exactly 0; with one
  // active teacher y is a_0 itself (S is 1, or 0 for a -inf entry) and needs no logarithm.
  float S[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    y[e] = kMix ? FASTKD_NEG_INF : 0.f;
    v[e] = 0.f;
    S[e] = 0.f;
  }
  Pack<TT, VEC> cur = t0;
#pragma unroll 1
  for (int j = 0; j < na; ++j) {
    Pack<TT, VEC> next = cur;
    if (j + 1 < na) next = load_teacher<kStreaming, TT, VEC>(slots.row[j + 1], col0, inside, t_part, V);
    const float off = slots.off[j], w = slots.w[j];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = fmaf(L.t(cur.get(e), live, e), k.c, -off);  // a_j (mixture) or log2 p_j (sum)
      if constexpr (kMix) {
        const bool up = !(x <= y[e]);
        const float hi = up ? x : y[e], lo = up ? y[e] : x;
        const float d = lo == FASTKD_NEG_INF ? 0.f : ex2(lo - hi);
        S[e] = up ? fmaf(S[e], d, 1.f) : S[e] + d;
        y[e] = hi;
      } else if constexpr (DIV == Divergence::ReverseKL) {
        y[e] = fmaf(w, lq[e] - x, y[e]);  // -inf or NaN where q = 0: finish_entry zeroes it
      } else {
        const float p = ex2(x);
        const float wp = w * p;
        if constexpr (DIV == Divergence::ForwardKL) {
          y[e] += wp;
          v[e] += p == 0.f ? 0.f : wp * (x - lq[e]);
        } else if constexpr (DIV == Divergence::JSD) {
          const float lm = log2_add_exp2(x + k.lb2, lq[e] + k.l1b2);  // NaN where p = q = 0: unread there
          y[e] = fmaf(w, lq[e] - lm, y[e]);
          v[e] += p == 0.f ? 0.f : wp * (x - lm);
        } else {  // TVD
          const float d = q[e] - p;
          y[e] = fmaf(w, half_sign(d), y[e]);
          v[e] = fmaf(w, 0.5f * fabsf(d), v[e]);
        }
      }
    }
    cur = next;
  }
  if (kMix && na > 1) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) y[e] += lg2(S[e]);
  }
}

// One entry's h of the centred gradient (nats; forward KL: m = sum_j w_j p_j), and its
// value term v (forward KL and jsd: log2 units; tvd: plain), from teacher_side's y and v.
template <Divergence DIV, TeacherMode MODE>
FASTKD_DEV float finish_entry(float y, float& v, float lq, float q, const RowConsts& k) {
  constexpr bool kMix = MODE == TeacherMode::Mixture;
  if constexpr (DIV == Divergence::ForwardKL) {
    if constexpr (kMix) {
      const float m = ex2(y);
      v = m == 0.f ? 0.f : m * (y - lq);
      return m;
    } else {
      return y;
    }
  } else if constexpr (DIV == Divergence::ReverseKL) {
    return q == 0.f ? 0.f : kLn2 * (kMix ? lq - y : y);
  } else if constexpr (DIV == Divergence::JSD) {
    if constexpr (kMix) {
      const float m = ex2(y);
      const float lm = log2_add_exp2(y + k.lb2, lq + k.l1b2);
      v = m == 0.f ? 0.f : m * (y - lm);
      return q == 0.f ? 0.f : kLn2 * (lq - lm);
    } else {
      return q == 0.f ? 0.f : kLn2 * y;
    }
  } else {  // TVD
    if constexpr (kMix) {
      const float d = q - ex2(y);
      v = 0.5f * fabsf(d);
      return half_sign(d);
    } else {
      return y;
    }
  }
}

// dD/da at one entry: forward KL W q - m (h holds m), the others the centred form with the
// centring constants `tot` (centring()).
template <Divergence DIV>
FASTKD_DEV float entry_ddiv(float h, float q, float wsum, const float4& tot, const RowConsts& k) {
  if constexpr (DIV == Divergence::ForwardKL) {
    return fmaf(wsum, q, -h);
  } else {
    const float centred = q > kPeak ? h * tot.x - tot.y : h - tot.z;
    const float scale = DIV == Divergence::JSD ? 1.0f - k.beta : 1.0f;
    return scale * q * centred;
  }
}

// The student's side of one pack: s' (and ds'/ds into ds with the options), log2 q, q.
template <typename TS, int VEC, bool kOptions>
FASTKD_DEV void student_side(float (&s)[VEC], float (&ds)[VEC], float (&lq)[VEC], float (&q)[VEC],
                             const Pack<TS, VEC>& sp, const RowConsts& k, const Logits<kOptions>& L, uint32_t live) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    ds[e] = 1.f;
    s[e] = L.s(sp.get(e), live, e, ds[e]);
    lq[e] = fmaf(s[e], k.c, -k.ls);
    q[e] = ex2(lq[e]);
  }
}

// ---------------------------------------------------------------------------------------
// The phases after row_stats, for one divergence and teacher mode. `row`: the row's
// streams and constants.

template <typename TS, typename TT, bool kOptions>
struct Row {
  const TS* s;
  TS* g;
  const Slots<TT>& slots;
  int na;
  float wsum;
  int lead, t_part;
  int64_t V, label;
  const RowConsts& k;
  const Logits<kOptions>& L;
};

template <Divergence DIV, TeacherMode MODE, int VEC, typename TS, typename TT, bool kOptions>
FASTKD_DEV float4 row_sums(const Row<TS, TT, kOptions>& r, float4* scratch) {
  float4 tot = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (DIV != Divergence::ForwardKL) {
    if (r.na == 0) return tot;  // no divergence term: nothing to centre
    // TwoSum across a thread's packs, as the two-pass kernel's row_sums (kd_twopass.cu says why).
    float4 acc = tot, err = tot;
    sweep_row<false, TS, TT, VEC>(r.s, r.slots, r.na, r.lead, r.t_part, r.V, [&](const Pack<TS, VEC>& sp,
        const Pack<TT, VEC>& t0, uint32_t live, int64_t col0, bool inside) {
      float s[VEC], ds[VEC], lq[VEC], q[VEC], y[VEC], v[VEC];
      student_side<TS, VEC>(s, ds, lq, q, sp, r.k, r.L, live);
      teacher_side<DIV, MODE, false>(y, v, lq, q, t0, r.slots, r.na, col0, inside, r.t_part, r.V, r.k, r.L, live);
      float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float h = finish_entry<DIV, MODE>(y[e], v[e], lq[e], q[e], r.k);
        const float qh = q[e] * h;
        const bool big = q[e] > kPeak;
        part.x += big ? 0.f : q[e];
        part.y += big ? 0.f : qh;
        part.z += big ? qh : 0.f;
        part.w += big ? q[e] : 0.f;
      }
      two_sum_add(acc, err, part);
    });
    tot = block_sum(acc + err, scratch);
    tot = centring<false>(tot, tot.w);  // tot.w: sum_big q
  }
  return tot;
}

// The write sweep: the gradient of each pack, the value sums into kl (x: the divergence's
// value terms, z: the sum of s' for label smoothing). kHard (the options only): the terms at
// T = 1 on (1) or off (0) for the whole sweep, -1 without the options (the plain CE term).
template <Divergence DIV, TeacherMode MODE, int kHard, int VEC, typename TS, typename TT, bool kOptions>
FASTKD_DEV void write_sweep(const MultiKDLaunch& a, const Row<TS, TT, kOptions>& r, const float4& tot, float4& kl) {
  const RowConsts& k = r.k;
  sweep_row<true, TS, TT, VEC>(r.s, r.slots, r.na, r.lead, r.t_part, r.V, [&](const Pack<TS, VEC>& sp,
      const Pack<TT, VEC>& t0, uint32_t live, int64_t col0, bool inside) {
    float s[VEC], ds[VEC], lq[VEC], q[VEC], y[VEC], v[VEC];
    student_side<TS, VEC>(s, ds, lq, q, sp, k, r.L, live);
    teacher_side<DIV, MODE, true>(y, v, lq, q, t0, r.slots, r.na, col0, inside, r.t_part, r.V, k, r.L, live);
    const int64_t label_lane = r.label - col0;
    float g[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float h = finish_entry<DIV, MODE>(y[e], v[e], lq[e], q[e], k);
      if constexpr (DIV != Divergence::ReverseKL) kl.x += v[e];
      if constexpr (kOptions) kl.z += (live >> e) & 1u ? s[e] : 0.f;
      float ge = k.gdiv * entry_ddiv<DIV>(h, q[e], r.wsum, tot, k);
      const bool is_label = label_lane == e;
      if constexpr (kHard == 1) {
        const float rr = k.raw_is_q ? q[e] : ex2(fmaf(s[e], kLog2e, -k.lraw));
        // graw r - target in one rounding: the label entry of a confident row cancels.
        ge = fmaf(k.graw, rr, -(is_label ? k.ghot + k.gsmooth : k.gsmooth)) + ge;
      } else if constexpr (kHard == -1) {
        if (k.ce) {
          const float rr = k.raw_is_q ? q[e] : ex2(fmaf(s[e], kLog2e, -k.lraw));
          ge = fmaf(k.gce, is_label ? rr - 1.0f : rr, ge);  // the one-hot before the product: one rounding
        }
      }
      g[e] = kOptions ? ge * ds[e] : ge;
    }
    if (inside) {
      if (a.g_part == VEC) store_pack<TS, VEC>(r.g + col0, g);
      else store_pack_parts<TS, VEC>(r.g + col0, g, a.g_part);
    } else {
      store_pack_masked<TS, VEC>(r.g, col0, r.V, g);
    }
  });
}

template <Divergence DIV, TeacherMode MODE, int VEC, typename TS, typename TT, bool kOptions>
FASTKD_DEV void row_sums_write_grad(const MultiKDLaunch& a, int64_t row, const Row<TS, TT, kOptions>& r,
                                    float s_label, float4* sums_scratch, float4* kl_scratch) {
  const RowConsts& k = r.k;
  const float4 tot = row_sums<DIV, MODE, VEC>(r, sums_scratch);
  float4 kl = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kOptions) {
    if (k.hard) write_sweep<DIV, MODE, 1, VEC>(a, r, tot, kl);
    else write_sweep<DIV, MODE, 0, VEC>(a, r, tot, kl);
  } else {
    write_sweep<DIV, MODE, -1, VEC>(a, r, tot, kl);
  }
  const float4 sums = block_sum(kl, kl_scratch);
  float D;
  if constexpr (DIV == Divergence::ForwardKL) D = kLn2 * sums.x;
  else if constexpr (DIV == Divergence::ReverseKL) D = tot.w;
  else if constexpr (DIV == Divergence::JSD) D = k.beta * kLn2 * sums.x + (1.0f - k.beta) * tot.w;
  else D = sums.x;
  if (threadIdx.x == 0) a.loss[row] = add_hard_label_loss<kOptions>(a.p.div_weight * D, k, a.p, s_label, sums.z);
  fill_span(r.g, r.V, a.g_width, 0.f, threadIdx.x, blockDim.x);  // a padded vocabulary: zero gradient
}

// ---------------------------------------------------------------------------------------
// The kernel.

template <typename TS, typename TT, int VEC, bool kOptions>
__global__ void __launch_bounds__(kMultiMaxThreads, kMultiMinBlocksPerSM) kd_multi_kernel(const MultiKDLaunch a) {
  __shared__ MultiStats stats_scratch[32];
  __shared__ float4 sums_scratch[32];
  __shared__ float4 kl_scratch[32];
  __shared__ Slots<TT> slots;
  const KDParams& p = a.p;
  const int64_t row = blockIdx.x;
  const int64_t V = p.vocab_size;
  const TS* srow = static_cast<const TS*>(a.student) + row * a.s_stride;
  TS* grow = static_cast<TS*>(a.grad) + row * a.g_stride;
  int64_t label;
  const RowKind kind = classify_row(a.labels, row, p, 0, label);
  if (kind != RowKind::Normal) {  // an ignored row's weights are not read
    fill_span(grow, 0, a.g_width, row_fill_value(kind), threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) a.loss[row] = row_fill_value(kind);
    return;
  }
  const Active<TT> t = active_teachers<TT>(a, row);
  const bool ce = p.ce_weight != 0.f;
  const bool hard = ce || (kOptions && p.z_loss != 0.f);  // the T = 1 sum-exp is needed
  const Logits<kOptions> L{p};
  // Read before any thread can overwrite the row (in place): the statistics' block
  // reduction separates it from the first gradient store.
  const float s_label = (ce && threadIdx.x == 0) ? L.s(load_elem(srow + label), 1u, 0) : 0.f;
  const int lead = row_lead<TS, VEC>(srow);
  const float grad_scale = *a.grad_scale;

  // Phase row_stats.
  const float c = kLog2e * p.inv_temperature;
  MultiStats st = empty_multi_stats();
  const bool raw = hard && p.temperature != 1.0f;
  using SP = const Pack<TS, VEC>&;
  using TP = const Pack<TT, VEC>(&)[KS];
  if (raw) {
    stats_sweep<TS, TT, VEC>(srow, t, lead, a.t_part, V, [&](SP sp, TP tp, uint32_t live) {
      stats_add<true>(st, sp, tp, t.n, c, L, live);
    });
  } else {
    stats_sweep<TS, TT, VEC>(srow, t, lead, a.t_part, V, [&](SP sp, TP tp, uint32_t live) {
      stats_add<false>(st, sp, tp, t.n, c, L, live);
    });
  }
  st = block_combine(st, c, t.n, stats_scratch);

  // The student's constants as the one-teacher kernels' (row_consts), the teachers' per slot.
  RowConsts k;
  k.c = c;
  k.ls = ref_point(st.ms, c) + lg2(st.zs);
  k.lt = 0.f;  // per teacher: slots.off
  k.raw_is_q = p.temperature == 1.0f;
  k.lraw = k.raw_is_q ? k.ls : ref_point(st.ms, kLog2e) + lg2(st.zraw);
  set_param_consts(k, p, grad_scale);
  set_raw_consts(k, p, grad_scale);
  // No active teacher: the sum mode's zero combination (no divergence term).
  const bool mixture = p.teacher_mode == TeacherMode::Mixture && t.n > 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      // log2 w_j in mixture mode; a weight of exactly 1 (one routed teacher) adds exactly 0.
      const float lw = mixture && t.w[j] != 1.0f ? lg2(t.w[j]) : 0.f;
      slots.row[j] = t.row[j];
      slots.off[j] = j < t.n ? ref_point(st.mt[j], c) + lg2(st.zt[j]) - lw : 0.f;
      slots.w[j] = t.w[j];
    }
  }
  __syncthreads();
  const Row<TS, TT, kOptions> r{srow, grow, slots, t.n, t.wsum, lead, a.t_part, V, label, k, L};

  FASTKD_DIVERGENCE_SWITCH(p.divergence, DIV, {
    if (mixture) row_sums_write_grad<DIV, TeacherMode::Mixture, VEC>(a, row, r, s_label, sums_scratch, kl_scratch);
    else row_sums_write_grad<DIV, TeacherMode::Sum, VEC>(a, row, r, s_label, sums_scratch, kl_scratch);
  });
}

// ---------------------------------------------------------------------------------------
// Launcher.

bool valid_part(int part, int vec) { return part >= 1 && part <= vec && (part & (part - 1)) == 0; }

template <typename TS, typename TT>
cudaError_t launch_instance(const MultiKDLaunch& k, const MultiPlan& plan, bool options, dim3 grid, dim3 block,
                            cudaStream_t stream) {
  constexpr int kVec = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  if (plan.vec != kVec) return cudaErrorInvalidValue;
  if (options) kd_multi_kernel<TS, TT, kVec, true><<<grid, block, 0, stream>>>(k);
  else kd_multi_kernel<TS, TT, kVec, false><<<grid, block, 0, stream>>>(k);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kd_multi(const MultiKDLaunch& a, const MultiPlan& plan, cudaStream_t stream) {
  if (a.n_rows <= 0) return cudaSuccess;
  if (a.n_rows > 0x7fffffff || a.k < 1 || a.k > kMaxKernelTeachers || plan.threads < 32 ||
      plan.threads > kMultiMaxThreads || !valid_part(plan.t_part, plan.vec) || !valid_part(plan.g_part, plan.vec))
    return cudaErrorInvalidValue;
  MultiKDLaunch k = a;
  k.t_part = plan.t_part;
  k.g_part = plan.g_part;
  const dim3 grid(static_cast<unsigned>(a.n_rows)), block(plan.threads);
  const bool options = has_options(a.p);
  // The built pairs (multi_teacher_type, kd_cuda.h): the student's dtype, float32, and bf16
  // teachers of a float32 student.
  FASTKD_ELEM_TYPE_SWITCH(a.s_type, TS, {
    if (a.t_type == a.s_type) return launch_instance<TS, TS>(k, plan, options, grid, block, stream);
    if constexpr (std::is_same<TS, float>::value) {
      if (a.t_type == ElemType::BF16) return launch_instance<float, __nv_bfloat16>(k, plan, options, grid, block, stream);
    } else {
      if (a.t_type == ElemType::F32) return launch_instance<TS, float>(k, plan, options, grid, block, stream);
    }
  });
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkd
