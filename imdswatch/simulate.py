"""`imdswatch simulate`: the demo's attack simulations alone, to validate a deployment.

Run it on a node (or as a Kubernetes Job, deploy/kubernetes/simulate-job.yaml) where an
agent runs: each simulation should appear as an alert in that agent's output within seconds.

- `--target sandbox` (the default): a private network namespace with a mock metadata
  service, as in the demo; the requests ask for the role's credentials and get fake ones.
  Needs root (network namespaces). The node's agent sees these connects like any other,
  since its probe watches every network namespace.
- `--target metadata`: the machine's REAL metadata service, with harmless requests only
  (the instance id; the AWS ECS endpoint's task metadata), never credentials. Refused unless
  `--target metadata` is on the command line itself. Never used by the tests.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lab import attacks
from lab.sandbox import Sandbox, SandboxError


def _out(text: str) -> None:
    print(text, flush=True)


def run_simulate(target: str, only: tuple[str, ...] = (), list_only: bool = False,
                 explicit: bool = False) -> int:
    chosen = [s for s in attacks.SIMULATIONS if not only or s.key in only]
    unknown = set(only) - {s.key for s in attacks.SIMULATIONS}
    if unknown:
        print(f"imdswatch simulate: unknown simulation {', '.join(sorted(unknown))} "
              f"(see --list)", file=sys.stderr)
        return 2
    if list_only:
        for s in attacks.SIMULATIONS:
            _out(f"{s.key:15} {s.title} [{s.process} -> {s.address}]")
        return 0
    if target == "metadata" and not explicit:
        print("imdswatch simulate: --target metadata must be given on the command line",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="imdswatch-simulate-") as tmp:
        workdir = Path(tmp)
        if target == "metadata":
            _out("imdswatch simulate: harmless requests (instance id, never credentials) to "
                 "this machine's REAL metadata service")
            return _run_all(chosen, attacks.METADATA, workdir, lambda argv: argv)
        try:
            with Sandbox(prefix="imdsw-sim") as sandbox:
                _out(f"imdswatch simulate: in network namespace {sandbox.name} with a mock "
                     "metadata service; a real one is never contacted")
                return _run_all(chosen, attacks.SANDBOX, workdir, sandbox.argv)
        except SandboxError as exc:
            print(f"imdswatch simulate: {exc} (the sandbox needs root; or use "
                  "--target metadata)", file=sys.stderr)
            return 2


def _run_all(chosen: list[attacks.Simulation], target: attacks.Target, workdir: Path,
             wrap: object) -> int:
    ran = 0
    for sim in chosen:
        r = attacks.run(sim, target, workdir, wrap)  # type: ignore[arg-type]
        state = "skipped" if r.status is None and r.note.startswith("skipped") else "ran"
        ran += state == "ran"
        _out(f"  {state:8} {sim.key:15} {sim.title}: {sim.process} -> {sim.address} "
             f"({r.note}, {r.seconds:.1f}s)")
    _out(f"{ran} of {len(chosen)} simulations ran. Each should now be an alert of the "
         "node's agent (its --output, the pod's log on Kubernetes) naming the process above; "
         "imdswatch_anomalies_total counts them.")
    return 0 if ran else 1
