# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""The TOML configuration file (imdswatch.config) and how the CLI reports a bad one."""

import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers_events import DAY, HOUR, T0, ev, to_ecs, write_ndjson

from imdswatch.config import ConfigError, load_config
from scoring.endpoints import BUILTIN_ENDPOINTS

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"


def write(tmp_path, text, name="imdswatch.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message  # every error names the file
    return message


def test_defaults_without_a_file():
    cfg = load_config(None)
    s = cfg.scorer
    assert s.threshold == 50
    assert s.threshold_for("rare_user") == 75
    assert s.threshold_for("rare_process") == 50
    assert s.learning_period == DAY
    assert s.half_life == 14 * DAY
    assert s.suppression_window == HOUR
    assert 0 < s.known_caller_factor < 1
    assert len(cfg.catalog) == len(BUILTIN_ENDPOINTS)
    assert cfg.exceptions == ()
    assert cfg.metrics.address == "0.0.0.0:9464"
    assert cfg.metrics.max_series > 0 and cfg.metrics.anomaly_ttl > 0
    assert cfg.agent.probe == "auto"
    assert (cfg.agent.kubernetes, cfg.agent.kubernetes_api) == ("auto", None)
    assert cfg.path is None


def test_empty_file_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    default = load_config(None)
    assert cfg.scorer == default.scorer
    assert len(cfg.catalog) == len(default.catalog)
    assert cfg.metrics == default.metrics and cfg.agent == default.agent


FULL = """
    [scoring]
    threshold = 60
    learning_period = "3d"
    half_life = "7d"
    suppression_window = "30m"
    known_caller_factor = 0.5

    [scoring.detector_thresholds]
    rare_user = 80
    rare_parent = 70.5

    [endpoints]
    remove = ["alibaba-metadata", "fd00:ec2::254"]

    [[endpoints.add]]
    id = "corp-metadata"
    provider = "corp"
    address = "10.9.9.9"
    ports = [8775]

    [[exceptions]]
    name = "backup-agent"
    executable = "/opt/backup/bin/backup-agent"
    user = "backup"
    image = "registry.local/agents/*"
    namespace = "ops-*"
    detectors = ["rare_process"]
    comment = "vetted by SEC-123"

    [[exceptions]]
    name = "inventory"
    executable = "/usr/local/bin/inventory"

    [metrics]
    address = "127.0.0.1:9999"
    max_series = 50
    anomaly_ttl = "10m"

    [agent]
    probe = "tracepoint"
    proc_root = "/host/proc"
    passwd = "/host/etc/passwd"
    state_save_interval = "2m"
    node_name = "node-a"
    kubernetes = "on"
    kubernetes_api = "http://127.0.0.1:8001"
"""


def test_every_section_is_parsed(tmp_path):
    path = write(tmp_path, FULL)
    cfg = load_config(path)
    assert cfg.path == str(path)
    s = cfg.scorer
    assert s.threshold == 60
    assert s.learning_period == 3 * DAY
    assert s.half_life == 7 * DAY
    assert s.suppression_window == 1800
    assert s.known_caller_factor == 0.5
    assert s.threshold_for("rare_user") == 80
    assert s.threshold_for("rare_parent") == 70.5
    assert s.threshold_for("rare_process") == 60

    assert cfg.catalog.match("100.100.100.200", 80) is None
    assert cfg.catalog.match("fd00:ec2::254", 80) is None
    corp = cfg.catalog.match("10.9.9.9", 8775)
    assert corp is not None and corp.id == "corp-metadata" and corp.provider == "corp"
    assert cfg.catalog.match("10.9.9.9", 80) is None
    assert len(cfg.catalog) == len(BUILTIN_ENDPOINTS) - 2 + 1

    assert len(cfg.exceptions) == 2
    rule = cfg.exceptions[0]
    assert (rule.name, rule.executable, rule.user) == (
        "backup-agent", "/opt/backup/bin/backup-agent", "backup")
    assert (rule.image, rule.namespace) == ("registry.local/agents/*", "ops-*")
    assert rule.detectors == frozenset({"rare_process"})
    assert cfg.exceptions[1].user is None

    assert cfg.metrics.address == "127.0.0.1:9999"
    assert cfg.metrics.max_series == 50
    assert cfg.metrics.anomaly_ttl == 600
    a = cfg.agent
    assert (a.probe, a.proc_root, a.passwd, a.node_name) == (
        "tracepoint", "/host/proc", "/host/etc/passwd", "node-a")
    assert a.state_save_interval == 120
    assert (a.kubernetes, a.kubernetes_api) == ("on", "http://127.0.0.1:8001")


def test_durations_as_numbers_of_seconds(tmp_path):
    cfg = load_config(write(tmp_path, """
        [scoring]
        learning_period = 90
        suppression_window = "1h30m"
    """))
    assert cfg.scorer.learning_period == 90
    assert cfg.scorer.suppression_window == 5400


def test_configured_exceptions_are_applied_by_the_scorer(tmp_path):
    from scoring.scorer import Scorer

    cfg = load_config(write(tmp_path, """
        [scoring]
        learning_period = 0
        [[exceptions]]
        name = "backup-agent"
        executable = "/opt/backup/bin/backup-agent"
    """))
    scorer = Scorer(cfg.scorer, cfg.catalog, cfg.exceptions)
    for i in range(2000):
        scorer.process(ev(T0 + i, "kubelet", exe="/usr/bin/kubelet", host=f"n{i % 4}"))
    ok = scorer.process(ev(T0 + 2000, "backup-agent", exe="/opt/backup/bin/backup-agent"))
    assert ok.excepted and not ok.alert and ok.score >= 50
    bad = scorer.process(ev(T0 + 2001, "backup-agent", exe="/tmp/backup-agent", host="n2"))
    assert bad.alert and not bad.excepted


# -- unknown keys are named ------------------------------------------------------------------

@pytest.mark.parametrize(("text", "names"), [
    ("[scoring]\ntreshold = 60\n", ["treshold", "[scoring]"]),
    ("[scoring]\nthreshold = 60\nhalflife = '1d'\n", ["halflife", "[scoring]", "half_life"]),
    ("[metrics]\nadress = '1.2.3.4:9'\n", ["adress", "[metrics]"]),
    ("[agent]\nprobes = 'kprobe'\n", ["probes", "[agent]"]),
    ("[endpoints]\nadd_endpoint = []\n", ["add_endpoint", "[endpoints]"]),
    ("[[exceptions]]\nname = 'x'\nexecutable = '/x'\nusers = 'root'\n", ["users"]),
])
def test_unknown_keys_are_named(tmp_path, text, names):
    message = config_error(tmp_path, text)
    for name in names:
        assert name in message, message


def test_unknown_top_level_table_is_named(tmp_path):
    path = write(tmp_path, "[scorer]\nthreshold = 60\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "scorer" in str(info.value) and "top level" in str(info.value)


def test_unknown_top_level_table_names_the_file(tmp_path):
    config_error(tmp_path, "[scorer]\nthreshold = 60\n")


def test_several_unknown_keys_are_all_named(tmp_path):
    message = config_error(tmp_path, "[scoring]\nfoo = 1\nbar = 2\n")
    assert "foo" in message and "bar" in message


# -- bad values --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "where"), [
    ("[scoring]\nlearning_period = '3 days'\n", "scoring.learning_period"),
    ("[scoring]\nlearning_period = 'soon'\n", "scoring.learning_period"),
    ("[scoring]\nlearning_period = -5\n", "scoring.learning_period"),
    ("[scoring]\nhalf_life = '0s'\n", "scoring.half_life"),
    ("[scoring]\nhalf_life = ''\n", "scoring.half_life"),
    ("[scoring]\nsuppression_window = '1x'\n", "scoring.suppression_window"),
    ("[metrics]\nanomaly_ttl = '15 minutes'\n", "metrics.anomaly_ttl"),
    ("[agent]\nstate_save_interval = 'often'\n", "agent.state_save_interval"),
])
def test_bad_durations(tmp_path, text, where):
    assert where in config_error(tmp_path, text)


