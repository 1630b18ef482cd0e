/*
 * Fused knowledge-distillation loss and gradient in a single pass over memory: the
 * sm_90 thread-block-cluster kernel.
 *
 * A cluster of C CTAs owns one row (C from V in plan_launch, kd_cuda.h: 2 CTAs for
 * V = 32000 bf16, 8 for 128256, 16 for 262144). Each thread loads kClusterPacks 16-byte
 * packs of s and of t into registers, once, and the row never leaves the chip. The
 * sections of the kernel, the middle three the phases of every fastkd kernel (named
 * alike in csrc/cpu/kd_cpu.cpp, kd_twopass.cu and the Triton kernels):
 *   1. load        16 independent 16-byte loads per thread, all in flight together.
 *   2. row_stats   (max, sum 2^(x c - max c)) of both sides over the registers, the CE
 *                  term's T = 1 sum when T != 1, and for forward KL
 *                  A = sum 2^(t c - mt c) (t - s), since KL(p||q) = ln2 (c A / zt - (lt - ls));
 *                  then a CTA reduction, and the exchange: each CTA pushes its packed
 *                  partial (two float4) into slot [rank] of every CTA's shared memory
 *                  (st.shared::cluster), one cluster barrier, and each CTA combines the C
 *                  slots in the same order: every CTA holds bit-identical row constants.
 *   3. row_sums    reverse_kl, jsd, tvd only: the row sums of the centred gradient
 *                  (kd_device.cuh) over the registers, exchanged the same way; rank 0
 *                  writes the loss.
 *   4. write_grad  the gradient, once, from the registers; zeros past vocab_size.
 * Memory traffic is the floor: s and t read once, the gradient written once. Forward KL
 * needs one exchange; the others two.
 *
 * Barriers. The guide asks that every CTA of a cluster has started before one writes
 * into another's shared memory: an arrive.relaxed right after the loads are issued, and
 * its wait just before the first remote store, hide that barrier behind the loads. Every
 * remote store precedes an arrive.release that its target waits on (acquire) before
 * reading, and nothing is read remotely, so a CTA can exit without a trailing barrier.
 *
 * The logit options (kd_params.h): the instances with kOptions (has_options, kd_cuda.h)
 * transform every element at each phase from the same registers (the transform is cheap
 * against holding 128 more floats), carry label smoothing's sum of s' in the row_stats
 * exchange's spare slot, and multiply the gradient by ds'/ds. Their sm_90a builds spill
 * nothing at 128 registers, as the instances without the options (unchanged).
 *
 * In-place backward (grad == student) is safe: a CTA writes only its own packs, after
 * all its loads; the label's logit (CE loss) is read by rank 0 before its first arrive.
 *
 * The file body is compiled for sm_90 only; on sm_80 the kernel traps if launched.
 * cluster_launchable() (asked by the host's choose_plan, kd_cuda.h, before it plans a
 * cluster launch) says no unless the instance has sm_90 code and the device can
 * co-schedule the cluster, so the host plans the two-pass kernel instead, or refuses a
 * forced cluster kernel with an error.
 *
 * Alignment: every tensor's packs must be 16-byte aligned together (the plan's t_part and
 * g_part equal to VEC): the grid follows the student's rows, the gradient is allocated
 * with the student's alignment (kd_cuda.cpp), and a teacher whose rows start at another
 * offset modulo 16 bytes takes the two-pass kernel, which loads it in narrower parts. (Its
 * registers are full: 128 of 128, so no split loads here.)
 */
#include <atomic>

#include "../dispatch.h"
#include "kd_device.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace dev;

constexpr int K = kClusterPacks;
constexpr int NT = kClusterThreads;
constexpr int kMaxDevices = 64;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

FASTKD_DEV unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

FASTKD_DEV unsigned cluster_size() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}

FASTKD_DEV void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory"); }
FASTKD_DEV void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
FASTKD_DEV void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// Stores v into the shared-memory slot of CTA `rank` that corresponds to `slot` here.
FASTKD_DEV void push(float4* slot, unsigned rank, float4 v) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(slot));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(remote), "f"(v.x), "f"(v.y), "f"(v.z),
               "f"(v.w)
               : "memory");
}

#endif

