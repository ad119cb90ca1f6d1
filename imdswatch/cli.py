"""The `imdswatch` command line. Exit status 2 means unusable arguments, an unreadable
file or a missing privilege; the message on stderr says which and what to do."""

from __future__ import annotations

import re
import sys

import click

from imdswatch import __version__
from imdswatch.cli_errors import config_or_exit, fail
from imdswatch.config import PROBES
from scoring.durations import parse_duration
from scoring.settings import AGENT_MAX_ENTITIES
from scoring.state import StateError


class DurationType(click.ParamType):
    name = "duration"

    def __init__(self, allow_infinite: bool = False) -> None:
        self.allow_infinite = allow_infinite

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value), self.allow_infinite)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()
WINDOW = DurationType(allow_infinite=True)


class SizeType(click.ParamType):
    """Bytes, with an optional KiB/MiB/GiB (or K/M/G) suffix."""

    name = "size"
    UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value).lower())
        if m is None:
            self.fail(f"{value!r} is not a size such as 4096, 64MiB or 1GiB", param, ctx)
        n = int(m.group(1)) * self.UNITS[m.group(2)]
        if n <= 0:
            self.fail("a size must be positive", param, ctx)
        return n


SIZE = SizeType()
ENFORCE_MODES = ("off", "audit", "deny")
OFF_FILE = "/run/imdswatch/enforce-off"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imdswatch")
def main() -> None:
    """Detect unusual processes calling the cloud instance metadata service."""


@main.command()
@click.argument("events", metavar="EVENTS")
@click.option("--output", "-o", default="-", show_default="standard output",
              help="Where to write alerts (NDJSON).")
@click.option("--threshold", type=click.FloatRange(0, 100), default=None,
              help="Anomaly score that makes an alert [default: 50, or the config's].")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Load the model from FILE before, save it after.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
@click.option("--learning-period", type=DURATION, default=None,
              help="No alert before this much event time, e.g. 30s, 15m, 24h, 3d.")
@click.option("--reorder-window", type=WINDOW, default="10m", show_default=True,
              help="How far out of time order input may be and still be scored in order "
                   "(use 'inf' to sort the whole input).")
def replay(events: str, output: str, threshold: float | None, state_path: str | None,
           config_path: str | None, learning_period: float | None,
           reorder_window: float) -> None:
    """Score recorded ECS events (NDJSON, plain or .gz, or - for stdin) in event time."""
    from imdswatch.replay_cli import run_replay

    cfg = config_or_exit(config_path)
    if threshold is not None:
        cfg.scorer.threshold = threshold
    if learning_period is not None:
        cfg.scorer.learning_period = learning_period
    sys.exit(run_replay(cfg, events, output, state_path, reorder_window))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Load at start; save periodically and on SIGTERM/SIGINT.")
@click.option("--probe", type=click.Choice(PROBES), default=None,
              help="Attach mode [default: auto, or the config's].")
@click.option("--metrics-address", default=None,
              help="HOST:PORT serving /metrics [default: 0.0.0.0:9464].")
@click.option("--output", "-o", default="-", show_default="standard output",
              help="Where to write alerts (NDJSON).")
@click.option("--learning-period", type=DURATION, default=None,
              help="No alert before this much time, e.g. 30s, 15m, 24h, 7d.")
@click.option("--threshold", type=click.FloatRange(0, 100), default=None,
              help="Anomaly score that makes an alert [default: 50].")
@click.option("--fleet", "fleet_url", metavar="URL",
              help="Send events to the fleet scorer (`imdswatch serve`) at URL, which alerts.")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False),
              help="With --fleet: directory keeping events until the fleet acknowledges them.")
@click.option("--spool-max-size", type=SIZE, default="256MiB", show_default=True,
              help="With --fleet: spool bound; past it the oldest events are dropped.")
@click.option("--fleet-token-file", type=click.Path(dir_okay=False),
              help="With --fleet: file holding the bearer token serve expects.")
@click.option("--fleet-ca", type=click.Path(dir_okay=False),
              help="With an https fleet URL: CA certificate that signed serve's certificate.")
@click.option("--fleet-model-interval", type=DURATION, default="5m", show_default=True,
              help="With --fleet: how often to fetch the fleet model.")
@click.option("--enforce", "enforce_mode", type=click.Choice(ENFORCE_MODES), default="off",
              show_default=True,
              help="Apply --policy: audit reports the calls it would deny, touching nothing; "
                   "deny refuses them in the kernel (in --enforce-cgroup).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="With --enforce: the policy file (imdswatch policy generate), or "
                   "`fleet`: the fleet scorer's (with --fleet).")
@click.option("--enforce-cgroup", type=click.Path(file_okay=False),
              help="With --enforce deny: the cgroup v2 directory whose processes are "
                   "enforced (never the root).")
