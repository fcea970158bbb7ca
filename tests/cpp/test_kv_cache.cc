// KVCacheManager: block accounting against a plain model of what each sequence should hold; prefix
// reuse (sharing, salts, forced hash collisions, LRU eviction, events) and a seeded property test.
#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>
#include <set>

#include "rtllm/kv_cache.h"

namespace rtllm {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<int32_t> iota_tokens(int32_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

TEST(KVCacheManager, AllocateTakesCeilBlocksAndFreeReturnsThem) {
  KVCacheManager kv(/*num_blocks=*/10, /*tokens_per_block=*/4);
  EXPECT_TRUE(kv.can_allocate(40));
  EXPECT_FALSE(kv.can_allocate(41));
  kv.allocate(1, 9);  // 3 blocks
  EXPECT_EQ(kv.block_ids(1).size(), 3u);
  EXPECT_EQ(kv.num_tokens(1), 9);
  EXPECT_EQ(kv.num_free_blocks(), 7);
  KvCacheStats stats = kv.stats();
  EXPECT_EQ(stats.num_total_blocks, 10);
  EXPECT_EQ(stats.num_free_blocks, 7);
  EXPECT_EQ(stats.num_used_blocks, 3);
  EXPECT_EQ(stats.tokens_per_block, 4);
  kv.free(1);
  EXPECT_FALSE(kv.contains(1));
  EXPECT_EQ(kv.num_free_blocks(), 10);
  kv.free(1);  // a second free is a no-op
  EXPECT_EQ(kv.num_free_blocks(), 10);
}

// Steady traffic reuses the blocks it just released (a stack), so the CPU pool's lazily committed
// memory stays at the blocks in use; a FIFO hands every new sequence blocks never touched before.
TEST(KVCacheManager, FreeListReusesWarmBlocksFirst) {
  KVCacheManager kv(/*num_blocks=*/64, /*tokens_per_block=*/4, /*enable_block_reuse=*/false);
  std::set<int32_t> seen;
  for (RequestId seq = 1; seq <= 200; ++seq) {
    kv.allocate(seq, 6);  // 2 blocks
    kv.allocate_slots(seq, 3);  // 9 tokens: a third block
    for (int32_t b : kv.block_ids(seq)) seen.insert(b);
    kv.free(seq);
    kv.check_invariants();
  }
  EXPECT_EQ(seen, (std::set<int32_t>{0, 1, 2}));
  EXPECT_EQ(kv.stats().num_touched_blocks, 3);

  // The block released last is the next one taken; untouched blocks come lowest id first.
  kv.allocate(1, 4);
  kv.allocate(2, 4);
  kv.allocate(3, 4);
  const int32_t released = kv.block_ids(2)[0];
  kv.free(2);
  kv.allocate(4, 4);
  EXPECT_EQ(kv.block_ids(4)[0], released);
  kv.allocate(5, 16);  // 4 blocks: the 3 touched ones are held, so blocks 3..6 are new
  EXPECT_EQ(kv.block_ids(5), (std::vector<int32_t>{3, 4, 5, 6}));
  EXPECT_EQ(kv.stats().num_touched_blocks, 7);
  kv.check_invariants();
}

// Warm-first never costs a cached prefix: free uncached blocks are taken before any reusable one
// is evicted, and reusable ones go least recently used first.
TEST(KVCacheManager, WarmBlocksFirstKeepsCachedPrefixes) {
  KVCacheManager kv(/*num_blocks=*/8, /*tokens_per_block=*/4);
  const std::vector<int32_t> prompt = iota_tokens(9, 100);
  kv.allocate(1, 9);
  kv.store(1, prompt, 9);  // two full blocks registered
  kv.free(1);
  ASSERT_EQ(kv.num_reusable_blocks(), 2);
  std::set<int32_t> seen;
  for (RequestId seq = 2; seq < 100; ++seq) {  // short uncached traffic
    kv.allocate(seq, 3);
    seen.insert(kv.block_ids(seq)[0]);
    kv.free(seq);
  }
  EXPECT_EQ(seen.size(), 1u);
  EXPECT_EQ(kv.stats().num_evicted_blocks, 0);
  EXPECT_EQ(kv.match_prefix(prompt, 9, 0).block_ids.size(), 2u);
  // Once the free blocks run out, the cached prefix is evicted tail first.
  kv.allocate(100, 4 * 7);
  EXPECT_EQ(kv.stats().num_evicted_blocks, 1);
  EXPECT_EQ(kv.match_prefix(prompt, 9, 0).block_ids.size(), 1u);
  EXPECT_EQ(kv.stats().num_touched_blocks, 8);
  kv.check_invariants();
}

TEST(KVCacheManager, AllocateSlotsTakesABlockOnlyWhenTheLastOneIsFull) {
  KVCacheManager kv(3, 4);
  kv.allocate(7, 3);
  EXPECT_EQ(kv.block_ids(7).size(), 1u);
  kv.allocate_slots(7, 1);  // 4 tokens: still one block
  EXPECT_EQ(kv.block_ids(7).size(), 1u);
  kv.allocate_slots(7, 1);  // 5 tokens: two blocks
  EXPECT_EQ(kv.block_ids(7).size(), 2u);
  EXPECT_TRUE(kv.can_allocate_slots(7, 7));   // 12 tokens = 3 blocks
  EXPECT_FALSE(kv.can_allocate_slots(7, 8));  // 13 tokens = 4 blocks
  kv.allocate_slots(7, 7);
  EXPECT_EQ(kv.num_free_blocks(), 0);
  EXPECT_TRUE(kv.can_allocate_slots(7, 0));
  EXPECT_THROW(kv.allocate_slots(7, 1), Error);
  EXPECT_THROW(kv.allocate_slots(7, -1), Error);
  EXPECT_EQ(kv.num_tokens(7), 12);
}

// Lookahead slots are covered by blocks but not counted as tokens; each call sets the reserve, and
// blocks a smaller one leaves empty go back.
TEST(KVCacheManager, AllocateSlotsReservesLookaheadSlots) {
  KVCacheManager kv(6, 4);
  kv.allocate(1, 3);
  kv.allocate_slots(1, 1, /*num_lookahead_tokens=*/3);  // 4 tokens + 3: two blocks
  EXPECT_EQ(kv.num_tokens(1), 4);
  EXPECT_EQ(kv.num_lookahead_tokens(1), 3);
  EXPECT_EQ(kv.block_ids(1).size(), 2u);
  const int32_t second = kv.block_ids(1)[1];
  kv.allocate_slots(1, 2, 2);  // 6 + 2: the reserved block now holds tokens, no new block
  EXPECT_EQ(kv.block_ids(1).size(), 2u);
  EXPECT_EQ(kv.block_ids(1)[1], second);
  EXPECT_FALSE(kv.can_allocate_slots(1, 0, 19));  // 6 + 19 = 7 blocks > 6
  EXPECT_TRUE(kv.can_allocate_slots(1, 0, 18));
  kv.allocate_slots(1, 0, 18);
  EXPECT_EQ(kv.num_free_blocks(), 0);
  kv.allocate_slots(1, 1, 0);  // reserve dropped: 7 tokens in two blocks, four given back
  EXPECT_EQ(kv.num_tokens(1), 7);
  EXPECT_EQ(kv.block_ids(1).size(), 2u);
  EXPECT_EQ(kv.num_free_blocks(), 4);
  EXPECT_THROW(kv.allocate_slots(1, 0, -1), Error);
  kv.check_invariants();
}

// Rewind drops slots after the stored blocks only: the blocks it empties go back to the free list,
// the one it cuts into is private, and a stored (shared or registered) block is never cut into.
TEST(KVCacheManager, RewindReleasesEmptiedBlocksAndNeverCutsIntoStoredOnes) {
  KVCacheManager kv(8, 4);
  const std::vector<int32_t> a = iota_tokens(14, 0);
  kv.allocate(1, 14);           // 4 blocks
  kv.store(1, a, 9);            // blocks 0 and 1 registered
  const std::vector<int32_t> held = kv.block_ids(1);
  EXPECT_TRUE(kv.can_rewind(1, 6));   // 8 tokens left: the stored blocks stay whole
  EXPECT_FALSE(kv.can_rewind(1, 7));  // would cut into stored block 1
  EXPECT_FALSE(kv.can_rewind(1, -1));
  EXPECT_THROW(kv.rewind(1, 7), Error);
  EXPECT_EQ(kv.num_tokens(1), 14);  // unchanged by the refused rewind
  kv.check_invariants();
  kv.rewind(1, 3);  // 11 tokens: still 3 blocks; the last one is private, cut to 3 tokens
  EXPECT_EQ(kv.block_ids(1), std::vector<int32_t>(held.begin(), held.begin() + 3));
  EXPECT_EQ(kv.num_free_blocks(), 5);
  kv.rewind(1, 3);  // 8 tokens: two blocks, the third back on the free list unregistered
  EXPECT_EQ(kv.block_ids(1).size(), 2u);
  EXPECT_EQ(kv.num_free_blocks(), 6);
  EXPECT_FALSE(kv.is_registered(held[2]));
  kv.check_invariants();

  // A sequence sharing a's two blocks may drop its own slots, never the shared ones.
  PrefixMatch m = kv.match_prefix(a, 10, 0);
  ASSERT_EQ(m.block_ids.size(), 2u);
  kv.allocate(2, 10, m);
  kv.finish_copies();
  EXPECT_TRUE(kv.can_rewind(2, 2));
  EXPECT_FALSE(kv.can_rewind(2, 3));
  kv.rewind(2, 2);
  EXPECT_EQ(kv.block_ids(2), std::vector<int32_t>(held.begin(), held.begin() + 2));
  EXPECT_EQ(kv.ref_count(held[0]), 2);
  EXPECT_TRUE(kv.can_allocate_slots(2, 1));
  kv.allocate_slots(2, 1);  // the next token goes to a new private block
  EXPECT_NE(kv.block_ids(2)[2], held[1]);
  EXPECT_EQ(kv.block_tokens(held[1]), std::vector<int32_t>({4, 5, 6, 7}));
  kv.check_invariants();

  // The lookahead reserve survives a rewind, after the slots left.
  kv.allocate_slots(2, 2, /*num_lookahead_tokens=*/5);  // 11 + 5: 4 blocks
  kv.rewind(2, 3);                                       // 8 + 5: still 4 blocks
  EXPECT_EQ(kv.num_lookahead_tokens(2), 5);
  EXPECT_EQ(kv.block_ids(2).size(), 4u);
  kv.rewind(2, 0);
  kv.check_invariants();
  kv.free(1);
  kv.free(2);
  EXPECT_EQ(kv.num_free_blocks(), 8);
}

// Rewinding the block a partial copy goes into drops the copy and unpins its source.
TEST(KVCacheManager, RewindDropsACopyIntoAReleasedBlock) {
  KVCacheManager kv(8, 4);
  const std::vector<int32_t> a = iota_tokens(8, 0);
  kv.allocate(1, 8);
  kv.store(1, a, 8);
  const int32_t a1 = kv.block_ids(1)[1];
  kv.free(1);
  const std::vector<int32_t> c = {0, 1, 2, 3, 4, 5, 9};
  PrefixMatch m = kv.match_prefix(c, 7, 0);
  ASSERT_EQ(m.partial_block_id, a1);
  kv.allocate(2, 7, m);
  ASSERT_EQ(kv.pending_copies().size(), 1u);
  EXPECT_EQ(kv.ref_count(a1), 1);  // pinned
  kv.rewind(2, 3);  // 4 tokens: the copy's destination is released
  EXPECT_TRUE(kv.pending_copies().empty());
  EXPECT_EQ(kv.ref_count(a1), 0);
  EXPECT_TRUE(kv.is_registered(a1));
  kv.check_invariants();
}

TEST(KVCacheManager, RejectsMisuse) {
  EXPECT_THROW(KVCacheManager(0, 4), InvalidArgument);
  EXPECT_THROW(KVCacheManager(4, 0), InvalidArgument);
  KVCacheManager kv(2, 4);
  kv.allocate(1, 4);
  EXPECT_THROW(kv.allocate(1, 1), Error);   // already holds blocks
  EXPECT_THROW(kv.allocate(2, 5), Error);   // needs 2 blocks, 1 free
  EXPECT_THROW(kv.allocate(2, 0), Error);
  EXPECT_THROW(kv.block_ids(3), Error);     // unknown sequence
  EXPECT_THROW(kv.can_allocate_slots(3, 1), Error);
  EXPECT_THROW(kv.rewind(3, 1), Error);
}

// Random allocate/append/free against a model that only tracks each sequence's token count:
// every sequence holds exactly ceil(tokens / tokens_per_block) blocks, no block is held twice and
// free + held == total.
TEST(KVCacheManager, RandomOperationsKeepInvariants) {
  for (int32_t tokens_per_block : {1, 3, 16}) {
    const int32_t num_blocks = 40;
    KVCacheManager kv(num_blocks, tokens_per_block);
    std::map<RequestId, int64_t> model;
    std::mt19937 rng(tokens_per_block);
    for (int op = 0; op < 3000; ++op) {
      RequestId seq = rng() % 12;
      int64_t n = 1 + rng() % (3 * tokens_per_block + 2);
      int held_blocks = 0;
      for (auto& [s, t] : model) held_blocks += static_cast<int>(ceil_div(t, tokens_per_block));
      int free_blocks = num_blocks - held_blocks;
      switch (rng() % 3) {
        case 0:
          if (model.count(seq)) break;
          ASSERT_EQ(kv.can_allocate(n), ceil_div(n, tokens_per_block) <= free_blocks);
          if (kv.can_allocate(n)) kv.allocate(seq, n), model[seq] = n;
          break;
        case 1: {
          if (!model.count(seq)) break;
          int64_t need = ceil_div(model[seq] + n, tokens_per_block) - ceil_div(model[seq], tokens_per_block);
          ASSERT_EQ(kv.can_allocate_slots(seq, n), need <= free_blocks);
          if (kv.can_allocate_slots(seq, n)) kv.allocate_slots(seq, n), model[seq] += n;
          break;
        }
        default:
          kv.free(seq);
          model.erase(seq);
      }
      std::set<int32_t> seen;
      int64_t num_held = 0;
      for (auto& [s, t] : model) {
        ASSERT_EQ(kv.num_tokens(s), t);
        ASSERT_EQ(static_cast<int64_t>(kv.block_ids(s).size()), ceil_div(t, tokens_per_block));
        for (int32_t b : kv.block_ids(s)) {
          ASSERT_GE(b, 0);
          ASSERT_LT(b, num_blocks);
          ASSERT_TRUE(seen.insert(b).second) << "block " << b << " held twice";
        }
        num_held += static_cast<int64_t>(kv.block_ids(s).size());
      }
      ASSERT_EQ(kv.num_free_blocks() + num_held, num_blocks);
      ASSERT_EQ(kv.stats().num_used_blocks, num_held);
    }
  }
}

// ---------------------------------------------------------------- prefix reuse

uint64_t always_collide(uint64_t, uint64_t, const int32_t*, int32_t) { return 42; }

TEST(KVCacheManager, StoredFullBlocksAreSharedByALaterSequence) {
  KVCacheManager kv(10, 4);
  std::vector<int32_t> a = iota_tokens(10, 100);
  kv.allocate(1, 10);
  kv.store(1, a, 10);  // blocks 0 and 1 are full: registered; the third holds 2 tokens
  EXPECT_TRUE(kv.is_registered(kv.block_ids(1)[0]));
  EXPECT_TRUE(kv.is_registered(kv.block_ids(1)[1]));
  EXPECT_FALSE(kv.is_registered(kv.block_ids(1)[2]));

  std::vector<int32_t> b = a;
  b[9] = 7;  // same first 9 tokens
  PrefixMatch m = kv.match_prefix(b, 10, 0);
  ASSERT_EQ(m.block_ids.size(), 2u);
  EXPECT_EQ(m.num_looked_up_blocks, 2);
  EXPECT_EQ(kv.num_blocks_to_take(10, m), 1);  // only the third block is new
  kv.allocate(2, 10, m);
  EXPECT_EQ(kv.block_ids(2)[0], kv.block_ids(1)[0]);
  EXPECT_EQ(kv.block_ids(2)[1], kv.block_ids(1)[1]);
  EXPECT_NE(kv.block_ids(2)[2], kv.block_ids(1)[2]);
  EXPECT_EQ(kv.ref_count(kv.block_ids(1)[0]), 2);
  EXPECT_EQ(kv.stats().num_reused_tokens, 8);
  kv.check_invariants();

  // At most num_tokens - 1 tokens are reused: an 8-token prompt takes one block, not two.
  EXPECT_EQ(kv.match_prefix(a, 8, 0).block_ids.size(), 1u);
  // A different first block shares nothing, even if the second is equal.
  std::vector<int32_t> c = a;
  c[0] = 1;
  EXPECT_TRUE(kv.match_prefix(c, 10, 0).block_ids.empty());
  // The same tokens with a salt (another extra key) share nothing.
  EXPECT_TRUE(kv.match_prefix(a, 10, cache_salt_key(std::string("tenant"))).block_ids.empty());
  kv.free(1);
  kv.free(2);
  kv.check_invariants();
  EXPECT_EQ(kv.num_reusable_blocks(), 2);
  EXPECT_EQ(kv.num_free_blocks(), 10);
}

TEST(KVCacheManager, ReuseOffRegistersNothing) {
  KVCacheManager kv(10, 4, /*enable_block_reuse=*/false);
  std::vector<int32_t> a = iota_tokens(10, 0);
  kv.allocate(1, 10);
  kv.store(1, a, 10);
  EXPECT_TRUE(kv.match_prefix(a, 10, 0).block_ids.empty());
  kv.free(1);
  EXPECT_EQ(kv.num_reusable_blocks(), 0);
}

// With a hash that always collides every lookup finds every registered block as a candidate; only
// the stored tokens and the parent's identity decide, so no wrong block is ever shared.
TEST(KVCacheManager, HashCollisionsNeverShareWrongData) {
  KVCacheManager kv(20, 4);
  kv.set_hash_function(always_collide);
  std::vector<int32_t> a = iota_tokens(12, 0), b = iota_tokens(12, 50);
  kv.allocate(1, 12);
  kv.store(1, a, 12);
  kv.allocate(2, 12);
  kv.store(2, b, 12);
  // Same second block as `a` after a different first block: the parent differs, so no match.
  std::vector<int32_t> c = b;
  std::copy(a.begin() + 4, a.begin() + 8, c.begin() + 4);
  PrefixMatch m = kv.match_prefix(c, 12, 0);
  ASSERT_EQ(m.block_ids.size(), 1u);
  EXPECT_EQ(m.block_ids[0], kv.block_ids(2)[0]);
  PrefixMatch ma = kv.match_prefix(a, 12, 0);
  ASSERT_EQ(ma.block_ids.size(), 2u);
  for (size_t i = 0; i < ma.block_ids.size(); ++i)
    EXPECT_EQ(kv.block_tokens(ma.block_ids[i]), std::vector<int32_t>(a.begin() + 4 * i, a.begin() + 4 * i + 4));
  kv.check_invariants();
}

TEST(KVCacheManager, ReusableBlocksAreEvictedLeastRecentlyUsedTailFirst) {
  KVCacheManager kv(4, 2, true, /*event_buffer_max_size=*/100);
  std::vector<int32_t> a = iota_tokens(8, 0);
  kv.allocate(1, 8);
  kv.store(1, a, 8);  // 4 blocks registered
  std::vector<int32_t> held = kv.block_ids(1);
  kv.free(1);
  EXPECT_EQ(kv.num_reusable_blocks(), 4);
  EXPECT_EQ(kv.num_free_blocks(), 4);
  kv.allocate(2, 2);  // takes one block: the tail of `a` goes first
  EXPECT_EQ(kv.block_ids(2)[0], held[3]);
  EXPECT_EQ(kv.match_prefix(a, 8, 0).block_ids.size(), 3u);  // (8 - 1) / 2 = 3 blocks still cached
  kv.check_invariants();
  std::vector<KvCacheEvent> events = kv.take_events();
  ASSERT_EQ(events.size(), 6u);  // created, 4 stored, 1 removed
  EXPECT_EQ(events[0].kind, KvCacheEventKind::kCreated);
  EXPECT_EQ(events[0].num_blocks, 4);
  for (int i = 1; i <= 4; ++i) {
    EXPECT_EQ(events[i].kind, KvCacheEventKind::kStored);
    EXPECT_EQ(events[i].token_offset, 2 * (i - 1));
    EXPECT_EQ(events[i].token_ids, std::vector<int32_t>({2 * (i - 1), 2 * (i - 1) + 1}));
    EXPECT_EQ(events[i].parent_hash, i == 1 ? 0u : events[i - 1].block_hash);
    EXPECT_EQ(events[i].event_id, i);
  }
  EXPECT_EQ(events[5].kind, KvCacheEventKind::kRemoved);
  EXPECT_EQ(events[5].block_hash, events[4].block_hash);
  EXPECT_EQ(events[5].token_offset, 6);
  EXPECT_TRUE(kv.take_events().empty());
  EXPECT_EQ(kv.stats().num_evicted_blocks, 1);
}

TEST(KVCacheManager, EventBufferIsBounded) {
  KVCacheManager kv(8, 1, true, /*event_buffer_max_size=*/3);
  kv.allocate(1, 8);
  kv.store(1, iota_tokens(8, 0), 8);  // created + 8 stored
  std::vector<KvCacheEvent> events = kv.take_events();
  ASSERT_EQ(events.size(), 3u);  // the newest three
  EXPECT_EQ(events[0].event_id, 6);
  EXPECT_EQ(events[2].event_id, 8);
  KVCacheManager quiet(8, 1);  // default: no events
  EXPECT_TRUE(quiet.take_events().empty());
  EXPECT_THROW(KVCacheManager(8, 1, true, -1), InvalidArgument);
}

// ---------------------------------------------------------------- partial reuse (copy-on-write)

// Two cached continuations of one first block; a request matching the first block takes the leading
// tokens of the continuation sharing the longest prefix with its own, through a copy into a private
// block. The source stays registered and unchanged; it is pinned until the copy is acknowledged.
TEST(KVCacheManager, PartialReuseCopiesTheLongestCommonPrefix) {
  KVCacheManager kv(16, 4);
  const std::vector<int32_t> a = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<int32_t> b = {0, 1, 2, 3, 4, 5, 9, 9, 8};
  kv.allocate(1, 9);
  kv.store(1, a, 9);
  PrefixMatch mb = kv.match_prefix(b, 9, 0);  // shares block 0 and 3 tokens of a's block 1
  ASSERT_EQ(mb.block_ids.size(), 1u);
  EXPECT_EQ(mb.partial_block_id, kv.block_ids(1)[1]);
  EXPECT_EQ(mb.num_partial_tokens, 2);
  kv.allocate(2, 9, mb);
  kv.finish_copies();
  kv.store(2, b, 9);
  const int32_t a1 = kv.block_ids(1)[1], b1 = kv.block_ids(2)[1];
  ASSERT_TRUE(kv.is_registered(a1) && kv.is_registered(b1));
  kv.free(1);
  kv.free(2);

  const std::vector<int32_t> c = {0, 1, 2, 3, 4, 5, 6, 8, 1};
  PrefixMatch m = kv.match_prefix(c, 9, 0);
  ASSERT_EQ(m.block_ids.size(), 1u);
  EXPECT_EQ(m.partial_block_id, a1);  // 3 shared tokens against b1's 2
  EXPECT_EQ(m.num_partial_tokens, 3);
  EXPECT_EQ(m.num_cached_tokens(4), 7);
  // One new block for the copy, one for the last token, plus the prefix block and the pinned
  // source, which nobody holds now.
  EXPECT_EQ(kv.num_blocks_to_take(9, m), 4);
  const KvCacheStats before = kv.stats();
  kv.allocate(3, 9, m);
  ASSERT_EQ(kv.pending_copies().size(), 1u);
  EXPECT_EQ(kv.pending_copies()[0], std::make_pair(a1, kv.block_ids(3)[1]));
  EXPECT_NE(kv.block_ids(3)[1], a1);             // never the shared block itself
  EXPECT_FALSE(kv.is_registered(kv.block_ids(3)[1]));  // private until full
  EXPECT_EQ(kv.ref_count(a1), 1);                // the pin
  kv.check_invariants();
  const KvCacheStats after = kv.stats();
  EXPECT_EQ(after.num_reused_tokens - before.num_reused_tokens, 4 + 3);
  EXPECT_EQ(after.num_partial_reused_blocks - before.num_partial_reused_blocks, 1);
  EXPECT_EQ(after.num_reused_blocks - before.num_reused_blocks, 1);
  kv.finish_copies();
  EXPECT_TRUE(kv.pending_copies().empty());
  EXPECT_EQ(kv.ref_count(a1), 0);
  kv.check_invariants();
  kv.store(3, c, 9);  // c's block 1 is full now: registered under its own tokens
  EXPECT_TRUE(kv.is_registered(kv.block_ids(3)[1]));
  EXPECT_EQ(kv.block_tokens(kv.block_ids(3)[1]), std::vector<int32_t>({4, 5, 6, 8}));
  EXPECT_EQ(kv.block_tokens(a1), std::vector<int32_t>({4, 5, 6, 7}));  // the source is unchanged
  kv.free(3);
  kv.check_invariants();
  EXPECT_EQ(kv.num_free_blocks(), 16);
}

// The partial block never covers the last token (its logits are needed) and needs
// min_partial_reuse_tokens shared tokens; partial reuse is off with block reuse off or its switch off.
TEST(KVCacheManager, PartialReuseLimits) {
  const std::vector<int32_t> a = iota_tokens(12, 0);
  auto cached = [&](KVCacheManager& kv) {
    kv.allocate(1, 12);
    kv.store(1, a, 12);
    kv.free(1);
  };
  KVCacheManager kv(16, 4);
  cached(kv);
  PrefixMatch m = kv.match_prefix(a, 7, 0);  // 1 full block, then tokens 4, 5 of 4..6 (6 is the last)
  EXPECT_EQ(m.block_ids.size(), 1u);
  EXPECT_EQ(m.num_partial_tokens, 2);
  m = kv.match_prefix(a, 12, 0);  // 2 full blocks, then 3 of block 2 (at most tokens_per_block - 1)
  EXPECT_EQ(m.block_ids.size(), 2u);
  EXPECT_EQ(m.num_partial_tokens, 3);
  EXPECT_EQ(m.num_cached_tokens(4), 11);
  m = kv.match_prefix(a, 5, 0);  // 1 block: tokens 0..3, the last token 4 is computed
  EXPECT_EQ(m.num_partial_tokens, 0);
  EXPECT_EQ(m.partial_block_id, -1);
  // No full block matched: the candidates are the first blocks.
  const std::vector<int32_t> d = {0, 1, 7, 7, 7};
  m = kv.match_prefix(d, 5, 0);
  EXPECT_TRUE(m.block_ids.empty());
  EXPECT_EQ(m.num_partial_tokens, 2);
  EXPECT_TRUE(kv.match_prefix(d, 5, cache_salt_key(std::string("s"))).partial_block_id < 0);

  KVCacheManager picky(16, 4, true, 0, true, /*min_partial_reuse_tokens=*/3);
  cached(picky);
  EXPECT_EQ(picky.match_prefix(a, 7, 0).num_partial_tokens, 0);  // 2 < 3
  EXPECT_EQ(picky.match_prefix(a, 12, 0).num_partial_tokens, 3);
  KVCacheManager off(16, 4, true, 0, /*enable_partial_reuse=*/false);
  cached(off);
  EXPECT_EQ(off.match_prefix(a, 12, 0).partial_block_id, -1);
  KVCacheManager no_reuse(16, 4, /*enable_block_reuse=*/false);
  cached(no_reuse);
  EXPECT_FALSE(no_reuse.enable_partial_reuse());
  EXPECT_EQ(no_reuse.match_prefix(a, 12, 0).partial_block_id, -1);
  EXPECT_THROW(KVCacheManager(4, 4, true, 0, true, 0), InvalidArgument);
}

// Among many cached first blocks (the children of the root, kept sorted), the partial match is the
// longest shared prefix that a scan of every registered block finds, with evictions, salts and
// duplicate contents mixed in; a small alphabet makes long shared prefixes common.
TEST(KVCacheManager, PartialReuseFindsTheLongestPrefixAmongManyChildren) {
  constexpr int32_t kTokensPerBlock = 6, kNumBlocks = 64;
  KVCacheManager kv(kNumBlocks, kTokensPerBlock);
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> token(0, 3), salt(0, 1);
  auto random_tokens = [&](int32_t n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = token(rng);
    return t;
  };
  std::map<int32_t, uint64_t> salt_of;  // registered first block -> its extra key, as this test stored it
  RequestId next = 1;
  for (int round = 0; round < 400; ++round) {
    const std::vector<int32_t> query = random_tokens(kTokensPerBlock);  // no full block: the root's children
    const uint64_t key = salt(rng) ? cache_salt_key(std::string("s")) : 0;
    const PrefixMatch m = kv.match_prefix(query, kTokensPerBlock, key);
    int32_t best = 0;
    for (int32_t b = 0; b < kNumBlocks; ++b) {
      if (!kv.is_registered(b) || salt_of.at(b) != key) continue;
      const std::vector<int32_t> stored = kv.block_tokens(b);
      const auto shared = std::mismatch(query.begin(), query.end() - 1, stored.begin()).first - query.begin();
      best = std::max(best, static_cast<int32_t>(shared));
    }
    ASSERT_EQ(m.num_partial_tokens, best) << "round " << round;
    if (best > 0) {
      const std::vector<int32_t> source = kv.block_tokens(m.partial_block_id);
      EXPECT_TRUE(std::equal(query.begin(), query.begin() + best, source.begin()));
    }
    // Cache a prompt of one full block and a bit (its first block becomes a child of the root).
    const RequestId seq = next++;
    const std::vector<int32_t> prompt = random_tokens(kTokensPerBlock + 1);
    PrefixMatch reuse = kv.match_prefix(prompt, kTokensPerBlock + 1, key);
    if (!kv.can_allocate(kTokensPerBlock + 1, reuse)) reuse = PrefixMatch{};
    kv.allocate(seq, kTokensPerBlock + 1, reuse, key);
    kv.finish_copies();
    kv.store(seq, prompt, kTokensPerBlock + 1);
    salt_of[kv.block_ids(seq)[0]] = key;
    kv.free(seq);
    if (round % 50 == 0) kv.check_invariants();
  }
  EXPECT_GT(kv.stats().num_evicted_blocks, 0);
  kv.check_invariants();
}

// A pool with no room to spare: the pinned source is never evicted for the sequence's own new
// blocks, and once unpinned and evicted it leaves its parent's children (no stale candidate).
TEST(KVCacheManager, PartialSourceIsPinnedAndLeavesTheChildrenWhenEvicted) {
  KVCacheManager kv(4, 4, true, /*event_buffer_max_size=*/100);
  const std::vector<int32_t> a = iota_tokens(8, 0);
  kv.allocate(1, 8);
  kv.store(1, a, 8);
  const int32_t a0 = kv.block_ids(1)[0], a1 = kv.block_ids(1)[1];
  kv.free(1);  // both reusable; a1 is the least recently used
  std::vector<int32_t> c = {0, 1, 2, 3, 4, 5, 9, 9, 9, 9, 9, 9, 9};
  PrefixMatch m = kv.match_prefix(c, 13, 0);
  ASSERT_EQ(m.partial_block_id, a1);
  EXPECT_FALSE(kv.can_allocate(13, m));  // a0 + pinned a1 + 3 new > 4
  ASSERT_TRUE(kv.can_allocate(12, m));   // a0 + pinned a1 + 2 new
  kv.allocate(2, 12, m);
  for (int32_t b : kv.block_ids(2)) EXPECT_NE(b, a1);
  EXPECT_TRUE(kv.is_registered(a1));
  EXPECT_EQ(kv.num_free_blocks(), 0);
  kv.check_invariants();
  kv.finish_copies();
  EXPECT_EQ(kv.num_free_blocks(), 1);  // a1, reusable again
  kv.allocate_slots(2, 1);             // takes (evicts) a1
  EXPECT_FALSE(kv.is_registered(a1));
  kv.check_invariants();
  kv.free(2);
  EXPECT_EQ(kv.match_prefix(c, 13, 0).partial_block_id, -1);
  EXPECT_EQ(kv.match_prefix(a, 8, 0).block_ids, std::vector<int32_t>({a0}));
  kv.check_invariants();
}

// Property test: random allocate (sharing the longest cached prefix: full blocks and a partial one) /
// copy / allocate_slots with lookahead / a speculative step (1 + k tokens computed, the accepted ones
// stored, the rejected ones rewound) / rewind / store / free, over many seeds, under pool pressure (so
// reusable blocks get evicted), with an honest and an always-colliding hash. A model keeps each
// sequence's tokens, computed tokens, stored blocks and lookahead, and what every block's K/V slots
// hold: "computing" writes a sequence's tokens into its slots; a partial match's copy runs at a random
// later point (before the sequence computes, as a step does). After every operation:
// - check_invariants: every block in exactly one state (none leaked), ref counts equal the holders
//   (sequences and copy pins), no block held twice by a sequence, block count ==
//   ceil((tokens + lookahead) / tokens_per_block), blocks past the stored ones private;
// - the manager's view of every sequence equals the model's: tokens, lookahead, how far it may rewind;
// - every computed or reused slot of a sequence whose copy ran holds the sequence's token there, and
//   every registered block's slots hold the tokens it is registered under: no shared or registered
//   block was written, copies moved the right data, and no block stays registered for tokens other
//   than those its K/V are of.
// At the end every block is back.
class RandomKvOperations {
 public:
  RandomKvOperations(uint32_t seed, int32_t tokens_per_block, bool collide)
      : tpb_(tokens_per_block),
        kv_(kNumBlocks, tokens_per_block),
        rng_(seed),
        slots_(kNumBlocks, std::vector<int32_t>(tokens_per_block, -1)) {
    if (collide) kv_.set_hash_function(always_collide);
    for (int i = 0; i < 3; ++i) {  // a few shared stems so that prefixes repeat
      std::vector<int32_t> stem(3 * tpb_ + 1);
      for (auto& t : stem) t = token();
      stems_.push_back(stem);
    }
  }

  void run(int num_ops) {
    for (int op = 0; op < num_ops; ++op) {
      const RequestId id = rng_() % 10;
      const uint32_t kind = rng_() % 8;
      if (kind <= 1) {
        if (!seqs_.count(id)) allocate(id);
      } else if (kind == 6) {
        if (rng_() % 2) run_copies();
      } else if (seqs_.count(id)) {
        Seq& s = seqs_[id];
        if (kind == 2) {
          step(id, s);
        } else if (kind == 3) {
          grow(id, s, rng_() % 4, rng_() % (2 * tpb_ + 1));
        } else if (kind == 4) {
          speculative_step(id, s);
        } else if (kind == 5) {
          rewind(id, s, rng_() % std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) + 1, 2 * tpb_ + 2));
        } else if (rng_() % 2) {
          kv_.free(id);
          seqs_.erase(id);
        }
      }
      check();
      if (::testing::Test::HasFatalFailure()) return;
    }
  }

