"""A process holding `tracer.enforcer.KernelEnforcer` linked to a test's cgroup, armed with
default deny and one allowed executable: prints "ready", then each denial record as a JSON
line. The test SIGKILLs it to check that nothing stays attached (fail open).

    python tests/helpers/enforcer_child.py CGROUP ALLOWED_EXECUTABLE [--scope DIR]
                                           [--deny-cgroup DIR]

--scope: only the processes of cgroup DIR may be denied. --deny-cgroup: default allow, and
the processes of cgroup DIR are denied by "rule 7" (a namespace deny rule's entry).
"""

from __future__ import annotations

import json
import os
import sys

from scoring.endpoints import EndpointCatalog
from tracer.enforcer import ANY_UID, KernelEnforcer, KernelRules, kernel_file_id


def main() -> None:
    cgroup, allowed = sys.argv[1], os.path.realpath(sys.argv[2])
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2], strict=True))
    dev, ino = kernel_file_id(allowed) or (0, 0)
    rules = KernelRules(allow_exe={(dev, ino, ANY_UID)},
                        default_deny="--deny-cgroup" not in opts)

    def denied(rec) -> None:  # noqa: ANN001 - tracer.enforcer.DeniedConnect
        print(json.dumps({"tgid": rec.tgid, "uid": rec.uid, "comm": rec.comm.decode(),
                          "exe_name": rec.exe_name.decode(), "dport": rec.dport,
                          "daddr": list(rec.daddr[:4]), "rule": rec.rule,
                          "ino": rec.ino, "dev": rec.dev}), flush=True)

    e = KernelEnforcer(EndpointCatalog.from_config(), cgroup)
    e.start(rules, denied)
    if "--scope" in opts:
        e.set_scope({os.stat(opts["--scope"]).st_ino})
    if "--deny-cgroup" in opts:
        e.set_cgroup_denials({os.stat(opts["--deny-cgroup"]).st_ino: 7})
    e.arm(True)
    print("ready", flush=True)
    while True:
        e.poll(100)


if __name__ == "__main__":
    main()
