// The fastkd operators: their schemas, the one entry check every device shares, and the
// dispatch to the device's implementation (kd_op.h: DeviceOps).
//
//   kd_forward(student, teacher, labels?, grad_scale, row_stats?, int[] ints, Tensor floats)
//       -> (loss [N], grad)
//   kd_forward_inplace(student!, ...same...) -> loss [N]    (the gradient overwrites student)
//   row_stats(student, teacher, int[] ints, Tensor floats) -> [N, 5] float32
//   scale_grad_(grad!, factor)                              (backward: grad *= factor)
//   sparse_kd_forward(student, ids, logprobs, labels?, grad_scale, int[] ints, Tensor floats)
//       -> (loss [N], grad)                                 (a sparse teacher: K ids per row)
//   sparse_kd_forward_inplace(student!, ...same...) -> loss [N]
//   shard_row_stats(student, teacher, int[] ints, Tensor floats) -> [N, 6]
//   shard_row_sums(student, teacher, row_stats, int[] ints, Tensor floats) -> [N, 5]
//   shard_write_grad(student, teacher, labels?, grad_scale, row_stats, row_sums?, int vocab_start,
//                    int[] ints, Tensor floats) -> grad
//       (the per-shard phases of the vocab-parallel loss: fastkd/backends/__init__.py)
//   kd_forward_stats(student, teacher, labels?, grad_scale, int[] ints, Tensor floats)
//       -> (loss [N], grad, stats [N, 5])                   (with the per-token diagnostics)
//   kd_forward_stats_inplace(student!, ...same...) -> (loss [N], stats)
//   sparse_kd_forward_stats(student, ids, logprobs, labels?, grad_scale, int[] ints, Tensor floats)
//       -> (loss [N], grad, stats [N, 5]);  sparse_kd_forward_stats_inplace(student!, ...) -> (loss, stats)
//   kd_multi_forward(student, Tensor[] teachers, weights, labels?, grad_scale, int[] ints,
//                    Tensor floats) -> (loss [N], grad)      (K teachers, weights [K, N])
//   kd_multi_forward_inplace(student!, ...same...) -> loss [N]
//
// `ints`/`floats` are the loss settings packed by fastkd/config.py and unpacked by
// kd_params.h; `floats` is a float64 host tensor, not a float[], so that torch.compile
// keeps a temperature/alpha/beta schedule symbolic instead of recompiling per value. Inputs are 2-D with unit stride along the vocabulary; the Python layer
// flattens and validates user input, these checks guard the operator contract itself.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

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

namespace {

const DeviceOps& ops_for(const at::Tensor& x) {
#ifdef FASTKD_WITH_CUDA
  if (x.is_cuda()) return cuda::device_ops();
#endif
  TORCH_CHECK(x.is_cpu(), "fastkd: no kernels for ", x.device(), " tensors in this build");
  return cpu::device_ops();
}

// The packed settings' entry check: `ints.size() == n_ints` and the float settings, a
// contiguous 1-D float64 host tensor (fastkd/config.py: pack_floats), read here on the
// host whatever the logits' device. Returns the float values.
const double* float_settings(at::IntArrayRef ints, const at::Tensor& floats, int n_ints) {
  TORCH_CHECK(floats.is_cpu() && floats.scalar_type() == at::kDouble && floats.dim() == 1 && floats.is_contiguous(),
              "fastkd: the float settings must be a contiguous 1-D float64 CPU tensor, got a ", floats.dim(),
              "-D ", floats.scalar_type(), " tensor on ", floats.device());
  TORCH_CHECK(static_cast<int>(ints.size()) == n_ints && floats.numel() == kNumFloatSettings, "fastkd: expected ",
              n_ints, " int and ", int(kNumFloatSettings), " float settings, got ", ints.size(), " and ",
              floats.numel(), " (fastkd._C is older or newer than the Python package: rebuild it)");
  return floats.data_ptr<double>();
}

// The entry check of every operator that reads logits: the packed settings and the
// logits; the forward operators add labels, grad_scale and row_stats.
ForwardArgs check_settings_and_logits(const at::Tensor& student, const at::Tensor& teacher, at::IntArrayRef ints,
                                      const at::Tensor& floats) {
  const double* float_values = float_settings(ints, floats, kNumIntSettings);
  const char* error = settings_error(ints.data(), float_values);
  TORCH_CHECK(error == nullptr, "fastkd: ", error);
  ForwardArgs args{student, teacher, c10::nullopt, at::Tensor(), c10::nullopt,
                   unpack_settings<float>(ints.data(), float_values),
                   unpack_settings<double>(ints.data(), float_values)};
  check_logits_pair(student, teacher, args.params.vocab_size);
  return args;
}

// The labels and the reduction's scale of a forward operator (dense or sparse).
void check_labels_and_scale(const at::Tensor& student, const c10::optional<at::Tensor>& labels,
                            const at::Tensor& grad_scale) {
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == student.size(0) && labels->scalar_type() == at::kLong &&
                    labels->is_contiguous() && labels->device() == student.device(),
                "fastkd: labels must be a contiguous int64 [N] tensor on the logits' device");
  }
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.device() == student.device(),
              "fastkd: grad_scale must be a one-element tensor on the logits' device");
}

