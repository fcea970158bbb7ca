// KVCacheManager: the pool of KV-cache blocks, which sequence holds which blocks, and which blocks
// hold a reusable prefix.
//
// The pool has num_blocks blocks of tokens_per_block tokens each, shared by all layers: block id b
// addresses block b in every layer's K/V tensor (layout [num_blocks, 2, num_kv_heads,
// tokens_per_block, head_dim] per layer, owned by ModelRunner). A sequence holds a list of block ids
// covering its token slots in order; token t of the sequence lives in block_ids(seq)[t / tokens_per_block]
// at offset t % tokens_per_block.
//
// Prefix reuse: once a sequence's block is full and its K/V computed, store() registers it under a
// hash chain key H(parent key, extra key, the block's tokens). A later sequence whose tokens start
// the same way (same extra key: a cache salt) takes those blocks instead of computing them
// (match_prefix + allocate). A hash only finds candidates: a candidate is taken only if its stored
// tokens, its extra key and its parent's identity equal the sequence's, so a collision never shares
// wrong data. Blocks are ref-counted; a registered block nobody holds waits in an LRU list until
// the pool needs it (free blocks are taken first, then the least recently used reusable one, which
// is then forgotten).
//
// Free blocks are a stack (LIFO): a released block is the next one taken, so steady traffic keeps
// reusing the same few warm blocks and never touches the rest of the pool. On the CPU the pool is
// host memory committed lazily, page by page; a FIFO would walk through all of it and grow the
// resident set to the whole pool. Blocks never handed out stay at the bottom of the stack in id
// order, so they are taken last and lowest id first (num_touched_blocks counts the others).
//
// Partial reuse (copy-on-write): past the full blocks it matched, a new sequence may also take the
// first k < tokens_per_block tokens of a registered block that continues its chain (a child of its
// last matched block), the one sharing the longest prefix with its next tokens. It never writes into
// that shared block: allocate() gives it a fresh private block and records a copy (source ->
// destination) that the caller hands to ModelRunner::copy_blocks before the step's forward, then
// acknowledges with finish_copies(). The source is pinned (held) until then, so taking blocks in the
// meantime can never evict it. The private block is registered like any other once it is full. The
// children are kept sorted by their tokens, so the best one is a neighbour of where the sequence's next
// tokens would sort: the lookup costs O(log n) however many children a chain has (every first block is
// a child of the root, so a pool full of cached prompts has many).
//
// Token-based growth (vLLM v1's allocate_slots): each step grows a sequence by the tokens it feeds
// (a prompt chunk, one decode token, or 1 + k draft tokens) and may reserve lookahead slots after
// them, room for K/V that draft tokens will need. A sequence holds exactly the blocks covering
// num_tokens + num_lookahead_tokens slots. rewind() drops slots at the end (rejected draft tokens).
//
// The rewind rule. A sequence's leading blocks are its stored ones: prefix blocks it took from the
// cache and full blocks it passed to store(). They may be shared with other sequences or registered
// under their tokens, so they are never written again (a stored block equal to one registered
// already stays private, but is treated the same). Every block after them is private: taken from
// the free list (or the destination of a partial copy), held by this sequence alone, never
// registered. rewind() only drops slots after the stored blocks, so the blocks it releases go
// straight back to the free list, and the block it cuts into is private and may be written with
// other tokens. A registered block therefore never loses the tokens it is registered under, and its
// K/V stay those of its tokens. Callers store only tokens they keep (speculative decoding stores
// verified tokens only), so rejected draft tokens are always past the stored blocks; rewinding
// further throws.
//
// Every block is in exactly one state: held (ref_count >= 1: sequences and copy pins), free
// (ref_count 0, not registered) or reusable (ref_count 0, registered, in the LRU list). Verbs come
// in query/mutate pairs: can_allocate/allocate, can_allocate_slots/allocate_slots,
// can_rewind/rewind; free releases all blocks of a sequence.
#pragma once

#include <cstdint>
#include <deque>
#include <list>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

// Requests (and the sequences the KV manager and the scheduler keep for them) are keyed by this id.
using RequestId = uint64_t;

// Key of a full block: parent key (0 for a sequence's first block), extra key, its tokens.
using BlockHashFn = uint64_t (*)(uint64_t parent_hash, uint64_t extra_key, const int32_t* tokens,
                                 int32_t num_tokens);
RTLLM_API uint64_t default_block_hash(uint64_t parent_hash, uint64_t extra_key, const int32_t* tokens,
                                      int32_t num_tokens);
