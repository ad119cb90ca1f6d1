"""Configurations a careless operator (or an attacker with write access to a ConfigMap)
could give: each is refused at start with the key and the reason, exit status 2, never a
traceback and never silently accepted (hostile input is normal)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imdswatch.config import Config, ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"


@pytest.mark.parametrize(("data", "words"), [
    ({"endpoints": {"add": [{"address": "0.0.0.0/0"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "::/0"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "10.0.0.0/8"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "fd00::/16"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "0.0.0.0"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "::ffff:0.0.0.0/96"}]}}, "too broad"),
    ({"endpoints": {"add": [{"address": "10.0.0.5", "port": [80]}]}}, "unknown key"),
    ({"endpoints": {"add": [{"adress": "10.0.0.5"}]}}, "unknown key"),
    ({"endpoints": {"add": [{"address": "10.0.0.5", "ports": [True]}]}}, "ports"),
    ({"endpoints": {"add": [{"address": "10.0.0.5", "ports": "80"}]}}, "ports"),
    ({"endpoints": {"add": [{"address": 167772165}]}}, "address"),
    ({"endpoints": {"add": ["10.0.0.5"]}}, "must be a table"),
    ({"endpoints": {"add": {"address": "10.0.0.5"}}}, "must be a list"),
    ({"endpoints": {"builtin": "no"}}, "builtin must be true or false"),
    ({"endpoints": {"builtin": 0}}, "builtin must be true or false"),
    ({"endpoints": {"remove": "imds"}}, "endpoints.remove"),
    ({"endpoints": {"builtin": False}}, "no endpoint left"),
    ({"endpoints": []}, "must be a table"),
    ({"scoring": {"threshold": math.nan}}, "scoring.threshold"),
    ({"scoring": {"threshold": math.inf}}, "scoring.threshold"),
    ({"scoring": {"threshold": -1}}, "scoring.threshold"),
    ({"scoring": {"threshold": "50"}}, "scoring.threshold"),
    ({"scoring": {"detector_thresholds": {"rare_user": math.nan}}}, "rare_user"),
    ({"scoring": {"detector_thresholds": [75]}}, "must be a table"),
    ({"scoring": {"learning_period": math.nan}}, "learning_period"),
    ({"scoring": {"learning_period": "nan"}}, "learning_period"),
    ({"scoring": {"learning_period": math.inf}}, "learning_period"),
    ({"scoring": {"learning_period": "inf"}}, "learning_period"),
    ({"scoring": {"learning_period": -5}}, "negative"),
    ({"scoring": {"learning_period": "-1d"}}, "learning_period"),
    ({"scoring": {"learning_period": True}}, "learning_period"),
    ({"scoring": {"half_life": 0}}, "longer than zero"),
    ({"scoring": {"half_life": "infinity"}}, "half_life"),
    ({"scoring": {"suppression_window": math.nan}}, "suppression_window"),
    ({"scoring": {"known_caller_factor": math.nan}}, "known_caller_factor"),
    ({"scoring": {"max_entities": 0}}, "scoring.max_entities"),
    ({"scoring": {"max_entities": True}}, "scoring.max_entities"),
    ({"scoring": {"max_entities": 1e6}}, "scoring.max_entities"),
    ({"scoring": {"max_entities": 10**12}}, "scoring.max_entities"),
    ({"metrics": {"anomaly_ttl": math.inf}}, "anomaly_ttl"),
    ({"metrics": {"max_series": math.nan}}, "max_series"),
    ({"metrics": {"address": "9464"}}, "HOST:PORT"),
    ({"metrics": {"address": "0.0.0.0:99999"}}, "HOST:PORT"),
    ({"agent": {"state_save_interval": math.nan}}, "state_save_interval"),
    ({"agent": {"proc_root": 5}}, "agent.proc_root"),
    ({"exceptions": [{"name": "velero", "executable": "/?*"}]}, "any user can write"),
    ({"exceptions": [{"name": "velero", "executable": "/[a-z]*"}]}, "any user can write"),
    ({"exceptions": [{"name": "velero", "executable": "/[!x]*/bin/velero"}]},
     "any user can write"),
    ({"exceptions": [{"name": "velero", "executable": "*"}]}, "absolute path"),
    ({"exceptions": [{"name": "velero", "executable": "/*"}]}, "absolute path"),
    ({"exceptions": [{"name": "x", "executable": "/usr/bin/x", "image": "*"}]},
     "matches everything"),
    ({"exceptions": [{"name": "x", "executable": "/usr/bin/x", "detectors": ["rare_proc"]}]},
     "unknown detectors"),
    ({"exceptions": [{"name": "x", "executable": "/usr/bin/x", "user": 0}]}, "user"),
    ({"exceptions": {"name": "x"}}, "array of tables"),
    ({"exceptions": ["x"]}, "must be a table"),
])
def test_refused_with_the_key_and_reason(data, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("?", r"\?")
                       .replace("*", r"\*")):
        parse_config(data, "test.toml")


@pytest.mark.parametrize("data", [
    {"endpoints": {"add": [{"address": "169.254.0.0/16"}]}},  # all of link-local: allowed
    {"endpoints": {"add": [{"id": "vault", "address": "10.0.0.5", "ports": [8200]}]}},
    {"exceptions": [{"name": "velero", "executable": "/velero", "namespace": "velero"}]},
    {"exceptions": [{"name": "app", "executable": "/opt/app-*/bin/app"}]},
    {"scoring": {"learning_period": 0, "threshold": 0}},
    {"agent": {"state_save_interval": 0}},
])
def test_reasonable_configs_still_load(data):
    assert isinstance(parse_config(data, "ok.toml"), Config)


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
KEYS = [("scoring", "threshold"), ("scoring", "learning_period"), ("scoring", "half_life"),
        ("scoring", "detector_thresholds"), ("endpoints", "add"), ("endpoints", "remove"),
        ("endpoints", "builtin"), ("metrics", "address"), ("metrics", "max_series"),
        ("agent", "probe"), ("agent", "kubernetes"), ("agent", "state_save_interval")]


@given(st.sampled_from(KEYS), VALUES)
@settings(max_examples=400, deadline=None)
def test_any_value_loads_or_is_refused_with_a_config_error(key, value):
    table, name = key
    try:
        parse_config({table: {name: value}}, "fuzz.toml")
    except ConfigError:
        pass


@given(st.lists(VALUES, max_size=3))
@settings(max_examples=200, deadline=None)
def test_any_exceptions_array_loads_or_is_refused(rules):
    try:
        parse_config({"exceptions": rules}, "fuzz.toml")
    except ConfigError:
        pass


@pytest.mark.parametrize("toml", [
    '[endpoints]\nadd = [{ address = "0.0.0.0/0" }]\n',
    '[endpoints]\nbuiltin = "no"\n',
    "[scoring]\nthreshold = nan\n",
    "[scoring]\nlearning_period = inf\n",
    '[[exceptions]]\nname = "x"\nexecutable = "/?*"\n',
])
def test_the_cli_exits_2_with_one_line(toml, tmp_path):
    cfg = tmp_path / "imdswatch.toml"
    cfg.write_text(toml)
    r = subprocess.run([str(IMDSWATCH), "replay", "-", "--config", str(cfg)], input=b"",
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imdswatch: {cfg}:"), lines


@pytest.mark.parametrize("value", ["nan", "inf", "-1s", "1e400"])
def test_cli_durations_refuse_nan_and_infinity(value):
    r = subprocess.run([str(IMDSWATCH), "replay", "-", "--learning-period", value],
                       input=b"", capture_output=True, timeout=60)
    assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_reorder_window_may_be_infinite():
    r = subprocess.run([str(IMDSWATCH), "replay", "-", "--reorder-window", "inf"],
                       input=b"", capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
