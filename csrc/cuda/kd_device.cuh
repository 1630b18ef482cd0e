// Device code shared by the fastkd CUDA kernels: packed loads and stores, and the pieces
// of the three phases every fastkd kernel (CPU, CUDA, Triton) goes through per row:
//   row_stats   per row and side: max and sum-exp, plus the T = 1 sum-exp of the CE term
//               (RowStatsBase2, row_stats_add, combine / block_combine, row_consts)
//   row_sums    given the stats: the divergence's value terms and the row sums its
//               gradient needs (row_sums_add, centring, divergence_from_sums)
//   write_grad  per element: the gradient times the reduction scale (ddiv,
//               write_grad_pack); zero fill past vocab_size (fill_span)
// and the label handling shared by the kernels (LaunchRow), and the logit options
// (kd_params.h states their contract): each side's transform x' = cap tanh(scale x / cap)
// (Logits), and the terms at T = 1 on the student's s' (label-smoothed CE and z-loss:
// RowConsts, write_grad_pack, add_hard_label_loss). Every kernel has a template flag
// kOptions, set per launch (kd_cuda.h: has_options): the instances without it have no
// code for the options, so their registers and loops are those of the kernels before them
// (per-row branches for smoothing and z-loss in those instances made the two-pass kernel
// spill); the instances with it take every option at run time, the transform of a side
// without one being exact (x * 1). Below, s and t stand for the transformed logits s', t'.
//
// Units. Everything runs in base 2 so that each exponential is one MUFU.EX2 fed by one
// FFMA: with c = log2(e) / T,
//     log2 q_i = s_i c - ls,   ls = log2 sum_j 2^(s_j c)      (student, softmax(s / T))
//     log2 p_i = t_i c - lt,   lt = log2 sum_j 2^(t_j c)      (teacher)
//     log2 r_i = s_i log2(e) - lraw                           (the CE term's softmax(s))
// and natural-log quantities (the divergences, h below) are recovered with one multiply
// by ln 2. Row maxima are kept in raw logit units (max_i s_i), which is exact under the
// positive scale c and lets the same maximum serve both temperatures.
//
// The divergences and their gradients w.r.t. a = s / T (see csrc/cpu/kd_cpu.cpp, which
// this code must match):
//   forward_kl  D = sum p (log p - log q)                  dD/da = q - p
//   reverse_kl  D = sum q h, h = log q - log p             dD/da = q (h - D)
//   jsd         D = beta KL(p||m) + (1-beta) sum q h, h = log q - log m,
//               m = beta p + (1-beta) q                    dD/da = (1-beta) q (h - sum q h)
//   tvd         D = 1/2 sum |p - q|, h = sign(q - p)/2     dD/da = q (h - sum q h)
// For the centred forms the entry holding q > kPeak = 3/4 (at most one) uses
// h_k sum_{j!=k} q_j - sum_{j!=k} q_j h_j instead of h_k - sum q h, which cancels in fp32
// on peaked rows; TVD writes h_i - sum q h exactly as masses of the other signs.
// reverse_kl and jsd centre with sum q h / sum q over the fp32 q computed here (their sum
// is 1 + O(1e-6)): see centring() below.
// Zero-probability entries contribute 0 (0 log 0 = 0): -inf logits are legal. NaN inputs
// propagate through the sums into the whole row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kd_cuda.h"

namespace fastkd {
namespace cuda {
namespace dev {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
#define FASTKD_NEG_INF (-__builtin_huge_valf())
#define FASTKD_DEV __device__ __forceinline__

// ---------------------------------------------------------------------------------------
// Fast math: the hardware approximations (rel. error ~2^-22), independent of
// --use_fast_math. ex2(-inf) = 0, lg2(0) = -inf, NaN stays NaN.

FASTKD_DEV float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

FASTKD_DEV float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

FASTKD_DEV float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log2(2^u + 2^v) without forming 2^u (it may underflow); NaN when both are -inf, which
// callers only use under a zero-probability guard. The rounding of 1 + 2^(lo - hi) loses
// terms below 2^-24; a log1p-style correction (as the CPU kernel has) costs a division
// and registers, and made no difference to the JSD errors in a float32 emulation of this
// code against the float64 reference (T = 0.5 .. 2, beta = 0.1 .. 0.9).
FASTKD_DEV float log2_add_exp2(float u, float v) {
  const float hi = fmaxf(u, v), lo = fminf(u, v);
  return hi + lg2(1.0f + ex2(lo - hi));
}

// ---------------------------------------------------------------------------------------
// Element types and 16-byte packs.

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr uint32_t kNegInfBits = 0xff800000u;
  FASTKD_DEV static float lo(uint32_t w) { return __uint_as_float(w); }
  FASTKD_DEV static float hi(uint32_t w) { return __uint_as_float(w); }
  FASTKD_DEV static Bits bits(float x) { return __float_as_uint(x); }
  FASTKD_DEV static uint32_t pack2(float a, float) { return __float_as_uint(a); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr uint32_t kNegInfBits = 0xff80u;
  // bf16 is the top half of an fp32: widening is a shift or a mask, no conversion.
  FASTKD_DEV static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  FASTKD_DEV static float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  template <int kForm>
  FASTKD_DEV static float lo_form(uint32_t w) {
    if constexpr (kForm == 1) return __uint_as_float(__byte_perm(w, 0u, 0x1044));
    else if constexpr (kForm == 2) return __uint_as_float(__funnelshift_l(0u, w, 16));
    else return lo(w);
  }
  template <int kForm>
  FASTKD_DEV static float hi_form(uint32_t w) {
    if constexpr (kForm == 1) return __uint_as_float(__byte_perm(w, 0u, 0x3244));
    else if constexpr (kForm == 2) return __uint_as_float(__funnelshift_r(w, 0u, 16) << 16);
    else return hi(w);
  }
  FASTKD_DEV static Bits bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  FASTKD_DEV static uint32_t pack2(float a, float b) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);  // one cvt.rn.bf16x2.f32
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static constexpr uint32_t kNegInfBits = 0xfc00u;
  FASTKD_DEV static float lo(uint32_t w) { return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu))); }
  FASTKD_DEV static float hi(uint32_t w) { return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))); }
  template <int kForm>
  FASTKD_DEV static float lo_form(uint32_t w) {
    if constexpr (kForm == 1) return lo(__byte_perm(w, 0u, 0x4410));
    else if constexpr (kForm == 2) return lo((w << 16) >> 16);
    else return lo(w);
  }
  template <int kForm>
  FASTKD_DEV static float hi_form(uint32_t w) {
    if constexpr (kForm == 1) return lo(__byte_perm(w, 0u, 0x4432));
    else if constexpr (kForm == 2) return lo(__funnelshift_r(w, 0u, 16));
    else return hi(w);
  }
  FASTKD_DEV static Bits bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
  FASTKD_DEV static uint32_t pack2(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
};

template <int kBytes> struct RawOf;
template <> struct RawOf<16> { using type = uint4; };
template <> struct RawOf<8> { using type = uint2; };
template <> struct RawOf<4> { using type = unsigned int; };
template <> struct RawOf<2> { using type = unsigned short; };

FASTKD_DEV uint32_t word(const uint4& r, int i) { return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w; }
FASTKD_DEV uint32_t word(const uint2& r, int i) { return i == 0 ? r.x : r.y; }
FASTKD_DEV uint32_t word(unsigned int r, int) { return r; }
FASTKD_DEV uint32_t word(unsigned short r, int) { return r; }

