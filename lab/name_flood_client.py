"""A bounded name flood for the agent flood test and benchmark; run it INSIDE a test namespace.

python3 name_flood_client.py HOST PORT COUNT MAX_SECONDS PREFIX [RATE]

Before each connect() the process renames itself (prctl PR_SET_NAME on the main thread, the
thread-group leader, so the kernel's comm of the process changes): COUNT connects under
COUNT distinct names PREFIX<n>, each a new caller to the agent. Prints the number of
connect() calls made and the seconds the loop took. Connects to a port nobody listens on are
refused at once (the fastest loop the kernel allows); each still passes connect() and SYN.
RATE (connects per second, 0 = as fast as possible) paces the flood, so that the agent
reads every event instead of the ring buffer dropping most of them (the model's worst case).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time

PR_SET_NAME = 15
COMM_LEN = 15  # TASK_COMM_LEN - 1


def name(prefix: str, i: int) -> bytes:
    """PREFIX + i in base 36: distinct for every i as long as it fits the comm."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    s = ""
    while True:
        i, r = divmod(i, 36)
        s = digits[r] + s
        if i == 0:
            break
    out = (prefix + s).encode()
    if len(out) > COMM_LEN:
        raise SystemExit(f"prefix {prefix!r} too long for {s!r}: names would collide")
    return out


def main() -> None:
    host, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    prefix = sys.argv[5]
    rate = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    linger = struct.pack("ii", 1, 0)  # accepted connections leave no TIME_WAIT behind
    start = time.monotonic()
    deadline = start + limit
    made = 0
    while made < count and time.monotonic() < deadline:
        if rate > 0:
            ahead = made / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        if prctl(PR_SET_NAME, name(prefix, made), 0, 0, 0) != 0:
            raise SystemExit(f"prctl failed: errno {ctypes.get_errno()}")
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            s.connect((host, port))
        except OSError:
            pass
        finally:
            s.close()
        made += 1
    print(made, f"{time.monotonic() - start:.6f}", flush=True)


if __name__ == "__main__":
    main()
