"""
An approximate index of the prompts each upstream has been sent, as pure logic:
which upstream already holds the longest prefix of a new prompt in its cache.

A prompt's text is cut into blocks of C{BLOCK} characters, and each block is
named by a hash chained over every block before it (so a block's hash stands
for the whole prefix up to it, as in vLLM's and SGLang's prefix caches).  Per
upstream the index keeps the hashes of the prefixes it was sent, in one LRU
over all upstreams, bounded in memory (about C{ENTRY_BYTES} an entry).  A
match walks a prompt's hashes from the first until one is missing: the
prefix the upstream is likely to hold.  Hash collisions only ever cost a
misrouted request, never a wrong answer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

BLOCK = 64  # characters a block: about 16 tokens
ENTRY_BYTES = 160  # what one entry of the LRU costs in memory, measured with tracemalloc (tests/test_prefix.py)


def block_hashes(text: str) -> tuple[int, ...]:
    """The chained hashes of C{text}'s whole blocks (a last partial block is left out: it is not shared yet)."""
    data = text.encode("utf-8")
    hashes = []
    digest = b""
    for start in range(0, len(data) - BLOCK + 1, BLOCK):
        digest = hashlib.blake2b(digest + data[start:start + BLOCK], digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "little"))
    return tuple(hashes)


class PrefixIndex:
    """The prefixes sent to each upstream (any hashable key), most recently used last, at most C{max_entries}."""

    def __init__(self, max_bytes: int) -> None:
        self.max_entries = max(1, max_bytes // ENTRY_BYTES)
        self._lru: OrderedDict[tuple[Hashable, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def insert(self, upstream: Hashable, hashes: Sequence[int]) -> None:
        """C{upstream} was sent a prompt of these block hashes: it holds them now (the newest entries)."""
        lru = self._lru
        for h in hashes:
            key = (upstream, h)
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
        while len(lru) > self.max_entries:
            lru.popitem(last=False)

    def match(self, upstream: Hashable, hashes: Sequence[int]) -> int:
        """How many of the prompt's leading blocks C{upstream} holds."""
        lru = self._lru
        n = 0
        for h in hashes:
            if (upstream, h) not in lru:
                break
            n += 1
        return n

    def forget(self, upstream: Hashable) -> None:
        """C{upstream} restarted: its cache is empty."""
        for key in [k for k in self._lru if k[0] == upstream]:
            del self._lru[key]
