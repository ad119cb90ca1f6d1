"""Reading HTTP/1.x requests from the bytes a client sent, as far as imdswatch needs them:
method, path, query, User-Agent, and whether the header the metadata service demands
against SSRF is present. Header values other than the User-Agent are never kept: a guard
token is looked at for presence only.

Input is bounded by the caller (tracer/requests.py); everything here is linear in it."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 16384  # a request head longer than this is not a metadata client's
MAX_FIELD = 1024  # longest path, query or user agent kept

# RFC 9110 token characters for a method; metadata clients send GET, PUT, sometimes HEAD/POST.
_REQUEST_LINE = re.compile(rb"([A-Z][A-Z_-]{0,15}) (\S{1,8192}) HTTP/(\d)\.(\d)\r?\n")
_METHOD_START = re.compile(rb"[A-Z][A-Z_-]{0,15}( |$)")
_AWS_PATH = re.compile(r"/(latest|\d{4}-\d\d-\d\d|1\.0)(/|$)")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str | None
    user_agent: str | None
    guarded: bool
    truncated: bool = False  # the head was cut (connection closed, bytes not captured)


def first_bytes_kind(data: bytes) -> str | None:
    """None when `data` can be the start of an HTTP request, else why not: "tls" (a TLS
    handshake record) or "not_http"."""
    if not data:
        return None
    if data[0] == 0x16 and (len(data) < 2 or data[1] == 0x03):
        return "tls"
    if _METHOD_START.match(data[:17]) or (len(data) < 17 and re.fullmatch(rb"[A-Z_-]+", data)):
        return None
    return "not_http"


def _text(raw: bytes) -> str:
    return raw[:MAX_FIELD].decode("utf-8", "replace")


def _guard_present(path: str, headers: dict[bytes, bytes]) -> bool:
    """The guard header of the service the path belongs to; any provider's for a path of
    none (the AWS ECS and EKS credential endpoints use `Authorization`)."""
    aws = b"x-aws-ec2-metadata-token" in headers or \
        b"x-aws-ec2-metadata-token-ttl-seconds" in headers
    gcp = headers.get(b"metadata-flavor", b"").strip().lower() == b"google"
    azure = headers.get(b"metadata", b"").strip().lower() == b"true"
    if _AWS_PATH.match(path):
        return aws
    if path.startswith("/computeMetadata/"):
        return gcp
    if path.startswith("/metadata/"):
        return azure
    return aws or gcp or azure or b"authorization" in headers


def parse_head(head: bytes, truncated: bool = False) -> Request | None:
    """One request head (request line and header lines, without the blank line)."""
    m = _REQUEST_LINE.match(head + (b"" if head.endswith(b"\n") else b"\r\n"))
    if not m:
        return None
    target = m.group(2)
    if target.startswith((b"http://", b"https://")):  # absolute form (proxies)
        rest = target.split(b"://", 1)[1]
        target = b"/" + rest.split(b"/", 1)[1] if b"/" in rest else b"/"
    path, sep, query = target.partition(b"?")
    headers: dict[bytes, bytes] = {}
    for line in head[m.end():].split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    ua = headers.get(b"user-agent")
    p = _text(path)
    return Request(
        method=m.group(1).decode("ascii"),
        path=p,
        query=_text(query) if sep else None,
        user_agent=_text(ua) if ua is not None else None,
        guarded=_guard_present(p, headers),
        truncated=truncated,
    )


@dataclass(slots=True)
class Parsed:
    """What `parse` found at the start of a buffer."""

    request: Request | None  # a complete request head, else None
    consumed: int  # bytes the request takes, its body included (may exceed the buffer)
    status: str  # "request", "need_more", "not_http", "tls", "oversized", "chunked"


def parse(buf: bytes) -> Parsed:
    """The request at the start of `buf`."""
    kind = first_bytes_kind(buf[:17])
    if kind is not None:
        return Parsed(None, 0, kind)
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    sep = 4
    lf = buf.find(b"\n\n", 0, MAX_HEAD + 2)
    if lf != -1 and (end == -1 or lf < end):
        end, sep = lf, 2
    if end == -1:
        return Parsed(None, 0, "oversized" if len(buf) > MAX_HEAD else "need_more")
    head = buf[:end]
    req = parse_head(head)
    if req is None:
        return Parsed(None, 0, "not_http")
    length = 0
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = max(0, int(value.strip()))
            except ValueError:
                length = 0
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            return Parsed(req, end + sep, "chunked")
    return Parsed(req, end + sep + length, "request")