FASTKD_DEV void make_raw(uint4& r, const uint32_t* w) { r = make_uint4(w[0], w[1], w[2], w[3]); }
FASTKD_DEV void make_raw(uint2& r, const uint32_t* w) { r = make_uint2(w[0], w[1]); }
FASTKD_DEV void make_raw(unsigned int& r, const uint32_t* w) { r = w[0]; }
FASTKD_DEV void make_raw(unsigned short& r, const uint32_t* w) { r = static_cast<unsigned short>(w[0]); }

// VEC consecutive elements of one row, kept packed in registers (a bf16 pair per 32-bit
// register) and widened to fp32 only when used. Element j is a compile-time index after
// unrolling, so the word selection folds away.
template <typename T, int VEC>
struct Pack {
  static constexpr int kBytes = int(sizeof(T)) * VEC;
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  using Raw = typename RawOf<kBytes>::type;
  Raw raw;

  // kForm picks one of several equivalent bit sequences for widening a 16-bit element.
  // The register-resident kernel uses a different one in each phase: ptxas otherwise
  // notices that a later phase widens the same registers again and keeps all 128
  // widened floats of the row alive between phases, spilling them.
  // fp32 needs no widening, and there the repeated expressions are the exponents
  // themselves; `opaque_zero` (0 at run time, unknown to the compiler) makes each
  // phase's copy of the element a distinct value.
  // kOpaque: form 2 of a 16-bit element also mixes in opaque_zero (the options' instances of
  // the cluster kernel): LLVM folds fp16's form 2 into form 0, and with the transform the
  // row's transformed values then lived from row_stats to row_sums, spilling 564 bytes.
  // kForm 3 (the cluster kernel's diagnostics sweep, between row_sums and write_grad):
  // the word mixed with opaque_zero, then widened as form 0.
  template <int kForm = 0, bool kOpaque = false>
  FASTKD_DEV float get(int j, uint32_t opaque_zero = 0) const {
    if constexpr (sizeof(T) == 4) {
      const uint32_t w = word(raw, j);
      if constexpr (kForm == 1) return __uint_as_float(w ^ opaque_zero);
      else if constexpr (kForm == 2) return __uint_as_float(w + opaque_zero);
      else if constexpr (kForm == 3) return __uint_as_float(w | opaque_zero);
      else return __uint_as_float(w);
    } else if constexpr (kForm == 3) {
      const uint32_t w = word(raw, j >> 1) ^ opaque_zero;
      return (j & 1) ? Elem<T>::hi(w) : Elem<T>::lo(w);
    } else {
      const uint32_t w = word(raw, j >> 1) + (kOpaque && kForm == 2 ? opaque_zero : 0u);
      return (j & 1) ? Elem<T>::template hi_form<kForm>(w) : Elem<T>::template lo_form<kForm>(w);
    }
  }

  // Largest element; bf16/fp16 compare two at a time in packed form.
  FASTKD_DEV float max() const {
    if constexpr (sizeof(T) == 2 && VEC >= 2) {
      using T2 = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;
      uint32_t m = word(raw, 0);
#pragma unroll
      for (int i = 1; i < kWords; ++i) {
        const uint32_t w = word(raw, i);
        const T2 r = __hmax2(*reinterpret_cast<const T2*>(&m), *reinterpret_cast<const T2*>(&w));
        m = *reinterpret_cast<const uint32_t*>(&r);
      }
      return fmaxf(Elem<T>::lo(m), Elem<T>::hi(m));
    } else {
      float m = get(0);
#pragma unroll
      for (int j = 1; j < VEC; ++j) m = fmaxf(m, get(j));
      return m;
    }
  }
};

// An aligned pack entirely inside the row. Streaming loads (evict-first) where a byte is
// read for the last time.
template <typename T, int VEC, bool kStreaming>
FASTKD_DEV Pack<T, VEC> load_pack(const T* p) {
  using Raw = typename Pack<T, VEC>::Raw;
  Pack<T, VEC> v;
  if constexpr (kStreaming) v.raw = __ldcs(reinterpret_cast<const Raw*>(p));
  else v.raw = *reinterpret_cast<const Raw*>(p);
  return v;
}

// A pack that straddles the row's ends: element j is column col0 + j, and columns
// outside [0, V) read as -inf, which every sum below treats as absent. Only valid
// columns are dereferenced.
template <typename T, int VEC>
FASTKD_DEV Pack<T, VEC> load_pack_masked(const T* row, int64_t col0, int64_t V) {
  using Bits = typename Elem<T>::Bits;
  const Bits* r = reinterpret_cast<const Bits*>(row);
  uint32_t b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int64_t col = col0 + j;
    b[j] = (col >= 0 && col < V) ? uint32_t(r[col]) : Elem<T>::kNegInfBits;
  }
  uint32_t w[Pack<T, VEC>::kWords];
#pragma unroll
  for (int i = 0; i < Pack<T, VEC>::kWords; ++i)
    w[i] = sizeof(T) == 4 || VEC == 1 ? b[i] : (b[2 * i] | (b[2 * i + 1] << 16));
  Pack<T, VEC> p;
  make_raw(p.raw, w);
  return p;
}

// Stores VEC fp32 values as one pack (aligned, inside the row) in T.
// VEC fp32 values rounded to T, as the pack's 32-bit words.
template <typename T, int VEC>
FASTKD_DEV void pack_words(const float (&g)[VEC], uint32_t (&w)[Pack<T, VEC>::kWords]) {
  if constexpr (sizeof(T) == 4 || VEC == 1) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) w[i] = Elem<T>::bits(g[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) w[i] = Elem<T>::pack2(g[2 * i], g[2 * i + 1]);
  }
}

template <typename T, int VEC>
FASTKD_DEV void store_pack(T* p, const float (&g)[VEC]) {
  uint32_t w[Pack<T, VEC>::kWords];
  pack_words<T, VEC>(g, w);
  typename Pack<T, VEC>::Raw raw;
  make_raw(raw, w);
  __stcs(reinterpret_cast<typename Pack<T, VEC>::Raw*>(p), raw);
}

template <typename T, int VEC>
FASTKD_DEV void store_pack_masked(T* row, int64_t col0, int64_t V, const float (&g)[VEC]) {
  using Bits = typename Elem<T>::Bits;
  Bits* r = reinterpret_cast<Bits*>(row);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int64_t col = col0 + j;
    if (col >= 0 && col < V) r[col] = Elem<T>::bits(g[j]);
  }
}

// A pack whose address is aligned only to `part` elements (a power of two below VEC; the
// teacher or gradient row of a launch whose offsets differ from the student's, LaunchPlan
// t_part / g_part): VEC / part loads of part elements each, as wide as the alignment allows.
template <typename T, int VEC, bool kStreaming>
FASTKD_DEV Pack<T, VEC> load_pack_parts(const T* p, int part) {
  constexpr int kWords = Pack<T, VEC>::kWords;
  const int bytes = part * int(sizeof(T));
  uint32_t w[kWords];
  if (bytes >= 8) {
    const uint2* q = reinterpret_cast<const uint2*>(p);
#pragma unroll
    for (int i = 0; i < kWords / 2; ++i) {
      const uint2 x = kStreaming ? __ldcs(q + i) : q[i];
      w[2 * i] = x.x;
      w[2 * i + 1] = x.y;
    }
  } else if (sizeof(T) == 4 || bytes == 4) {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = kStreaming ? __ldcs(q + i) : q[i];
  } else {  // 2-byte elements, one at a time
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      const uint32_t lo = kStreaming ? __ldcs(q + 2 * i) : q[2 * i];
      const uint32_t hi = kStreaming ? __ldcs(q + 2 * i + 1) : q[2 * i + 1];
      w[i] = lo | (hi << 16);
    }
  }
  Pack<T, VEC> v;
  make_raw(v.raw, w);
  return v;
}

