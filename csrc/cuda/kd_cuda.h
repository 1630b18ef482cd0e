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

// Whether a launch takes the kernels' options path (kd_device.cuh: kOptions): a logit option
// is on, either side's transform (logit_scale, softcap), label smoothing or the z-loss.
// Every launcher picks its kernel instance with it, so the options off run the instances
// that have no code for them. A launch with per-token diagnostics (token_stats) runs the
// options path's instance with kStats (kd_device.cuh: TokenStats) whatever the options.
inline bool has_options(const KDParams& p) {
  return p.scale_s != 1.0f || p.cap_s != 0.0f || p.scale_t != 1.0f || p.cap_t != 0.0f || p.label_smoothing != 0.0f ||
         p.z_loss != 0.0f;
}

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
  int t_part, g_part;      // set by the launchers from the plan (LaunchPlan)
  bool with_ce_raw;        // row_stats kernel: also compute the T = 1 sum-exp (CE term or z-loss)
  KDParams p;
  // The vocab-parallel shard phases (fastkd/backends/__init__.py has the layouts).
  const float* sums_in;    // [N, kRowSumsWidth] row sums (write_grad), or nullptr: compute them
  float* sums_out;         // [N, kRowSumsWidth] (the shard_row_sums kernel)
  bool shard;              // labels are global ids; this slice starts at vocab_start
  int64_t vocab_start;
  // The per-token diagnostics (kd_forward_stats; kd_params.h: kStatsWidth), or nullptr:
  // [N, kStatsWidth] float32, contiguous. Not with stats_in or shard.
  float* token_stats;
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
  int vec;      // columns per pack: 16 bytes of the wider dtype
  int threads;  // per CTA
  int cluster;  // CTAs per row (cluster kernel), 1 otherwise
  // Each tensor's own lead: the pack grid follows the student's rows (every student pack
  // is a 16-byte-aligned load, whatever the row's offset), and the teacher and the
  // gradient are accessed in parts of t_part / g_part columns, the widest that their
  // offset relative to the student's allows on every row (vec when they agree).
  int t_part, g_part;
  // Why a forced cluster kernel cannot run (then the plan must not be launched), or nullptr.
  const char* refused;
};

// Where the rows of one tensor start: the byte address of row 0 modulo 16 (only that
// matters for alignment) and the row stride in elements. Torch tensors are aligned to
// their element size.
struct RowLayout {
  int64_t addr_mod16;
  int64_t stride;
  ElemType type;
};

inline RowLayout row_layout(const void* ptr, int64_t stride, ElemType type) {
  return RowLayout{int64_t(reinterpret_cast<uintptr_t>(ptr) & 15), stride, type};
}

struct PlanInput {
  int64_t vocab_size;
  int64_t n_rows;
  RowLayout s, t;
  bool has_grad;        // false: the row_stats kernel (no gradient)
  RowLayout g;          // the gradient's rows (the student's own in place)
  bool stats_given;     // row statistics supplied: no stats pass, two-pass kernel
  bool cluster_device;  // sm_90 with cluster launch
  KernelOverride force;
};

// Columns per 16-byte pack of the wider of the two dtypes.
inline int natural_vec(ElemType s, ElemType t) { return 16 / std::max(elem_bytes(s), elem_bytes(t)); }

// Element offset of row 0 modulo vec (a power of two dividing 16 / elem size).
inline int64_t row0_phase(const RowLayout& x, int vec) { return (x.addr_mod16 / elem_bytes(x.type)) % vec; }

// The widest part (a power of two <= vec, in columns) in which tensor x can be accessed
// aligned on every row when the pack grid follows the student's rows: pack columns start
// where the student row is vec-aligned, so x's parts are aligned iff x's row offset minus
// the student's is a multiple of the part, on row 0 and, through the strides, every row.
inline int part_width(const RowLayout& x, const RowLayout& s, int vec, int64_t n_rows) {
  const int64_t d0 = row0_phase(x, vec) - row0_phase(s, vec);
  const int64_t ds = n_rows > 1 ? x.stride - s.stride : 0;
  int part = vec;
  while (part > 1 && (d0 % part != 0 || ds % part != 0)) part /= 2;
  return part;
}