// kOptions: the instance that applies the logit options (has_options; kd_device.cuh).
// kStats: the instance that also writes the per-token diagnostics (a.token_stats; launched
// with kOptions): a register sweep of their own after the row sums' (no memory traffic), and
// their partials in the row_sums exchange (forward KL, which has no row_sums, gets that
// exchange for them alone).
template <typename T, Divergence DIV, int VEC, bool kOptions, bool kStats>
__global__ void __launch_bounds__(kClusterThreads, kClusterMinBlocksPerSM) kd_cluster_kernel(const KDLaunch a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float4 xstats[kMaxCluster][2];  // slot i: CTA i's (ms, zs, mt, zt), (zraw, a, sum of s', -)
  __shared__ float4 xsums[kMaxCluster];      // slot i: CTA i's divergence sums
  __shared__ float4 xtoken[kStats ? kMaxCluster : 1];  // kStats, rank 0's: CTA i's TokenStats (hq, hp, arg bits)
  __shared__ RowStatsBase2 warp_stats[NT / 32];
  __shared__ float4 warp_sums[NT / 32];
  __shared__ float4 warp_sum_s[NT / 32];

  const KDParams& p = a.p;
  const unsigned rank = cluster_rank(), C = cluster_size();
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x / C;
  const int64_t V = p.vocab_size;
  const LaunchRow<T, T> r(a, row);
  if (r.kind != RowKind::Normal) {
    // The whole cluster takes this branch (one row, one label) before any barrier or
    // remote access; each CTA fills its share of the gradient row.
    const int64_t share = (a.g_width + C - 1) / C;
    const int64_t begin = min(int64_t(rank) * share, a.g_width), end = min(begin + share, a.g_width);
    fill_span(r.g, begin, end, row_fill_value(r.kind), threadIdx.x, NT);
    if (rank == 0 && threadIdx.x == 0) {
      a.loss[row] = row_fill_value(r.kind);
      if constexpr (kStats) store_blank_token_stats(a.token_stats + row * kStatsWidth);
    }
    return;
  }
  const bool ce = p.ce_weight != 0.f;
  const Logits<kOptions> L{p};
  const float s_label = (ce && rank == 0 && threadIdx.x == 0) ? L.s(load_elem(r.s + r.label), 1u, 0) : 0.f;

  // 1. Load. Slot k of thread x in CTA `rank` is pack (rank K + k) NT + x: each slot is
  // a coalesced sweep of NT consecutive packs, each CTA a contiguous stretch of the row.
  const int lead = row_lead<T, VEC>(r.s);
  const int64_t col_first = ((int64_t(rank) * K) * NT + threadIdx.x) * VEC - lead;
  constexpr int64_t kSlotCols = int64_t(NT) * VEC;
  const bool interior = col_first >= 0 && col_first + (K - 1) * kSlotCols + VEC <= V;
  Pack<T, VEC> sp[K], tp[K];
  if (interior) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      sp[k] = load_pack<T, VEC, true>(r.s + col_first + k * kSlotCols);
      tp[k] = load_pack<T, VEC, true>(r.t + col_first + k * kSlotCols);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t col0 = col_first + k * kSlotCols;
      if (col0 >= 0 && col0 + VEC <= V) {
        sp[k] = load_pack<T, VEC, true>(r.s + col0);
        tp[k] = load_pack<T, VEC, true>(r.t + col0);
      } else {
        sp[k] = load_pack_masked<T, VEC>(r.s, col0, V);  // -inf outside the row
        tp[k] = load_pack_masked<T, VEC>(r.t, col0, V);
      }
    }
  }
  cluster_arrive_relaxed();

  // 2. row_stats of this CTA's part of the row. live[k]: the lanes of slot k in the row
  // (Logits; read only by the options path).
  const float c = kLog2e * p.inv_temperature;
  constexpr bool kA = DIV == Divergence::ForwardKL;
  uint32_t live[K];