// store_pack for an address aligned only to `part` elements (see load_pack_parts).
template <typename T, int VEC>
FASTKD_DEV void store_pack_parts(T* p, const float (&g)[VEC], int part) {
  constexpr int kWords = Pack<T, VEC>::kWords;
  uint32_t w[kWords];
  pack_words<T, VEC>(g, w);
  const int bytes = part * int(sizeof(T));
  if (bytes >= 8) {
    uint2* q = reinterpret_cast<uint2*>(p);
#pragma unroll
    for (int i = 0; i < kWords / 2; ++i) __stcs(q + i, make_uint2(w[2 * i], w[2 * i + 1]));
  } else if (sizeof(T) == 4 || bytes == 4) {
    unsigned int* q = reinterpret_cast<unsigned int*>(p);
#pragma unroll
    for (int i = 0; i < kWords; ++i) __stcs(q + i, w[i]);
  } else {
    unsigned short* q = reinterpret_cast<unsigned short*>(p);
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      __stcs(q + 2 * i, static_cast<unsigned short>(w[i] & 0xffffu));
      __stcs(q + 2 * i + 1, static_cast<unsigned short>(w[i] >> 16));
    }
  }
}

// The columns at which a row's packs start: pack i covers columns [i*VEC - lead, ...),
// with `lead` the row's offset from the previous 16-byte boundary (0 for VEC = 1).
template <typename T, int VEC>
FASTKD_DEV int row_lead(const T* row) {
  return VEC == 1 ? 0 : int((reinterpret_cast<uintptr_t>(row) / sizeof(T)) & (VEC - 1));
}

// row[begin, end) = value, 16-byte stores in the aligned middle.
template <typename T>
FASTKD_DEV void fill_span(T* row, int64_t begin, int64_t end, float value, int tid, int nthreads) {
  if (begin >= end) return;
  using Bits = typename Elem<T>::Bits;
  constexpr int VEC = 16 / int(sizeof(T));
  Bits* r = reinterpret_cast<Bits*>(row);
  const Bits b = Elem<T>::bits(value);
  const int64_t to_aligned = int64_t((16 - (reinterpret_cast<uintptr_t>(row + begin) & 15)) & 15) / int64_t(sizeof(T));
  const int64_t body = begin + (to_aligned < end - begin ? to_aligned : end - begin);
  for (int64_t c = begin + tid; c < body; c += nthreads) r[c] = b;
  const int64_t n_packs = (end - body) / VEC;
  float g[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] = value;
  for (int64_t i = tid; i < n_packs; i += nthreads) store_pack<T, VEC>(row + body + i * VEC, g);
  for (int64_t c = body + n_packs * VEC + tid; c < end; c += nthreads) r[c] = b;
}

// ---------------------------------------------------------------------------------------
// The logit transforms (kd_params.h: scale_s, cap_s, ...): x' = cap tanh(scale x / cap), or
// scale x without a cap, applied to each element as it is widened, before the temperature.

// tanh(y) and 1 - tanh(y)^2. With E = e^(-2|y|) in [0, 1] (one ex2) and one reciprocal,
//     tanh|y| = (1 - E) / (1 + E),        1 - tanh(y)^2 = 4 E / (1 + E)^2,
// but 1 - E cancels for small |y|: its error is absolute (~2e-7), which a softcap far
// above the logits (s' = cap tanh(s / cap) ~ s, errors of cap * 2e-7) would turn into
// errors of 1e-3 in the softmax at cap = 1e4. Below |y| = 0.55 (tanh = 0.5) an odd
// polynomial y + y^3 Q(y^2) takes over, fitted to tanh on [0, 0.55] for relative error
// (max 1e-9 in exact arithmetic; the coefficients were fitted for fastkd: Taylor's
// -1/3, 2/15, ... to as many terms is off by 2.7e-6 at 0.55). In an fp32 emulation with
// ex2's and rcp's worst-case errors against float64: tanh within 6.6e-8 relative below
// 0.55 and 4.5e-7 above, the derivative within 2.3e-6 relative everywhere (where
// 1 - tanh^2 formed from a rounded tanh loses 4.6e-5 at |y| = 3: the gradient of a
// saturated top logit); forward KL's gradient at cap 30 (V = 20001) within 3e-6 of
// float64, against 1.5e-6 for an exact tanh rounded to fp32. |y| -> inf gives E = 0:
// tanh = +-1 and a derivative of 0, never inf / inf (a -inf logit under a softcap becomes
// -cap, finite, as in the reference); NaN stays NaN. tanh.approx.f32 (one MUFU op) is
// off by ~5e-4: far too coarse for the fp32 tolerance. Cost: two MUFU ops (EX2, RCP) and
// ~16 others, both branches computed and one selected (a divergent branch would be worse).
// The _rn intrinsics keep the compiler from contracting it differently where it is
// inlined twice: the cluster kernel relies on max s' being bitwise the s' of the row's
// maximum.
FASTKD_DEV float tanh_and_derivative(float y, float& derivative) {
  const float ay = fabsf(y);
  const float e = ex2(__fmul_rn(ay, -2.0f * kLog2e));
  const float r = rcp(__fadd_rn(1.0f, e));
  derivative = __fmul_rn(__fmul_rn(4.0f * e, r), r);
  const float big = copysignf(__fmul_rn(__fsub_rn(1.0f, e), r), y);
  const float y2 = __fmul_rn(y, y);
  float q = -6.273641764e-03f;
  q = __fmaf_rn(q, y2, 2.107128642e-02f);
  q = __fmaf_rn(q, y2, -5.385222218e-02f);
  q = __fmaf_rn(q, y2, 1.333258538e-01f);
  q = __fmaf_rn(q, y2, -3.333331754e-01f);
  const float small = __fmaf_rn(__fmul_rn(y2, y), q, y);
  return ay < 0.55f ? small : big;
}

// One side's transform of x, and dx'/dx into `d`: scale x, then cap tanh(. / cap) where
// cap > 0 (inv_cap = 1 / cap). x * 1 is exact, so scale 1 without a cap is the identity.
FASTKD_DEV float transform_logit(float x, float scale, float cap, float inv_cap, float& d) {
  const float y = __fmul_rn(x, scale);
  if (cap == 0.f) {
    d = scale;
    return y;
  }
  float th_d;
  const float th = tanh_and_derivative(__fmul_rn(y, inv_cap), th_d);
  d = __fmul_rn(scale, th_d);
  return __fmul_rn(cap, th);
}

FASTKD_DEV float student_logit(float x, const KDParams& p) {
  float unused;
  return transform_logit(x, p.scale_s, p.cap_s, p.inv_cap_s, unused);
}

// Lanes j of a pack starting at column col0 that are columns of the row [0, V), as bits.
template <int VEC>
FASTKD_DEV uint32_t live_lanes(int64_t col0, int64_t V) {
  constexpr uint32_t kAll = (1u << VEC) - 1u;
  if (col0 >= 0 && col0 + VEC <= V) return kAll;
  uint32_t live = 0u;
#pragma unroll
  for (int j = 0; j < VEC; ++j) live |= (col0 + j >= 0 && col0 + j < V) ? 1u << j : 0u;
  return live;
}

