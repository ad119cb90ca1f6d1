"""A bounded connect() loop for flood tests and benchmarks; run it INSIDE a test namespace.

python3 flood_client.py HOST PORT COUNT MAX_SECONDS [COMM]
Prints the number of connect() calls made and the seconds the loop took. The connects are
refused when nothing listens, which is the fastest loop the kernel allows, and each one
still passes CLOSE -> SYN_SENT.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import time


def main() -> None:
    host, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if len(sys.argv) > 5:  # a distinctive comm, so kernel counts can be told apart
        ctypes.CDLL(None).prctl(15, sys.argv[5].encode()[:15], 0, 0, 0)  # PR_SET_NAME
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    start = time.monotonic()
    deadline = start + limit
    made = 0
    # Abortive close (RST): accepted connections leave no TIME_WAIT behind, so a long
    # benchmark neither runs out of ephemeral ports nor slows down as they pile up.
    linger = struct.pack("ii", 1, 0)
    while made < count and time.monotonic() < deadline:
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
