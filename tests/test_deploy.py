"""deploy/: the Grafana dashboard and the Prometheus recording rules name only metrics kv3d
exports. Each PromQL expression is checked for balanced brackets and quotes, its metric
names (``kv3d_...``) must be samples of kv3d's registry (kv3d_core/metrics.py, as /metrics
serves them: counters with ``_total``, histograms with ``_bucket``/``_count``/``_sum``), and
its recorded names (``kv3d:...``) must be recorded by the rules file. No model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kv3d_core.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "kv3d-rules.yml"
GRAFANA = DEPLOY / "grafana" / "kv3d-dashboard.json"
METRIC = re.compile(r"\b(kv3d_[a-zA-Z0-9_]+)\b")
RECORDED = re.compile(r"\b(kv3d:[a-zA-Z0-9_:]+)\b")


def exported() -> set[str]:
    """Every sample name kv3d's registry can serve."""
    names = set()
    for fam in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
        for s in suffixes.get(fam.type, [""]):
            names.add(fam.name + s)
    return names


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def expressions() -> list[tuple[str, str]]:
    out = [(f"rule {r['record']}", r["expr"]) for r in rules()]
    for p in json.loads(GRAFANA.read_text())["panels"]:
        out += [(f"panel {p['title']!r}", t["expr"]) for t in p["targets"]]
    return out


def balanced(expr: str) -> bool:
    stack, pairs, quote = [], {")": "(", "]": "[", "}": "{"}, None
    for ch in expr:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs:
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and quote is None


@pytest.mark.parametrize("where, expr", expressions())
def test_every_expression_names_metrics_kv3d_exports(where, expr):
    assert balanced(expr), f"{where}: unbalanced brackets or quotes in {expr!r}"
    names = METRIC.findall(expr) + RECORDED.findall(expr)
    assert names, f"{where}: {expr!r} names no kv3d metric"
    missing = set(METRIC.findall(expr)) - exported()
    assert not missing, f"{where}: kv3d exports no {sorted(missing)}"
    unrecorded = set(RECORDED.findall(expr)) - {r["record"] for r in rules()}
    assert not unrecorded, f"{where}: no rule records {sorted(unrecorded)}"


def test_the_dashboard_is_grafana_json():
    dash = json.loads(GRAFANA.read_text())
    assert dash["uid"] and dash["panels"] and all(p["targets"] for p in dash["panels"])
