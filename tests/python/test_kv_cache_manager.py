"""Property test of the KV-cache manager through its binding: hypothesis drives random sequences of
allocate (sharing the longest cached prefix, and the leading tokens of a partially shared block
through a recorded copy) / copy / compute+store / allocate_slots (with lookahead) / rewind / free,
with pool pressure so that reusable blocks are evicted, with cache salts and with a hash that always
collides. After every operation, checked from Python against a model of each sequence's tokens:
ref counts equal the holders (copy sources pinned until their copy runs), no block is both free and
held, a shared block's tokens equal the sequence's, rewind is allowed exactly down to the stored
blocks, and at the end every block is back."""
from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from rtllm import _core

NUM_BLOCKS = 12
STEMS = [[1, 2, 1, 2, 1, 2, 1, 2, 1], [1, 2, 1, 2, 2, 2, 2, 2], [2, 2, 2, 2, 1, 1, 1]]
SALTS = [None, "tenant-a"]


class KvCacheMachine(RuleBasedStateMachine):
    @initialize(tokens_per_block=st.sampled_from([1, 2, 3, 4]), collide=st.booleans())
    def setup(self, tokens_per_block, collide):
        self.tpb = tokens_per_block
        self.kv = _core.KVCacheManager(NUM_BLOCKS, tokens_per_block)
        if collide:
            self.kv.use_colliding_hash_for_testing()
        self.tokens = {}    # seq -> all its tokens
        self.computed = {}  # seq -> tokens whose K/V are "computed"
        self.keys = {}      # seq -> extra key
        self.stored = {}    # seq -> leading blocks taken from the cache or stored

    @rule(seq=st.integers(0, 5), stem=st.sampled_from(STEMS), length=st.integers(1, 9),
          suffix=st.lists(st.integers(1, 2), max_size=3), salt=st.sampled_from(SALTS))
    def allocate(self, seq, stem, length, suffix, salt):
        if seq in self.tokens:
            return
        tokens = stem[:length] + suffix
        key = _core.cache_salt_key(salt)
        match = self.kv.match_prefix(tokens, len(tokens), key)
        start = len(match.block_ids) * self.tpb
        num_cached = start + match.num_partial_tokens
        assert num_cached < len(tokens)
        assert match.num_looked_up_blocks == (len(tokens) - 1) // self.tpb
        for i, b in enumerate(match.block_ids):
            assert self.kv.block_tokens(b) == tokens[i * self.tpb:(i + 1) * self.tpb]
        sources = [match.partial_block_id] if match.partial_block_id >= 0 else []
        if sources:
            assert 1 <= match.num_partial_tokens < self.tpb
            assert self.kv.is_registered(sources[0]) and sources[0] not in match.block_ids
            assert self.kv.block_tokens(sources[0])[:match.num_partial_tokens] == tokens[start:num_cached]
        else:
            assert match.num_partial_tokens == 0
        num_new = self.kv.num_blocks_for(len(tokens)) - len(match.block_ids)
        num_unheld = sum(self.kv.ref_count(b) == 0 for b in match.block_ids + sources)
        assert self.kv.num_blocks_to_take(len(tokens), match) == num_new + num_unheld
        if not self.kv.can_allocate(len(tokens), match):
            assert num_new + num_unheld > self.kv.num_free_blocks
            return
        num_copies = len(self.kv.pending_copies())
        self.kv.allocate(seq, len(tokens), match, key)
        copies = self.kv.pending_copies()
        if sources:  # copy-on-write: into the sequence's own block, never the shared one
            assert copies[-1] == (sources[0], self.kv.block_ids(seq)[len(match.block_ids)])
            assert not self.kv.is_registered(copies[-1][1])
        assert len(copies) == num_copies + len(sources)
        self.tokens[seq], self.computed[seq], self.keys[seq] = tokens, num_cached, key
        self.stored[seq] = len(match.block_ids)

    @rule()
    def run_copies(self):
        if hasattr(self, "kv"):
            self.kv.finish_copies()
            assert self.kv.pending_copies() == []

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def compute(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.finish_copies()  # a step copies before it computes
        n = data.draw(st.integers(1, len(self.tokens[seq]) - self.computed[seq] or 1))
        self.computed[seq] = min(len(self.tokens[seq]), self.computed[seq] + n)
        self.kv.store(seq, self.tokens[seq], self.computed[seq])
        self.stored[seq] = max(self.stored[seq], self.computed[seq] // self.tpb)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(1, 2), max_size=3), lookahead=st.integers(0, 5))
    def allocate_slots(self, data, new, lookahead):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if self.kv.can_allocate_slots(seq, len(new), lookahead):
            self.kv.allocate_slots(seq, len(new), lookahead)
            self.tokens[seq] += new
            assert self.kv.num_lookahead_tokens(seq) == lookahead

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(0, 6))
    def rewind(self, data, n):
        """Only slots past the stored blocks may go: those blocks are never written again."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[seq]
        can = n <= len(tokens) - self.stored[seq] * self.tpb
        assert self.kv.can_rewind(seq, n) == can
        if not can:
            return
        self.kv.rewind(seq, n)
        del tokens[len(tokens) - n:]
        self.computed[seq] = min(self.computed[seq], len(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.kv.free(seq)
        for d in (self.tokens, self.computed, self.keys, self.stored):
            del d[seq]

    @invariant()
    def consistent(self):
        if not hasattr(self, "kv"):
            return
        holders = Counter()
        for seq, tokens in self.tokens.items():
            blocks = self.kv.block_ids(seq)
            num_slots = len(tokens) + self.kv.num_lookahead_tokens(seq)
            assert len(blocks) == self.kv.num_blocks_for(num_slots) and self.kv.num_tokens(seq) == len(tokens)
            assert len(set(blocks)) == len(blocks)
            holders.update(blocks)
            for i, b in enumerate(blocks):
                if self.kv.is_registered(b):  # shared or shareable: must hold this sequence's tokens
                    assert self.kv.block_tokens(b) == tokens[i * self.tpb:(i + 1) * self.tpb]
        for src, dst in self.kv.pending_copies():
            assert self.kv.is_registered(src) and holders[dst] == 1
            holders[src] += 1  # the pin until the copy runs
        for b in range(NUM_BLOCKS):
            assert self.kv.ref_count(b) == holders[b], f"block {b}"
        num_held = sum(1 for n in holders.values() if n)
        assert self.kv.num_free_blocks == NUM_BLOCKS - num_held  # free or reusable = not held
        assert self.kv.stats().num_used_blocks == num_held
        self.kv.check_invariants()

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for seq in list(self.tokens):
            self.kv.free(seq)
        assert self.kv.pending_copies() == []  # copies into freed blocks are dropped
        self.kv.check_invariants()
        assert self.kv.num_free_blocks == NUM_BLOCKS
        assert all(self.kv.ref_count(b) == 0 for b in range(NUM_BLOCKS))


KvCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestKvCacheManager = KvCacheMachine.TestCase
