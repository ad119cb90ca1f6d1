"""Which events the fleet scorer has already accepted, by `event.id`, in bounded memory.

Retries come from agents whose batch was made durable but whose acknowledgement was lost
(a reset connection, a serve killed between the fsync and the 200), so they arrive within
minutes to hours of the first copy. Two generations of ids cover that: lookups check both,
inserts go to the current one, and once it holds `capacity / 2` ids or is `horizon / 2`
seconds old the older generation is forgotten. At least the newest `capacity / 2` ids (and
every id of the last `horizon / 2` seconds, up to `capacity`) are always remembered.

Ids are kept as 64-bit digests (blake2b): a Python int costs a third of the id string, and
two distinct ids collide with probability ~n^2/2^65 (1e-7 at a million ids).
"""

from __future__ import annotations

import base64
import hashlib
import time
from array import array
from collections.abc import Callable, Iterable

DEFAULT_CAPACITY = 2_000_000
DEFAULT_HORIZON = 24 * 3600.0


def digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class IdWindow:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, horizon: float = DEFAULT_HORIZON,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 2:
            raise ValueError("the id window needs a capacity of at least 2")
        self.capacity = capacity
        self.horizon = horizon
        self._clock = clock
        self._current: set[int] = set()
        self._previous: set[int] = set()
        self._since = clock()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, key: int) -> bool:
        return key in self._current or key in self._previous

    def add(self, key: int) -> bool:
        """Remember `key`; False when it was already known (a duplicate)."""
        if key in self._current or key in self._previous:
            return False
        if len(self._current) >= self.capacity // 2 or (
                self._clock() - self._since >= self.horizon / 2):
            self._previous = self._current
            self._current = set()
            self._since = self._clock()
        self._current.add(key)
        return True

    def discard(self, keys: Iterable[int]) -> None:
        """Forget `keys` (events that were refused after all, e.g. the log write failed)."""
        for k in keys:
            self._current.discard(k)
            self._previous.discard(k)

    # -- persistence: 8 bytes per id, base64, older generation first ----------------------
    def dump(self) -> dict:
        def pack(ids: set[int]) -> str:
            return base64.b64encode(array("Q", ids).tobytes()).decode("ascii")

        return {"previous": pack(self._previous), "current": pack(self._current)}

    def load(self, data: dict) -> None:
        def unpack(text: str) -> set[int]:
            a = array("Q")
            a.frombytes(base64.b64decode(text))
            return set(a)

        self._previous = unpack(data.get("previous", ""))
        self._current = unpack(data.get("current", ""))
        self._since = self._clock()