#pragma unroll
  for (int k = 0; k < K; ++k) live[k] = interior ? all_lanes<VEC>() : live_lanes<VEC>(col_first + k * kSlotCols, V);
  RowStatsBase2 st = empty_stats();
  float sum_s = 0.f;  // with the options: label smoothing's sum of s', this thread's share
  if ((ce || (kOptions && p.z_loss != 0.f)) && p.temperature != 1.0f)
    row_stats_add<true, kA>(st, sp, tp, c, L, live, sum_s);
  else
    row_stats_add<false, kA>(st, sp, tp, c, L, live, sum_s);
  st = block_combine(st, c, warp_stats);
  const bool smooth = kOptions && ce && p.label_smoothing > 0.f;
  if (smooth) sum_s = block_sum(make_float4(sum_s, 0.f, 0.f, 0.f), warp_sum_s).x;

  // The row_stats exchange: push this CTA's partial to every CTA, then combine the C
  // partials.
  cluster_wait();  // pairs with the relaxed arrive: every CTA of the cluster is running
  if (threadIdx.x < C) {
    push(&xstats[rank][0], threadIdx.x, make_float4(st.ms, st.zs, st.mt, st.zt));
    push(&xstats[rank][1], threadIdx.x, make_float4(st.zraw, st.a, sum_s, 0.f));
  }
  cluster_arrive();
  cluster_wait();
  st = empty_stats();
  if (lane < int(C)) {
    const float4 x0 = xstats[lane][0], x1 = xstats[lane][1];
    st = RowStatsBase2{x0.x, x0.y, x0.z, x0.w, x1.x, x1.y};
  }
  warp_combine(st, c);
  const RowConsts k = row_consts(st, p, *a.grad_scale);

  // 3. row_sums: the centred divergences' row sums, exchanged the same way. A thread's
  // sums are serial in fp32 over its K * VEC elements (32 or 64), then trees. (Compensated
  // sums as in the two-pass kernel would take JSD at T = 0.5 from 2.1e-4 to 1.4e-4 from
  // float64, fp32 emulation at V = 128256 bf16, equal at T = 1, for registers this kernel
  // lacks.) Then rank 0 writes the row's loss.
  // kStats: the diagnostics' partials (TokenStats) join this exchange, pushed to rank 0 alone.
  float4 tot = make_float4(0.f, 0.f, 0.f, 0.f);
  float pm = 0.f;  // JSD: sum p log2(p/m)
  TokenStats ts = empty_token_stats();
  if constexpr (DIV != Divergence::ForwardKL || kStats) {
    if constexpr (DIV != Divergence::ForwardKL) {
      float4 acc = tot;
#pragma unroll
      for (int s = 0; s < K; ++s) {
        const uint32_t lv = interior ? all_lanes<VEC>() : live_lanes<VEC>(col_first + s * kSlotCols, V);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          row_sums_add<DIV, false>(acc, L.s(sp[s].template get<2, kOptions>(j, k.opaque_zero), lv, j),
                                   L.t(tp[s].template get<2, kOptions>(j, k.opaque_zero), lv, j), k);
      }
      acc = block_sum(acc, warp_sums);
      if (threadIdx.x < C) push(&xsums[rank], threadIdx.x, acc);
    }
    if constexpr (kStats) {
      // A register sweep of their own (the elements widened in a form of their own, Pack::get,
      // so no phase's values stay alive into another): inside the row_sums sweep, their
      // accumulators made the 16-bit instances spill (ptxas: up to 280 bytes).
      const uint32_t col32 = uint32_t(col_first);
#pragma unroll
      for (int s = 0; s < K; ++s) {
        const uint32_t lv = interior ? all_lanes<VEC>() : live_lanes<VEC>(col_first + s * kSlotCols, V);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          token_stats_add(ts, L.s(sp[s].template get<3>(j, k.opaque_zero), lv, j),
                          L.t(tp[s].template get<3>(j, k.opaque_zero), lv, j), k, st.ms, st.mt,
                          col32 + uint32_t(s * kSlotCols + j), (lv >> j) & 1u);
      }
      __shared__ TokenStats warp_tokens[NT / 32];
      ts = block_reduce(ts, warp_tokens);
      if (threadIdx.x == 0)
        push(&xtoken[rank], 0, make_float4(ts.hq, ts.hp, __uint_as_float(ts.arg_s), __uint_as_float(ts.arg_t)));
    }
    cluster_arrive();
    cluster_wait();
    if constexpr (DIV != Divergence::ForwardKL)
      tot = warp_sum(lane < int(C) ? xsums[lane] : make_float4(0.f, 0.f, 0.f, 0.f));
    if constexpr (DIV != Divergence::TVD && DIV != Divergence::ForwardKL) {
      // sum_{q>kPeak} q without a fifth row sum: the only entry that can exceed kPeak is
      // the row's maximum st.ms, and this is bitwise the q that row_sums_add computed for it.
      pm = tot.w;
      const float q_top = ex2(fmaf(st.ms, k.c, -k.ls));
      tot = centring<true>(tot, q_top > kPeak ? q_top : 0.f);
    }
  }

  if (rank == 0 && threadIdx.x == 0) {
    const float D = DIV == Divergence::ForwardKL ? kLn2 * (k.c * st.a / st.zt - (k.lt - k.ls))
                                                 : divergence_from_sums<DIV>(tot, tot.w, pm, k);
    float row_sum_s = 0.f;  // label smoothing: the C CTAs' sums of s', in rank order
    if (smooth)
      for (unsigned i = 0; i < C; ++i) row_sum_s += xstats[i][1].z;
    a.loss[row] = add_hard_label_loss<kOptions>(p.div_weight * D, k, p, s_label, row_sum_s);
    if constexpr (kStats) {  // the C CTAs' diagnostics, in rank order
      TokenStats row_ts = empty_token_stats();
      for (unsigned i = 0; i < C; ++i) {
        const float4 x = xtoken[i];
        row_ts.hq += x.x;
        row_ts.hp += x.y;
        row_ts.arg_s = min(row_ts.arg_s, __float_as_uint(x.z));
        row_ts.arg_t = min(row_ts.arg_t, __float_as_uint(x.w));
      }
      store_token_stats(a.token_stats + row * kStatsWidth, -kLn2 * row_ts.hp, row_ts.hq, row_ts.arg_s == row_ts.arg_t,
                        D, 0.f);
    }
  }

  // 4. write_grad: the gradient, from the registers. (With the options, the general loop
  // alone: a copy of the write phase less cut the instance's compile time.)
  float4 unused = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!kOptions && interior) {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int64_t col0 = col_first + s * kSlotCols;
      float g[VEC];
      write_grad_pack<DIV>(g, sp[s], tp[s], k, L, all_lanes<VEC>(), tot, r.label - col0, unused);
      store_pack<T, VEC>(r.g + col0, g);
    }
  } else {
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int64_t col0 = col_first + s * kSlotCols;
      if (col0 >= V) break;
      float g[VEC];
      const uint32_t lv = interior ? all_lanes<VEC>() : live_lanes<VEC>(col0, V);
      write_grad_pack<DIV>(g, sp[s], tp[s], k, L, lv, tot, r.label - col0, unused);
      if (col0 >= 0 && col0 + VEC <= V) store_pack<T, VEC>(r.g + col0, g);
      else store_pack_masked<T, VEC>(r.g, col0, V, g);
    }
  }
  // Student columns past vocab_size get zero gradient, shared out over the cluster.
  if (a.g_width > V) {
    const int64_t share = (a.g_width - V + C - 1) / C;
    const int64_t begin = min(V + int64_t(rank) * share, a.g_width), end = min(begin + share, a.g_width);
    fill_span(r.g, begin, end, 0.f, threadIdx.x, NT);
  }
