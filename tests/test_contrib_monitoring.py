"""contrib/grafana and contrib/prometheus name only what a running relay exports.

A relay on the fake Postmark API is given traffic that makes every series the
dashboard and the alert rules use show up (tests.test_ops_dashboard.loaded_relay), and
its /metrics is scraped over HTTP.  Every PromQL expression of the two files is then
read for the metric names it selects, the labels it matches or groups by, and the
values its ``label="value"`` matchers expect; each must be in the scrape.  ``instance``
and ``job`` are the labels Prometheus itself adds to a target's series.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from esprelay.testing.fakeesp import FakeESP
from tests.relayproc import RelayProcess
from tests.test_ops_dashboard import flaky_postmark, loaded_relay

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "esprelay-dashboard.json"
ALERTS = ROOT / "contrib" / "prometheus" / "esprelay-alerts.yml"
#: Labels Prometheus attaches to every series of a scrape target.
TARGET_LABELS = frozenset({"instance", "job"})


@dataclass
class Exported:
    """What /metrics showed: label names and values seen per sample name."""

    text: str
    labels: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )

    @classmethod
    def parse(cls, text: str) -> Exported:
        exported = cls(text)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen = exported.labels[sample.name]
                for label, value in sample.labels.items():
                    seen[label].add(value)
        return exported


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    workdir = tmp_path_factory.mktemp("exporter")
    made: list[RelayProcess] = []

    def factory(env: dict[str, str]) -> RelayProcess:
        made.append(RelayProcess(workdir, env))
        return made[-1]

    try:
        with FakeESP(flaky_postmark()) as esp:
            relay = loaded_relay(factory, esp)  # type: ignore[arg-type]
            response = httpx.get(f"http://127.0.0.1:{relay.http_port}/metrics", timeout=10)
            assert response.status_code == 200
            yield Exported.parse(response.text)
    finally:
        for relay in made:
            relay.kill()


# --- reading PromQL ------------------------------------------------------------------

_STRING = r'"(?:[^"\\]|\\.)*"'
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(" + _STRING + ")")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*(\w+)\s*\)")
_IDENTIFIER = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
    | {"bool", "offset", "inf", "nan"}
)


@dataclass(frozen=True)
class Use:
    """What one expression asks of the exporter."""

    names: frozenset[str]
    #: (metric, label, operator, value) of each matcher of a named selector.
    matchers: tuple[tuple[str, str, str, str], ...]
    #: Labels of by/without/on/ignoring/group_* clauses (and of label_values).
    grouping: frozenset[str]


def read_promql(expr: str) -> Use:
    matchers = []
    for name, inside in _SELECTOR.findall(expr):
        for label, op, quoted in _MATCHER.findall(inside):
            matchers.append((name, label, op, json.loads(quoted)))
    grouping = {label.strip() for labels in _GROUPING.findall(expr) for label in labels.split(",")}
    # Grafana's label_values(metric, label): a metric and a label of it.
    grouping |= {label for _, label in _LABEL_VALUES.findall(expr)}
    bare = _LABEL_VALUES.sub(lambda m: m.group(1), expr)
    bare = re.sub(_STRING, '""', bare)
    bare = _SELECTOR.sub(lambda m: m.group(1) or "", bare)
    bare = _GROUPING.sub(" ", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # range and subquery durations
    names = {n for n in _IDENTIFIER.findall(bare) if n not in _KEYWORDS}
    names |= {matcher[0] for matcher in matchers if matcher[0]}
    return Use(frozenset(names), tuple(matchers), frozenset(g for g in grouping if g))


def problems(expr: str, exported: Exported) -> list[str]:
    """What ``expr`` names that the exporter does not have (empty: all good)."""
    use = read_promql(expr)
    found: list[str] = []
    known: set[str] = set(TARGET_LABELS)
    for name in sorted(use.names):
        if name not in exported.labels:
            found.append(f"no metric {name}")
            continue
        known |= set(exported.labels[name])
    for name, label, op, value in use.matchers:
        labels = exported.labels.get(name, {})
        if label in TARGET_LABELS:
            continue
        if label not in labels:
            found.append(f"{name} has no label {label}")
        elif op == "=" and "$" not in value and value not in labels[label]:
            found.append(f"{name}{{{label}}} never has the value {value!r}")
    for label in sorted(use.grouping - known):
        found.append(f"no metric of the expression has the label {label}")
    return found


def test_the_reader_sees_what_an_expression_names() -> None:
    use = read_promql(
        'sum by (provider, le) (rate(esprelay_x_bucket{state="open", kind=~"a|b"}[5m]))'
        " / on (instance) group_left sum(esprelay_y_total offset 5m) > 4 * 3600"
        " and label_values(esprelay_z, provider) or $__rate_interval"
    )
    assert use.names == {"esprelay_x_bucket", "esprelay_y_total", "esprelay_z"}
    assert use.matchers == (
        ("esprelay_x_bucket", "state", "=", "open"),
        ("esprelay_x_bucket", "kind", "=~", "a|b"),
    )
    assert use.grouping == {"provider", "le", "instance"}


def test_the_check_catches_a_wrong_name_label_or_value(exported: Exported) -> None:
    assert (
        problems(
            'sum by (provider) (rate(esprelay_deliveries_total{outcome="failed"}[5m]))', exported
        )
        == []
    )
    assert problems("esprelay_deliveries", exported) == ["no metric esprelay_deliveries"]
    assert problems('esprelay_deliveries_total{outcom="failed"}', exported) == [
        "esprelay_deliveries_total has no label outcom"
    ]
    assert problems('esprelay_deliveries_total{outcome="faild"}', exported) == [
        "esprelay_deliveries_total{outcome} never has the value 'faild'"
    ]
    assert problems("sum by (tenant) (esprelay_spool_depth)", exported) == [
        "no metric of the expression has the label tenant"
    ]


# --- the alert rules -----------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_GROUP_KEYS = {"name", "interval", "limit", "query_offset", "rules"}
_RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert isinstance(document, dict) and set(document) == {"groups"}
    groups = document["groups"]
    assert isinstance(groups, list) and groups
    names = [group["name"] for group in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    rules: list[dict[str, Any]] = []
    for group in groups:
        assert set(group) <= _GROUP_KEYS and isinstance(group["name"], str)
        assert isinstance(group["rules"], list) and group["rules"]
        rules += group["rules"]
    return rules


def test_the_alert_rules_have_prometheus_rule_structure() -> None:
    rules = alert_rules()
    for rule in rules:
        assert set(rule) <= _RULE_KEYS, rule
        assert ("alert" in rule) != ("record" in rule), rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule.get("alert", rule.get("record")))
        for key in ("for", "keep_firing_for"):
            if key in rule:
                assert _DURATION.match(rule[key]), rule[key]
        for key in ("labels", "annotations"):
            mapping = rule.get(key, {})
            assert isinstance(mapping, dict)
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    alerts = [rule["alert"] for rule in rules]
    assert len(alerts) == len(set(alerts))


def test_the_alert_rules_name_only_exported_metrics(exported: Exported) -> None:
    rules = alert_rules()
    found = {rule["alert"]: problems(rule["expr"], exported) for rule in rules}
    assert {alert: p for alert, p in found.items() if p} == {}
    # The four conditions an operator must hear about.
    named = set().union(*(read_promql(rule["expr"]).names for rule in rules))
    assert {
        "esprelay_spool_oldest_message_age_seconds",  # mail stuck in the queue
        "esprelay_provider_circuit_state",  # a provider failing
        "esprelay_deliveries_total",  # failure ratio; nothing delivered
        "esprelay_spool_depth",  # ...while the queue grows
    } <= named


def test_promtool_accepts_the_rules_and_the_exposition(exported: Exported, tmp_path: Path) -> None:
    """Prometheus's own checker, where it is installed (Debian's ``prometheus``)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus); optional")
    rules = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The dashboard's queries, as recording rules, with Grafana's variables filled in.
    records = [
        {
            "record": f"esprelay:dashboard:{number}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$", ""),
        }
        for number, expr in enumerate(dashboard_queries().values())
        if "label_values(" not in expr
    ]
    queries = tmp_path / "dashboard-queries.yml"
    queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = subprocess.run(
        [promtool, "check", "rules", str(queries)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    metrics = subprocess.run(
        [promtool, "check", "metrics"],
        input=exported.text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert metrics.returncode == 0, metrics.stdout + metrics.stderr


# --- the dashboard -------------------------------------------------------------------


def dashboard_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard (panels and variables), by where it is."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries[f"variable {variable['name']}"] = variable["definition"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries[f"{panel['title']} {target['refId']}"] = target["expr"]
    return queries


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "esprelay" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
            assert all(target["expr"].strip() for target in panel["targets"])


def test_the_dashboard_names_only_exported_metrics(exported: Exported) -> None:
    queries = dashboard_queries()
    found = {where: problems(expr, exported) for where, expr in queries.items()}
    assert {where: p for where, p in found.items() if p} == {}
    named = set().union(*(read_promql(expr).names for expr in queries.values()))
    assert {
        "esprelay_spool_depth",
        "esprelay_spool_oldest_message_age_seconds",
        "esprelay_deliveries_total",
        "esprelay_provider_circuit_state",
        "esprelay_smtp_auth_failures_total",
        "esprelay_dsns_total",
        "esprelay_provider_throttled_total",
        "esprelay_provider_throttle_deferred_total",
        "esprelay_delivery_latency_seconds_bucket",
        "esprelay_build_info",
    } <= named
