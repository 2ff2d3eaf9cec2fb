"""Checks of the metrics the node writes for Prometheus."""

from __future__ import annotations

import re


def assert_prometheus_text(text: str) -> None:
    """Prometheus' text exposition format, as node_exporter's textfile collector parses it: every sample's
    metric declared (HELP, TYPE) before it, names and labels well formed, values numbers. A summary's
    family ``x`` holds the samples ``x{quantile=...}``, ``x_sum`` and ``x_count``."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]\w*="[^"\\\n]*"(,[a-zA-Z_]\w*="[^"\\\n]*")*\})? '
                        r'(-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)$')
    declared: dict[str, set[str]] = {}
    types: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            declared.setdefault(line.split()[2], set()).add(line.split()[1])
            if line.startswith("# TYPE "):
                types[line.split()[2]] = line.split()[3]
            continue
        m = sample.match(line)
        assert m is not None, line
        name = m.group(1)
        family = re.sub(r"_(sum|count)$", "", name)
        if name != family and types.get(family) == "summary":
            assert m.group(2) is None, line  # _sum and _count carry no quantile
            name = family
        elif types.get(name) == "summary":
            assert m.group(2) is not None and m.group(2).startswith('{quantile="'), line
        assert declared.get(name) == {"HELP", "TYPE"}, line