template <int VEC>
constexpr uint32_t all_lanes() { return (1u << VEC) - 1u; }

// The logits a kernel computes with, element by element: the loaded values (kOptions
// false: the default instances, whose code is what it was before the options), or each
// side's transform (the identity, exactly, for a side without one). A column outside the
// row is loaded as -inf and must stay -inf (absent from every sum), where the softcap
// would make it -cap: `live` (live_lanes) says which lanes are the row's. The transform is
// monotone, so a pack's transformed maximum is the transform of its maximum (max_s /
// max_t: one transform per U packs, not per element).
template <bool kOptions>
struct Logits {
  const KDParams& p;

  FASTKD_DEV float s(float x, uint32_t live, int j) const {
    float unused;
    return s(x, live, j, unused);
  }
  // The student's s' and ds'/ds (the chain factor of its gradient).
  FASTKD_DEV float s(float x, uint32_t live, int j, float& d) const {
    if constexpr (!kOptions) {
      return x;
    } else {
      const float y = transform_logit(x, p.scale_s, p.cap_s, p.inv_cap_s, d);
      return (live >> j) & 1u ? y : FASTKD_NEG_INF;
    }
  }
  FASTKD_DEV float t(float x, uint32_t live, int j) const {
    if constexpr (!kOptions) {
      return x;
    } else {
      float unused;
      const float y = transform_logit(x, p.scale_t, p.cap_t, p.inv_cap_t, unused);
      return (live >> j) & 1u ? y : FASTKD_NEG_INF;
    }
  }
  // Of a pack's maximum, taken over the loaded values. A pack wholly outside the row has
  // maximum -inf, which a cap makes -cap: still <= every s' of the row, so a harmless
  // reference point for a thread's (empty) partial sums.
  FASTKD_DEV float max_s(float m) const {
    if constexpr (!kOptions) return m;
    else return student_logit(m, p);
  }
  FASTKD_DEV float max_t(float m) const {
    if constexpr (!kOptions) {
      return m;
    } else {
      float unused;
      return transform_logit(m, p.scale_t, p.cap_t, p.inv_cap_t, unused);
    }
  }
};

// ---------------------------------------------------------------------------------------
// Phase row_stats: (max, sum 2^(x c - max c)) of both sides, plus the CE term's T = 1 sum
// and, for forward KL, sum_i 2^(t_i c - mt c) (t_i - s_i), which gives
//     KL(p||q) = ln2 (c A / zt - (lt - ls))
// without a second sweep: sum p (log2 p - log2 q) = sum p (t - s) c - (lt - ls).

// The row statistics of RowStats (kd_params.h) in this file's units: maxima of the raw
// logits (not divided by T) and base-2 sums at scale c = log2(e) / T, plus forward KL's
// A. Partial over any part of a row; combine() merges two parts.
struct RowStatsBase2 {
  float ms, zs;   // max_i s_i; sum_i 2^((s_i - ms) c)
  float mt, zt;   // max_i t_i; sum_i 2^((t_i - mt) c)
  float zraw;     // sum_i 2^((s_i - ms) log2 e)            (CE softmax at T = 1)
  float a;        // sum_i 2^((t_i - mt) c) (t_i - s_i)       (forward KL only)
                  // or, kStudentA (the vocab-parallel reverse KL's value term):
                  // sum_i 2^((s_i - ms) c) (s_i - t_i)
};

FASTKD_DEV RowStatsBase2 empty_stats() { return RowStatsBase2{FASTKD_NEG_INF, 0.f, FASTKD_NEG_INF, 0.f, 0.f, 0.f}; }

// m * scale as the reference point of a sum-exp, 0 for an all -inf (empty) part so that
// its -inf elements give 2^-inf = 0 rather than NaN.
FASTKD_DEV float ref_point(float m, float scale) { return m == FASTKD_NEG_INF ? 0.f : m * scale; }

// Factor that moves a sum-exp from reference max m to M >= m. Exactly 1 when m == M
// (both -inf included); NaN when m is NaN, so NaN rows stay NaN.
FASTKD_DEV float rescale(float m, float M, float scale) { return m == M ? 1.f : ex2((m - M) * scale); }

// x*fx + y*fy, rounded so that swapping the operands gives the same bits (no FMA
// contraction): butterfly reductions then leave every lane with identical values.
FASTKD_DEV float scaled_sum(float x, float fx, float y, float fy) {
  return __fadd_rn(__fmul_rn(x, fx), __fmul_rn(y, fy));
}

template <bool kStudentA = false>
FASTKD_DEV void combine(RowStatsBase2& x, const RowStatsBase2& y, float c) {
  const float ms = fmaxf(x.ms, y.ms), mt = fmaxf(x.mt, y.mt);
  const float fxs = rescale(x.ms, ms, c), fys = rescale(y.ms, ms, c);
  const float fxt = rescale(x.mt, mt, c), fyt = rescale(y.mt, mt, c);
  const float fxr = rescale(x.ms, ms, kLog2e), fyr = rescale(y.ms, ms, kLog2e);
  x.zs = scaled_sum(x.zs, fxs, y.zs, fys);
  x.zt = scaled_sum(x.zt, fxt, y.zt, fyt);
  x.zraw = scaled_sum(x.zraw, fxr, y.zraw, fyr);
  x.a = kStudentA ? scaled_sum(x.a, fxs, y.a, fys) : scaled_sum(x.a, fxt, y.a, fyt);
  x.ms = ms;
  x.mt = mt;
}

FASTKD_DEV RowStatsBase2 shfl_xor(const RowStatsBase2& v, int lane_mask) {
  RowStatsBase2 r;
  r.ms = __shfl_xor_sync(0xffffffffu, v.ms, lane_mask);
  r.zs = __shfl_xor_sync(0xffffffffu, v.zs, lane_mask);
  r.mt = __shfl_xor_sync(0xffffffffu, v.mt, lane_mask);
  r.zt = __shfl_xor_sync(0xffffffffu, v.zt, lane_mask);
  r.zraw = __shfl_xor_sync(0xffffffffu, v.zraw, lane_mask);
  r.a = __shfl_xor_sync(0xffffffffu, v.a, lane_mask);
  return r;
}

// Butterfly reduction over the lanes of a warp: every lane ends with the same bits, and
// every CTA of a cluster reducing the same partials derives the same row constants.
template <bool kStudentA = false>
FASTKD_DEV void warp_combine(RowStatsBase2& v, float c, int width = 32) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1)
    if (off < width) combine<kStudentA>(v, shfl_xor(v, off), c);
}

FASTKD_DEV float4 operator+(const float4& x, const float4& y) {
  return make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
}

FASTKD_DEV float4 warp_sum(float4 v, int width = 32) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    if (off < width) {
      v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
      v.z += __shfl_xor_sync(0xffffffffu, v.z, off);
      v.w += __shfl_xor_sync(0xffffffffu, v.w, off);
    }
  }
  return v;
}

// Block-wide reductions through a [32] shared scratch (one slot per warp); every thread
// gets the result. Each scratch array is used once per row.
template <bool kStudentA = false>
FASTKD_DEV RowStatsBase2 block_combine(RowStatsBase2 v, float c, RowStatsBase2* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  warp_combine<kStudentA>(v, c);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : empty_stats();
  warp_combine<kStudentA>(v, c);
  return v;
}

