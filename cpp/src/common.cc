#include "rtllm/common.h"

namespace rtllm::detail {

void throw_error(const char* file, int line, const char* func, const std::string& msg) {
  throw Error(concat(msg, " (", file, ":", line, " in ", func, ")"));
}

void throw_invalid_argument(const std::string& msg, const char* field) { throw InvalidArgument(msg, field); }

}  // namespace rtllm::detail
