#include "rtllm/scheduler.h"

#include <algorithm>

namespace rtllm {

void SchedulerConfig::validate(int32_t tokens_per_block) const {
  RTLLM_CHECK_ARG(policy == CapacityPolicy::kGuaranteedNoEvict || policy == CapacityPolicy::kMaxUtilization,
                  "unknown capacity policy ", static_cast<int32_t>(policy),
                  "; valid: GUARANTEED_NO_EVICT (0), MAX_UTILIZATION (1)");
  RTLLM_CHECK_ARG(max_batch_size >= 1, "max_batch_size must be >= 1, got ", max_batch_size);
  RTLLM_CHECK_ARG(max_num_tokens >= 1, "max_num_tokens must be >= 1, got ", max_num_tokens);
  RTLLM_CHECK_ARG(max_num_logits == 0 || max_num_logits >= max_batch_size, "max_num_logits ", max_num_logits,
                  " must be 0 (max_batch_size) or at least max_batch_size ", max_batch_size);
  RTLLM_CHECK_ARG(!enable_chunked_prefill || max_num_tokens >= tokens_per_block, "max_num_tokens ", max_num_tokens,
                  " is smaller than tokens_per_block ", tokens_per_block,
                  ": chunked prefill needs room for at least one block per step");
}

// What is left of a step's limits while it is being packed.
struct Scheduler::Budget {
  int32_t num_seqs;
  int32_t num_tokens;
  int32_t num_logits;
  // GUARANTEED_NO_EVICT: blocks the running sequences may still need (num_reserved_blocks), counted once
  // when admission starts and grown by each admitted sequence's reservation, not recounted per admission.
  int64_t num_reserved_blocks = 0;
};

Scheduler::Scheduler(const SchedulerConfig& config, KVCacheManager& kv_cache) : config_(config), kv_cache_(kv_cache) {
  config_.validate(kv_cache.tokens_per_block());
}

void Scheduler::add(std::shared_ptr<Sequence> seq) {
  RTLLM_CHECK(seq != nullptr, "null sequence");
  RTLLM_CHECK(seq->num_prompt_tokens >= 1 && seq->num_tokens == seq->num_prompt_tokens &&
                  seq->num_cached_tokens == 0 && seq->max_num_tokens >= seq->num_tokens &&
                  (seq->token_ids.empty() || static_cast<int32_t>(seq->token_ids.size()) == seq->num_tokens),
              "sequence ", seq->id, " is not new: ", seq->num_prompt_tokens, " prompt tokens, ", seq->num_tokens,
              " tokens (", seq->token_ids.size(), " ids), ", seq->num_cached_tokens, " cached, max ",
              seq->max_num_tokens);
  RTLLM_CHECK_ARG(config_.enable_chunked_prefill || seq->num_prompt_tokens <= config_.max_num_tokens, "prompt of ",
                  seq->num_prompt_tokens, " tokens exceeds max_num_tokens ", config_.max_num_tokens,
                  " (enable chunked prefill to run longer prompts)");
  int32_t num_blocks = kv_cache_.num_blocks_for(seq->max_num_tokens);
  RTLLM_CHECK_ARG(num_blocks <= kv_cache_.num_total_blocks(), "sequence of ", seq->max_num_tokens, " tokens needs ",
                  num_blocks, " KV-cache blocks; the pool has ", kv_cache_.num_total_blocks());
  waiting_.push_back(std::move(seq));
}

ScheduledBatch Scheduler::schedule() {
  // Each step runs (or drops) the block copies its admissions recorded before the next is planned.
  RTLLM_CHECK(kv_cache_.pending_copies().empty(), kv_cache_.pending_copies().size(),
              " KV block copies of the previous step were never run (call finish_copies after them)");
  ScheduledBatch batch;
  Budget budget{config_.max_batch_size, config_.max_num_tokens,
                config_.max_num_logits ? config_.max_num_logits : config_.max_batch_size};
  // Running sequences first: generation keeps its pace while prompts wait or advance in chunks.
  for (size_t i = 0; i < running_.size(); ++i)
    if (!schedule_running(i, budget, batch)) break;
  // A step that had to preempt admits nothing new: the pool is full.
  if (batch.num_preempted == 0 || batch.empty()) admit_waiting(budget, batch);
  return batch;
}

// Tokens of `seq` that fit the budget: all it has left, or a chunk ending on a block boundary when it
// may be chunked; 0 if nothing fits. A sequence scoring its prompt also needs a row of logits per
// scored position, leaving one row for every sequence slot still open; its chunks may end anywhere
// when the rows left are fewer than a block (else it could never advance).
int32_t Scheduler::chunk_size(const Sequence& seq, const Budget& budget) const {
  const int32_t num_left = seq.num_new_tokens();
  int32_t num_budget_tokens = budget.num_tokens;
  if (seq.scores_prompt) {
    const int32_t num_spare_rows = budget.num_logits - budget.num_seqs;
    if (seq.prompt_rows(std::min(num_left, num_budget_tokens)) > num_spare_rows) {
      const int32_t num_fit = num_spare_rows;  // prompt_rows(n) <= n: a chunk of num_fit tokens fits
      if (num_fit <= 0) return 0;
      const int32_t tokens_per_block = kv_cache_.tokens_per_block();
      const int32_t aligned = (seq.num_cached_tokens + num_fit) / tokens_per_block * tokens_per_block -
                              seq.num_cached_tokens;
      return aligned > 0 ? aligned : num_fit;
    }
  }
  if (num_left <= num_budget_tokens) return num_left;
  const bool never_fits = num_left > config_.max_num_tokens;  // a recompute longer than a step
  if (!config_.enable_chunked_prefill && !never_fits) return 0;
  const int32_t tokens_per_block = kv_cache_.tokens_per_block();
  int32_t end = (seq.num_cached_tokens + num_budget_tokens) / tokens_per_block * tokens_per_block;
  int32_t num_chunk = std::max(0, end - seq.num_cached_tokens);
  // Only reachable without chunked prefill, where max_num_tokens may be below a block.
  if (num_chunk == 0 && never_fits && num_budget_tokens == config_.max_num_tokens) num_chunk = num_budget_tokens;
  return num_chunk;
}

// Schedules running_[index] if it fits, preempting newer sequences when its blocks do not.
// Returns false when running_[index] itself was preempted (no running sequence is left after it).
bool Scheduler::schedule_running(size_t index, Budget& budget, ScheduledBatch& batch) {
  std::shared_ptr<Sequence> seq = running_[index];
  if (budget.num_seqs == 0) return true;
  int32_t num_chunk = chunk_size(*seq, budget);
  if (num_chunk == 0) return true;
  const int64_t num_new_slots =
      std::max<int64_t>(0, int64_t{seq->num_cached_tokens} + num_chunk - kv_cache_.num_tokens(seq->id));
  while (!kv_cache_.can_allocate_slots(seq->id, num_new_slots)) {
    RTLLM_CHECK(config_.policy == CapacityPolicy::kMaxUtilization, "sequence ", seq->id,
                " ran out of KV-cache blocks under GUARANTEED_NO_EVICT");
    preempt_newest(batch);
    if (index >= running_.size()) return false;
  }
  kv_cache_.allocate_slots(seq->id, num_new_slots);
  const bool is_context = seq->is_context();
  take(std::move(seq), num_chunk, is_context, budget, batch);
  return true;
}

// Puts `seq` feeding num_chunk tokens into the batch, in packing order: after the context sequences
// taken so far if it is one, else at the end.
void Scheduler::take(std::shared_ptr<Sequence> seq, int32_t num_chunk, bool is_context, Budget& budget,
                     ScheduledBatch& batch) const {
  seq->num_scheduled_tokens = num_chunk;
  budget.num_logits -= 1 + seq->prompt_rows(num_chunk);
  if (is_context) {
    batch.seqs.insert(batch.seqs.begin() + batch.num_context_seqs, std::move(seq));
    batch.num_context_seqs += 1;
  } else {
    batch.seqs.push_back(std::move(seq));
  }
  batch.num_tokens += num_chunk;
  budget.num_seqs -= 1;
  budget.num_tokens -= num_chunk;
}

// The waiting sequence to admit next (see "Fair admission" in scheduler.h), given the number of
// running sequences of each group.
std::deque<std::shared_ptr<Sequence>>::iterator Scheduler::next_waiting(
    const std::unordered_map<uint64_t, int32_t>& num_running_of) {
  if (waiting_.front()->num_preemptions > 0) return waiting_.begin();  // it was running: resume it
  auto best = waiting_.end();
  int32_t best_count = 0;
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    auto found = num_running_of.find((*it)->group);
    const int32_t count = found == num_running_of.end() ? 0 : found->second;
    if (best == waiting_.end() || count < best_count) {
      best = it;
      best_count = count;
      if (count == 0) break;  // nothing beats an idle group; ties go to the earliest
    }
  }
  return best;
}

