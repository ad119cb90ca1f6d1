# Metadata addresses here are event data only: nothing connects to them, so these model-only
# tests need no network namespace (netns) of their own.
"""The scorer's callers memo survives the daily maintenance (scoring.scorer._keep_callers):
outcomes are those of a scorer that forgets every caller at each maintenance and re-scores
it, while far fewer events are fully scored."""

from helpers_events import DAY, MINUTE, T0

from scoring.events import Event
from scoring.scorer import Scorer
from scoring.settings import ScorerSettings

IMDS = "169.254.169.254"


def trace():
    out = []
    callers = [("amazon-ssm-agent", "/usr/bin/amazon-ssm-agent", "root", "systemd", 15),
               ("kubelet", "/usr/bin/kubelet", "root", "systemd", 10),
               ("python3", "/usr/bin/python3.11", "app", "gunicorn", 30)]
    for h in range(6):
        for k, (name, exe, user, parent, period) in enumerate(callers):
            t = T0 + h * 37 + k * 11
            while t < T0 + 6 * DAY:
                out.append(Event(t, IMDS, name, dst_port=80, exe=exe, user=user,
                                 parent_name=parent, host=f"node-{h}"))
                t += period * MINUTE
    # newcomers and an attacker on later days, between maintenances
    for day, name, user in ((2.3, "otelcol", "otel"), (3.7, "curl", "www-data"),
                            (4.1, "velero", "root"), (5.5, "nc", "nobody")):
        for j in range(3):
            out.append(Event(T0 + day * DAY + j * 90, IMDS, name, dst_port=80,
                             exe=f"/usr/bin/{name}", user=user, parent_name="bash",
                             host="node-2"))
    out.sort(key=lambda e: e.ts)
    return out


def outcomes(scorer, forget=False):
    """Outcomes to compare, and how many events were scored in full (a quiet caller's
    outcome carries no scores). `forget`: the behaviour before, every caller forgotten
    (and so re-scored) at each daily maintenance, which this runs itself just before the
    event that would run it, then empties the memo."""
    full = 0
    seen = []
    for e in trace():
        due = scorer._next_maintain
        if forget and due is not None and e.ts >= due:
            scorer.maintain(e.ts)
            scorer._callers.clear()
        o = scorer.process(e)
        full += bool(o.scores)
        # Scores to 9 places: deferred counts are added in another grouping (last bits).
        seen.append((round(o.score, 9), o.detector, o.alert, o.suppressed, o.reason))
    return seen, full


def test_keeping_callers_over_maintenance_changes_no_verdict_and_saves_scoring():
    settings = ScorerSettings(learning_period=DAY)
    kept, kept_full = outcomes(Scorer(settings))
    forgot, forgot_full = outcomes(Scorer(settings), forget=True)
    assert kept == forgot
    assert sum(1 for o in kept if o[2]) >= 4  # the newcomers and the attacker alert
    assert kept_full < forgot_full * 0.8, (kept_full, forgot_full)


def test_memo_stays_within_an_eighth_of_the_entry_cap_under_a_name_flood():
    """A flood of new names (each seen once) fills the memo with callers it never reuses:
    it is emptied at its bound, an eighth of the entry cap (at least CALLER_MIN), so its
    memory stays a small share of the model's, and nothing it held is lost from the
    model (the flood's names are still learned, within the cap)."""
    from scoring import scorer as scorer_module

    s = ScorerSettings()
    s.max_entities = 80_000
    scorer = Scorer(s)
    limit = max(scorer_module.CALLER_MIN, 80_000 // 8)
    assert scorer._caller_limit == limit == 10_000
    peak = 0
    for i in range(25_000):
        scorer.process(Event(T0 + i * 0.01, IMDS, f"f{i:06x}", dst_port=80,
                             exe="/usr/bin/python3.11", user="root", host="node-1"))
        peak = max(peak, len(scorer._callers))
    assert peak == limit
    assert scorer.entities <= s.max_entities + 16
    assert scorer.tables[0].distinct(None) > limit  # names past the memo's bound learned
