// A read-only, memory-mapped safetensors file: 8-byte little-endian header length, a JSON header
// {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then raw data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "rtllm/engine.h"

namespace rtllm {

class SafetensorsFile {
 public:
  // Maps `path` and validates every entry (known dtype, shape matching the byte range, ranges inside
  // the file and not overlapping). Throws Error naming the file for a missing, truncated or corrupt one.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // In header order; `data` points into the mapping, valid while this object lives.
  const std::vector<Weight>& tensors() const { return tensors_; }

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::vector<Weight> tensors_;
};

}  // namespace rtllm