// Admits waiting sequences, groups in turn; the first that does not fit stops admission.
void Scheduler::admit_waiting(Budget& budget, ScheduledBatch& batch) {
  if (waiting_.empty()) return;
  if (config_.policy == CapacityPolicy::kGuaranteedNoEvict) budget.num_reserved_blocks = num_reserved_blocks();
  std::unordered_map<uint64_t, int32_t> num_running_of;
  for (const auto& seq : running_) num_running_of[seq->group] += 1;
  while (!waiting_.empty() && budget.num_seqs > 0 && budget.num_tokens > 0) {
    auto next = next_waiting(num_running_of);
    std::shared_ptr<Sequence> seq = *next;
    PrefixMatch prefix;
    if (!seq->scores_prompt && static_cast<int32_t>(seq->token_ids.size()) >= seq->num_tokens)
      prefix = kv_cache_.match_prefix(seq->token_ids, seq->num_tokens, seq->cache_key);
    int32_t num_chunk = fit(*seq, prefix, budget);
    if (num_chunk == 0 && prefix.partial_block_id >= 0) {
      // The partial copy's pinned source may be the one block too many: try without it.
      prefix.partial_block_id = -1;
      prefix.num_partial_tokens = 0;
      num_chunk = fit(*seq, prefix, budget);
    }
    if (num_chunk == 0) {
      seq->num_cached_tokens = 0;
      return;
    }
    const int64_t num_slots = int64_t{seq->num_cached_tokens} + num_chunk;
    kv_cache_.allocate(seq->id, num_slots, prefix, seq->cache_key);
    budget.num_reserved_blocks += num_reserved_blocks_of(*seq);
    running_.push_back(seq);
    waiting_.erase(next);
    num_running_of[seq->group] += 1;
    take(std::move(seq), num_chunk, /*is_context=*/true, budget, batch);  // a new or recomputed sequence
  }
}

