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

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

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

// Set when a group broke: MPI_Finalize would wait for ranks that are gone.
std::atomic<bool> any_group_lost{false};

// MPI counts are int: larger buffers go in pieces of at most INT_MAX elements.
constexpr int64_t kMaxChunk = INT_MAX;

// Where a rank's process lives: what the waits need to tell a dead rank from a slow one.
struct Peer {
  int64_t pid = 0;
  uint64_t host = 0;  // a hash of the host name
};

uint64_t host_hash() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  return std::hash<std::string>()(name);
}

bool process_alive(int64_t pid) { return kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

class MpiCommunicator final : public Communicator {
 public:
  // comm: this object's own communicator (a duplicate of MPI_COMM_WORLD, or the merged spawn group), so
  // that these collectives never match the application's messages nor change its error handler;
  // spawn_inter: the intercommunicator the merged group came from, which also connects the processes. A
  // collective itself: every rank constructs its communicator at once.
  explicit MpiCommunicator(MPI_Comm comm, MPI_Comm spawn_inter = MPI_COMM_NULL)
      : comm_(comm), spawn_inter_(spawn_inter) {
    // Errors return to the caller (and become an Error naming the call) instead of aborting every rank
    // with MPI's default MPI_ERRORS_ARE_FATAL.
    check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    const Peer self{static_cast<int64_t>(getpid()), host_hash()};
    peers_.resize(size_);
    check_mpi(MPI_Allgather(&self, 2, MPI_INT64_T, peers_.data(), 2, MPI_INT64_T, comm_), "MPI_Allgather");
  }

  int32_t rank() const override { return rank_; }
  int32_t size() const override { return size_; }
  void set_timeout(std::chrono::milliseconds timeout) override {
    RTLLM_CHECK_ARG(timeout.count() > 0, "communicator timeout must be positive, got ", timeout.count(), " ms");
    std::lock_guard<std::mutex> lock(mutex_);
    timeout_ = timeout;
  }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  void all_reduce_sum(float* data, int64_t count) override {
    RTLLM_CHECK(count >= 0 && (data != nullptr || count == 0), "all_reduce_sum: count ", count, " must be >= 0 "
                "with a buffer");
    std::lock_guard<std::mutex> lock(mutex_);
    require_usable("MPI_Iallreduce");
    for (int64_t done = 0; done < count; done += kMaxChunk) {
      const int n = static_cast<int>(std::min(kMaxChunk, count - done));
      MPI_Request request;
      issue(MPI_Iallreduce(MPI_IN_PLACE, data + done, n, MPI_FLOAT, MPI_SUM, comm_, &request), "MPI_Iallreduce");
      wait(&request, "MPI_Iallreduce", -1);
    }
  }

  int64_t all_reduce_min(int64_t value) override {
    std::lock_guard<std::mutex> lock(mutex_);
    require_usable("MPI_Iallreduce");
    MPI_Request request;
    issue(MPI_Iallreduce(MPI_IN_PLACE, &value, 1, MPI_INT64_T, MPI_MIN, comm_, &request), "MPI_Iallreduce");
    wait(&request, "MPI_Iallreduce", -1);
    return value;
  }

  void gather(const float* send, float* recv, int64_t count, int32_t root) override {
    RTLLM_CHECK(root >= 0 && root < size_, "gather: root ", root, " outside [0, ", size_, ")");
    // One message per rank: recv holds size * count floats at the root, addressed with int counts.
    RTLLM_CHECK(count >= 0 && count * size_ <= kMaxChunk, "gather: count ", count, " x ", size_,
                " ranks exceeds the ", kMaxChunk, " floats one MPI_Gather can address");
    RTLLM_CHECK(rank_ != root || recv != nullptr || count == 0, "gather: the root needs a receive buffer");
    std::lock_guard<std::mutex> lock(mutex_);
    require_usable("MPI_Igather");
    const int n = static_cast<int>(count);
    MPI_Request request;
    issue(MPI_Igather(send, n, MPI_FLOAT, rank_ == root ? recv : nullptr, n, MPI_FLOAT, root, comm_, &request),
          "MPI_Igather");
    wait(&request, "MPI_Igather", -1);
  }

  void broadcast(std::vector<uint8_t>* bytes, int32_t root) override { broadcast_bytes(bytes, root, false); }
  void broadcast_wait(std::vector<uint8_t>* bytes, int32_t root) override { broadcast_bytes(bytes, root, true); }

  void barrier() override {
    std::lock_guard<std::mutex> lock(mutex_);
    barrier_locked();
  }

  // The barrier first (polled, with the liveness checks and the timeout): MPI_Comm_disconnect blocks
  // without either, so it runs only once every rank is known to be there. The merged group is freed
  // (nothing is pending after the barrier) and only the spawn's intercommunicator disconnected: Open MPI's
  // MPI_Comm_disconnect of the intracommunicator MPI_Intercomm_merge made does not return.
  void disconnect() override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (disconnected_) return;
    barrier_locked();
    disconnected_ = true;
    check_mpi(MPI_Comm_free(&comm_), "MPI_Comm_free");
    if (spawn_inter_ != MPI_COMM_NULL) check_mpi(MPI_Comm_disconnect(&spawn_inter_), "MPI_Comm_disconnect");
    broken_ = "the communicator is disconnected: its group has ended";
  }

 private:
  void broadcast_bytes(std::vector<uint8_t>* bytes, int32_t root, bool idle) {
    RTLLM_CHECK(bytes != nullptr, "broadcast needs a byte vector");
    RTLLM_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " outside [0, ", size_, ")");
    std::lock_guard<std::mutex> lock(mutex_);
    require_usable("MPI_Ibcast");
    // The size first, so that the receivers can make room; an idle receiver waits for it as long as the
    // root lives, the payload follows at once.
    uint64_t size = bytes->size();
    MPI_Request request;
    issue(MPI_Ibcast(&size, 1, MPI_UINT64_T, root, comm_, &request), "MPI_Ibcast");
    wait(&request, "MPI_Ibcast", idle ? root : -1);
    if (rank_ != root) bytes->resize(size);
    for (uint64_t done = 0; done < size; done += kMaxChunk) {
      const int n = static_cast<int>(std::min<uint64_t>(kMaxChunk, size - done));
      issue(MPI_Ibcast(bytes->data() + done, n, MPI_BYTE, root, comm_, &request), "MPI_Ibcast");
      wait(&request, "MPI_Ibcast", -1);
    }
  }

  void barrier_locked() {
    require_usable("MPI_Ibarrier");
    MPI_Request request;
    issue(MPI_Ibarrier(comm_, &request), "MPI_Ibarrier");
    wait(&request, "MPI_Ibarrier", -1);
  }

  void require_usable(const char* call) {
    require_mpi_live(call);
    if (!broken_.empty()) throw CommunicatorError(broken_);
  }

  void issue(int rc, const char* call) {
    if (rc == MPI_SUCCESS) return;
    try {
      check_mpi(rc, call);
    } catch (const Error& e) {
      fail(e.what());
    }
  }

  [[noreturn]] void fail(std::string why) {
    broken_ = std::move(why);
    any_group_lost.store(true);
    throw CommunicatorError(broken_);
  }

  // Polls the request: briefly without pause (a step's collectives complete within microseconds), then
  // with short sleeps. Every 100 ms it checks that the ranks on this host still live; a dead one, an
  // MPI error or the timeout (none for the `idle_root` wait, as long as that rank lives) breaks the
  // communicator. The request of a failed wait is abandoned: MPI cannot cancel a collective.
  void wait(MPI_Request* request, const char* call, int32_t idle_root) {
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    Clock::time_point next_check = start + std::chrono::milliseconds(100);
    for (int64_t polls = 0;; ++polls) {
      int done = 0;
      const int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) issue(rc, call);
      if (done) return;
      if (polls < 20000) continue;
      std::this_thread::sleep_for(std::chrono::microseconds(polls < 40000 ? 10 : 200));
      const Clock::time_point now = Clock::now();
      if (now < next_check) continue;
      next_check = now + std::chrono::milliseconds(100);
      for (int32_t r = 0; r < size_; ++r) {
        if (r != rank_ && peers_[r].host == peers_[rank_].host && !process_alive(peers_[r].pid))
          fail(detail::concat(call, ": rank ", r, " (process ", peers_[r].pid, ") has exited; the group of ", size_,
                              " ranks is lost"));
      }
      if (idle_root < 0 && now - start > timeout_)
        fail(detail::concat(call, " did not complete within ", timeout_.count() / 1000.0, " s on rank ", rank_,
                            " of ", size_, ": a rank is stuck or unreachable; the group is lost"));
    }
  }

  MPI_Comm comm_;
  MPI_Comm spawn_inter_;
  bool disconnected_ = false;
  int rank_ = 0, size_ = 1;
  std::vector<Peer> peers_;  // [size]
  std::chrono::milliseconds timeout_{30000};
  std::string broken_;  // why the communicator is unusable ("" while it works)
  // Under MPI_THREAD_SERIALIZED no two MPI calls may overlap: this process's collectives go one at a time.
  std::mutex mutex_;
};

