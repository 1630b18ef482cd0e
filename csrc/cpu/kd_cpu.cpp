/*
 * Fused knowledge-distillation loss and gradient on the CPU.
 *
 * One token (row) at a time, each thread owning whole rows:
 *   sweep 1  reads s and t once from memory, converts them to fp32 scaled logits
 *            a = s/T, b = t/T into a row cache, and computes both sides' row statistics
 *            (max, sum-exp) with a chunked online softmax: one exp per element per side.
 *   sweep 2  over the cached row: the divergence D and its gradient dD/da.
 *   sweep 3  writes the gradient w.r.t. s once, in the student's dtype, adding the
 *            hard-label CE term:  ds = scale * (w_div * dD/da / T + w_ce * (softmax(s) - onehot)).
 *
 * With q = softmax(a), p = softmax(b), log q = a - lse(a), log p = b - lse(b):
 *   forward_kl  D = sum p (log p - log q)            dD/da = q - p
 *   reverse_kl  D = sum q (log q - log p)            dD/da = q ((log q - log p) - D)
 *   jsd         D = beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q
 *               dD/da = (1-beta) q (h - sum q h),  h = log q - log m
 *   tvd         D = 1/2 sum |p - q|                  dD/da = q (h - sum q h),  h = sign(q - p)/2
 * Entries with zero probability contribute 0 (0 log 0 = 0), so -inf logits are legal.
 *
 * The row statistics can instead come from the caller (`row_stats` argument), which is
 * how a vocab-parallel variant combines shards before the loss sweep.
 */
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../kd_op.h"
#include "fast_math.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastkd {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1024;  // elements per online-softmax chunk: both sides fit in L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Rescales a running sum-exp whose reference max moves from `old_max` to `new_max`.
inline float rescale(float sum, float old_max, float new_max, float factor) {
  return old_max == new_max ? sum : sum * exp_approx(factor * (old_max - new_max));
}

// Sweep 1: convert the row into the fp32 cache (a = s/T, b = t/T) and, when kStats,
// compute the row statistics in the same pass.
template <bool kStats, typename TS, typename TT>
RowStats load_row(const TS* s, const TT* t, int64_t V, const KDParams& p, bool with_raw, float* a,
                  float* b) {
  const float inv_t = p.inv_temperature;
  const float temp = p.temperature;
  RowStats st{kNegInf, 0.0f, kNegInf, 0.0f, 0.0f};
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    float* ac = a + c0;
    float* bc = b + c0;
    float cmax_s = kNegInf, cmax_t = kNegInf;
#pragma omp simd reduction(max : cmax_s, cmax_t)
    for (int64_t i = 0; i < n; ++i) {
      const float x = static_cast<float>(s[c0 + i]) * inv_t;
      const float y = static_cast<float>(t[c0 + i]) * inv_t;
      ac[i] = x;
      bc[i] = y;
      cmax_s = std::max(cmax_s, x);
      cmax_t = std::max(cmax_t, y);
    }
    if constexpr (kStats) {
      if (cmax_s > st.max_s) {
        st.sum_s = rescale(st.sum_s, st.max_s, cmax_s, 1.0f);
        st.sum_raw = rescale(st.sum_raw, st.max_s, cmax_s, temp);
        st.max_s = cmax_s;
      }
      if (cmax_t > st.max_t) {
        st.sum_t = rescale(st.sum_t, st.max_t, cmax_t, 1.0f);
        st.max_t = cmax_t;
      }
      // A chunk whose running max is still -inf is all -inf: it adds nothing (and
      // exp(-inf - -inf) would be NaN).
      const float ms = st.max_s, mt = st.max_t;
      float zs = 0.0f, zt = 0.0f, zr = 0.0f;
      if (ms != kNegInf) {
        if (with_raw) {
#pragma omp simd reduction(+ : zs, zr)
          for (int64_t i = 0; i < n; ++i) {
            zs += exp_approx(ac[i] - ms);
            zr += exp_approx(temp * (ac[i] - ms));
          }
        } else {
#pragma omp simd reduction(+ : zs)
          for (int64_t i = 0; i < n; ++i) zs += exp_approx(ac[i] - ms);
        }
      }
      if (mt != kNegInf) {
#pragma omp simd reduction(+ : zt)
        for (int64_t i = 0; i < n; ++i) zt += exp_approx(bc[i] - mt);
      }
      st.sum_s += zs;
      st.sum_t += zt;
      st.sum_raw += zr;
    }
  }
  return st;
}

