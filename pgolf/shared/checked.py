"""The checked values of params.yaml, `artifacts/params/<section>.json`: the params gate writes one
file per section (pgolf.params.params), and every stage reads its sections from there instead of
parsing and checking params.yaml again. This module owns those files.

`read` types the values again (lists become tuples) but runs no range check: the gate did. It
refuses a file that params.yaml has since contradicted (a stage run by hand after an edit).
"""

from __future__ import annotations

from pathlib import Path

from pgolf import config
from pgolf.shared import layout
from pgolf.shared.io import MetricsError, read_json, write_json


def write(cfgs: dict, root: str | Path = ".") -> None:
    """artifacts/params/<section>.json under `root` for every {section: dataclass} of `cfgs`."""
    for section, cfg in cfgs.items():
        write_json(Path(root) / layout.params_file(section), config.to_dict(cfg))


def read(section: str, root: str | Path = ".") -> config.Section:
    """The checked values of `section` from artifacts/params/<section>.json under `root`."""
    return read_all((section,), root)[section]


def read_all(sections, root: str | Path = ".") -> dict:
    """{section: dataclass} of several sections, params.yaml read once to refuse stale files."""
    root = Path(root)
    params = root / "params.yaml"
    now = config.read_doc(params) if params.is_file() else None  # no params.yaml: nothing to compare
    return {s: _read(s, root, now, params) for s in sections}


def _read(section: str, root: Path, now: dict | None, params: Path) -> config.Section:
    path = root / layout.params_file(section)
    try:
        cfg = config.restore(section, read_json(path), str(path))
    except MetricsError:
        raise config.ConfigError(f"{path}: no checked values of section '{section}' (run `dvc repro`, or "
                                 f"`python -m stages.params` first)") from None
    if now is not None and cfg != _restored(section, now, params):
        raise config.ConfigError(f"{path}: older than the '{section}' section of {params} (run `dvc repro`, or "
                                 f"`python -m stages.params` first)")
    return cfg


def _restored(section: str, doc: dict, params: Path) -> config.Section | None:
    """params.yaml's `section` typed as the gate types it, None when it is not even that."""
    try:
        return config.restore(section, doc.get(section), str(params))
    except config.ConfigError:
        return None