@click.option("--enforce-off-file", default=OFF_FILE, show_default=True,
              help="With --enforce deny: while this file exists nothing is denied "
                   "(imdswatch enforce off creates it).")
@click.option("--enforce-max-callers", type=click.IntRange(1), default=20, show_default=True,
              help="With --enforce deny: more distinct callers denied within a minute "
                   "disarm the node back to audit.")
@click.option("--enforce-scope", metavar="all|hosts|pods|namespaces=NS[,NS...]", default=None,
              help="With --enforce deny: only these callers can be denied, the others are "
                   "audited [default: all, or the config's agent.enforce_scope].")
def run(config_path: str | None, state_path: str | None, probe: str | None,
        metrics_address: str | None, output: str, learning_period: float | None,
        threshold: float | None, fleet_url: str | None, spool_dir: str | None,
        spool_max_size: int, fleet_token_file: str | None, fleet_ca: str | None,
        fleet_model_interval: float, enforce_mode: str, policy_path: str | None,
        enforce_cgroup: str | None, enforce_off_file: str, enforce_max_callers: int,
        enforce_scope: str | None) -> None:
    """Trace metadata connections live with BPF and score them as they happen."""
    from imdswatch.agent import EnforceOptions, run_agent

    enforce = None
    if enforce_mode != "off":
        if not policy_path:
            fail(f"--enforce {enforce_mode} needs --policy FILE (imdswatch policy generate "
                 "writes one)")
        if policy_path == "fleet" and not fleet_url:
            fail("--policy fleet needs --fleet URL (the fleet scorer publishes the policy)")
        if enforce_mode == "deny" and not enforce_cgroup:
            fail("--enforce deny needs --enforce-cgroup DIR: the cgroup whose processes "
                 "are enforced (e.g. /sys/fs/cgroup/kubepods.slice), never the root")
        if enforce_cgroup:
            from tracer.enforcer import EnforceError, check_cgroup

            try:
                check_cgroup(enforce_cgroup)
            except EnforceError as exc:
                fail(str(exc))
        enforce = EnforceOptions(enforce_mode, policy_path, enforce_cgroup, enforce_off_file,
                                 enforce_max_callers)
    elif policy_path:
        fail("--policy goes with --enforce audit (report only) or --enforce deny")
    scope = None
    if enforce_scope is not None:
        if enforce is None:
            fail("--enforce-scope goes with --enforce deny (or audit, where it changes nothing)")
        from tracer.enforce_scope import ScopeError, parse_scope

        try:
            scope = parse_scope(enforce_scope)
        except ScopeError as exc:
            fail(f"--enforce-scope: {exc}")

    fleet = None
    if fleet_url:
        from fleet.sink import FleetOptions

        if not spool_dir:
            fail("--fleet needs --spool DIR (events wait there until the fleet scorer has them)")
        fleet = FleetOptions(fleet_url, spool_dir, fleet_token_file, fleet_ca, spool_max_size,
                             fleet_model_interval)
    elif spool_dir or fleet_token_file or fleet_ca:
        fail("--spool, --fleet-token-file and --fleet-ca go with --fleet URL")
    cfg = config_or_exit(config_path)
    if threshold is not None:
        cfg.scorer.threshold = threshold
    if "max_entities" not in cfg.scoring_keys:
        cfg.scorer.max_entities = AGENT_MAX_ENTITIES
    if enforce is not None:
        enforce.scope = scope or cfg.agent.enforce_scope
    sys.exit(run_agent(cfg, state_path=state_path, probe=probe, metrics_address=metrics_address,
                       output=output, learning_period=learning_period, fleet=fleet,
                       enforce=enforce))


@main.command()
@click.option("--listen", default="0.0.0.0:9465", show_default=True,
              help="HOST:PORT of the ingest API (POST /v1/events, GET /v1/model).")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False),
              help="The fleet model, loaded at start and saved periodically and on SIGTERM; "
                   "its write-ahead log lives beside it (FILE.wal/).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
@click.option("--metrics-address", default=None,
              help="HOST:PORT serving /metrics, /healthz, /readyz [default: 0.0.0.0:9464].")
@click.option("--output", "-o", default="-", show_default="standard output",
              help="Where to write alerts (NDJSON).")
@click.option("--threshold", type=click.FloatRange(0, 100), default=None,
              help="Anomaly score that makes an alert [default: 50].")
@click.option("--learning-period", type=DURATION, default=None,
              help="No alert before this much event time, e.g. 30s, 15m, 24h, 7d.")
@click.option("--reorder-window", type=DURATION, default="10m", show_default=True,
              help="How far out of event-time order agents' events may arrive and still be "
                   "scored in order.")
@click.option("--reorder-hold", type=DURATION, default="0.5s", show_default=True,
              help="Longest wall-clock wait of an event in the reorder buffer (bounds alert "
                   "latency for live events).")
