// The loss parameters every fastkd kernel (CPU and CUDA) receives, in one struct.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

namespace fastkd {

enum class Divergence : int { ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };

// Row statistics of one token, in the layout of the `row_stats` op (float32 [N, 5]).
// Max and sum-exp are kept apart (not folded into a log-sum-exp) so that a vocab-parallel
// caller can combine shards: max-all-reduce, rescale the sums, sum-all-reduce.
struct RowStats {
  float max_s;    // max_i s_i / T
  float sum_s;    // sum_i exp(s_i / T - max_s)
  float max_t;    // max_i t_i / T
  float sum_t;    // sum_i exp(t_i / T - max_t)
  float sum_raw;  // sum_i exp(s_i - T * max_s): the T = 1 softmax of the CE term
};
constexpr int kRowStatsWidth = 5;

struct KDParams {
  Divergence divergence;
  float temperature;
  float inv_temperature;
  float beta;
  float log_beta;          // log(beta), used by JSD's log-sum-exp mixture
  float log_one_minus_beta;
  float div_weight;        // alpha * T^2 (or alpha without t_squared)
  float ce_weight;         // 1 - alpha
  int64_t ignore_index;
  int64_t vocab_size;      // columns that count, <= both tensors' widths
};

// The float settings in double, as the operators receive them. KDParams holds them in
// float for the GPU kernels; the CPU kernel's float64 path computes with these.
struct ExactParams {
  double temperature;
  double inv_temperature;
  double beta;
  double log_beta;
  double log_one_minus_beta;
  double div_weight;
  double ce_weight;
};

inline ExactParams make_exact_params(double inv_temperature, double beta, double div_weight, double ce_weight) {
  return ExactParams{1.0 / inv_temperature, inv_temperature, beta, std::log(beta), std::log1p(-beta),
                     div_weight, ce_weight};
}

inline KDParams make_params(const std::string& divergence, double inv_temperature, double beta,
                            double div_weight, double ce_weight, int64_t ignore_index,
                            int64_t vocab_size, bool* ok) {
  KDParams p{};
  *ok = true;
  if (divergence == "forward_kl") p.divergence = Divergence::ForwardKL;
  else if (divergence == "reverse_kl") p.divergence = Divergence::ReverseKL;
  // JSD at beta 0 / 1 is exactly forward / reverse KL (TRL's special cases; the general
  // formula gives 0 there). Resolved here too, not only in Python, because under
  // torch.compile beta may be a traced value that Python cannot branch on.
  else if (divergence == "jsd") p.divergence = beta == 0.0 ? Divergence::ForwardKL
                                             : beta == 1.0 ? Divergence::ReverseKL : Divergence::JSD;
  else if (divergence == "tvd") p.divergence = Divergence::TVD;
  else *ok = false;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.temperature = static_cast<float>(1.0 / inv_temperature);
  p.beta = static_cast<float>(beta);
  p.log_beta = static_cast<float>(std::log(beta));
  p.log_one_minus_beta = static_cast<float>(std::log1p(-beta));
  p.div_weight = static_cast<float>(div_weight);
  p.ce_weight = static_cast<float>(ce_weight);
  p.ignore_index = ignore_index;
  p.vocab_size = vocab_size;
  return p;
}

}  // namespace fastkd
