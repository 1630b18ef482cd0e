// The loss parameters every fastkd kernel (CPU and CUDA) receives, in one struct.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastkd {

enum class Divergence : int { ForwardKL = 0, ReverseKL = 1, JSD = 2, TVD = 3 };
// How a sparse teacher's mass outside its K ids counts (fastkd/config.py: TAILS).
enum class Tail : int { Bucket = 0, Renorm = 1, None = 2 };
// How several teachers combine (fastkd/config.py: TEACHER_MODES; docs/multi_teacher.md):
// the divergence to the weighted mixture of their distributions, or the weighted sum of
// the per-teacher divergences.
enum class TeacherMode : int { Mixture = 0, Sum = 1 };

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

// The vocab-parallel loss's per-shard layouts (fastkd/backends/__init__.py describes them):
// a shard's statistics are RowStats against its local maxima plus one value term (forward
// KL: sum e_t (b - a), reverse KL: sum e_s (a - b)); the row sums of JSD are (small q, small
// q h, big q, big q h, sum p softplus(-x)), of TVD (1/2 sum |q - p|, q_pos, q_neg, q_tie, 0).
// Column 6: sum of the student's transformed logits s' over the shard's counted columns
// (label smoothing's value term; 0 when label_smoothing is 0).
constexpr int kShardStatsWidth = 7;
// The per-token diagnostics of the *_stats operators (fastkd/backends/__init__.py has the
// columns): H(p) or the sparse teacher's mass P, H(q), top-1 agreement (1/0), the unweighted
// divergence D, and the sparse student's mass Q (0 for a dense teacher). NaN at ignored
// rows, except the agreement (0).
constexpr int kStatsWidth = 5;
constexpr int kRowSumsWidth = 5;

// The loss settings as the kernels use them, in the precision of their arithmetic:
// KDParams (float) for the fp32-accumulating kernels, ExactParams (double) for the CPU
// kernel's float64 path.
template <typename Real>
struct Settings {
  Divergence divergence;
  Real temperature;
  Real inv_temperature;
  Real beta;
  Real log_beta;           // log(beta), used by JSD's log-sum-exp mixture
  Real log_one_minus_beta;
  Real div_weight;         // alpha * T^2 (or alpha without t_squared)
  Real ce_weight;          // 1 - alpha
  // The logit transforms (fastkd/config.py: logit_scale, softcap, teacher_*): each side's
  // logits x become x' = cap * tanh(scale * x / cap) (x' = scale * x where cap is 0) before
  // the temperature; the student's gradient carries dx'/dx = scale * (1 - tanh^2).
  Real scale_s;
  Real cap_s;              // 0: no softcap
  Real inv_cap_s;          // 1 / cap_s (0 without a cap)
  Real scale_t;
  Real cap_t;
  Real inv_cap_t;
  // The terms at T = 1 on the student's transformed logits s' (see kernel_contract below).
  Real label_smoothing;    // epsilon of the CE term
  Real smooth_per_class;   // epsilon / V, V the classes of the whole vocabulary
  Real z_loss;             // lambda of lambda * lse(s')^2
  int64_t ignore_index;
  int64_t vocab_size;      // columns that count, <= both tensors' widths
  Tail tail;               // sparse operators only (unpack_sparse_settings); Bucket elsewhere
  TeacherMode teacher_mode;  // several-teachers operators only (unpack_multi_settings); Mixture elsewhere
};
using KDParams = Settings<float>;
using ExactParams = Settings<double>;

// The settings cross the operator boundary as `int[] ints, Tensor floats` (a float64 host
// tensor, so that torch.compile keeps float settings symbolic; ops.cpp reads its data),
// packed by fastkd/config.py (KDConfig.kernel_settings) in this order; a test compares
// these names with INT_SETTINGS / FLOAT_SETTINGS there. Adding a setting: an entry here,
// its name, a field above, a line in unpack_settings, and the kernels that read it.
enum IntSetting : int { kDivergenceId = 0, kIgnoreIndex, kVocabSize, kNumIntSettings };
enum FloatSetting : int {
  kInvTemperature = 0, kBeta, kDivWeight, kCeWeight, kLogitScale, kSoftcap, kTeacherLogitScale, kTeacherSoftcap,
  kLabelSmoothing, kSmoothPerClass, kZLoss, kNumFloatSettings
};
constexpr const char* kIntSettingNames[kNumIntSettings] = {"divergence_id", "ignore_index", "vocab_size"};
constexpr const char* kFloatSettingNames[kNumFloatSettings] = {
    "inv_temperature", "beta", "div_weight", "ce_weight", "logit_scale", "softcap_value", "teacher_scale",
    "teacher_softcap_value", "label_smoothing", "smooth_per_class", "z_loss"};
