/*
 * The dense (one-teacher) CPU kernel's operators: kd_forward[_inplace], row_stats, the
 * vocab-parallel shard phases and scale_grad_, over the row kernel of dense_rows.h (the math
 * is there), with the rows spread over threads.
 */
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../kd_op.h"
#include "cpu_rows.h"
#include "dense_rows.h"
#include "fast_math.h"
#include "grad_buffer_cache.h"

namespace fastkd {
namespace cpu {
namespace {

template <typename TS, typename TT>
void run_rows(const RowKernel<TS, TT>& k, int64_t n_rows) {
  for_each_row(n_rows, [&](int64_t r) { k(r); });
}

// Phase row_stats alone, into `out` rows of `width` entries of type Out: the five RowStats
// (the row_stats operator: float32, width 5), and with width kShardStatsWidth the value term
// of forward / reverse KL and label smoothing's sum of s' (the shard_row_stats operator: the
// loss dtype). With the logit options, the statistics of the transformed logits.
template <bool kOptions, typename TS, typename TT, typename Out>
void stats_rows(const TS* s, int64_t s_stride, const TT* t, int64_t t_stride, int64_t n_rows, int64_t V,
                const ExactParams& x, Divergence divergence, bool with_raw, int64_t width, Out* out) {
  using Acc = typename RowKernel<TS, TT>::Acc;
  const bool with_value = width == kShardStatsWidth;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    const RowCache<Acc> c = RowCache<Acc>::get(V, kOptions);
    for (int64_t r = begin; r < end; ++r) {
      Stats<Acc> st;
      const bool raw_differs = with_raw && x.temperature != 1.0;
      row_stats<kOptions, false>(s + r * s_stride, t + r * t_stride, V, x, raw_differs, /*fixed=*/false, /*keep_a=*/false,
                          c, st);
      if (!raw_differs) st.sum_raw = with_raw ? st.sum_s : 0.0;
      Out* o = out + r * width;
      o[0] = static_cast<Out>(st.max_s);
      o[1] = static_cast<Out>(st.sum_s);
      o[2] = static_cast<Out>(st.max_t);
      o[3] = static_cast<Out>(st.sum_t);
      o[4] = static_cast<Out>(st.sum_raw);
      if (with_value) {
        const bool kl = divergence == Divergence::ForwardKL || divergence == Divergence::ReverseKL;
        o[5] = kl ? static_cast<Out>(value_term(c, V, st, divergence)) : Out(0);
        o[6] = kOptions && x.label_smoothing > 0.0 ? static_cast<Out>(st.sum_sp) : Out(0);
      }
    }
  });
}

// Dispatch over the (student, teacher) dtype pair.
template <typename F>
void dispatch_pair(at::ScalarType ss, at::ScalarType ts, const F& f) {
  FASTKD_SCALAR_TYPE_SWITCH(ss, TS, "fastkd_student",
                            FASTKD_SCALAR_TYPE_SWITCH(ts, TT, "fastkd_teacher", f(TS{}, TT{})));
}

// A RowKernel over the call's tensors; `stats` (the row statistics from outside) must be
// in the kernel's accumulation type, `loss` too (or undefined: not wanted).
template <typename TS, typename TT>
RowKernel<TS, TT> row_kernel(const ForwardArgs& args, const at::Tensor& stats, const at::Tensor& loss,
                             at::Tensor& grad) {
  using Acc = typename RowKernel<TS, TT>::Acc;
  return RowKernel<TS, TT>{{args.student.data_ptr<TS>(), args.student.stride(0),
                            args.labels ? args.labels->data_ptr<int64_t>() : nullptr,
                            loss.defined() ? loss.data_ptr<Acc>() : nullptr,
                            grad.defined() ? grad.data_ptr<TS>() : nullptr,
                            grad.defined() ? grad.stride(0) : 0, grad.defined() ? grad.size(1) : 0,
                            args.params, args.exact,
                            args.grad_scale.defined() ? args.grad_scale.to(at::kDouble).item<double>() : 1.0},
                           args.teacher.data_ptr<TT>(), args.teacher.stride(0),
                           stats.defined() ? stats.data_ptr<Acc>() : nullptr};
}

// The accumulation type's tensor of the row statistics (the row_stats argument of
// kd_forward is float32 for every input; float64 input reads it in double).
at::Tensor stats_in_acc(const ForwardArgs& args) {
  if (!args.row_stats) return at::Tensor();
  const bool f64 = args.student.scalar_type() == at::kDouble || args.teacher.scalar_type() == at::kDouble;
  return args.row_stats->to(f64 ? at::kDouble : at::kFloat).contiguous();
}

void op_forward(const ForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  if (args.student.size(0) == 0) return;
  const at::Tensor stats = stats_in_acc(args);
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, stats, loss, grad);
    // The diagnostics are in the loss dtype, the kernel's accumulation type (ops.cpp: kd_forward_stats).
    if (args.stats) k.stats_out = args.stats->data_ptr<typename decltype(k)::Acc>();
    run_rows(k, args.student.size(0));
  });
}

