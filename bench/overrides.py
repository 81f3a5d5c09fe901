"""`section.key=value` command-line overrides of a params file (YAML values), as the benches take
them (`bench.ablate --common`, `bench.profile_train --set`, `bench.bench_vs_ref --also`)."""

from __future__ import annotations

import yaml


def parse(items: list[str], flag: str) -> dict[str, object]:
    """["train.iterations=5", ...] -> {"train.iterations": 5, ...}; ValueError naming `flag` and the
    item when one is not section.key=value."""
    out: dict[str, object] = {}
    for item in items:
        dotted, eq, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not (eq and dot and section and key):
            raise ValueError(f"{flag} {item!r}: want section.key=value")
        out[dotted] = yaml.safe_load(value)
    return out