@click.option("--token-file", type=click.Path(dir_okay=False),
              help="Require 'Authorization: Bearer <token in FILE>' on every API request.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve HTTPS: certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Serve HTTPS: private key.")
@click.option("--save-interval", type=DURATION, default="60s", show_default=True,
              help="How often the state is saved and the write-ahead log truncated.")
@click.option("--max-body", type=SIZE, default="16MiB", show_default=True,
              help="Largest request body, compressed or not (413 beyond).")
@click.option("--queue-events", type=click.IntRange(1), default=50_000, show_default=True,
              help="Acknowledged events waiting for the scorer; past it ingest answers 503.")
@click.option("--max-connections", type=click.IntRange(1), default=256, show_default=True,
              help="Concurrent ingest connections.")
@click.option("--bus", "bus", metavar="nats://HOST:PORT[,...]",
              help="Keep the log, checkpoints and the choice of the scoring replica in NATS "
                   "JetStream, so several replicas share one fleet (docs/fleet-bus.md).")
@click.option("--bus-creds", type=click.Path(dir_okay=False),
              help="With --bus: file holding the NATS credentials (.creds, nkey seed, "
                   "USER:PASSWORD or token).")
@click.option("--bus-ca", type=click.Path(dir_okay=False),
              help="With --bus: CA certificate that signed the NATS servers' certificates.")
@click.option("--bus-stream", default="IMDSWATCH", show_default=True,
              help="With --bus: name of the stream (and prefix of the ledger and buckets).")
@click.option("--bus-replicas", type=click.IntRange(1, 5), default=1, show_default=True,
              help="With --bus: copies of each stream and bucket, when serve creates them.")
@click.option("--replica-id", default=None,
              help="With --bus: this replica's name [default: the host name].")
@click.option("--bus-lease-ttl", type=DURATION, default="4s", show_default=True,
              help="With --bus: time to live of the scoring lease, when serve creates its "
                   "bucket (a replica taking over waits about this long after a crash).")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="Publish this policy file at GET /v1/policy for agents run with "
                   "--policy fleet (re-read when it changes).")
def serve(listen: str, state_path: str, config_path: str | None, metrics_address: str | None,
          output: str, threshold: float | None, learning_period: float | None,
          reorder_window: float, reorder_hold: float, token_file: str | None,
          tls_cert: str | None, tls_key: str | None, save_interval: float, max_body: int,
          queue_events: int, max_connections: int, bus: str | None, bus_creds: str | None,
          bus_ca: str | None, bus_stream: str, bus_replicas: int, replica_id: str | None,
          bus_lease_ttl: float, policy_path: str | None) -> None:
    """The fleet scorer: one model for every agent's events (contract sections 5 and 8)."""
    from imdswatch.serve import ServeOptions, run_serve

    cfg = config_or_exit(config_path)
    if threshold is not None:
        cfg.scorer.threshold = threshold
    if learning_period is not None:
        cfg.scorer.learning_period = learning_period
    opts = ServeOptions(
        state=state_path, listen=listen, metrics_address=metrics_address, output=output,
        reorder_window=reorder_window, reorder_hold=reorder_hold, token_file=token_file,
        tls_cert=tls_cert, tls_key=tls_key, save_interval=save_interval, body_limit=max_body,
        queue_events=queue_events, max_connections=max_connections,
        bus=bus, bus_creds=bus_creds, bus_ca=bus_ca, bus_stream=bus_stream,
        bus_replicas=bus_replicas, replica_id=replica_id, bus_lease_ttl=bus_lease_ttl,
        policy=policy_path,
    )
    if not bus and (bus_creds or bus_ca or replica_id):
        fail("--bus-creds, --bus-ca and --replica-id go with --bus nats://HOST:PORT")
    if bus_lease_ttl < 1.0:
        fail("--bus-lease-ttl: at least 1s (renewals must reach the bus in time)")
    sys.exit(run_serve(cfg, opts))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config: the checks use its agent.cgroup_root, as the agent would.")
def doctor(config_path: str | None) -> None:
    """Check this machine for live tracing and say how to fix what is missing."""
    from imdswatch.libout import capture_fd2
    from tracer.doctor import run_doctor

    cfg = config_or_exit(config_path)
    # The checks load probes: BCC's own fd-2 lines are summarised, not interleaved.
    with capture_fd2() as library_lines:
        status = run_doctor(cfg.agent.cgroup_root)
    line = library_lines.summary("these checks")
    if line:
        click.echo(f"note: {line}")
    sys.exit(status)


@main.command()
@click.option("--keep", is_flag=True,
              help="Keep the agent running after the simulations, until Ctrl-C.")
