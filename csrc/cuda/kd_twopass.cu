/*
 * Fused knowledge-distillation loss and gradient: the portable (sm_80+) kernel.
 *
 * One CTA per row (token), the row streamed from memory once per phase (the phases of
 * every fastkd kernel, named alike in csrc/cpu/kd_cpu.cpp and the Triton kernels):
 *   row_stats   reads s and t once, computing both sides' (max, sum 2^(x c - max c)) with
 *               a chunked online softmax (one exponential per element and side; the CE
 *               term's T = 1 sum too when T != 1), then one block reduction.
 *   row_sums    reverse_kl, jsd and tvd only: re-reads s and t for the row sums their
 *               centred gradient  dD/da = q (h - sum q h)  needs before any element can be
 *               written.
 *   write_grad  re-reads s and t and writes the gradient once, in the student's dtype:
 *                   ds = grad_scale (div_weight dD/da / T + ce_weight (softmax(s) - onehot))
 *               and zeros past vocab_size; forward KL accumulates its divergence here
 *               (sum p (t - s) and sum p), JSD its sum p log2(p/m) (row_sums has no slot
 *               left for it), and the row's loss is written after it.
 * The math (base-2 units, the -inf and peaked-row guards) is in kd_device.cuh; it
 * reproduces csrc/cpu/kd_cpu.cpp. Row statistics may come from the caller instead
 * (`stats_in`, the vocab-parallel path), which skips row_stats; the vocab-parallel
 * write_grad of one slice (kShard) also takes the row sums from the caller (`sums_in`),
 * which skips row_sums, and the slice's own row_stats and row_sums phases run as kernels
 * of their own (row_stats_kernel of width kShardStatsWidth, shard_row_sums_kernel) over
 * the same sweeps.
 *
 * The logit options (kd_params.h states the contract): the instances with kOptions (chosen
 * per launch, has_options in kd_cuda.h) transform each element as it is widened (s', t'),
 * add the terms at T = 1 of label smoothing and the z-loss, and multiply the gradient by the
 * transform's ds'/ds; label smoothing's sum of s' is accumulated by the write sweep (by the
 * statistics sweep in the slice's row_stats, column 6). The instances without it are the
 * kernels as they were: ptxas gives their sm_90a builds the same registers, no spill.
 *
 * The per-token diagnostics (return_stats; kd_device.cuh: TokenStats): the forward kernel's
 * kStats instances (with kOptions, never kShard) track each side's argmax in the row_stats
 * sweep (a thread's lowest column holding its running maximum; after the combine, the
 * lowest column among the threads holding the row's: the agreement is stored then), and
 * add the sums of q log2 q and p log2 p to the write sweep, where q and p are formed; two
 * more block reductions, and a [kStatsWidth] row written by thread 0 beside the loss. (The
 * argmax in the write sweep, beside the gradient's registers, made the 16-bit instances
 * spill 188 bytes at 64 registers.) No pass of their own; the other instances have no code
 * for them.
 *
 * Traffic, in units of N * V * bytes: forward KL 5 (two reads of s and t, one write),
 * the other divergences 7, against the 3 of the floor. Why a third pass from memory and
 * not a shared-memory copy of the row for the centred divergences: a row of s and t is
 * 4V bytes in bf16, 512 KB at V = 128k, far over the 227 KB an H100 CTA can hold (or the
 * 163 KB of an A100); it fits only for V below ~40k, and there it would limit the SM to
 * one resident row, serialising load and compute. Holding the whole row on chip is the
 * cluster kernel's job (kd_cluster.cu, sm_90), which spreads it over up to 16 SMs'
 * registers; this kernel stays simple and register-light as the portable fallback, and
 * leaves the first passes' loads cacheable so short rows are re-read from L2.
 *
 * Alignment: packs are 16 bytes of the wider dtype. Pack i of a row covers columns
 * [i*VEC - lead, (i+1)*VEC - lead), lead being the row's offset from a 16-byte boundary,
 * so odd V works with aligned loads. The grid follows the student's rows; the teacher and
 * the gradient have their own offsets, and where those differ from the student's (a
 * teacher row stride that is not a multiple of VEC, a gradient of another layout) the plan
 * gives them narrower parts (a.t_part / a.g_part columns, the widest their alignment
 * allows: load_pack_parts) instead of giving up on vectors for all three.
 */
