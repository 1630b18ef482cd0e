// See grad_buffer_cache.h for why this exists.
#include "grad_buffer_cache.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastkd {
namespace cpu {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;  // below this the allocator's own reuse is enough
constexpr size_t kHugePage = size_t(2) << 20;

size_t capacity_from_env() {
  const char* v = std::getenv("FASTKD_CPU_GRAD_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  const long long mb = std::atoll(v);
  return mb <= 0 ? 0 : static_cast<size_t>(mb) << 20;
}

// Whole huge pages, so that transparent huge pages (madvise mode) can back the buffer.
size_t round_up(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

void* map_buffer(size_t bytes) {
#ifdef __linux__
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
#else
  return std::aligned_alloc(kHugePage, bytes);
#endif
}

void unmap_buffer(void* p, size_t bytes) {
#ifdef __linux__
  munmap(p, bytes);
#else
  (void)bytes;
  std::free(p);
#endif
}

struct Block {
  void* ptr;
  size_t bytes;
};

class Cache {
 public:
  // A cached block of at least `bytes` (and at most twice that, so a small request does
  // not pin a huge block), else a new mapping.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= bytes && b <= 2 * bytes && (best == free_.size() || b < free_[best].bytes)) best = i;
      }
      if (best != free_.size()) {
        Block blk = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        held_ -= blk.bytes;
        return blk;
      }
    }
    return Block{map_buffer(bytes), bytes};
  }

  // Keeps a freed block if it fits in the capacity, evicting the oldest ones first.
  void give_back(Block blk) {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (blk.bytes > capacity_) {
        evicted.push_back(blk);
      } else {
        while (held_ + blk.bytes > capacity_ && !free_.empty()) {
          evicted.push_back(free_.front());
          held_ -= free_.front().bytes;
          free_.erase(free_.begin());
        }
        free_.push_back(blk);
        held_ += blk.bytes;
      }
    }
    for (const Block& b : evicted) unmap_buffer(b.ptr, b.bytes);
  }

  size_t clear() {
    std::vector<Block> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(free_);
      held_ = 0;
    }
    size_t total = 0;
    for (const Block& b : all) {
      total += b.bytes;
      unmap_buffer(b.ptr, b.bytes);
    }
    return total;
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

  size_t capacity() const { return capacity_; }

 private:
  std::mutex mu_;
  std::vector<Block> free_;
  size_t held_ = 0;
  const size_t capacity_ = capacity_from_env();
};

// Never destroyed: tensors may outlive static destruction at interpreter exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

struct Deleter {
  static void release(void* ctx) {
    Block* blk = static_cast<Block*>(ctx);
    cache().give_back(*blk);
    delete blk;
  }
};

}  // namespace

at::Tensor cached_empty(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(rows) * static_cast<size_t>(cols) * options.dtype().itemsize();
  if (bytes < kMinBytes || cache().capacity() == 0) return at::empty({rows, cols}, options);
  Block blk = cache().take(round_up(bytes));
  if (blk.ptr == nullptr) return at::empty({rows, cols}, options);
  Block* owned = new Block(blk);
  at::DataPtr data(blk.ptr, owned, &Deleter::release, at::Device(at::kCPU));
  at::Storage storage(at::Storage::use_byte_size_t(), blk.bytes, std::move(data), /*allocator=*/nullptr,
                      /*resizable=*/false);
  at::Tensor t = at::empty({0}, options).set_(storage, 0, {rows, cols}, {cols, 1});
  return t;
}

size_t empty_grad_buffer_cache() { return cache().clear(); }

size_t grad_buffer_cache_bytes() { return cache().held(); }

}  // namespace cpu
}  // namespace fastkd
