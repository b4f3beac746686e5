"""The alert rules (deploy/monitoring): promtool's unit tests pass, every alert has a case
where it fires and one where it must stay silent, and the Prometheus Operator's
PrometheusRule carries exactly the plain rules file's groups."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip(
    "yaml", reason="PyYAML not installed (pip install -e '.[dev]': kubernetes-validate brings it)"
)

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "alerts.rules.yaml"
TESTS = MONITORING / "alerts.test.yaml"


def _alerts() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"]]


def test_promtool_unit_tests_pass():
    promtool = shutil.which("promtool")
    if promtool is None:  # CI installs it (prometheus) and forbids the skip
        pytest.skip("promtool is not installed (apt-get install -y prometheus)")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(
        [promtool, "test", "rules", TESTS.name], cwd=MONITORING, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr


def _labels_of(series: str) -> dict[str, str]:
    body = series.split("{", 1)[1].rstrip("}")
    return dict(
        (k.strip(), v.strip().strip('"')) for k, v in (p.split("=", 1) for p in body.split(","))
    )


def test_every_alert_fires_somewhere_and_stays_silent_somewhere():
    """Firing: an expected alert. Silent: a case expecting none, or input series of an
    instance/strategy the expected alerts do not name (promtool compares the exact set)."""
    fires, silent = set(), set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        inputs = [_labels_of(s["series"]) for s in case["input_series"]]
        for check in case["alert_rule_test"]:
            expected = [a["exp_labels"] for a in check["exp_alerts"]]
            if expected:
                fires.add(check["alertname"])
            named = {
                (k, v) for e in expected for k, v in e.items() if k in ("instance", "strategy")
            }
            others = {
                (k, v) for s in inputs for k, v in s.items() if k in ("instance", "strategy")
            } - named
            keys = {k for e in expected for k in e if k in ("instance", "strategy")}
            if not expected or any(k in keys for k, _ in others):
                silent.add(check["alertname"])
    assert fires == set(_alerts()), set(_alerts()) - fires
    assert silent == set(_alerts()), set(_alerts()) - silent


def test_operator_rule_equals_the_plain_rules_file():
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["prometheusrule.yaml"]
    files = [f for g in kustomization["configMapGenerator"] for f in g["files"]]
    assert all((MONITORING / f).is_file() for f in files) and "dashboard.json" in files