// w <- c q (h - sum_j q_j h_j), given w = q; returns sum_j q_j h_j.
// When one entry k holds nearly all the mass (peaked rows, low temperature), h_k - sum q h
// cancels catastrophically in fp32. For that entry the same quantity is written as
// h_k sum_{j!=k} q_j - sum_{j!=k} q_j h_j, sums over the small entries only. At most one
// entry can have q > 1/2, so the "big" sums below hold a single term.
float centre_grad(float* w, const float* h, int64_t V, float c) {
  float small_q = 0.0f, small_qh = 0.0f, big_qh = 0.0f;
#pragma omp simd reduction(+ : small_q, small_qh, big_qh)
  for (int64_t i = 0; i < V; ++i) {
    const float q = w[i], qh = q * h[i];
    const bool big = q > 0.5f;
    small_q += big ? 0.0f : q;
    small_qh += big ? 0.0f : qh;
    big_qh += big ? qh : 0.0f;
  }
  const float qh = small_qh + big_qh;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {
    const float q = w[i];
    w[i] = c * q * (q > 0.5f ? h[i] * small_q - small_qh : h[i] - qh);
  }
  return qh;
}

// Sweep 2 of reverse KL, JSD and TVD: D(p, q) for the cached row; leaves dD/da in `w`,
// using `h` as scratch. (Forward KL needs no row sum: see forward_kl_write.)
float divergence_and_grad(const float* a, const float* b, int64_t V, float lse_s, float lse_t,
                          const KDParams& p, float* w, float* h) {
  float D = 0.0f;
  switch (p.divergence) {
    case Divergence::ForwardKL:  // handled by forward_kl_write
    case Divergence::ReverseKL:
    case Divergence::JSD:
    case Divergence::TVD: {
      // All three have dD/da = c q (h - sum q h) for a per-element h: one pass for q, h
      // and the divergence's own sums, then centre_grad.
      const float c = p.divergence == Divergence::JSD ? 1.0f - p.beta : 1.0f;
      if (p.divergence == Divergence::ReverseKL) {
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) {
          const float lq = a[i] - lse_s, lp = b[i] - lse_t;
          const float q = exp_approx(lq);
          w[i] = q;
          h[i] = q == 0.0f ? 0.0f : lq - lp;
        }
        D = centre_grad(w, h, V, c);  // KL(q||p) = sum q h
      } else if (p.divergence == Divergence::JSD) {
        float kl_pm = 0.0f;
        const float lb = p.log_beta, l1b = p.log_one_minus_beta;
#pragma omp simd reduction(+ : kl_pm)
        for (int64_t i = 0; i < V; ++i) {
          const float lq = a[i] - lse_s, lp = b[i] - lse_t;
          const float q = exp_approx(lq), pt = exp_approx(lp);
          const float lm = logaddexp_approx(lp + lb, lq + l1b);
          kl_pm += pt == 0.0f ? 0.0f : pt * (lp - lm);
          w[i] = q;
          h[i] = q == 0.0f ? 0.0f : lq - lm;
        }
        const float kl_qm = centre_grad(w, h, V, c);
        D = p.beta * kl_pm + (1.0f - p.beta) * kl_qm;
      } else {  // TVD
        // h = sign(q - p)/2 takes three values, so h_i - sum_j q_j h_j = sum_j q_j (h_i - h_j)
        // is a sum of the masses on the other sides: exact, where the centred form
        // cancels when the student's mass sits where the teacher has none.
        float q_pos = 0.0f, q_neg = 0.0f, q_tie = 0.0f;
#pragma omp simd reduction(+ : D, q_pos, q_neg, q_tie)
        for (int64_t i = 0; i < V; ++i) {
          const float q = exp_approx(a[i] - lse_s), pt = exp_approx(b[i] - lse_t);
          const float d = q - pt;
          D += 0.5f * std::abs(d);
          q_pos += d > 0.0f ? q : 0.0f;
          q_neg += d < 0.0f ? q : 0.0f;
          q_tie += d == 0.0f ? q : 0.0f;
          w[i] = q;
          h[i] = d;
        }
        // D <= 1 is finite, so D - D is 0 unless the row holds a NaN, which the sign
        // comparisons above would otherwise drop.
        const float nan_or_zero = D - D;
        const float g_pos = q_neg + 0.5f * q_tie + nan_or_zero;     // h_i = +1/2
        const float g_neg = -(q_pos + 0.5f * q_tie) + nan_or_zero;  // h_i = -1/2
        const float g_tie = 0.5f * (q_neg - q_pos) + nan_or_zero;   // h_i = 0
#pragma omp simd
        for (int64_t i = 0; i < V; ++i)
          w[i] = w[i] * (h[i] > 0.0f ? g_pos : (h[i] < 0.0f ? g_neg : g_tie));
      }
      return D;
    }
  }
  return D;
}

