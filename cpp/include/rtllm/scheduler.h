// Scheduler (batch manager): owns the waiting (first come, first served) and running queues and
// decides, each step, which sequences run and how many tokens each contributes.
//
// Capacity policies:
// - GUARANTEED_NO_EVICT admits a waiting sequence only if blocks for its whole length
//   (max_num_tokens slots) can be reserved on top of what running sequences may still need, so a
//   running sequence never waits for memory and nothing is ever preempted.
// - MAX_UTILIZATION admits a sequence when blocks for its next chunk are available. When a running
//   sequence then needs a block and none is left, the newest running sequence is preempted: its
//   blocks are released (its computed full blocks stay reusable) and it goes back to the front of
//   the waiting queue to recompute its prompt + generated tokens.
// A step packs at most max_batch_size sequences and max_num_tokens tokens: running sequences first
// (one token each when generating), then waiting ones. A prompt that does not fit the token budget
// advances in chunks ending on a block boundary when enable_chunked_prefill is on (and always when
// it is longer than max_num_tokens, which only a recompute can be without chunked prefill).
// A new sequence first takes the longest cached prefix the KV manager has for its tokens.
// Fair admission: waiting sequences belong to groups (the sequences of one client request). A
// preempted sequence is readmitted first; otherwise the next admitted is the earliest waiting one
// of the groups with the fewest running sequences, so groups take turns and one request's fan-out
// cannot starve another's. When every sequence is its own group this is arrival order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <vector>

#include "rtllm/common.h"
#include "rtllm/kv_cache.h"

namespace rtllm {

enum class CapacityPolicy : int32_t {
  kGuaranteedNoEvict,  // reserve blocks for a sequence's whole length at admission
  kMaxUtilization,     // admit greedily, preempt the newest sequence when blocks run out
};

struct RTLLM_API SchedulerConfig {
  CapacityPolicy policy = CapacityPolicy::kGuaranteedNoEvict;
  int32_t max_batch_size = 1;  // sequences per step
  int32_t max_num_tokens = 1;  // packed tokens per step
  bool enable_chunked_prefill = false;
  // Rows of logits per step: one per scheduled sequence, plus one per prompt position a sequence
  // that scores its prompt computes; 0: max_batch_size (no room for prompt scoring).
  int32_t max_num_logits = 0;
  // Throws InvalidArgument naming the value and the limit (e.g. max_num_tokens < tokens_per_block
  // with chunked prefill: no chunk could end on a block boundary).
  void validate(int32_t tokens_per_block) const;
};

// What the scheduler knows of a request. Its owner (the executor) advances num_tokens and
// num_cached_tokens after each step; the scheduler reads them and sets num_scheduled_tokens.
struct Sequence {
  RequestId id = 0;
  int32_t num_prompt_tokens = 0;
  int32_t num_tokens = 0;         // prompt + generated tokens so far
  int32_t num_cached_tokens = 0;  // tokens whose K/V are in the cache
  int32_t max_num_tokens = 0;     // the length at which it ends at the latest (prompt + max new tokens)
  // [num_tokens] prompt + generated tokens; prefix reuse looks them up (may stay empty without it).
  std::vector<int32_t> token_ids;
  uint64_t cache_key = 0;  // extra key of its blocks (cache_salt_key of its salt)
  uint64_t group = 0;      // fairness group: sequences of one client request share it
  // Scores its prompt (prompt log-probabilities): every prompt position is computed, never taken
  // from the prefix cache, and each costs a row of logits (prompt_rows) on top of the sequence's own.
  bool scores_prompt = false;
  // Set by schedule(): tokens fed in this step, from num_cached_tokens on.
  int32_t num_scheduled_tokens = 0;
  int32_t num_preemptions = 0;