FASTKD_DEV float4 block_sum(float4 v, float4* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < n_warps ? scratch[lane] : make_float4(0.f, 0.f, 0.f, 0.f);
  return warp_sum(v);
}

// Accumulates U pack pairs into a thread's running statistics: the maximum over all of
// them first, one rescale of the running sums, then one exponential per element and side
// (the online softmax, chunked so the rescale is paid once per U packs).
// kStudentA: the value term `a` on the student's side (RowStatsBase2).
// L, live: the logits' transforms and each pack's lanes in the row (Logits). With the
// options, also label smoothing's sum of s' over the row's lanes into sum_s (where s' is
// at hand: a sweep of its own recomputed the transform, or, in the cluster kernel, kept
// the row's transformed values alive between the two, spilling).
template <bool kRaw, bool kA, int U, typename TS, typename TT, int VEC, bool kStudentA = false, bool kOptions>
FASTKD_DEV void row_stats_add(RowStatsBase2& st, const Pack<TS, VEC> (&sp)[U], const Pack<TT, VEC> (&tp)[U], float c,
                              const Logits<kOptions>& L, const uint32_t (&live)[U], float& sum_s) {
  float ms = st.ms, mt = st.mt;
  if constexpr (kOptions) {  // one transform per side for the U packs
    float xs = FASTKD_NEG_INF, xt = FASTKD_NEG_INF;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      xs = fmaxf(xs, sp[u].max());
      xt = fmaxf(xt, tp[u].max());
    }
    ms = fmaxf(ms, L.max_s(xs));
    mt = fmaxf(mt, L.max_t(xt));
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      ms = fmaxf(ms, sp[u].max());
      mt = fmaxf(mt, tp[u].max());
    }
  }
  st.zs *= rescale(st.ms, ms, c);
  st.zt *= rescale(st.mt, mt, c);
  if (kRaw) st.zraw *= rescale(st.ms, ms, kLog2e);
  if (kA) st.a *= kStudentA ? rescale(st.ms, ms, c) : rescale(st.mt, mt, c);
  st.ms = ms;
  st.mt = mt;
  const float rs = ref_point(ms, c), rt = ref_point(mt, c), rr = ref_point(ms, kLog2e);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float s = L.s(sp[u].get(j), live[u], j), t = L.t(tp[u].get(j), live[u], j);
      if constexpr (kOptions) sum_s += (live[u] >> j) & 1u ? s : 0.f;
      const float es = ex2(fmaf(s, c, -rs));
      st.zs += es;
      const float et = ex2(fmaf(t, c, -rt));
      st.zt += et;
      if (kRaw) st.zraw += ex2(fmaf(s, kLog2e, -rr));
      // == 0, not > 0: NaN must propagate
      if (kA && kStudentA) st.a += es == 0.f ? 0.f : es * (s - t);
      else if (kA) st.a += et == 0.f ? 0.f : et * (t - s);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Per-row constants once the statistics are known (the end of row_stats), then the
// row_sums and write_grad phases' per-element math.

struct RowConsts {
  float c;          // log2(e) / T
  float ls, lt;     // log2 q_i = s_i c - ls, log2 p_i = t_i c - lt
  float lraw;       // log2 r_i = s_i log2(e) - lraw (CE softmax)
  float lb2, l1b2;  // log2(beta), log2(1 - beta)                  (jsd)
  float beta;
  float gdiv;       // grad_scale * div_weight / T: multiplies dD/da
  float gce;        // grad_scale * ce_weight: multiplies softmax(s) - onehot
  bool ce;          // a CE term is mixed in
  bool raw_is_q;    // T == 1: the CE softmax is q itself
  uint32_t opaque_zero;  // 0, from a kernel argument the compiler cannot see through (Pack::get)
  // The terms at T = 1 with the options (kd_params.h), read by the kOptions instances only.
  bool hard;        // CE or z-loss: softmax(s') enters the gradient (and sum_raw the statistics)
  bool smooth;      // label-smoothed CE: eps/V sum_i s'_i enters the loss
  float graw;       // grad_scale * c_raw, c_raw = ce_weight + 2 z_loss lse': multiplies softmax(s')
  float ghot;       // grad_scale * ce_weight * (1 - eps): the label's one-hot
  float gsmooth;    // grad_scale * ce_weight * eps / V: subtracted at every column
};

// The parts of RowConsts that depend only on the loss parameters, not on the row.
FASTKD_DEV void set_param_consts(RowConsts& k, const KDParams& p, float grad_scale) {
  k.lb2 = p.log_beta * kLog2e;
  k.l1b2 = p.log_one_minus_beta * kLog2e;
  k.beta = p.beta;
  k.gdiv = grad_scale * p.div_weight * p.inv_temperature;
  k.gce = grad_scale * p.ce_weight;
  k.ce = p.ce_weight != 0.0f;
  k.opaque_zero = static_cast<uint32_t>(p.vocab_size >> 62);  // vocab_size < 2^62
  k.smooth = k.ce && p.label_smoothing > 0.0f;
  k.hard = k.ce || p.z_loss != 0.0f;
  k.ghot = k.gce * (1.0f - p.label_smoothing);
  k.gsmooth = k.smooth ? k.gce * p.smooth_per_class : 0.0f;
}

// lse' = log sum_i exp(s'_i) of the row, in nats, from lraw.
FASTKD_DEV float row_lse(const RowConsts& k) { return kLn2 * k.lraw; }

// The parts that depend on the row's lse' (k.lraw known): the z-loss's 2 z_loss lse'.
FASTKD_DEV void set_raw_consts(RowConsts& k, const KDParams& p, float grad_scale) {
  k.graw = p.z_loss != 0.0f ? fmaf(grad_scale * 2.0f * p.z_loss, row_lse(k), k.gce) : k.gce;
}

// From statistics this launch computed (raw maxima).
FASTKD_DEV RowConsts row_consts(const RowStatsBase2& st, const KDParams& p, float grad_scale) {
  RowConsts k;
  k.c = kLog2e * p.inv_temperature;
  k.ls = ref_point(st.ms, k.c) + lg2(st.zs);
  k.lt = ref_point(st.mt, k.c) + lg2(st.zt);
  k.raw_is_q = p.temperature == 1.0f;
  k.lraw = k.raw_is_q ? k.ls : ref_point(st.ms, kLog2e) + lg2(st.zraw);
  set_param_consts(k, p, grad_scale);
  set_raw_consts(k, p, grad_scale);
  return k;
}

// From caller-supplied statistics (RowStats layout, natural units: max of s/T).
FASTKD_DEV RowConsts row_consts_given(const float* r, const KDParams& p, float grad_scale) {
  RowConsts k;
  k.c = kLog2e * p.inv_temperature;
  k.ls = r[0] * kLog2e + lg2(r[1]);
  k.lt = r[2] * kLog2e + lg2(r[3]);
  k.raw_is_q = p.temperature == 1.0f;
  k.lraw = k.raw_is_q ? k.ls : (p.temperature * r[0]) * kLog2e + lg2(r[4]);
  set_param_consts(k, p, grad_scale);
  set_raw_consts(k, p, grad_scale);
  return k;
}

