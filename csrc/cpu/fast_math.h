// exp and log written so that GCC/Clang vectorise them inside `#pragma omp simd` loops.
//
// libm's expf/logf are opaque calls that block vectorisation of the row sweeps; these
// are the Cephes single-precision polynomials (about 1 ulp on the ranges used), with
// the special values the losses rely on: exp(-inf) = 0, exp(NaN) = NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastkd {
namespace cpu {

// Inlining is what lets the loops around these calls vectorise.
#define FASTKD_INLINE inline __attribute__((always_inline))

FASTKD_INLINE float bits_to_float(int32_t i) {
  return __builtin_bit_cast(float, i);
}

// 2^k p(r) for x = k ln2 + r, x in [-87, 88] already: the body of exp_approx and
// exp_nonpositive. Range reduction with ln2 split in two (Cody-Waite) to keep r exact.
FASTKD_INLINE float exp_in_range(float xc) {
  const float k = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(k) + 127) << 23);
  return y * scale;
}

FASTKD_INLINE float exp_approx(float x) {
  // std::max/min keep a NaN first argument, so NaN flows through to the result; the
  // selects are written so the compiler if-converts them (no branches in the loop).
  const float res = exp_in_range(std::min(std::max(x, -87.0f), 88.0f));
  const float lo = x < -87.0f ? 0.0f : res;
  return x > 88.0f ? std::numeric_limits<float>::infinity() : lo;
}

// exp_approx for arguments that cannot overflow: x - max in the softmax sweeps, x - lse
// in the gradient's (x <= 0, or NaN, up to rounding). The same values as exp_approx for
// every x <= 88; without the overflow side's clamp and select (x > 88 would give garbage,
// not inf), which made the one-teacher forward + backward 1.1x faster (AMD EPYC).
FASTKD_INLINE float exp_nonpositive(float x) {
  const float res = exp_in_range(std::max(x, -87.0f));  // NaN stays NaN (std::max keeps its first)
  return x < -87.0f ? 0.0f : res;
}

// log(2^e * m) for m in [sqrt(1/2), sqrt(2)): e ln2 + log1p(m - 1), Cephes polynomial.
FASTKD_INLINE float log_reduced(float m, float e) {
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y - 2.12194440e-4f * e;
  y = y - 0.5f * z;
  return f + y + 0.693359375f * e;
}

// log(y) for y in [1, 2], without bit manipulation: GCC does not vectorise a loop that
// feeds exp_approx's bit-built result into a bit extraction of its exponent.
FASTKD_INLINE float log_1_to_2(float y) {
  const bool big = y > 1.41421356f;
  return log_reduced(big ? y * 0.5f : y, big ? 1.0f : 0.0f);
}

// expm1(x) for |x| <= 1/2 (Taylor to x^8: relative error < 1e-8 there), where exp(x) - 1
// would lose log2(1/|x|) bits to cancellation.
FASTKD_INLINE float expm1_small(float x) {
  float y = 1.0f / 40320.0f;
  y = y * x + 1.0f / 5040.0f;
  y = y * x + 1.0f / 720.0f;
  y = y * x + 1.0f / 120.0f;
  y = y * x + 1.0f / 24.0f;
  y = y * x + 1.0f / 6.0f;
  y = y * x + 0.5f;
  y = y * x + 1.0f;
  return y * x;
}

// log1p(u) for |u| <= 0.3 as 2 atanh(u / (2 + u)) (odd series to w^11, |w| <= 0.18).
FASTKD_INLINE float log1p_small(float u) {
  const float w = u / (2.0f + u);
  const float w2 = w * w;
  float y = 1.0f / 11.0f;
  y = y * w2 + 1.0f / 9.0f;
  y = y * w2 + 1.0f / 7.0f;
  y = y * w2 + 1.0f / 5.0f;
  y = y * w2 + 1.0f / 3.0f;
  y = y * w2 + 1.0f;
  return 2.0f * w * y;
}

