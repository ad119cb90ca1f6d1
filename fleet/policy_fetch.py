"""`run --policy fleet`: the agent's copy of the fleet's policy (`GET /v1/policy`).

Fetched at start and every `interval` seconds (ETag: an unchanged policy costs one small
request). A policy that reads is handed over whole (`take()` on the agent's loop) and kept
as the last good one in the spool directory, so an agent restarted while serve is away
enforces what it enforced before. One that does not read is refused: the previous policy
stays in force, the refusal is logged, counted and reported (`refusals`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from fleet.client import FleetClient, FleetRejected, FleetUnavailable
from fleet.token_file import read_token
from policy.model import Policy
from policy.toml_file import PolicyError, parse_policy

log = logging.getLogger("imdswatch.fleet")
POLICY_INTERVAL = 30.0
START_TIMEOUT = 5.0
LAST_GOOD = "policy.toml"


class FleetPolicy:
    def __init__(self, url: str, spool_dir: str, token_file: str | None, ca_file: str | None,
                 catalog: Iterable[Any], interval: float = POLICY_INTERVAL) -> None:
        token = read_token(token_file, "--fleet-token-file") if token_file else None
        self.client = FleetClient(url, token, ca_file, timeout=START_TIMEOUT)
        self.catalog = list(catalog)
        self.interval = interval
        self.path = os.path.join(spool_dir, LAST_GOOD)
        self.etag: str | None = None
        self.refusals: list[str] = []  # refusal messages not yet reported by the agent
        self._pending: Policy | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def initial(self) -> tuple[Policy | None, str]:
        """The policy to start with and where it came from: the fleet's, else the last
        good one kept in the spool, else None."""
        got = self._fetch()
        if got is not None:
            return got, "the fleet scorer"
        try:
            with open(self.path, "rb") as f:
                return parse_policy(f.read(), self.path, self.catalog), self.path
        except (OSError, PolicyError) as exc:
            log.warning("no fleet policy yet and no last good copy (%s)", exc)
            return None, ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="imdswatch-fleet-policy",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            got = self._fetch()
            if got is not None:
                with self._lock:
                    self._pending = got

    def _fetch(self) -> Policy | None:
        try:
            etag, raw = self.client.fetch_policy(self.etag)
        except (FleetUnavailable, FleetRejected) as exc:
            log.info("fleet policy not fetched: %s", exc)
            return None
        if raw is None:
            return None  # unchanged
        try:
            policy = parse_policy(raw, "the fleet policy", self.catalog)
        except PolicyError as exc:
            log.error("fleet policy refused, the previous one stays in force: %s", exc)
            with self._lock:
                self.refusals.append(str(exc))
            self.etag = etag  # reported once, not on every fetch
            return None
        try:
            from scoring.state import write_atomic

            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_atomic(self.path, raw)
        except OSError as exc:
            log.warning("cannot keep the fleet policy in %s: %s", self.path, exc)
        self.etag = etag
        log.info("fleet policy fetched (etag %s): %d rules, default %s", etag,
                 len(policy.rules), policy.default)
        return policy

    def take(self) -> tuple[Policy | None, list[str]]:
        """(a new policy or None, refusals since the last call): for the agent's loop."""
        with self._lock:
            p, self._pending = self._pending, None
            r, self.refusals = self.refusals, []
        return p, r

    def close(self) -> None:
        self._stop.set()
        self.client.close()