// Forward KL's dD/da = q - p needs no row sum, so its divergence and the gradient share
// one sweep, writing the gradient (with the CE term) straight to the output row.
template <typename TS>
float forward_kl_write(const float* a, const float* b, int64_t V, float lse_s, float lse_t, float gdiv,
                       bool with_ce, float temp, float lse_raw, float gce, TS* g) {
  float D = 0.0f;
  if (with_ce) {
#pragma omp simd reduction(+ : D)
    for (int64_t i = 0; i < V; ++i) {
      const float lq = a[i] - lse_s, lp = b[i] - lse_t;
      const float q = exp_approx(lq), pt = exp_approx(lp);
      D += pt == 0.0f ? 0.0f : pt * (lp - lq);  // == 0, not > 0: NaN must reach D
      g[i] = static_cast<TS>(gdiv * (q - pt) + gce * exp_approx(temp * a[i] - lse_raw));
    }
  } else {
#pragma omp simd reduction(+ : D)
    for (int64_t i = 0; i < V; ++i) {
      const float lq = a[i] - lse_s, lp = b[i] - lse_t;
      const float q = exp_approx(lq), pt = exp_approx(lp);
      D += pt == 0.0f ? 0.0f : pt * (lp - lq);
      g[i] = static_cast<TS>(gdiv * (q - pt));
    }
  }
  return D;
}

template <typename TS, typename TT>
struct RowKernel {
  const TS* s;
  int64_t s_stride;
  const TT* t;
  int64_t t_stride;
  const int64_t* labels;
  const float* stats_in;  // [N, 5] or nullptr
  float* loss;            // [N]
  TS* grad;               // rows of width g_width; may alias s (in-place backward)
  int64_t g_stride;
  int64_t g_width;
  KDParams p;
  float grad_scale;

  void zero_grad_row(TS* g, float value) const {
    const TS v = static_cast<TS>(value);
    for (int64_t i = 0; i < g_width; ++i) g[i] = v;
  }