// The layout of a fresh gradient for a student with rows `s` of `cols` columns: its rows
// start at the student's offset modulo 16 bytes, and its row stride is the least one
// >= cols congruent to the student's modulo 16 bytes, so every gradient row shares its
// student row's alignment (the plan then gives it whole packs). A contiguous student gets a
// contiguous gradient; a strided one pads each row by under 16 bytes. `offset`: elements
// from a 16-byte-aligned allocation to row 0.
struct GradAlloc {
  int64_t offset, stride;
  int64_t numel(int64_t n_rows, int64_t cols) const { return n_rows > 0 ? offset + (n_rows - 1) * stride + cols : offset; }
};

inline GradAlloc grad_alloc(const RowLayout& s, int64_t n_rows, int64_t cols) {
  const int64_t per16 = 16 / elem_bytes(s.type);
  const int64_t offset = s.addr_mod16 / elem_bytes(s.type);
  const int64_t stride = n_rows > 1 ? cols + (((s.stride - cols) % per16) + per16) % per16 : cols;
  return GradAlloc{offset, stride};
}

inline int twopass_threads(int64_t packs) {
  int threads = kTwoPassMinThreads;
  while (threads < kTwoPassMaxThreads && int64_t(threads) * kTwoPassPacksPerThread < packs) threads *= 2;
  return threads;
}

// The cluster plan for these tensors, or why the cluster kernel does not apply
// (plan.refused). `forced`: the caller asked for the cluster kernel by name, which
// lifts the short-row rule only.
inline LaunchPlan cluster_plan(const PlanInput& in, const LaunchPlan& twopass, int64_t span, bool forced) {
  LaunchPlan p = twopass;
  const auto refuse = [&](const char* why) { p.refused = why; return p; };
  if (!in.cluster_device) return refuse("the device is not sm_90 with cluster launch");
  if (in.stats_given) return refuse("row statistics were given (the two-pass kernel takes them)");
  // The cluster kernel is compiled for equal dtypes with every tensor's packs aligned.
  if (in.s.type != in.t.type) return refuse("student and teacher dtypes differ");
  if (twopass.t_part != twopass.vec) return refuse("the teacher's rows are not 16-byte aligned like the student's");
  if (twopass.g_part != twopass.vec) return refuse("the gradient's rows are not 16-byte aligned like the student's");
  const int64_t per_cta = int64_t(kClusterThreads) * kClusterPacks * twopass.vec;
  const int64_t cluster = (span + per_cta - 1) / per_cta;
  if (cluster > kMaxCluster) return refuse("the row needs more than 16 CTAs");
  if (in.n_rows * cluster > int64_t(0x7fffffff)) return refuse("N * cluster size exceeds the grid");
  // Rows of under two packs per thread would leave most of a CTA's registers empty: the
  // two-pass kernel (sized to the row) does better there, unless asked otherwise.
  const int64_t packs = (span + twopass.vec - 1) / twopass.vec;
  if (!forced && cluster == 1 && packs < 2 * kClusterThreads) return refuse("the row is short");
  return LaunchPlan{KernelKind::Cluster, twopass.vec, kClusterThreads, int(cluster), twopass.vec, twopass.vec,
                    nullptr};
}

