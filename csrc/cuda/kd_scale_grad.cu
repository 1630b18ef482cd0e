/*
 * Backward of the fused loss: grad[r, :] *= grad_output (a scalar, or one factor per row
 * for reduction="none"), in place, in the gradient's dtype.
 *
 * The forward kernels already folded the reduction's scale into the stored gradient, so
 * the usual `loss.backward()` passes grad_output == 1 and there is nothing to do. The
 * factor lives in device memory: reading it on the host would synchronise the stream
 * (breaking CUDA graphs and torch.compile), so every CTA reads it here and returns at
 * once when it is exactly 1. The launch itself costs a few microseconds.
 */
#include "../dispatch.h"
#include "kd_device.cuh"

namespace fastkd {
namespace cuda {
namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // rows are strided over at most this many CTAs

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(T* grad, int64_t n_rows, int64_t width, int64_t stride,
                                                              const float* factor, int64_t factor_stride) {
  constexpr int VEC = 16 / int(sizeof(T));
  if (factor_stride == 0 && factor[0] == 1.0f) return;  // the common case: no pass at all
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const float f = factor[row * factor_stride];
    if (f == 1.0f) continue;
    T* g = grad + row * stride;
    const int lead = row_lead<T, VEC>(g);
    const int64_t packs = (width + lead + VEC - 1) / VEC;
    for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
      const int64_t col0 = i * VEC - lead;
      const bool full = col0 >= 0 && col0 + VEC <= width;
      const Pack<T, VEC> v = full ? load_pack<T, VEC, true>(g + col0) : load_pack_masked<T, VEC>(g, col0, width);
      float out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = v.get(j) * f;
      if (full) store_pack<T, VEC>(g + col0, out);
      else store_pack_masked<T, VEC>(g, col0, width, out);
    }
  }
}

template <typename T>
cudaError_t launch_typed(void* grad, int64_t n_rows, int64_t width, int64_t stride, const float* factor,
                         int64_t factor_stride, cudaStream_t stream) {
  const int64_t blocks = n_rows < kMaxBlocks ? n_rows : kMaxBlocks;
  scale_grad_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<T*>(grad), n_rows, width,
                                                                              stride, factor, factor_stride);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scale_grad(void* grad, ElemType type, int64_t n_rows, int64_t width, int64_t stride,
                              const float* factor, int64_t factor_stride, cudaStream_t stream) {
  if (n_rows <= 0 || width <= 0) return cudaSuccess;
  FASTKD_ELEM_TYPE_SWITCH(type, T, return launch_typed<T>(grad, n_rows, width, stride, factor, factor_stride, stream));
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastkd
