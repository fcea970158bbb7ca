// Embedding rtllm in a C++ program: load an engine directory, generate greedily from prompt token
// ids, print the generated ids on one line.
//
//   ./generate ENGINE_DIR MAX_TOKENS TOKEN_ID [TOKEN_ID ...]
//
// A tensor-parallel engine (rtllm build --tp-size N) runs under `mpirun -n N ./generate ...`: every
// process loads its rank's shard, rank 0 runs the executor and prints, the others follow its steps.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "rtllm/communicator.h"
#include "rtllm/engine.h"
#include "rtllm/executor.h"
#include "rtllm/worker.h"

namespace {

// The processes of an mpirun launch, or null when this process runs alone.
std::shared_ptr<rtllm::Communicator> launch_group() {
  if (!std::getenv("OMPI_COMM_WORLD_SIZE") && !std::getenv("PMI_SIZE")) return nullptr;
  auto world = rtllm::mpi_world_communicator();
  return world->size() > 1 ? world : nullptr;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR MAX_TOKENS TOKEN_ID [TOKEN_ID ...]\n";
    return 2;
  }
  try {
    const std::shared_ptr<rtllm::Communicator> group = launch_group();
    const int32_t rank = group ? group->rank() : 0;
    auto engine = rtllm::Engine::load(argv[1], rank);
    if (rank != 0) {  // a follower: runs rank 0's steps until it stops
      rtllm::RuntimeConfig runtime;
      runtime.communicator = group;
      rtllm::run_tensor_parallel_follower(engine, runtime);
      return 0;
    }

    rtllm::Request request;
    request.stop.max_tokens = std::atoi(argv[2]);
    request.stop.end_ids = engine->model_config().eos_token_ids;
    request.sampling.temperature = 0.0f;  // greedy
    for (int i = 3; i < argc; ++i) request.prompt_token_ids.push_back(std::atoi(argv[i]));

    rtllm::ExecutorConfig config;
    config.kv_cache.max_tokens = engine->limits().max_seq_len;
    config.runtime.communicator = group;
    rtllm::Executor executor(engine, config);
    rtllm::RequestId id = executor.enqueue(request);

    for (;;) {
      for (const rtllm::Response& response : executor.await_responses(std::chrono::milliseconds(100))) {
        if (response.request_id != id || !response.is_final) continue;
        if (response.finish_reason == rtllm::FinishReason::kError) {
          std::cerr << "error: " << response.error << "\n";
          return 1;
        }
        for (size_t i = 0; i < response.token_ids.size(); ++i)
          std::cout << (i ? " " : "") << response.token_ids[i];
        std::cout << "\n";
        return 0;
      }
    }
  } catch (const rtllm::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
