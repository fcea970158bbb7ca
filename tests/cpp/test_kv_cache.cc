// KVCacheManager: block accounting against a plain model of what each sequence should hold.
#include <gtest/gtest.h>

#include <map>
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

}  // namespace
}  // namespace rtllm
