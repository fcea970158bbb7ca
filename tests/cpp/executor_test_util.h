// Helpers of the tests that run a whole Executor: the tiny engine test_cpp_suite.py builds and names
// in RTLLM_TEST_ENGINE_DIR, and waiting for requests' final responses.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "rtllm/engine.h"
#include "rtllm/executor.h"

namespace rtllm {

// Null when RTLLM_TEST_ENGINE_DIR is not set (the caller skips).
inline std::shared_ptr<const Engine> test_engine() {
  const char* dir = std::getenv("RTLLM_TEST_ENGINE_DIR");
  return dir ? Engine::load(dir) : nullptr;
}

// The final responses of the requests `ids`, by request id (a minute at most).
inline std::map<RequestId, Response> await_finals(Executor& executor, const std::vector<RequestId>& ids) {
  std::map<RequestId, Response> finals;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (finals.size() < ids.size() && std::chrono::steady_clock::now() < deadline)
    for (Response& response : executor.await_responses(std::chrono::milliseconds(100)))
      if (response.is_final) finals[response.request_id] = std::move(response);
  EXPECT_EQ(finals.size(), ids.size()) << "timed out";
  return finals;
}

// Runs the requests together and returns their final responses by request id.
inline std::map<RequestId, Response> run(Executor& executor, std::vector<Request> requests) {
  std::vector<RequestId> ids;
  for (Request& r : requests) ids.push_back(executor.enqueue(std::move(r)));
  return await_finals(executor, ids);
}

}  // namespace rtllm
