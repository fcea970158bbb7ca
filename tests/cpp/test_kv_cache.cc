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

TEST(KVCacheManager, AppendTakesABlockOnlyWhenTheLastOneIsFull) {
  KVCacheManager kv(3, 4);
  kv.allocate(7, 3);
  EXPECT_EQ(kv.block_ids(7).size(), 1u);
  kv.append(7, 1);  // 4 tokens: still one block
  EXPECT_EQ(kv.block_ids(7).size(), 1u);
  kv.append(7, 1);  // 5 tokens: two blocks
  EXPECT_EQ(kv.block_ids(7).size(), 2u);
  EXPECT_TRUE(kv.can_append(7, 7));   // 12 tokens = 3 blocks
  EXPECT_FALSE(kv.can_append(7, 8));  // 13 tokens = 4 blocks
  kv.append(7, 7);
  EXPECT_EQ(kv.num_free_blocks(), 0);
  EXPECT_TRUE(kv.can_append(7, 0));
  EXPECT_THROW(kv.append(7, 1), Error);
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
  EXPECT_THROW(kv.can_append(3, 1), Error);
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
          ASSERT_EQ(kv.can_append(seq, n), need <= free_blocks);
          if (kv.can_append(seq, n)) kv.append(seq, n), model[seq] += n;
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

std::vector<int32_t> iota_tokens(int32_t n, int32_t first) {
  std::vector<int32_t> t(n);
  std::iota(t.begin(), t.end(), first);
  return t;
}

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
  kv.append(2, 1);                     // takes (evicts) a1
  EXPECT_FALSE(kv.is_registered(a1));
  kv.check_invariants();
  kv.free(2);
  EXPECT_EQ(kv.match_prefix(c, 13, 0).partial_block_id, -1);
  EXPECT_EQ(kv.match_prefix(a, 8, 0).block_ids, std::vector<int32_t>({a0}));
  kv.check_invariants();
}