ForwardArgs check_forward_args(const at::Tensor& student, const at::Tensor& teacher,
                               const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                               const c10::optional<at::Tensor>& row_stats, at::IntArrayRef ints,
                               const at::Tensor& floats) {
  ForwardArgs args = check_settings_and_logits(student, teacher, ints, floats);
  const int64_t n = student.size(0);
  check_labels_and_scale(student, labels, grad_scale);
  if (row_stats) {
    TORCH_CHECK(row_stats->dim() == 2 && row_stats->size(0) == n && row_stats->size(1) == kRowStatsWidth &&
                    row_stats->scalar_type() == at::kFloat && row_stats->is_contiguous() &&
                    row_stats->device() == student.device(),
                "fastkd: row_stats must be a contiguous float32 [N, ", kRowStatsWidth,
                "] tensor on the logits' device");
  }
  TORCH_CHECK(args.exact.ce_weight == 0.0 || labels, "fastkd: ce_weight != 0 needs labels");
  args.labels = labels;
  args.grad_scale = grad_scale;
  args.row_stats = row_stats;
  return args;
}

// The loss is float32, or float64 when an input is: fp64 input accumulates in double and
// returns its loss in double.
at::Tensor empty_loss(const at::Tensor& student, const at::Tensor& teacher) {
  const bool f64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  return at::empty({student.size(0)}, student.options().dtype(f64 ? at::kDouble : at::kFloat));
}

// The per-token diagnostics' output [N, kStatsWidth] in the loss dtype, refused where the
// device's kernel does not write it (so a missing kernel never returns uninitialised stats).
at::Tensor empty_stats(const at::Tensor& loss, bool device_writes_stats) {
  TORCH_CHECK(device_writes_stats, "fastkd: no per-token diagnostics (return_stats) in the kernel for ",
              loss.device(), " tensors in this build");
  return at::empty({loss.size(0), kStatsWidth}, loss.options());
}

// What one call of a loss operator gives back: the gradient is a new tensor, or the student
// itself (the in-place operators); stats only when asked for.
struct Outputs {
  at::Tensor loss, grad;
  c10::optional<at::Tensor> stats;
};

// The body of the four dense operators (kd_forward[_stats][_inplace]).
Outputs run_dense(const at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
                  const at::Tensor& grad_scale, const c10::optional<at::Tensor>& row_stats, at::IntArrayRef ints,
                  const at::Tensor& floats, bool inplace, bool with_stats) {
  ForwardArgs args = check_forward_args(student, teacher, labels, grad_scale, row_stats, ints, floats);
  const DeviceOps& device = ops_for(student);
  Outputs out{empty_loss(student, teacher), inplace ? student : device.empty_grad(student), c10::nullopt};
  if (with_stats) args.stats = empty_stats(out.loss, device.forward_writes_stats);
  // In place, every kernel reads a row element before overwriting it (the CPU kernel reads
  // the whole row first; on CUDA the same thread reads and writes an element, and the CE
  // term's label logit is read before any store of its row).
  device.forward(args, out.loss, out.grad);
  out.stats = args.stats;
  return out;
}