#else
  // Built without sm_90 code: launch_kd_cluster never launches this, and if something
  // does, fail loudly rather than leave the outputs unwritten.
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------
// Launcher.

// A launch of `ctas` CTAs of NT threads in clusters of `cluster`; `dims` holds the
// cluster attribute the config points to.
cudaLaunchConfig_t cluster_launch_config(cudaLaunchAttribute& dims, int cluster, int64_t ctas, cudaStream_t stream) {
  dims.id = cudaLaunchAttributeClusterDimension;
  dims.val.clusterDim.x = cluster;
  dims.val.clusterDim.y = 1;
  dims.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(ctas));
  cfg.blockDim = dim3(NT);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = &dims;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether `kernel` has sm_90 code for the current device and can co-schedule a cluster of
// `cluster` CTAs. `cache` belongs to one kernel instance (launchable<T, DIV>): cached per
// instance, device and cluster size, since the occupancy query costs far more than a
// launch, and instances differ in registers and so in what fits.
bool query_launchable(const void* kernel_ptr, void (*kernel)(KDLaunch), int cluster,
                      std::atomic<signed char> (&cache)[kMaxDevices][kMaxCluster + 1]) {
  int device = 0;
  if (cluster < 1 || cluster > kMaxCluster || cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices)
    return false;
  std::atomic<signed char>& known = cache[device][cluster];  // 0 unknown, 1 yes, -1 no
  const signed char k = known.load(std::memory_order_relaxed);
  if (k != 0) return k > 0;
  // A failed runtime call also leaves its error pending for the next cudaGetLastError().
  // Clear only what these queries raise: an error pending before them is someone else's.
  const bool clean_before = cudaPeekAtLastError() == cudaSuccess;
  bool ok = false;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel_ptr) == cudaSuccess && attr.ptxVersion >= 90 && attr.binaryVersion >= 90 &&
      (cluster <= kMaxClusterPortable ||
       cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess)) {
    cudaLaunchAttribute dims;
    // The query reads the cluster and CTA shape only.
    const cudaLaunchConfig_t cfg = cluster_launch_config(dims, cluster, cluster, nullptr);
    int n_clusters = 0;
    ok = cudaOccupancyMaxActiveClusters(&n_clusters, kernel, &cfg) == cudaSuccess && n_clusters > 0;
  }
  if (clean_before && cudaPeekAtLastError() != cudaSuccess) (void)cudaGetLastError();  // ours
  known.store(ok ? 1 : -1, std::memory_order_relaxed);
  return ok;
}