// Extra key of a request: 0 without a cache salt, else a 64-bit hash of the salt.
RTLLM_API uint64_t cache_salt_key(const std::optional<std::string>& cache_salt);

struct KvCacheStats {
  int64_t num_total_blocks = 0;
  int64_t num_free_blocks = 0;       // free + reusable: what a new sequence may take
  int64_t num_used_blocks = 0;       // held by at least one sequence
  int64_t num_reusable_blocks = 0;   // nobody holds them; they keep a cached prefix until evicted
  int32_t tokens_per_block = 0;
  int64_t num_reused_blocks = 0;     // blocks new sequences took from the cache (since creation)
  int64_t num_missed_blocks = 0;     // full prompt blocks they looked up and did not find
  int64_t num_reused_tokens = 0;     // num_reused_blocks * tokens_per_block + partially reused tokens
  int64_t num_partial_reused_blocks = 0;  // blocks whose leading tokens were copied for a new sequence
  int64_t num_evicted_blocks = 0;    // reusable blocks taken for other data
  // Distinct blocks ever handed out. Host memory is committed when first written, so on the CPU
  // this bounds the pool's resident part: it stays near the peak of blocks in use (plus the cached
  // prefixes kept) rather than growing towards num_total_blocks.
  int64_t num_touched_blocks = 0;
  double hit_rate() const {
    int64_t n = num_reused_blocks + num_missed_blocks;
    return n == 0 ? 0.0 : static_cast<double>(num_reused_blocks) / static_cast<double>(n);
  }
};

// A cached prefix found for a new sequence.
struct PrefixMatch {
  std::vector<int32_t> block_ids;    // registered blocks, in token order
  int32_t num_looked_up_blocks = 0;  // full blocks that were looked for (hits + misses)
  // Partial reuse: a registered block continuing the chain whose first num_partial_tokens tokens
  // equal the sequence's next ones (-1 and 0: none).
  int32_t partial_block_id = -1;
  int32_t num_partial_tokens = 0;

  // Tokens whose K/V the sequence takes instead of computing.
  int64_t num_cached_tokens(int32_t tokens_per_block) const {
    return static_cast<int64_t>(block_ids.size()) * tokens_per_block + num_partial_tokens;
  }
};

// Block copies (source, destination) to run before a step's forward.
using BlockCopies = std::vector<std::pair<int32_t, int32_t>>;

enum class KvCacheEventKind : int32_t {
  kCreated,  // once: the pool (num_blocks, tokens_per_block)
  kStored,   // a full block became reusable under block_hash
  kRemoved,  // a reusable block was evicted: its hash no longer finds it
};

struct KvCacheEvent {
  int64_t event_id = 0;  // increasing from 0
  KvCacheEventKind kind = KvCacheEventKind::kCreated;
  int32_t num_blocks = 0;        // kCreated
  int32_t tokens_per_block = 0;  // kCreated
  int32_t block_id = -1;         // kStored, kRemoved
  uint64_t block_hash = 0;       // kStored, kRemoved
  uint64_t parent_hash = 0;      // kStored: 0 for a sequence's first block
  int32_t token_offset = 0;      // kStored, kRemoved: position of the block's first token
  std::vector<int32_t> token_ids;  // kStored, kRemoved: the block's tokens
};

class RTLLM_API KVCacheManager {
 public:
  // Throws InvalidArgument for num_blocks < 1, tokens_per_block < 1, event_buffer_max_size < 0 or
  // min_partial_reuse_tokens < 1. event_buffer_max_size 0 records no events; otherwise the oldest are
  // dropped beyond it. Partial reuse needs block reuse and at least min_partial_reuse_tokens shared
  // tokens in the block.
  KVCacheManager(int32_t num_blocks, int32_t tokens_per_block, bool enable_block_reuse = true,
                 int32_t event_buffer_max_size = 0, bool enable_partial_reuse = true,
                 int32_t min_partial_reuse_tokens = 1);
  // Not copyable: the LRU positions and the sorted children point into this manager's own lists and blocks.
  KVCacheManager(const KVCacheManager&) = delete;
  KVCacheManager& operator=(const KVCacheManager&) = delete;

  // Blocks needed to hold num_tokens token slots: ceil(num_tokens / tokens_per_block).
  int32_t num_blocks_for(int64_t num_tokens) const;