std::tuple<at::Tensor, at::Tensor> kd_forward(const at::Tensor& student, const at::Tensor& teacher,
                                              const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                              const c10::optional<at::Tensor>& row_stats, at::IntArrayRef ints,
                                              const at::Tensor& floats) {
  Outputs out = run_dense(student, teacher, labels, grad_scale, row_stats, ints, floats, false, false);
  return {out.loss, out.grad};
}

at::Tensor kd_forward_inplace(at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels,
                              const at::Tensor& grad_scale, const c10::optional<at::Tensor>& row_stats,
                              at::IntArrayRef ints, const at::Tensor& floats) {
  return run_dense(student, teacher, labels, grad_scale, row_stats, ints, floats, true, false).loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_forward_stats(const at::Tensor& student, const at::Tensor& teacher,
                                                                const c10::optional<at::Tensor>& labels,
                                                                const at::Tensor& grad_scale, at::IntArrayRef ints,
                                                                const at::Tensor& floats) {
  Outputs out = run_dense(student, teacher, labels, grad_scale, c10::nullopt, ints, floats, false, true);
  return {out.loss, out.grad, *out.stats};
}

std::tuple<at::Tensor, at::Tensor> kd_forward_stats_inplace(at::Tensor& student, const at::Tensor& teacher,
                                                            const c10::optional<at::Tensor>& labels,
                                                            const at::Tensor& grad_scale, at::IntArrayRef ints,
                                                            const at::Tensor& floats) {
  Outputs out = run_dense(student, teacher, labels, grad_scale, c10::nullopt, ints, floats, true, true);
  return {out.loss, *out.stats};
}

at::Tensor row_stats(const at::Tensor& student, const at::Tensor& teacher, at::IntArrayRef ints,
                     const at::Tensor& floats) {
  const ForwardArgs args = check_settings_and_logits(student, teacher, ints, floats);
  at::Tensor out = at::empty({student.size(0), kRowStatsWidth}, student.options().dtype(at::kFloat));
  // The T = 1 sum-exp column is wanted by the CE term and by the z-loss.
  const bool with_raw = args.exact.ce_weight != 0.0 || args.exact.z_loss != 0.0;
  if (student.size(0) > 0) ops_for(student).row_stats(args, with_raw, out);
  return out;
}

// The shard operators' statistics and sums: [N, width] in the loss dtype, contiguous, on
// the logits' device.
void check_shard_table(const char* name, const at::Tensor& x, const at::Tensor& student, const at::Tensor& teacher,
                       int64_t width) {
  const at::Tensor like = empty_loss(student, teacher);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == student.size(0) && x.size(1) == width &&
                  x.scalar_type() == like.scalar_type() && x.is_contiguous() && x.device() == student.device(),
              "fastkd: ", name, " must be a contiguous ", like.scalar_type(), " [N, ", width,
              "] tensor on the logits' device (float64 for float64 logits, else float32)");
}

const DeviceOps& shard_ops_for(const at::Tensor& x) {
  const DeviceOps& device = ops_for(x);
  TORCH_CHECK(device.shard_row_stats && device.shard_row_sums && device.shard_write_grad,
              "fastkd: no vocab-parallel shard kernels for ", x.device(), " tensors in this build");
  return device;
}

at::Tensor shard_row_stats(const at::Tensor& student, const at::Tensor& teacher, at::IntArrayRef ints,
                           const at::Tensor& floats) {
  const ForwardArgs args = check_settings_and_logits(student, teacher, ints, floats);
  at::Tensor out = at::empty({student.size(0), kShardStatsWidth}, empty_loss(student, teacher).options());
  if (student.size(0) > 0) shard_ops_for(student).shard_row_stats(args, out);
  return out;
}

at::Tensor shard_row_sums(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_stats,
                          at::IntArrayRef ints, const at::Tensor& floats) {
  ForwardArgs args = check_settings_and_logits(student, teacher, ints, floats);
  TORCH_CHECK(args.params.divergence != Divergence::ForwardKL,
              "fastkd: shard_row_sums is for reverse_kl, jsd and tvd (forward KL's gradient needs no row sums)");
  check_shard_table("row_stats", row_stats, student, teacher, kRowStatsWidth);
  args.row_stats = row_stats;
  at::Tensor out = at::empty({student.size(0), kRowSumsWidth}, row_stats.options());
  shard_ops_for(student).shard_row_sums(args, out);
  return out;
}

