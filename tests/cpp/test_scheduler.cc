// Scheduler: packing order, batch limits, FCFS admission, GUARANTEED_NO_EVICT reservations, chunked
// prefill, prefix reuse and MAX_UTILIZATION preemption, checked step by step while a driver plays
// the executor's part.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
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
  for (const auto& seq : batch.seqs) {
    seq->num_cached_tokens = seq->num_tokens;
    seq->num_tokens += 1;
    if (seq->num_tokens >= seq->max_num_tokens) finished.push_back(seq->id);
  }
  for (RequestId id : finished) EXPECT_TRUE(scheduler.remove(id));
  return finished;
}

// The two parts of a batch's one list: context sequences first, then generation sequences.
std::vector<std::shared_ptr<Sequence>> context_of(const ScheduledBatch& batch) {
  return {batch.seqs.begin(), batch.seqs.begin() + batch.num_context_seqs};
}
std::vector<std::shared_ptr<Sequence>> generation_of(const ScheduledBatch& batch) {
  return {batch.seqs.begin() + batch.num_context_seqs, batch.seqs.end()};
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
  EXPECT_EQ(ids(context_of(b1)), (std::vector<RequestId>{1, 2}));
  EXPECT_TRUE(generation_of(b1).empty());
  EXPECT_EQ(b1.num_tokens, 9);
  advance(scheduler, b1);

  scheduler.add(make_seq(3, 8, 12));  // 2 generation tokens + 8 = 10 fits
  scheduler.add(make_seq(4, 1, 12));  // batch is full (3 sequences)
  ScheduledBatch b2 = scheduler.schedule();
  EXPECT_EQ(ids(context_of(b2)), (std::vector<RequestId>{3}));
  EXPECT_EQ(ids(generation_of(b2)), (std::vector<RequestId>{1, 2}));
  EXPECT_EQ(b2.num_tokens, 10);
  EXPECT_EQ(scheduler.num_waiting(), 1);
  for (const auto& seq : generation_of(b2)) {
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
  EXPECT_EQ(ids(context_of(b)), (std::vector<RequestId>{1}));
  EXPECT_EQ(scheduler.num_waiting(), 2);
}

TEST(Scheduler, GuaranteedNoEvictReservesWholeLength) {
  KVCacheManager kv(/*num_blocks=*/6, /*tokens_per_block=*/4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 8, 64}, kv);
  scheduler.add(make_seq(1, 4, 16));  // holds 1 block now, reserves 4
  scheduler.add(make_seq(2, 4, 12));  // needs 3; 5 free but only 2 unreserved
  ScheduledBatch b = scheduler.schedule();
  EXPECT_EQ(ids(context_of(b)), (std::vector<RequestId>{1}));
  EXPECT_EQ(kv.num_free_blocks(), 5);
  EXPECT_EQ(scheduler.num_waiting(), 1);
  scheduler.remove(1);
  EXPECT_EQ(kv.num_free_blocks(), 6);
  b = scheduler.schedule();
  EXPECT_EQ(ids(context_of(b)), (std::vector<RequestId>{2}));
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
  // Chunked prefill needs at least one block per step.
  EXPECT_THROW(Scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 3, /*enable_chunked_prefill=*/true}, kv),
               InvalidArgument);
  EXPECT_NO_THROW(Scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 4, true}, kv));
  EXPECT_THROW(Scheduler({static_cast<CapacityPolicy>(7), 4, 64}, kv), InvalidArgument);
  EXPECT_NO_THROW(Scheduler({CapacityPolicy::kMaxUtilization, 4, 64}, kv));
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
      for (const auto& seq : context_of(batch)) {
        ASSERT_EQ(seq->num_cached_tokens, 0);
        admitted.push_back(seq->id);
      }
      for (const auto& seq : generation_of(batch)) ASSERT_EQ(seq->num_new_tokens(), 1);
      for (const auto& seq : batch.seqs) {
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

// ---------------------------------------------------------------- chunks, reuse, preemption

std::shared_ptr<Sequence> make_seq_with_tokens(RequestId id, std::vector<int32_t> prompt, int32_t max_num_tokens) {
  auto seq = make_seq(id, static_cast<int32_t>(prompt.size()), max_num_tokens);
  seq->token_ids = std::move(prompt);
  return seq;
}

// The executor's part for sequences that carry token ids: the scheduled tokens are computed (and
// their full blocks stored); a sequence that fed all its tokens gets `next_token(seq)`.
template <typename NextToken>
std::vector<RequestId> advance_chunks(Scheduler& scheduler, KVCacheManager& kv, const ScheduledBatch& batch,
                                      NextToken next_token) {
  std::vector<RequestId> finished;
  kv.finish_copies();  // the step's copy stage (partially reused blocks) before its forward
  for (const auto& seq : batch.seqs) {
    const bool completes = seq->num_cached_tokens + seq->num_scheduled_tokens == seq->num_tokens;
    seq->num_cached_tokens += seq->num_scheduled_tokens;
    kv.store(seq->id, seq->token_ids, seq->num_cached_tokens);
    if (!completes) continue;
    seq->token_ids.push_back(next_token(*seq));
    seq->num_tokens += 1;
    if (seq->num_tokens >= seq->max_num_tokens) finished.push_back(seq->id);
  }
  for (RequestId id : finished) EXPECT_TRUE(scheduler.remove(id));
  return finished;
}

int32_t token_from_length(const Sequence& seq) { return 1000 + seq.num_tokens; }

TEST(Scheduler, ChunkedPrefillAdvancesInBlockMultiplesWhileGenerationRuns) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 10, /*enable_chunked_prefill=*/true}, kv);
  scheduler.add(make_seq_with_tokens(1, {1, 2, 3}, 40));
  advance_chunks(scheduler, kv, scheduler.schedule(), token_from_length);  // 1 is generating now
  std::vector<int32_t> long_prompt(25);
  std::iota(long_prompt.begin(), long_prompt.end(), 100);
  scheduler.add(make_seq_with_tokens(2, long_prompt, 40));  // longer than max_num_tokens: legal
  std::vector<int32_t> chunks;
  while (true) {
    ScheduledBatch b = scheduler.schedule();
    ASSERT_LE(b.num_tokens, 10);
    if (context_of(b).empty()) break;
    ASSERT_EQ(ids(generation_of(b)), (std::vector<RequestId>{1}));  // generation never waits
    ASSERT_EQ(ids(context_of(b)), (std::vector<RequestId>{2}));
    chunks.push_back(context_of(b)[0]->num_scheduled_tokens);
    advance_chunks(scheduler, kv, b, token_from_length);
  }
  // 9 tokens of budget after the generation token: chunks of 8 (two blocks) until the rest fits.
  EXPECT_EQ(chunks, (std::vector<int32_t>{8, 8, 9}));
}

