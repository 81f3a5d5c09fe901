"""The artifact's tensors back to float weights: the quantize stage's quant table, inverted.

This module owns `dequantize_state`: for every entry of meta["quant"], int6/int8 codes times their
row scales (pgolf.shared.rowquant), plus the LQER term when the entry has one
(pgolf.quantize.lqer), or a passthrough tensor as fp32; every stored tensor must belong to an
entry. A table the tensors do not fit is an ArtifactError (pgolf.compress.artifact).
"""

from __future__ import annotations

import torch

from pgolf.compress.artifact import ArtifactError
from pgolf.shared.rowquant import dequantize


def dequantize_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Float (fp32) state dict for `GPT.load_export_state_dict`, following meta["quant"]."""
    quant = meta.get("quant")
    if not isinstance(quant, dict):
        raise ArtifactError("artifact meta has no 'quant' table")
    out, used = {}, set()
    for name, info in quant.items():
        kind = info.get("type") if isinstance(info, dict) else info
        if kind in ("int6", "int8"):
            out[name] = _codes(tensors, name, kind, info, used)
        elif kind in ("passthrough", "passthrough_ctrl"):
            if name not in tensors:
                raise ArtifactError(f"artifact: passthrough tensor {name!r} missing")
            out[name] = tensors[name].float()
            used.add(name)
        else:
            raise ArtifactError(f"artifact: tensor {name!r} has unknown quant type {kind!r}")
    extra = sorted(set(tensors) - used)
    if extra:
        raise ArtifactError(f"artifact: tensors without a quant entry: {extra[:5]}")
    return out


def _codes(tensors: dict[str, torch.Tensor], name: str, kind: str, info, used: set[str]) -> torch.Tensor:
    """The fp32 weight of the int6/int8 entry `name` (+ its LQER term); adds the tensors read to `used`."""
    q, s = tensors.get(f"{name}.q"), tensors.get(f"{name}.scale")
    if q is None or s is None:
        raise ArtifactError(f"artifact: {kind} tensor {name!r} lacks its .q or .scale")
    if q.dim() != 2 or s.shape != (q.shape[0],):
        raise ArtifactError(f"artifact: {name!r} codes {tuple(q.shape)} / scale {tuple(s.shape)} mismatch")
    w = dequantize(q, s)
    used.update((f"{name}.q", f"{name}.scale"))
    if isinstance(info, dict) and "lqer" in info:  # a quantize.lqer_enabled artifact: lqer imported only then
        from pgolf.quantize import lqer

        w = w + _lqer_correction(tensors, name, tuple(q.shape), info["lqer"])
        used.update(name + x for x in lqer.SUFFIXES)
    return w


def _lqer_correction(tensors: dict[str, torch.Tensor], name: str, shape: tuple, info) -> torch.Tensor:
    """The LQER term of `name` (pgolf.quantize.lqer) named by its quant entry's {"rank", "bits"}, or
    of the asymmetric form {"rank", "form": "asym", "group"}."""
    from pgolf.quantize import lqer

    rank = info.get("rank") if isinstance(info, dict) else None
    if not isinstance(rank, int) or rank < 1:
        raise ArtifactError(f"artifact: tensor {name!r} has a bad LQER entry {info!r}")
    form, group = info.get("form"), info.get("group")
    if form not in (None, lqer.ASYM) or (form == lqer.ASYM and (not isinstance(group, int) or group < 1)):
        raise ArtifactError(f"artifact: tensor {name!r} has a bad LQER entry {info!r}")
    try:
        return lqer.correction_for(tensors, name, shape, info)
    except lqer.LQERError as e:
        raise ArtifactError(f"artifact: {e}") from None
