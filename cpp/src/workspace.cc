#include "workspace.h"

#include <algorithm>
#include <cstdlib>
#include <utility>

#include "rtllm/common.h"

namespace rtllm {

HostBuffer::HostBuffer(size_t num_bytes) {
  data_ = std::aligned_alloc(kBufferAlignment, round_up(std::max<size_t>(num_bytes, 1), kBufferAlignment));
  RTLLM_CHECK(data_, "cannot allocate ", num_bytes, " bytes of host memory");
}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  std::swap(data_, o.data_);
  return *this;
}

HostBuffer::~HostBuffer() { std::free(data_); }

std::vector<size_t> plan_arena(const std::vector<ArenaRequest>& requests, size_t* total_bytes) {
  std::vector<size_t> order(requests.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return requests[a].num_bytes > requests[b].num_bytes; });
  std::vector<size_t> offsets(requests.size(), 0);
  std::vector<size_t> placed;  // request indices
  size_t total = 0;
  for (size_t i : order) {
    const ArenaRequest& r = requests[i];
    const size_t num_bytes = round_up(r.num_bytes, kBufferAlignment);
    std::vector<size_t> live;  // placed requests alive at the same time as r, by offset
    for (size_t p : placed)
      if (requests[p].first_use <= r.last_use && r.first_use <= requests[p].last_use) live.push_back(p);
    std::sort(live.begin(), live.end(), [&](size_t a, size_t b) { return offsets[a] < offsets[b]; });
    size_t offset = 0;
    for (size_t p : live) {
      if (offset + num_bytes <= offsets[p]) break;  // fits in the gap below p
      offset = std::max(offset, offsets[p] + round_up(requests[p].num_bytes, kBufferAlignment));
    }
    offsets[i] = offset;
    total = std::max(total, offset + num_bytes);
    placed.push_back(i);
  }
  *total_bytes = total;
  return offsets;
}

}  // namespace rtllm