// The launch decision from the tensors alone. A cluster plan still has to pass the
// device's launchability query: choose_plan() below is what every caller uses.
inline LaunchPlan plan_launch(const PlanInput& in) {
  const int vec = natural_vec(in.s.type, in.t.type);
  // Columns the pack grid covers: the row plus its lead, which is 0 on every row when
  // the student's row 0 is 16-byte aligned and its stride a whole number of packs.
  const bool aligned_rows = row0_phase(in.s, vec) == 0 && (in.n_rows <= 1 || in.s.stride % vec == 0);
  const int64_t span = in.vocab_size + (aligned_rows ? 0 : vec - 1);
  const int64_t packs = (span + vec - 1) / vec;
  LaunchPlan twopass{KernelKind::TwoPass, vec, twopass_threads(packs), 1, part_width(in.t, in.s, vec, in.n_rows),
                     in.has_grad ? part_width(in.g, in.s, vec, in.n_rows) : vec, nullptr};
  if (in.force == KernelOverride::TwoPass) return twopass;
  const bool forced = in.force == KernelOverride::Cluster;
  const LaunchPlan cluster = cluster_plan(in, twopass, span, forced);
  if (cluster.refused == nullptr || forced) return cluster;  // forced and refused: an error for the caller
  return twopass;
}

// The one launch decision, shared by the forward launch and the plan operator:
// plan_launch(), then for a cluster plan the device's answer whether this kernel
// instance can co-schedule plan.cluster CTAs (`launchable(plan)`, a
// cluster_launchable() call on a GPU). Not launchable: the two-pass kernel, or
// plan.refused when the cluster kernel was forced.
template <typename Launchable>
LaunchPlan choose_plan(const PlanInput& in, Launchable&& launchable) {
  LaunchPlan plan = plan_launch(in);
  if (plan.kind != KernelKind::Cluster || launchable(plan)) return plan;
  if (in.force == KernelOverride::Cluster) {
    plan.kind = KernelKind::TwoPass;
    plan.refused = "the device cannot co-schedule a cluster of this size for this kernel (or the build has no sm_90a code)";
    return plan;
  }
  PlanInput two = in;
  two.force = KernelOverride::TwoPass;
  return plan_launch(two);
}

// ---------------------------------------------------------------------------------------
// Sparse teachers (kd_sparse.cu): K ids and log-probabilities per row instead of teacher
// logits. One CTA per row; the row of s is read once (statistics, and a copy of as much of
// it as fits staged in shared memory) and the gradient written once; only the part of the
// row that did not fit is read a second time (from L2, likely: a few tens of KB per SM).

constexpr int kSparseMaxThreads = 1024;
constexpr int kSparseUnroll = 4;          // 16-byte packs of s in flight per thread in the read sweep
constexpr int kSparseSlotBytes = 16;      // shared memory per support slot: id, s, log p, gradient

struct SparseKDLaunch {
  const void* student;     // [N, >= V], dtype s_type
  void* grad;              // [N, g_width], dtype s_type; may alias student (in place)
  const void* ids;         // [N, k] int32 or int64 (ids_int64), contiguous rows of ids_stride
  const void* logprobs;    // [N, k] dtype lp_type
  const int64_t* labels;   // [N] or nullptr
  const float* grad_scale; // device scalar
  float* loss;             // [N]
  int64_t s_stride, g_stride, ids_stride, lp_stride;
  int64_t g_width, n_rows, k;
  ElemType s_type, lp_type;
  bool ids_int64;
  int64_t stage_limit;     // bytes of shared memory the row copy may use at most (< 0: all that fits)
  KDParams p;              // with p.tail
};

// The launch of one sparse call: threads per CTA, and the dynamic shared memory layout:
// [stage: stage_packs 16-byte packs of the row][bitmap: the support's columns, one bit per
// pack position][slots: k x kSparseSlotBytes].
struct SparsePlan {
  int vec, threads, g_part;
  int64_t max_packs;     // packs a row spans at most (its lead included)
  int64_t stage_packs;   // the first stage_packs packs of each row are kept in shared memory
  int64_t bitmap_words;  // 32-bit words of the support bitmap
  size_t smem;           // dynamic shared memory bytes
  const char* refused;   // why it cannot launch (K too large for shared memory), or nullptr
};