#include "../dispatch.h"
#include "kd_device.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace dev;

// Packs of each tensor in flight per thread: kTwoPassUnroll, but one in the fused kernel's
// instances with the options (kd_twopass_kernel<..., kOptions>). There the transform's
// temporaries did not fit beside two pack pairs in 64 registers: its write sweep spilled
// inside the loop, or not, as ptxas's if-conversion of the per-row branches fell. With one,
// none spills in a loop (cuobjdump), and 1024 threads still hold 32 KB of loads in flight
// per SM, about twice what an H100's bandwidth-latency product asks (unmeasured).
template <bool kOptions>
constexpr int kFusedUnroll = kOptions ? 1 : kTwoPassUnroll;

// Calls f(sp[U], tp[U], live[U], base) over the row's packs; thread x owns packs
// base + u*blockDim for base = x, x + U*blockDim, ... Packs straddling the row's ends, or
// past them, read -inf in the missing columns, and live[u] (live_lanes) says which lanes
// are the row's (unused, and so not computed, where no transform or label smoothing asks).
// kStreaming marks the last read of the row (evict-first).
template <bool kStreaming, int VEC, int U, typename TS, typename TT, typename F>
FASTKD_DEV void sweep_row(const TS* srow, const TT* trow, int lead, int t_part, int64_t V, F&& f) {
  const int64_t packs = (V + lead + VEC - 1) / VEC;
  const int64_t step = int64_t(blockDim.x) * U;
  for (int64_t base = threadIdx.x; base < packs; base += step) {
    Pack<TS, VEC> sp[U];
    Pack<TT, VEC> tp[U];
    uint32_t live[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + int64_t(u) * blockDim.x) * VEC - lead;
      if (col0 >= 0 && col0 + VEC <= V) {
        sp[u] = load_pack<TS, VEC, kStreaming>(srow + col0);
        tp[u] = t_part == VEC ? load_pack<TT, VEC, kStreaming>(trow + col0)
                              : load_pack_parts<TT, VEC, kStreaming>(trow + col0, t_part);
        live[u] = all_lanes<VEC>();
      } else {
        sp[u] = load_pack_masked<TS, VEC>(srow, col0, V);
        tp[u] = load_pack_masked<TT, VEC>(trow, col0, V);
        live[u] = live_lanes<VEC>(col0, V);
      }
    }
    f(sp, tp, live, base);
  }
}

// Phase row_stats: this thread's share of both sides' (max, sum-exp) over the row, and
// of the T = 1 sum when `raw` (CE term or z-loss, T != 1), into `st`; block_combine() then
// gives every thread the row's statistics. With the options, also this thread's share of
// label smoothing's sum of s' into sum_s.
// kA / kStudentA: also the value term st.a (RowStatsBase2) of the teacher's / student's side.
template <bool kStreaming, int VEC, int U, bool kA = false, bool kStudentA = false, typename TS, typename TT,
          bool kOptions>
FASTKD_DEV void row_stats(RowStatsBase2& st, const TS* srow, const TT* trow, int lead, int t_part, int64_t V, float c,
                          bool raw, const Logits<kOptions>& L, float& sum_s) {
  using SP = const Pack<TS, VEC>(&)[U];
  using TP = const Pack<TT, VEC>(&)[U];
  using LP = const uint32_t(&)[U];
  if (raw) {
    sweep_row<kStreaming, VEC, U>(srow, trow, lead, t_part, V, [&](SP sp, TP tp, LP live, int64_t) {
      row_stats_add<true, kA, U, TS, TT, VEC, kStudentA>(st, sp, tp, c, L, live, sum_s);
    });
  } else {
    sweep_row<kStreaming, VEC, U>(srow, trow, lead, t_part, V, [&](SP sp, TP tp, LP live, int64_t) {
      row_stats_add<false, kA, U, TS, TT, VEC, kStudentA>(st, sp, tp, c, L, live, sum_s);
    });
  }
}

