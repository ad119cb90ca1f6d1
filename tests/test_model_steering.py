"""A model an attacker cannot steer, through the public `Scorer.process`.

The cases are ways a rarity model can be steered: on a quiet host a brand-new curl, and each
further new tool, must still score high; a burst of throwaway names must not blind the model
for weeks; a benign newcomer must not alert once an hour for days; a name flood must not
grow the model without bound.
"""

import pytest
from helpers_events import DAY, HOUR, MINUTE, T0, Agent, ev, fleet_events

from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

QUIET_AGENTS = (
    Agent("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", "systemd", 10 * MINUTE),
    Agent("kubelet", "/usr/bin/kubelet", "root", "systemd", 10 * MINUTE),
)


def quiet_host(days=3.0, **settings):
    """One host, two agents every 10 minutes for `days` (a quiet host)."""
    settings.setdefault("learning_period", DAY)
    scorer = Scorer(ScorerSettings(**settings))
    history = fleet_events(hosts=1, days=days, agents=QUIET_AGENTS)
    for e in history:
        assert not scorer.process(e).alert
    return scorer, T0 + days * DAY


def tool(t, name, host="node-0", **kw):
    return ev(t, name, exe=f"/usr/bin/{name}", user="root", parent="bash", host=host, **kw)


# -- novelty against time, not volume --------------------------------------------------------

@pytest.mark.parametrize("period", [10 * MINUTE, 10.0])
def test_first_new_caller_on_a_quiet_host_alerts_whatever_the_call_rate(period):
    # The same host at one call per 10 minutes or at one per 10 seconds (60x the volume):
    # the first new caller after days of a stable caller set alerts in both.
    agents = tuple(Agent(a.name, a.exe, a.user, a.parent, period) for a in QUIET_AGENTS)
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    for e in fleet_events(hosts=1, days=3, agents=agents):
        scorer.process(e)
    out = scorer.process(tool(T0 + 3 * DAY, "curl"))
    assert out.alert and out.novel, out
    assert out.score >= 50


def test_second_and_third_new_callers_in_the_same_minute_alert_too():
    scorer, t = quiet_host()
    outs = [scorer.process(tool(t + i * 15, name))
            for i, name in enumerate(("curl", "wget", "python3"))]
    assert [o.alert for o in outs] == [True, True, True], outs
    # Each further new tool does not score much lower than the first (was 45, 37, 31).
    assert min(o.score for o in outs) >= 50
    assert outs[2].score >= outs[0].score - 15


def test_a_new_value_in_a_context_judged_against_time():
    # The quiet host's agents always ran as root; a new user of kubelet after three days.
    scorer, t = quiet_host()
    out = scorer.process(ev(t, "kubelet", exe="/usr/bin/kubelet", user="www-data",
                            parent="systemd", host="node-0"))
    assert out.alert and out.scores["rare_process_user"] >= 50, out.scores


# -- bursts ----------------------------------------------------------------------------------

def test_a_burst_of_new_names_is_one_alert_naming_the_burst():
    scorer, t = quiet_host()
    outs = [scorer.process(tool(t + i * 2, f"junk-{i:02d}")) for i in range(40)]
    alerts = [o for o in outs if o.alert]
    singles, burst = alerts[:5], alerts[5:]
    assert all(not o.burst for o in singles)
    # One alert names the burst; every later name of the burst is folded into it (still
    # an anomaly, for the metrics, but not an alert).
    assert len(burst) == 1, [o.reason for o in burst]
    assert burst[0].burst == 6 and "burst of new callers on node-0" in burst[0].reason
    assert "junk-00" in burst[0].reason and "junk-05" in burst[0].reason
    folded = outs[6:]
    assert all(o.suppressed and o.burst and o.reason for o in folded)
    assert [o.burst for o in folded] == list(range(7, 41))


def test_a_burst_neither_lowers_later_scores_nor_blinds_the_model():
    plain, t = quiet_host()
    flooded, _ = quiet_host()
    for i in range(50):
        flooded.process(tool(t + i, f"throwaway-{i:02d}"))
    # The agents carry on for a day; then a real attack on both hosts' histories.
    later = t + DAY
    for e in fleet_events(hosts=1, days=1, start=t + MINUTE, agents=QUIET_AGENTS):
        plain.process(e)
        flooded.process(e)
    a = plain.process(tool(later + HOUR, "xmrig"))
    b = flooded.process(tool(later + HOUR, "xmrig"))
    assert a.alert and b.alert
    assert b.score >= a.score - 5, (a.score, b.score)
    # Weeks later the burst has faded from diversity like every count.
    assert b.scores["rare_process"] >= 50


