// The fastkd operators' CUDA implementations (kd_op.h: DeviceOps; ops.cpp checks the
// arguments for every device): the launch plan (kd_cuda.h), and the kernels' C-style
// launchers on the tensors' device's current stream.
//
// Nothing here synchronises with the device: grad_scale and grad_output are read by the
// kernels from device memory, so the ops work under CUDA graphs and torch.compile.
//
// FASTKD_CUDA_KERNEL=twopass|cluster|auto (default auto) forces a kernel, for tests and
// benchmarks; `cluster` still falls back to two-pass where the cluster kernel does not
// apply (mixed dtypes, given row statistics, misaligned rows, V too large), and fails
// where the device has no cluster support at all.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
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

// Element offset of a pointer modulo vec (tensors are aligned to their element size).
int64_t phase(const void* ptr, int64_t elem, int64_t vec) {
  return int64_t(reinterpret_cast<uintptr_t>(ptr) / uintptr_t(elem)) % vec;
}

// Whether row r of every tensor starts at the same offset modulo vec, for all r, and
// the largest such offset.
void row_phases(const KDLaunch& a, bool& agree, int& max_lead) {
  const int vec = natural_vec(a.s_type, a.t_type);
  const int64_t es = elem_bytes(a.s_type), et = elem_bytes(a.t_type);
  const int64_t ps = phase(a.student, es, vec);
  agree = ps == phase(a.teacher, et, vec) && (a.grad == nullptr || ps == phase(a.grad, es, vec)) &&
          (a.s_stride - a.t_stride) % vec == 0 && (a.grad == nullptr || (a.s_stride - a.g_stride) % vec == 0);
  // Every row 16-byte aligned when row 0 is and the stride is a whole number of packs.
  max_lead = (ps == 0 && (a.n_rows <= 1 || a.s_stride % vec == 0)) ? 0 : vec - 1;
}

LaunchPlan make_plan(const KDLaunch& a, int device) {
  PlanInput in{};
  in.vocab_size = a.p.vocab_size;
  in.n_rows = a.n_rows;
  in.s_type = a.s_type;
  in.t_type = a.t_type;
  row_phases(a, in.phases_agree, in.max_lead);
  in.stats_given = a.stats_in != nullptr;
  in.force = kernel_override();
  in.cluster_device = in.force != KernelOverride::TwoPass && cluster_device(device);
  TORCH_CHECK(in.force != KernelOverride::Cluster || in.cluster_device,
              "fastkd (cuda): FASTKD_CUDA_KERNEL=cluster needs an sm_90 device with cluster launch");
  return plan_launch(in);
}

// Runs the planned kernel; a cluster plan the device cannot schedule falls back to the
// two-pass kernel.
void launch_forward(KDLaunch& a, int device) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  LaunchPlan plan = make_plan(a, device);
  if (plan.kind == KernelKind::Cluster) {
    const cudaError_t err = launch_kd_cluster(a, plan, stream);
    if (err != cudaErrorNotSupported) {
      C10_CUDA_CHECK(err);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    PlanInput in{a.p.vocab_size, a.n_rows, a.s_type, a.t_type, false, 0, false, false, KernelOverride::TwoPass};
    row_phases(a, in.phases_agree, in.max_lead);
    plan = plan_launch(in);
  }
  C10_CUDA_CHECK(launch_kd_twopass(a, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

at::Tensor op_empty_grad(const at::Tensor& student) {
  return at::empty({student.size(0), student.size(1)}, student.options());
}

void op_row_stats(const ForwardArgs& args, bool with_ce, at::Tensor& out) {
  const at::Tensor& student = args.student;
  const at::Tensor& teacher = args.teacher;
  const c10::cuda::CUDAGuard guard(student.device());
  KDLaunch a{};
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.stats_out = out.data_ptr<float>();
  a.s_stride = student.stride(0);
  a.t_stride = teacher.stride(0);
  a.n_rows = student.size(0);
  a.s_type = elem_type(student.scalar_type(), "student logits");
  a.t_type = elem_type(teacher.scalar_type(), "teacher logits");
  a.with_ce_raw = with_ce;
  a.p = args.params;
  PlanInput in{a.p.vocab_size, a.n_rows, a.s_type, a.t_type, false, 0, false, false, KernelOverride::TwoPass};
  row_phases(a, in.phases_agree, in.max_lead);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  C10_CUDA_CHECK(launch_row_stats(a, plan_launch(in), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

// Which kernel a forward call on these tensors would run, as "cluster[C=8,vec=8,threads=256]"
// or "twopass[vec=8,threads=1024]": for tests and benchmarks.
std::string cuda_kernel_plan(const at::Tensor& student, const at::Tensor& teacher, bool with_row_stats,
                             int64_t vocab_size) {
  check_logits_pair(student, teacher, vocab_size);
  TORCH_CHECK(student.is_cuda(), "fastkd (cuda): logits must be CUDA tensors");
  KDLaunch a{};
  a.student = student.data_ptr();
  a.teacher = teacher.data_ptr();
  a.grad = nullptr;  // a fresh contiguous gradient: aligned like a contiguous student
  a.s_stride = student.stride(0);
  a.t_stride = teacher.stride(0);
  a.n_rows = student.size(0);
  a.s_type = elem_type(student.scalar_type(), "student logits");
  a.t_type = elem_type(teacher.scalar_type(), "teacher logits");
  a.stats_in = with_row_stats ? reinterpret_cast<const float*>(&a) : nullptr;  // only its presence matters
  a.p.vocab_size = vocab_size;
  const LaunchPlan plan = make_plan(a, student.get_device());
  if (plan.kind == KernelKind::Cluster)
    return "cluster[C=" + std::to_string(plan.cluster) + ",vec=" + std::to_string(plan.vec) +
           ",threads=" + std::to_string(plan.threads) + "]";
  return "twopass[vec=" + std::to_string(plan.vec) + ",threads=" + std::to_string(plan.threads) + "]";
}

}  // namespace

// A pure addition to the fastkd library (ops.cpp owns the main schemas).
TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.def("cuda_kernel_plan(Tensor student, Tensor teacher, bool with_row_stats, int vocab_size) -> str");
}

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("cuda_kernel_plan", &cuda_kernel_plan); }

const DeviceOps& device_ops() {
  static const DeviceOps ops{&op_empty_grad, &op_forward, &op_row_stats, &op_scale_grad};
  return ops;
}

}  // namespace cuda
}  // namespace fastkd
