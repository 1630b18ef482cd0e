// A small cache of large CPU buffers for the gradients the fused kernels return.
//
// A fresh gradient of many MiB is newly mmap'd memory, and the first touch of each page
// costs a fault: on the 2-core VMs measured that was 40-80% of the whole loss call (a
// fresh 62.5 MiB buffer took 23-90 ms to fill, a reused one 8 ms). Training loops free
// the gradient during backward and ask for one of the same size at the next step, so
// keeping the freed buffers (as PyTorch's CUDA caching allocator does on the GPU) turns
// those faults into a hit. The cache holds at most `capacity` bytes of freed buffers
// (FASTKD_CPU_GRAD_CACHE_MB, default 1024; 0 turns it off); `empty()` releases them.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace fastkd {
namespace cpu {

// An uninitialised [rows, cols] tensor with `options`, whose storage comes from the cache
// when it is large enough to matter.
at::Tensor cached_empty(int64_t rows, int64_t cols, const at::TensorOptions& options);

// Releases every cached buffer; returns the bytes released.
size_t empty_grad_buffer_cache();

// Bytes currently held by freed buffers in the cache.
size_t grad_buffer_cache_bytes();

}  // namespace cpu
}  // namespace fastkd