// Registered only when rtllm initialised MPI: an application that did owns its finalization.
void finalize_at_exit() {
  int finalized = 0;
  if (any_group_lost.load() || MPI_Finalized(&finalized) != MPI_SUCCESS || finalized) return;
  MPI_Finalize();
}

// Initialises MPI once (unless the application did) with the thread support the runtime needs.
void initialize_mpi(const char* what) {
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
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
    require_mpi_live(what);
    check_mpi(MPI_Query_thread(&provided), "MPI_Query_thread");
  }
  RTLLM_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI provides ", thread_level_name(provided),
              "; rtllm needs at least MPI_THREAD_SERIALIZED (steps run on a thread other than the one that "
              "initialised MPI)", initialized ? ": initialise MPI with MPI_Init_thread(MPI_THREAD_MULTIPLE)" : "");
}

std::shared_ptr<Communicator> create_world_communicator() {
  initialize_mpi("mpi_world_communicator");
  MPI_Comm comm = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "MPI_Comm_dup");
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

std::shared_ptr<Communicator> mpi_spawn(int32_t count, const std::vector<std::string>& argv) {
  RTLLM_CHECK_ARG(count >= 1, "mpi_spawn: count ", count, " must be >= 1");
  RTLLM_CHECK_ARG(!argv.empty() && !argv[0].empty(), "mpi_spawn needs a program to run");
  initialize_mpi("mpi_spawn");
  std::vector<char*> args;  // MPI_Comm_spawn's argv: the arguments after the program, null-terminated
  for (size_t i = 1; i < argv.size(); ++i) args.push_back(const_cast<char*>(argv[i].c_str()));
  args.push_back(nullptr);
  std::vector<int> codes(count, MPI_SUCCESS);
  MPI_Comm inter = MPI_COMM_NULL, group = MPI_COMM_NULL;
  MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
  check_mpi(MPI_Comm_spawn(argv[0].c_str(), args.data(), count, MPI_INFO_NULL, 0, MPI_COMM_SELF, &inter,
                           codes.data()),
            "MPI_Comm_spawn");
  for (int32_t i = 0; i < count; ++i) check_mpi(codes[i], "MPI_Comm_spawn (a spawned process)");
  check_mpi(MPI_Intercomm_merge(inter, /*high=*/0, &group), "MPI_Intercomm_merge");  // this process first
  return std::make_shared<MpiCommunicator>(group, inter);
}

