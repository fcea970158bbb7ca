// Scheduler: packing order, batch limits, FCFS admission and GUARANTEED_NO_EVICT reservations,
// checked step by step while a driver plays the executor's part.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "rtllm/scheduler.h"

namespace rtllm {
namespace {

std::shared_ptr<Sequence> make_seq(RequestId id, int32_t num_prompt_tokens, int32_t max_num_tokens) {
  auto seq = std::make_shared<Sequence>();
  seq->id = id;
  seq->num_prompt_tokens = num_prompt_tokens;
  seq->num_tokens = num_prompt_tokens;
  seq->max_num_tokens = max_num_tokens;
  return seq;
}

// What the executor does after a step: every scheduled sequence's new tokens are now cached and
// one token was sampled. Sequences that reach max_num_tokens finish and are removed.
std::vector<RequestId> advance(Scheduler& scheduler, const ScheduledBatch& batch) {
  std::vector<RequestId> finished;
  for (const auto* list : {&batch.context, &batch.generation})
    for (const auto& seq : *list) {
      seq->num_cached_tokens = seq->num_tokens;
      seq->num_tokens += 1;
      if (seq->num_tokens >= seq->max_num_tokens) finished.push_back(seq->id);
    }
  for (RequestId id : finished) EXPECT_TRUE(scheduler.remove(id));
  return finished;
}

std::vector<RequestId> ids(const std::vector<std::shared_ptr<Sequence>>& seqs) {
  std::vector<RequestId> out;
  for (const auto& s : seqs) out.push_back(s->id);
  return out;
}

TEST(Scheduler, ContextFirstInBatchButGenerationFirstInPriority) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, /*max_batch_size=*/3, /*max_num_tokens=*/10}, kv);
  scheduler.add(make_seq(1, 5, 8));
  scheduler.add(make_seq(2, 4, 8));
  ScheduledBatch b1 = scheduler.schedule();
  EXPECT_EQ(ids(b1.context), (std::vector<RequestId>{1, 2}));
  EXPECT_TRUE(b1.generation.empty());
  EXPECT_EQ(b1.num_tokens, 9);
  advance(scheduler, b1);

  scheduler.add(make_seq(3, 8, 12));  // 2 generation tokens + 8 = 10 fits
  scheduler.add(make_seq(4, 1, 12));  // batch is full (3 sequences)
  ScheduledBatch b2 = scheduler.schedule();
  EXPECT_EQ(ids(b2.context), (std::vector<RequestId>{3}));
  EXPECT_EQ(ids(b2.generation), (std::vector<RequestId>{1, 2}));
  EXPECT_EQ(b2.num_tokens, 10);
  EXPECT_EQ(scheduler.num_waiting(), 1);
  for (const auto& seq : b2.generation) {
    EXPECT_EQ(seq->num_new_tokens(), 1);
    EXPECT_GE(kv.num_tokens(seq->id), seq->num_tokens);  // KV covers the token being fed
  }
}

TEST(Scheduler, TokenBudgetBlocksTheQueueHeadFirstComeFirstServed) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 8, 10}, kv);
  scheduler.add(make_seq(1, 6, 20));
  scheduler.add(make_seq(2, 6, 20));  // 6 + 6 > 10: waits
  scheduler.add(make_seq(3, 2, 20));  // would fit, but must not overtake 2
  ScheduledBatch b = scheduler.schedule();
  EXPECT_EQ(ids(b.context), (std::vector<RequestId>{1}));
  EXPECT_EQ(scheduler.num_waiting(), 2);
}

TEST(Scheduler, GuaranteedNoEvictReservesWholeLength) {
  KVCacheManager kv(/*num_blocks=*/6, /*tokens_per_block=*/4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 8, 64}, kv);
  scheduler.add(make_seq(1, 4, 16));  // holds 1 block now, reserves 4
  scheduler.add(make_seq(2, 4, 12));  // needs 3; 5 free but only 2 unreserved
  ScheduledBatch b = scheduler.schedule();
  EXPECT_EQ(ids(b.context), (std::vector<RequestId>{1}));
  EXPECT_EQ(kv.num_free_blocks(), 5);
  EXPECT_EQ(scheduler.num_waiting(), 1);
  scheduler.remove(1);
  EXPECT_EQ(kv.num_free_blocks(), 6);
  b = scheduler.schedule();
  EXPECT_EQ(ids(b.context), (std::vector<RequestId>{2}));
}

