// The fastkd operators' CUDA implementations (kd_op.h: DeviceOps; ops.cpp checks the
// arguments for every device): the launch plan (kd_cuda.h), and the kernels' C-style
// launchers on the tensors' device's current stream.
//
// Nothing here synchronises with the device: grad_scale and grad_output are read by the
// kernels from device memory, so the ops work under CUDA graphs and torch.compile.
//
// FASTKD_CUDA_KERNEL=twopass|cluster|auto (default auto) forces a kernel, for tests and
// benchmarks; a forced `cluster` that cannot run a call (mixed dtypes, given row
// statistics, a teacher misaligned against the student, V too large, no sm_90 cluster
// support, a cluster the device cannot co-schedule) raises: it never runs the two-pass
// kernel instead. torch.ops.fastkd.cuda_last_kernel() names the last forward kernel run
// (the sparse and several-teachers kernels included: "sparse[...]", "multi[...]").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "../kd_op.h"
#include "kd_cuda.h"

namespace fastkd {
namespace cuda {
namespace {

ElemType elem_type(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return ElemType::F32;
    case at::kBFloat16: return ElemType::BF16;
    case at::kHalf: return ElemType::F16;
    default: break;
  }
  TORCH_CHECK(false, "fastkd (cuda): ", what, " must be float32, bfloat16 or float16, got ", t,
              " (float64 runs on the 'cpu' and 'torch' backends)");
  return ElemType::F32;  // not reached
}

KernelOverride kernel_override() {
  const char* env = std::getenv("FASTKD_CUDA_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return KernelOverride::Auto;
  if (std::strcmp(env, "twopass") == 0) return KernelOverride::TwoPass;
  if (std::strcmp(env, "cluster") == 0) return KernelOverride::Cluster;
  TORCH_CHECK(false, "FASTKD_CUDA_KERNEL must be auto, twopass or cluster, got '", env, "'");
  return KernelOverride::Auto;  // not reached
}

// sm_90 (Hopper) with thread-block-cluster launch. The cluster kernel is built for the
// sm_90a target only, whose code runs on compute capability 9.0 alone.
bool cluster_device(int device) {
  int major = 0, minor = 0, cluster = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device));
  return major == 9 && minor == 0 && cluster != 0;
}

// The launch decision for a forward call (choose_plan, kd_cuda.h, with the device's
// launchability answer), made on the tensors' device: the forward launch and the
// cuda_kernel_plan operator both take it from here. A forced cluster kernel that cannot
// run is an error, never a silent two-pass launch.
LaunchPlan make_plan(const KDLaunch& a, int device) {
  PlanInput in{};
  in.vocab_size = a.p.vocab_size;
  in.n_rows = a.n_rows;
  in.s = row_layout(a.student, a.s_stride, a.s_type);
  in.t = row_layout(a.teacher, a.t_stride, a.t_type);
  in.has_grad = true;
  in.g = row_layout(a.grad, a.g_stride, a.s_type);
  in.stats_given = a.stats_in != nullptr;
  in.force = kernel_override();
  in.cluster_device = in.force != KernelOverride::TwoPass && cluster_device(device);
  const LaunchPlan plan = choose_plan(in, [&](const LaunchPlan& p) {
    return cluster_launchable(a.s_type, a.p.divergence, has_options(a.p), a.token_stats != nullptr, p.cluster);
  });
  TORCH_CHECK(plan.refused == nullptr, "fastkd (cuda): FASTKD_CUDA_KERNEL=cluster, but the cluster kernel cannot run "
              "this call: ", plan.refused, " (unset FASTKD_CUDA_KERNEL or set it to auto to let fastkd choose)");
  return plan;
}

// "cluster[C=8,vec=8,threads=256]" or "twopass[vec=8,t_part=8,g_part=8,threads=1024]".
std::string describe(const LaunchPlan& plan) {
  if (plan.kind == KernelKind::Cluster)
    return "cluster[C=" + std::to_string(plan.cluster) + ",vec=" + std::to_string(plan.vec) +
           ",threads=" + std::to_string(plan.threads) + "]";
  return "twopass[vec=" + std::to_string(plan.vec) + ",t_part=" + std::to_string(plan.t_part) +
         ",g_part=" + std::to_string(plan.g_part) + ",threads=" + std::to_string(plan.threads) + "]";
}

// The plan of the last forward kernel this process launched (tests assert it).
std::mutex last_kernel_mutex;
std::string last_kernel;

std::string cuda_last_kernel() {
  const std::lock_guard<std::mutex> lock(last_kernel_mutex);
  return last_kernel;
}

// Runs the planned kernel; a launch error is an error (no fallback).
void launch_forward(KDLaunch& a, int device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const LaunchPlan plan = make_plan(a, device);
  C10_CUDA_CHECK(plan.kind == KernelKind::Cluster ? launch_kd_cluster(a, plan, stream)
                                                   : launch_kd_twopass(a, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::lock_guard<std::mutex> lock(last_kernel_mutex);
  last_kernel = describe(plan);
}

// The per-token diagnostics' output (kd_forward_stats: ops.cpp allocates it in the loss
// dtype, float32 here), or nullptr.
float* stats_data(const c10::optional<at::Tensor>& stats, const KDParams& p) {
  if (!stats) return nullptr;
  TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->is_contiguous() && stats->dim() == 2 &&
                  stats->size(1) == kStatsWidth,
              "fastkd (cuda): the diagnostics must be a contiguous float32 [N, ", kStatsWidth, "] tensor");
  TORCH_CHECK(p.vocab_size <= kMaxStatsVocab, "fastkd (cuda): return_stats takes vocab_size <= ", kMaxStatsVocab,
              ", got ", p.vocab_size);
  return stats->data_ptr<float>();
}

KDLaunch make_launch(const ForwardArgs& args, const at::Tensor& grad_scale, at::Tensor& loss, at::Tensor& grad) {
  KDLaunch a{};
  a.student = args.student.data_ptr();
  a.teacher = args.teacher.data_ptr();
  a.grad = grad.data_ptr();
  a.labels = args.labels ? args.labels->data_ptr<int64_t>() : nullptr;
  a.grad_scale = grad_scale.data_ptr<float>();
  a.stats_in = args.row_stats ? args.row_stats->data_ptr<float>() : nullptr;
  a.loss = loss.data_ptr<float>();
  a.stats_out = nullptr;
  a.s_stride = args.student.stride(0);
  a.t_stride = args.teacher.stride(0);
  a.g_stride = grad.stride(0);
  a.g_width = grad.size(1);
  a.n_rows = args.student.size(0);
  a.s_type = elem_type(args.student.scalar_type(), "student logits");
  a.t_type = elem_type(args.teacher.scalar_type(), "teacher logits");
  a.with_ce_raw = false;
  a.p = args.params;
  a.token_stats = stats_data(args.stats, args.params);
  return a;
}

void op_forward(const ForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  TORCH_CHECK(args.grad_scale.is_cuda(), "fastkd (cuda): grad_scale must be on the logits' device");
  if (args.student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(args.student.device());
  // A no-op when it is already float32 (the Python layer passes float32).
  const at::Tensor grad_scale = args.grad_scale.to(at::kFloat).contiguous();
  KDLaunch a = make_launch(args, grad_scale, loss, grad);
  launch_forward(a, args.student.get_device());
}

// The gradient with the student's alignment (grad_alloc, kd_cuda.h): over-allocated by
// under 16 bytes per row and viewed, so a sliced or offset student keeps 16-byte packs.
at::Tensor op_empty_grad(const at::Tensor& student) {
  const int64_t n = student.size(0), cols = student.size(1);
  const GradAlloc g = grad_alloc(
      row_layout(student.data_ptr(), student.stride(0), elem_type(student.scalar_type(), "student logits")), n, cols);
  if (g.offset == 0 && g.stride == cols) return at::empty({n, cols}, student.options());
  return at::empty({g.numel(n, cols)}, student.options()).as_strided({n, cols}, {g.stride, 1}, g.offset);
}

// A launch over the logits without a gradient (the row_stats and row_sums phases alone),
// and its two-pass plan.
KDLaunch stats_launch(const ForwardArgs& args, LaunchPlan& plan) {
  KDLaunch a{};
  a.student = args.student.data_ptr();
  a.teacher = args.teacher.data_ptr();
  a.s_stride = args.student.stride(0);
  a.t_stride = args.teacher.stride(0);
  a.n_rows = args.student.size(0);
  a.s_type = elem_type(args.student.scalar_type(), "student logits");
  a.t_type = elem_type(args.teacher.scalar_type(), "teacher logits");
  a.p = args.params;
  PlanInput in{};
  in.vocab_size = a.p.vocab_size;
  in.n_rows = a.n_rows;
  in.s = row_layout(a.student, a.s_stride, a.s_type);
  in.t = row_layout(a.teacher, a.t_stride, a.t_type);
  in.force = KernelOverride::TwoPass;  // the row_stats phase is the two-pass kernel's
  plan = plan_launch(in);
  return a;
}

using StatsLauncher = cudaError_t (*)(const KDLaunch&, const LaunchPlan&, cudaStream_t);

// A row_stats kernel (the [N, 5] one, or the vocab-parallel slice's [N, 6]) into `out`.
void run_row_stats(const ForwardArgs& args, bool with_ce, at::Tensor& out, StatsLauncher launcher) {
  const c10::cuda::CUDAGuard guard(args.student.device());
  LaunchPlan plan;
  KDLaunch a = stats_launch(args, plan);
  a.stats_out = out.data_ptr<float>();
  a.with_ce_raw = with_ce;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.student.get_device()).stream();
  C10_CUDA_CHECK(launcher(a, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// `with_raw` (ops.cpp: the CE term or the z-loss is on): the T = 1 sum-exp column.
void op_row_stats(const ForwardArgs& args, bool with_raw, at::Tensor& out) {
  run_row_stats(args, with_raw, out, &launch_row_stats);
}

// ---------------------------------------------------------------------------------------
// The vocab-parallel shard phases (the two-pass kernel's sweeps; kd_twopass.cu).

void op_shard_row_stats(const ForwardArgs& args, at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "fastkd (cuda): the shard statistics are float32");
  run_row_stats(args, args.params.ce_weight != 0.0f || args.params.z_loss != 0.0f, out, &launch_shard_row_stats);
}

void op_shard_row_sums(const ForwardArgs& args, at::Tensor& out) {
  if (args.student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(args.student.device());
  LaunchPlan plan;
  KDLaunch a = stats_launch(args, plan);
  a.stats_in = args.row_stats->data_ptr<float>();
  a.sums_out = out.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.student.get_device()).stream();
  C10_CUDA_CHECK(launch_shard_row_sums(a, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward kernel with the caller's statistics and row sums, and the slice's labels;
// its per-row loss (the slice's share) goes to a scratch tensor.
void op_shard_write_grad(const ForwardArgs& args, at::Tensor& grad) {
  TORCH_CHECK(args.grad_scale.is_cuda(), "fastkd (cuda): grad_scale must be on the logits' device");
  if (args.student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(args.student.device());
  const at::Tensor grad_scale = args.grad_scale.to(at::kFloat).contiguous();
  at::Tensor scratch_loss = at::empty({args.student.size(0)}, args.student.options().dtype(at::kFloat));
  KDLaunch a = make_launch(args, grad_scale, scratch_loss, grad);
  a.sums_in = args.row_sums ? args.row_sums->data_ptr<float>() : nullptr;
  a.shard = true;
  a.vocab_start = args.vocab_start;
  launch_forward(a, args.student.get_device());  // stats given: the two-pass kernel
}

// Backward: grad *= grad_output without reading grad_output on the host.
void op_scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  const bool rows = grad.dim() == 2 && grad.stride(1) == 1 && grad.scalar_type() != at::kDouble;
  if (!grad_output.is_cuda()) {
    // A host scalar costs nothing to read.
    TORCH_CHECK(grad_output.numel() == 1, "fastkd: a per-row grad_output must be on the gradient's device");
    const double g = grad_output.item<double>();
    if (g != 1.0) grad.mul_(g);
    return;
  }
  if (!rows) {  // not a layout the kernels produce; stay correct and sync-free
    grad.mul_(grad_output.numel() == 1 ? grad_output.reshape({}) : grad_output.reshape({-1, 1}));
    return;
  }
  const int64_t n = grad.size(0);
  TORCH_CHECK(grad_output.numel() == 1 || grad_output.numel() == n, "fastkd: grad_output has ",
              grad_output.numel(), " elements for a gradient of ", n, " rows");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor factor = grad_output.to(at::kFloat).reshape({-1});
  const int64_t factor_stride = grad_output.numel() == 1 ? 0 : factor.stride(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  C10_CUDA_CHECK(launch_scale_grad(grad.data_ptr(), elem_type(grad.scalar_type(), "gradient"), n, grad.size(1),
                                   grad.stride(0), factor.data_ptr<float>(), factor_stride, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The sparse-teacher forward (kd_sparse.cu). FASTKD_SPARSE_STAGE_KB caps the shared memory
// that holds a copy of the row (default: all the device allows), for tuning on a GPU.
int64_t sparse_stage_limit() {
  const char* env = std::getenv("FASTKD_SPARSE_STAGE_KB");
  if (env == nullptr || *env == '\0') return -1;
  char* end = nullptr;
  const long kb = std::strtol(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && kb >= 0, "FASTKD_SPARSE_STAGE_KB must be a number of KB >= 0, got '", env,
              "'");
  return int64_t(kb) * 1024;
}

void op_sparse_forward(const SparseForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  TORCH_CHECK(args.grad_scale.is_cuda(), "fastkd (cuda): grad_scale must be on the logits' device");
  TORCH_CHECK(loss.scalar_type() == at::kFloat, "fastkd (cuda): float64 runs on the 'cpu' and 'torch' backends");
  if (args.student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(args.student.device());
  const at::Tensor grad_scale = args.grad_scale.to(at::kFloat).contiguous();
  SparseKDLaunch a{};
  a.student = args.student.data_ptr();
  a.grad = grad.data_ptr();
  a.ids = args.ids.data_ptr();
  a.logprobs = args.logprobs.data_ptr();
  a.labels = args.labels ? args.labels->data_ptr<int64_t>() : nullptr;
  a.grad_scale = grad_scale.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.s_stride = args.student.stride(0);
  a.g_stride = grad.stride(0);
  a.ids_stride = args.ids.size(1);
  a.lp_stride = args.logprobs.size(1);
  a.g_width = grad.size(1);
  a.n_rows = args.student.size(0);
  a.k = args.ids.size(1);
  a.s_type = elem_type(args.student.scalar_type(), "student logits");
  a.lp_type = elem_type(args.logprobs.scalar_type(), "teacher log-probs");
  TORCH_CHECK(args.ids.scalar_type() == at::kInt || args.ids.scalar_type() == at::kLong,
              "fastkd (cuda): teacher ids must be int32 or int64");
  a.ids_int64 = args.ids.scalar_type() == at::kLong;
  a.stage_limit = sparse_stage_limit();
  a.p = args.params;
  float* const token_stats = stats_data(args.stats, args.params);
  const SparsePlan plan = sparse_plan_for(a);
  TORCH_CHECK(plan.refused == nullptr, "fastkd (cuda): sparse_kd_forward cannot run K = ", a.k, ": ", plan.refused);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.student.get_device()).stream();
  C10_CUDA_CHECK(launch_kd_sparse(a, token_stats, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::lock_guard<std::mutex> lock(last_kernel_mutex);
  last_kernel = "sparse[vec=" + std::to_string(plan.vec) + ",threads=" + std::to_string(plan.threads) +
                ",stage_packs=" + std::to_string(plan.stage_packs) + "/" + std::to_string(plan.max_packs) +
                ",g_part=" + std::to_string(plan.g_part) + ",smem=" + std::to_string(plan.smem) + "]";
}

// Several teachers (kd_multi.cu). The kernel reads its teachers in one dtype, of the pairs
// it is built for (multi_teacher_type_built, kd_cuda.h); otherwise every teacher not in
// float32 is converted to float32 first, a copy of its first vocab_size columns (lossless),
// which cuda_last_kernel() reports as "copied".
void op_multi_forward(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  TORCH_CHECK(args.grad_scale.is_cuda(), "fastkd (cuda): grad_scale must be on the logits' device");
  TORCH_CHECK(loss.scalar_type() == at::kFloat, "fastkd (cuda): float64 runs on the 'cpu' and 'torch' backends");
  if (args.student.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(args.student.device());
  const at::Tensor grad_scale = args.grad_scale.to(at::kFloat).contiguous();
  const int k = static_cast<int>(args.teachers.size());
  const int64_t V = args.params.vocab_size;
  const ElemType s_type = elem_type(args.student.scalar_type(), "student logits");
  ElemType t_type = elem_type(args.teachers[0].scalar_type(), "teacher logits");
  bool one_type = true;
  for (const at::Tensor& t : args.teachers) one_type = elem_type(t.scalar_type(), "teacher logits") == t_type && one_type;
  const bool copy = !one_type || !multi_teacher_type_built(s_type, t_type);
  std::vector<at::Tensor> teachers;
  for (const at::Tensor& t : args.teachers)
    teachers.push_back(copy && t.scalar_type() != at::kFloat ? t.narrow(1, 0, V).to(at::kFloat) : t);
  if (copy) t_type = ElemType::F32;

  MultiKDLaunch a{};
  a.student = args.student.data_ptr();
  RowLayout t_rows[kMaxKernelTeachers];
  for (int i = 0; i < k; ++i) {
    a.teachers[i] = teachers[i].data_ptr();
    a.t_strides[i] = teachers[i].stride(0);
    t_rows[i] = row_layout(a.teachers[i], a.t_strides[i], t_type);
  }
  a.k = k;
  a.weights = args.weights.data_ptr<float>();
  a.w_stride_k = args.weights.stride(0);
  a.w_stride_n = args.weights.stride(1);
  a.grad = grad.data_ptr();
  a.labels = args.labels ? args.labels->data_ptr<int64_t>() : nullptr;
  a.grad_scale = grad_scale.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.s_stride = args.student.stride(0);
  a.g_stride = grad.stride(0);
  a.g_width = grad.size(1);
  a.n_rows = args.student.size(0);
  a.s_type = s_type;
  a.t_type = t_type;
  a.p = args.params;
  const MultiPlan plan = plan_multi(V, a.n_rows, row_layout(a.student, a.s_stride, s_type), t_rows, k,
                                    row_layout(a.grad, a.g_stride, s_type));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.student.get_device()).stream();
  C10_CUDA_CHECK(launch_kd_multi(a, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::lock_guard<std::mutex> lock(last_kernel_mutex);
  last_kernel = "multi[K=" + std::to_string(k) + ",vec=" + std::to_string(plan.vec) + ",threads=" +
                std::to_string(plan.threads) + ",t_part=" + std::to_string(plan.t_part) + ",g_part=" +
                std::to_string(plan.g_part) + (copy ? ",teachers=copied" : ",teachers=read") + "]";
}

// Which kernel a forward call on these tensors would run (describe()), by the same
// decision as the launch: the gradient is the one op_empty_grad would allocate (aligned
// as the allocator aligns, to 512 bytes), or the student itself when `inplace`. Raises
// what the call would raise for a forced cluster kernel that cannot run.
std::string cuda_kernel_plan(const at::Tensor& student, const at::Tensor& teacher, bool with_row_stats,
                             int64_t vocab_size, bool inplace) {
  check_logits_pair(student, teacher, vocab_size);
  TORCH_CHECK(student.is_cuda(), "fastkd (cuda): logits must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(student.device());
  KDLaunch a{};
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.s_stride = student.stride(0);
  a.t_stride = teacher.stride(0);
  a.n_rows = student.size(0);
  a.s_type = elem_type(student.scalar_type(), "student logits");
  a.t_type = elem_type(teacher.scalar_type(), "teacher logits");
  if (inplace) {
    a.grad = student.data_ptr();
    a.g_stride = a.s_stride;
  } else {
    const GradAlloc g = grad_alloc(row_layout(a.student, a.s_stride, a.s_type), a.n_rows, student.size(1));
    a.grad = reinterpret_cast<void*>(uintptr_t(g.offset * elem_bytes(a.s_type)));  // only its address mod 16 matters
    a.g_stride = g.stride;
  }
  a.stats_in = with_row_stats ? reinterpret_cast<const float*>(&a) : nullptr;  // only its presence matters
  a.p.vocab_size = vocab_size;
  a.p.divergence = Divergence::ForwardKL;  // every divergence's instance has the same launch bounds
  a.p.scale_s = a.p.scale_t = 1.0f;        // no options: the default instances
  return describe(make_plan(a, student.get_device()));
}

}  // namespace

// A pure addition to the fastkd library (ops.cpp owns the main schemas).
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("cuda_kernel_plan(Tensor student, Tensor teacher, bool with_row_stats, int vocab_size, bool inplace=False) -> str");
  m.def("cuda_last_kernel() -> str", &cuda_last_kernel);
}

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("cuda_kernel_plan", &cuda_kernel_plan); }

const DeviceOps& device_ops() {
  static const DeviceOps ops = [] {
    DeviceOps o{&op_empty_grad,      &op_forward,        &op_row_stats,        &op_scale_grad,
                &op_shard_row_stats, &op_shard_row_sums, &op_shard_write_grad, &op_sparse_forward,
                &op_multi_forward};
    // The forward and sparse kernels write ForwardArgs::stats when it is given (their kStats
    // instances; compile-checked only: no GPU has run them yet).
    o.forward_writes_stats = true;
    o.sparse_forward_writes_stats = true;
    return o;
  }();
  return ops;
}

}  // namespace cuda
}  // namespace fastkd
