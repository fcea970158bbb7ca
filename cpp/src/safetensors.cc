#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace rtllm {

namespace {

// Safetensors limits the header to 100 MB; anything larger is a corrupt length field.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

Weight parse_entry(const std::string& path, const std::string& name, const Json& entry, uint64_t data_size) {
  auto fail = [&](const std::string& why) -> void {
    throw Error(detail::concat("corrupt safetensors file ", path, ": tensor \"", name, "\": ", why));
  };
  if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
      !entry.contains("data_offsets"))
    fail("entry needs dtype, shape and data_offsets");
  Weight w;
  w.name = name;
  try {
    w.dtype = parse_dtype(entry.at("dtype").as_string());
  } catch (const Error& e) {
    fail(e.what());
  }
  int64_t numel = 1;
  for (const Json& d : entry.at("shape").as_array()) {
    int64_t dim = d.as_int();
    if (dim < 0 || (dim > 0 && numel > (int64_t{1} << 48) / dim)) fail("invalid shape");
    w.shape.push_back(dim);
    numel *= dim;
  }
  const Json& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2) fail("data_offsets must be [begin, end]");
  int64_t begin = offsets.at(0).as_int(), end = offsets.at(1).as_int();
  if (begin < 0 || end < begin) fail(detail::concat("invalid data_offsets [", begin, ", ", end, "]"));
  if (static_cast<uint64_t>(end) > data_size)
    fail(detail::concat("data_offsets end ", end, " is past the data size ", data_size, " (truncated file?)"));
  uint64_t expected = dtype_num_bytes(w.dtype, numel);
  if (static_cast<uint64_t>(end - begin) != expected)
    fail(detail::concat("byte range of ", end - begin, " bytes does not match its shape and dtype (", expected,
                        " bytes)"));
  w.data = reinterpret_cast<const void*>(static_cast<uintptr_t>(begin));  // rebased by the caller
  w.num_bytes = static_cast<size_t>(expected);
  return w;
}

// Packed int4 tensors are stored as uint8 bytes [..., K / 2] and listed by the metadata key
// "packed_int4" (a JSON list of names): they become kInt4 tensors of their logical shape [..., K].
void mark_packed_int4(const std::string& path, const Json& metadata, std::vector<Weight>& tensors) {
  if (!metadata.is_object() || !metadata.contains("packed_int4")) return;
  auto fail = [&](const std::string& why) {
    throw Error(detail::concat("corrupt safetensors file ", path, ": metadata packed_int4: ", why));
  };
  const Json& value = metadata.at("packed_int4");
  if (!value.is_string()) fail("must be a JSON list of tensor names in a string");
  Json names;
  try {
    names = Json::parse(value.as_string());
  } catch (const Error& e) {
    fail(e.what());
  }
  if (!names.is_array()) fail("must be a JSON list of tensor names");
  for (const Json& name : names.as_array()) {
    if (!name.is_string()) fail("must be a JSON list of tensor names");
    auto it = std::find_if(tensors.begin(), tensors.end(), [&](const Weight& w) { return w.name == name.as_string(); });
    if (it == tensors.end()) fail(detail::concat("names \"", name.as_string(), "\", which the file does not hold"));
    if (it->dtype != DataType::kUInt8 || it->shape.empty())
      fail(detail::concat("tensor \"", it->name, "\" must be stored as U8 bytes, it is ",
                          dtype_safetensors_name(it->dtype)));
    it->dtype = DataType::kInt4;
    it->shape.back() *= 2;
  }
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(detail::concat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw Error(detail::concat("cannot stat ", path, ": ", std::strerror(err)));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    throw Error(detail::concat("truncated safetensors file ", path, ": ", map_size_, " bytes, no header"));
  }
  map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw Error(detail::concat("cannot map ", path, ": ", std::strerror(err)));
  }
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
    if (header_len > kMaxHeaderBytes || header_len > map_size_ - 8)
      throw Error(detail::concat("truncated or corrupt safetensors file ", path, ": header length ", header_len,
                                 " but the file has ", map_size_, " bytes"));
    Json header;
    try {
      header = Json::parse(std::string(reinterpret_cast<const char*>(bytes + 8), header_len));
    } catch (const Error& e) {
      throw Error(detail::concat("corrupt safetensors header in ", path, ": ", e.what()));
    }
    if (!header.is_object()) throw Error(detail::concat("corrupt safetensors header in ", path, ": not an object"));
    const uint8_t* data = bytes + 8 + header_len;
    uint64_t data_size = map_size_ - 8 - header_len;
    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") continue;
      try {
        tensors_.push_back(parse_entry(path, name, entry, data_size));
      } catch (const Error& e) {
        if (std::string(e.what()).find(path) != std::string::npos) throw;
        throw Error(detail::concat("corrupt safetensors file ", path, ": tensor \"", name, "\": ", e.what()));
      }
    }
    if (header.contains("__metadata__")) mark_packed_int4(path, header.at("__metadata__"), tensors_);
    // Ranges may not overlap: sort a copy by begin and compare neighbours.
    std::vector<std::pair<size_t, size_t>> ranges;  // (begin, index)
    for (size_t i = 0; i < tensors_.size(); ++i)
      ranges.emplace_back(reinterpret_cast<uintptr_t>(tensors_[i].data), i);
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
      const Weight& prev = tensors_[ranges[i - 1].second];
      if (ranges[i - 1].first + prev.num_bytes > ranges[i].first)
        throw Error(detail::concat("corrupt safetensors file ", path, ": tensors \"", prev.name, "\" and \"",
                                   tensors_[ranges[i].second].name, "\" overlap"));
    }
    for (Weight& w : tensors_) w.data = data + reinterpret_cast<uintptr_t>(w.data);
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

}  // namespace rtllm
