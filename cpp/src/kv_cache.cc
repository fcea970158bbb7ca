#include "rtllm/kv_cache.h"

#include <algorithm>

namespace rtllm {

namespace {

// splitmix64's finalizer: a cheap bijective mix with good avalanche.
uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t default_block_hash(uint64_t parent_hash, uint64_t extra_key, const int32_t* tokens, int32_t num_tokens) {
  uint64_t h = mix64(parent_hash ^ 0x9e3779b97f4a7c15ULL) ^ mix64(extra_key + 0x632be59bd9b4e019ULL);
  for (int32_t i = 0; i < num_tokens; ++i) h = mix64(h ^ static_cast<uint32_t>(tokens[i])) + 0x9e3779b97f4a7c15ULL;
  return h;
}

uint64_t cache_salt_key(const std::optional<std::string>& cache_salt) {
  if (!cache_salt) return 0;
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (unsigned char c : *cache_salt) h = (h ^ c) * 0x100000001b3ULL;
  return h == 0 ? 1 : h;  // 0 means "no salt"
}

KVCacheManager::KVCacheManager(int32_t num_blocks, int32_t tokens_per_block, bool enable_block_reuse,
                               int32_t event_buffer_max_size, bool enable_partial_reuse,
                               int32_t min_partial_reuse_tokens)
    : tokens_per_block_(tokens_per_block),
      enable_block_reuse_(enable_block_reuse),
      event_buffer_max_size_(event_buffer_max_size),
      enable_partial_reuse_(enable_block_reuse && enable_partial_reuse),
      min_partial_reuse_tokens_(min_partial_reuse_tokens) {
  RTLLM_CHECK_ARG(num_blocks >= 1, "num_blocks must be >= 1, got ", num_blocks);
  RTLLM_CHECK_ARG(tokens_per_block >= 1, "tokens_per_block must be >= 1, got ", tokens_per_block);
  RTLLM_CHECK_ARG(event_buffer_max_size >= 0, "event_buffer_max_size must be >= 0, got ", event_buffer_max_size);
  RTLLM_CHECK_ARG(min_partial_reuse_tokens >= 1, "min_partial_reuse_tokens must be >= 1, got ",
                  min_partial_reuse_tokens);
  blocks_.resize(num_blocks);
  pending_copies_.reserve(num_blocks);
  free_blocks_.reserve(num_blocks);
  for (int32_t b = num_blocks; b-- > 0;) free_blocks_.push_back(b);  // block 0 on top
  KvCacheEvent created;
  created.kind = KvCacheEventKind::kCreated;
  created.num_blocks = num_blocks;
  created.tokens_per_block = tokens_per_block;
  push_event(std::move(created));
}

int32_t KVCacheManager::num_blocks_for(int64_t num_tokens) const {
  return static_cast<int32_t>((num_tokens + tokens_per_block_ - 1) / tokens_per_block_);
}

// ---------------------------------------------------------------- prefix lookup

int32_t KVCacheManager::find_registered(uint64_t hash, uint64_t parent_identity, uint64_t extra_key,
                                        const int32_t* tokens) const {
  auto [first, last] = by_hash_.equal_range(hash);
  for (auto it = first; it != last; ++it) {
    const Block& block = blocks_[it->second];
    if (block.parent_identity == parent_identity && block.extra_key == extra_key &&
        std::equal(block.tokens.begin(), block.tokens.end(), tokens))
      return it->second;
  }
  return -1;
}

PrefixMatch KVCacheManager::match_prefix(const std::vector<int32_t>& tokens, int64_t num_tokens,
                                         uint64_t extra_key) const {
  RTLLM_CHECK(num_tokens <= static_cast<int64_t>(tokens.size()), "num_tokens ", num_tokens, " exceeds the ",
              tokens.size(), " tokens given");
  PrefixMatch match;
  if (!enable_block_reuse_ || num_tokens < 1) return match;
  match.num_looked_up_blocks = static_cast<int32_t>((num_tokens - 1) / tokens_per_block_);
  uint64_t parent_hash = 0, parent_identity = 0;
  for (int32_t i = 0; i < match.num_looked_up_blocks; ++i) {
    const int32_t* block_tokens = tokens.data() + int64_t{i} * tokens_per_block_;
    uint64_t hash = hash_fn_(parent_hash, extra_key, block_tokens, tokens_per_block_);
    int32_t b = find_registered(hash, parent_identity, extra_key, block_tokens);
    if (b < 0) break;
    match.block_ids.push_back(b);
    parent_hash = hash;
    parent_identity = blocks_[b].identity;
  }
  if (enable_partial_reuse_) match_partial(tokens, num_tokens, extra_key, parent_identity, match);
  return match;
}

// Among the registered blocks continuing the matched chain (children of parent_identity), the one
// whose tokens share the longest prefix with the sequence's next tokens, if that prefix has at least
// min_partial_reuse_tokens_ tokens. It stops short of the block's end and of the last token (both
// are computed). In sorted order the shared prefix grows towards the place where the next tokens
// would sort and shrinks past it, so only the two neighbours of that place are compared; a tie goes
// to the one sorting first.
void KVCacheManager::match_partial(const std::vector<int32_t>& tokens, int64_t num_tokens, uint64_t extra_key,
                                   uint64_t parent_identity, PrefixMatch& match) const {
  const int64_t start = static_cast<int64_t>(match.block_ids.size()) * tokens_per_block_;
  const int32_t max_shared =
      static_cast<int32_t>(std::min<int64_t>(tokens_per_block_ - 1, num_tokens - 1 - start));
  if (max_shared < min_partial_reuse_tokens_) return;
  const int32_t* next = tokens.data() + start;
  const Child key{parent_identity, extra_key, next, max_shared, -1};
  auto after = children_.lower_bound(key);  // max_shared < tokens_per_block: no child equals the key
  auto consider = [&](std::set<Child>::const_iterator it) {
    if (it->parent_identity != parent_identity || it->extra_key != extra_key) return;
    const int32_t num_shared = static_cast<int32_t>(std::mismatch(next, next + max_shared, it->tokens).first - next);
    if (num_shared > match.num_partial_tokens) {
      match.partial_block_id = it->block;
      match.num_partial_tokens = num_shared;
    }
  };
  if (after != children_.begin()) consider(std::prev(after));
  if (after != children_.end()) consider(after);
  if (match.num_partial_tokens < min_partial_reuse_tokens_) {
    match.partial_block_id = -1;
    match.num_partial_tokens = 0;
  }
}

// ---------------------------------------------------------------- allocation

int32_t KVCacheManager::num_blocks_to_take(int64_t num_tokens, const PrefixMatch& prefix) const {
  int32_t num_prefix = static_cast<int32_t>(prefix.block_ids.size());
  int32_t num_taken = std::max(0, num_blocks_for(num_tokens) - num_prefix);
  for (int32_t b : prefix.block_ids) num_taken += blocks_[b].ref_count == 0 ? 1 : 0;
  if (prefix.partial_block_id >= 0) num_taken += blocks_[prefix.partial_block_id].ref_count == 0 ? 1 : 0;
  return num_taken;
}

bool KVCacheManager::can_allocate(int64_t num_tokens, const PrefixMatch& prefix) const {
  return num_blocks_to_take(num_tokens, prefix) <= num_free_blocks();
}

void KVCacheManager::allocate(RequestId seq, int64_t num_tokens, const PrefixMatch& prefix, uint64_t extra_key) {
  const int64_t num_prefix_tokens = prefix.num_cached_tokens(tokens_per_block_);
  RTLLM_CHECK(num_tokens >= 1 && num_tokens > num_prefix_tokens, "sequence ", seq, " needs more than its ",
              num_prefix_tokens, " reused tokens, got ", num_tokens, " slots");
  RTLLM_CHECK(!contains(seq), "sequence ", seq, " already holds blocks");
  RTLLM_CHECK(can_allocate(num_tokens, prefix), "sequence ", seq, " needs ", num_blocks_to_take(num_tokens, prefix),
              " blocks for ", num_tokens, " tokens; ", num_free_blocks(), " are free");
  SequenceBlocks& blocks = sequences_[seq];
  blocks.extra_key = extra_key;
  // Hold the prefix first so that taking new blocks cannot evict it.
  for (int32_t b : prefix.block_ids) {
    RTLLM_CHECK(blocks_[b].is_registered, "prefix block ", b, " is not registered");
    hold(b);
    blocks.block_ids.push_back(b);
    blocks.last_hash = blocks_[b].hash;
    blocks.last_identity = blocks_[b].identity;
  }
  blocks.num_stored_blocks = static_cast<int32_t>(prefix.block_ids.size());
  const int32_t source = prefix.partial_block_id;
  if (source >= 0) {
    RTLLM_CHECK(blocks_[source].is_registered && prefix.num_partial_tokens >= 1 &&
                    prefix.num_partial_tokens < tokens_per_block_,
                "partial source block ", source, " is not registered or shares ", prefix.num_partial_tokens,
                " tokens");
    hold(source);  // the pin: no block taken below (or before the copy runs) can evict it
  }
  while (static_cast<int32_t>(blocks.block_ids.size()) < num_blocks_for(num_tokens))
    blocks.block_ids.push_back(take_free_block());
  blocks.num_tokens = num_tokens;
  if (source >= 0) {
    pending_copies_.emplace_back(source, blocks.block_ids[prefix.block_ids.size()]);
    ++num_partial_reused_blocks_;
    num_partial_reused_tokens_ += prefix.num_partial_tokens;
  }
  num_reused_blocks_ += static_cast<int64_t>(prefix.block_ids.size());
  num_missed_blocks_ += prefix.num_looked_up_blocks - static_cast<int64_t>(prefix.block_ids.size());
}

void KVCacheManager::finish_copies() {
  for (const auto& copy : pending_copies_) release(copy.first);
  pending_copies_.clear();
}

bool KVCacheManager::can_allocate_slots(RequestId seq, int64_t num_new_tokens, int64_t num_lookahead_tokens) const {
  const SequenceBlocks& blocks = sequence(seq);
  int64_t num_needed = num_blocks_for(blocks.num_tokens + num_new_tokens + num_lookahead_tokens) -
                       static_cast<int64_t>(blocks.block_ids.size());
  return num_needed <= num_free_blocks();
}

void KVCacheManager::allocate_slots(RequestId seq, int64_t num_new_tokens, int64_t num_lookahead_tokens) {
  RTLLM_CHECK(num_new_tokens >= 0 && num_lookahead_tokens >= 0, "sequence ", seq, " cannot grow by ",
              num_new_tokens, " tokens with ", num_lookahead_tokens, " lookahead slots");
  RTLLM_CHECK(can_allocate_slots(seq, num_new_tokens, num_lookahead_tokens), "sequence ", seq, " cannot grow by ",
              num_new_tokens, " tokens with ", num_lookahead_tokens, " lookahead slots; ", num_free_blocks(),
              " blocks are free");
  SequenceBlocks& blocks = sequences_.at(seq);
  blocks.num_tokens += num_new_tokens;
  blocks.num_lookahead_tokens = num_lookahead_tokens;
  const size_t num_blocks = num_blocks_for(blocks.num_tokens + num_lookahead_tokens);
  release_tail(blocks, num_blocks);  // a smaller reserve than the last step's
  while (blocks.block_ids.size() < num_blocks) blocks.block_ids.push_back(take_free_block());
}

bool KVCacheManager::can_rewind(RequestId seq, int64_t num_tokens) const {
  const SequenceBlocks& blocks = sequence(seq);
  return num_tokens >= 0 &&
         blocks.num_tokens - num_tokens >= int64_t{blocks.num_stored_blocks} * tokens_per_block_;
}

void KVCacheManager::rewind(RequestId seq, int64_t num_tokens) {
  RTLLM_CHECK(can_rewind(seq, num_tokens), "sequence ", seq, " cannot rewind ", num_tokens, " of its ",
              this->num_tokens(seq), " tokens: its first ",
              int64_t{sequence(seq).num_stored_blocks} * tokens_per_block_,
              " are in stored blocks, which may be shared and are never written again");
  SequenceBlocks& blocks = sequences_.at(seq);
  blocks.num_tokens -= num_tokens;
  release_tail(blocks, num_blocks_for(blocks.num_tokens + blocks.num_lookahead_tokens));
}

// ---------------------------------------------------------------- registration and release

void KVCacheManager::store(RequestId seq, const std::vector<int32_t>& tokens, int64_t num_computed_tokens) {
  if (!enable_block_reuse_) return;
  SequenceBlocks& blocks = sequences_.at(seq);
  RTLLM_CHECK(num_computed_tokens <= std::min<int64_t>(blocks.num_tokens, static_cast<int64_t>(tokens.size())),
              "sequence ", seq, ": ", num_computed_tokens, " computed tokens exceed its ", blocks.num_tokens,
              " slots or the ", tokens.size(), " tokens given");
  const int32_t num_full = static_cast<int32_t>(num_computed_tokens / tokens_per_block_);
  for (int32_t i = blocks.num_stored_blocks; i < num_full; ++i) {
    const int32_t* block_tokens = tokens.data() + int64_t{i} * tokens_per_block_;
    uint64_t hash = hash_fn_(blocks.last_hash, blocks.extra_key, block_tokens, tokens_per_block_);
    int32_t twin = find_registered(hash, blocks.last_identity, blocks.extra_key, block_tokens);
    if (twin < 0) {  // new content: register this block
      twin = blocks.block_ids[i];
      register_block(twin, hash, blocks, i, block_tokens);
    }
    blocks.last_hash = hash;
    blocks.last_identity = blocks_[twin].identity;
  }
  blocks.num_stored_blocks = std::max(blocks.num_stored_blocks, num_full);
}

// Registers block b at `position` of a sequence whose last stored block is blocks.last_*.
void KVCacheManager::register_block(int32_t b, uint64_t hash, const SequenceBlocks& blocks, int32_t position,
                                    const int32_t* tokens) {
  Block& block = blocks_[b];
  block.is_registered = true;
  block.hash = hash;
  block.identity = next_identity_++;
  block.parent_identity = blocks.last_identity;
  block.parent_hash = blocks.last_hash;
  block.extra_key = blocks.extra_key;
  block.position = position;
  block.tokens.assign(tokens, tokens + tokens_per_block_);
  by_hash_.emplace(hash, b);
  children_.insert(child_entry(b));
  KvCacheEvent event;
  event.kind = KvCacheEventKind::kStored;
  event.block_id = b;
  event.block_hash = hash;
  event.parent_hash = block.parent_hash;
  event.token_offset = position * tokens_per_block_;
  event.token_ids = block.tokens;
  push_event(std::move(event));
}

void KVCacheManager::free(RequestId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return;
  release_tail(it->second, 0);
  sequences_.erase(it);
}

// Releases the blocks of `blocks` past its first num_kept, last first: a prefix's tail is evicted
// before its head, which more requests share. A copy into a block given back must not run any
// more: it is dropped with its pin.
void KVCacheManager::release_tail(SequenceBlocks& blocks, size_t num_kept) {
  std::vector<int32_t>& ids = blocks.block_ids;
  if (num_kept >= ids.size()) return;
  auto into_tail = [&](const std::pair<int32_t, int32_t>& copy) {
    if (std::find(ids.begin() + num_kept, ids.end(), copy.second) == ids.end()) return false;
    release(copy.first);
    return true;
  };
  pending_copies_.erase(std::remove_if(pending_copies_.begin(), pending_copies_.end(), into_tail),
                        pending_copies_.end());
  for (size_t i = ids.size(); i-- > num_kept;) release(ids[i]);
  ids.resize(num_kept);
}

void KVCacheManager::hold(int32_t b) {
  Block& block = blocks_[b];
  if (block.ref_count == 0) {
    RTLLM_CHECK(block.is_registered, "block ", b, " is free; take it with take_free_block");
    reusable_lru_.erase(block.lru_it);
  }
  ++block.ref_count;
}

void KVCacheManager::release(int32_t b) {
  Block& block = blocks_[b];
  RTLLM_CHECK(block.ref_count > 0, "block ", b, " has no holder");
  if (--block.ref_count > 0) return;
  if (block.is_registered) {
    block.lru_it = reusable_lru_.insert(reusable_lru_.end(), b);
  } else {
    free_blocks_.push_back(b);
  }
}

// The last released free block if there is one (it is warm: its memory is resident), else the
// least recently used reusable block, forgotten first. A cached prefix is evicted only when no free
// block is left, so reuse keeps every prefix the pool has room for.
int32_t KVCacheManager::take_free_block() {
  int32_t b = -1;
  if (!free_blocks_.empty()) {
    b = free_blocks_.back();
    free_blocks_.pop_back();
    // Never-touched blocks come off the bottom of the stack in id order (see kv_cache.h).
    num_touched_blocks_ = std::max(num_touched_blocks_, b + 1);
  } else {
    RTLLM_CHECK(!reusable_lru_.empty(), "no free KV-cache block");
    b = reusable_lru_.front();
    reusable_lru_.pop_front();
    unregister(b);
    ++num_evicted_blocks_;
  }
  RTLLM_CHECK(blocks_[b].ref_count == 0, "free block ", b, " has ", blocks_[b].ref_count, " holders");
  blocks_[b].ref_count = 1;
  return b;
}

void KVCacheManager::unregister(int32_t b) {
  Block& block = blocks_[b];
  auto [first, last] = by_hash_.equal_range(block.hash);
  auto entry = std::find_if(first, last, [b](const auto& kv) { return kv.second == b; });
  if (entry != last) by_hash_.erase(entry);
  children_.erase(child_entry(b));  // before the block's fields, its sort key, are cleared below
  KvCacheEvent event;
  event.kind = KvCacheEventKind::kRemoved;
  event.block_id = b;
  event.block_hash = block.hash;
  event.parent_hash = block.parent_hash;
  event.token_offset = block.position * tokens_per_block_;
  event.token_ids = std::move(block.tokens);
  push_event(std::move(event));
  block = Block{};
}

bool KVCacheManager::Child::operator<(const Child& other) const {
  if (parent_identity != other.parent_identity) return parent_identity < other.parent_identity;
  if (extra_key != other.extra_key) return extra_key < other.extra_key;
  const int32_t* end = tokens + num_tokens;
  const int32_t* other_end = other.tokens + other.num_tokens;
  auto [mine, theirs] = std::mismatch(tokens, end, other.tokens, other_end);
  if (mine != end && theirs != other_end) return *mine < *theirs;
  if (mine != end || theirs != other_end) return mine == end;  // a proper prefix sorts first
  return block < other.block;
}

KVCacheManager::Child KVCacheManager::child_entry(int32_t b) const {
  const Block& block = blocks_[b];
  return Child{block.parent_identity, block.extra_key, block.tokens.data(), static_cast<int32_t>(block.tokens.size()),
               b};
}

// ---------------------------------------------------------------- queries, events, invariants

bool KVCacheManager::contains(RequestId seq) const { return sequences_.count(seq) != 0; }

const std::vector<int32_t>& KVCacheManager::block_ids(RequestId seq) const { return sequence(seq).block_ids; }

int64_t KVCacheManager::num_tokens(RequestId seq) const { return sequence(seq).num_tokens; }

int64_t KVCacheManager::num_lookahead_tokens(RequestId seq) const { return sequence(seq).num_lookahead_tokens; }

KvCacheStats KVCacheManager::stats() const {
  KvCacheStats s;
  s.num_total_blocks = num_total_blocks();
  s.num_free_blocks = num_free_blocks();
  s.num_reusable_blocks = num_reusable_blocks();
  s.num_used_blocks = s.num_total_blocks - s.num_free_blocks;
  s.tokens_per_block = tokens_per_block_;
  s.num_reused_blocks = num_reused_blocks_;
  s.num_missed_blocks = num_missed_blocks_;
  s.num_reused_tokens = num_reused_blocks_ * tokens_per_block_ + num_partial_reused_tokens_;
  s.num_partial_reused_blocks = num_partial_reused_blocks_;
  s.num_evicted_blocks = num_evicted_blocks_;
  s.num_touched_blocks = num_touched_blocks_;
  return s;
}

void KVCacheManager::push_event(KvCacheEvent event) {
  if (event_buffer_max_size_ == 0) return;
  event.event_id = next_event_id_++;
  events_.push_back(std::move(event));
  while (static_cast<int32_t>(events_.size()) > event_buffer_max_size_) events_.pop_front();
}

std::vector<KvCacheEvent> KVCacheManager::take_events() {
  std::vector<KvCacheEvent> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

void KVCacheManager::check_invariants() const {
  std::vector<int32_t> num_holders(blocks_.size(), 0);
  std::vector<RequestId> last_holder(blocks_.size(), 0);
  std::vector<bool> has_holder(blocks_.size(), false);
  for (const auto& [seq, blocks] : sequences_) {
    RTLLM_CHECK(static_cast<int32_t>(blocks.block_ids.size()) ==
                    num_blocks_for(blocks.num_tokens + blocks.num_lookahead_tokens),
                "sequence ", seq, " holds ", blocks.block_ids.size(), " blocks for ", blocks.num_tokens,
                " tokens and ", blocks.num_lookahead_tokens, " lookahead slots");
    RTLLM_CHECK(int64_t{blocks.num_stored_blocks} * tokens_per_block_ <= blocks.num_tokens, "sequence ", seq,
                " has ", blocks.num_stored_blocks, " stored blocks but only ", blocks.num_tokens, " tokens");
    for (int32_t b : blocks.block_ids) {
      RTLLM_CHECK(b >= 0 && b < num_total_blocks(), "sequence ", seq, " holds block ", b, " outside [0, ",
                  num_total_blocks(), ")");
      RTLLM_CHECK(!(has_holder[b] && last_holder[b] == seq), "sequence ", seq, " holds block ", b, " twice");
      has_holder[b] = true;
      last_holder[b] = seq;
      ++num_holders[b];
    }
  }
  for (const auto& copy : pending_copies_) {
    RTLLM_CHECK(blocks_[copy.first].is_registered, "partial source block ", copy.first, " is not registered");
    ++num_holders[copy.first];  // the pin
  }
  std::vector<int32_t> num_places(blocks_.size(), 0);  // free list + LRU list
  // Never-touched blocks lie at the bottom of the free stack, highest id deepest, all of them.
  const int32_t num_untouched = num_total_blocks() - num_touched_blocks_;
  RTLLM_CHECK(static_cast<int32_t>(free_blocks_.size()) >= num_untouched, free_blocks_.size(),
              " free blocks but ", num_untouched, " were never handed out");
  for (int32_t i = 0; i < num_untouched; ++i)
    RTLLM_CHECK(free_blocks_[i] == num_total_blocks() - 1 - i, "free stack slot ", i, " holds block ",
                free_blocks_[i], "; the never-touched block ", num_total_blocks() - 1 - i, " belongs there");
  for (int32_t b : free_blocks_) {
    RTLLM_CHECK(!blocks_[b].is_registered, "free block ", b, " is registered");
    ++num_places[b];
  }
  for (int32_t b : reusable_lru_) {
    RTLLM_CHECK(blocks_[b].is_registered, "reusable block ", b, " is not registered");
    ++num_places[b];
  }
  const int64_t num_held = std::count_if(num_holders.begin(), num_holders.end(), [](int32_t n) { return n > 0; });
  RTLLM_CHECK(num_held + num_free_blocks() == num_total_blocks(), num_held, " held + ", free_blocks_.size(),
              " free + ", reusable_lru_.size(), " reusable blocks != ", num_total_blocks(), " blocks");
  size_t num_registered = 0;
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& block = blocks_[b];
    RTLLM_CHECK(block.ref_count == num_holders[b], "block ", b, " has ref count ", block.ref_count, " but ",
                num_holders[b], " holders");
    RTLLM_CHECK(num_places[b] == (block.ref_count == 0 ? 1 : 0), "block ", b, " with ", block.ref_count,
                " holders is in ", num_places[b], " of the free and reusable lists");
    if (!block.is_registered) continue;
    ++num_registered;
    RTLLM_CHECK(static_cast<int32_t>(block.tokens.size()) == tokens_per_block_, "registered block ", b, " has ",
                block.tokens.size(), " tokens");
    auto [first, last] = by_hash_.equal_range(block.hash);
    RTLLM_CHECK(std::count_if(first, last, [&](const auto& kv) { return kv.second == static_cast<int32_t>(b); }) == 1,
                "registered block ", b, " is not in the hash map exactly once");
    RTLLM_CHECK(children_.count(child_entry(static_cast<int32_t>(b))) == 1, "registered block ", b,
                " is not among the children exactly once");
  }
  RTLLM_CHECK(num_registered == by_hash_.size() && num_registered == children_.size(), by_hash_.size(),
              " hash entries and ", children_.size(), " child entries for ", num_registered, " registered blocks");
  // The rewind rule rests on this: past its stored blocks a sequence holds private blocks only.
  for (const auto& [seq, blocks] : sequences_)
    for (size_t i = blocks.num_stored_blocks; i < blocks.block_ids.size(); ++i) {
      const Block& block = blocks_[blocks.block_ids[i]];
      RTLLM_CHECK(!block.is_registered && block.ref_count == 1, "block ", blocks.block_ids[i], " at position ", i,
                  " of sequence ", seq, " is past its ", blocks.num_stored_blocks, " stored blocks but is ",
                  block.is_registered ? "registered" : "shared");
    }
}

const KVCacheManager::SequenceBlocks& KVCacheManager::sequence(RequestId seq) const {
  auto it = sequences_.find(seq);
  RTLLM_CHECK(it != sequences_.end(), "sequence ", seq, " holds no KV-cache blocks");
  return it->second;
}

}  // namespace rtllm