// Property test: random allocate (with full and partial sharing) / copy / append / store / free,
// against a model of each sequence's tokens and of what every block's K/V slots hold, under pool
// pressure (so reusable blocks get evicted), with an honest and an always-colliding hash. "Computing"
// writes a sequence's tokens into its slots; a partial match's copy runs at a random later point
// (before the sequence computes, as a step does). After every operation: every block is in exactly
// one state, ref counts equal the holders (sequences and copy pins: check_invariants), every
// registered block a sequence holds carries that sequence's tokens at that position, and every
// computed or reused slot of a sequence whose copy ran holds the sequence's token there (so no
// shared block was written over, and copies moved the right data). At the end every block is back.
TEST(KVCacheManager, RandomOperationsWithReuseKeepInvariants) {
  for (bool collide : {false, true})
    for (int32_t tokens_per_block : {1, 2, 4, 8}) {
      const int32_t num_blocks = 24;
      KVCacheManager kv(num_blocks, tokens_per_block);
      if (collide) kv.set_hash_function(always_collide);
      std::mt19937 rng(tokens_per_block * 7 + collide);
      std::map<RequestId, std::vector<int32_t>> tokens;   // all tokens of each live sequence
      std::map<RequestId, int64_t> num_computed;           // tokens whose K/V are "computed"
      std::vector<std::vector<int32_t>> slots(num_blocks, std::vector<int32_t>(tokens_per_block, -1));
      std::set<RequestId> copy_pending;  // sequences whose partial block is not copied yet
      int64_t num_partial = 0;
      auto run_copies = [&] {
        for (const auto& [src, dst] : kv.pending_copies()) slots[dst] = slots[src];
        kv.finish_copies();
        copy_pending.clear();
      };
      // A few shared stems so that prefixes repeat; tokens come from a tiny vocabulary.
      std::vector<std::vector<int32_t>> stems;
      for (int i = 0; i < 3; ++i) {
        std::vector<int32_t> stem(3 * tokens_per_block + 1);
        for (auto& t : stem) t = rng() % 3;
        stems.push_back(stem);
      }
      int64_t num_reused_tokens = 0;
      for (int op = 0; op < 4000; ++op) {
        RequestId seq = rng() % 10;
        switch (rng() % 5) {
          case 0: {  // allocate, sharing the longest cached prefix
            if (tokens.count(seq)) break;
            std::vector<int32_t> t = stems[rng() % stems.size()];
            t.resize(1 + rng() % t.size());
            for (int extra = rng() % 3; extra > 0; --extra) t.push_back(rng() % 3);
            const int64_t n = static_cast<int64_t>(t.size());
            PrefixMatch m = kv.match_prefix(t, n, 0);
            const int64_t num_cached = m.num_cached_tokens(tokens_per_block);
            ASSERT_LT(num_cached, n);
            for (size_t i = 0; i < m.block_ids.size(); ++i)
              ASSERT_EQ(kv.block_tokens(m.block_ids[i]),
                        std::vector<int32_t>(t.begin() + i * tokens_per_block, t.begin() + (i + 1) * tokens_per_block));
            if (m.partial_block_id >= 0) {
              ASSERT_LT(m.num_partial_tokens, tokens_per_block);
              const std::vector<int32_t>& source = kv.block_tokens(m.partial_block_id);
              const auto next = t.begin() + static_cast<int64_t>(m.block_ids.size()) * tokens_per_block;
              ASSERT_TRUE(std::equal(next, next + m.num_partial_tokens, source.begin()));
            }
            if (!kv.can_allocate(n, m)) break;
            kv.allocate(seq, n, m);
            if (m.partial_block_id >= 0) copy_pending.insert(seq), ++num_partial;
            num_reused_tokens += num_cached;
            tokens[seq] = t;
            num_computed[seq] = num_cached;
            break;
          }
          case 1: {  // a step: pending copies, compute some tokens, then maybe grow by one token
            if (!tokens.count(seq)) break;
            run_copies();
            std::vector<int32_t>& t = tokens[seq];
            const std::vector<int32_t>& ids = kv.block_ids(seq);
            for (size_t pos = num_computed[seq]; pos < t.size(); ++pos)
              slots[ids[pos / tokens_per_block]][pos % tokens_per_block] = t[pos];
            num_computed[seq] = static_cast<int64_t>(t.size());
            kv.store(seq, t, num_computed[seq]);
            if (rng() % 2 && kv.can_append(seq, 1)) {
              kv.append(seq, 1);
              t.push_back(rng() % 3);
            }
            break;
          }
          case 2:
            if (rng() % 2) run_copies();
            break;
          default:
            if (rng() % 2) break;
            kv.free(seq);
            tokens.erase(seq);
            num_computed.erase(seq);
            copy_pending.erase(seq);
        }
        kv.check_invariants();
        for (const auto& [s, t] : tokens) {
          const std::vector<int32_t>& ids = kv.block_ids(s);
          ASSERT_EQ(kv.num_tokens(s), static_cast<int64_t>(t.size()));
          if (!copy_pending.count(s)) {
            for (int64_t pos = 0; pos < num_computed[s]; ++pos)
              ASSERT_EQ(slots[ids[pos / tokens_per_block]][pos % tokens_per_block], t[pos])
                  << "sequence " << s << " slot " << pos;
          }
          for (size_t i = 0; i < ids.size(); ++i) {
            if (!kv.is_registered(ids[i])) continue;
            ASSERT_EQ(kv.block_tokens(ids[i]),
                      std::vector<int32_t>(t.begin() + i * tokens_per_block, t.begin() + (i + 1) * tokens_per_block))
                << "sequence " << s << " block " << i;
          }
        }
      }
      EXPECT_GT(num_reused_tokens, 0);
      EXPECT_EQ(kv.stats().num_reused_tokens, num_reused_tokens);
      EXPECT_EQ(kv.stats().num_partial_reused_blocks, num_partial);
      if (tokens_per_block > 1) {
        EXPECT_GT(num_partial, 0);
      }
      EXPECT_GT(kv.stats().num_evicted_blocks, 0);
      for (const auto& [s, t] : tokens) kv.free(s);
      run_copies();
      kv.check_invariants();
      EXPECT_EQ(kv.num_free_blocks(), num_blocks);
      EXPECT_EQ(kv.stats().num_used_blocks, 0);
    }
}

}  // namespace
}  // namespace rtllm