// row_stats (the fused kernel's: no value term, label smoothing's sum not read) with each
// side's running argmax over this thread's columns into ts (argmax_track; kStats).
template <int VEC, int U, typename TS, typename TT, bool kOptions>
FASTKD_DEV void row_stats_argmax(RowStatsBase2& st, TokenStats& ts, const TS* srow, const TT* trow, int lead,
                                 int t_part, int64_t V, float c, bool raw, const Logits<kOptions>& L) {
  using SP = const Pack<TS, VEC>(&)[U];
  using TP = const Pack<TT, VEC>(&)[U];
  using LP = const uint32_t(&)[U];
  float unused = 0.f;
  const auto add = [&](auto kRaw, SP sp, TP tp, LP live, int64_t base) {
    const float ms0 = st.ms, mt0 = st.mt;
    row_stats_add<decltype(kRaw)::value, false, U, TS, TT, VEC>(st, sp, tp, c, L, live, unused);
    uint32_t col0[U];
#pragma unroll
    for (int u = 0; u < U; ++u) col0[u] = uint32_t((base + int64_t(u) * blockDim.x) * VEC - lead);
    argmax_track<U>(ts, ms0, mt0, st, sp, tp, L, live, col0);
  };
  if (raw) {
    sweep_row<false, VEC, U>(srow, trow, lead, t_part, V, [&](SP sp, TP tp, LP live, int64_t base) {
      add(std::true_type{}, sp, tp, live, base);
    });
  } else {
    sweep_row<false, VEC, U>(srow, trow, lead, t_part, V, [&](SP sp, TP tp, LP live, int64_t base) {
      add(std::false_type{}, sp, tp, live, base);
    });
  }
}

// Phase row_sums: the row sums of the divergence's gradient (reverse_kl, jsd, tvd; zeros
// for forward_kl, which needs none): TVD's sums, or the centring constants of reverse_kl
// and jsd (centring()).
template <Divergence DIV, int VEC, typename TS, typename TT, bool kShard, bool kOptions>
FASTKD_DEV float4 row_sums(const LaunchRow<TS, TT, kShard>& r, int lead, int t_part, int64_t V, const RowConsts& k,
                           const Logits<kOptions>& L, float4* scratch) {
  constexpr int U = kFusedUnroll<kOptions>;
  float4 tot = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (DIV != Divergence::ForwardKL) {
    constexpr bool kCentred = DIV == Divergence::ReverseKL || DIV == Divergence::JSD;
    // Each iteration's U * VEC elements (8 or 16) are summed in fp32, and the iterations'
    // partials (up to 32 per thread at V = 262144) are added with TwoSum, keeping their
    // rounding errors: a thread's sums come out about as good as fp64 ones, for 24 fp32
    // adds per iteration and no fp64 (1/64 rate on consumer GPUs). The block reduction
    // stays a fp32 tree (10 levels). A serial fp32 sum over the thread's 256 elements
    // (V = 262144) doubled JSD's fp32 error once the centring was normalised (emulated:
    // T = 1 3.8e-6 vs 1.5e-6, T = 0.5 3.4e-4 vs 1.7e-4 from float64).
    float4 acc = tot, err = tot;
    sweep_row<false, VEC, U>(r.s, r.t, lead, t_part, V, [&](const Pack<TS, VEC>(&sp)[U], const Pack<TT, VEC>(&tp)[U],
                                                           const uint32_t(&live)[U], int64_t) {
      float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          row_sums_add<DIV, true>(part, L.s(sp[u].get(j), live[u], j), L.t(tp[u].get(j), live[u], j), k);
      two_sum_add(acc, err, part);
    });
    tot = block_sum(acc + err, scratch);
    if constexpr (kCentred) tot = centring<false>(tot, tot.w);  // tot.w: sum_big q
  }
  return tot;
}

