// Host memory for the CPU runner: aligned buffers, and the activation arena plan that lets tensors
// whose lifetimes do not overlap share bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace rtllm {

constexpr size_t kBufferAlignment = 64;

inline size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// A 64-byte aligned, uninitialized host allocation; movable, frees on destruction.
class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t num_bytes);  // throws Error if the allocation fails
  HostBuffer(HostBuffer&& o) noexcept : data_(o.data_) { o.data_ = nullptr; }
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  ~HostBuffer();
  void* data() const { return data_; }

 private:
  void* data_ = nullptr;
};

// A tensor to place in the arena: written by node first_use, last read by node last_use.
struct ArenaRequest {
  size_t num_bytes;
  size_t first_use;
  size_t last_use;
};

// Offsets (multiples of kBufferAlignment) such that two tensors whose [first_use, last_use]
// intervals intersect never share bytes; largest first, each at the lowest offset that fits.
// Sets *total_bytes to the arena size.
std::vector<size_t> plan_arena(const std::vector<ArenaRequest>& requests, size_t* total_bytes);

}  // namespace rtllm
