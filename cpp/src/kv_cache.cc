#include "rtllm/kv_cache.h"

namespace rtllm {

KVCacheManager::KVCacheManager(int32_t num_blocks, int32_t tokens_per_block)
    : tokens_per_block_(tokens_per_block) {
  RTLLM_CHECK_ARG(num_blocks >= 1, "num_blocks must be >= 1, got ", num_blocks);
  RTLLM_CHECK_ARG(tokens_per_block >= 1, "tokens_per_block must be >= 1, got ", tokens_per_block);
  ref_counts_.assign(num_blocks, 0);
  for (int32_t b = 0; b < num_blocks; ++b) free_blocks_.push_back(b);
}

int32_t KVCacheManager::num_blocks_for(int64_t num_tokens) const {
  return static_cast<int32_t>((num_tokens + tokens_per_block_ - 1) / tokens_per_block_);
}

bool KVCacheManager::can_allocate(int64_t num_tokens) const {
  return num_blocks_for(num_tokens) <= num_free_blocks();
}

void KVCacheManager::allocate(RequestId seq, int64_t num_tokens) {
  RTLLM_CHECK(num_tokens >= 1, "a sequence needs at least one token slot, got ", num_tokens);
  RTLLM_CHECK(!contains(seq), "sequence ", seq, " already holds blocks");
  RTLLM_CHECK(can_allocate(num_tokens), "sequence ", seq, " needs ", num_blocks_for(num_tokens),
              " blocks for ", num_tokens, " tokens; ", num_free_blocks(), " are free");
  SequenceBlocks& blocks = sequences_[seq];
  for (int32_t i = 0; i < num_blocks_for(num_tokens); ++i) blocks.block_ids.push_back(take_free_block());
  blocks.num_tokens = num_tokens;
}

bool KVCacheManager::can_append(RequestId seq, int64_t num_new_tokens) const {
  const SequenceBlocks& blocks = sequence(seq);
  int64_t num_needed = num_blocks_for(blocks.num_tokens + num_new_tokens) -
                       static_cast<int64_t>(blocks.block_ids.size());
  return num_needed <= num_free_blocks();
}

void KVCacheManager::append(RequestId seq, int64_t num_new_tokens) {
  RTLLM_CHECK(num_new_tokens >= 0, "cannot append ", num_new_tokens, " tokens");
  RTLLM_CHECK(can_append(seq, num_new_tokens), "sequence ", seq, " cannot grow by ", num_new_tokens,
              " tokens; ", num_free_blocks(), " blocks are free");
  SequenceBlocks& blocks = sequences_.at(seq);
  blocks.num_tokens += num_new_tokens;
  while (static_cast<int64_t>(blocks.block_ids.size()) < num_blocks_for(blocks.num_tokens))
    blocks.block_ids.push_back(take_free_block());
}

void KVCacheManager::free(RequestId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return;
  for (int32_t b : it->second.block_ids) {
    RTLLM_CHECK(ref_counts_[b] > 0, "block ", b, " of sequence ", seq, " has no holder");
    if (--ref_counts_[b] == 0) free_blocks_.push_back(b);
  }
  sequences_.erase(it);
}

bool KVCacheManager::contains(RequestId seq) const { return sequences_.count(seq) != 0; }

const std::vector<int32_t>& KVCacheManager::block_ids(RequestId seq) const {
  return sequence(seq).block_ids;
}

int64_t KVCacheManager::num_tokens(RequestId seq) const { return sequence(seq).num_tokens; }

KvCacheStats KVCacheManager::stats() const {
  KvCacheStats s;
  s.num_total_blocks = num_total_blocks();
  s.num_free_blocks = num_free_blocks();
  s.num_used_blocks = s.num_total_blocks - s.num_free_blocks;
  s.tokens_per_block = tokens_per_block_;
  return s;
}

int32_t KVCacheManager::take_free_block() {
  RTLLM_CHECK(!free_blocks_.empty(), "no free KV-cache block");
  int32_t b = free_blocks_.front();
  free_blocks_.pop_front();
  RTLLM_CHECK(ref_counts_[b] == 0, "free block ", b, " has ", ref_counts_[b], " holders");
  ref_counts_[b] = 1;
  return b;
}

const KVCacheManager::SequenceBlocks& KVCacheManager::sequence(RequestId seq) const {
  auto it = sequences_.find(seq);
  RTLLM_CHECK(it != sequences_.end(), "sequence ", seq, " holds no KV-cache blocks");
  return it->second;
}

}  // namespace rtllm