  void operator()(int64_t row, float* a, float* b, float* w, float* h) const {
    const int64_t V = p.vocab_size;
    const TS* srow = s + row * s_stride;
    TS* grow = grad + row * g_stride;
    const bool with_ce = p.ce_weight != 0.0f;
    int64_t label = -1;
    if (labels != nullptr) {
      label = labels[row];
      if (label == p.ignore_index) {
        loss[row] = 0.0f;
        zero_grad_row(grow, 0.0f);
        return;
      }
      if (label < 0 || label >= V) {  // never silently a number: NaN marks the bad row
        loss[row] = std::numeric_limits<float>::quiet_NaN();
        zero_grad_row(grow, std::numeric_limits<float>::quiet_NaN());
        return;
      }
    }
    const bool need_raw = with_ce && p.temperature != 1.0f;
    RowStats st;
    if (stats_in != nullptr) {
      load_row<false>(srow, t + row * t_stride, V, p, false, a, b);
      const float* r = stats_in + row * kRowStatsWidth;
      st = RowStats{r[0], r[1], r[2], r[3], r[4]};
    } else {
      st = load_row<true>(srow, t + row * t_stride, V, p, need_raw, a, b);
    }
    if (with_ce && !need_raw) st.sum_raw = st.sum_s;
    const float lse_s = st.max_s + std::log(st.sum_s);
    const float lse_t = st.max_t + std::log(st.sum_t);
    const float gdiv = grad_scale * p.div_weight * p.inv_temperature;
    const float gce = grad_scale * p.ce_weight;
    const float temp = p.temperature;
    const float lse_raw = with_ce ? temp * st.max_s + std::log(st.sum_raw) : 0.0f;
    // Read before the gradient sweep: in place, grow is srow.
    const float s_label = with_ce ? static_cast<float>(srow[label]) : 0.0f;
    float D, div_grad_label = 0.0f;
    if (p.divergence == Divergence::ForwardKL) {
      D = forward_kl_write(a, b, V, lse_s, lse_t, gdiv, with_ce, temp, lse_raw, gce, grow);
      if (with_ce) div_grad_label = exp_approx(a[label] - lse_s) - exp_approx(b[label] - lse_t);
    } else {
      D = divergence_and_grad(a, b, V, lse_s, lse_t, p, w, h);
      if (with_ce) {
#pragma omp simd
        for (int64_t i = 0; i < V; ++i)
          grow[i] = static_cast<TS>(gdiv * w[i] + gce * exp_approx(temp * a[i] - lse_raw));
        div_grad_label = w[label];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) grow[i] = static_cast<TS>(gdiv * w[i]);
      }
    }
    float row_loss = p.div_weight * D;
    if (with_ce) {
      row_loss += p.ce_weight * (lse_raw - s_label);
      // The one-hot part, added in fp32 so the label entry is rounded once.
      const float sm_label = exp_approx(temp * a[label] - lse_raw);
      grow[label] = static_cast<TS>(gdiv * div_grad_label + gce * (sm_label - 1.0f));
    }
    for (int64_t i = V; i < g_width; ++i) grow[i] = static_cast<TS>(0.0f);
    loss[row] = row_loss;
  }
};

template <typename TS, typename TT>
void run_rows(const RowKernel<TS, TT>& k, int64_t n_rows) {
  const int64_t V = k.p.vocab_size;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cache(4 * V);
    for (int64_t r = begin; r < end; ++r)
      k(r, cache.data(), cache.data() + V, cache.data() + 2 * V, cache.data() + 3 * V);
  });
}

template <typename TS, typename TT>
void stats_rows(const TS* s, int64_t s_stride, const TT* t, int64_t t_stride, int64_t n_rows,
                const KDParams& p, bool with_raw, float* out) {
  const int64_t V = p.vocab_size;
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cache(2 * V);
    for (int64_t r = begin; r < end; ++r) {
      RowStats st = load_row<true>(s + r * s_stride, t + r * t_stride, V, p, with_raw,
                                   cache.data(), cache.data() + V);
      if (!with_raw || p.temperature == 1.0f) st.sum_raw = with_raw ? st.sum_s : 0.0f;
      float* o = out + r * kRowStatsWidth;
      o[0] = st.max_s; o[1] = st.sum_s; o[2] = st.max_t; o[3] = st.sum_t; o[4] = st.sum_raw;
    }
  });
}

// Dispatch over the (student, teacher) dtype pair; fp64 is accepted for testing.
template <typename F>
void dispatch_pair(at::ScalarType ss, at::ScalarType ts, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ss, "fastkd_student", [&] {
    using TS = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ts, "fastkd_teacher", [&] {
      f(TS{}, scalar_t{});
    });
  });
}

