"""BlockManager: allocation, refcounts, prefix caching, LRU eviction, invariants."""

from __future__ import annotations

import itertools
import random

import pytest

from aotlm.errors import ConfigError
from aotlm.runtime.generation.block_manager import BlockManager, OutOfPagesError, page_hash
from aotlm.runtime.generation.sequence import Sample, Sequence

PAGE = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", prompt_token_ids=tuple(tokens))


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What a prefill of the whole sequence does: pages, then KV written."""
    todo = seq.num_tokens - seq.num_computed_tokens
    bm.allocate_for(seq, todo)
    bm.mark_computed(seq, todo)


def test_needs_page_zero_reserved_and_a_positive_page_size():
    with pytest.raises(ConfigError, match="kv_pages"):
        BlockManager(1, PAGE)
    with pytest.raises(ConfigError):
        BlockManager(8, 0)


def test_allocates_on_demand_and_never_hands_out_page_zero():
    bm = BlockManager(num_pages=6, page_size=PAGE)
    seq = make_seq(1, list(range(9)))
    assert bm.pages_needed(seq, 9) == 3
    bm.allocate_for(seq, 5)
    assert len(seq.block_table) == 2
    bm.mark_computed(seq, 5)
    bm.allocate_for(seq, 3)  # tokens 5..7 still fit in page 2
    assert len(seq.block_table) == 2
    bm.allocate_for(seq, 4)
    assert len(seq.block_table) == 3
    assert 0 not in seq.block_table
    assert (bm.num_used_pages, bm.num_free_pages) == (3, 2)
    bm.check_invariants()

    other = make_seq(2, list(range(100, 108)))
    assert bm.can_allocate(other, 8) and not bm.can_allocate(other, 9)
    bm.allocate_for(other, 8)
    assert bm.num_free_pages == 0 and 0 not in other.block_table
    with pytest.raises(OutOfPagesError, match="needs 1 pages, 0 are free"):
        bm.allocate_for(other, 9)
    bm.check_invariants()


def test_free_returns_pages_and_resets_computed_tokens():
    bm = BlockManager(num_pages=8, page_size=PAGE)
    seq = make_seq(1, list(range(6)))  # one full page, one partial
    compute_all(bm, seq)
    assert bm.num_cached_pages == 1  # only the full page is hashed
    bm.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_used_pages == 0 and bm.num_free_pages == 7
    assert bm.num_cached_pages == 1 and bm.num_evictable_pages == 1  # still findable
    bm.check_invariants()


def test_second_request_reuses_a_shared_prefix_and_counts_it():
    bm = BlockManager(num_pages=32, page_size=PAGE)
    shared = list(range(1000, 1018))  # 18 tokens: 4 full pages + 2
    first = make_seq(1, [*shared, 1, 2, 3])
    assert bm.match_prefix(first) == 0
    compute_all(bm, first)
    assert bm.num_cached_pages == 5  # 21 tokens: 5 full pages

    second = make_seq(2, [*shared, 7, 8, 9, 10, 11])
    assert bm.lookup_prefix(second) == first.block_table[:4]
    assert bm.match_prefix(second) == 16
    assert second.num_computed_tokens == 16 and second.num_cached_prompt_tokens == 16
    assert second.block_table == first.block_table[:4]
    assert (bm.prefix_queries, bm.prefix_hits) == (21 + 23, 16)
    used_before = bm.num_used_pages
    compute_all(bm, second)
    assert bm.num_used_pages == used_before + 2  # only the divergent tail is new
    bm.check_invariants()

    bm.free(first)  # shared pages survive: the second request still holds them
    assert all(bm._refcount[p] == 1 for p in second.block_table)
    bm.check_invariants()


def test_a_fully_cached_prompt_still_recomputes_its_last_token():
    bm = BlockManager(num_pages=16, page_size=PAGE)
    tokens = list(range(12))  # exactly 3 pages
    first = make_seq(1, tokens)
    compute_all(bm, first)
    bm.free(first)
    again = make_seq(2, tokens)
    assert bm.match_prefix(again) == 8  # pages 0-1; page 2 holds the last token
    bm.allocate_for(again, 4)
    bm.mark_computed(again, 4)
    assert bm.num_cached_pages == 3  # page 2's content was cached already: no duplicate
    bm.check_invariants()


def test_preempted_sequence_matches_its_own_generated_tokens():
    bm = BlockManager(num_pages=16, page_size=PAGE)
    seq = make_seq(1, [5, 6, 7])
    compute_all(bm, seq)
    for t in (8, 9, 10, 11, 12):  # decode: each new token is computed in a later step
        seq.append_token(Sample(t))
        bm.allocate_for(seq, 1)
        bm.mark_computed(seq, seq.num_tokens - seq.num_computed_tokens - 1)
    bm.free(seq)
    assert seq.num_tokens == 8
    assert bm.match_prefix(seq) == 4  # [5..8] is cached; [9..12] is not computed fully
    assert seq.num_cached_prompt_tokens == 3  # first admission's value is kept
    bm.check_invariants()


def test_lru_evicts_the_least_recently_freed_pages_first():
    bm = BlockManager(num_pages=6, page_size=PAGE)  # 5 usable pages
    a = make_seq(1, [1] * 8 + [0])
    b = make_seq(2, [2] * 8 + [0])
    compute_all(bm, a)  # 2 full (hashed) pages + 1 partial
    bm.free(a)
    compute_all(bm, b)  # the 2 untouched pages and a's partial one: nothing cached is evicted
    bm.free(b)
    assert bm.num_cached_pages == 4 and bm.num_evictable_pages == 4

    touch = make_seq(3, [1] * 8 + [0])  # reuse a: its pages become the most recent
    assert bm.match_prefix(touch) == 8
    bm.free(touch)

    c = make_seq(4, [3] * 10)
    bm.allocate_for(c, 10)  # 3 pages: the free one, then b's two (the oldest now)
    assert bm.lookup_prefix(make_seq(5, [2] * 8 + [0])) == []
    assert len(bm.lookup_prefix(make_seq(6, [1] * 8 + [0]))) == 2
    bm.check_invariants()


def test_evictable_pages_count_as_free_but_revived_ones_do_not():
    bm = BlockManager(num_pages=4, page_size=PAGE)  # 3 usable pages
    a = make_seq(1, [1] * 8 + [0])
    compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_pages == 3
    b = make_seq(2, [1] * 8 + [0, 0, 0, 0, 0])  # 13 tokens: 2 cached pages + 2 new
    prefix = bm.lookup_prefix(b)
    assert len(prefix) == 2
    # 2 cached pages adopted leave 1 free page; the remaining 5 tokens need 2.
    assert not bm.can_allocate(b, 5, prefix)
    assert bm.can_allocate(b, 4, prefix)


def test_page_hash_is_a_chain():
    root = page_hash(b"", [1, 2, 3, 4])
    assert page_hash(root, [5, 6, 7, 8]) != page_hash(page_hash(b"", [9, 9, 9, 9]), [5, 6, 7, 8])
    assert page_hash(b"", [1, 2, 3, 4]) == root


@pytest.mark.parametrize("seed", range(12))
def test_invariants_hold_after_random_operations(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_pages=rng.randint(4, 24), page_size=rng.choice([1, 2, 4]))
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(0, 12))] for _ in range(4)]
    ids = itertools.count()
    live: list[Sequence] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            tail = [rng.randrange(5) for _ in range(rng.randint(1, 10))]
            seq = make_seq(next(ids), rng.choice(prefixes) + tail)
            prefix = bm.lookup_prefix(seq)
            if bm.can_allocate(seq, 1, prefix):
                reused = bm.match_prefix(seq)
                assert reused % bm.page_size == 0 and reused < seq.num_tokens
                live.append(seq)
        elif op < 0.75:
            seq = rng.choice(live)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(Sample(rng.randrange(5)))
            todo = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
            if bm.can_allocate(seq, todo):
                bm.allocate_for(seq, todo)
                bm.mark_computed(seq, todo)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check_invariants()
        assert bm.prefix_hits <= bm.prefix_queries
    for seq in live:
        bm.free(seq)
    bm.check_invariants()
    assert bm.num_used_pages == 0 and bm.num_free_pages == bm.num_usable_pages
