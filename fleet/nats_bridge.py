"""The NATS client (nats-py, asyncio only) driven from serve's threads, and its credentials.

One event loop runs in a daemon thread; any thread calls a coroutine on it with
`Bridge.call(coro, timeout)` and blocks for its result. The client and every JetStream
object are created on that loop and shared by all threads. Callbacks the client runs
(errors, disconnects) run on the loop and only log.

Credentials come from a file, never from the command line or a URL (both end up in process
listings and logs): a `.creds` file (user JWT and nkey seed), an nkey seed (`SU...`),
`USER:PASSWORD` on one line, or a token. `--bus-ca` names the CA that signed the servers'
certificates (TLS is then required).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client

log = logging.getLogger("imdswatch.fleet.bus")

T = TypeVar("T")
MAX_CREDS_BYTES = 64 << 10


class BusError(Exception):
    """The bus cannot be used as configured, or did not answer; the message says which."""


class Bridge:
    """One asyncio loop in a daemon thread; blocking calls into it from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="imdswatch-nats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """The coroutine's result; its exception; builtin TimeoutError after `timeout`
        (the coroutine is then cancelled, so nothing is left running on the loop)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.done():
                raise  # the coroutine's own timeout (the same class on Python 3.11)
            fut.cancel()
            raise TimeoutError(f"no answer from the bus in {timeout:g}s") from None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        if self.loop.is_closed():
            return
        try:
            self.call(cancel_rest(), 5)
        except Exception:  # noqa: BLE001 - closing whatever state the loop is in
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def check_servers(servers: str) -> list[str]:
    """`nats://H:P[,nats://H:P...]` as a list; refuses credentials written in a URL."""
    out = []
    for url in (u.strip() for u in servers.split(",")):
        if not url:
            continue
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise BusError(f"--bus: {exc}") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise BusError("--bus takes nats://HOST:PORT (or tls://HOST:PORT) URLs, "
                           "comma-separated")
        if parts.username is not None or parts.password is not None:
            # Never echo the URL: it holds the secret.
            raise BusError("--bus: credentials in a URL are refused (they would show in "
                           "process listings and logs); put them in --bus-creds FILE")
        if port is None:
            raise BusError(f"--bus {url}: give the port (nats://HOST:PORT)")
        out.append(url)
    if not out:
        raise BusError("--bus: no server URL given")
    return out


def read_credentials(path: str) -> dict[str, str]:
    """nats.connect keyword arguments for the credentials in `path`. Errors never quote
    the file's content."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_CREDS_BYTES + 1)
    except OSError as exc:
        raise BusError(f"--bus-creds {path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_CREDS_BYTES:
        raise BusError(f"--bus-creds {path}: larger than any credentials file")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BusError(f"--bus-creds {path}: not a text file") from None
    if "-----BEGIN NATS USER JWT-----" in text:
        if "-----BEGIN USER NKEY SEED-----" not in text:
            raise BusError(f"--bus-creds {path}: a .creds file without its nkey seed")
        return {"user_credentials": str(p)}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        raise BusError(f"--bus-creds {path}: expected a .creds file, an nkey seed (SU...), "
                       "USER:PASSWORD on one line, or a token")
    line = lines[0]
    if line.startswith("SU") and len(line) == 58 and line.isalnum():
        return {"nkeys_seed": str(p)}
    if ":" in line:
        user, _, password = line.partition(":")
        if not user or not password:
            raise BusError(f"--bus-creds {path}: USER:PASSWORD with an empty part")
        return {"user": user, "password": password}
    return {"token": line}


def tls_context(ca: str | None) -> ssl.SSLContext | None:
    if ca is None:
        return None
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise BusError(f"--bus-ca {ca}: cannot load the CA certificate ({exc})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Connection:
    """The client's connection state as the other threads read it, and its last error."""

    def __init__(self) -> None:
        self.last_error = ""
        self.closing = False
        self._quiet_until = 0.0
        self.on_change: list[Any] = []

    async def error_cb(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        self.last_error = text
        # One line, at most every ten seconds (the client retries several times a second).
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 10.0
            log.warning("bus: %s", text)

    async def disconnected_cb(self) -> None:
        if not self.closing:
            log.warning("bus: disconnected; reconnecting")
        for f in self.on_change:
            f(False)

    async def reconnected_cb(self) -> None:
        log.info("bus: reconnected")
        for f in self.on_change:
            f(True)


async def connect(servers: list[str], name: str, creds: dict[str, str],
                  tls: ssl.SSLContext | None, conn: Connection) -> Client:
    kwargs: dict[str, Any] = dict(creds)
    if tls is not None:
        kwargs["tls"] = tls
    return await nats.connect(
        servers=servers, name=name, error_cb=conn.error_cb,
        disconnected_cb=conn.disconnected_cb, reconnected_cb=conn.reconnected_cb,
        # Never give up (the default closes the client for good after ~2 minutes), and
        # notice a dead peer within a few seconds.
        max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
        ping_interval=2, max_outstanding_pings=2, **kwargs)