// One list per step: running prompt chunks, then admitted prompts, then generation sequences, each
// part in scheduling order, with the flag and the counts telling the parts apart.
TEST(Scheduler, OneListPacksContextSequencesFirst) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 12, /*enable_chunked_prefill=*/true}, kv);
  scheduler.add(make_seq_with_tokens(1, {1, 2}, 40));
  scheduler.add(make_seq_with_tokens(2, std::vector<int32_t>(20, 7), 40));
  ScheduledBatch b1 = scheduler.schedule();  // 2 tokens of 1, a chunk of 8 of 2
  EXPECT_EQ(ids(b1.seqs), (std::vector<RequestId>{1, 2}));
  EXPECT_EQ(b1.num_context_seqs, 2);
  advance_chunks(scheduler, kv, b1, token_from_length);  // 1 is generating; 2 has 12 tokens left
  scheduler.add(make_seq_with_tokens(3, {5, 6}, 40));
  ScheduledBatch b2 = scheduler.schedule();  // 1 decode token, a chunk of 8 of 2, 2 tokens of 3
  EXPECT_EQ(ids(b2.seqs), (std::vector<RequestId>{2, 3, 1}));
  EXPECT_EQ(b2.num_context_seqs, 2);
  EXPECT_EQ(b2.num_generation_seqs(), 1);
  EXPECT_TRUE(b2.is_context(0) && b2.is_context(1) && !b2.is_context(2));
  EXPECT_EQ(b2.seqs[0]->num_scheduled_tokens, 8);
  EXPECT_EQ(b2.seqs[1]->num_scheduled_tokens, 2);
  EXPECT_EQ(b2.seqs[2]->num_scheduled_tokens, 1);
  EXPECT_EQ(b2.num_tokens, 11);
  for (const auto& seq : b2.seqs) EXPECT_EQ(kv.num_tokens(seq->id), seq->num_cached_tokens + seq->num_scheduled_tokens);
}