// An entry with q > kPeak is "big" (the peaked-row formula of ddiv). Not 1/2: two tied
// entries of exact mass 1/2 each can both round above 1/2, and the formula, which assumes
// at most one big entry, then gave them a zero gradient. 2^-10 is far above q's rounding
// (~1e-6), so at most one entry exceeds kPeak; entries in (1/2, kPeak] take the direct
// h - sum q h, which cancels there (3/4 instead doubled JSD's error at T = 0.5 in an fp32
// emulation). The same threshold as fastkd/triton_kd.py.
constexpr float kPeak = 0.5f + 0.0009765625f;

// Phase row_sums: the row sums that reverse_kl / jsd / tvd need before any gradient can be
// written, packed in a float4 (small: q <= kPeak, big: q > kPeak):
//   reverse_kl, jsd:  (sum_small q, sum_small q h, sum_big q h, w)
//       kBigQ:   w = sum_big q (the two-pass kernel; JSD's sum p log2(p/m) is then
//                accumulated by its write_grad sweep)
//       !kBigQ:  w = JSD's sum p log2(p/m), 0 for reverse_kl (the cluster kernel, which
//                gets sum_big q from the row maximum)
//   tvd:              (sum |p - q| / 2, sum_{q>p} q, sum_{q<p} q, sum_{q=p} q)
template <Divergence DIV, bool kBigQ>
FASTKD_DEV void row_sums_add(float4& acc, float s, float t, const RowConsts& k) {
  const float lq = fmaf(s, k.c, -k.ls), lp = fmaf(t, k.c, -k.lt);
  const float q = ex2(lq);
  if constexpr (DIV == Divergence::TVD) {
    const float d = q - ex2(lp);
    acc.x += 0.5f * fabsf(d);
    acc.y += d > 0.f ? q : 0.f;
    acc.z += d < 0.f ? q : 0.f;
    acc.w += d == 0.f ? q : 0.f;
  } else {
    float h;
    if constexpr (DIV == Divergence::JSD) {
      const float lm = log2_add_exp2(lp + k.lb2, lq + k.l1b2);
      if constexpr (!kBigQ) {
        const float pt = ex2(lp);
        acc.w += pt == 0.f ? 0.f : pt * (lp - lm);
      }
      h = q == 0.f ? 0.f : kLn2 * (lq - lm);
    } else {
      h = q == 0.f ? 0.f : kLn2 * (lq - lp);
    }
    const float qh = q * h;
    const bool big = q > kPeak;
    acc.x += big ? 0.f : q;
    acc.y += big ? 0.f : qh;
    acc.z += big ? qh : 0.f;
    if constexpr (kBigQ) acc.w += big ? q : 0.f;
  }
}

// acc + x with the rounding error of the sum kept in err (Knuth's TwoSum, exact for any
// magnitudes; the _rn intrinsics keep the compiler from reassociating or contracting).
FASTKD_DEV void two_sum_add(float& acc, float& err, float x) {
  const float s = __fadd_rn(acc, x);
  const float bb = __fsub_rn(s, acc);
  err = __fadd_rn(err, __fadd_rn(__fsub_rn(acc, __fsub_rn(s, bb)), __fsub_rn(x, bb)));
  acc = s;
}

FASTKD_DEV void two_sum_add(float4& acc, float4& err, const float4& x) {
  two_sum_add(acc.x, err.x, x.x);
  two_sum_add(acc.y, err.y, x.y);
  two_sum_add(acc.z, err.z, x.z);
  two_sum_add(acc.w, err.w, x.w);
}

// The centring constants of reverse_kl / jsd from their row sums (row_sums_add's layout) and
// sum_big q: (sum_small q / M, sum_small q h / M, sum q h / M, sum q h), M = sum q.
// M is the mass of the fp32 q that this code computed, not 1: each q_i carries the
// rounding of its exponent s_i c - ls (~|log2 q_i| ulps), so M = 1 + O(1e-6), and centring
// with sum q h shifts every h_i - sum q h by (1 - M) sum q h. Where the gradient is small
// against h (JSD: h saturates at log 1/(1-beta) on the student's mass; low T) that shift
// was the largest fp32 error. Divided by M the centring is invariant to a common shift of
// h, as the exact gradient is. Emulated in fp32 against float64: docs/cuda_kernels.md (unmeasured on
// a GPU).
// kFirstOrder: x / M as x - x (M - 1); M - 1 is exact and ~1e-6, so the neglected
// x (M - 1)^2 is far below fp32's resolution when the row statistics are the row's own
// (the cluster kernel, which always computes them: three correctly rounded divisions cost
// it a register spill). Otherwise correctly rounded divisions (the two-pass kernel, which
// may be given the statistics).
template <bool kFirstOrder>
FASTKD_DEV float4 centring(const float4& tot, float big_q) {
  const float mass = tot.x + big_q;
  const float qh = tot.y + tot.z;
  if constexpr (kFirstOrder) {
    const float d = mass - 1.0f;
    return make_float4(fmaf(-tot.x, d, tot.x), fmaf(-tot.y, d, tot.y), fmaf(-qh, d, qh), qh);
  } else {
    return make_float4(__fdiv_rn(tot.x, mass), __fdiv_rn(tot.y, mass), __fdiv_rn(qh, mass), qh);
  }
}

// D(p, q) of the row (not forward_kl, which the kernels get otherwise): TVD from its
// sums; reverse_kl and jsd from sum q h (centring(...).w) and JSD's sum p log2(p/m).
template <Divergence DIV>
FASTKD_DEV float divergence_from_sums(const float4& tot, float qh, float pm, const RowConsts& k) {
  if constexpr (DIV == Divergence::TVD) return tot.x;
  else if constexpr (DIV == Divergence::JSD) return k.beta * kLn2 * pm + (1.0f - k.beta) * qh;
  else return qh;
}

// dD/da for one element; also returns q for the CE term. `tot`: TVD's row sums, or the
// centring constants of reverse_kl / jsd (centring()).
// kSumKL (the two-pass kernel's write_grad sweep): forward KL also accumulates
// (sum p (t - s), sum p) into `kl`, from which KL(p||q) = ln2 (c sum p (t - s) - (lt - ls) sum p);
// JSD accumulates sum p log2(p/m) into kl.x.
template <Divergence DIV, bool kSumKL = false>
FASTKD_DEV float ddiv(float s, float t, const RowConsts& k, const float4& tot, float& q_out, float4& kl) {
  const float lq = fmaf(s, k.c, -k.ls), lp = fmaf(t, k.c, -k.lt);
  const float q = ex2(lq);
  q_out = q;
  if constexpr (DIV == Divergence::ForwardKL) {
    const float pt = ex2(lp);
    if (kSumKL) {
      kl.x += pt == 0.f ? 0.f : pt * (t - s);
      kl.y += pt;
    }
    return q - pt;
  } else if constexpr (DIV == Divergence::TVD) {
    const float d = q - ex2(lp);
    // h_i - sum_j q_j h_j as masses of the other signs (exact).
    // tot.x (the divergence, <= 1) minus itself is 0 unless the row holds a NaN, which
    // the sign comparisons would otherwise drop.
    const float g = d > 0.f ? tot.z + 0.5f * tot.w : (d < 0.f ? -(tot.y + 0.5f * tot.w) : 0.5f * (tot.z - tot.y));
    return q * (g + (tot.x - tot.x));
  } else {
    float h;
    if constexpr (DIV == Divergence::JSD) {
      const float lm = log2_add_exp2(lp + k.lb2, lq + k.l1b2);
      if (kSumKL) {
        const float pt = ex2(lp);
        kl.x += pt == 0.f ? 0.f : pt * (lp - lm);
      }
      h = q == 0.f ? 0.f : kLn2 * (lq - lm);
    } else {
      h = q == 0.f ? 0.f : kLn2 * (lq - lp);
    }
    const float centred = q > kPeak ? h * tot.x - tot.y : h - tot.z;
    const float scale = DIV == Divergence::JSD ? 1.0f - k.beta : 1.0f;
    return scale * q * centred;
  }
}

