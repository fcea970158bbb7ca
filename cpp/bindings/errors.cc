#include <pybind11/pybind11.h>

#include "bindings.h"
#include "rtllm/common.h"

namespace py = pybind11;

namespace rtllm::bindings {

// rtllm::InvalidArgument becomes rtllm.errors.InvalidArgumentError (a ValueError, defined in Python
// so that Python-side checks raise the same type) with C++'s message and field; any other
// rtllm::Error becomes rtllm.RtllmError.
void bind_errors(py::module_& m) {
  static py::exception<Error> rtllm_error(m, "RtllmError", PyExc_RuntimeError);
  // Never destroyed: the translator may run until the interpreter's last moment.
  static py::handle invalid_argument_error =
      py::object(py::module_::import("rtllm.errors").attr("InvalidArgumentError")).release();
  m.attr("InvalidArgumentError") = invalid_argument_error;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      py::object field = e.field().empty() ? py::object(py::none()) : py::object(py::str(e.field()));
      py::object error = invalid_argument_error(e.what(), field);
      PyErr_SetObject(invalid_argument_error.ptr(), error.ptr());
    } catch (const Error& e) {
      py::set_error(rtllm_error, e.what());
    }
  });
}

}  // namespace rtllm::bindings