// Phase write_grad: the gradient, written once (the row's last read of s and t), then the
// row's loss, whose forward KL and JSD terms (and label smoothing's sum of s') this sweep
// accumulates, and zeros past vocab_size.
// The write sweep: the gradient of every pack (write_grad_pack; kHard as there), and the
// loss's value sums into kl when kSums. kStats: the entropies' sums into ts (TokenStats),
// from the same s', t' (and, after CSE, q and p).
template <Divergence DIV, int VEC, bool kSums, int kHard, bool kStats, typename TS, typename TT, bool kShard,
          bool kOptions>
FASTKD_DEV void write_sweep(const KDLaunch& a, const LaunchRow<TS, TT, kShard>& r, int lead, int64_t V,
                            const RowConsts& k, const Logits<kOptions>& L, const float4& tot, float4& kl,
                            TokenStats& ts) {
  constexpr int U = kFusedUnroll<kOptions>;
  sweep_row<true, VEC, U>(r.s, r.t, lead, a.t_part, V, [&](const Pack<TS, VEC>(&sp)[U], const Pack<TT, VEC>(&tp)[U],
                                                          const uint32_t(&live)[U], int64_t base) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t col0 = (base + int64_t(u) * blockDim.x) * VEC - lead;
      if (col0 >= V) break;
      float g[VEC];
      write_grad_pack<DIV, kSums, 1, kHard>(g, sp[u], tp[u], k, L, live[u], tot, r.label - col0, kl);
      if constexpr (kStats) {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          entropy_add(ts, L.s(sp[u].template get<1>(j, k.opaque_zero), live[u], j),
                      L.t(tp[u].template get<1>(j, k.opaque_zero), live[u], j), k);
      }
      if (col0 >= 0 && col0 + VEC <= V) {
        if (a.g_part == VEC) store_pack<TS, VEC>(r.g + col0, g);
        else store_pack_parts<TS, VEC>(r.g + col0, g, a.g_part);
      } else store_pack_masked<TS, VEC>(r.g, col0, V, g);
    }
  });
}

// kStats: also the row's per-token diagnostics but the agreement (stored by the kernel after
// row_stats), from the write sweep's sums.
template <Divergence DIV, int VEC, bool kStats, typename TS, typename TT, bool kShard, bool kOptions>
FASTKD_DEV void write_grad(const KDLaunch& a, int64_t row, const LaunchRow<TS, TT, kShard>& r, int lead, int64_t V,
                           float s_label, const RowConsts& k, const Logits<kOptions>& L, const float4& tot,
                           float4* kl_scratch) {
  // The value sums of the loss. Not in a slice's write_grad with the options: its loss (the
  // slice's share) is not read, and the sums' registers made that instance spill.
  constexpr bool kSums = !(kShard && kOptions);
  float4 kl = make_float4(0.f, 0.f, 0.f, 0.f);
  TokenStats ts = empty_token_stats();
  if constexpr (kOptions) {  // the terms at T = 1 on or off for the whole sweep
    if (k.hard) write_sweep<DIV, VEC, kSums, 1, kStats>(a, r, lead, V, k, L, tot, kl, ts);
    else write_sweep<DIV, VEC, kSums, 0, kStats>(a, r, lead, V, k, L, tot, kl, ts);
  } else {
    write_sweep<DIV, VEC, kSums, -1, kStats>(a, r, lead, V, k, L, tot, kl, ts);
  }

  // kl: (forward KL: sum p (t - s), sum p; JSD: sum p log2(p/m), -; sum of s', -).
  float4 sums = kl;
  if (kSums && (DIV == Divergence::ForwardKL || DIV == Divergence::JSD || (kOptions && k.smooth)))
    sums = block_sum(kl, kl_scratch);
  float D;
  if constexpr (DIV == Divergence::ForwardKL) D = kLn2 * (k.c * sums.x - (k.lt - k.ls) * sums.y);
  else D = divergence_from_sums<DIV>(tot, tot.w, sums.x, k);  // JSD: sum p log2(p/m) from the sweep
  if (threadIdx.x == 0) a.loss[row] = add_hard_label_loss<kOptions>(a.p.div_weight * D, k, a.p, s_label, sums.z);
  if constexpr (kStats) {
    __shared__ TokenStats ts_scratch[32];
    ts = block_reduce(ts, ts_scratch);
    if (threadIdx.x == 0) store_token_sums(a.token_stats + row * kStatsWidth, -kLn2 * ts.hp, ts.hq, D, 0.f);
  }
  // Student columns past vocab_size (a padded vocabulary) get zero gradient.
  fill_span(r.g, V, a.g_width, 0.f, threadIdx.x, blockDim.x);
}