constexpr int kNumDivergences = 4;
// The sparse operators take the dense ints followed by these (SPARSE_INT_SETTINGS).
enum SparseIntSetting : int { kTailId = kNumIntSettings, kNumSparseIntSettings };
constexpr const char* kSparseIntSettingNames[kNumSparseIntSettings] = {"divergence_id", "ignore_index",
                                                                       "vocab_size", "tail_id"};
constexpr int kNumTails = 3;
// The several-teachers operators take the dense ints followed by these (MULTI_INT_SETTINGS).
enum MultiIntSetting : int { kTeacherModeId = kNumIntSettings, kNumMultiIntSettings };
constexpr const char* kMultiIntSettingNames[kNumMultiIntSettings] = {"divergence_id", "ignore_index",
                                                                     "vocab_size", "teacher_mode_id"};
constexpr int kNumTeacherModes = 2;
// The most teachers one kernel call reads (fastkd/backends/__init__.py: MAX_KERNEL_TEACHERS):
// their per-row statistics stay in registers. More teachers run on the torch backend.
constexpr int kMaxKernelTeachers = 4;

// The kernel contract of the logit options (every kernel, fastkd/reference.py is the truth).
// With s' = transform_s(s), t' = transform_t(t), a = s'/T, b = t'/T, q = softmax(a),
// p = softmax(b), lse' = log sum exp(s') (the T = 1 normaliser, max_s * T + log sum_raw),
// epsilon = label_smoothing, V = the vocabulary's classes, per valid row:
//   loss  = div_weight D(p, q)
//         + [labels, ce_weight != 0] ce_weight (lse' - (1 - eps) s'_y - [eps > 0] eps/V sum_i s'_i)
//         + [z_loss != 0] z_loss lse'^2                     (with or without labels)
//   dL/ds'_i = div_weight dD/da_i / T + c_raw softmax(s')_i - [CE] ce_weight ((1 - eps)[i = y] + eps/V),
//         c_raw = [CE] ce_weight + 2 z_loss lse'
//   dL/ds_i  = dL/ds'_i * scale_s * (1 - (s'_i / cap_s)^2)   (scale_s alone without a cap)
// The T = 1 sum-exp (sum_raw) is needed when the CE term or the z-loss is on.

// Why the packed settings are invalid, or nullptr when they are valid.
inline const char* settings_error(const int64_t* ints, const double* floats) {
  if (ints[kDivergenceId] < 0 || ints[kDivergenceId] >= kNumDivergences) return "unknown divergence id";
  const double inv_t = floats[kInvTemperature];
  if (!(inv_t > 0.0) || !std::isfinite(inv_t)) return "inv_temperature must be finite and > 0 (temperature > 0)";
  if (!(floats[kBeta] >= 0.0 && floats[kBeta] <= 1.0)) return "beta must be in [0, 1]";
  for (int k : {kLogitScale, kTeacherLogitScale}) {
    if (!(floats[k] > 0.0) || !std::isfinite(floats[k])) return "logit scales must be finite and > 0";
  }
  for (int k : {kSoftcap, kTeacherSoftcap}) {
    if (!(floats[k] >= 0.0) || !std::isfinite(floats[k])) return "softcaps must be finite and > 0 (0: none)";
  }
  if (!(floats[kLabelSmoothing] >= 0.0 && floats[kLabelSmoothing] <= 1.0)) return "label_smoothing must be in [0, 1]";
  if (!(floats[kSmoothPerClass] >= 0.0 && floats[kSmoothPerClass] <= 1.0)) return "smooth_per_class must be in [0, 1]";
  if (!(floats[kZLoss] >= 0.0) || !std::isfinite(floats[kZLoss])) return "z_loss must be finite and >= 0";
  return nullptr;
}