inline SparsePlan plan_sparse(int64_t vocab_size, int64_t k, const RowLayout& s, const RowLayout& g, int64_t n_rows,
                              size_t smem_available, int64_t stage_limit) {
  SparsePlan plan{};
  plan.vec = 16 / elem_bytes(s.type);
  plan.max_packs = (vocab_size + 2 * int64_t(plan.vec) - 2) / plan.vec;
  plan.threads = std::min(twopass_threads(plan.max_packs), kSparseMaxThreads);
  plan.g_part = part_width(g, s, plan.vec, n_rows);
  plan.bitmap_words = (plan.max_packs * plan.vec + 31) / 32;
  const int64_t fixed = plan.bitmap_words * 4 + ((k * kSparseSlotBytes + 15) / 16) * 16;
  if (fixed > int64_t(smem_available)) {
    plan.refused = "the support (K) and the bitmap need more shared memory than the device has";
    return plan;
  }
  int64_t room = (int64_t(smem_available) - fixed) / 16;
  if (stage_limit >= 0) room = std::min(room, stage_limit / 16);
  plan.stage_packs = std::min(room, plan.max_packs);
  plan.smem = size_t(plan.stage_packs * 16 + fixed);
  return plan;
}

// Loss [N] and gradient of the sparse loss (kd_sparse.cu), and the per-token diagnostics
// into token_stats ([N, kStatsWidth] float32, sparse_kd_forward_stats) unless it is nullptr.
// (Not a field of SparseKDLaunch: the kernel copies that struct to local memory for its
// support phase, and a larger copy changed the code of the kernels without diagnostics.)
// Returns cudaErrorInvalidValue for a plan it does not take, launching nothing.
cudaError_t launch_kd_sparse(const SparseKDLaunch& a, float* token_stats, cudaStream_t stream);

// The plan launch_kd_sparse would use for `a` on the current device.
SparsePlan sparse_plan_for(const SparseKDLaunch& a);

// ---------------------------------------------------------------------------------------
// Several teachers (kd_multi.cu; docs/multi_teacher.md): K <= kMaxKernelTeachers teacher
// rows per token, weighted per token, combined as a mixture or a weighted sum. One CTA per
// row, the two-pass kernel's phases; a row reads only the teachers whose weight is not 0
// there (the "active" ones), each active teacher row once per phase.

// Threads per CTA at most, and CTAs per SM: the per-teacher statistics, packs and per-entry
// terms need about 100 registers (1024 threads get 64), and two CTAs per SM let one CTA's
// block reductions between phases overlap the other's sweeps (unmeasured: no GPU yet).
constexpr int kMultiMaxThreads = 256;
constexpr int kMultiMinBlocksPerSM = 2;

struct MultiKDLaunch {
  const void* student;                          // [N, >= V], dtype s_type
  const void* teachers[kMaxKernelTeachers];     // k of them, [N, >= V] each, all of dtype t_type
  int64_t t_strides[kMaxKernelTeachers];
  int k;                                        // teachers, 1..kMaxKernelTeachers
  const float* weights;                         // w(k, r) = weights[k * w_stride_k + r * w_stride_n]
  int64_t w_stride_k, w_stride_n;               // any strides (0 along N: one weight per teacher)
  void* grad;                                   // [N, g_width], dtype s_type; may alias student (in place)
  const int64_t* labels;                        // [N] or nullptr
  const float* grad_scale;                      // device scalar: the reduction's 1/denominator
  float* loss;                                  // [N]
  int64_t s_stride, g_stride, g_width, n_rows;
  ElemType s_type, t_type;
  int t_part, g_part;                           // set by launch_kd_multi from the plan
  KDParams p;                                   // with p.teacher_mode
};

// Whether the kernel is built for teachers of dtype t beside a student of dtype s: the
// student's own dtype, float32 (any teacher converts to it without loss), and bfloat16 for a
// float32 student (a bf16 model's logits beside a student's upcast ones). Other teachers (and
// teachers of several dtypes) are converted to float32 by the launch first: a copy of their
// first vocab_size columns. Each pair is two kernels (with and without the logit options);
// the other 16-bit pairs were left out to keep the compile time of the file modest.
inline bool multi_teacher_type_built(ElemType s, ElemType t) {
  return t == s || t == ElemType::F32 || (s == ElemType::F32 && t == ElemType::BF16);
}