TEST(Scheduler, AddRejectsSequencesThatCanNeverRun) {
  KVCacheManager kv(4, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 8, 10}, kv);
  EXPECT_THROW(scheduler.add(make_seq(1, 11, 12)), InvalidArgument);  // prompt > max_num_tokens
  EXPECT_THROW(scheduler.add(make_seq(2, 4, 17)), InvalidArgument);   // 5 blocks > pool of 4
  EXPECT_FALSE(scheduler.has_work());
}

TEST(Scheduler, RemoveWaitingAndRunning) {
  KVCacheManager kv(10, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 1, 64}, kv);
  scheduler.add(make_seq(1, 5, 9));
  scheduler.add(make_seq(2, 5, 9));
  scheduler.schedule();
  EXPECT_EQ(kv.num_free_blocks(), 8);
  EXPECT_TRUE(scheduler.remove(2));   // waiting
  EXPECT_TRUE(scheduler.remove(1));   // running: blocks freed
  EXPECT_FALSE(scheduler.remove(1));
  EXPECT_EQ(kv.num_free_blocks(), 10);
  EXPECT_FALSE(scheduler.has_work());
}

TEST(Scheduler, ConfigValidation) {
  KVCacheManager kv(10, 4);
  EXPECT_THROW(Scheduler({CapacityPolicy::kGuaranteedNoEvict, 0, 64}, kv), InvalidArgument);
  EXPECT_THROW(Scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 0}, kv), InvalidArgument);
  EXPECT_THROW(Scheduler({CapacityPolicy::kMaxUtilization, 4, 64}, kv), Error);
}

// A random workload runs to completion: every step respects the limits, the KV blocks of each
// scheduled sequence cover the tokens it feeds, arrival order is kept, nothing is starved and all
// blocks come back.
TEST(Scheduler, RandomWorkloadRunsToCompletion) {
  for (uint32_t trial = 0; trial < 20; ++trial) {
    std::mt19937 rng(trial);
    const int32_t tokens_per_block = 1 + rng() % 8, num_blocks = 20 + rng() % 40;
    const int32_t max_batch_size = 1 + rng() % 6, max_num_tokens = 16 + rng() % 32;
    KVCacheManager kv(num_blocks, tokens_per_block);
    Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, max_batch_size, max_num_tokens}, kv);
    const int num_requests = 30;
    std::vector<RequestId> admitted, finished;
    int next_id = 0;
    for (int step = 0; step < 10000 && (next_id < num_requests || scheduler.has_work()); ++step) {
      if (next_id < num_requests && rng() % 2 == 0) {
        int32_t prompt = 1 + rng() % max_num_tokens;
        int32_t max_len = std::min<int32_t>(prompt + 1 + rng() % 20, num_blocks * tokens_per_block);
        if (prompt > max_len) prompt = max_len;
        scheduler.add(make_seq(next_id++, prompt, max_len));
      }
      ScheduledBatch batch = scheduler.schedule();
      ASSERT_LE(batch.num_seqs(), max_batch_size);
      ASSERT_LE(batch.num_tokens, max_num_tokens);
      int32_t num_tokens = 0;
      for (const auto& seq : batch.context) {
        ASSERT_EQ(seq->num_cached_tokens, 0);
        admitted.push_back(seq->id);
      }
      for (const auto& seq : batch.generation) ASSERT_EQ(seq->num_new_tokens(), 1);
      for (const auto* list : {&batch.context, &batch.generation})
        for (const auto& seq : *list) {
          num_tokens += seq->num_new_tokens();
          ASSERT_GE(kv.num_tokens(seq->id), seq->num_tokens);
          ASSERT_GE(static_cast<int64_t>(kv.block_ids(seq->id).size()) * tokens_per_block, seq->num_tokens);
        }
      ASSERT_EQ(num_tokens, batch.num_tokens);
      if (scheduler.has_work()) {
        ASSERT_FALSE(batch.empty()) << "no progress at step " << step;
      }
      for (RequestId id : advance(scheduler, batch)) finished.push_back(id);
    }
    ASSERT_EQ(static_cast<int>(finished.size()), num_requests) << "trial " << trial;
    ASSERT_TRUE(std::is_sorted(admitted.begin(), admitted.end())) << "admission is not FCFS";
    ASSERT_EQ(kv.num_free_blocks(), num_blocks);
  }
}

}  // namespace
}  // namespace rtllm