at::Tensor shard_write_grad(const at::Tensor& student, const at::Tensor& teacher,
                            const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                            const at::Tensor& row_stats, const c10::optional<at::Tensor>& row_sums,
                            int64_t vocab_start, at::IntArrayRef ints, const at::Tensor& floats) {
  ForwardArgs args = check_forward_args(student, teacher, labels, grad_scale, c10::nullopt, ints, floats);
  check_shard_table("row_stats", row_stats, student, teacher, kRowStatsWidth);
  TORCH_CHECK(row_sums || args.params.divergence == Divergence::ForwardKL,
              "fastkd: shard_write_grad needs row_sums for reverse_kl, jsd and tvd");
  if (row_sums) check_shard_table("row_sums", *row_sums, student, teacher, kRowSumsWidth);
  TORCH_CHECK(vocab_start >= 0, "fastkd: vocab_start must be >= 0, got ", vocab_start);
  args.row_stats = row_stats;
  args.row_sums = row_sums;
  args.vocab_start = vocab_start;
  const DeviceOps& device = shard_ops_for(student);
  at::Tensor grad = device.empty_grad(student);
  device.shard_write_grad(args, grad);
  return grad;
}

void scale_grad_(at::Tensor& grad, const at::Tensor& factor) {
  // On the gradient's device, or a one-element CPU tensor (a host scalar costs nothing to
  // read); a factor on another GPU would be read through the wrong device's pointers.
  TORCH_CHECK(factor.device() == grad.device() || (factor.is_cpu() && factor.numel() == 1),
              "fastkd: scale_grad_'s factor (grad_output) must be on the gradient's device (", grad.device(),
              ") or a one-element CPU tensor, got a ", factor.numel(), "-element tensor on ", factor.device());
  if (grad.numel() == 0) return;
  ops_for(grad).scale_grad(grad, factor);
}

// The entry check of the sparse operators (the sparse twin of check_forward_args).
SparseForwardArgs check_sparse_args(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                                    const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                    at::IntArrayRef ints, const at::Tensor& floats) {
  const double* float_values = float_settings(ints, floats, kNumSparseIntSettings);
  const char* error = sparse_settings_error(ints.data(), float_values);
  TORCH_CHECK(error == nullptr, "fastkd: ", error);
  SparseForwardArgs args{student, ids, logprobs, labels, grad_scale,
                         unpack_sparse_settings<float>(ints.data(), float_values),
                         unpack_sparse_settings<double>(ints.data(), float_values)};
  const int64_t n = student.dim() == 2 ? student.size(0) : -1;
  TORCH_CHECK(student.dim() == 2 && student.stride(1) == 1 && at::isFloatingType(student.scalar_type()),
              "fastkd: student must be a floating 2-D [N, V] tensor with unit stride along V, got ", student.sizes());
  TORCH_CHECK(args.params.vocab_size >= 1 && args.params.vocab_size <= student.size(1), "fastkd: vocab_size ",
              args.params.vocab_size, " must be in [1, ", student.size(1), "]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == n && logprobs.sizes() == ids.sizes(),
              "fastkd: ids and logprobs must be [N, K] with N = ", n, ", got ", ids.sizes(), " and ", logprobs.sizes());
  TORCH_CHECK((ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt) && ids.is_contiguous(),
              "fastkd: ids must be a contiguous int32 or int64 tensor");
  TORCH_CHECK(at::isFloatingType(logprobs.scalar_type()) && logprobs.is_contiguous(),
              "fastkd: logprobs must be a contiguous floating tensor");
  TORCH_CHECK(ids.device() == student.device() && logprobs.device() == student.device(),
              "fastkd: ids and logprobs must be on the student's device");
  check_labels_and_scale(student, labels, grad_scale);
  TORCH_CHECK(args.exact.ce_weight == 0.0 || labels, "fastkd: ce_weight != 0 needs labels");
  return args;
}

