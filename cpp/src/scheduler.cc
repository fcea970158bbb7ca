#include "rtllm/scheduler.h"

#include <algorithm>

namespace rtllm {

void SchedulerConfig::validate() const {
  RTLLM_CHECK_ARG(max_batch_size >= 1, "max_batch_size must be >= 1, got ", max_batch_size);
  RTLLM_CHECK_ARG(max_num_tokens >= 1, "max_num_tokens must be >= 1, got ", max_num_tokens);
  if (policy == CapacityPolicy::kMaxUtilization)
    throw Error("capacity policy MAX_UTILIZATION is not implemented yet; use GUARANTEED_NO_EVICT");
}

Scheduler::Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache)
    : config_(config), kv_cache_(kv_cache) {
  config_.validate();
}

void Scheduler::add(std::shared_ptr<Sequence> seq) {
  RTLLM_CHECK(seq != nullptr, "null sequence");
  RTLLM_CHECK(seq->num_prompt_tokens >= 1 && seq->num_tokens == seq->num_prompt_tokens &&
                  seq->num_cached_tokens == 0 && seq->max_num_tokens >= seq->num_tokens,
              "sequence ", seq->id, " is not new: ", seq->num_prompt_tokens, " prompt tokens, ",
              seq->num_tokens, " tokens, ", seq->num_cached_tokens, " cached, max ", seq->max_num_tokens);
  RTLLM_CHECK_ARG(seq->num_prompt_tokens <= config_.max_num_tokens, "prompt of ", seq->num_prompt_tokens,
                  " tokens exceeds max_num_tokens ", config_.max_num_tokens);
  int32_t num_blocks = kv_cache_.num_blocks_for(seq->max_num_tokens);
  RTLLM_CHECK_ARG(num_blocks <= kv_cache_.num_total_blocks(), "sequence of ", seq->max_num_tokens,
                  " tokens needs ", num_blocks, " KV-cache blocks; the pool has ",
                  kv_cache_.num_total_blocks());
  waiting_.push_back(std::move(seq));
}

ScheduledBatch Scheduler::schedule() {
  ScheduledBatch batch;
  auto has_room = [&](int32_t num_new_tokens) {
    return batch.num_seqs() < config_.max_batch_size &&
           batch.num_tokens + num_new_tokens <= config_.max_num_tokens;
  };
  // Generation first: they hold blocks already and their growth was reserved at admission.
  for (const auto& seq : running_) {
    if (!has_room(seq->num_new_tokens())) break;
    kv_cache_.append(seq->id, seq->num_tokens - kv_cache_.num_tokens(seq->id));
    batch.generation.push_back(seq);
    batch.num_tokens += seq->num_new_tokens();
  }
  // Then admit waiting sequences in arrival order; the first that does not fit stops admission.
  while (!waiting_.empty()) {
    const auto& seq = waiting_.front();
    if (!has_room(seq->num_new_tokens()) || !can_admit(*seq)) break;
    kv_cache_.allocate(seq->id, seq->num_tokens);
    batch.context.push_back(seq);
    batch.num_tokens += seq->num_new_tokens();
    running_.push_back(seq);
    waiting_.pop_front();
  }
  return batch;
}

bool Scheduler::remove(RequestId id) {
  auto has_id = [id](const std::shared_ptr<Sequence>& s) { return s->id == id; };
  auto running_it = std::find_if(running_.begin(), running_.end(), has_id);
  if (running_it != running_.end()) {
    running_.erase(running_it);
    kv_cache_.free(id);
    return true;
  }
  auto waiting_it = std::find_if(waiting_.begin(), waiting_.end(), has_id);
  if (waiting_it != waiting_.end()) {
    waiting_.erase(waiting_it);
    return true;
  }
  return false;
}

// Blocks running sequences do not hold yet but may need before they reach max_num_tokens.
int64_t Scheduler::num_reserved_blocks() const {
  int64_t num_reserved = 0;
  for (const auto& seq : running_) {
    int64_t num_held = static_cast<int64_t>(kv_cache_.block_ids(seq->id).size());
    num_reserved += std::max<int64_t>(0, kv_cache_.num_blocks_for(seq->max_num_tokens) - num_held);
  }
  return num_reserved;
}

bool Scheduler::can_admit(const Sequence& seq) const {
  return kv_cache_.num_blocks_for(seq.max_num_tokens) <= kv_cache_.num_free_blocks() - num_reserved_blocks();
}

}  // namespace rtllm
