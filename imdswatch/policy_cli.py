"""`imdswatch policy generate` and `imdswatch policy plan` (contract section 7)."""

from __future__ import annotations

import sys
from collections import Counter

import click

from imdswatch.cli_errors import config_or_exit, fail
from imdswatch.config import Config
from policy.learn import LearnOptions, learn_policy
from policy.plan import Plan, plan_events, plan_state, render
from policy.toml_file import PolicyError, dump_policy, load_policy, write_policy
from scoring.scorer import Scorer
from scoring.state import StateError, load_state, load_state_dict

MAX_REPORTED = 20  # malformed lines named on stderr; the rest are counted


def _scorer_from_state(cfg: Config, path: str) -> Scorer:
    scorer = Scorer(cfg.scorer, cfg.catalog)
    try:
        load_state(path, scorer)
    except StateError as exc:
        fail(str(exc))
    return scorer


def _scorer_from_fleet(cfg: Config, url: str, token_file: str | None,
                       ca: str | None) -> Scorer:
    from fleet.client import FleetClient, FleetRejected, FleetUnavailable
    from fleet.token_file import read_token

    try:
        token = read_token(token_file, "--fleet-token-file") if token_file else None
        client = FleetClient(url, token, ca)
    except ValueError as exc:
        fail(str(exc))
    try:
        _, state = client.fetch_model()
    except (FleetUnavailable, FleetRejected, OSError) as exc:
        fail(f"fleet model from {url}: {exc}")
    finally:
        client.close()
    scorer = Scorer(cfg.scorer, cfg.catalog)
    try:
        load_state_dict(scorer, state, f"fleet model from {url}")
    except StateError as exc:
        fail(str(exc))
    return scorer


@click.group()
def policy() -> None:
    """Generate and check an enforcement policy (who may ask the metadata service for what)."""


@policy.command("generate")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Learn from this saved model.")
@click.option("--fleet", "fleet_url", metavar="URL",
              help="Learn from the fleet scorer's model (GET URL/v1/model).")
@click.option("--fleet-token-file", type=click.Path(dir_okay=False),
              help="With --fleet: file holding the bearer token serve expects.")
@click.option("--fleet-ca", type=click.Path(dir_okay=False),
              help="With an https fleet URL: CA certificate that signed serve's certificate.")
@click.option("--output", "-o", default="-", show_default="standard output",
              help="Where to write the policy (TOML).")
@click.option("--min-hosts", type=click.IntRange(1), default=2, show_default=True,
              help="Learn a caller seen on at least this many hosts ...")
@click.option("--min-days", type=click.IntRange(1), default=2, show_default=True,
              help="... or active on at least this many days.")
@click.option("--catalog/--no-catalog", default=True, show_default=True,
              help="Add the known-agent catalog's agents as rules.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
def generate(state_path: str | None, fleet_url: str | None, fleet_token_file: str | None,
             fleet_ca: str | None, output: str, min_hosts: int, min_days: int,
             catalog: bool, config_path: str | None) -> None:
    """Propose a policy from the history a model holds: one rule per caller seen often
    enough, with the request classes it asked for and where each rule came from."""
    if (state_path is None) == (fleet_url is None):
        fail("policy generate needs one of --state FILE or --fleet URL")
    cfg = config_or_exit(config_path)
    if state_path is not None:
        scorer = _scorer_from_state(cfg, state_path)
        source = f"state {state_path}"
    else:
        assert fleet_url is not None
        scorer = _scorer_from_fleet(cfg, fleet_url, fleet_token_file, fleet_ca)
        source = f"the fleet model at {fleet_url}"
    pol = learn_policy(scorer, LearnOptions(min_hosts, min_days, catalog, source))
    learned = sum(r.origin.kind == "learned" for r in pol.rules)
    if output == "-":
        sys.stdout.write(dump_policy(pol))
    else:
        try:
            write_policy(output, pol)
        except OSError as exc:
            fail(f"{output}: cannot write ({exc.strerror})")
    click.echo(f"policy: {learned} callers learned, {len(pol.not_learned)} not learned, "
               f"{len(pol.rules) - learned} catalog rules"
               + (f" -> {output}" if output != "-" else ""), err=True)


@policy.command("plan")
@click.argument("trace", required=False, metavar="[TRACE]")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False),
              help="The policy file to check.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False),
              help="Judge the callers of this saved model instead of a trace.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config.")
def plan(trace: str | None, policy_path: str, state_path: str | None,
         config_path: str | None) -> None:
    """What the policy would have denied in a trace (ECS NDJSON, as replay reads) or a
    model's history, and who breaks if IMDSv2 were required or the hop limit were 1."""
    if (trace is None) == (state_path is None):
        fail("policy plan needs a TRACE or --state FILE (one of them)")
    cfg = config_or_exit(config_path)
    try:
        pol = load_policy(policy_path, cfg.catalog)
    except PolicyError as exc:
        fail(str(exc))
    if state_path is not None:
        result = plan_state(pol, _scorer_from_state(cfg, state_path), f"state {state_path}")
    else:
        assert trace is not None
        result = _plan_trace(pol, cfg, trace)
    sys.stdout.write(render(result))


def _plan_trace(pol, cfg: Config, trace: str) -> Plan:  # noqa: ANN001 - policy.model.Policy
    from intake.ndjson import InputError, numbered_lines
    from intake.reader import read_events

    malformed = Counter()

    def report(lineno: int, why: str, kind: str) -> None:
        malformed[kind] += 1
        if sum(malformed.values()) <= MAX_REPORTED:
            click.echo(f"imdswatch: {trace}:{lineno}: {why}", err=True)

    events = ((ev, ep) for _, ev, ep in read_events(numbered_lines(trace), cfg.catalog.match,
                                                     report, Counter()))
    try:
        result = plan_events(pol, events, trace)
    except InputError as exc:
        fail(str(exc))
    n = sum(malformed.values())
    if n:
        click.echo(f"imdswatch: {n} malformed lines skipped", err=True)
    return result