TEST(Scheduler, WithoutChunkingALongPromptIsRejected) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 10}, kv);
  EXPECT_THROW(scheduler.add(make_seq_with_tokens(1, std::vector<int32_t>(11, 5), 20)), InvalidArgument);
}

TEST(Scheduler, NewSequenceTakesTheCachedPrefixAndComputesTheRest) {
  KVCacheManager kv(100, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 64}, kv);
  std::vector<int32_t> prompt(14);
  std::iota(prompt.begin(), prompt.end(), 10);
  scheduler.add(make_seq_with_tokens(1, prompt, 20));
  advance_chunks(scheduler, kv, scheduler.schedule(), token_from_length);
  scheduler.remove(1);  // finished: its three full blocks stay reusable
  prompt[13] = 99;
  scheduler.add(make_seq_with_tokens(2, prompt, 20));
  ScheduledBatch b = scheduler.schedule();
  ASSERT_EQ(ids(context_of(b)), (std::vector<RequestId>{2}));
  EXPECT_EQ(context_of(b)[0]->num_cached_tokens, 12);
  EXPECT_EQ(context_of(b)[0]->num_scheduled_tokens, 2);
  EXPECT_EQ(b.num_tokens, 2);
  EXPECT_EQ(kv.stats().num_reused_tokens, 12);
}

// A prompt ending mid-block takes the leading tokens of the cached block it shares them with (a
// copy the step runs before its forward); where the pool cannot also pin that block's source for
// the copy, the sequence is admitted with its full blocks alone rather than waiting forever.
TEST(Scheduler, PartialBlockReuseAndItsFallbackWhenThePoolIsTight) {
  for (int32_t num_blocks : {5, 4}) {
    KVCacheManager kv(num_blocks, 4);
    Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, 4, 64}, kv);
    scheduler.add(make_seq_with_tokens(1, {1, 2, 3, 4, 5, 6, 7, 8, 9}, 16));
    advance_chunks(scheduler, kv, scheduler.schedule(), token_from_length);  // 2 full blocks stored
    scheduler.remove(1);
    scheduler.add(make_seq_with_tokens(2, {1, 2, 3, 4, 5, 6, 0, 0, 0}, 16));  // shares 6 tokens
    ScheduledBatch b = scheduler.schedule();
    ASSERT_EQ(ids(context_of(b)), (std::vector<RequestId>{2}));
    // 16 tokens take 4 blocks; pinning the source of the copy needs a fifth.
    const bool partial = num_blocks == 5;
    EXPECT_EQ(context_of(b)[0]->num_cached_tokens, partial ? 6 : 4) << num_blocks << " blocks";
    EXPECT_EQ(context_of(b)[0]->num_scheduled_tokens, partial ? 3 : 5);
    EXPECT_EQ(kv.pending_copies().size(), partial ? 1u : 0u);
    EXPECT_EQ(kv.stats().num_partial_reused_blocks, partial ? 1 : 0);
    if (partial) {
      EXPECT_THROW(scheduler.schedule(), Error) << "copies of the last step never ran";
    }
    kv.finish_copies();
    kv.check_invariants();
  }
}