  void finish() {
    EXPECT_GT(num_reused_tokens_, 0);
    EXPECT_EQ(kv_.stats().num_reused_tokens, num_reused_tokens_);
    EXPECT_EQ(kv_.stats().num_partial_reused_blocks, num_partial_);
    if (tpb_ > 1) {
      EXPECT_GT(num_partial_, 0);
    }
    EXPECT_GT(kv_.stats().num_evicted_blocks, 0);
    EXPECT_GT(num_rewinds_, 0);
    EXPECT_GT(num_refused_rewinds_, 0);
    EXPECT_GT(num_lookaheads_, 0);
    for (const auto& [id, s] : seqs_) kv_.free(id);
    run_copies();
    kv_.check_invariants();
    EXPECT_EQ(kv_.num_free_blocks(), kNumBlocks);
    EXPECT_EQ(kv_.stats().num_used_blocks, 0);
  }

 private:
  static constexpr int32_t kNumBlocks = 24;
  struct Seq {
    std::vector<int32_t> tokens;     // all its tokens: one per slot
    int64_t num_computed = 0;        // tokens whose K/V are written or reused
    int64_t num_stored_blocks = 0;   // leading blocks taken from the cache or stored: never rewound
    int64_t num_lookahead = 0;
    bool copy_pending = false;       // its partial block is not copied yet
  };

