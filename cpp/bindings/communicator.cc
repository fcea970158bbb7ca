// Bindings for the tensor-parallel Communicator: mpi_available, mpi_world_communicator and the
// collectives on numpy arrays (tests, and a Python driver that shares step inputs between ranks).
#include <chrono>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "rtllm/communicator.h"

namespace py = pybind11;

namespace rtllm::bindings {

namespace {

// The collectives block until every rank joins: the GIL is released so that the other Python threads
// of this process (an executor's callbacks) keep running meanwhile.
void all_reduce_sum(Communicator& comm, py::array array) {
  RTLLM_CHECK_ARG(array.dtype().is(py::dtype::of<float>()), "all_reduce_sum needs a float32 array, got ",
                  std::string(py::str(array.dtype())));
  RTLLM_CHECK_ARG(array.flags() & py::array::c_style, "all_reduce_sum needs a C-contiguous array (it sums in place)");
  RTLLM_CHECK_ARG(array.writeable(), "all_reduce_sum needs a writeable array (it sums in place)");
  float* data = static_cast<float*>(array.mutable_data());
  const int64_t count = array.size();
  py::gil_scoped_release release;
  comm.all_reduce_sum(data, count);
}

// Every rank's x (same shape on all) stacked on the root: [size, *x.shape]; None on the other ranks.
py::object gather(Communicator& comm, py::array_t<float, py::array::c_style | py::array::forcecast> x, int32_t root) {
  std::vector<py::ssize_t> shape{comm.size()};
  for (py::ssize_t d = 0; d < x.ndim(); ++d) shape.push_back(x.shape(d));
  const bool is_root = comm.rank() == root;
  py::array_t<float> out(is_root ? shape : std::vector<py::ssize_t>{0});
  const float* send = x.data();
  float* recv = is_root ? out.mutable_data() : nullptr;
  const int64_t count = x.size();
  {
    py::gil_scoped_release release;
    comm.gather(send, recv, count, root);
  }
  if (!is_root) return py::none();
  return std::move(out);
}

// root's bytes on every rank (the argument is read on the root only). idle: broadcast_wait (no timeout
// while the root lives).
py::bytes broadcast(Communicator& comm, const py::object& data, int32_t root, bool idle) {
  std::vector<uint8_t> bytes;
  if (comm.rank() == root) {
    RTLLM_CHECK_ARG(!data.is_none(), "broadcast: the root (rank ", root, ") must pass the bytes to send");
    const std::string s = data.cast<std::string>();
    bytes.assign(s.begin(), s.end());
  }
  {
    py::gil_scoped_release release;
    if (idle) {
      comm.broadcast_wait(&bytes, root);
    } else {
      comm.broadcast(&bytes, root);
    }
  }
  return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace

void bind_communicator(py::module_& m) {
  m.def("mpi_available", &mpi_available, "True when this build has the MPI communicator");
  m.def("mpi_world_communicator", &mpi_world_communicator, py::call_guard<py::gil_scoped_release>(),
        "The Communicator over MPI_COMM_WORLD (initialises MPI on the first call); RtllmError in a build "
        "without MPI");
  m.def("mpi_spawn", &mpi_spawn, py::arg("count"), py::arg("argv"), py::call_guard<py::gil_scoped_release>(),
        "Starts count processes running argv through MPI_Comm_spawn; returns the group's Communicator, this "
        "process rank 0");
  m.def("mpi_parent_communicator", &mpi_parent_communicator, py::call_guard<py::gil_scoped_release>(),
        "In a process mpi_spawn started: the group's Communicator (the parent is rank 0); else None");
  m.def(
      "socket_listen",
      [] {
        int32_t port = 0;
        const int fd = socket_listen(&port);
        return py::make_tuple(fd, port);
      },
      "Rank 0 of a group over local TCP sockets (hosts without MPI): (listening socket, port)");
  m.def(
      "socket_accept",
      [](int fd, int32_t size, double timeout_s) {
        return socket_accept(fd, size, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0)));
      },
      py::arg("listen_fd"), py::arg("size"), py::arg("timeout_s") = 60.0, py::call_guard<py::gil_scoped_release>(),
      "Rank 0: waits for the size - 1 other ranks to connect; the group's Communicator");
  m.def(
      "socket_connect",
      [](int32_t port, int32_t rank, int32_t size, double timeout_s) {
        return socket_connect(port, rank, size, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000.0)));
      },
      py::arg("port"), py::arg("rank"), py::arg("size"), py::arg("timeout_s") = 60.0,
      py::call_guard<py::gil_scoped_release>(), "Rank 1 .. size - 1: joins rank 0's group; the group's Communicator");
  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def("all_reduce_sum", &all_reduce_sum, py::arg("array"), "Sums a float32 array over the ranks, in place")
      .def("gather", &gather, py::arg("array"), py::arg("root") = 0,
           "Every rank's array stacked [size, *shape] on the root; None elsewhere")
      .def(
          "broadcast", [](Communicator& c, const py::object& data, int32_t root) { return broadcast(c, data, root, false); },
          py::arg("data"), py::arg("root") = 0, "root's bytes on every rank (data is read on the root only)")
      .def(
          "broadcast_wait",
          [](Communicator& c, const py::object& data, int32_t root) { return broadcast(c, data, root, true); },
          py::arg("data"), py::arg("root") = 0,
          "broadcast without a timeout as long as the root lives (a receiver that waits idle)")
      .def_property(
          "timeout_s", [](const Communicator& c) { return c.timeout().count() / 1000.0; },
          [](Communicator& c, double seconds) {
            RTLLM_CHECK_ARG(seconds > 0 && seconds < 1e7, "timeout_s must be in (0, 1e7), got ", seconds);
            c.set_timeout(std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0)));
          },
          "How long a collective may wait for the other ranks before the group is declared lost")
      .def("barrier", &Communicator::barrier, py::call_guard<py::gil_scoped_release>())
      .def("disconnect", &Communicator::disconnect, py::call_guard<py::gil_scoped_release>(),
           "Ends the group (every rank calls it): a barrier, then the processes are no longer connected, so "
           "that each finalises MPI on its own at exit; later calls raise")
      .def("__repr__", [](const Communicator& c) {
        return detail::concat("Communicator(rank=", c.rank(), ", size=", c.size(), ")");
      });
}

}  // namespace rtllm::bindings
