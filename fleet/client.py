"""HTTP(S) client of the fleet scorer's API, for agents (and the benchmarks' senders).

One persistent connection, re-opened after any error; every call has a timeout. The token
goes in the Authorization header only; `--fleet-ca` pins the CA that signed serve's
certificate (the system's CAs otherwise).
"""

from __future__ import annotations

import gzip
import http.client
import ssl
import urllib.parse
from dataclasses import dataclass

import orjson

DEFAULT_TIMEOUT = 10.0


class FleetUnavailable(OSError):
    """No answer, or an answer that says retry later (5xx); `retry_after` when given."""

    def __init__(self, message: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class FleetRejected(ValueError):
    """The fleet scorer refused the request for good (401, 400, 413): `status` says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SendResult:
    accepted: int
    duplicates: int
    malformed: int


class FleetClient:
    def __init__(self, url: str, token: str | None = None, ca_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"fleet URL {url!r} is not http(s)://HOST[:PORT]")
        self.url = url
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.base = u.path.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl: ssl.SSLContext | None = None
        if self.https:
            self._ssl = ssl.create_default_context(cafile=ca_file)
        elif ca_file:
            raise ValueError("--fleet-ca needs an https:// fleet URL")
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port,
                                                         timeout=self.timeout,
                                                         context=self._ssl)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _request(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            conn = self._connection()
            conn.request(method, self.base + path, body=body, headers={**self._headers,
                                                                        **headers})
            resp = conn.getresponse()
            data = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self.close()
            return resp.status, hdrs, data
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise FleetUnavailable(f"TLS verification of {self.url} failed: {exc}",
                                   "tls") from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise FleetUnavailable(f"{self.url} unreachable: {exc}", "unreachable") from None

    @staticmethod
    def _check(status: int, hdrs: dict[str, str], data: bytes) -> None:
        if status in (429,) or status >= 500:
            retry = hdrs.get("retry-after")
            try:
                after = float(retry) if retry else None
            except ValueError:
                after = None
            raise FleetUnavailable(f"fleet scorer answered {status}", f"http_{status}", after)
        if status >= 400:
            detail = data[:200].decode("utf-8", "replace")
            raise FleetRejected(f"fleet scorer refused the request: {status} {detail}", status)

    def send(self, ndjson: bytes) -> SendResult:
        """POST NDJSON lines (gzip-compressed on the wire)."""
        body = gzip.compress(ndjson, compresslevel=1)
        status, hdrs, data = self._request("POST", "/v1/events", body, {
            "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
        self._check(status, hdrs, data)
        try:
            doc = orjson.loads(data)
            return SendResult(int(doc.get("accepted", 0)), int(doc.get("duplicates", 0)),
                              int(doc.get("malformed", 0)))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            return SendResult(0, 0, 0)

    def fetch_policy(self, etag: str | None = None) -> tuple[str | None, bytes | None]:
        """(etag, policy file bytes) of the fleet's policy; bytes None when unchanged since
        `etag`. FleetRejected (404) when serve publishes none."""
        headers = {"Accept-Encoding": "gzip"}
        if etag:
            headers["If-None-Match"] = etag
        status, hdrs, data = self._request("GET", "/v1/policy", None, headers)
        if status == 304:
            return etag, None
        self._check(status, hdrs, data)
        if hdrs.get("content-encoding") == "gzip":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as exc:
                raise FleetUnavailable(f"fleet policy unreadable: {exc}", "bad_policy") from None
        return hdrs.get("etag"), data

    def fetch_model(self, etag: str | None = None) -> tuple[str | None, dict | None]:
        """(etag, state) of the fleet model; state None when unchanged since `etag`."""
        headers = {"Accept-Encoding": "gzip"}
        if etag:
            headers["If-None-Match"] = etag
        status, hdrs, data = self._request("GET", "/v1/model", None, headers)
        if status == 304:
            return etag, None
        self._check(status, hdrs, data)
        try:
            if hdrs.get("content-encoding") == "gzip":
                data = gzip.decompress(data)
            state = orjson.loads(data)
        except (OSError, EOFError, orjson.JSONDecodeError) as exc:
            raise FleetUnavailable(f"fleet model unreadable: {exc}", "bad_model") from None
        return hdrs.get("etag"), state