  int32_t token() { return static_cast<int32_t>(rng_() % 3); }

  void allocate(RequestId id) {
    std::vector<int32_t> t = stems_[rng_() % stems_.size()];
    t.resize(1 + rng_() % t.size());
    for (int extra = rng_() % 3; extra > 0; --extra) t.push_back(token());
    const int64_t n = static_cast<int64_t>(t.size());
    PrefixMatch m = kv_.match_prefix(t, n, 0);
    const int64_t num_cached = m.num_cached_tokens(tpb_);
    ASSERT_LT(num_cached, n);
    for (size_t i = 0; i < m.block_ids.size(); ++i)
      ASSERT_EQ(kv_.block_tokens(m.block_ids[i]), std::vector<int32_t>(t.begin() + i * tpb_, t.begin() + (i + 1) * tpb_));
    if (m.partial_block_id >= 0) {
      ASSERT_LT(m.num_partial_tokens, tpb_);
      const auto next = t.begin() + static_cast<int64_t>(m.block_ids.size()) * tpb_;
      ASSERT_TRUE(std::equal(next, next + m.num_partial_tokens, kv_.block_tokens(m.partial_block_id).begin()));
    }
    if (!kv_.can_allocate(n, m)) return;
    kv_.allocate(id, n, m);
    num_partial_ += m.partial_block_id >= 0;
    num_reused_tokens_ += num_cached;
    seqs_[id] = Seq{t, num_cached, static_cast<int64_t>(m.block_ids.size()), 0, m.partial_block_id >= 0};
  }

