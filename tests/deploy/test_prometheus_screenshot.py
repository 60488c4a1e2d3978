"""deploy/prometheus/screenshot.py (``make prom-screenshot``): the ``prometheus.yml`` it writes
passes ``promtool check config`` (its rule files load, its TLS files exist), scrapes every second
over TLS with the read-only scraper's certificate, and the graph queries it screenshots are valid
PromQL naming only metrics and recording rules that exist.  The screenshot run itself is not a
test."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.deploy.test_prometheus_rules import RULES, promtool
from virtmig.daemon.metrics import Metrics
from virtmig.daemon.registry import Registry
from virtmig.daemon.state import StateDir

SCRIPT = RULES / "screenshot.py"


def write_config(out: Path) -> Path:
    subprocess.run([sys.executable, str(SCRIPT), "--config-only", str(out)], check=True,
                   timeout=120)
    return out / "prometheus.yml"


def test_the_generated_config_passes_promtool(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout
    job = json.loads(config.read_text())["scrape_configs"][0]
    assert job["job_name"] == "virtmig"  # the rules' VirtmigDaemonDown names it
    assert job["scheme"] == "https"
    assert job["tls_config"]["cert_file"] == str(tmp_path / "pki" / "prometheus"
                                                 / "clientcert.pem")
    assert all(t.startswith("127.0.0.1:") for t in job["static_configs"][0]["targets"])


def panels() -> list[str]:
    """The PromQL expressions the script screenshots (its ``PANELS``)."""
    spec = importlib.util.spec_from_file_location("prom_screenshot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return [str(panel.expr) for panel in module.PANELS]


def test_the_graph_queries_are_valid_and_name_what_exists(tmp_path: Path) -> None:
    exprs = panels()
    assert len(exprs) == 2
    metrics = Metrics(Registry(StateDir(tmp_path)))
    exported = {line.split()[2] for line in metrics.scrape().decode().splitlines()
                if line.startswith("# TYPE ")}
    recorded = set(re.findall(r"record: (\S+)", (RULES / "virtmig-rules.yml").read_text()))
    for expr in exprs:
        # promtool checks PromQL in rules: the query as a recording rule of a scratch file
        rules = tmp_path / "q.yml"
        rules.write_text(json.dumps({"groups": [{"name": "q", "rules": [
            {"record": "q:q", "expr": expr}]}]}))
        done = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, expr + done.stdout + done.stderr
        for name in re.findall(r"\b(virtmig[_:][a-z_:0-9]+)", expr):
            base = re.sub(r"_(total|bucket|count|sum)$", "", name)
            assert name in recorded or base in exported, name