def demo(keep: bool) -> None:
    """See the agent catch credential theft, in a private network namespace (root)."""
    from imdswatch.demo import run_demo

    sys.exit(run_demo(keep=keep))


@main.command()
@click.option("--target", type=click.Choice(["sandbox", "metadata"]), default="sandbox",
              show_default=True,
              help="sandbox: a private namespace with a mock service (root). metadata: the "
                   "REAL metadata service of this machine, harmless requests only (instance "
                   "id, never credentials); must be given explicitly.")
@click.option("--only", multiple=True, metavar="KEY",
              help="Run only these simulations (repeatable); see --list.")
@click.option("--list", "list_only", is_flag=True, help="List the simulations and exit.")
def simulate(target: str, only: tuple[str, ...], list_only: bool) -> None:
    """Run the attack simulations, to check that a running agent alerts on them."""
    from imdswatch.simulate import run_simulate

    sys.exit(run_simulate(target, only, list_only,
                          explicit=_given_on_command_line("--target")))


def _given_on_command_line(option: str) -> bool:
    # `--target metadata` must be typed, never defaulted: click cannot tell a value from an
    # environment variable or a default map apart from a typed one, argv can.
    return any(a == option or a.startswith(option + "=") for a in sys.argv[1:])


@main.group()
def state() -> None:
    """Inspect and merge saved model states."""


@state.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the merged state.")
@click.option("--half-life", type=DURATION, default=None,
              help="Decay used to align the states' clocks [default: the config's, 14d].")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
def state_merge(inputs: tuple[str, ...], output: str, half_life: float | None,
                config_path: str | None) -> None:
    """Merge states from several nodes so a new node starts with the fleet's baseline."""
    from scoring.state import merge_state_files

    hl = half_life if half_life is not None else config_or_exit(config_path).scorer.half_life
    try:
        merged = merge_state_files(list(inputs), output, hl)
    except StateError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{output}: cannot write ({exc.strerror})")
    n = sum(len(values) for contexts in merged["detectors"].values()
            for _, _, values in contexts)
    click.echo(
        f"merged {len(inputs)} states: {n} entities from {len(merged['hosts'])} hosts "
        f"-> {output}", err=True,
    )


@state.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
def state_show(path: str, config_path: str | None) -> None:
    """Summarise a saved state: history, hosts, entities per detector."""
    from imdswatch.replay import ReplayStats, summary
    from scoring.scorer import Scorer
    from scoring.state import load_state

    cfg = config_or_exit(config_path)
    scorer = Scorer(cfg.scorer, cfg.catalog)
    try:
        load_state(path, scorer)
    except StateError as exc:
        fail(str(exc))
    st = ReplayStats(first_ts=scorer.first_ts, last_ts=scorer.last_ts,
                     scored=scorer.events_learned)
    text = summary(st, scorer, 0.0).splitlines()
    click.echo("\n".join([f"state {path}:", *text[1:2], *text[-2:]]))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
def endpoints(config_path: str | None) -> None:
    """List the metadata endpoints watched (built-in catalog plus the config's changes)."""
    cfg = config_or_exit(config_path)
    for e in cfg.catalog:
        ports = ",".join(str(p) for p in sorted(e.ports)) or "any"
        click.echo(f"{e.id:26} {e.address:22} ports {ports:10} {e.provider}")


@main.group()
def enforce() -> None:
    """Break glass: turn denial off (or back on) on this node."""


@enforce.command("off")
@click.option("--enforce-off-file", "off_file", default=OFF_FILE, show_default=True,
              help="The file the agent's --enforce-off-file names.")
def enforce_off(off_file: str) -> None:
    """Nothing is denied on this node from within a second, until `imdswatch enforce on`."""
    import os

    try:
        os.makedirs(os.path.dirname(off_file) or ".", exist_ok=True)
        with open(off_file, "a", encoding="utf-8") as f:
            f.write("enforcement off (imdswatch enforce off)\n")
    except OSError as exc:
        fail(f"{off_file}: cannot create ({exc.strerror}): run as root")
    click.echo(f"enforcement off: {off_file} exists; the agent denies nothing within a second "
               "(imdswatch enforce on to resume)")


@enforce.command("on")
@click.option("--enforce-off-file", "off_file", default=OFF_FILE, show_default=True,
              help="The file the agent's --enforce-off-file names.")
def enforce_on(off_file: str) -> None:
    """Remove the break-glass file: the agent arms again (unless disarmed for another reason)."""
    import os

    try:
        os.unlink(off_file)
    except FileNotFoundError:
        pass
    except OSError as exc:
        fail(f"{off_file}: cannot remove ({exc.strerror}): run as root")
    click.echo(f"enforcement on: {off_file} removed")


def _register() -> None:
    from imdswatch.policy_cli import policy

    main.add_command(policy)


_register()

if __name__ == "__main__":
    main()
