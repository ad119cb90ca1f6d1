# Metadata addresses here are event data only: nothing connects to them, so these model-only
# tests need no network namespace (netns) of their own.
"""A name flood against the model, through the public `Scorer.process`: the burst it makes
folds the flood's names into one alert, but must not hide the attack that follows it (a
new user, a credential request without the anti-SSRF header), and the model stays within
its cap. The live agent under a real flood: tests/test_flood_agent.py."""

from helpers_events import DAY, MINUTE, T0, Agent, ev, fleet_events

from scoring.events import Event
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

AGENTS = (Agent("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", "systemd", 10 * MINUTE),)


def flooded(names: int = 200, **settings) -> tuple[Scorer, float]:
    """Three quiet days, then `names` throwaway names from root on node-0, 10 ms apart."""
    settings.setdefault("learning_period", DAY)
    scorer = Scorer(ScorerSettings(**settings))
    for e in fleet_events(hosts=1, days=3, agents=AGENTS):
        scorer.process(e)
    t = T0 + 3 * DAY
    outs = [scorer.process(ev(t + i * 0.01, f"zq{i:x}", exe="/usr/bin/python3"))
            for i in range(names)]
    assert sum(o.alert for o in outs) == 6  # five singles, then one naming the burst
    return scorer, t + names * 0.01


def credential_request(ts: float, name: str, user: str) -> Event:
    return Event(ts, "169.254.169.254", name, 80, exe=f"/usr/bin/{name}", user=user,
                 parent_name="bash", host="node-0", action="http_request", method="GET",
                 path="/latest/meta-data/iam/security-credentials/test-role", guarded=False)


def test_a_new_user_after_a_name_flood_still_alerts():
    scorer, t = flooded()
    out = scorer.process(ev(t + 1, "curl", user="nobody"))
    assert out.alert and not out.suppressed, out
    assert out.detector == "rare_user", out
    assert "nobody" in out.reason and "burst of" in out.reason


def test_a_credential_request_after_a_name_flood_still_alerts():
    scorer, t = flooded()
    out = scorer.process(credential_request(t + 1, "curl", "root"))
    assert out.alert and not out.suppressed, out
    assert out.detector == "unguarded_credential_request", out


def test_a_bare_new_name_in_the_flood_is_still_folded():
    # Nothing but another new name from the flooding user: one of the burst, counted as
    # an anomaly (metrics), not a new alert line.
    scorer, t = flooded()
    out = scorer.process(ev(t + 1, "curl"))
    assert out.burst and out.suppressed and not out.alert and out.reason


def test_the_flood_stays_within_the_entity_cap():
    scorer, _ = flooded(names=3000, max_entities=5000)
    assert scorer.entities <= 5000


def test_a_flood_slightly_out_of_time_order_is_one_burst():
    # Live events arrive a little out of order (request capture reports a connection when
    # it goes idle, a second later): the burst must not restart at each older one.
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in fleet_events(hosts=1, days=3, agents=AGENTS):
        scorer.process(e)
    t = T0 + 3 * DAY
    outs = [scorer.process(ev(t + i * 0.01 - (1.5 if i % 7 == 0 else 0), f"zq{i:x}",
                              exe="/usr/bin/python3")) for i in range(500)]
    assert sum(o.alert for o in outs) == 6, [o.reason[:60] for o in outs if o.alert]


def _v2(ts: float, name: str, method: str, path: str, guarded: bool = True) -> Event:
    return Event(ts, "169.254.169.254", name, 80, exe=f"/tmp/x/{name}", user="root",
                 parent_name="bash", host="node-0", action="http_request", method=method,
                 path=path, guarded=guarded, user_agent="curl/8.5.0")


def test_a_guarded_spray_never_folds_the_credential_request_that_follows():
    """The reviewer's spray on a quiet host: 40 throwaway callers making well-formed IMDSv2
    requests (a session token, then the instance id with it), then curl fetching the role's
    credentials WITH a token two minutes later. The burst alerts once for the spray; curl's
    credential request is reported when it happens, on its own, naming the burst."""
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in fleet_events(hosts=1, days=3, agents=AGENTS):
        scorer.process(e)
    t = T0 + 3 * DAY
    spray = []
    for i in range(40):
        name = f"tmp{i:03d}"
        spray.append(scorer.process(_v2(t + 2 * i, name, "PUT", "/latest/api/token")))
        spray.append(scorer.process(_v2(t + 2 * i + 1, name, "GET",
                                        "/latest/meta-data/instance-id")))
    alerts = [o for o in spray if o.alert]
    assert any(o.burst for o in alerts), "the spray itself makes one burst alert"
    assert len(alerts) <= 12, [o.reason for o in alerts]  # folded: the spray is noise
    creds = Event(t + 80 + 120, "169.254.169.254", "curl", 80, exe="/usr/bin/curl",
                  user="root", parent_name="bash", host="node-0", action="http_request",
                  method="GET", path="/latest/meta-data/iam/security-credentials/test-role",
                  guarded=True, user_agent="curl/8.5.0")
    out = scorer.process(creds)
    assert out.alert and not out.suppressed and not out.burst, out
    assert "credentials" in out.reason and "never folded" in out.reason, out.reason


def test_a_flood_of_names_seen_once_costs_no_model_entries():
    """Every mode's memory under a flood: the names folded into the burst, each seen once,
    are not learned (nor evicted again); one that comes back is learned. The attack after
    the flood still alerts (the tests above)."""
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in fleet_events(hosts=1, days=3, agents=AGENTS):
        scorer.process(e)
    before = scorer.entities
    t = T0 + 3 * DAY
    for i in range(20_000):
        scorer.process(ev(t + i * 0.01, f"zq{i:x}", exe="/usr/bin/python3"))
    assert scorer.entities <= before + 6 * 16, (before, scorer.entities)  # the singles
    assert scorer.events_learned == len(fleet_events(hosts=1, days=3, agents=AGENTS)) + 20_000
    again = scorer.process(ev(t + 300, "zq4e1f", exe="/usr/bin/python3"))
    assert again.suppressed and again.burst
    assert scorer.count("rare_process", None, "zq4e1f") > 0  # the second sighting is learned


def test_the_reorder_buffer_is_bounded_and_loses_nothing():
    """A flood inside one reorder window (replay's 10 minutes, serve's hold) would make every
    event wait in memory: past `max_items` the oldest go early, in order, and an item
    arriving older than them afterwards is counted late and still comes out."""
    from intake.reorder import ReorderBuffer

    buf = ReorderBuffer(600.0, max_items=100)
    out = []
    for i in range(10_000):
        out += buf.push((T0 + i * 0.01, i))
        assert len(buf.fifo) + len(buf.heap) <= 100
    out += buf.push((T0, -1))  # older than what was released early: late, not lost
    out += buf.drain()
    assert len(out) == 10_001 and buf.late == 1 and buf.forced == 9_900
    released = [x for x in out if x[1] >= 0]
    assert released == sorted(released)
