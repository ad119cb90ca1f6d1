"""Reading a running process's HTTP endpoints from outside, as Prometheus and a kubelet do:
one GET on loopback, and the sum of a metric's samples in the text exposition format."""

from __future__ import annotations

import urllib.error
import urllib.request


def get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of `GET http://127.0.0.1:PORT/PATH`; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` in `text` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, lab = head.partition("{")
        if sample == name and all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
    return total
