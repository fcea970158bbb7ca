// KVCacheManager: the pool of KV-cache blocks and which sequence holds which blocks.
//
// The pool has num_blocks blocks of tokens_per_block tokens each, shared by all layers: block id b
// addresses block b in every layer's K/V tensor (layout [num_blocks, 2, num_kv_heads,
// tokens_per_block, head_dim] per layer, owned by ModelRunner). A sequence holds a list of block ids
// covering its token slots in order; token t of the sequence lives in block_ids(seq)[t / tokens_per_block]
// at offset t % tokens_per_block.
//
// Verbs come in query/mutate pairs: can_allocate/allocate, can_append/append; free releases all
// blocks of a sequence. Blocks are ref-counted so that one block can later be shared by several
// sequences (prefix reuse); today every block has at most one holder.
#pragma once

#include <cstdint>
#include <deque>
#include <unordered_map>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

// Requests (and the sequences the KV manager and the scheduler keep for them) are keyed by this id.
using RequestId = uint64_t;

struct KvCacheStats {
  int64_t num_total_blocks = 0;
  int64_t num_free_blocks = 0;
  int64_t num_used_blocks = 0;  // held by at least one sequence
  int32_t tokens_per_block = 0;
};

class RTLLM_API KVCacheManager {
 public:
  // Throws InvalidArgument for num_blocks < 1 or tokens_per_block < 1.
  KVCacheManager(int32_t num_blocks, int32_t tokens_per_block);

  // Blocks needed to hold num_tokens token slots: ceil(num_tokens / tokens_per_block).
  int32_t num_blocks_for(int64_t num_tokens) const;

  // Whether a new sequence of num_tokens slots fits in the free blocks.
  bool can_allocate(int64_t num_tokens) const;
  // Creates sequence `seq` with num_tokens slots (num_tokens >= 1). Throws Error if `seq` already
  // holds blocks or the free blocks do not suffice (check can_allocate first).
  void allocate(RequestId seq, int64_t num_tokens);

  // Whether `seq` can grow by num_new_tokens slots (it may need no new block at all).
  bool can_append(RequestId seq, int64_t num_new_tokens) const;
  // Grows `seq` by num_new_tokens slots, taking new blocks as the last one fills.
  void append(RequestId seq, int64_t num_new_tokens);

  // Releases all blocks of `seq`; blocks nobody else holds return to the free list. A sequence
  // that holds no blocks is ignored, so free is safe to call twice.
  void free(RequestId seq);

  bool contains(RequestId seq) const;
  // The blocks of `seq` in token order. Throws Error for an unknown sequence.
  const std::vector<int32_t>& block_ids(RequestId seq) const;
  int64_t num_tokens(RequestId seq) const;  // slots held by `seq`

  int32_t num_total_blocks() const { return static_cast<int32_t>(ref_counts_.size()); }
  int32_t num_free_blocks() const { return static_cast<int32_t>(free_blocks_.size()); }
  int32_t tokens_per_block() const { return tokens_per_block_; }
  KvCacheStats stats() const;

 private:
  struct SequenceBlocks {
    std::vector<int32_t> block_ids;
    int64_t num_tokens = 0;
  };

  int32_t take_free_block();
  const SequenceBlocks& sequence(RequestId seq) const;

  int32_t tokens_per_block_;
  std::vector<int32_t> ref_counts_;  // [num_blocks] holders of each block; 0: in free_blocks_
  // Blocks nobody holds, taken from the front. With prefix reuse, blocks of finished sequences
  // will wait here (keyed by their hash) until taken, in least-recently-used order.
  std::deque<int32_t> free_blocks_;
  std::unordered_map<RequestId, SequenceBlocks> sequences_;
};

}  // namespace rtllm