  void run_copies() {
    for (const auto& [src, dst] : kv_.pending_copies()) slots_[dst] = slots_[src];
    kv_.finish_copies();
    for (auto& [id, s] : seqs_) s.copy_pending = false;
  }

  // A forward: writes the K/V of the tokens not computed yet into the sequence's slots.
  void compute(RequestId id, Seq& s) {
    run_copies();  // a step copies before its forward
    const std::vector<int32_t>& ids = kv_.block_ids(id);
    for (size_t pos = s.num_computed; pos < s.tokens.size(); ++pos)
      slots_[ids[pos / tpb_]][pos % tpb_] = s.tokens[pos];
    s.num_computed = static_cast<int64_t>(s.tokens.size());
  }

  void store(RequestId id, Seq& s, int64_t num_tokens) {
    kv_.store(id, s.tokens, num_tokens);
    s.num_stored_blocks = std::max(s.num_stored_blocks, num_tokens / tpb_);
  }

  // allocate_slots when the model says the blocks suffice; false otherwise.
  bool grow(RequestId id, Seq& s, int64_t num_new, int64_t num_lookahead) {
    const int64_t num_needed = ceil_div(static_cast<int64_t>(s.tokens.size()) + num_new + num_lookahead, tpb_) -
                               static_cast<int64_t>(kv_.block_ids(id).size());
    const bool can = num_needed <= kv_.num_free_blocks();
    EXPECT_EQ(kv_.can_allocate_slots(id, num_new, num_lookahead), can);
    if (!can) return false;
    kv_.allocate_slots(id, num_new, num_lookahead);
    for (int64_t i = 0; i < num_new; ++i) s.tokens.push_back(token());
    s.num_lookahead = num_lookahead;
    num_lookaheads_ += num_lookahead > 0;
    return true;
  }

