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
    root = Path(root)
    path = root / layout.params_file(section)
    try:
        cfg = config.restore(section, read_json(path), str(path))
    except MetricsError:
        raise config.ConfigError(f"{path}: no checked values of section '{section}' (run `dvc repro`, or "
                                 f"`python -m stages.params` first)") from None
    _refuse_stale(cfg, root / "params.yaml", path)
    return cfg


def read_all(sections, root: str | Path = ".") -> dict:
    """{section: dataclass} of several sections (`read` each)."""
    return {s: read(s, root) for s in sections}


def _refuse_stale(cfg: config.Section, params: Path, path: Path) -> None:
    """ConfigError when params.yaml now says otherwise than the gate's file (no params.yaml: nothing to compare)."""
    if not params.is_file():
        return
    try:
        current = config.restore(cfg.name, config.read_doc(params).get(cfg.name), str(params))
    except config.ConfigError:
        current = None
    if current != cfg:
        raise config.ConfigError(f"{path}: older than the '{cfg.name}' section of {params} (run `dvc repro`, or "
                                 f"`python -m stages.params` first)")
