"""Checks of the metrics the node writes for Prometheus."""

from __future__ import annotations

import re


def assert_prometheus_text(text: str) -> None:
    """Prometheus' text exposition format, as node_exporter's textfile collector parses it: every sample's
    metric declared (HELP, TYPE) before it, names and labels well formed, values numbers."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]\w*="[^"\\\n]*"(,[a-zA-Z_]\w*="[^"\\\n]*")*\})? '
                        r'(-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)$')
    declared: dict[str, set[str]] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            declared.setdefault(line.split()[2], set()).add(line.split()[1])
            continue
        m = sample.match(line)
        assert m is not None, line
        assert declared.get(m.group(1)) == {"HELP", "TYPE"}, line
