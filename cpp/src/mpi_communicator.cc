// The Communicator over MPI: ranks are the processes of one `mpirun`. Builds without MPI keep the entry
// points and refuse at the first call, so that the Python module and the C++ API are the same in every
// build.
#include "rtllm/communicator.h"

#ifdef RTLLM_WITH_MPI

// The C API only: without these, mpi.h pulls in the deprecated C++ bindings, whose library (libmpi_cxx)
// MPI::MPI_C does not link.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <mutex>

namespace rtllm {

namespace {

// MPI returns its error codes (MPI_ERRORS_RETURN below); each becomes an Error naming the call.
void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  RTLLM_CHECK(false, call, " failed: ", len > 0 ? std::string(text, len) : std::string("unknown MPI error"),
              " (error code ", rc, ")");
}

// MPI may be used only between MPI_Init and MPI_Finalize; a call outside aborts the process whatever
// the error handler, so it is refused here first.
void require_mpi_live(const char* call) {
  int finalized = 0;
  check_mpi(MPI_Finalized(&finalized), "MPI_Finalized");
  RTLLM_CHECK(!finalized, call, ": MPI was already finalized");
}

const char* thread_level_name(int level) {
  switch (level) {
    case MPI_THREAD_SINGLE: return "MPI_THREAD_SINGLE";
    case MPI_THREAD_FUNNELED: return "MPI_THREAD_FUNNELED";
    case MPI_THREAD_SERIALIZED: return "MPI_THREAD_SERIALIZED";
    case MPI_THREAD_MULTIPLE: return "MPI_THREAD_MULTIPLE";
    default: return "an unknown thread level";
  }
}

// MPI counts are int: larger buffers go in pieces of at most INT_MAX elements.
constexpr int64_t kMaxChunk = INT_MAX;

class MpiCommunicator final : public Communicator {
 public:
  // comm: a duplicate of MPI_COMM_WORLD, so that these collectives never match the application's own
  // messages on MPI_COMM_WORLD (nor change its error handler).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  int32_t rank() const override { return rank_; }
  int32_t size() const override { return size_; }

  void all_reduce_sum(float* data, int64_t count) override {
    RTLLM_CHECK(count >= 0 && (data != nullptr || count == 0), "all_reduce_sum: count ", count, " must be >= 0 "
                "with a buffer");
    std::lock_guard<std::mutex> lock(mutex_);
    require_mpi_live("MPI_Allreduce");
    for (int64_t done = 0; done < count; done += kMaxChunk) {
      const int n = static_cast<int>(std::min(kMaxChunk, count - done));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, data + done, n, MPI_FLOAT, MPI_SUM, comm_), "MPI_Allreduce");
    }
  }

  void gather(const float* send, float* recv, int64_t count, int32_t root) override {
    RTLLM_CHECK(root >= 0 && root < size_, "gather: root ", root, " outside [0, ", size_, ")");
    // One message per rank: recv holds size * count floats at the root, addressed with int counts.
    RTLLM_CHECK(count >= 0 && count * size_ <= kMaxChunk, "gather: count ", count, " x ", size_,
                " ranks exceeds the ", kMaxChunk, " floats one MPI_Gather can address");
    RTLLM_CHECK(rank_ != root || recv != nullptr || count == 0, "gather: the root needs a receive buffer");
    std::lock_guard<std::mutex> lock(mutex_);
    require_mpi_live("MPI_Gather");
    const int n = static_cast<int>(count);
    check_mpi(MPI_Gather(send, n, MPI_FLOAT, rank_ == root ? recv : nullptr, n, MPI_FLOAT, root, comm_),
              "MPI_Gather");
  }

  void broadcast(std::vector<uint8_t>* bytes, int32_t root) override {
    RTLLM_CHECK(bytes != nullptr, "broadcast needs a byte vector");
    RTLLM_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " outside [0, ", size_, ")");
    std::lock_guard<std::mutex> lock(mutex_);
    require_mpi_live("MPI_Bcast");
    // The size first, so that the receivers can make room.
    uint64_t size = bytes->size();
    check_mpi(MPI_Bcast(&size, 1, MPI_UINT64_T, root, comm_), "MPI_Bcast");
    if (rank_ != root) bytes->resize(size);
    for (uint64_t done = 0; done < size; done += kMaxChunk) {
      const int n = static_cast<int>(std::min<uint64_t>(kMaxChunk, size - done));
      check_mpi(MPI_Bcast(bytes->data() + done, n, MPI_BYTE, root, comm_), "MPI_Bcast");
    }
  }

  void barrier() override {
    std::lock_guard<std::mutex> lock(mutex_);
    require_mpi_live("MPI_Barrier");
    check_mpi(MPI_Barrier(comm_), "MPI_Barrier");
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  // Under MPI_THREAD_SERIALIZED no two MPI calls may overlap: this process's collectives go one at a time.
  std::mutex mutex_;
};

// Registered only when rtllm initialised MPI: an application that did owns its finalization.
void finalize_at_exit() {
  int finalized = 0;
  if (MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
}

std::shared_ptr<Communicator> create_world_communicator() {
  int initialized = 0;
  check_mpi(MPI_Initialized(&initialized), "MPI_Initialized");
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    // The steps run on an executor's loop thread, not on the thread that initialises MPI here:
    // MPI_THREAD_SERIALIZED is the least level that allows it (calls from any thread, one at a time);
    // MULTIPLE is asked for in case the application makes its own calls from other threads.
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
    std::atexit(finalize_at_exit);
  } else {
    require_mpi_live("mpi_world_communicator");
    check_mpi(MPI_Query_thread(&provided), "MPI_Query_thread");
  }
  RTLLM_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI provides ", thread_level_name(provided),
              "; rtllm needs at least MPI_THREAD_SERIALIZED (steps run on a thread other than the one that "
              "initialised MPI)", initialized ? ": initialise MPI with MPI_Init_thread(MPI_THREAD_MULTIPLE)" : "");
  MPI_Comm comm = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "MPI_Comm_dup");
  // Errors return to the caller (and become an Error naming the call) instead of aborting every rank
  // with MPI's default MPI_ERRORS_ARE_FATAL.
  check_mpi(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  return std::make_shared<MpiCommunicator>(comm);
}

}  // namespace

bool mpi_available() { return true; }

std::shared_ptr<Communicator> mpi_world_communicator() {
  static std::mutex mutex;
  static std::shared_ptr<Communicator> world;
  std::lock_guard<std::mutex> lock(mutex);
  if (!world) world = create_world_communicator();
  return world;
}

}  // namespace rtllm

#else  // !RTLLM_WITH_MPI

namespace rtllm {

bool mpi_available() { return false; }

std::shared_ptr<Communicator> mpi_world_communicator() {
  throw Error("mpi_world_communicator: rtllm was built without MPI (rebuild with an MPI implementation "
              "installed, e.g. Debian's openmpi-bin libopenmpi-dev, and RTLLM_MPI=AUTO or ON)");
}

}  // namespace rtllm

#endif  // RTLLM_WITH_MPI
