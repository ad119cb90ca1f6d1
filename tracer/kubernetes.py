"""Pod UID -> (namespace, pod name), from the Kubernetes API, for this node's pods only.

The tracer finds a pod UID in each process's cgroup path; analysts need the pod's name and
namespace. A background thread lists the pods bound to this node (`fieldSelector=
spec.nodeName=$NODE_NAME`, so the API server and the agent only handle this node's share of
the cluster) and then watches for changes, keeping an in-memory directory that `lookup`
reads without ever blocking the event path. Pods' container statuses also give each
running container's image, so `container_image(container_id)` fills `container.image.name`.

It speaks plain HTTPS with the pod's service-account token and CA (no client library to
install in the image). Without API access (not in a cluster, no RBAC, API down) every lookup
returns None, events keep their pod UID only, and one warning says why: enrichment is a
convenience, never a reason for the tracer to stop.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# A pod's last connections can be traced after its DELETED event arrives (the process is
# still exiting), so deleted pods stay resolvable for a while.
DELETED_GRACE_SECONDS = 600.0


class PodDirectory:
    """Caches the pods of one node; `lookup(pod_uid)` answers from memory.

    `api_base` defaults to the in-cluster address (KUBERNETES_SERVICE_HOST/PORT) and
    `node_name` to $NODE_NAME (set from the downward API by the DaemonSet).
    """

    def __init__(
        self,
        api_base: str | None = None,
        node_name: str | None = None,
        *,
        token_path: str | os.PathLike[str] | None = None,
        ca_path: str | os.PathLike[str] | None = None,
        watch_timeout: int = 300,
        read_timeout: float = 90.0,
        max_backoff: float = 60.0,
    ) -> None:
        if api_base is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if host:
                api_base = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        self.api_base = api_base.rstrip("/") if api_base else None
        self.node_name = node_name if node_name is not None else os.environ.get("NODE_NAME")
        self.token_path = Path(token_path) if token_path else SERVICE_ACCOUNT_DIR / "token"
        self.ca_path = Path(ca_path) if ca_path else SERVICE_ACCOUNT_DIR / "ca.crt"
        self.watch_timeout = watch_timeout
        self.read_timeout = read_timeout
        self.max_backoff = max_backoff
        self._pods: dict[str, tuple[str, str]] = {}
        # container id (bare hex, no runtime:// prefix) -> image; per pod, for expiry.
        self._images: dict[str, str] = {}
        self._pod_images: dict[str, dict[str, str]] = {}
        self._deleted: dict[str, float] = {}  # uid -> monotonic time of deletion
        self._lock = threading.Lock()
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: urllib.response.addinfourl | None = None  # the open list/watch
        self._warned = False
        self._resume = ""
        self.disabled_reason: str | None = None
        if not self.api_base:
            self._disable("not running in a Kubernetes cluster (KUBERNETES_SERVICE_HOST unset)")
        elif not self.node_name:
            self._disable("NODE_NAME is not set (give it from the downward API)")

    # -- public ---------------------------------------------------------------------

    def start(self) -> PodDirectory:
        """Start listing and watching in a daemon thread (no-op when disabled)."""
        if self.disabled_reason is None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="imdswatch-pods",
                                            daemon=True)
            self._thread.start()
        return self

    def lookup(self, pod_uid: str | None) -> tuple[str, str] | None:
        """(namespace, pod name) for `pod_uid`, or None when unknown or unavailable."""
        if not pod_uid:
            return None
        uid = pod_uid.replace("_", "-").lower()
        with self._lock:
            return self._pods.get(uid)

    def container_image(self, container_id: str | None) -> str | None:
        """The image of a container of one of this node's pods, from its status."""
        if not container_id:
            return None
        with self._lock:
            return self._images.get(container_id.lower())

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list has completed."""
        return self._synced.wait(timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread: the open watch (which may be idle for minutes) is cut, so the
        thread ends at once; waits at most `timeout` seconds for it."""
        self._stop.set()
        response = self._response
        if response is not None:
            _shutdown(response)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    # -- background thread ------------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                version = self._list()
                backoff = 1.0
                while not self._stop.is_set() and version is not None:
                    version = self._watch(version)
            except PermissionError as exc:
                # RBAC missing: retry rarely, someone may fix the ClusterRole binding.
                self._warn_once(f"no access to the Kubernetes API ({exc}); "
                                "events keep the pod UID only")
                backoff = self.max_backoff
            except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException) as exc:
                # HTTPException: e.g. IncompleteRead when a proxy cuts a watch mid-chunk.
                reason = str(exc) or type(exc).__name__
                self._warn_once(f"Kubernetes API unavailable ({reason}); events keep the pod "
                                "UID only until it answers")
            except Exception as exc:  # never let the directory die silently: retry
                self._warn_once(f"unexpected error reading pods from the Kubernetes API "
                                f"({exc!r}); retrying")
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _list(self) -> str | None:
        body = self._get({"fieldSelector": self._selector()}, timeout=self.read_timeout)
        with body:
            doc = json.load(body)
        pods: dict[str, tuple[str, str]] = {}
        images: dict[str, dict[str, str]] = {}
        for item in doc.get("items") or ():
            entry = _pod_entry(item)
            if entry:
                pods[entry[0]] = entry[1]
                images[entry[0]] = _container_images(item)
        with self._lock:
            # Pods that vanished between two lists count as deleted (grace period applies).
            now = time.monotonic()
            for uid in self._pods.keys() - pods.keys():
                self._deleted.setdefault(uid, now)
                pods[uid] = self._pods[uid]
                images[uid] = self._pod_images.get(uid, {})
            self._pods = pods
            self._pod_images = images
            self._images = {cid: image for per_pod in images.values()
                            for cid, image in per_pod.items()}
            self._expire_deleted(now)
        if self._warned:
            log.info("Kubernetes API reachable again: %d pods on node %s", len(pods),
                     self.node_name)
            self._warned = False
        self._synced.set()
        return (doc.get("metadata") or {}).get("resourceVersion")

    def _watch(self, version: str) -> str | None:
        """Apply watch events until the server ends the stream; return the version to resume
        from, or None when a full relist is needed (the version expired)."""
        params = {
            "fieldSelector": self._selector(), "watch": "1", "resourceVersion": version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(self.watch_timeout),
        }
        try:
            body = self._get(params, timeout=self.read_timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 410:
                return None
            raise
        self._resume = version
        with body:
            try:
                return self._apply_events(body)
            except TimeoutError:
                # A quiet node: nothing changed within the read timeout. Not an error.
                return self._resume

    def _apply_events(self, body: urllib.response.addinfourl) -> str | None:
        for event in _json_lines(body):
            if self._stop.is_set():
                return None
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                # 410 Gone inside the stream: our version is too old, relist.
                return None
            meta = obj.get("metadata") or {}
            self._resume = meta.get("resourceVersion") or self._resume
            if kind == "BOOKMARK":
                continue
            entry = _pod_entry(obj)
            if entry is None:
                continue
            uid, value = entry
            images = _container_images(obj)
            with self._lock:
                self._pods[uid] = value
                # A DELETED pod's last status may have lost its containers: keep what we had.
                if images or kind != "DELETED":
                    self._set_images(uid, images)
                if kind == "DELETED":
                    self._deleted[uid] = time.monotonic()
                else:
                    self._deleted.pop(uid, None)
                self._expire_deleted(time.monotonic())
        return self._resume

    # -- helpers ------------------------------------------------------------------------

    def _selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    def _get(self, params: dict[str, str], timeout: float) -> urllib.response.addinfourl:
        url = f"{self.api_base}/api/v1/pods?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        token = self._token()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            response = urllib.request.urlopen(request, timeout=timeout, context=self._tls())
            self._response = response
            if self._stop.is_set():  # close() ran while we connected
                _shutdown(response)
            return response
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise PermissionError(f"HTTP {exc.code} listing pods") from None
            raise

    def _token(self) -> str | None:
        # Read on every request: projected service-account tokens are rotated on disk.
        try:
            return self.token_path.read_text().strip() or None
        except OSError:
            return None

    def _tls(self) -> ssl.SSLContext | None:
        if not self.api_base or not self.api_base.startswith("https:"):
            return None
        if self.ca_path.is_file():
            return ssl.create_default_context(cafile=str(self.ca_path))
        return ssl.create_default_context()

    def _set_images(self, uid: str, images: dict[str, str]) -> None:
        """Replace one pod's container images (lock held). Restarted containers get new ids,
        the old ones stay until the pod goes: late events of an exiting container resolve."""
        old = self._pod_images.get(uid, {})
        merged = {**old, **images} if len(old) + len(images) <= 64 else images
        for cid in old.keys() - merged.keys():
            self._images.pop(cid, None)
        self._pod_images[uid] = merged
        self._images.update(merged)

    def _expire_deleted(self, now: float) -> None:
        for uid, when in list(self._deleted.items()):
            if now - when > DELETED_GRACE_SECONDS:
                del self._deleted[uid]
                self._pods.pop(uid, None)
                for cid in self._pod_images.pop(uid, {}):
                    self._images.pop(cid, None)

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        self._warn_once(f"Kubernetes pod names unavailable: {reason}; events keep the pod "
                        "UID only")

    def _warn_once(self, message: str) -> None:
        # A closing directory's last request fails by design (the agent is shutting down).
        if not self._warned and not self._stop.is_set():
            log.warning(message)
            self._warned = True


def _pod_entry(obj: dict) -> tuple[str, tuple[str, str]] | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    uid, name, namespace = meta.get("uid"), meta.get("name"), meta.get("namespace")
    if not (uid and name and namespace):
        return None
    return str(uid).lower(), (str(namespace), str(name))


def _shutdown(response: urllib.response.addinfourl) -> None:
    """Cut a response's connection from another thread: its reader sees the end of the stream
    (closing the file object instead would race with the reader's buffer)."""
    try:
        sock = response.fp.raw._sock  # type: ignore[attr-defined]
        sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass


def _container_images(obj: dict) -> dict[str, str]:
    """containerID -> image from a pod's (init, ephemeral) container statuses. The status
    carries the runtime's id as `containerd://<hex>` (or `cri-o://`, `docker://`); the
    cgroup path gives the bare hex."""
    status = obj.get("status") if isinstance(obj, dict) else None
    if not isinstance(status, dict):
        return {}
    out: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            if not isinstance(cs, dict):
                continue
            cid, image = cs.get("containerID"), cs.get("image")
            if cid and image and isinstance(cid, str) and isinstance(image, str):
                out[cid.rpartition("://")[2].lower()] = image
    return out


def _json_lines(body: urllib.response.addinfourl) -> Iterator[dict]:
    """The watch stream is one JSON object per line (chunked transfer)."""
    for raw in body:
        line = raw.strip()
        if line:
            yield json.loads(line)