  // The registered blocks holding the longest prefix of tokens[0, num_tokens - 1) in whole blocks
  // (the last token is always computed: its logits are needed), then the best partial block (see
  // above) for the tokens after them. Empty with reuse off.
  PrefixMatch match_prefix(const std::vector<int32_t>& tokens, int64_t num_tokens, uint64_t extra_key) const;
  // Blocks a new sequence of num_tokens slots reusing `prefix` takes out of the free + reusable
  // blocks: new blocks, plus the prefix blocks (and the partial source, pinned for the copy) that
  // nobody holds now.
  int32_t num_blocks_to_take(int64_t num_tokens, const PrefixMatch& prefix = {}) const;
  bool can_allocate(int64_t num_tokens, const PrefixMatch& prefix = {}) const;
  // Creates sequence `seq` with num_tokens slots (num_tokens >= prefix's tokens + 1): the blocks of
  // `prefix` (from match_prefix, for the same tokens and extra key, with no change to the pool in
  // between) and new ones for the rest. Throws Error if `seq` already holds blocks or the blocks
  // do not suffice (check can_allocate first). A partial match records a copy into the sequence's
  // private block for that position (see pending_copies).
  void allocate(RequestId seq, int64_t num_tokens, const PrefixMatch& prefix = {}, uint64_t extra_key = 0);

  // Copies recorded by allocate() since the last finish_copies(), in order; their sources are pinned.
  const BlockCopies& pending_copies() const { return pending_copies_; }
  // The copies ran (or were dropped with their step): unpins the sources and clears the list.
  void finish_copies();

  // Whether allocate_slots(seq, num_new_tokens, num_lookahead_tokens) has the blocks it needs (it
  // may need none). Throws Error for an unknown sequence.
  bool can_allocate_slots(RequestId seq, int64_t num_new_tokens, int64_t num_lookahead_tokens = 0) const;
  // Grows `seq` by num_new_tokens slots (the tokens this step feeds) and sets its lookahead reserve
  // to num_lookahead_tokens slots after them: the reserve is set, not added, since each step states
  // what it needs; blocks a smaller reserve leaves empty go back to the free list. New blocks are
  // private (see the rewind rule). Throws Error for a negative count or when the blocks do not
  // suffice (check can_allocate_slots first).
  void allocate_slots(RequestId seq, int64_t num_new_tokens, int64_t num_lookahead_tokens = 0);

  // Whether rewind(seq, num_tokens) is allowed: 0 <= num_tokens and the slots left still cover the
  // sequence's stored blocks (see the rewind rule above).
  bool can_rewind(RequestId seq, int64_t num_tokens) const;
  // Drops the last num_tokens slots of `seq` (rejected draft tokens); its lookahead reserve stays,
  // after the slots left. Blocks left empty go back to the free list, last first, and a pending
  // copy into one of them is dropped. Throws Error unless can_rewind; nothing changes then.
  void rewind(RequestId seq, int64_t num_tokens);

  // Registers the full blocks of `seq` whose K/V are computed, i.e. those within the first
  // num_computed_tokens of `tokens` (the sequence's tokens from position 0), for reuse. No-op with
  // reuse off. A block equal to one registered already stays private and returns to the free list.
  void store(RequestId seq, const std::vector<int32_t>& tokens, int64_t num_computed_tokens);

  // Releases all blocks of `seq`; blocks nobody else holds become reusable (registered) or free.
  // A pending copy into its blocks is dropped. A sequence that holds no blocks is ignored, so free
  // is safe to call twice.
  void free(RequestId seq);

  bool contains(RequestId seq) const;
  // The blocks of `seq` in token order. Throws Error for an unknown sequence.
  const std::vector<int32_t>& block_ids(RequestId seq) const;
  int64_t num_tokens(RequestId seq) const;  // slots of `seq`'s tokens (the lookahead reserve excluded)
  int64_t num_lookahead_tokens(RequestId seq) const;  // slots reserved after them

  int32_t num_total_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Blocks a sequence may take: free ones and reusable ones (evicted on demand).
  int32_t num_free_blocks() const { return static_cast<int32_t>(free_blocks_.size() + reusable_lru_.size()); }
  int32_t num_reusable_blocks() const { return static_cast<int32_t>(reusable_lru_.size()); }
  int32_t tokens_per_block() const { return tokens_per_block_; }
  bool enable_block_reuse() const { return enable_block_reuse_; }
  bool enable_partial_reuse() const { return enable_partial_reuse_; }
  KvCacheStats stats() const;

  // Events since the last call, oldest first (empty when events are off).
  std::vector<KvCacheEvent> take_events();