// The phases after row_stats, for one divergence. (V is read here again, not passed
// from the kernel: the kernel's PTX, and with it ptxas's register counts, stays that of
// the hand-written version.)
// The caller's row sums (kRowSumsWidth layout: big q before big q h, fastkd/backends) as
// row_sums() returns them: TVD's sums, or the centring constants of reverse_kl / jsd.
template <Divergence DIV>
FASTKD_DEV float4 given_row_sums(const float* v) {
  if constexpr (DIV == Divergence::ForwardKL) return make_float4(0.f, 0.f, 0.f, 0.f);
  else if constexpr (DIV == Divergence::TVD) return make_float4(v[0], v[1], v[2], v[3]);
  else return centring<false>(make_float4(v[0], v[1], v[3], 0.f), v[2]);
}

template <Divergence DIV, int VEC, bool kStats, typename TS, typename TT, bool kShard, bool kOptions>
FASTKD_DEV void row_sums_write_grad(const KDLaunch& a, int64_t row, const LaunchRow<TS, TT, kShard>& r, int lead,
                                    float s_label, const RowConsts& k, const Logits<kOptions>& L,
                                    float4* sums_scratch, float4* kl_scratch) {
  const int64_t V = a.p.vocab_size;
  float4 tot;
  if constexpr (kShard) tot = given_row_sums<DIV>(a.sums_in + row * kRowSumsWidth);
  else tot = row_sums<DIV, VEC>(r, lead, a.t_part, V, k, L, sums_scratch);
  write_grad<DIV, VEC, kStats>(a, row, r, lead, V, s_label, k, L, tot, kl_scratch);
}