@pytest.mark.parametrize(("text", "where"), [
    ("[scoring]\nthreshold = 150\n", "scoring.threshold"),
    ("[scoring]\nthreshold = -1\n", "scoring.threshold"),
    ("[scoring]\nthreshold = 'high'\n", "scoring.threshold"),
    ("[scoring]\nthreshold = true\n", "scoring.threshold"),
    ("[scoring.detector_thresholds]\nrare_user = 101\n", "rare_user"),
    ("[scoring.detector_thresholds]\nrare_user = 'x'\n", "rare_user"),
    ("[scoring.detector_thresholds]\nrare_users = 80\n", "rare_users"),
    ("[scoring]\nknown_caller_factor = 2\n", "known_caller_factor"),
    ("[metrics]\nmax_series = 0\n", "metrics.max_series"),
])
def test_bad_thresholds_and_numbers(tmp_path, text, where):
    assert where in config_error(tmp_path, text)


def test_unknown_detector_lists_the_detectors(tmp_path):
    message = config_error(tmp_path, "[scoring.detector_thresholds]\nrare_foo = 80\n")
    assert "rare_foo" in message and "rare_process" in message and "rare_user" in message


@pytest.mark.parametrize("text", [
    "[[exceptions]]\nname = 'backup-agent'\n",
    "[[exceptions]]\nname = 'backup-agent'\nexecutable = ''\n",
    "[[exceptions]]\nname = 'backup-agent'\nuser = 'backup'\n",
])
def test_exception_without_executable_is_rejected(tmp_path, text):
    message = config_error(tmp_path, text)
    assert "exceptions #1" in message and "executable" in message