void launch_forward(const ForwardArgs& args, at::Tensor& loss, at::Tensor& grad) {
  const int64_t n_rows = args.student.size(0);
  if (n_rows == 0) return;
  const float grad_scale = args.grad_scale.to(at::kFloat).item<float>();
  dispatch_pair(args.student.scalar_type(), args.teacher.scalar_type(), [&](auto s0, auto t0) {
    using TS = decltype(s0);
    using TT = decltype(t0);
    RowKernel<TS, TT> k{args.student.data_ptr<TS>(), args.student.stride(0),
                        args.teacher.data_ptr<TT>(), args.teacher.stride(0),
                        args.labels ? args.labels->data_ptr<int64_t>() : nullptr,
                        args.row_stats ? args.row_stats->data_ptr<float>() : nullptr,
                        loss.data_ptr<float>(), grad.data_ptr<TS>(), grad.stride(0), grad.size(1),
                        args.params, grad_scale};
    run_rows(k, n_rows);
  });
}

// A fresh gradient buffer of many MiB is newly mmap'd memory: faulting it in 4 KiB pages
// costs more than the kernel's own writes (17 ms of 27 at 512 x 32000 fp32). Asking for
// transparent huge pages before the first touch removes most of that.
at::Tensor empty_grad(const at::Tensor& student) {
  at::Tensor grad = at::empty({student.size(0), student.size(1)}, student.options());
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + grad.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return grad;
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                  const c10::optional<at::Tensor>& labels,
                                                  const at::Tensor& grad_scale,
                                                  const c10::optional<at::Tensor>& row_stats,
                                                  c10::string_view divergence, double inv_temperature,
                                                  double beta, double div_weight, double ce_weight,
                                                  int64_t ignore_index, int64_t vocab_size) {
  ForwardArgs args = check_forward_args(student, teacher, labels, grad_scale, row_stats, divergence,
                                        inv_temperature, beta, div_weight, ce_weight, ignore_index,
                                        vocab_size);
  at::Tensor loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  at::Tensor grad = empty_grad(student);
  launch_forward(args, loss, grad);
  return {loss, grad};
}

at::Tensor kd_forward_inplace_cpu(at::Tensor& student, const at::Tensor& teacher,
                                  const c10::optional<at::Tensor>& labels, const at::Tensor& grad_scale,
                                  const c10::optional<at::Tensor>& row_stats, c10::string_view divergence,
                                  double inv_temperature, double beta, double div_weight, double ce_weight,
                                  int64_t ignore_index, int64_t vocab_size) {
  ForwardArgs args = check_forward_args(student, teacher, labels, grad_scale, row_stats, divergence,
                                        inv_temperature, beta, div_weight, ce_weight, ignore_index,
                                        vocab_size);
  at::Tensor loss = at::empty({student.size(0)}, student.options().dtype(at::kFloat));
  // Each row is fully read into the row cache before its gradient overwrites it.
  launch_forward(args, loss, student);
  return loss;
}

at::Tensor row_stats_cpu(const at::Tensor& student, const at::Tensor& teacher, double inv_temperature,
                         int64_t vocab_size, bool with_ce) {
  check_logits_pair(student, teacher, vocab_size);
  bool ok = true;
  KDParams p = make_params("forward_kl", inv_temperature, 0.5, 1.0, 0.0, -100, vocab_size, &ok);
  at::Tensor out = at::empty({student.size(0), kRowStatsWidth}, student.options().dtype(at::kFloat));
  if (student.size(0) == 0) return out;
  dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s0, auto t0) {
    using TS = decltype(s0);
    using TT = decltype(t0);
    stats_rows(student.data_ptr<TS>(), student.stride(0), teacher.data_ptr<TT>(), teacher.stride(0),
               student.size(0), p, with_ce, out.data_ptr<float>());
  });
  return out;
}

// Backward: multiply the stored gradient by grad_output, skipping the pass when it is 1
// (the common `loss.backward()`); reading the scalar costs nothing on the CPU.
void scale_grad_cpu(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.numel() == 1) {
    const float g = grad_output.to(at::kFloat).item<float>();
    if (g != 1.0f) grad.mul_(g);
  } else {
    grad.mul_(grad_output.reshape({-1, 1}));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("kd_forward", &kd_forward_cpu);
  m.impl("kd_forward_inplace", &kd_forward_inplace_cpu);
  m.impl("row_stats", &row_stats_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace cpu
}  // namespace fastkd
