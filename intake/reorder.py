"""Events in event-time order, from input that is only roughly in order.

Exported traces and agents' batches are rarely perfectly sorted (several hosts' streams
interleave, shippers batch), so items wait here until the newest time seen is `window`
past them. Replay and the fleet scorer both order their events through it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

# Items held at most, whatever the window: a flood of events within one window (200,000
# names in two minutes) would otherwise all wait in memory. Past it the oldest go early;
# an item that then arrives older than them is counted late and scored, never lost.
DEFAULT_MAX_ITEMS = 50_000


class ReorderBuffer:
    """Holds items (time, line number, ...) until the newest time seen is `window` past them, then
    releases them in time order. In-order arrivals, the usual case, queue in a FIFO;
    only out-of-order ones pay for the heap. An item older than what was already
    released comes straight back out and is counted in `late`. At most `max_items` wait:
    past that the oldest are released early (counted in `forced`)."""

    def __init__(self, window: float, max_items: int = DEFAULT_MAX_ITEMS) -> None:
        self.window = window
        self.max_items = max(1, max_items)
        self.fifo: deque[tuple] = deque()
        self.heap: list[tuple] = []
        self.newest = -math.inf
        self.released = -math.inf
        self.late = 0
        self.forced = 0

    def push(self, item: tuple) -> list[tuple]:
        """Add `item`; returns the items now released, in time order."""
        out = self._push(item)
        if len(self.fifo) + len(self.heap) > self.max_items:
            out = [*out, *self._release_oldest()]
        return out

    def _release_oldest(self) -> list[tuple]:
        fifo, heap = self.fifo, self.heap
        out = []
        while len(fifo) + len(heap) > self.max_items:
            if fifo and not (heap and heap[0] < fifo[0]):
                out.append(fifo.popleft())
            else:
                out.append(heapq.heappop(heap))
        self.forced += len(out)
        self.released = out[-1][0]
        return out

    def _push(self, item: tuple) -> list[tuple]:
        ts = item[0]
        if ts < self.released:
            self.late += 1
            return [item]
        fifo = self.fifo
        if self.heap or (fifo and ts < fifo[-1][0]):
            if not fifo or ts >= fifo[-1][0]:
                fifo.append(item)
            else:
                heapq.heappush(self.heap, item)
            if ts <= self.newest:
                return _NONE
            self.newest = ts
            return self._release(ts - self.window)
        # In order, nothing in the heap: the usual case, kept short.
        fifo.append(item)
        self.newest = ts
        horizon = ts - self.window
        if fifo[0][0] > horizon:
            return _NONE
        out = [fifo.popleft()]
        while fifo and fifo[0][0] <= horizon:
            out.append(fifo.popleft())
        self.released = out[-1][0]
        return out

    def _release(self, horizon: float) -> list[tuple]:
        fifo, heap = self.fifo, self.heap
        out = []
        while True:
            if fifo and fifo[0][0] <= horizon:
                if heap and heap[0] < fifo[0]:
                    out.append(heapq.heappop(heap))
                else:
                    out.append(fifo.popleft())
            elif heap and heap[0][0] <= horizon:
                out.append(heapq.heappop(heap))
            else:
                break
        if out:
            self.released = out[-1][0]
        return out

    def drain(self) -> list[tuple]:
        return self._release(math.inf)


_NONE: list[tuple] = []
