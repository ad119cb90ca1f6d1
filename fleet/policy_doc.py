"""`GET /v1/policy`: the fleet's policy file as serve publishes it (contract section 7).

The operator's reviewed file (`serve --policy FILE`) is read at start (refused: exit 2)
and again whenever it changes (looked at once a second at most, on a GET). A changed file
that does not read as a policy is refused: the last good one stays published, the error
is logged and counted, so agents never receive a policy serve could not read itself. The
ETag is a hash of the bytes served; agents send it back and get 304 while it holds.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from policy.toml_file import MAX_BYTES, PolicyError, parse_policy

log = logging.getLogger("imdswatch.serve")
RECHECK_S = 1.0


def policy_etag(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=12).hexdigest()


class PolicyDocument:
    def __init__(self, path: str, catalog: Iterable[Any] = (),
                 on_refused: Callable[[], None] | None = None) -> None:
        self.path = path
        self.catalog = list(catalog)
        self.on_refused = on_refused
        self._doc: tuple[str, bytes] | None = None
        self._stat: tuple | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._load(initial=True)

    def _load(self, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key == self._stat:
                return
            with open(self.path, "rb") as f:
                raw = f.read(MAX_BYTES + 1)
            if len(raw) > MAX_BYTES:
                raise PolicyError(f"{self.path}: larger than {MAX_BYTES >> 20} MiB")
            parse_policy(raw, self.path, self.catalog)
        except (OSError, PolicyError) as exc:
            msg = str(exc) if isinstance(exc, PolicyError) else f"{self.path}: {exc}"
            if initial:
                raise PolicyError(msg) from None
            if self._stat != ("refused", msg):
                log.error("policy not published, the previous one stays: %s", msg)
                if self.on_refused is not None:
                    self.on_refused()
            self._stat = ("refused", msg)
            return
        self._stat = key
        self._doc = (policy_etag(raw), gzip.compress(raw, mtime=0))
        if not initial:
            log.info("policy %s published (etag %s)", self.path, self._doc[0])

    def current(self) -> tuple[str, bytes] | None:
        """(ETag, gzip body) of the last good policy."""
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= RECHECK_S:
                self._checked = now
                self._load()
            return self._doc