// tanh(x) for the logit softcap (csrc/kd_params.h), its one implementation: with a = |x|
// and y = a^2, tanh(a) = a P(y) / Q(y), a minimax rational fit of degree 4 in y on
// [0, 9.02] (fitted for fastkd; relative error 2.2e-8 in exact arithmetic) with
// P(0) = Q(0) = 1, so small a keep their relative accuracy. In float: 5e-8 relative on
// average, at most 2.4e-7 below |x| = 1 and 3.3e-7 (6 ulp) near saturation. Every
// coefficient is positive: Q >= 1 (no pole) and Horner's sums do not cancel. One division
// and no exp: half the time of the exp-based forms (1 - 2 / (exp(2x) + 1) also cancels
// near 0; a two-form evaluation that halves the error below |x| = 1 costs a third more).
// |x| >= 9.02 (where tanh rounds to 1) and +-inf give +-1 exactly, and nothing exceeds 1:
// a -inf logit under a cap is -cap with chain factor 1 - tanh^2 = 0, and no chain factor
// is negative. NaN gives NaN.
FASTKD_INLINE float tanh_approx(float x) {
  constexpr float kSaturated = 9.02f;
  const float a = std::min(std::abs(x), kSaturated);  // NaN stays NaN (std::min keeps its first)
  const float y = a * a;
  float p = 1.3384296847e-08f;
  p = p * y + 2.0635826941e-05f;
  p = p * y + 3.4974579632e-03f;
  p = p * y + 1.3382687512e-01f;
  p = p * y + 1.0f;
  float q = 7.7902516716e-07f;
  q = q * y + 3.2885178086e-04f;
  q = q * y + 2.5884362036e-02f;
  q = q * y + 4.6716008759e-01f;
  q = q * y + 1.0f;
  const float r = std::min(a * p / q, 1.0f);
  return std::copysign(a >= kSaturated ? 1.0f : r, x);
}

// log1p(e) for e in [0, 1] (a log-sum-exp of two terms: softplus, a mixture of two
// teachers), as log(1 + e) e / ((1 + e) - 1): cancels the rounding of 1 + e when e is tiny.
FASTKD_INLINE float log1p_unit(float e) {
  const float y = 1.0f + e;
  const float ym1 = y - 1.0f;
  return ym1 == 0.0f ? e : log_1_to_2(y) * (e / ym1);
}

// log(y) for y in [1, 4] (a log-sum-exp of up to four terms, the largest 1), without bit
// manipulation (see log_1_to_2).
FASTKD_INLINE float log_1_to_4(float y) {
  const bool two = y > 2.82842712f;
  const bool one = y > 1.41421356f;
  return log_reduced(two ? y * 0.25f : (one ? y * 0.5f : y), two ? 2.0f : (one ? 1.0f : 0.0f));
}

// softplus(z) = log(1 + e^z) and softplus(-z), sharing log1p(e^-|z|):
// softplus(+-z) = max(+-z, 0) + log1p(e^-|z|). Both accurate, for every z (no z + softplus(-z)
// cancellation); z = -inf gives (0, inf), NaN gives NaN.
FASTKD_INLINE void softplus_pair(float z, float* pos, float* neg) {
  const float l = log1p_unit(exp_approx(-std::abs(z)));
  *pos = std::max(z, 0.0f) + l;
  *neg = std::max(-z, 0.0f) + l;
}

// Double-precision versions for float64 input, which must match the reference to ~1e-12:
// libm's exp/log (correctly rounded to within 1 ulp), not vectorised, which is fine for
// what is a precision path.
FASTKD_INLINE double exp_approx(double x) { return std::exp(x); }
FASTKD_INLINE double exp_nonpositive(double x) { return std::exp(x); }
FASTKD_INLINE double expm1_small(double x) { return std::expm1(x); }
FASTKD_INLINE double log1p_small(double u) { return std::log1p(u); }
FASTKD_INLINE double tanh_approx(double x) { return std::tanh(x); }
FASTKD_INLINE double log1p_unit(double e) { return std::log1p(e); }
FASTKD_INLINE double log_1_to_4(double y) { return std::log(y); }
FASTKD_INLINE void softplus_pair(double z, double* pos, double* neg) {
  const double l = std::log1p(std::exp(-std::abs(z)));
  *pos = std::max(z, 0.0) + l;
  *neg = std::max(-z, 0.0) + l;
}

}  // namespace cpu
}  // namespace fastkd
