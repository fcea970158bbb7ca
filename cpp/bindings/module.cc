#include "bindings.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "rtllm C++ core";
  rtllm::bindings::bind_errors(m);
  rtllm::bindings::bind_communicator(m);
  rtllm::bindings::bind_engine(m);
  rtllm::bindings::bind_executor(m);
#ifdef RTLLM_WITH_CUDA
  rtllm::bindings::bind_kernels(m);
#endif
}
