// One bind_* function per area; module.cc calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace rtllm::bindings {
void bind_errors(pybind11::module_& m);
void bind_communicator(pybind11::module_& m);  // Communicator, mpi_world_communicator
void bind_engine(pybind11::module_& m);    // Engine, RuntimeConfig, ModelRunner
void bind_executor(pybind11::module_& m);  // configs, Request, Response, Executor
#ifdef RTLLM_WITH_CUDA
void bind_kernels(pybind11::module_& m);   // rtllm._core.kernels: CUDA launchers (tests, benchmarks)
#endif
void bind_attention_kernels(pybind11::module_& kernels_module);  // rtllm._core.kernels attention (CUDA builds)
void bind_fp8_kernels(pybind11::module_& kernels_module);  // rtllm._core.kernels fp8_linear (CUDA builds)
void bind_int8_kernels(pybind11::module_& kernels_module);  // rtllm._core.kernels int8_linear (CUDA builds)
}  // namespace rtllm::bindings