// kShard: the vocab-parallel write_grad of one slice (stats_in, sums_in and the slice's
// labels given; the loss it writes is the slice's share, unused).
// kOptions: the instance that applies the logit options (has_options; kd_device.cuh).
// kStats: the instance that also writes the per-token diagnostics (a.token_stats; TokenStats
// in kd_device.cuh), launched with kOptions, never with kShard or given statistics.
template <typename TS, typename TT, int VEC, bool kShard, bool kOptions, bool kStats>
__global__ void __launch_bounds__(kTwoPassMaxThreads) kd_twopass_kernel(const KDLaunch a) {
  __shared__ RowStatsBase2 stats_scratch[32];
  __shared__ float4 sums_scratch[32];
  __shared__ float4 kl_scratch[32];
  const KDParams& p = a.p;
  const int64_t row = blockIdx.x;
  const int64_t V = p.vocab_size;
  const LaunchRow<TS, TT, kShard> r(a, row);
  if (r.kind != RowKind::Normal) {
    fill_span(r.g, 0, a.g_width, row_fill_value(r.kind), threadIdx.x, blockDim.x);
    if (threadIdx.x == 0) {
      a.loss[row] = row_fill_value(r.kind);
      if constexpr (kStats) store_blank_token_stats(a.token_stats + row * kStatsWidth);
    }
    return;
  }
  const bool ce = p.ce_weight != 0.f;
  const bool hard = ce || (kOptions && p.z_loss != 0.f);  // the T = 1 sum-exp is needed
  const Logits<kOptions> L{p};
  // Read before any thread can overwrite the row (in-place backward); a block barrier
  // (the stats reduction, or the one below) separates it from the first gradient store.
  const float s_label =
      (ce && threadIdx.x == 0 && (!kShard || r.label >= 0)) ? L.s(load_elem(r.s + r.label), 1u, 0) : 0.f;
  const int lead = row_lead<TS, VEC>(r.s);
  const float grad_scale = *a.grad_scale;

  RowConsts k;
  if (!kStats && a.stats_in != nullptr) {
    k = row_consts_given(a.stats_in + row * kRowStatsWidth, p, grad_scale);
    __syncthreads();
  } else {
    const float c = kLog2e * p.inv_temperature;
    RowStatsBase2 st = empty_stats();
    if constexpr (kStats) {
      // The argmax of each side from this sweep (its lowest column among the row's maxima),
      // and the agreement stored now: only the entropies' sums ride in the write sweep.
      TokenStats ts = empty_token_stats();
      row_stats_argmax<VEC, kFusedUnroll<kOptions>>(st, ts, r.s, r.t, lead, a.t_part, V, c,
                                                   hard && p.temperature != 1.0f, L);
      const float own_ms = st.ms, own_mt = st.mt;
      st = block_combine(st, c, stats_scratch);
      if (own_ms != st.ms) ts.arg_s = kNoColumn;
      if (own_mt != st.mt) ts.arg_t = kNoColumn;
      __shared__ TokenStats arg_scratch[32];
      ts = block_reduce(ts, arg_scratch);
      if (threadIdx.x == 0) store_agreement(a.token_stats + row * kStatsWidth, ts.arg_s == ts.arg_t);
    } else {
      float unused = 0.f;  // label smoothing's sum: the write sweep's (which runs whether stats are given or not)
      row_stats<false, VEC, kFusedUnroll<kOptions>>(st, r.s, r.t, lead, a.t_part, V, c, hard && p.temperature != 1.0f,
                                                    L, unused);
      st = block_combine(st, c, stats_scratch);
    }
    k = row_consts(st, p, grad_scale);
  }

  FASTKD_DIVERGENCE_SWITCH(p.divergence, DIV,
                           row_sums_write_grad<DIV, VEC, kStats>(a, row, r, lead, s_label, k, L, sums_scratch,
                                                                 kl_scratch));
}

// The row_stats phase alone: RowStats [N, 5] in natural units (max of s/T), the layout a
// vocab-parallel caller combines across shards and feeds back as `stats_in`. kWidth
// kShardStatsWidth: the vocab-parallel row_stats of one slice, the same against the
// slice's own maxima plus the value term of forward KL (kA: sum e_t (b - a)) or reverse KL
// (kA and kStudentA: sum e_s (a - b)), accumulated online in the same sweep, and in column
// 6 label smoothing's sum of s' over the slice (0 without smoothing). Both widths are of the
// transformed logits s', t' where kOptions.
template <typename TS, typename TT, int VEC, int kWidth, bool kA, bool kStudentA, bool kOptions>
__global__ void __launch_bounds__(kTwoPassMaxThreads) row_stats_kernel(const KDLaunch a) {
  __shared__ RowStatsBase2 scratch[32];
  __shared__ float4 sum_scratch[32];
  const KDParams& p = a.p;
  const int64_t row = blockIdx.x;
  const TS* srow = static_cast<const TS*>(a.student) + row * a.s_stride;
  const TT* trow = static_cast<const TT*>(a.teacher) + row * a.t_stride;
  const int lead = row_lead<TS, VEC>(srow);
  const float c = kLog2e * p.inv_temperature;
  const bool raw = a.with_ce_raw && p.temperature != 1.0f;
  const bool smooth = kOptions && kWidth == kShardStatsWidth && p.label_smoothing > 0.f;
  const Logits<kOptions> L{p};
  RowStatsBase2 st = empty_stats();
  float sum_s = 0.f;
  row_stats<true, VEC, kTwoPassUnroll, kA, kStudentA>(st, srow, trow, lead, a.t_part, p.vocab_size, c, raw, L, sum_s);
  st = block_combine<kStudentA>(st, c, scratch);
  if (smooth) sum_s = block_sum(make_float4(sum_s, 0.f, 0.f, 0.f), sum_scratch).x;
  if (threadIdx.x == 0) {
    float* o = a.stats_out + row * kWidth;
    o[0] = st.ms * p.inv_temperature;
    o[1] = st.zs;
    o[2] = st.mt * p.inv_temperature;
    o[3] = st.zt;
    o[4] = a.with_ce_raw ? (raw ? st.zraw : st.zs) : 0.f;
    if constexpr (kWidth == kShardStatsWidth) {
      o[5] = kA ? st.a * p.inv_temperature : 0.f;  // (t - s) / T
      o[6] = smooth ? sum_s : 0.f;                 // sum of s' (label smoothing), else 0
    }
  }
}