// From the gradient-buffer cache: a freed gradient of the same size is reused without
// the page faults of fresh memory.
at::Tensor op_empty_grad(const at::Tensor& student) {
  return cached_empty(student.size(0), student.size(1), student.options());
}

// with_raw: the T = 1 sum-exp is wanted (the CE term or the z-loss is on).
template <typename Out>
void stats_of(const ForwardArgs& args, bool with_raw, int64_t width, at::Tensor& out) {
  const at::Tensor& student = args.student;
  const at::Tensor& teacher = args.teacher;
  const bool options = has_logit_options(args.exact);
  dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s0, auto t0) {
    using TS = decltype(s0);
    using TT = decltype(t0);
    auto rows = options ? &stats_rows<true, TS, TT, Out> : &stats_rows<false, TS, TT, Out>;
    rows(student.data_ptr<TS>(), student.stride(0), teacher.data_ptr<TT>(), teacher.stride(0), student.size(0),
         args.params.vocab_size, args.exact, args.params.divergence, with_raw, width, out.data_ptr<Out>());
  });
}

// ops.cpp asks for the CE term's column by ce_weight; the z-loss needs it too.
void op_row_stats(const ForwardArgs& args, bool with_raw, at::Tensor& out) {
  stats_of<float>(args, with_raw, kRowStatsWidth, out);
}

// The shard operators (the stats and sums tensors are in the loss dtype, checked by ops.cpp).
void op_shard_row_stats(const ForwardArgs& args, at::Tensor& out) {
  const bool with_raw = args.exact.ce_weight != 0.0 || args.exact.z_loss != 0.0;
  if (out.scalar_type() == at::kDouble) {
    stats_of<double>(args, with_raw, kShardStatsWidth, out);
  } else {
    stats_of<float>(args, with_raw, kShardStatsWidth, out);
  }
}

void op_shard_row_sums(const ForwardArgs& args, at::Tensor& out) {
  if (args.student.size(0) == 0) return;
  at::Tensor none;
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, *args.row_stats, none, none);
    k.sums_out = out.data_ptr<typename decltype(k)::Acc>();
    run_rows(k, args.student.size(0));
  });
}

void op_shard_write_grad(const ForwardArgs& args, at::Tensor& grad) {
  if (args.student.size(0) == 0) return;
  at::Tensor none;
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    auto k = row_kernel<decltype(s0), decltype(t0)>(args, *args.row_stats, none, grad);
    k.shard = true;
    k.vocab_start = args.vocab_start;
    k.sums_in = args.row_sums ? args.row_sums->data_ptr<typename decltype(k)::Acc>() : nullptr;
    run_rows(k, args.student.size(0));
  });
}

template <typename T>
void scale_rows(T* g, int64_t n_rows, int64_t width, int64_t stride, const double* f, bool per_row) {
  using Acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Acc fr = static_cast<Acc>(f[per_row ? r : 0]);
      if (fr == Acc(1)) continue;
      T* row = g + r * stride;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) row[i] = static_cast<T>(static_cast<Acc>(row[i]) * fr);
    }
  });
}

// Backward: grad *= grad_output, computed in fp32 (double for fp64) and rounded once to
// the gradient's dtype, so a factor beyond fp16's range (a GradScaler's 65536) does not
// overflow before it meets the small gradient entries. Skipped when the factor is 1 (the
// common `loss.backward()`); reading the scalar costs nothing on the CPU.
void op_scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1, "fastkd: scale_grad_ needs a 2-D gradient with unit inner stride");
  const int64_t n_rows = grad.size(0), width = grad.size(1);
  const bool per_row = grad_output.numel() != 1;
  TORCH_CHECK(!per_row || grad_output.numel() == n_rows, "fastkd: grad_output must have 1 or ", n_rows,
              " elements, got ", grad_output.numel());
  const at::Tensor factor = grad_output.to(at::kDouble).contiguous().reshape({-1});
  const double* f = factor.data_ptr<double>();
  if (!per_row && f[0] == 1.0) return;
  FASTKD_SCALAR_TYPE_SWITCH(grad.scalar_type(), scalar_t, "fastkd_scale_grad", {
    scale_rows(grad.data_ptr<scalar_t>(), n_rows, width, grad.stride(0), f, per_row);
  });
}

}  // namespace

const DeviceOps& device_ops() {
  static const DeviceOps ops{&op_empty_grad,      &op_forward,        &op_row_stats,        &op_scale_grad,
                             &op_shard_row_stats, &op_shard_row_sums, &op_shard_write_grad, &sparse_forward,
                             &multi_forward,
                             /*forward_writes_stats=*/true,  // return_stats: StudentRows::stats_out
                             /*sparse_forward_writes_stats=*/true};  // SparseRowKernel::stats
  return ops;
}

}  // namespace cpu
}  // namespace fastkd