  // Test hooks: the hash function (e.g. one that always collides) and a view of one block.
  void set_hash_function(BlockHashFn fn) { hash_fn_ = fn; }
  int32_t ref_count(int32_t block_id) const { return blocks_.at(block_id).ref_count; }
  bool is_registered(int32_t block_id) const { return blocks_.at(block_id).is_registered; }
  const std::vector<int32_t>& block_tokens(int32_t block_id) const { return blocks_.at(block_id).tokens; }
  // Debug check, O(num_blocks + held blocks); throws Error naming the first broken invariant:
  // every block is in exactly one state (held, free or reusable; so none leaks and held + free +
  // reusable == total), ref counts equal the holders (sequences and copy pins), no sequence holds
  // a block twice, a sequence holds num_blocks_for(num_tokens + num_lookahead_tokens) blocks, and
  // its blocks past the stored ones are private (unregistered, held by it alone).
  void check_invariants() const;

 private:
  struct Block {
    int32_t ref_count = 0;
    bool is_registered = false;  // in by_hash_ with the identity below
    uint64_t hash = 0;
    uint64_t identity = 0;         // unique per registration; 0: none
    uint64_t parent_identity = 0;  // 0 for a first block
    uint64_t parent_hash = 0;
    uint64_t extra_key = 0;
    int32_t position = 0;          // index of the block in its sequence
    std::vector<int32_t> tokens;   // [tokens_per_block] once registered
    std::list<int32_t>::iterator lru_it;  // valid while reusable
  };
  struct SequenceBlocks {
    std::vector<int32_t> block_ids;  // covering num_tokens + num_lookahead_tokens slots
    int64_t num_tokens = 0;
    int64_t num_lookahead_tokens = 0;
    uint64_t extra_key = 0;
    int32_t num_stored_blocks = 0;  // leading blocks taken from the cache or passed to store()
    // Key of the last stored block (the registered one with equal content for a duplicate).
    uint64_t last_hash = 0, last_identity = 0;
  };

  int32_t find_registered(uint64_t hash, uint64_t parent_identity, uint64_t extra_key,
                          const int32_t* tokens) const;
  void match_partial(const std::vector<int32_t>& tokens, int64_t num_tokens, uint64_t extra_key,
                     uint64_t parent_identity, PrefixMatch& match) const;
  void register_block(int32_t b, uint64_t hash, const SequenceBlocks& blocks, int32_t position,
                      const int32_t* tokens);
  void hold(int32_t b);
  void release(int32_t b);
  void release_tail(SequenceBlocks& blocks, size_t num_kept);
  int32_t take_free_block();
  void unregister(int32_t b);
  void push_event(KvCacheEvent event);
  const SequenceBlocks& sequence(RequestId seq) const;

  int32_t tokens_per_block_;
  bool enable_block_reuse_;
  int32_t event_buffer_max_size_;
  bool enable_partial_reuse_;
  int32_t min_partial_reuse_tokens_;
  BlockHashFn hash_fn_ = default_block_hash;
  std::vector<Block> blocks_;        // [num_blocks]
  // Unregistered, nobody holds them; a stack taken from the back (last released first), with the
  // never-touched blocks at the bottom, highest id deepest. Reserved for num_blocks.
  std::vector<int32_t> free_blocks_;
  std::list<int32_t> reusable_lru_;  // registered, nobody holds them; least recently used first
  std::unordered_multimap<uint64_t, int32_t> by_hash_;  // hash -> registered blocks
  // A registered block as a candidate for partial reuse, ordered by (parent identity, extra key, tokens,
  // block id): the children of one chain with one extra key are a contiguous range sorted by tokens. The
  // tokens point into the block's own vector, which stays put while it is registered.
  struct Child {
    uint64_t parent_identity = 0;  // 0: none
    uint64_t extra_key = 0;
    const int32_t* tokens = nullptr;
    int32_t num_tokens = 0;
    int32_t block = -1;  // -1 for a lookup key: it sorts before the blocks with the same tokens
    bool operator<(const Child& other) const;
  };
  Child child_entry(int32_t b) const;

  std::set<Child> children_;  // every registered block, once
  BlockCopies pending_copies_;  // reserved for num_blocks: recording one never allocates
  std::unordered_map<RequestId, SequenceBlocks> sequences_;
  uint64_t next_identity_ = 1;
  int64_t num_reused_blocks_ = 0, num_missed_blocks_ = 0, num_evicted_blocks_ = 0;
  int64_t num_partial_reused_blocks_ = 0, num_partial_reused_tokens_ = 0;
  int32_t num_touched_blocks_ = 0;  // blocks [0, num_touched_blocks_) were handed out at least once
  std::deque<KvCacheEvent> events_;
  int64_t next_event_id_ = 0;
};

}  // namespace rtllm