TEST(Scheduler, MaxUtilizationPreemptsTheNewestAndResumesIt) {
  KVCacheManager kv(/*num_blocks=*/4, /*tokens_per_block=*/2, /*enable_block_reuse=*/false);
  Scheduler scheduler({CapacityPolicy::kMaxUtilization, 4, 64}, kv);
  scheduler.add(make_seq_with_tokens(1, {1, 2, 3}, 8));
  scheduler.add(make_seq_with_tokens(2, {4, 5, 6}, 8));
  ScheduledBatch b = scheduler.schedule();  // both admitted greedily: 2 + 2 blocks
  EXPECT_EQ(ids(context_of(b)), (std::vector<RequestId>{1, 2}));
  advance_chunks(scheduler, kv, b, token_from_length);  // 4 tokens each: still 2 blocks each
  b = scheduler.schedule();
  EXPECT_EQ(b.num_preempted, 0);
  advance_chunks(scheduler, kv, b, token_from_length);  // 5 tokens each: 1 needs a third block
  b = scheduler.schedule();
  EXPECT_EQ(b.num_preempted, 1);
  EXPECT_EQ(ids(generation_of(b)), (std::vector<RequestId>{1}));
  EXPECT_TRUE(context_of(b).empty());
  EXPECT_EQ(scheduler.num_waiting(), 1);
  EXPECT_EQ(scheduler.num_preemptions(), 1);
  std::vector<RequestId> finished;
  for (int step = 0; step < 20 && scheduler.has_work(); ++step) {
    b = scheduler.schedule();
    for (const auto& seq : context_of(b))
      if (seq->id == 2) {
        EXPECT_EQ(seq->num_cached_tokens, 0);
        EXPECT_EQ(seq->num_scheduled_tokens, 5);  // prompt + generated tokens recomputed
      }
    for (RequestId id : advance_chunks(scheduler, kv, b, token_from_length)) finished.push_back(id);
  }
  EXPECT_EQ(finished, (std::vector<RequestId>{1, 2}));
  EXPECT_EQ(kv.num_free_blocks(), 4);
}

// Random workloads under both policies with reuse, chunked prefill and small pools: limits hold at
// every step, the KV manager's invariants hold, every sequence ends with the tokens a solo run
// gives (tokens depend only on the sequence's own tokens), and every block comes back.
TEST(Scheduler, RandomWorkloadWithReuseChunksAndPreemption) {
  for (uint32_t trial = 0; trial < 24; ++trial) {
    std::mt19937 rng(trial);
    const CapacityPolicy policy = trial % 2 ? CapacityPolicy::kMaxUtilization : CapacityPolicy::kGuaranteedNoEvict;
    const int32_t tokens_per_block = 1 << (rng() % 3), num_blocks = 12 + rng() % 20;
    const int32_t max_batch_size = 1 + rng() % 5, max_num_tokens = 8 + rng() % 16;
    const bool chunked = trial % 4 >= 2;
    KVCacheManager kv(num_blocks, tokens_per_block, /*enable_block_reuse=*/true);
    Scheduler scheduler({policy, max_batch_size, max_num_tokens, chunked}, kv);
    // Next token: a function of the whole sequence, so that a recompute must give the same one.
    auto next_token = [](const Sequence& seq) {
      uint32_t h = 7;
      for (int32_t t : seq.token_ids) h = h * 31 + static_cast<uint32_t>(t);
      return static_cast<int32_t>(h % 5);
    };
    std::map<RequestId, std::shared_ptr<Sequence>> seqs;
    const int num_requests = 30;
    std::vector<RequestId> finished;
    int next_id = 0;
    for (int step = 0; step < 20000 && (next_id < num_requests || scheduler.has_work()); ++step) {
      if (next_id < num_requests && rng() % 2 == 0) {
        int32_t limit = chunked ? 3 * max_num_tokens : max_num_tokens;
        int32_t max_len = std::min<int32_t>(2 + rng() % (limit + 8), num_blocks * tokens_per_block);
        int32_t prompt_len = std::min<int32_t>(1 + rng() % limit, max_len - 1);
        std::vector<int32_t> prompt(prompt_len);
        for (auto& t : prompt) t = rng() % 2;  // tiny vocabulary: prefixes repeat
        auto seq = make_seq_with_tokens(next_id++, prompt, max_len);
        seqs[seq->id] = seq;
        scheduler.add(seq);
      }
      ScheduledBatch batch = scheduler.schedule();
      ASSERT_LE(batch.num_seqs(), max_batch_size);
      ASSERT_LE(batch.num_tokens, max_num_tokens);
      for (const auto& seq : batch.seqs) {
        ASSERT_GE(seq->num_scheduled_tokens, 1);
        ASSERT_EQ(kv.num_tokens(seq->id), seq->num_cached_tokens + seq->num_scheduled_tokens);
      }
      for (const auto& seq : generation_of(batch)) ASSERT_EQ(seq->num_scheduled_tokens, 1);
      if (policy == CapacityPolicy::kGuaranteedNoEvict) {
        ASSERT_EQ(batch.num_preempted, 0);
      }
      if (scheduler.has_work()) {
        ASSERT_FALSE(batch.empty()) << "no progress at step " << step;
      }
      for (RequestId id : advance_chunks(scheduler, kv, batch, next_token)) finished.push_back(id);
      kv.check_invariants();
    }
    ASSERT_EQ(static_cast<int>(finished.size()), num_requests) << "trial " << trial;
    for (const auto& [id, seq] : seqs) {
      std::vector<int32_t> solo(seq->token_ids.begin(), seq->token_ids.begin() + seq->num_prompt_tokens);
      Sequence probe;
      probe.token_ids = solo;
      while (static_cast<int32_t>(probe.token_ids.size()) < seq->max_num_tokens)
        probe.token_ids.push_back(next_token(probe));
      ASSERT_EQ(seq->token_ids, probe.token_ids) << "trial " << trial << " sequence " << id;
    }
    ASSERT_EQ(kv.num_free_blocks(), num_blocks);
    ASSERT_EQ(kv.stats().num_used_blocks, 0);
  }
}

