"""`section.key=value` overrides of a params file (YAML values), as the benches take them
(`bench.ablate --common` and its rows, `bench.profile_train --set`, `bench.bench_vs_ref --also`):
parsed from the command line, and applied to a params document."""

from __future__ import annotations

import copy

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


def apply(params: dict, sets: dict[str, object], where: str, source: str) -> None:
    """Write {"section.key": value} into the params document `params` in place; ValueError naming
    `where` (the flag or row that set it) when a key is not one of `source`'s."""
    for dotted, value in sets.items():
        section, _, key = dotted.partition(".")
        if key not in (params.get(section) or {}):
            raise ValueError(f"{where}: {dotted!r} is not a key of {source}")
        params[section][key] = copy.deepcopy(value)