// write_grad_pack with the options (kOptions), one fused loop per element (a transform, the
// divergence, the terms at T = 1, the chain factor), so that no per-lane array lives across
// loops (holding s', ds'/ds and q for a second loop, as the plain path does for q, spilled
// the two-pass kernel at 64 registers). kHard: the terms at T = 1 are on (RowConsts::hard),
// in their general form, which for the plain CE term (graw = ghot = gce, gsmooth = 0) is
// gce r - gce in one rounding at the label, as exact as the plain path's gce (r - 1); a
// third variant for it cost the cluster kernel a third more compile time. kSumKL: kl.z
// also accumulates the sum of s' over the row's lanes (read only when smoothing).
template <Divergence DIV, bool kSumKL, int kForm, bool kHard, typename TS, typename TT, int VEC>
FASTKD_DEV void write_grad_pack_options(float (&g)[VEC], const Pack<TS, VEC>& sp, const Pack<TT, VEC>& tp,
                                        const RowConsts& k, const Logits<true>& L, uint32_t live, const float4& tot,
                                        int64_t label_lane, float4& kl) {
  const bool has_label = uint64_t(label_lane) < uint64_t(VEC);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float d, q;
    const float s = L.s(sp.template get<kForm>(j, k.opaque_zero), live, j, d);
    float gj = k.gdiv * ddiv<DIV, kSumKL>(s, L.t(tp.template get<kForm>(j, k.opaque_zero), live, j), k, tot, q, kl);
    if constexpr (kSumKL) kl.z += (live >> j) & 1u ? s : 0.f;
    if constexpr (kHard) {
      const float r = k.raw_is_q ? q : ex2(fmaf(s, kLog2e, -k.lraw));
      // graw r - target in one rounding: the label entry of a confident row cancels.
      gj = fmaf(k.graw, r, -(has_label && j == label_lane ? k.ghot + k.gsmooth : k.gsmooth)) + gj;
    }
    g[j] = gj * d;
  }
}

// Phase write_grad, one pack, in fp32 for the caller to store: with the options' terms
// (kd_params.h),
//     dL/ds'_i = gdiv dD/da_i + graw softmax(s')_i - ghot [i = label] - gsmooth
// times ds'/ds; without the options (kOptions false: the code before them) the CE term is
// gce (softmax(s) - onehot).
// `label_lane` is label - col0 (the one-hot lands in this pack when it is in [0, VEC)).
// `live`: the pack's lanes in the row (Logits). kSumKL (the two-pass kernel's write_grad
// sweep): also accumulates the value terms of ddiv into kl, and with the options label
// smoothing's sum of s' over the row into kl.z. kHard (the options only): -1 the terms at
// T = 1 chosen here, per pack (k.hard); 0 or 1 chosen by the caller for the whole sweep (the
// two-pass kernel: its 64 registers spilled 136 bytes with the choice per pack, which ptxas
// if-converted).
template <Divergence DIV, bool kSumKL = false, int kForm = 1, int kHard = -1, bool kOptions, typename TS, typename TT,
          int VEC>
FASTKD_DEV void write_grad_pack(float (&g)[VEC], const Pack<TS, VEC>& sp, const Pack<TT, VEC>& tp, const RowConsts& k,
                                const Logits<kOptions>& L, uint32_t live, const float4& tot, int64_t label_lane,
                                float4& kl) {
  if constexpr (kOptions && kHard >= 0) {
    write_grad_pack_options<DIV, kSumKL, kForm, kHard == 1>(g, sp, tp, k, L, live, tot, label_lane, kl);
  } else if constexpr (kOptions) {
    if (k.hard) write_grad_pack_options<DIV, kSumKL, kForm, true>(g, sp, tp, k, L, live, tot, label_lane, kl);
    else write_grad_pack_options<DIV, kSumKL, kForm, false>(g, sp, tp, k, L, live, tot, label_lane, kl);
  } else {
    float q[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      g[j] = k.gdiv * ddiv<DIV, kSumKL>(sp.template get<kForm>(j, k.opaque_zero),
                                        tp.template get<kForm>(j, k.opaque_zero), k, tot, q[j], kl);
    if (k.ce) {
      const bool has_label = uint64_t(label_lane) < uint64_t(VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float r = k.raw_is_q ? q[j] : ex2(fmaf(sp.template get<kForm>(j, k.opaque_zero), kLog2e, -k.lraw));
        // The one-hot is subtracted before the product so the label entry is rounded once.
        g[j] = fmaf(k.gce, (has_label && j == label_lane) ? r - 1.0f : r, g[j]);
      }
    }
  }
}

// write_grad_pack's terms at T = 1 for one column, for the kernels that write column by
// column (kd_sparse.cu): with the options g + graw r - ghot [label] - gsmooth, else the
// plain CE term.
template <bool kOptions>
FASTKD_DEV float add_hard_label_grad(float g, float r, bool is_label, const RowConsts& k) {
  if constexpr (!kOptions) return fmaf(k.gce, is_label ? r - 1.0f : r, g);
  else return fmaf(k.graw, r, -(is_label ? k.ghot + k.gsmooth : k.gsmooth)) + g;
}

// The row's loss terms at T = 1 (kd_params.h), added to `loss`:
//     ce_weight (lse' - (1 - eps) s'_y - [eps > 0] eps/V sum_i s'_i) + [z_loss != 0] z_loss lse'^2
// `sum_s`: sum_i s'_i over the row's columns (read only when smoothing).
// Without kOptions, the plain CE term.
template <bool kOptions>
FASTKD_DEV float add_hard_label_loss(float loss, const RowConsts& k, const KDParams& p, float s_label, float sum_s) {
  const float lse = row_lse(k);
  if constexpr (!kOptions) {
    if (k.ce) loss += p.ce_weight * (lse - s_label);
  } else {
    if (k.ce) {
      float ce = lse - (1.0f - p.label_smoothing) * s_label;
      if (k.smooth) ce -= p.smooth_per_class * sum_s;
      loss += p.ce_weight * ce;
    }
    if (p.z_loss != 0.f) loss += p.z_loss * lse * lse;
  }
  return loss;
}

// ---------------------------------------------------------------------------------------
// Per-token diagnostics (return_stats; kd_params.h: kStatsWidth), written by the kStats
// instances from the sweep in which they form q and p (no pass of their own). Per element:
//   H(q) = -sum q ln q = -ln2 sum q log2 q,  log2 q = s c - ls (the lq of row_sums_add)
//   H(p) = -ln2 sum p log2 p
// (lse - sum q a, the same value, would cancel in fp32 when the logits are large: at s ~ 1e3
// it loses 1e-4 absolute), and each side's argmax as the LOWEST column holding the row's
// maximum ms / mt from row_stats. Those maxima are elements of the row bit for bit (a
// pack's maximum is one of its values, and with the options the transform of the maximum
// is computed as the transform of each element: kd_device.cuh's _rn transform), so the
// argmax needs one compare per element and its reductions a minimum of columns: a tie goes
// to the lower column whatever the order in which threads, warps or CTAs combine
// (torch.argmax's rule, fastkd/stats.py). Columns are 32-bit (kMaxStatsVocab).

constexpr uint32_t kNoColumn = 0xffffffffu;

struct TokenStats {
  float hq, hp;           // sum q log2 q, sum p log2 p over this thread's columns (bits, <= 0)
  uint32_t arg_s, arg_t;  // the lowest column seen holding ms / mt; kNoColumn: none
};

FASTKD_DEV TokenStats empty_token_stats() { return TokenStats{0.f, 0.f, kNoColumn, kNoColumn}; }

// x log2 x from l = log2 x; 0 where x = 0 (-inf logits are legal), NaN stays NaN.
FASTKD_DEV float xlog2x(float l) {
  const float x = ex2(l);
  return x == 0.f ? 0.f : x * l;
}

// `col` holds the maximum m: the running lowest such column. `live`: col is a column of the
// row (a lane outside it reads -inf, which an all -inf row's maximum would match).
FASTKD_DEV void argmax_add(uint32_t& arg, float x, float m, uint32_t col, bool live) {
  if (live && x == m) arg = min(arg, col);
}

// The entropies' terms of one column (s, t the transformed logits).
FASTKD_DEV void entropy_add(TokenStats& ts, float s, float t, const RowConsts& k) {
  ts.hq += xlog2x(fmaf(s, k.c, -k.ls));
  ts.hp += xlog2x(fmaf(t, k.c, -k.lt));
}

// One column of both sides, entropies and argmax (ms, mt the row's maxima).
FASTKD_DEV void token_stats_add(TokenStats& ts, float s, float t, const RowConsts& k, float ms, float mt, uint32_t col,
                                bool live) {
  entropy_add(ts, s, t, k);
  argmax_add(ts.arg_s, s, ms, col, live);
  argmax_add(ts.arg_t, t, mt, col, live);
}

// A thread's running argmax over a sweep (the two-pass kernel's row_stats): after
// row_stats_add moved its running maxima from (ms0, mt0) to st's, the lowest column of the
// U packs (pack u starting at column col0[u]) holding them; a column found before is dropped
// when its side's maximum grew. After the block's combine, a thread whose own maximum is
// the row's holds its lowest column of the row's maximum.
template <int U, typename TS, typename TT, int VEC, bool kOptions>
FASTKD_DEV void argmax_track(TokenStats& ts, float ms0, float mt0, const RowStatsBase2& st,
                             const Pack<TS, VEC> (&sp)[U], const Pack<TT, VEC> (&tp)[U], const Logits<kOptions>& L,
                             const uint32_t (&live)[U], const uint32_t (&col0)[U]) {
  if (st.ms != ms0) ts.arg_s = kNoColumn;
  if (st.mt != mt0) ts.arg_t = kNoColumn;
#pragma unroll
  for (int u = 0; u < U; ++u)
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const bool in_row = (live[u] >> j) & 1u;
      argmax_add(ts.arg_s, L.s(sp[u].get(j), live[u], j), st.ms, col0[u] + j, in_row);
      argmax_add(ts.arg_t, L.t(tp[u].get(j), live[u], j), st.mt, col0[u] + j, in_row);
    }
}