  // Tokens still to feed; the step that feeds the last of them produces the next token.
  int32_t num_new_tokens() const { return num_tokens - num_cached_tokens; }
  // Rows of logits beyond its own that feeding num_chunk tokens takes: the positions p whose next
  // token is a prompt token (p < num_prompt_tokens - 1), when it scores its prompt.
  int32_t prompt_rows(int32_t num_chunk) const {
    if (!scores_prompt) return 0;
    const int32_t end = std::min(num_cached_tokens + num_chunk, num_prompt_tokens - 1);
    return std::max(0, end - num_cached_tokens);
  }
  // Computing its prompt (or several tokens of a recompute after preemption) rather than
  // generating one token.
  bool is_context() const { return num_cached_tokens < num_prompt_tokens || num_new_tokens() > 1; }
};

// One step's work: each sequence with the count of tokens it feeds (its num_scheduled_tokens), a
// prompt chunk, one decode token (later 1 + k draft tokens), in packing order: the context
// sequences first, then the generation ones.
struct ScheduledBatch {
  // [num_seqs]: seqs[i] is a context sequence (a prompt, a chunk of one or a recompute after
  // preemption) iff i < num_context_seqs, else a generation sequence (one token).
  std::vector<std::shared_ptr<Sequence>> seqs;
  int32_t num_context_seqs = 0;
  int32_t num_tokens = 0;     // sum of num_scheduled_tokens over seqs
  int32_t num_preempted = 0;  // sequences sent back to the waiting queue by this schedule()

  int32_t num_seqs() const { return static_cast<int32_t>(seqs.size()); }
  int32_t num_generation_seqs() const { return num_seqs() - num_context_seqs; }
  bool is_context(size_t index) const { return index < static_cast<size_t>(num_context_seqs); }
  bool empty() const { return seqs.empty(); }
};

class RTLLM_API Scheduler {
 public:
  // `kv_cache` must outlive the scheduler; the scheduler allocates and frees its sequences' blocks.
  Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache);

  // Queues a new sequence (num_tokens == num_prompt_tokens, nothing cached). Throws InvalidArgument
  // if its prompt exceeds max_num_tokens without chunked prefill or its whole length exceeds the
  // KV pool (it could never run).
  void add(std::shared_ptr<Sequence> seq);
  // Picks the next step's sequences, sets their num_scheduled_tokens and grows their KV blocks to
  // cover them with KVCacheManager::allocate / allocate_slots (preempting under MAX_UTILIZATION).
  // Returns an empty batch when nothing can run.
  ScheduledBatch schedule();
  // Drops a sequence (finished, cancelled or failed) from whichever queue holds it and frees its
  // blocks. Returns false if the scheduler does not hold it.
  bool remove(RequestId id);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int64_t num_preemptions() const { return num_preemptions_; }
  const SchedulerConfig& config() const { return config_; }

 private:
  struct Budget;
  int32_t chunk_size(const Sequence& seq, const Budget& budget) const;
  bool schedule_running(size_t index, Budget& budget, ScheduledBatch& batch);
  void admit_waiting(Budget& budget, ScheduledBatch& batch);
  std::deque<std::shared_ptr<Sequence>>::iterator next_waiting(
      const std::unordered_map<uint64_t, int32_t>& num_running_of);
  int32_t fit(Sequence& seq, const PrefixMatch& prefix, const Budget& budget) const;
  void take(std::shared_ptr<Sequence> seq, int32_t num_chunk, bool is_context, Budget& budget,
            ScheduledBatch& batch) const;
  void preempt_newest(ScheduledBatch& batch);
  int64_t num_reserved_blocks() const;
  int64_t num_reserved_blocks_of(const Sequence& seq) const;
  bool can_admit(const Sequence& seq, const PrefixMatch& prefix, int32_t num_slots, const Budget& budget) const;

  SchedulerConfig config_;
  KVCacheManager& kv_cache_;
  std::deque<std::shared_ptr<Sequence>> waiting_;   // arrival order; preempted sequences return to the front
  std::vector<std::shared_ptr<Sequence>> running_;  // in admission order
  int64_t num_preemptions_ = 0;
};

}  // namespace rtllm
