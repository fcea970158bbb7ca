// The collectives tensor parallelism needs between the ranks that run one engine together: each rank
// holds a shard of the weights (rank{N}.engine) and runs the same graph; its all_reduce and gather ops
// combine the partial results. The interface hides the transport (MPI on the CPU; NCCL later), so that
// the public headers name no MPI type.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

// A collective that failed or did not complete: a rank died, is stuck, or the transport broke. The
// communicator is unusable afterwards (every later call throws the same), and so is the group.
class RTLLM_API CommunicatorError : public Error {
 public:
  using Error::Error;
};

// Collectives wait for every rank. They throw CommunicatorError when a rank's process is gone (checked
// while waiting, for ranks on this host) or when they do not complete within timeout().
class RTLLM_API Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int32_t rank() const = 0;
  virtual int32_t size() const = 0;

  // How long a collective may wait for the other ranks (default 30 s; steps take far less, loading a
  // rank's weights may take longer: see broadcast_wait).
  virtual void set_timeout(std::chrono::milliseconds timeout) = 0;
  virtual std::chrono::milliseconds timeout() const = 0;

  // data[0, count) becomes the sum over the ranks of each rank's data[0, count), on every rank.
  virtual void all_reduce_sum(float* data, int64_t count) = 0;
  // root's recv receives size() * count floats: rank 0's send[0, count), then rank 1's, ... The other
  // ranks' recv is not read nor written (it may be null).
  virtual void gather(const float* send, float* recv, int64_t count, int32_t root) = 0;
  // root's bytes to every rank; the other ranks' vector is resized to root's size.
  virtual void broadcast(std::vector<uint8_t>* bytes, int32_t root) = 0;
  // broadcast() for a receiver that may wait idle for long (a follower between requests, or while rank 0
  // builds the engine): no timeout, as long as the root's process lives.
  virtual void broadcast_wait(std::vector<uint8_t>* bytes, int32_t root) = 0;
  // The least of every rank's value, on every rank (e.g. the KV blocks every rank can hold).
  virtual int64_t all_reduce_min(int64_t value) = 0;
  // Returns once every rank has called it.
  virtual void barrier() = 0;
  // Ends the group, once every rank is done with it: a barrier, then the ranks stop being connected (with
  // MPI, processes started by mpi_spawn would otherwise finalise together at exit, each waiting for the
  // others, and for the ones that have already gone forever). Every later call throws; a second
  // disconnect does nothing.
  virtual void disconnect() = 0;
};

// True when this build has the MPI communicator.
RTLLM_API bool mpi_available();

// The communicator over MPI_COMM_WORLD (the processes of one `mpirun`). The first call initialises MPI
// unless the process already did (mpi4py, the application), and then finalises it at process exit.
// Every call returns the same communicator. Throws Error in a build without MPI, and when MPI cannot
// give the thread support the runtime needs (steps run on an executor's loop thread, not the thread
// that initialised MPI).
RTLLM_API std::shared_ptr<Communicator> mpi_world_communicator();

// Starts `count` processes running argv (argv[0] the program; found on PATH) through MPI_Comm_spawn,
// and returns the communicator of this process (rank 0) and them (ranks 1 .. count), in which they
// call mpi_parent_communicator(). Initialises MPI as mpi_world_communicator() does.
RTLLM_API std::shared_ptr<Communicator> mpi_spawn(int32_t count, const std::vector<std::string>& argv);

// In a process started by mpi_spawn: the communicator it shares with its parent and siblings (the
// parent is rank 0). Null in a process that was not spawned.
RTLLM_API std::shared_ptr<Communicator> mpi_parent_communicator();

// A group over local TCP sockets, for a host without MPI (one host: every collective goes through rank 0).
// Rank 0 calls socket_listen, hands the port to the other ranks' processes, and waits in socket_accept for
// the size - 1 of them, each of which calls socket_connect(port, rank, size). Both throw CommunicatorError
// when the group does not form within `timeout`. The communicators' collective timeout starts at 30 s.
RTLLM_API int socket_listen(int32_t* port);  // the listening socket; *port receives its port
RTLLM_API std::shared_ptr<Communicator> socket_accept(int listen_fd, int32_t size, std::chrono::milliseconds timeout);
RTLLM_API std::shared_ptr<Communicator> socket_connect(int32_t port, int32_t rank, int32_t size,
                                                       std::chrono::milliseconds timeout);

}  // namespace rtllm
