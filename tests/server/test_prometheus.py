"""A real Prometheus (Debian's package, installed by ``make test``) scrapes a running server with the shipped rules
(``deploy/prometheus/deltaserve-rules.yml``); per-task request rate, TTFT quantiles, routing shares and resident
deltas are then read back through Prometheus's HTTP API, and every query of the Grafana dashboard
(``deploy/grafana/deltaserve-dashboard.json``) runs against it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "deltaserve-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "deltaserve-dashboard.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(prom: str, expr: str) -> list[dict]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def _until(prom: str, expr: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if result := _query(prom, expr):
                return result
        except urllib.error.URLError:  # Prometheus still starting
            pass
        assert time.monotonic() < deadline, f"no result for {expr!r} after {timeout} s"
        time.sleep(0.5)


def test_promtool_accepts_the_shipped_rules():
    out = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_prometheus_scrapes_the_server_and_the_rules_give_per_task_figures(server, tmp_path):
    from deltaserve.client.sync import DeltaClient

    assert shutil.which("prometheus"), "Debian's prometheus package is installed by `make test`"
    target = urlparse(server.http).netloc
    config = tmp_path / "prometheus.yml"
    # Rules evaluated every second here (the shipped interval is 15 s) so that the test waits seconds, not minutes.
    rules = tmp_path / "rules.yml"
    rules.write_text(RULES.read_text().replace("interval: 15s", "interval: 1s"))
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(rules))}]\n"
        "scrape_configs:\n"
        f"  - job_name: deltaserve\n    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
    )
    port = _free_port()
    prom = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _until(prom, 'up{job="deltaserve"} == 1')
        with DeltaClient(server.grpc) as client:  # traffic while Prometheus watches: base + auto-routed, streamed
            for i in range(40):
                for _ in client.generate_stream(f"Say something {i}.", task=server.base_name, max_tokens=4):
                    pass
                client.generate(f"What is the opposite of hot? {i}", task="auto", max_tokens=2)
                time.sleep(0.05)

        rate = _until(prom, f'deltaserve:requests:rate1m{{task="{server.base_name}", outcome="ok"}} > 0')
        assert float(rate[0]["value"][1]) > 0, rate
        ttft = _until(prom, f'deltaserve:ttft_seconds:p95_5m{{task="{server.base_name}"}} >= 0')
        assert 0 <= float(ttft[0]["value"][1]) < 60, ttft
        shares = _until(prom, "deltaserve:routing_share:rate5m")
        assert abs(sum(float(s["value"][1]) for s in shares) - 1) < 1e-6, shares
        with urllib.request.urlopen(f"{server.http}/v1/deltas", timeout=10) as resp:
            registered = len(json.loads(resp.read())["deltas"])
        resident = _until(prom, "deltaserve:registered_deltas")
        assert float(resident[0]["value"][1]) == registered, (resident, registered)
        assert not _query(prom, 'ALERTS{alertname="DeltaserveDown"}')

        # Every query of the shipped Grafana dashboard runs; the deltaserve panels the traffic above feeds show data.
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
        results = {expr: _query(prom, expr) for expr in exprs}
        fed = ("requests:rate1m", "generated_tokens", "ttft_seconds", "latency_seconds", "routing_share", "registered")
        empty = [e for e, r in results.items() if any(f in e for f in fed) and 'outcome="error"' not in e and not r]
        assert not empty, empty
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("prometheus did not stop on SIGTERM")


def test_the_kubernetes_example_scrapes_the_port_the_server_serves_metrics_on():
    import yaml

    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "deltaserve.yaml").read_text())}
    assert set(docs) == {"Deployment", "PersistentVolumeClaim", "Service", "ServiceMonitor"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 50051}  # the Dockerfile's CMD
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    (endpoint,) = docs["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in docs["Service"]["spec"]["ports"]}
