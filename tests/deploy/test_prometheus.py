"""The service's metrics through a real Prometheus (Debian's `prometheus` package; .ci/run
installs it): `anchorcredit serve` as a process, Prometheus scraping it every second with the
alert rules loaded, real scoring and a real weight push. Checked through Prometheus's HTTP API:
the series exist with the values the traffic implies, every dashboard query parses and returns
data, every alert rule evaluates without error over series that exist; and
`promtool check metrics` accepts the /metrics text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anchorcredit.client import CreditClient

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
SCRAPE_S = 1.0


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:  # a skip locally; CI installs it and forbids the skip (tests/conftest.py)
        pytest.skip(f"{name} is not installed (apt-get install -y prometheus)")
    return exe


class Prometheus:
    """A private Prometheus on loopback scraping one target, its rules loaded."""

    def __init__(self, tmp: Path, target: str, port: int) -> None:
        config = tmp / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "1s"},
                    "rule_files": [str(MONITORING / "alerts.rules.yaml")],
                    "scrape_configs": [
                        {"job_name": "anchorcredit", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # a bad query answers 400 with its error
            body = json.load(e)
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait(self, what: str, ok: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except (OSError, AssertionError):
                pass  # not up yet, or the series not scraped yet
            assert self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.2)
        raise AssertionError(f"Prometheus: {what} within {timeout_s} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def prometheus(tmp_path: Path, free_port: Any) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path, target, free_port()))
        started[-1].wait("ready", lambda: urllib.request.urlopen(started[-1].url + "/-/ready"))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def _dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]


def _as_prometheus_sees_it(expr: str) -> str:
    """Grafana's variables as a run of this test binds them (all jobs, a window of several
    one-second scrapes)."""
    return expr.replace("$__rate_interval", "30s").replace('"$job"', '".*"')


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(anchorcredit_[a-z_]+|up)\b(?=\s*[{\[)])", expr))


def _traffic(target: str, model: Path) -> None:
    """Score with three strategies, one bad request, a weight push, then score again."""
    from safetensors.numpy import load_file

    from anchorcredit.client.errors import CreditServiceError

    client = CreditClient([target], cache=None, timeout_s=60, admin_token="admin-t0ken")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 200, 6).tolist() for _ in range(4)]
    responses = [rng.integers(0, 200, n).tolist() for n in (5, 12, 40, 64)]
    for strategy in ("coupled_rhythm", "global_anchor", "local_chunk"):
        client.score(prompts, responses, strategy=strategy)
    with pytest.raises(CreditServiceError, match="INVALID_ARGUMENT"):
        client.score([[1]], [[10**6]])  # outside the vocabulary: INVALID_ARGUMENT
    weights = {}
    for f in sorted(model.glob("*.safetensors")):
        weights.update({k: v * 1.01 for k, v in load_file(str(f)).items()})
    client.push_weights(weights, version="step-1")
    client.score(prompts, responses, strategy="coupled_rhythm")
    client.close()


@pytest.mark.slow
def test_metrics_dashboard_and_alerts_through_a_real_prometheus(
    llama_model: Path, tmp_path: Path, serve_process: Any, prometheus: Any
) -> None:
    _tool("prometheus")
    promtool = _tool("promtool")
    model = llama_model
    server = serve_process(
        "--model",
        str(model),
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--metrics-host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        ANCHORCREDIT_ADMIN_TOKEN="admin-t0ken",
    )
    m = server.wait_for(r"gRPC on 127\.0\.0\.1:(\d+) .* metrics on 127\.0\.0\.1:(\d+)")
    port, metrics_port = int(m.group(1)), int(m.group(2))
    server.wait_for(r"loaded in")
    prom = prometheus(f"127.0.0.1:{metrics_port}")
    prom.wait("the first scrape", lambda: prom.value("up") == 1)

    _traffic(f"127.0.0.1:{port}", model)
    # Two scrapes after the last request: every counter has its final value in Prometheus.
    prom.wait(
        "the final counts",
        lambda: (
            prom.value('sum(anchorcredit_credit_responses_total{strategy="coupled_rhythm"})') == 8
        ),
    )
    time.sleep(2 * SCRAPE_S + 0.5)

    assert prom.value('anchorcredit_credit_responses_total{strategy="global_anchor"}') == 4
    assert prom.value('anchorcredit_credit_gamma_count{strategy="local_chunk"}') == 121
    assert prom.value('anchorcredit_policy_info{version="step-1"}') == 1
    assert prom.value('anchorcredit_weight_updates_by_transport_total{transport="stream"}') == 1
    assert prom.value('anchorcredit_request_failures_total{reason="invalid_argument"}') == 1
    assert prom.value("anchorcredit_policy_versions_scored_recent") == 2
    assert prom.value("anchorcredit_policy_seconds_since_change") < 60
    assert prom.value("anchorcredit_queue_capacity") == 256
    assert prom.value("anchorcredit_ready") == 1
    assert prom.value("sum(anchorcredit_sequences_total)") == 16

    empty = []
    for title, expr in _dashboard_queries():
        if not prom.query(_as_prometheus_sees_it(expr)):
            empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    prom.wait(
        "a rule evaluation", lambda: all(g["lastEvaluation"][:4] != "0001" for g in _groups(prom))
    )
    names_seen = {
        s["__name__"] for s in prom.api("series", **{"match[]": '{job="anchorcredit"}'})["data"]
    }
    for group in _groups(prom):
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
            prom.query(rule["query"])  # parses
            missing = _metric_names(rule["query"]) - names_seen - {"up"}
            assert not missing, (
                f"{rule['name']} reads series the service does not export: {missing}"
            )
            assert rule["state"] == "inactive", rule["name"]  # a healthy run fires nothing

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def _groups(prom: Prometheus) -> list[dict[str, Any]]:
    groups = prom.api("rules")["data"]["groups"]
    assert {g["name"] for g in groups} == {
        "anchorcredit.serving",
        "anchorcredit.credit",
        "anchorcredit.device",
    }
    return groups
