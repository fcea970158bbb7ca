// The collectives tensor parallelism needs between the ranks that run one engine together: each rank
// holds a shard of the weights (rank{N}.engine) and runs the same graph; its all_reduce and gather ops
// combine the partial results. The interface hides the transport (MPI on the CPU; NCCL later), so that
// the public headers name no MPI type.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

class RTLLM_API Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int32_t rank() const = 0;
  virtual int32_t size() const = 0;

  // data[0, count) becomes the sum over the ranks of each rank's data[0, count), on every rank.
  virtual void all_reduce_sum(float* data, int64_t count) = 0;
  // root's recv receives size() * count floats: rank 0's send[0, count), then rank 1's, ... The other
  // ranks' recv is not read nor written (it may be null).
  virtual void gather(const float* send, float* recv, int64_t count, int32_t root) = 0;
  // root's bytes to every rank; the other ranks' vector is resized to root's size.
  virtual void broadcast(std::vector<uint8_t>* bytes, int32_t root) = 0;
  // Returns once every rank has called it.
  virtual void barrier() = 0;
};

// True when this build has the MPI communicator.
RTLLM_API bool mpi_available();

// The communicator over MPI_COMM_WORLD (the processes of one `mpirun`). The first call initialises MPI
// unless the process already did (mpi4py, the application), and then finalises it at process exit.
// Every call returns the same communicator. Throws Error in a build without MPI, and when MPI cannot
// give the thread support the runtime needs (steps run on an executor's loop thread, not the thread
// that initialised MPI).
RTLLM_API std::shared_ptr<Communicator> mpi_world_communicator();

}  // namespace rtllm