  // A plain step: compute everything, store it, then maybe take the next token's slot.
  void step(RequestId id, Seq& s) {
    compute(id, s);
    store(id, s, s.num_computed);
    if (rng_() % 2) grow(id, s, 1, 0);
  }

  // Speculative decoding: 1 + k tokens fed and computed, the accepted ones stored, the rest rewound.
  void speculative_step(RequestId id, Seq& s) {
    const int64_t k = rng_() % 4;
    if (!grow(id, s, 1 + k, rng_() % (k + 1))) return;
    compute(id, s);
    const int64_t num_rejected = rng_() % (k + 1);
    store(id, s, static_cast<int64_t>(s.tokens.size()) - num_rejected);
    ASSERT_TRUE(kv_.can_rewind(id, num_rejected));
    rewind(id, s, num_rejected);
  }

  void rewind(RequestId id, Seq& s, int64_t num_tokens) {
    const bool can = num_tokens <= static_cast<int64_t>(s.tokens.size()) - s.num_stored_blocks * tpb_;
    ASSERT_EQ(kv_.can_rewind(id, num_tokens), can);
    if (!can) {
      EXPECT_THROW(kv_.rewind(id, num_tokens), Error);
      ++num_refused_rewinds_;
      return;
    }
    kv_.rewind(id, num_tokens);
    s.tokens.resize(s.tokens.size() - num_tokens);
    s.num_computed = std::min(s.num_computed, static_cast<int64_t>(s.tokens.size()));
    num_rewinds_ += num_tokens > 0;
  }

