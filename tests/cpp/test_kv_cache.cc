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

// Property test: random allocate (with sharing) / append / store / free, against a model of each
// sequence's tokens, under pool pressure (so reusable blocks get evicted), with an honest and an
// always-colliding hash. After every operation: every block is in exactly one state, ref counts
// equal the holders (check_invariants), and every registered block a sequence holds carries that
// sequence's tokens at that position. At the end every block is back.
TEST(KVCacheManager, RandomOperationsWithReuseKeepInvariants) {
  for (bool collide : {false, true})
    for (int32_t tokens_per_block : {1, 2, 4}) {
      const int32_t num_blocks = 24;
      KVCacheManager kv(num_blocks, tokens_per_block);
      if (collide) kv.set_hash_function(always_collide);
      std::mt19937 rng(tokens_per_block * 7 + collide);
      std::map<RequestId, std::vector<int32_t>> tokens;   // all tokens of each live sequence
      std::map<RequestId, int64_t> num_computed;           // tokens whose K/V are "computed"
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
        switch (rng() % 4) {
          case 0: {  // allocate, sharing the longest cached prefix
            if (tokens.count(seq)) break;
            std::vector<int32_t> t = stems[rng() % stems.size()];
            t.resize(1 + rng() % t.size());
            for (int extra = rng() % 3; extra > 0; --extra) t.push_back(rng() % 3);
            const int64_t n = static_cast<int64_t>(t.size());
            PrefixMatch m = kv.match_prefix(t, n, 0);
            const int64_t num_cached = static_cast<int64_t>(m.block_ids.size()) * tokens_per_block;
            ASSERT_LT(num_cached, n);
            for (size_t i = 0; i < m.block_ids.size(); ++i)
              ASSERT_EQ(kv.block_tokens(m.block_ids[i]),
                        std::vector<int32_t>(t.begin() + i * tokens_per_block, t.begin() + (i + 1) * tokens_per_block));
            if (!kv.can_allocate(n, m)) break;
            kv.allocate(seq, n, m);
            num_reused_tokens += num_cached;
            tokens[seq] = t;
            num_computed[seq] = num_cached;
            break;
          }
          case 1: {  // compute some tokens, then maybe grow by one generated token
            if (!tokens.count(seq)) break;
            std::vector<int32_t>& t = tokens[seq];
            num_computed[seq] = static_cast<int64_t>(t.size());
            kv.store(seq, t, num_computed[seq]);
            if (rng() % 2 && kv.can_append(seq, 1)) {
              kv.append(seq, 1);
              t.push_back(rng() % 3);
            }
            break;
          }
          default:
            if (rng() % 2) break;
            kv.free(seq);
            tokens.erase(seq);
            num_computed.erase(seq);
        }
        kv.check_invariants();
        for (const auto& [s, t] : tokens) {
          const std::vector<int32_t>& ids = kv.block_ids(s);
          ASSERT_EQ(kv.num_tokens(s), static_cast<int64_t>(t.size()));
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
      EXPECT_GT(kv.stats().num_evicted_blocks, 0);
      for (const auto& [s, t] : tokens) kv.free(s);
      kv.check_invariants();
      EXPECT_EQ(kv.num_free_blocks(), num_blocks);
      EXPECT_EQ(kv.stats().num_used_blocks, 0);
    }
}

}  // namespace
}  // namespace rtllm
