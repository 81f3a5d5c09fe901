"""The train stage's outputs, `artifacts/train/`: the contract between train and quantize.

This module owns those files, their names, tensorfile kinds, writers and readers, so that the
writer (pgolf.train.train, pgolf.train.hessian) and the reader (pgolf.quantize.quantize) share one definition:

* `model.pgt` (kind "float_weights"): the averaged float weights, meta {model, train_seq_len,
  qat_quantile, qat_bits, tokenizer} (`model_meta` makes it; `model_config` reads its `model`
  section back through pgolf.config's loader, here and from the artifact that copies it);
* `hessians.pgt` (kind "hessians"): per quantizable matrix the (n, n) fp32 mean of x^T x over
  the rows that fed it, meta {rows, accumulations, world_size}; `validate_hessians` is the one
  check of them, run by training before it writes and by quantize when it reads;
* `train.log`: the run's log text.

It is not training code: quantize depends on it, and it imports nothing of training. The folder
is pgolf.shared.layout.TRAIN; this module owns the names of the files in it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pgolf import config
from pgolf.shared import tensorfile

MODEL_FILE = "model.pgt"
MODEL_KIND = "float_weights"
HESSIANS_FILE = "hessians.pgt"
HESSIANS_KIND = "hessians"
LOG_FILE = "train.log"
HESSIAN_META_KEYS = ("rows", "accumulations", "world_size")


class HessianError(ValueError):
    """Hessians that are missing, mis-shaped or not a valid Gram matrix (NaN, negative diagonal)."""


def model_meta(mcfg: config.ModelConfig, train_seq_len: int, qat_quantile: float, qat_bits: int,
               tokenizer: dict) -> dict:
    """The model.pgt meta: the model section, where the NTK RoPE rule starts, training's QAT clip
    quantile and bits, the tokenizer's sha256 and vocabulary size (tokenizer.json)."""
    return {"model": config.to_dict(mcfg), "train_seq_len": train_seq_len, "qat_quantile": qat_quantile,
            "qat_bits": qat_bits, "tokenizer": {"sha256": tokenizer["sha256"], "vocab_size": int(tokenizer["vocab_size"])}}


def model_config(meta: dict, source: str) -> config.ModelConfig:
    """The `model` section of a model.pgt (or artifact) meta, every key and value checked by
    pgolf.config's loader; ConfigError naming `source`."""
    if not isinstance(meta.get("model"), dict):
        raise config.ConfigError(f"{source}: meta lacks the 'model' section")
    return config.from_doc(meta, "model", f"{source} meta")


def save_weights(path: str | Path, weights: dict[str, torch.Tensor], meta: dict) -> int:
    return tensorfile.save(path, weights, kind=MODEL_KIND, meta=meta)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, meta) of a `model.pgt`."""
    tensors, header = tensorfile.load(path, kind=MODEL_KIND)
    return tensors, header["meta"]


def save_hessians(path: str | Path, hessians: dict[str, torch.Tensor], meta: dict) -> int:
    """Write `hessians.pgt` (fp32 tensors, meta {rows, accumulations, world_size})."""
    return tensorfile.save(path, {n: t.float().contiguous() for n, t in hessians.items()}, kind=HESSIANS_KIND,
                           meta={k: meta[k] for k in HESSIAN_META_KEYS})


def load_hessians(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(hessians, meta) of a `hessians.pgt`."""
    tensors, header = tensorfile.load(path, kind=HESSIANS_KIND)
    return tensors, header["meta"]


def validate_hessians(hessians: dict[str, torch.Tensor], shapes: dict[str, int], source: str = "hessians",
                      optional: dict[str, int] | None = None) -> None:
    """One Hessian per name of `shapes` (name -> n), others only for names of `optional` (quantize:
    any other 2-D weight, which then gets full GPTQ); each (n, n) fp32, finite, symmetric (to fp32
    matmul rounding), diagonal >= 0 and not all zero. HessianError naming `source` and the tensor."""
    missing = [n for n in shapes if n not in hessians]
    if missing:
        raise HessianError(f"{source}: missing Hessian for {len(missing)} matrix(es), e.g. {missing[0]}")
    allowed = {**(optional or {}), **shapes}
    extra = sorted(set(hessians) - set(allowed))
    if extra:
        raise HessianError(f"{source}: Hessian for unknown matrix {extra[0]!r}")
    for name, h in hessians.items():
        _check_gram(h, name, allowed[name], source)


def _check_gram(h: torch.Tensor, name: str, k: int, source: str) -> None:
    if tuple(h.shape) != (k, k) or h.dtype != torch.float32:
        raise HessianError(f"{source}: {name} is {h.dtype} {tuple(h.shape)}, expected float32 ({k}, {k})")
    if not torch.isfinite(h).all():
        raise HessianError(f"{source}: {name} has non-finite entries (diverged training?)")
    d = torch.diagonal(h)
    scale = float(d.abs().max())
    if scale <= 0:
        raise HessianError(f"{source}: {name} has an all-zero diagonal (its input was always zero)")
    if float(d.min()) < -1e-6 * scale:
        raise HessianError(f"{source}: {name} has a negative diagonal entry {float(d.min()):.3e}")
    if float((h - h.T).abs().max()) > 1e-4 * scale:
        raise HessianError(f"{source}: {name} is not symmetric")