// The body of the four sparse operators (sparse_kd_forward[_stats][_inplace]). In place, the
// kernels read every value of a row they need (statistics, the support's and the label's
// logits) before the row's gradient is written.
Outputs run_sparse(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                   const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale, at::IntArrayRef ints,
                   const at::Tensor& floats, bool inplace, bool with_stats) {
  SparseForwardArgs args = check_sparse_args(student, ids, logprobs, labels, grad_scale, ints, floats);
  const DeviceOps& device = ops_for(student);
  TORCH_CHECK(device.sparse_forward != nullptr, "fastkd: no sparse kernel for ", student.device(),
              " tensors in this build");
  Outputs out{empty_loss(student, logprobs), inplace ? student : device.empty_grad(student), c10::nullopt};
  if (with_stats) args.stats = empty_stats(out.loss, device.sparse_forward_writes_stats);
  device.sparse_forward(args, out.loss, out.grad);
  out.stats = args.stats;
  return out;
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward(const at::Tensor& student, const at::Tensor& ids,
                                                     const at::Tensor& logprobs,
                                                     const c10::optional<at::Tensor>& labels,
                                                     const at::Tensor& grad_scale, at::IntArrayRef ints,
                                                     const at::Tensor& floats) {
  Outputs out = run_sparse(student, ids, logprobs, labels, grad_scale, ints, floats, false, false);
  return {out.loss, out.grad};
}

at::Tensor sparse_kd_forward_inplace(at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                                     const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                     at::IntArrayRef ints, const at::Tensor& floats) {
  return run_sparse(student, ids, logprobs, labels, grad_scale, ints, floats, true, false).loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_kd_forward_stats(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale, at::IntArrayRef ints,
    const at::Tensor& floats) {
  Outputs out = run_sparse(student, ids, logprobs, labels, grad_scale, ints, floats, false, true);
  return {out.loss, out.grad, *out.stats};
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward_stats_inplace(at::Tensor& student, const at::Tensor& ids,
                                                                   const at::Tensor& logprobs,
                                                                   const c10::optional<at::Tensor>& labels,
                                                                   const at::Tensor& grad_scale, at::IntArrayRef ints,
                                                                   const at::Tensor& floats) {
  Outputs out = run_sparse(student, ids, logprobs, labels, grad_scale, ints, floats, true, true);
  return {out.loss, *out.stats};
}

// The entry check of the several-teachers operators (the twin of check_forward_args).
MultiForwardArgs check_multi_args(const at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
                                  const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                  at::IntArrayRef ints, const at::Tensor& floats) {
  const double* float_values = float_settings(ints, floats, kNumMultiIntSettings);
  const char* error = multi_settings_error(ints.data(), float_values);
  TORCH_CHECK(error == nullptr, "fastkd: ", error);
  const int64_t K = static_cast<int64_t>(teachers.size());
  TORCH_CHECK(K >= 1 && K <= kMaxKernelTeachers, "fastkd: the several-teachers kernels take 1 to ",
              kMaxKernelTeachers, " teachers, got ", K);
  MultiForwardArgs args{student, teachers.vec(), weights, labels, grad_scale,
                        unpack_multi_settings<float>(ints.data(), float_values),
                        unpack_multi_settings<double>(ints.data(), float_values)};
  for (const at::Tensor& teacher : teachers) check_logits_pair(student, teacher, args.params.vocab_size);
  bool f64 = student.scalar_type() == at::kDouble;
  for (const at::Tensor& teacher : teachers) f64 = f64 || teacher.scalar_type() == at::kDouble;
  const auto weight_dtype = f64 ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == K && weights.size(1) == student.size(0) &&
                  weights.scalar_type() == weight_dtype && weights.device() == student.device(),
              "fastkd: weights must be a ", weight_dtype, " [K, N] = [", K, ", ", student.size(0),
              "] tensor on the logits' device (the loss dtype), got a ", weights.scalar_type(), " ", weights.sizes(),
              " tensor on ", weights.device());
  check_labels_and_scale(student, labels, grad_scale);
  TORCH_CHECK(args.exact.ce_weight == 0.0 || labels, "fastkd: ce_weight != 0 needs labels");
  return args;
}

at::Tensor empty_multi_loss(const at::Tensor& student, const at::Tensor& weights) {
  return at::empty({student.size(0)}, student.options().dtype(weights.scalar_type()));
}

void run_multi(const MultiForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  const DeviceOps& device = ops_for(args.student);
  TORCH_CHECK(device.multi_forward != nullptr, "fastkd: no several-teachers kernel for ", args.student.device(),
              " tensors in this build");
  if (args.student.size(0) > 0) device.multi_forward(args, loss, grad);
}

std::tuple<at::Tensor, at::Tensor> kd_multi_forward(const at::Tensor& student, at::TensorList teachers,
                                                    const at::Tensor& weights, const c10::optional<at::Tensor>& labels,
                                                    const at::Tensor& grad_scale, at::IntArrayRef ints,
                                                    const at::Tensor& floats) {
  const MultiForwardArgs args = check_multi_args(student, teachers, weights, labels, grad_scale, ints, floats);
  at::Tensor loss = empty_multi_loss(student, weights);
  at::Tensor grad = ops_for(student).empty_grad(student);
  run_multi(args, loss, grad);
  return {loss, grad};
}

at::Tensor kd_multi_forward_inplace(at::Tensor& student, at::TensorList teachers, const at::Tensor& weights,
                                    const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                    at::IntArrayRef ints, const at::Tensor& floats) {
  const MultiForwardArgs args = check_multi_args(student, teachers, weights, labels, grad_scale, ints, floats);
  at::Tensor loss = empty_multi_loss(student, weights);
  // As kd_forward_inplace: every kernel reads a row's values before it writes the row.
  run_multi(args, loss, student);
  return loss;
}

std::vector<std::string> names(const char* const* list, int n) { return std::vector<std::string>(list, list + n); }

}  // namespace
}  // namespace fastkd

