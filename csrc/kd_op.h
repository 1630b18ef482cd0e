// Host-side contract of the fastkd operators, shared by the CPU and CUDA implementations:
// the checked arguments of one forward call, and the checks themselves.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "kd_params.h"

namespace fastkd {

struct ForwardArgs {
  at::Tensor student;                  // [N, Vs], unit stride along the vocab
  at::Tensor teacher;                  // [N, Vt], unit stride along the vocab
  c10::optional<at::Tensor> labels;    // [N] int64, contiguous
  at::Tensor grad_scale;               // float32 scalar: the reduction's 1/denominator
  c10::optional<at::Tensor> row_stats; // [N, 5] float32, contiguous, or none
  KDParams params;
  ExactParams exact;                   // the same settings in double
};

void check_logits_pair(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_size);

ForwardArgs check_forward_args(const at::Tensor& student, const at::Tensor& teacher,
                               const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                               const c10::optional<at::Tensor>& row_stats, c10::string_view divergence,
                               double inv_temperature, double beta, double div_weight, double ce_weight,
                               int64_t ignore_index, int64_t vocab_size);

}  // namespace fastkd