std::shared_ptr<Sequence> make_grouped(RequestId id, uint64_t group, int32_t num_prompt_tokens, int32_t max_num_tokens) {
  auto seq = make_seq(id, num_prompt_tokens, max_num_tokens);
  seq->group = group;
  return seq;
}

TEST(Scheduler, FairAdmissionTakesGroupsInTurn) {
  // Group 1 fans out 12 sequences, then groups 2 and 3 arrive with one each: in arrival order they
  // would wait for all 12; groups in turn admit them right after group 1's first.
  KVCacheManager kv(1000, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, /*max_batch_size=*/4, /*max_num_tokens=*/100}, kv);
  for (RequestId id = 1; id <= 12; ++id) scheduler.add(make_grouped(id, 1, 3, 6));
  scheduler.add(make_grouped(13, 2, 3, 6));
  scheduler.add(make_grouped(14, 3, 3, 6));
  ScheduledBatch b1 = scheduler.schedule();
  EXPECT_EQ(ids(b1.seqs), (std::vector<RequestId>{1, 13, 14, 2}));
}

TEST(Scheduler, FairAdmissionGivesAFreedSlotToTheLeastServedGroup) {
  // Group 1 holds every slot; when one frees, a later group's sequence takes it before group 1's
  // next, although group 1's waited longer.
  KVCacheManager kv(1000, 4);
  Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, /*max_batch_size=*/2, /*max_num_tokens=*/100}, kv);
  scheduler.add(make_grouped(1, 1, 3, 4));   // finishes after its first step
  scheduler.add(make_grouped(2, 1, 3, 10));
  for (RequestId id = 3; id <= 6; ++id) scheduler.add(make_grouped(id, 1, 3, 10));
  ScheduledBatch b1 = scheduler.schedule();
  EXPECT_EQ(ids(b1.seqs), (std::vector<RequestId>{1, 2}));
  scheduler.add(make_grouped(7, 2, 3, 10));
  EXPECT_EQ(advance(scheduler, b1), (std::vector<RequestId>{1}));
  ScheduledBatch b2 = scheduler.schedule();
  EXPECT_EQ(ids(context_of(b2)), (std::vector<RequestId>{7}));
  EXPECT_EQ(ids(generation_of(b2)), (std::vector<RequestId>{2}));
}

TEST(Scheduler, OneGroupOrSingletonGroupsKeepArrivalOrder) {
  for (bool one_group : {true, false}) {
    KVCacheManager kv(1000, 4);
    Scheduler scheduler({CapacityPolicy::kGuaranteedNoEvict, /*max_batch_size=*/3, /*max_num_tokens=*/100}, kv);
    for (RequestId id = 1; id <= 5; ++id) scheduler.add(make_grouped(id, one_group ? 7 : id, 3, 6));
    EXPECT_EQ(ids(scheduler.schedule().seqs), (std::vector<RequestId>{1, 2, 3})) << one_group;
  }
}

}  // namespace
}  // namespace rtllm