// Sets seq's cached tokens from `prefix` and returns the tokens it would feed this step, or 0 when
// nothing fits the budget or its blocks cannot be admitted.
int32_t Scheduler::fit(Sequence& seq, const PrefixMatch& prefix, const Budget& budget) const {
  seq.num_cached_tokens = static_cast<int32_t>(prefix.num_cached_tokens(kv_cache_.tokens_per_block()));
  const int32_t num_chunk = chunk_size(seq, budget);
  if (num_chunk == 0 || !can_admit(seq, prefix, seq.num_cached_tokens + num_chunk, budget)) return 0;
  return num_chunk;
}

// Sends the newest running sequence back to the front of the waiting queue to be recomputed: its
// prompt + generated tokens become the tokens to feed. Its computed full blocks stay reusable.
void Scheduler::preempt_newest(ScheduledBatch& batch) {
  RTLLM_CHECK(!running_.empty(), "nothing to preempt");
  std::shared_ptr<Sequence> victim = running_.back();
  running_.pop_back();
  kv_cache_.free(victim->id);
  victim->num_cached_tokens = 0;
  victim->num_scheduled_tokens = 0;
  victim->num_preemptions += 1;
  waiting_.push_front(victim);
  batch.num_preempted += 1;
  num_preemptions_ += 1;
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
  for (const auto& seq : running_) num_reserved += num_reserved_blocks_of(*seq);
  return num_reserved;
}

int64_t Scheduler::num_reserved_blocks_of(const Sequence& seq) const {
  const int64_t num_held = static_cast<int64_t>(kv_cache_.block_ids(seq.id).size());
  return std::max<int64_t>(0, kv_cache_.num_blocks_for(seq.max_num_tokens) - num_held);
}

// GUARANTEED_NO_EVICT: blocks for the whole length on top of the running sequences' reservations.
// MAX_UTILIZATION: blocks for the slots of this step.
bool Scheduler::can_admit(const Sequence& seq, const PrefixMatch& prefix, int32_t num_slots,
                          const Budget& budget) const {
  if (config_.policy == CapacityPolicy::kMaxUtilization) return kv_cache_.can_allocate(num_slots, prefix);
  return kv_cache_.num_blocks_to_take(seq.max_num_tokens, prefix) <=
         kv_cache_.num_free_blocks() - budget.num_reserved_blocks;
}

}  // namespace rtllm