template <typename T, Divergence DIV, bool kOptions, bool kStats>
bool launchable(int cluster) {
  static std::atomic<signed char> cache[kMaxDevices][kMaxCluster + 1];  // one per kernel instance
  auto kernel = kd_cluster_kernel<T, DIV, 16 / int(sizeof(T)), kOptions, kStats>;
  return query_launchable(reinterpret_cast<const void*>(kernel), kernel, cluster, cache);
}

template <typename T, Divergence DIV, bool kOptions, bool kStats>
cudaError_t launch_typed(const KDLaunch& a, int cluster, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));
  auto kernel = kd_cluster_kernel<T, DIV, kVec, kOptions, kStats>;
  if (!launchable<T, DIV, kOptions, kStats>(cluster)) return cudaErrorNotSupported;
  cudaLaunchAttribute dims;
  const cudaLaunchConfig_t cfg = cluster_launch_config(dims, cluster, a.n_rows * cluster, stream);
  if (cluster > kMaxClusterPortable) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return e;
  }
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

}  // namespace

cudaError_t launch_kd_cluster(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream) {
  if (a.n_rows <= 0) return cudaSuccess;
  // The kernel is built for equal dtypes, 16-byte packs and NT threads (plan_launch).
  if (plan.kind != KernelKind::Cluster || plan.refused != nullptr || a.s_type != a.t_type ||
      a.stats_in != nullptr || plan.threads != NT || plan.cluster < 1 || plan.cluster > kMaxCluster ||
      plan.vec != 16 / elem_bytes(a.s_type) || plan.t_part != plan.vec || plan.g_part != plan.vec ||
      a.n_rows * plan.cluster > int64_t(0x7fffffff) || (a.token_stats != nullptr && a.p.vocab_size > kMaxStatsVocab))
    return cudaErrorNotSupported;
  // The options path only where one is on, or with the diagnostics (their instance has it).
  const bool stats = a.token_stats != nullptr, options = stats || has_options(a.p);
  FASTKD_ELEM_TYPE_SWITCH(a.s_type, T, FASTKD_DIVERGENCE_SWITCH(a.p.divergence, DIV, {
    if (stats) return launch_typed<T, DIV, true, true>(a, plan.cluster, stream);
    return options ? launch_typed<T, DIV, true, false>(a, plan.cluster, stream)
                   : launch_typed<T, DIV, false, false>(a, plan.cluster, stream);
  }));
  return cudaErrorInvalidValue;
}

bool cluster_launchable(ElemType type, Divergence divergence, bool options, bool stats, int cluster) {
  FASTKD_ELEM_TYPE_SWITCH(type, T, FASTKD_DIVERGENCE_SWITCH(divergence, DIV, {
    if (stats) return launchable<T, DIV, true, true>(cluster);
    return options ? launchable<T, DIV, true, false>(cluster) : launchable<T, DIV, false, false>(cluster);
  }));
  return false;
}

}  // namespace cuda
}  // namespace fastkd
