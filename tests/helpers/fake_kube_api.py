"""A tiny stand-in for the Kubernetes API server's pod list/watch, run as its own process
by tests/test_kubernetes.py.

    python fake_kube_api.py PORT_FILE [--cert CERT --key KEY] [--token TOKEN] [--deny]
                            [--anonymous] [--pod UID,NAME,NAMESPACE,NODE[,CONTAINERID=IMAGE]...]

Serves GET /api/v1/pods (list, and watch=1 as a JSON-lines stream), honouring only the
spec.nodeName field selector. POST /control/{add,delete} with {"uid","name","namespace",
"node"} (and optionally "containers": {"containerd://<id>": image}) changes the pod set and
feeds open watches. With --deny every API call is 403; with --anonymous requests need no
token (as behind `kubectl proxy`).

What a real API server also does, on request: POST /control/expire {"mode": "error" |
"gone", "add": {pod}} compacts the history (the pod, if any, is added without a watch
event, so only a relist can see it): open watches get an `ERROR` event (410 Expired) and
end ("error"), or just end ("gone"); a later watch from an older resourceVersion is answered
410 Gone. POST /control/bookmark {"version": N} advances the version without events (other
nodes' changes) and sends open watches that asked for bookmarks a `BOOKMARK` at it.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"version": 1, "pods": {}, "events": [], "compacted": 0, "epoch": 0,
         "error": False, "bookmark": 0}
LOCK = threading.Condition()
SEEN_QUERIES: list[dict] = []


def pod(uid: str, name: str, namespace: str, node: str, version: int,
        containers: dict[str, str] | None = None) -> dict:
    obj = {"metadata": {"uid": uid, "name": name, "namespace": namespace,
                        "resourceVersion": str(version)}, "spec": {"nodeName": node}}
    if containers:
        obj["status"] = {"containerStatuses": [
            {"name": f"c{i}", "containerID": cid, "image": image, "ready": True}
            for i, (cid, image) in enumerate(containers.items())]}
    return obj


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token = "test-token"
    deny = False
    anonymous = False

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        op = self.path.rsplit("/", 1)[-1]
        if op in ("expire", "bookmark"):
            return self._control(op, doc)
        with LOCK:
            STATE["version"] += 1
            obj = pod(doc["uid"], doc["name"], doc["namespace"], doc["node"], STATE["version"],
                      doc.get("containers"))
            if op == "add":
                STATE["pods"][doc["uid"]] = obj
                STATE["events"].append(("ADDED", obj))
            else:
                STATE["pods"].pop(doc["uid"], None)
                STATE["events"].append(("DELETED", obj))
            LOCK.notify_all()
        self._json(200, {"ok": True})

    def _control(self, op: str, doc: dict) -> None:
        with LOCK:
            STATE["version"] += 1
            if op == "expire":
                add = doc.get("add")
                if add:
                    STATE["pods"][add["uid"]] = pod(add["uid"], add["name"], add["namespace"],
                                                    add["node"], STATE["version"])
                STATE["compacted"] = STATE["version"]
                STATE["error"] = doc.get("mode", "error") == "error"
                STATE["epoch"] += 1  # ends every open watch
            else:
                STATE["version"] = max(STATE["version"], int(doc.get("version") or 0))
                STATE["bookmark"] = STATE["version"]
            LOCK.notify_all()
        self._json(200, {"ok": True, "version": STATE["version"]})

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/control/queries":
            return self._json(200, SEEN_QUERIES)
        SEEN_QUERIES.append(query)
        authorized = self.anonymous or self.headers.get("Authorization") == f"Bearer {self.token}"
        if self.deny or not authorized:
            return self._json(403, {"kind": "Status", "code": 403, "reason": "Forbidden"})
        if url.path != "/api/v1/pods":
            return self._json(404, {"kind": "Status", "code": 404})
        node = query.get("fieldSelector", "").removeprefix("spec.nodeName=")
        if query.get("watch") in ("1", "true"):
            since = int(query.get("resourceVersion") or 0)
            if since < STATE["compacted"]:
                return self._json(410, {"kind": "Status", "code": 410, "reason": "Gone"})
            return self._watch(node, since, float(query.get("timeoutSeconds") or 30),
                               query.get("allowWatchBookmarks") == "true")
        with LOCK:
            items = [p for p in STATE["pods"].values() if p["spec"]["nodeName"] == node]
            version = STATE["version"]
        self._json(200, {"kind": "PodList", "metadata": {"resourceVersion": str(version)},
                         "items": items})

    def _send(self, event: dict) -> None:
        line = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _watch(self, node: str, since: int, timeout: float, bookmarks: bool = False) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + min(timeout, 5)
        sent = 0
        epoch, bookmark = STATE["epoch"], STATE["bookmark"]
        while time.monotonic() < deadline:
            with LOCK:
                if STATE["epoch"] != epoch:
                    if STATE["error"]:
                        self._send({"type": "ERROR", "object": {
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "code": 410, "reason": "Expired",
                            "message": "too old resource version"}})
                    break
                if bookmarks and STATE["bookmark"] != bookmark:
                    bookmark = STATE["bookmark"]
                    self._send({"type": "BOOKMARK", "object": {
                        "kind": "Pod", "metadata": {"resourceVersion": str(bookmark)}}})
                pending = [(k, o) for k, o in STATE["events"]
                           if int(o["metadata"]["resourceVersion"]) > since][sent:]
                if not pending:
                    LOCK.wait(0.1)
                    continue
            for kind, obj in pending:
                sent += 1
                if obj["spec"]["nodeName"] != node:
                    continue
                self._send({"type": kind, "object": obj})
        self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port_file")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--token", default="test-token")
    ap.add_argument("--deny", action="store_true")
    ap.add_argument("--anonymous", action="store_true")
    ap.add_argument("--pod", action="append", default=[],
                    help="uid,name,namespace,node[,containerid=image...] present before the "
                    "first list")
    args = ap.parse_args()
    Handler.token, Handler.deny, Handler.anonymous = args.token, args.deny, args.anonymous
    for spec in args.pod:
        uid, name, namespace, node, *containers = spec.split(",")
        images = dict(c.split("=", 1) for c in containers)
        STATE["pods"][uid] = pod(uid, name, namespace, node, 1, images)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    with open(args.port_file + ".tmp", "w") as fh:
        fh.write(str(server.server_address[1]))
    # Rename so the test never reads a half-written port number.
    os.replace(args.port_file + ".tmp", args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