TORCH_LIBRARY(fastkd, m) {
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor? row_stats, "
      "int[] ints, Tensor floats) -> (Tensor, Tensor)");
  m.def(
      "kd_forward_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor grad_scale, "
      "Tensor? row_stats, int[] ints, Tensor floats) -> Tensor");
  m.def("row_stats(Tensor student, Tensor teacher, int[] ints, Tensor floats) -> Tensor");
  m.def("scale_grad_(Tensor(a!) grad, Tensor factor) -> ()");
  m.def(
      "sparse_kd_forward(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, Tensor grad_scale, "
      "int[] ints, Tensor floats) -> (Tensor, Tensor)");
  m.def(
      "sparse_kd_forward_inplace(Tensor(a!) student, Tensor ids, Tensor logprobs, Tensor? labels, "
      "Tensor grad_scale, int[] ints, Tensor floats) -> Tensor");
  m.def("shard_row_stats(Tensor student, Tensor teacher, int[] ints, Tensor floats) -> Tensor");
  m.def("shard_row_sums(Tensor student, Tensor teacher, Tensor row_stats, int[] ints, Tensor floats) -> Tensor");
  m.def(
      "shard_write_grad(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, Tensor row_stats, "
      "Tensor? row_sums, int vocab_start, int[] ints, Tensor floats) -> Tensor");
  m.def(
      "kd_forward_stats(Tensor student, Tensor teacher, Tensor? labels, Tensor grad_scale, int[] ints, "
      "Tensor floats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "kd_forward_stats_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, Tensor grad_scale, "
      "int[] ints, Tensor floats) -> (Tensor, Tensor)");
  m.def(
      "sparse_kd_forward_stats(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, Tensor grad_scale, "
      "int[] ints, Tensor floats) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sparse_kd_forward_stats_inplace(Tensor(a!) student, Tensor ids, Tensor logprobs, Tensor? labels, "
      "Tensor grad_scale, int[] ints, Tensor floats) -> (Tensor, Tensor)");
  m.def(
      "kd_multi_forward(Tensor student, Tensor[] teachers, Tensor weights, Tensor? labels, Tensor grad_scale, "
      "int[] ints, Tensor floats) -> (Tensor, Tensor)");
  m.def(
      "kd_multi_forward_inplace(Tensor(a!) student, Tensor[] teachers, Tensor weights, Tensor? labels, "
      "Tensor grad_scale, int[] ints, Tensor floats) -> Tensor");
}

