// Operator schemas of fastkd._C and the argument checks every implementation shares.
//
//   row_stats(student, teacher, inv_temperature, vocab_size, with_ce) -> [N, 5] float32
//   kd_forward(student, teacher, labels?, grad_scale, row_stats?, divergence, ...) -> (loss [N], grad)
//   kd_forward_inplace(student!, ...) -> loss [N]       (the gradient overwrites student)
//   scale_grad_(grad!, grad_output)                     (backward: grad *= grad_output)
//
// Inputs are 2-D with unit stride along the vocabulary; the Python layer flattens and
// validates user input, these checks guard the operator contract itself.
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>

#include "cpu/grad_buffer_cache.h"
#include "kd_op.h"

namespace fastkd {

void check_logits_pair(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_size) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "fastkd: student and teacher must be 2-D [N, V], got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0), "fastkd: student and teacher row counts differ: ",
              student.size(0), " vs ", teacher.size(0));
  TORCH_CHECK(student.device() == teacher.device(), "fastkd: student and teacher are on different devices");
  TORCH_CHECK(student.stride(1) == 1 && teacher.stride(1) == 1,
              "fastkd: logits need unit stride along the vocabulary");
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= student.size(1) && vocab_size <= teacher.size(1),
              "fastkd: vocab_size ", vocab_size, " must be in [1, min(", student.size(1), ", ",
              teacher.size(1), ")]");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()),
              "fastkd: logits must be floating point");
}

ForwardArgs check_forward_args(const at::Tensor& student, const at::Tensor& teacher,
                               const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                               const c10::optional<at::Tensor>& row_stats, c10::string_view divergence,
                               double inv_temperature, double beta, double div_weight, double ce_weight,
                               int64_t ignore_index, int64_t vocab_size) {
  check_logits_pair(student, teacher, vocab_size);
  const int64_t n = student.size(0);
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n && labels->scalar_type() == at::kLong &&
                    labels->is_contiguous() && labels->device() == student.device(),
                "fastkd: labels must be a contiguous int64 [N] tensor on the logits' device");
  }
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.device() == student.device(),
              "fastkd: grad_scale must be a one-element tensor on the logits' device");
  if (row_stats) {
    TORCH_CHECK(row_stats->dim() == 2 && row_stats->size(0) == n && row_stats->size(1) == kRowStatsWidth &&
                    row_stats->scalar_type() == at::kFloat && row_stats->is_contiguous(),
                "fastkd: row_stats must be a contiguous float32 [N, ", kRowStatsWidth, "] tensor");
  }
  TORCH_CHECK(inv_temperature > 0.0 && std::isfinite(inv_temperature),
              "fastkd: inv_temperature must be finite and > 0 (temperature > 0), got ", inv_temperature);
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "fastkd: beta must be in [0, 1]");
  bool ok = true;
  KDParams p = make_params(std::string(divergence.data(), divergence.size()), inv_temperature, beta,
                           div_weight, ce_weight, ignore_index, vocab_size, &ok);
  TORCH_CHECK(ok, "fastkd: unknown divergence '", std::string(divergence.data(), divergence.size()), "'");
  TORCH_CHECK(ce_weight == 0.0 || labels, "fastkd: ce_weight != 0 needs labels");
  return ForwardArgs{student, teacher, labels, grad_scale, row_stats, p,
                     make_exact_params(inv_temperature, beta, div_weight, ce_weight)};
}

}  // namespace fastkd

TORCH_LIBRARY(fastkd, m) {
  m.def("row_stats(Tensor student, Tensor teacher, float inv_temperature, int vocab_size, bool with_ce) -> Tensor");
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor? row_stats, "
      "str divergence, float inv_temperature, float beta, float div_weight, float ce_weight, "
      "int ignore_index, int vocab_size) -> (Tensor, Tensor)");
  m.def(
      "kd_forward_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor grad_scale, "
      "Tensor? row_stats, str divergence, float inv_temperature, float beta, float div_weight, "
      "float ce_weight, int ignore_index, int vocab_size) -> Tensor");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
}

// Importing fastkd._C registers the operators above; the module itself holds a report of
// what was compiled in and the CPU gradient-buffer cache's controls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("empty_cpu_grad_cache", &fastkd::cpu::empty_grad_buffer_cache,
        "Release the freed CPU gradient buffers fastkd keeps for reuse; returns the bytes released");
  m.def("cpu_grad_cache_bytes", &fastkd::cpu::grad_buffer_cache_bytes,
        "Bytes held by freed CPU gradient buffers kept for reuse");
#ifdef FASTKD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
