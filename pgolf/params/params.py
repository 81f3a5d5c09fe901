"""The params gate: params.yaml checked whole, then one file of checked values per section,
`artifacts/params/<section>.json` (pgolf.shared.checked), which is what the stages read.

DVC deletes a stage's outputs before it runs the stage's command, so a stage that rejected its own
params would already have lost its previous results. The `params` stage runs first: `run` loads
every section through pgolf.config (no missing, unknown or mistyped key, every range check, the
rules across sections) and asks for CUDA only where a `device` key says `cuda`. A bad value stops
`dvc repro` here, every output intact. A section's file changes only when its values do, so a
`quantize.*` change never reruns `train`. The checks that need the prepared data run in
pgolf.params.data_check, after prepare; the stages read the files through pgolf.shared.checked.
"""

from __future__ import annotations

from pathlib import Path

from pgolf import config
from pgolf.shared import checked


def check_devices(cfgs: dict) -> None:
    """ConfigError when a `device: cuda` key asks for CUDA on a machine without it (torch only then)."""
    wants = [f"{s}.device" for s, cfg in cfgs.items() if getattr(cfg, "device", None) == "cuda"]
    if not wants:
        return
    import torch

    if not torch.cuda.is_available():
        raise config.ConfigError(f"{', '.join(wants)} is cuda but CUDA is not available")


def run(params: str | Path = "params.yaml", root: str | Path = ".") -> dict:
    """Check `params` whole and write each section's checked values under `root` (pgolf.shared.checked)."""
    cfgs = config.load_all(config.read_doc(params), str(params))
    try:
        check_devices(cfgs)
    except config.ConfigError as e:
        raise config.ConfigError(f"{params}: {e}") from None
    checked.write(cfgs, root)
    return cfgs
