"""The params gate: all of params.yaml checked before DVC runs (and so before it empties) any stage.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that rejects its
own params has already lost its previous results by then. The `params` stage comes first in
dvc.yaml: it loads every section (pgolf.config: no missing, unknown or mistyped key, every range
check of the section's owner module), then writes one JSON file per section under `artifacts/params/`.
Every other stage depends on the files of its sections, so a bad value stops `dvc repro` /
`dvc exp run` at this cheap stage with every earlier output intact; and a section's file changes
only when that section's values do, so a `quantize.*` change still never reruns `train`.
"""

from __future__ import annotations

from pathlib import Path

from pgolf import config
from pgolf.shared import layout
from pgolf.shared.io import write_json

def check(doc: dict, source: str = "params.yaml") -> dict:
    """{section: dataclass} of a params document whose every value each stage accepts."""
    return {s: config.from_doc(doc, s, source) for s in config.SECTIONS}


def run(params: str | Path = "params.yaml", out_dir: str | Path = layout.PARAMS) -> dict:
    """Check `params` and write `<out_dir>/<section>.json` (its validated values) per section."""
    cfgs = check(config.read_doc(params), str(params))
    for section, cfg in cfgs.items():
        write_json(Path(out_dir) / layout.params_file(section).name, config.to_dict(cfg))
    return cfgs
