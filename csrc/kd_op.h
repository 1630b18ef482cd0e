// Host-side contract of the fastkd operators: the checked arguments of one call, and the
// per-device implementations (csrc/cpu/kd_cpu.cpp, csrc/cuda/kd_cuda.cpp) that ops.cpp
// dispatches to after its one shared entry check.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <vector>

#include "kd_params.h"

namespace fastkd {

struct ForwardArgs {
  at::Tensor student;                  // [N, Vs], unit stride along the vocab
  at::Tensor teacher;                  // [N, Vt], unit stride along the vocab
  c10::optional<at::Tensor> labels;    // [N] int64, contiguous
  at::Tensor grad_scale;               // scalar: the reduction's 1/denominator
  c10::optional<at::Tensor> row_stats; // [N, kRowStatsWidth] float32 (shard ops: the loss dtype), or none
  KDParams params;
  ExactParams exact;                   // the same settings in double
  // The shard operators of the vocab-parallel loss (fastkd/backends/__init__.py): the
  // global row sums, and where this slice starts in the vocabulary (labels are global ids).
  c10::optional<at::Tensor> row_sums;  // [N, kRowSumsWidth] in the loss dtype, or none
  int64_t vocab_start = 0;
  // The per-token diagnostics to write in the same pass (kd_forward_stats), or none:
  // [N, kStatsWidth] in the loss dtype, contiguous.
  c10::optional<at::Tensor> stats;
};

// A sparse teacher's call (ops.cpp: sparse_kd_forward): K ids and log-probs per row.
struct SparseForwardArgs {
  at::Tensor student;                  // [N, Vs], unit stride along the vocab
  at::Tensor ids;                      // [N, K] int32 or int64, contiguous; < 0: empty slot
  at::Tensor logprobs;                 // [N, K] floating, contiguous
  c10::optional<at::Tensor> labels;    // [N] int64, contiguous
  at::Tensor grad_scale;               // scalar: the reduction's 1/denominator
  KDParams params;                     // with .tail
  ExactParams exact;
  c10::optional<at::Tensor> stats;     // as ForwardArgs::stats (sparse_kd_forward_stats)
};

// Several teachers' call (ops.cpp: kd_multi_forward; docs/multi_teacher.md). A teacher whose
// weight is 0 in a row is not read in that row (its values there may be NaN or garbage); a
// row whose labels entry is ignore_index gets zero loss and gradient whatever its weights.
struct MultiForwardArgs {
  at::Tensor student;                  // [N, Vs], unit stride along the vocab
  std::vector<at::Tensor> teachers;    // K in [1, kMaxKernelTeachers], each [N, V_k] with unit stride
                                       // along the vocab; dtypes and widths may differ (each >= vocab_size)
  at::Tensor weights;                  // [K, N] in the loss dtype (float32; float64 for float64 input),
                                       // any strides (constant weights: stride 0 along N)
  c10::optional<at::Tensor> labels;    // [N] int64, contiguous
  at::Tensor grad_scale;               // scalar: the reduction's 1/denominator
  KDParams params;                     // with .teacher_mode
  ExactParams exact;
};

// The shape/device/stride/vocab_size checks of a student-teacher logits pair.
void check_logits_pair(const at::Tensor& student, const at::Tensor& teacher, int64_t vocab_size);

// What one device provides. The entry check has run: shapes, devices, dtypes (floating),
// strides and settings are valid; each device checks only what it alone restricts.
struct DeviceOps {
  // An uninitialised gradient shaped like the student.
  at::Tensor (*empty_grad)(const at::Tensor& student);
  // Per-row loss into `loss`, gradient into `grad` (which may be the student itself).
  void (*forward)(const ForwardArgs& args, at::Tensor& loss, at::Tensor& grad);
  // Row statistics [N, kRowStatsWidth] into `out`; the CE column only when `with_ce`.
  void (*row_stats)(const ForwardArgs& args, bool with_raw, at::Tensor& out);  // with_raw: the T = 1 sum-exp column
  // grad *= factor (one element, or one per row), skipped when it is exactly 1.
  void (*scale_grad)(at::Tensor& grad, const at::Tensor& factor);
  // The per-shard phases (null where a device lacks them): the slice's statistics against
  // its local maxima [N, kShardStatsWidth]; its part of the row sums [N, kRowSumsWidth]
  // given the global statistics; its gradient given the global statistics and row sums.
  void (*shard_row_stats)(const ForwardArgs& args, at::Tensor& out);
  void (*shard_row_sums)(const ForwardArgs& args, at::Tensor& out);
  void (*shard_write_grad)(const ForwardArgs& args, at::Tensor& grad);
  // Sparse teachers: per-row loss into `loss`, gradient into `grad` (may be the student);
  // nullptr where the device has no sparse kernel yet.
  void (*sparse_forward)(const SparseForwardArgs& args, at::Tensor& loss, at::Tensor& grad) = nullptr;
  // Several teachers: per-row loss into `loss`, gradient into `grad` (may be the student);
  // nullptr where the device has no several-teachers kernel yet.
  void (*multi_forward)(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad) = nullptr;
  // Whether `forward` / `sparse_forward` write ForwardArgs::stats when it is given (the
  // *_stats operators refuse a device that does not).
  bool forward_writes_stats = false;
  bool sparse_forward_writes_stats = false;
};

namespace cpu {
void sparse_forward(const SparseForwardArgs& args, at::Tensor& loss, at::Tensor& grad);
void multi_forward(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad);
}

namespace cpu {
const DeviceOps& device_ops();
}
#ifdef FASTKD_WITH_CUDA
namespace cuda {
const DeviceOps& device_ops();
}
#endif

}  // namespace fastkd
