// One bind_* function per area; module.cc calls them in order.
#pragma once

#include <pybind11/pybind11.h>

namespace rtllm::bindings {
void bind_errors(pybind11::module_& m);
void bind_engine(pybind11::module_& m);    // Engine, RuntimeConfig, ModelRunner
void bind_executor(pybind11::module_& m);  // configs, Request, Response, Executor
}  // namespace rtllm::bindings
