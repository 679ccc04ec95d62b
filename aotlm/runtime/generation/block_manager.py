"""KV page allocation with reference counts and prefix caching.

The pool holds pages `0 .. num_pages - 1`; page 0 is the trash page that padding tokens write
to, so it is never handed out. Every other page is in exactly one of three states:

- free: refcount 0, no hash; handed out first.
- evictable: refcount 0, holds a hash; its KV is still valid and findable by prefix lookup.
  Kept in LRU order and evicted (hash dropped) only when no free page is left.
- used: refcount > 0 = the number of block tables that hold it. A page in more than one
  block table is full and hashed (only full, computed pages are ever shared) and never written.

A full page is identified by a hash chain: sha256(parent page's hash, the page's token ids),
so equal hashes mean equal whole prefixes. The hash is cryptographic so that one client cannot
craft a collision that reads another's cached KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceABC

from aotlm.errors import AotlmError, ConfigError
from aotlm.runtime.generation.sequence import Sequence


class OutOfPagesError(AotlmError):
    """An allocation asked for more pages than are free; callers check `can_allocate` first."""


def page_hash(parent: bytes, token_ids: SequenceABC[int]) -> bytes:
    """Hash of a full page given its parent's hash (b"" for the first page)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Hands out KV pages to sequences and keeps full pages findable by content."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2 or page_size < 1:
            raise ConfigError(
                f"kv_pages={num_pages}, page_size={page_size}: need at least 2 pages "
                "(page 0 is reserved) and a page size >= 1"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcount = [0] * num_pages
        self._hash_of: list[bytes | None] = [None] * num_pages
        self._page_of: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._holders: dict[int, Sequence] = {}  # seq_id -> sequence holding pages
        self.prefix_queries = 0  # tokens looked up by match_prefix
        self.prefix_hits = 0  # of those, tokens whose KV was reused

    # ---- counters -------------------------------------------------------------------------

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can take now (free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - self.num_free_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages findable by prefix lookup (used or evictable)."""
        return len(self._page_of)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        return self.num_used_pages / self.num_usable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- prefix cache ---------------------------------------------------------------------

    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding the longest prefix of `seq`'s tokens; changes no state.

        Stops one token short of the whole sequence: the step must compute at least one token
        to produce the logits that sample the next one.
        """
        max_pages = (seq.num_tokens - 1) // self.page_size
        pages = []
        for h in self._content_hashes(seq, max_pages):
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def match_prefix(self, seq: Sequence) -> int:
        """Adopt `lookup_prefix(seq)` into a page-less sequence; returns the tokens reused.

        Sets `seq.num_computed_tokens` to the reused length (a multiple of page_size, less than
        `seq.num_tokens`) and, at first admission, `seq.num_cached_prompt_tokens`.
        """
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"match_prefix: sequence {seq.seq_id} already holds pages")
        pages = self.lookup_prefix(seq)
        for page in pages:
            self._take(page)
        seq.block_table.extend(pages)
        seq.num_computed_tokens = len(pages) * self.page_size
        if seq.num_cached_prompt_tokens is None:
            seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        self._holders[seq.seq_id] = seq
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_computed_tokens
        return seq.num_computed_tokens

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Record that the KV of the next `num_tokens` tokens is now in `seq`'s pages.

        Pages that became full are registered in the prefix cache, unless the same content
        is already cached in another page (then this page simply stays unhashed).
        """
        old = seq.num_computed_tokens
        new = old + num_tokens
        if new > min(seq.num_tokens, len(seq.block_table) * self.page_size):
            raise ValueError(
                f"mark_computed: sequence {seq.seq_id} has {seq.num_tokens} tokens and "
                f"{len(seq.block_table)} pages; cannot have {new} computed"
            )
        seq.num_computed_tokens = new
        full_pages = new // self.page_size
        hashes = self._content_hashes(seq, full_pages)
        for i in range(old // self.page_size, full_pages):
            page = seq.block_table[i]
            if self._hash_of[page] is None and hashes[i] not in self._page_of:
                self._hash_of[page] = hashes[i]
                self._page_of[hashes[i]] = page

    def _content_hashes(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """The hash chain of `seq`'s first `num_pages` full pages (extending its cache)."""
        hashes, tokens, size = seq.page_hashes, seq.all_token_ids, self.page_size
        while len(hashes) < num_pages:
            i = len(hashes)
            parent = hashes[-1] if i else seq.cache_salt  # the first page's: the adapter's salt
            hashes.append(page_hash(parent, tokens[i * size : (i + 1) * size]))
        return hashes[:num_pages]

    # ---- allocation -----------------------------------------------------------------------

    def pages_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh pages `allocate_for(seq, num_new_tokens)` would take."""
        total = self.pages_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, prefix_pages: SequenceABC[int] = ()
    ) -> bool:
        """Whether `num_new_tokens` more tokens fit, after adopting `prefix_pages` if given.

        `prefix_pages` (from `lookup_prefix`) is only for a sequence that holds no pages yet;
        adopting an evictable page takes it out of the free count, so it is accounted here.
        """
        if not prefix_pages:
            return self.pages_needed(seq, num_new_tokens) <= self.num_free_pages
        total = self.pages_for(len(prefix_pages) * self.page_size + num_new_tokens)
        revived = sum(1 for p in prefix_pages if self._refcount[p] == 0)
        return total - len(prefix_pages) <= self.num_free_pages - revived

    def max_new_tokens(self, seq: Sequence) -> int:
        """How many more tokens of `seq` could be computed with the pages free now."""
        room = (len(seq.block_table) + self.num_free_pages) * self.page_size
        return room - seq.num_computed_tokens

    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append fresh pages so `seq`'s block table covers its next `num_new_tokens` tokens."""
        needed = self.pages_needed(seq, num_new_tokens)
        if needed > self.num_free_pages:
            raise OutOfPagesError(
                f"sequence {seq.seq_id} needs {needed} pages, {self.num_free_pages} are free"
            )
        for _ in range(needed):
            seq.block_table.append(self._take_fresh())
        if seq.block_table:
            self._holders[seq.seq_id] = seq

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s pages; its KV is gone, so `num_computed_tokens` becomes 0.

        Pages are released last page first, so that among equally old evictable pages the
        tails of prompts (the least shared) are evicted before their prefixes.
        """
        for page in reversed(seq.block_table):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if self._hash_of[page] is None:
                    self._free.append(page)
                else:
                    self._evictable[page] = None
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        self._holders.pop(seq.seq_id, None)

    def _take(self, page: int) -> None:
        if self._refcount[page] == 0:
            del self._evictable[page]
        self._refcount[page] += 1

    def _take_fresh(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of[self._hash_of[page]]
            self._hash_of[page] = None
        self._refcount[page] = 1
        return page

    # ---- checks ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests)."""
        holders: dict[int, int] = {}
        for seq in self._holders.values():
            _expect(len(set(seq.block_table)) == len(seq.block_table), f"dup page in {seq.seq_id}")
            _expect(
                seq.num_computed_tokens <= len(seq.block_table) * self.page_size,
                f"sequence {seq.seq_id} computed tokens beyond its pages",
            )
            for i, page in enumerate(seq.block_table):
                holders[page] = holders.get(page, 0) + 1
                h = self._hash_of[page]
                _expect(
                    h is None or h == self._content_hashes(seq, i + 1)[i],
                    f"page {page} hash does not match sequence {seq.seq_id}'s tokens",
                )
        _expect(0 not in holders and self._refcount[0] == 0, "page 0 handed out")
        _expect(0 not in self._free and 0 not in self._evictable, "page 0 in the free pool")
        _expect(len(set(self._free)) == len(self._free), "duplicate free page")
        _expect(not set(self._free) & set(self._evictable), "page both free and evictable")
        for page in range(1, self.num_pages):
            ref, h = self._refcount[page], self._hash_of[page]
            _expect(ref == holders.get(page, 0), f"page {page}: refcount {ref} != holders")
            _expect((ref == 0 and h is None) == (page in self._free), f"page {page}: free state")
            _expect((ref == 0 and h is not None) == (page in self._evictable), f"page {page}: lru")
            _expect(ref <= 1 or h is not None, f"page {page}: shared but not hashed")
            _expect(h is None or self._page_of.get(h) == page, f"page {page}: hash not findable")
        _expect(len(self._page_of) == sum(h is not None for h in self._hash_of), "stale hashes")
        _expect(self.num_free_pages + len(holders) == self.num_usable_pages, "pages leaked")


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)