// The vocab-parallel row_sums of one slice given the global statistics (stats_in), in the
// kRowSumsWidth layout: reverse_kl / jsd (sum_small q, sum_small q h, sum_big q, sum_big q h,
// JSD's sum p (log p - log m)) in nats, tvd (sum |p - q| / 2, q_pos, q_neg, q_tie, 0).
template <typename TS, typename TT, int VEC, Divergence DIV, bool kOptions>
__global__ void __launch_bounds__(kTwoPassMaxThreads) shard_row_sums_kernel(const KDLaunch a) {
  __shared__ float4 scratch[32];
  __shared__ float4 pm_scratch[32];
  const int64_t row = blockIdx.x;
  const LaunchRow<TS, TT> r(a, row);  // no labels: every row is Normal
  const int lead = row_lead<TS, VEC>(r.s);
  const RowConsts k = row_consts_given(a.stats_in + row * kRowStatsWidth, a.p, 1.0f);
  const Logits<kOptions> L{a.p};
  constexpr int U = kTwoPassUnroll;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f), err = acc;
  float pm = 0.f;
  sweep_row<true, VEC, U>(r.s, r.t, lead, a.t_part, a.p.vocab_size, [&](const Pack<TS, VEC>(&sp)[U], const Pack<TT, VEC>(&tp)[U],
                                                                     const uint32_t(&live)[U], int64_t) {
    float4 part = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float s = L.s(sp[u].get(j), live[u], j), t = L.t(tp[u].get(j), live[u], j);
        row_sums_add<DIV, true>(part, s, t, k);
        if constexpr (DIV == Divergence::JSD) {
          const float lq = fmaf(s, k.c, -k.ls), lp = fmaf(t, k.c, -k.lt);
          const float pt = ex2(lp);
          pm += pt == 0.f ? 0.f : pt * (lp - log2_add_exp2(lp + k.lb2, lq + k.l1b2));
        }
      }
    two_sum_add(acc, err, part);
  });
  const float4 tot = block_sum(acc + err, scratch);
  const float4 pms = block_sum(make_float4(pm, 0.f, 0.f, 0.f), pm_scratch);
  if (threadIdx.x == 0) {
    float* o = a.sums_out + row * kRowSumsWidth;
    const bool centred = DIV != Divergence::TVD;
    o[0] = tot.x;
    o[1] = tot.y;
    o[2] = centred ? tot.w : tot.z;  // big q (row_sums_add<.., true> keeps it in w)
    o[3] = centred ? tot.z : tot.w;  // big q h
    o[4] = kLn2 * pms.x;             // bits -> nats
  }
}

// ---------------------------------------------------------------------------------------
// Launchers.

// A part width the kernels take: a power of two in [1, vec].
bool valid_part(int part, int vec) { return part >= 1 && part <= vec && (part & (part - 1)) == 0; }

enum class Launch { Forward, RowStats, ShardRowStats, ShardRowSums };