// The launch of one several-teachers call: the two-pass kernel's pack grid (16 bytes of the
// wider dtype, following the student's rows), the narrowest part any teacher needs, threads
// sized to the row up to kMultiMaxThreads.
struct MultiPlan {
  int vec, threads, t_part, g_part;
};

// `t` holds the k teachers' layouts (one dtype: the launch converts the odd ones first).
inline MultiPlan plan_multi(int64_t vocab_size, int64_t n_rows, const RowLayout& s, const RowLayout* t, int k,
                            const RowLayout& g) {
  MultiPlan plan{};
  plan.vec = natural_vec(s.type, t[0].type);
  const bool aligned_rows = row0_phase(s, plan.vec) == 0 && (n_rows <= 1 || s.stride % plan.vec == 0);
  const int64_t span = vocab_size + (aligned_rows ? 0 : plan.vec - 1);
  plan.threads = std::min(twopass_threads((span + plan.vec - 1) / plan.vec), kMultiMaxThreads);
  plan.t_part = plan.vec;
  for (int i = 0; i < k; ++i) plan.t_part = std::min(plan.t_part, part_width(t[i], s, plan.vec, n_rows));
  plan.g_part = part_width(g, s, plan.vec, n_rows);
  return plan;
}

// Loss [N] and gradient of several teachers. Returns cudaErrorInvalidValue for a launch it
// does not take (teachers' dtype and plan inconsistent, k out of range), launching nothing.
cudaError_t launch_kd_multi(const MultiKDLaunch& a, const MultiPlan& plan, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Launchers (kd_twopass.cu, kd_cluster.cu, kd_scale_grad.cu). They return the CUDA error
// of the launch; the caller checks it.

// Loss [N] and gradient with the two-pass kernel (plan.kind == TwoPass).
cudaError_t launch_kd_twopass(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// Row statistics [N, 5] (a.stats_out) with the two-pass kernel's first pass.
cudaError_t launch_row_stats(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// The vocab-parallel shard phases with the two-pass kernel's sweeps: the slice's statistics
// [N, kShardStatsWidth] (a.stats_out), and its row sums [N, kRowSumsWidth] (a.sums_out)
// given the global statistics (a.stats_in). Its write_grad is launch_kd_twopass with
// a.stats_in, a.sums_in and a.shard.
cudaError_t launch_shard_row_stats(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);
cudaError_t launch_shard_row_sums(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// Loss and gradient with the cluster kernel (plan.kind == Cluster, from choose_plan with
// cluster_launchable). Returns cudaErrorNotSupported, launching nothing, for a plan the
// kernel does not take.
cudaError_t launch_kd_cluster(const KDLaunch& a, const LaunchPlan& plan, cudaStream_t stream);

// Whether the cluster kernel instance for (type, divergence, options path: has_options,
// per-token diagnostics: `stats`) has sm_90 code for the current device and can co-schedule
// a cluster of `cluster` CTAs there. Cached per instance, device and cluster size. Leaves
// any CUDA error raised before it pending, and clears only the errors its own queries raise.
bool cluster_launchable(ElemType type, Divergence divergence, bool options, bool stats, int cluster);

// Columns of a row the diagnostics' argmax can name (TokenStats: 32-bit columns).
constexpr int64_t kMaxStatsVocab = 0xfffffffe;

// grad[r, :] *= factor[r * factor_stride] (factor_stride 0: one scalar), read on the
// device; rows whose factor is exactly 1 are not touched, without a host sync.
cudaError_t launch_scale_grad(void* grad, ElemType type, int64_t n_rows, int64_t width, int64_t stride,
                              const float* factor, int64_t factor_stride, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