template <typename Real>
inline Settings<Real> unpack_settings(const int64_t* ints, const double* floats) {
  Settings<Real> p{};
  const double beta = floats[kBeta];
  p.divergence = static_cast<Divergence>(ints[kDivergenceId]);
  // JSD at beta 0 / 1 is exactly forward / reverse KL (TRL's special cases; the general
  // formula gives 0 there). Resolved here too, not only in Python, because under
  // torch.compile beta may be a traced value that Python cannot branch on.
  if (p.divergence == Divergence::JSD && beta == 0.0) p.divergence = Divergence::ForwardKL;
  if (p.divergence == Divergence::JSD && beta == 1.0) p.divergence = Divergence::ReverseKL;
  p.inv_temperature = static_cast<Real>(floats[kInvTemperature]);
  p.temperature = static_cast<Real>(1.0 / floats[kInvTemperature]);
  p.beta = static_cast<Real>(beta);
  p.log_beta = static_cast<Real>(std::log(beta));
  p.log_one_minus_beta = static_cast<Real>(std::log1p(-beta));
  p.div_weight = static_cast<Real>(floats[kDivWeight]);
  p.ce_weight = static_cast<Real>(floats[kCeWeight]);
  p.scale_s = static_cast<Real>(floats[kLogitScale]);
  p.cap_s = static_cast<Real>(floats[kSoftcap]);
  p.inv_cap_s = floats[kSoftcap] > 0.0 ? static_cast<Real>(1.0 / floats[kSoftcap]) : Real(0);
  p.scale_t = static_cast<Real>(floats[kTeacherLogitScale]);
  p.cap_t = static_cast<Real>(floats[kTeacherSoftcap]);
  p.inv_cap_t = floats[kTeacherSoftcap] > 0.0 ? static_cast<Real>(1.0 / floats[kTeacherSoftcap]) : Real(0);
  p.label_smoothing = static_cast<Real>(floats[kLabelSmoothing]);
  p.smooth_per_class = static_cast<Real>(floats[kSmoothPerClass]);
  p.z_loss = static_cast<Real>(floats[kZLoss]);
  p.ignore_index = ints[kIgnoreIndex];
  p.vocab_size = ints[kVocabSize];
  p.tail = Tail::Bucket;
  p.teacher_mode = TeacherMode::Mixture;
  return p;
}

// Why the packed sparse settings are invalid, or nullptr (ints has kNumSparseIntSettings).
inline const char* sparse_settings_error(const int64_t* ints, const double* floats) {
  if (const char* error = settings_error(ints, floats)) return error;
  if (ints[kTailId] < 0 || ints[kTailId] >= kNumTails) return "unknown tail id";
  const bool forward_kl = ints[kDivergenceId] == static_cast<int>(Divergence::ForwardKL) ||
                          (ints[kDivergenceId] == static_cast<int>(Divergence::JSD) && floats[kBeta] == 0.0);
  if (ints[kTailId] == static_cast<int>(Tail::None) && !forward_kl) return "tail 'none' is forward KL only";
  return nullptr;
}

template <typename Real>
inline Settings<Real> unpack_sparse_settings(const int64_t* ints, const double* floats) {
  Settings<Real> p = unpack_settings<Real>(ints, floats);
  p.tail = static_cast<Tail>(ints[kTailId]);
  return p;
}

// Why the packed several-teachers settings are invalid, or nullptr (ints has kNumMultiIntSettings).
inline const char* multi_settings_error(const int64_t* ints, const double* floats) {
  if (const char* error = settings_error(ints, floats)) return error;
  if (ints[kTeacherModeId] < 0 || ints[kTeacherModeId] >= kNumTeacherModes) return "unknown teacher mode id";
  return nullptr;
}

template <typename Real>
inline Settings<Real> unpack_multi_settings(const int64_t* ints, const double* floats) {
  Settings<Real> p = unpack_settings<Real>(ints, floats);
  p.teacher_mode = static_cast<TeacherMode>(ints[kTeacherModeId]);
  return p;
}

}  // namespace fastkd