def test_bursts_are_per_host_and_end_after_a_quiet_gap():
    scorer, t = quiet_host()
    for i in range(8):
        scorer.process(tool(t + i, f"first-{i}"))
    # Half an hour later the burst is over: new names alert on their own again.
    out = scorer.process(tool(t + 30 * MINUTE, "second-0"))
    assert out.alert and not out.burst
    # Another host's new callers are not folded into node-0's burst.
    other = scorer.process(tool(t + 5, "elsewhere", host="node-9"))
    assert other.alert and not other.burst


# -- a benign newcomer settles -----------------------------------------------------------------

def test_a_steady_newcomer_alerts_a_few_times_not_once_an_hour():
    scorer = Scorer(ScorerSettings(learning_period=DAY))
    start = T0
    history = fleet_events(hosts=8, days=2, start=start)
    newcomer_start = start + 2 * DAY
    later = fleet_events(hosts=8, days=11, start=newcomer_start)
    newcomer = [ev(newcomer_start + i * 30 * MINUTE, "inventory-agent",
                   exe="/opt/inventory/bin/inventory-agent", user="inventory",
                   parent="systemd", host="node-2") for i in range(11 * 48)]
    events = sorted(history + later + newcomer, key=lambda e: e.ts)
    alerts = [o for o in map(scorer.process, events)
              if o.alert and o.event.name == "inventory-agent"]
    # Noticed (it is new), then learnt: a few alerts on its first day, none after.
    assert 1 <= len(alerts) <= 6, [(o.event.ts - newcomer_start) / HOUR for o in alerts]
    assert all(o.event.ts < newcomer_start + 2 * DAY for o in alerts)


# -- memory bound ----------------------------------------------------------------------------

def test_a_name_flood_is_bounded_and_a_real_attack_still_alerts():
    cap = 3000
    scorer = Scorer(ScorerSettings(learning_period=DAY, max_entities=cap))
    history = fleet_events(hosts=8, days=2)
    for e in history:
        scorer.process(e)
    established = scorer.entities
    t = T0 + 2 * DAY
    peak = 0
    for i in range(4000):  # ~28,000 entries' worth of throwaway callers
        scorer.process(ev(t + i * 0.5, f"flood-{i:05d}", exe=f"/tmp/f/{i}", user=f"u{i}",
                          parent=f"p{i}", host=f"node-{i % 8}"))
        peak = max(peak, scorer.entities)
    assert peak <= cap + 20  # the cap holds (evicted once over it)
    # What the flood could not push out: the fleet's established callers.
    assert scorer.entities >= established
    for name in ("kubelet", "amazon-ssm-agent", "aws-k8s-agent"):
        assert scorer.count("rare_process", None, name) > 100
    # A real attack afterwards is still judged against that history.
    out = scorer.process(ev(t + 3 * HOUR, "amazon-ssm-agent", exe="/tmp/amazon-ssm-agent",
                            user="root", parent="systemd", host="node-3"))
    assert out.alert and out.detector == "rare_executable", out
    # The agents are still common.
    common = scorer.process(ev(t + 3 * HOUR + 1, "kubelet", exe="/usr/bin/kubelet",
                               user="root", parent="systemd", host="node-3"))
    assert common.score < 50


def test_faded_entries_are_pruned():
    scorer = Scorer(ScorerSettings(learning_period=HOUR, half_life=HOUR))
    for e in fleet_events(hosts=2, days=0.5):
        scorer.process(e)
    scorer.process(tool(T0 + 0.5 * DAY, "one-off"))
    assert scorer.count("rare_process", None, "one-off") > 0
    # Two days later (48 half-lives) the one-off call weighs nothing and is gone, while
    # the agents that kept calling stay.
    for e in fleet_events(hosts=2, days=2, start=T0 + 0.5 * DAY + 1):
        scorer.process(e)
    assert scorer.tables[0].distinct(None) == len({e.name for e in fleet_events(hosts=1,
                                                                                 days=0.1)})
    assert scorer.count("rare_process", None, "one-off") == 0


def test_hosts_silent_past_the_horizon_are_retired():
    scorer = Scorer(ScorerSettings(learning_period=HOUR, half_life=HOUR))
    for e in fleet_events(hosts=6, days=0.25):
        scorer.process(e)
    assert scorer.hosts_seen == 6
    # Nodes 0-1 carry on for a day (24 half-lives); nodes 2-5 are gone.
    for e in fleet_events(hosts=2, days=1, start=T0 + 0.25 * DAY):
        scorer.process(e)
    assert scorer.hosts_seen == 2