// The kernel instance of one launch, with its options path kT and (the forward kernel)
// its diagnostics kS chosen by the caller.
template <Launch kWhat, typename TS, typename TT, int VEC, bool kT, bool kS = false>
cudaError_t launch_instance(const KDLaunch& k, dim3 grid, dim3 block, cudaStream_t stream) {
  const Divergence div = k.p.divergence;
  if constexpr (kWhat == Launch::RowStats) {
    row_stats_kernel<TS, TT, VEC, kRowStatsWidth, false, false, kT><<<grid, block, 0, stream>>>(k);
  } else if constexpr (kWhat == Launch::ShardRowStats) {
    constexpr int kW = kShardStatsWidth;
    if (div == Divergence::ForwardKL) row_stats_kernel<TS, TT, VEC, kW, true, false, kT><<<grid, block, 0, stream>>>(k);
    else if (div == Divergence::ReverseKL) row_stats_kernel<TS, TT, VEC, kW, true, true, kT><<<grid, block, 0, stream>>>(k);
    else row_stats_kernel<TS, TT, VEC, kW, false, false, kT><<<grid, block, 0, stream>>>(k);
  } else if constexpr (kWhat == Launch::ShardRowSums) {
    if (div == Divergence::ReverseKL) shard_row_sums_kernel<TS, TT, VEC, Divergence::ReverseKL, kT><<<grid, block, 0, stream>>>(k);
    else if (div == Divergence::JSD) shard_row_sums_kernel<TS, TT, VEC, Divergence::JSD, kT><<<grid, block, 0, stream>>>(k);
    else if (div == Divergence::TVD) shard_row_sums_kernel<TS, TT, VEC, Divergence::TVD, kT><<<grid, block, 0, stream>>>(k);
    else return cudaErrorInvalidValue;  // forward KL needs no row sums
  } else if constexpr (kS) {
    kd_twopass_kernel<TS, TT, VEC, false, kT, true><<<grid, block, 0, stream>>>(k);
  } else if (k.shard) {
    kd_twopass_kernel<TS, TT, VEC, true, kT, false><<<grid, block, 0, stream>>>(k);
  } else {
    kd_twopass_kernel<TS, TT, VEC, false, kT, false><<<grid, block, 0, stream>>>(k);
  }
  return cudaGetLastError();
}

template <Launch kWhat>
cudaError_t launch(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  if (a.n_rows <= 0) return cudaSuccess;
  if (a.n_rows > 0x7fffffff || plan.kind != KernelKind::TwoPass || plan.refused != nullptr || plan.threads < 32 ||
      plan.threads > kTwoPassMaxThreads || !valid_part(plan.t_part, plan.vec) || !valid_part(plan.g_part, plan.vec))
    return cudaErrorInvalidValue;
  // The diagnostics: the forward kernel's, with its own statistics, on the whole row.
  const bool stats = a.token_stats != nullptr;
  if (stats && (kWhat != Launch::Forward || a.stats_in != nullptr || a.shard || a.p.vocab_size > kMaxStatsVocab))
    return cudaErrorInvalidValue;
  KDLaunch k = a;
  k.t_part = plan.t_part;
  k.g_part = plan.g_part;
  const dim3 grid(static_cast<unsigned>(a.n_rows)), block(plan.threads);
  // The options path only where an option is on (or the diagnostics are asked for): the
  // options off run the plain instances.
  const bool options = stats || has_options(a.p);
  FASTKD_ELEM_TYPE_SWITCH(a.s_type, TS, FASTKD_ELEM_TYPE_SWITCH(a.t_type, TT, {
      constexpr int kVec = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
      if (plan.vec != kVec) return cudaErrorInvalidValue;
      if constexpr (kWhat == Launch::Forward) {
        if (stats) return launch_instance<kWhat, TS, TT, kVec, true, true>(k, grid, block, stream);
      }
      return options ? launch_instance<kWhat, TS, TT, kVec, true>(k, grid, block, stream)
                     : launch_instance<kWhat, TS, TT, kVec, false>(k, grid, block, stream);
  }));
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_kd_twopass(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  return launch<Launch::Forward>(a, plan, stream);
}

cudaError_t launch_row_stats(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  return launch<Launch::RowStats>(a, plan, stream);
}

cudaError_t launch_shard_row_stats(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  return launch<Launch::ShardRowStats>(a, plan, stream);
}

cudaError_t launch_shard_row_sums(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  return launch<Launch::ShardRowSums>(a, plan, stream);
}

}  // namespace cuda
}  // namespace fastkd