def test_second_exception_is_numbered(tmp_path):
    message = config_error(tmp_path, """
        [[exceptions]]
        name = "a"
        executable = "/usr/bin/a"
        [[exceptions]]
        executable = "/usr/bin/b"
    """)
    assert "exceptions #2" in message and "'name'" in message


def test_relative_exception_executable_is_rejected(tmp_path):
    message = config_error(tmp_path, "[[exceptions]]\nname = 'a'\nexecutable = 'bin/a'\n")
    assert "absolute" in message


@pytest.mark.parametrize(("text", "words"), [
    ("[endpoints]\nremove = ['no-such-endpoint']\n", "no-such-endpoint"),
    ("[[endpoints.add]]\naddress = '10.0.0.300'\n", "10.0.0.300"),
    ("[[endpoints.add]]\nid = 'x'\n", "address"),
    ("[[endpoints.add]]\naddress = '10.0.0.1'\nports = [0]\n", "ports"),
])
def test_bad_endpoints(tmp_path, text, words):
    message = config_error(tmp_path, text)
    assert "endpoints" in message and words in message


def test_kubernetes_settings(tmp_path):
    assert load_config(write(tmp_path, "[agent]\nkubernetes = false\n")).agent.kubernetes == "off"
    with pytest.raises(ConfigError, match="agent.kubernetes must be one of auto, on, off"):
        load_config(write(tmp_path, '[agent]\nkubernetes = "maybe"\n'))
    with pytest.raises(ConfigError, match="agent.kubernetes_api"):
        load_config(write(tmp_path, '[agent]\nkubernetes_api = "10.96.0.1:443"\n'))


def test_bad_probe(tmp_path):
    message = config_error(tmp_path, "[agent]\nprobe = 'ebpf'\n")
    assert "agent.probe" in message and "kprobe" in message


@pytest.mark.parametrize("text", [
    "[scoring]\ndetector_thresholds = 5\n",
    "scoring = 3\n",
])
def test_wrong_types_are_config_errors(tmp_path, text):
    config_error(tmp_path, text)


def test_invalid_toml(tmp_path):
    message = config_error(tmp_path, "[scoring\nthreshold = 1\n")
    assert "TOML" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml"):
        load_config(tmp_path / "absent.toml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# -- through the command line ----------------------------------------------------------------

def run(*args, **kw):
    return subprocess.run([str(IMDSWATCH), *map(str, args)], capture_output=True, text=True,
                          timeout=60, **kw)


@pytest.fixture
def events_file(tmp_path):
    return write_ndjson(tmp_path / "events.ndjson",
                        [to_ecs(ev(T0 + i, "kubelet", exe="/usr/bin/kubelet"))
                         for i in range(10)])


@pytest.mark.parametrize(("text", "words"), [
    ("[scoring]\ntreshold = 60\n", "treshold"),
    ("[scoring]\nlearning_period = 'soon'\n", "scoring.learning_period"),
    ("[[exceptions]]\nname = 'x'\n", "executable"),
    ("not toml at all [", "TOML"),
])
def test_replay_with_a_bad_config_exits_2_with_the_message(tmp_path, events_file, text, words):
    bad = write(tmp_path, text, "bad.toml")
    r = run("replay", events_file, "--config", bad)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert words in r.stderr
    assert "bad.toml" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_replay_with_a_missing_config_exits_2(tmp_path, events_file):
    r = run("replay", events_file, "--config", tmp_path / "nope.toml")
    assert r.returncode == 2
    assert "nope.toml" in r.stderr and "Traceback" not in r.stderr


def test_endpoints_command_shows_the_configured_catalog(tmp_path):
    cfg = write(tmp_path, FULL)
    r = run("endpoints", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "corp-metadata" in r.stdout and "10.9.9.9" in r.stdout and "8775" in r.stdout
    assert "alibaba-metadata" not in r.stdout
    assert "gke-metadata-server" in r.stdout and "988" in r.stdout
    default = run("endpoints")
    assert "alibaba-metadata" in default.stdout
    assert len(default.stdout.splitlines()) == len(BUILTIN_ENDPOINTS)