FASTKD_DEV TokenStats warp_reduce(TokenStats v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) {
    v.hq += __shfl_xor_sync(0xffffffffu, v.hq, off);
    v.hp += __shfl_xor_sync(0xffffffffu, v.hp, off);
  }
  v.arg_s = __reduce_min_sync(0xffffffffu, v.arg_s);
  v.arg_t = __reduce_min_sync(0xffffffffu, v.arg_t);
  return v;
}

// The block's TokenStats in every thread, through a [32] shared scratch used once per row.
FASTKD_DEV TokenStats block_reduce(TokenStats v, TokenStats* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_reduce(lane < n_warps ? scratch[lane] : empty_token_stats());
}

// A row's diagnostics (kStatsWidth floats): H(p) or the sparse teacher's mass P, H(q) (nats),
// the agreement, D before div_weight, and Q (0 for a dense teacher). The agreement may be
// stored apart (store_agreement), the others then by store_token_sums.
FASTKD_DEV void store_agreement(float* o, bool agree) { o[2] = agree ? 1.f : 0.f; }

FASTKD_DEV void store_token_sums(float* o, float teacher, float hq_bits, float divergence, float student_mass) {
  o[0] = teacher;
  o[1] = -kLn2 * hq_bits;
  o[3] = divergence;
  o[4] = student_mass;
}

FASTKD_DEV void store_token_stats(float* o, float teacher, float hq_bits, bool agree, float divergence,
                                  float student_mass) {
  store_token_sums(o, teacher, hq_bits, divergence, student_mass);
  store_agreement(o, agree);
}

// A row without diagnostics: ignored (labels == ignore_index), or a row whose loss is NaN
// (a label outside the vocabulary, a sparse teacher's bad ids): NaN, agreement 0.
FASTKD_DEV void store_blank_token_stats(float* o) {
  const float nan = __int_as_float(0x7fc00000);
  store_token_stats(o, nan, nan, false, nan, nan);
}

// ---------------------------------------------------------------------------------------
// Per-row label handling shared by the kernels.

enum class RowKind : int { Normal = 0, Ignored = 1, BadLabel = 2 };

// kShard (the vocab-parallel write_grad): labels are global ids and the row is the slice
// starting at vocab_start; a label outside it is another slice's (label -1: no one-hot).
// A template flag, so the other kernels' code is what it was.
template <bool kShard = false>
FASTKD_DEV RowKind classify_row(const int64_t* labels, int64_t row, const KDParams& p, int64_t vocab_start,
                                int64_t& label) {
  label = -1;
  if (labels == nullptr) return RowKind::Normal;
  label = labels[row];
  if (label == p.ignore_index) return RowKind::Ignored;  // zero loss, zero gradient
  if constexpr (kShard) {
    label -= vocab_start;
    if (label < 0 || label >= p.vocab_size) label = -1;
    return RowKind::Normal;
  }
  if (label < 0 || label >= p.vocab_size) return RowKind::BadLabel;  // NaN marks the row, never a number
  return RowKind::Normal;
}

// Row `row` of a launch: where its student, teacher and gradient rows start, and its
// label (-1 without labels) and kind.
template <typename TS, typename TT, bool kShard = false>
struct LaunchRow {
  const TS* s;
  const TT* t;
  TS* g;
  int64_t label;
  RowKind kind;
  FASTKD_DEV LaunchRow(const KDLaunch& a, int64_t row)
      : s(static_cast<const TS*>(a.student) + row * a.s_stride),
        t(static_cast<const TT*>(a.teacher) + row * a.t_stride),
        g(static_cast<TS*>(a.grad) + row * a.g_stride),
        kind(classify_row<kShard>(a.labels, row, a.p, a.vocab_start, label)) {}
};

template <typename T>
FASTKD_DEV float load_elem(const T* p) {
  return Elem<T>::lo(uint32_t(*reinterpret_cast<const typename Elem<T>::Bits*>(p)));
}

FASTKD_DEV float row_fill_value(RowKind kind) { return kind == RowKind::Ignored ? 0.f : __int_as_float(0x7fc00000); }

}  // namespace dev
}  // namespace cuda
}  // namespace fastkd
