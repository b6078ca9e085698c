"""State-slot accounting: each running sequence owns one slot of the executor's state pools."""

from __future__ import annotations


class SlotPool:
    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"SlotPool: size={size} must be >= 1")
        self.size = size
        self._free = list(range(size - 1, -1, -1))  # pop() hands out the lowest slot first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.size - len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise RuntimeError("SlotPool: no free slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.size or slot in self._free:
            raise RuntimeError(f"SlotPool: slot {slot} released twice or never acquired")
        self._free.append(slot)
        self._free.sort(reverse=True)
