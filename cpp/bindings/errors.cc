#include <pybind11/pybind11.h>

#include "bindings.h"
#include "rtllm/common.h"

namespace py = pybind11;

namespace rtllm::bindings {

void bind_errors(py::module_& m) {
  static py::exception<Error> rtllm_error(m, "RtllmError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const Error& e) {
      py::set_error(rtllm_error, e.what());
    }
  });
}

}  // namespace rtllm::bindings
