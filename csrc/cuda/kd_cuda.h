// Launch interface of the fastkd CUDA kernels, shared by the .cu files and the torch glue.
//
// The .cu files see only this header and kd_params.h (no torch headers), so each compiles
// in seconds and can be checked by CI against nvcc alone; the glue in kd_cuda.cpp sees
// only plain structs and C-style launchers, so it needs no CUDA compiler. Every launch
// decision (kernel, vector width, threads, cluster size) is made in plan_launch() below.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../kd_params.h"

namespace fastkd {
namespace cuda {

enum class ElemType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int elem_bytes(ElemType t) { return t == ElemType::F32 ? 4 : 2; }

// One forward call, as the kernels see it. Row r of a tensor X starts at X + r * x_stride
// elements; columns are contiguous. All offsets are int64: N * V may exceed 2^31.
struct KDLaunch {
  const void* student;     // [N, >= V], dtype s_type
  const void* teacher;     // [N, >= V], dtype t_type
  void* grad;              // [N, g_width], dtype s_type; may alias student (in-place backward)
  const int64_t* labels;   // [N] or nullptr
  const float* grad_scale; // device scalar: the reduction's 1/denominator, folded into grad
  const float* stats_in;   // [N, 5] RowStats (natural units) or nullptr: skip the stats pass
  float* loss;             // [N] per-row loss (fp32)
  float* stats_out;        // [N, 5] RowStats, written by the row_stats kernel only
  int64_t s_stride, t_stride, g_stride;
  int64_t g_width;         // columns of grad; [vocab_size, g_width) get zero gradient
  int64_t n_rows;
  ElemType s_type, t_type;
  bool with_ce_raw;        // row_stats kernel: also compute the T = 1 sum-exp of the CE term
  KDParams p;
};

// ---------------------------------------------------------------------------------------
// Launch decisions, in one place.

// Cluster kernel (sm_90): a row is split over `cluster` CTAs of kClusterThreads threads,
// each thread holding kClusterPacks 16-byte packs of s and of t in registers
// (2 * 8 * 4 = 64 registers of data), so one CTA holds 2048 packs of each tensor:
// 16384 bf16/fp16 columns or 8192 fp32 columns. __launch_bounds__(256, 2) caps it at
// 128 registers, two CTAs (16 warps) per SM.
constexpr int kClusterThreads = 256;
constexpr int kClusterPacks = 8;
constexpr int kClusterMinBlocksPerSM = 2;
constexpr int kMaxClusterPortable = 8;
constexpr int kMaxCluster = 16;  // non-portable size, allowed on H100 via a function attribute

// Two-pass kernel (sm_80+): one CTA per row, streaming the row from memory per pass.
constexpr int kTwoPassMaxThreads = 1024;
constexpr int kTwoPassMinThreads = 64;
constexpr int kTwoPassPacksPerThread = 16;  // a thread's share of a row, in packs
constexpr int kTwoPassUnroll = 2;           // packs of each tensor in flight per thread

enum class KernelKind : int { TwoPass = 0, Cluster = 1 };
enum class KernelOverride : int { Auto = 0, TwoPass = 1, Cluster = 2 };

struct LaunchPlan {
  KernelKind kind;
  int vec;      // columns per pack: 16 bytes of the wider dtype, or 1 (unaligned fallback)
  int threads;  // per CTA
  int cluster;  // CTAs per row (cluster kernel), 1 otherwise
};

struct PlanInput {
  int64_t vocab_size;
  int64_t n_rows;
  ElemType s_type, t_type;
  // Whether every row of student, teacher and grad starts at the same column offset
  // modulo vec (so one pack index addresses aligned 16-byte chunks of all three), and
  // the largest such offset over the rows (0 when every row starts 16-byte aligned).
  bool phases_agree;
  int max_lead;
  bool stats_given;     // row statistics supplied: no stats pass, two-pass kernel
  bool cluster_device;  // sm_90 with cluster launch
  KernelOverride force;
};

// Columns per 16-byte pack of the wider of the two dtypes.
inline int natural_vec(ElemType s, ElemType t) { return 16 / std::max(elem_bytes(s), elem_bytes(t)); }

inline int twopass_threads(int64_t packs) {
  int threads = kTwoPassMinThreads;
  while (threads < kTwoPassMaxThreads && int64_t(threads) * kTwoPassPacksPerThread < packs) threads *= 2;
  return threads;
}

inline LaunchPlan plan_launch(const PlanInput& in) {
  const int vec = in.phases_agree ? natural_vec(in.s_type, in.t_type) : 1;
  const int64_t span = in.vocab_size + (vec > 1 ? in.max_lead : 0);  // columns the pack grid covers
  const int64_t packs = (span + vec - 1) / vec;
  LaunchPlan twopass{KernelKind::TwoPass, vec, twopass_threads(packs), 1};
  if (in.force == KernelOverride::TwoPass || !in.cluster_device || in.stats_given) return twopass;
  // The cluster kernel is compiled for equal dtypes with aligned packs; mixed dtypes and
  // rows whose s/t/grad offsets disagree take the two-pass kernel.
  if (in.s_type != in.t_type || vec == 1) return twopass;
  const int64_t per_cta = int64_t(kClusterThreads) * kClusterPacks * vec;
  const int64_t cluster = (span + per_cta - 1) / per_cta;
  if (cluster > kMaxCluster) return twopass;
  // Rows of under two packs per thread would leave most of a CTA's registers empty: the
  // two-pass kernel (sized to the row) does better there, unless asked otherwise.
  if (in.force != KernelOverride::Cluster && cluster == 1 && packs < 2 * kClusterThreads) return twopass;
  if (in.n_rows * cluster > int64_t(0x7fffffff)) return twopass;
  return LaunchPlan{KernelKind::Cluster, vec, kClusterThreads, int(cluster)};
}

// ---------------------------------------------------------------------------------------
// Launchers (kd_twopass.cu, kd_cluster.cu, kd_scale_grad.cu). They return the CUDA error
// of the launch; the caller checks it.

// Loss [N] and gradient with the two-pass kernel (plan.kind == TwoPass).
cudaError_t launch_kd_twopass(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// Row statistics [N, 5] (a.stats_out) with the two-pass kernel's first pass.
cudaError_t launch_row_stats(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// Loss and gradient with the cluster kernel (plan.kind == Cluster). Returns
// cudaErrorNotSupported, launching nothing, when this build has no sm_90 code or the
// device cannot co-schedule a cluster of plan.cluster CTAs; the caller then falls back.
cudaError_t launch_kd_cluster(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// grad[r, :] *= factor[r * factor_stride] (factor_stride 0: one scalar), read on the
// device; rows whose factor is exactly 1 are not touched, without a host sync.
cudaError_t launch_scale_grad(void* grad, ElemType type, int64_t n_rows, int64_t width, int64_t stride,
                              const float* factor, int64_t factor_stride, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
