// exp and log written so that GCC/Clang vectorise them inside `#pragma omp simd` loops.
//
// libm's expf/logf are opaque calls that block vectorisation of the row sweeps; these
// are the Cephes single-precision polynomials (about 1 ulp on the ranges used), with
// the special values the losses rely on: exp(-inf) = 0, exp(NaN) = NaN, log(0) = -inf.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace fastkd {
namespace cpu {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

inline float exp_approx(float x) {
  // Range reduction x = k ln2 + r with ln2 split in two (Cody-Waite) to keep r exact.
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
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
  float res = y * scale;
  res = x < -87.0f ? 0.0f : res;
  res = x > 88.0f ? std::numeric_limits<float>::infinity() : res;
  return x != x ? x : res;
}

inline float log_approx(float x) {
  // x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log x = e ln2 + log1p(m - 1).
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
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
  float res = f + y + 0.693359375f * e;
  res = x == 0.0f ? -std::numeric_limits<float>::infinity() : res;
  res = x == std::numeric_limits<float>::infinity() ? x : res;
  return (x != x || x < 0.0f) ? std::numeric_limits<float>::quiet_NaN() : res;
}

// log(exp(u) + exp(v)); -inf when both are -inf (not NaN).
inline float logaddexp_approx(float u, float v) {
  const float hi = u > v ? u : v;
  const float lo = u > v ? v : u;
  const float res = hi + log_approx(1.0f + exp_approx(lo - hi));
  return hi == -std::numeric_limits<float>::infinity() ? hi : res;
}

}  // namespace cpu
}  // namespace fastkd
