// Scheduler (batch manager): owns the waiting (first come, first served) and running queues and
// decides, each step, which sequences run and how many tokens each contributes.
//
// Capacity policy GUARANTEED_NO_EVICT admits a waiting sequence only if blocks for its whole length
// (max_num_tokens slots) can be reserved on top of what running sequences may still need, so a
// running sequence never waits for memory and nothing is ever evicted.
// A step packs at most max_batch_size sequences and max_num_tokens tokens: running (generation)
// sequences first, one token each, then newly admitted (context) sequences with their whole prompt.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/kv_cache.h"

namespace rtllm {

enum class CapacityPolicy : int32_t {
  kGuaranteedNoEvict,  // reserve blocks for a sequence's whole length at admission
  kMaxUtilization,     // admit greedily, preempt when blocks run out (not implemented yet)
};

struct RTLLM_API SchedulerConfig {
  CapacityPolicy policy = CapacityPolicy::kGuaranteedNoEvict;
  int32_t max_batch_size = 1;  // sequences per step
  int32_t max_num_tokens = 1;  // packed tokens per step
  void validate() const;       // throws InvalidArgument naming the value and the limit
};

// What the scheduler knows of a request. Its owner (the executor) advances num_tokens and
// num_cached_tokens after each step; the scheduler reads them.
struct Sequence {
  RequestId id = 0;
  int32_t num_prompt_tokens = 0;
  int32_t num_tokens = 0;         // prompt + generated tokens so far
  int32_t num_cached_tokens = 0;  // tokens whose K/V are in the cache (0 until the context step)
  int32_t max_num_tokens = 0;     // the length at which it ends at the latest (prompt + max new tokens)

  bool is_context() const { return num_cached_tokens == 0; }
  // Tokens this sequence feeds to the model in its next step: the whole prompt, then one.
  int32_t num_new_tokens() const { return num_tokens - num_cached_tokens; }
};

// One step's work in packing order: context sequences first, then generation sequences.
struct ScheduledBatch {
  std::vector<std::shared_ptr<Sequence>> context;
  std::vector<std::shared_ptr<Sequence>> generation;
  int32_t num_tokens = 0;  // sum of num_new_tokens() over both lists

  int32_t num_seqs() const { return static_cast<int32_t>(context.size() + generation.size()); }
  bool empty() const { return num_seqs() == 0; }
};

class RTLLM_API Scheduler {
 public:
  // `kv_cache` must outlive the scheduler; the scheduler allocates and frees its sequences' blocks.
  Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache);

  // Queues a new sequence (num_tokens == num_prompt_tokens, nothing cached). Throws InvalidArgument
  // if its prompt exceeds max_num_tokens or its whole length exceeds the KV pool (it could never run).
  void add(std::shared_ptr<Sequence> seq);
  // Picks the next step's sequences and grows their KV blocks to cover the tokens they feed.
  // Returns an empty batch when nothing can run.
  ScheduledBatch schedule();
  // Drops a sequence (finished, cancelled or failed) from whichever queue holds it and frees its
  // blocks. Returns false if the scheduler does not hold it.
  bool remove(RequestId id);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  const SchedulerConfig& config() const { return config_; }

 private:
  int64_t num_reserved_blocks() const;
  bool can_admit(const Sequence& seq) const;

  SchedulerConfig config_;
  KVCacheManager& kv_cache_;
  std::deque<std::shared_ptr<Sequence>> waiting_;  // FCFS
  std::vector<std::shared_ptr<Sequence>> running_;  // in admission order
};

}  // namespace rtllm
