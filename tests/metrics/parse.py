"""Parses a /metrics body from stdin with the Prometheus project's own Python parsers and
prints the families as JSON: {name: {"type": ..., "samples": [[name, labels, value], ...]}}.

argv[1]: "openmetrics" (the strict OpenMetrics parser) or "prometheus" (the text 0.0.4 parser).
Exits non-zero on a parse error.
"""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus

parse = {"openmetrics": openmetrics, "prometheus": prometheus}[sys.argv[1]]
out = {}
for family in parse(sys.stdin.read()):
    if family.name in out:
        raise SystemExit(f"family {family.name} appears twice")
    out[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
print(json.dumps(out))