// One implementation per operator, registered for each device the build has.
#define FASTKD_REGISTER_OPS(m)                           \
  m.impl("kd_forward", &fastkd::kd_forward);             \
  m.impl("kd_forward_inplace", &fastkd::kd_forward_inplace); \
  m.impl("row_stats", &fastkd::row_stats);               \
  m.impl("scale_grad_", &fastkd::scale_grad_);                     \
  m.impl("sparse_kd_forward", &fastkd::sparse_kd_forward);         \
  m.impl("sparse_kd_forward_inplace", &fastkd::sparse_kd_forward_inplace); \
  m.impl("shard_row_stats", &fastkd::shard_row_stats);             \
  m.impl("shard_row_sums", &fastkd::shard_row_sums);               \
  m.impl("shard_write_grad", &fastkd::shard_write_grad);           \
  m.impl("kd_forward_stats", &fastkd::kd_forward_stats);           \
  m.impl("kd_forward_stats_inplace", &fastkd::kd_forward_stats_inplace); \
  m.impl("sparse_kd_forward_stats", &fastkd::sparse_kd_forward_stats); \
  m.impl("sparse_kd_forward_stats_inplace", &fastkd::sparse_kd_forward_stats_inplace); \
  m.impl("kd_multi_forward", &fastkd::kd_multi_forward);           \
  m.impl("kd_multi_forward_inplace", &fastkd::kd_multi_forward_inplace)

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { FASTKD_REGISTER_OPS(m); }
#ifdef FASTKD_WITH_CUDA
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { FASTKD_REGISTER_OPS(m); }
#endif

// Importing fastkd._C registers the operators above; the module itself holds a report of
// what was compiled in, the settings' order, and the CPU gradient-buffer cache's controls.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("empty_cpu_grad_cache", &fastkd::cpu::empty_grad_buffer_cache,
        "Release the freed CPU gradient buffers fastkd keeps for reuse; returns the bytes released");
  m.def("cpu_grad_cache_bytes", &fastkd::cpu::grad_buffer_cache_bytes,
        "Bytes held by freed CPU gradient buffers kept for reuse");
  m.attr("int_settings") = fastkd::names(fastkd::kIntSettingNames, fastkd::kNumIntSettings);
  m.attr("float_settings") = fastkd::names(fastkd::kFloatSettingNames, fastkd::kNumFloatSettings);
  m.attr("sparse_int_settings") = fastkd::names(fastkd::kSparseIntSettingNames, fastkd::kNumSparseIntSettings);
  m.attr("multi_int_settings") = fastkd::names(fastkd::kMultiIntSettingNames, fastkd::kNumMultiIntSettings);
  m.attr("max_kernel_teachers") = fastkd::kMaxKernelTeachers;
  m.attr("stats_width") = fastkd::kStatsWidth;
#define FASTKD_STR(...) #__VA_ARGS__
#define FASTKD_XSTR(...) FASTKD_STR(__VA_ARGS__)
  // What the CPU kernel was compiled for (python -m fastkd.info reports it): the widest
  // vector ISA the compiler was allowed, the -march and torch of the build (cpp_build.py).
#if defined(__AVX512F__)
  m.attr("cpu_isa") = "avx512";
#elif defined(__AVX2__)
  m.attr("cpu_isa") = "avx2";
#elif defined(__AVX__)
  m.attr("cpu_isa") = "avx";
#elif defined(__SSE2__)
  m.attr("cpu_isa") = "sse2";
#elif defined(__ARM_NEON)
  m.attr("cpu_isa") = "neon";
#else
  m.attr("cpu_isa") = "scalar";
#endif
#ifdef FASTKD_CPU_ARCH
  m.attr("cpu_arch") = FASTKD_XSTR(FASTKD_CPU_ARCH);
#endif
#ifdef FASTKD_TORCH_VERSION
  m.attr("built_with_torch") = FASTKD_XSTR(FASTKD_TORCH_VERSION);
#endif
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#endif
#ifdef FASTKD_WITH_CUDA
  m.attr("with_cuda") = true;
#ifdef FASTKD_CUDA_ARCHS  // -DFASTKD_CUDA_ARCHS=8.0,9.0a (cpp_build.py) -> "8.0,9.0a"
  m.attr("cuda_archs") = FASTKD_XSTR(FASTKD_CUDA_ARCHS);
#endif
#else
  m.attr("with_cuda") = false;
#endif
}