  void check() {
    kv_.check_invariants();
    for (const auto& [id, s] : seqs_) {
      const std::vector<int32_t>& ids = kv_.block_ids(id);
      const int64_t n = static_cast<int64_t>(s.tokens.size());
      ASSERT_EQ(kv_.num_tokens(id), n);
      ASSERT_EQ(kv_.num_lookahead_tokens(id), s.num_lookahead);
      ASSERT_EQ(static_cast<int64_t>(ids.size()), ceil_div(n + s.num_lookahead, tpb_));
      ASSERT_TRUE(kv_.can_rewind(id, n - s.num_stored_blocks * tpb_));
      ASSERT_FALSE(kv_.can_rewind(id, n - s.num_stored_blocks * tpb_ + 1));
      if (!s.copy_pending) {
        for (int64_t pos = 0; pos < s.num_computed; ++pos)
          ASSERT_EQ(slots_[ids[pos / tpb_]][pos % tpb_], s.tokens[pos]) << "sequence " << id << " slot " << pos;
      }
      for (size_t i = 0; i < ids.size(); ++i) {
        if (!kv_.is_registered(ids[i])) continue;
        ASSERT_EQ(kv_.block_tokens(ids[i]),
                  std::vector<int32_t>(s.tokens.begin() + i * tpb_, s.tokens.begin() + (i + 1) * tpb_))
            << "sequence " << id << " block " << i;
      }
    }
    for (int32_t b = 0; b < kNumBlocks; ++b)
      if (kv_.is_registered(b)) {
        ASSERT_EQ(slots_[b], kv_.block_tokens(b)) << "registered block " << b;
      }
  }

  const int32_t tpb_;
  KVCacheManager kv_;
  std::mt19937 rng_;
  std::vector<std::vector<int32_t>> slots_;  // [num_blocks][tokens_per_block]: the token each slot's K/V is of
  std::vector<std::vector<int32_t>> stems_;
  std::map<RequestId, Seq> seqs_;
  int64_t num_reused_tokens_ = 0, num_partial_ = 0, num_rewinds_ = 0, num_refused_rewinds_ = 0, num_lookaheads_ = 0;
};

TEST(KVCacheManager, RandomOperationsWithReuseKeepInvariants) {
  for (bool collide : {false, true})
    for (int32_t tokens_per_block : {1, 2, 4, 8})
      for (uint32_t seed = 0; seed < 25; ++seed) {
        SCOPED_TRACE(::testing::Message() << "collide " << collide << ", tokens_per_block " << tokens_per_block
                                          << ", seed " << seed);
        RandomKvOperations ops(seed * 100 + tokens_per_block * 7 + collide, tokens_per_block, collide);
        ops.run(3000);
        ASSERT_FALSE(HasFatalFailure());
        ops.finish();
      }
}

}  // namespace
}  // namespace rtllm
