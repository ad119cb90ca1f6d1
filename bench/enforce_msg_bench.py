"""What per-request enforcement costs per message (bpf/enforce_requests.h), in a cgroup made
for it (holding only the senders, removed afterwards), on loopback only: the catalog given
to the enforcer has one endpoint, 127.0.0.2 on a port of the bench's own, so no packet goes
to a metadata address.

- Other traffic: a process in the enforced cgroup sends N request-sized messages on a
  connection to anything else; the runs of our sk_msg program over them (it is never
  attached to such a socket: 0) and of our sock_ops program (its few connection-setup
  callbacks, none per message).
- A restricted socket (a caller allowed plain metadata only connecting to the bench
  endpoint): the sk_msg program's run time per request it lets through, beside an empty
  sk_msg program on a socket of the bench's own sending the same messages in the same run
  (the accounting floor).
`message_rows(quick)` returns bench.rows.Row items.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import subprocess
import sys
import threading
from ipaddress import ip_network
from pathlib import Path

from bench.enforce_bench import prog_runs, remove_cgroup
from bench.rows import Row

REQUEST = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"User-Agent: bench\r\nAccept: */*\r\n\r\n")

_SENDER = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = bytes.fromhex(sys.argv[4])
s = socket.create_connection((host, port))
for _ in range(n):
    s.sendall(req)
s.close()
"""

_EMPTY_MSG = """
BPF_SOCKMAP(bench_socks, 1);
int empty_msg(struct sk_msg_md *msg) { return 1; }
"""


def _listener(host: str) -> socket.socket:
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(64)

    def drain(c: socket.socket) -> None:
        with c:
            while c.recv(65536):
                pass

    def accept() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv


def message_rows(quick: bool) -> list[Row]:
    import bcc
    from bcc.libbcc import lib

    from policy.kernel_rules import request_patterns
    from policy.request_patterns import class_bit
    from scoring.endpoints import METADATA, Endpoint, EndpointCatalog
    from tracer import cgroup_attach
    from tracer.enforcer import SK_MSG_VERDICT, KernelEnforcer, KernelRules

    n = 20000 if quick else 200000
    cg = Path(cgroup_attach.cgroup2_root()) / f"imdsw-bench-reqs-{secrets.token_hex(4)}"
    cg.mkdir()
    other = _listener("127.0.0.1")
    bench_ep = _listener("127.0.0.2")
    port = bench_ep.getsockname()[1]
    catalog = EndpointCatalog([Endpoint("bench-loopback", "custom",
                                        ip_network("127.0.0.2/32"), frozenset({port}))])
    uid = os.getuid()
    rules = KernelRules(allow_uid={uid}, default_deny=True, classes={uid: class_bit(METADATA)})
    knob = Path("/proc/sys/kernel/bpf_stats_enabled")
    knob_before = knob.read_text().strip()
    enf = KernelEnforcer(catalog, str(cg))
    empty = bcc.BPF(text=_EMPTY_MSG.encode(), cflags=["-Wno-ignored-attributes"])
    floor_sock = None
    rows: list[Row] = []

    def send(host: str, p: int) -> None:
        def enter() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

        subprocess.run([sys.executable, "-c", _SENDER, host, str(p), str(n), REQUEST.hex()],
                       check=True, timeout=600, preexec_fn=enter)

    try:
        enf.start(rules, lambda rec: None, request_patterns())
        if enf.requests_unavailable is not None:
            raise RuntimeError(enf.requests_unavailable)
        enf.arm(True)
        msg_fd = enf.bpf.funcs[b"imdsw_reqmsg"].fd
        ops_fd = enf.bpf.funcs[b"imdsw_sockops"].fd
        fn = empty.load_func(b"empty_msg", bcc.BPF.SK_MSG)
        map_fd = lib.bpf_table_fd(empty.module, b"bench_socks")
        bcc.BPF.attach_func(fn, map_fd, SK_MSG_VERDICT)
        floor_sock = socket.create_connection(other.getsockname())
        key, value = ctypes.c_uint32(0), ctypes.c_uint32(floor_sock.fileno())
        libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
        if libbpf.bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), 0) != 0:
            raise RuntimeError("cannot put the floor socket in its map: "
                               + os.strerror(ctypes.get_errno()))
        knob.write_text("1")
        m0, o0 = prog_runs(msg_fd), prog_runs(ops_fd)
        send("127.0.0.1", other.getsockname()[1])
        m1, o1 = prog_runs(msg_fd), prog_runs(ops_fd)
        rows.append(Row(f"requests: our sk_msg runs over {n:,} messages of other traffic in "
                        "the cgroup", m1[0] - m0[0], "", "", None, "0", m1[0] == m0[0]))
        rows.append(Row(f"requests: our sock_ops runs over those {n:,} messages (their "
                        "connection's set-up only)", o1[0] - o0[0], "", "", None, "report",
                        None))
        stats0 = enf.stats()
        send("127.0.0.2", port)
        e0 = prog_runs(fn.fd)
        for _ in range(n):
            floor_sock.sendall(REQUEST)
        e1 = prog_runs(fn.fd)
        m2 = prog_runs(msg_fd)
        knob.write_text("0")
        stats1 = enf.stats()
        judged = stats1["requests_judged"] - stats0["requests_judged"]
        denied = stats1["requests_denied"] - stats0["requests_denied"]
        if m2[0] > m1[0] and e1[0] > e0[0] and denied == 0:
            mine = (m2[1] - m1[1]) / (m2[0] - m1[0])
            floor = (e1[1] - e0[1]) / (e1[0] - e0[0])
            rows.append(Row(f"requests: sk_msg time per request on a restricted socket "
                            f"({m2[0] - m1[0]:,} runs, {judged:,} judged, all let through)",
                            round(mine, 1), "ns", "empty sk_msg program, same messages and "
                            "run", round(floor, 1), "report", None))
            rows.append(Row("requests: sk_msg cost per request on a restricted socket "
                            "(ours - empty)", round(mine - floor, 1), "ns", "", None,
                            "report (metadata sockets only)", None))
        else:
            rows.append(Row("requests: sk_msg time per request on a restricted socket",
                            None, "ns", f"not measured: runs {m2[0] - m1[0]}, floor runs "
                            f"{e1[0] - e0[0]}, denied {denied}", None, "report", None))
    finally:
        knob.write_text(knob_before)
        if floor_sock is not None:
            floor_sock.close()
        enf.close()
        empty.cleanup()
        other.close()
        bench_ep.close()
        remove_cgroup(cg)
    return rows
