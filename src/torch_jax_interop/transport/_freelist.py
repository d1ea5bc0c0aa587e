"""First-fit allocation inside one buffer, shared by the shared-memory and CUDA IPC pools."""

from __future__ import annotations

import bisect


class FreeList:
    """Free ``[offset, size]`` blocks of a buffer of ``size`` bytes, sorted and coalesced.

    Not thread-safe: the pools call it under their own lock.
    """

    __slots__ = ("free", "used")

    def __init__(self, size: int) -> None:
        self.free: list[list[int]] = [[0, size]]
        self.used = 0

    def take(self, block: int) -> int | None:
        """First fit: the offset of a free block of ``block`` bytes, or None."""
        for i, (start, size) in enumerate(self.free):
            if size >= block:
                if size == block:
                    del self.free[i]
                else:
                    self.free[i] = [start + block, size - block]
                self.used += block
                return start
        return None

    def give_back(self, start: int, block: int) -> None:
        """Return ``[start, start + block)`` and merge it with free neighbours."""
        self.used -= block
        free = self.free
        i = bisect.bisect_left(free, [start, 0])
        if i > 0 and free[i - 1][0] + free[i - 1][1] == start:
            i -= 1
            free[i][1] += block
        else:
            free.insert(i, [start, block])
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i][1] += free[i + 1][1]
            del free[i + 1]
