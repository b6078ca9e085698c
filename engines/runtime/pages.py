"""KV-page accounting for the scheduler: the free pages and the pages each running sequence holds.

Pages are those of export/kv_pages.py (the planner's accounting): a sequence holds `pages_for(n)` pages for
n tokens. The scheduler allocates a sequence's prompt pages when it admits it and one more page whenever it
grows past one, and frees them all when it ends or is preempted. Each allocation is also a block-table
update the next batch carries to the executor (`RaggedBatch.pages`).
"""

from __future__ import annotations

from ...export.kv_pages import pages_for


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages={num_pages} and page_size={page_size} must be >= 1")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out the lowest page first
        self.updates: list[tuple[int, int, list[int]]] = []  # block-table changes not yet sent to the executor

    @property
    def free(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return pages_for(tokens, self.page_size)

    def missing(self, held: list[int], tokens: int) -> int:
        """Pages a sequence holding `held` still needs for `tokens` tokens."""
        return max(0, self.pages_for(tokens) - len(held))

    def grow(self, slot: int, held: list[int], tokens: int) -> None:
        """Extend `held` (in place) to cover `tokens` tokens, recording the block-table update of `slot`."""
        need = self.missing(held, tokens)
        if need > len(self._free):
            raise RuntimeError(f"PagePool: {need} pages needed, {len(self._free)} free")
        if need:
            new = [self._free.pop() for _ in range(need)]
            self.updates.append((slot, len(held), new))
            held.extend(new)

    def release(self, held: list[int]) -> None:
        self._free.extend(reversed(held))
        held.clear()

    def take_updates(self, slots: set[int] | None = None) -> list[tuple[int, int, list[int]]]:
        """The updates not sent yet, of `slots` (None: all); the others wait for the next batch."""
        updates = [u for u in self.updates if slots is None or u[0] in slots]
        self.updates = [u for u in self.updates if slots is not None and u[0] not in slots]
        return updates