std::shared_ptr<Communicator> mpi_parent_communicator() {
  initialize_mpi("mpi_parent_communicator");
  MPI_Comm parent = MPI_COMM_NULL, group = MPI_COMM_NULL;
  check_mpi(MPI_Comm_get_parent(&parent), "MPI_Comm_get_parent");
  if (parent == MPI_COMM_NULL) return nullptr;
  check_mpi(MPI_Intercomm_merge(parent, /*high=*/1, &group), "MPI_Intercomm_merge");  // after the parent
  return std::make_shared<MpiCommunicator>(group, parent);
}

}  // namespace rtllm

#else  // !RTLLM_WITH_MPI

namespace rtllm {

bool mpi_available() { return false; }

namespace {
[[noreturn]] void no_mpi(const char* what) {
  throw Error(detail::concat(what, ": rtllm was built without MPI (rebuild with an MPI implementation installed, "
                             "e.g. Debian's openmpi-bin libopenmpi-dev, and RTLLM_MPI=AUTO or ON)"));
}
}  // namespace

std::shared_ptr<Communicator> mpi_world_communicator() { no_mpi("mpi_world_communicator"); }
std::shared_ptr<Communicator> mpi_spawn(int32_t, const std::vector<std::string>&) { no_mpi("mpi_spawn"); }
std::shared_ptr<Communicator> mpi_parent_communicator() { return nullptr; }

}  // namespace rtllm

#endif  // RTLLM_WITH_MPI
