// Shared basics of the rtllm C++ API: the export macro, the error type and RTLLM_CHECK.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(_WIN32)
#define RTLLM_API __declspec(dllexport)
#else
#define RTLLM_API __attribute__((visibility("default")))
#endif

namespace rtllm {

// The one error type of the library. Python sees it as rtllm.RtllmError.
class RTLLM_API Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An argument a caller passed is invalid (an out-of-range value, an unknown name).
// The message names the value and the limit; field() names the offending field (e.g. "top_p",
// "stop_token_ids") when one is to blame, else it is empty. Python sees it as
// rtllm.InvalidArgumentError, a ValueError whose `field` attribute is field() (None if empty).
class RTLLM_API InvalidArgument : public Error {
 public:
  explicit InvalidArgument(const std::string& message, std::string field = {})
      : Error(message), field_(std::move(field)) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
[[noreturn]] RTLLM_API void throw_error(const char* file, int line, const char* func, const std::string& msg);
[[noreturn]] RTLLM_API void throw_invalid_argument(const std::string& msg, const char* field = "");
}  // namespace detail

}  // namespace rtllm

// Internal invariant or environment failure: throws rtllm::Error with file, line and function.
#define RTLLM_CHECK(cond, ...)                                                                  \
  do {                                                                                          \
    if (!(cond))                                                                                \
      ::rtllm::detail::throw_error(__FILE__, __LINE__, __func__,                                \
                                   ::rtllm::detail::concat("check failed: " #cond ": ", __VA_ARGS__)); \
  } while (0)

// Invalid caller input: throws rtllm::InvalidArgument with the message alone (it is read by users).
#define RTLLM_CHECK_ARG(cond, ...)                                                      \
  do {                                                                                  \
    if (!(cond)) ::rtllm::detail::throw_invalid_argument(::rtllm::detail::concat(__VA_ARGS__)); \
  } while (0)

// Invalid value of one named field: as RTLLM_CHECK_ARG, and the error's field() is `field`.
#define RTLLM_CHECK_FIELD(cond, field, ...)                                                      \
  do {                                                                                           \
    if (!(cond))                                                                                 \
      ::rtllm::detail::throw_invalid_argument(::rtllm::detail::concat(__VA_ARGS__), field);      \
  } while (0)
