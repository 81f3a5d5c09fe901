"""A small fake finished run (metrics, a real micro artifact, the packed script, dvc.lock, train log)
with known figures, for the export and rules self-check tests. Every rule passes on it as built;
tests change one figure to make one rule fail."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from conftest import tiny_model
from pgolf.compress import artifact, pack
from pgolf.params import params
from pgolf.shared import checked
from pgolf.config import CompressConfig
from pgolf.shared.io import file_sha256
from test_compress import quantized

ROOT = Path(__file__).resolve().parents[1]
FAST = CompressConfig(lzma_preset=6)
VAL_TOKENS = 300_001  # max_tokens 262,144 + context 256 windows -> 262,144 targets


def metrics(model_bytes: int, script: bytes, artifact_sha: str) -> dict:
    code = len(script)
    return {
        "prepare": {"vocab_size": 1024, "train_tokens": 1000, "val_tokens": VAL_TOKENS, "val_bytes": 1200,
                    "train_docs": 3, "val_docs": 2},
        "train": {"steps": 10, "train_seconds": 1.5, "tokens_per_second": 12345.0, "world_size": 1,
                  "val_bpb_float": 2.5, "peak_memory_mb": 0.0, "hessian_accumulations": 3, "hessian_rows": 768,
                  "device": "cpu"},
        "quant": {"int6_tensors": 4, "passthrough_tensors": 7, "quantize_seconds": 0.2},
        "size": {"codec": "lzma", "lzma_bytes": model_bytes, "zstd_bytes": model_bytes + 50,
                 "model_bytes": model_bytes, "code_bytes": code, "total_bytes": model_bytes + code,
                 "cap_bytes": 16_000_000, "under_cap": True, "code_count": "packed train_gpt.py", "pruned_values": 12,
                 "code_sha256": hashlib.sha256(script).hexdigest()},
        "eval": {"val_loss": 4.0, "val_bpb": 2.4, "stride": 64, "context": 256, "scored_tokens": 262_144,
                 "scored_bytes": 600_000, "eval_seconds": 0.3, "artifact_sha256": artifact_sha},
    }


def write_metrics(root: Path, m: dict) -> None:
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    for name, d in m.items():
        (root / "metrics" / f"{name}.json").write_text(json.dumps(d))


def update_metric(root: Path, name: str, **kv) -> None:
    path = root / "metrics" / f"{name}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **kv}))


def finished_run(root: Path) -> Path:
    """The fake run under `root` (the repo's sources and params.yaml, so the script regenerates)."""
    for rel in {*pack.PACKED_FILES, *pack.CODE_FILES}:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    shutil.copy2(ROOT / "params.yaml", root / "params.yaml")
    doc = yaml.safe_load((root / "params.yaml").read_text())
    lock = {"schema": "2.0", "stages": {s: {"cmd": f"python -m stages.{s}", "params": {"params.yaml": {s: doc[s]}}}
                                        for s in ("prepare", "train", "quantize", "compress", "evaluate")}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    final = root / "artifacts" / "final"
    final.mkdir(parents=True)
    tensors, meta = quantized(tiny_model())
    (final / "model.ptz").write_bytes(artifact.compress(artifact.serialize(tensors, meta), "lzma", FAST))
    params.run(root / "params.yaml", root)  # the gate: artifacts/params/<section>.json
    script = pack.build_script(root, checked.read_all(pack.BAKED_SECTIONS, root))
    (final / "train_gpt.py").write_bytes(script)
    files = pack.code_files(root)
    (final / "code_files.json").write_text(json.dumps({
        "script": "train_gpt.py", "bytes": len(script), "sha256": hashlib.sha256(script).hexdigest(),
        "eval_files_raw": {"files": files, "total": sum(f["bytes"] for f in files)}}))
    (root / "artifacts" / "train").mkdir()
    (root / "artifacts" / "train" / "train.log").write_text("step:1/10 train_loss:5.0\n")
    write_metrics(root, metrics((final / "model.ptz").stat().st_size, script, file_sha256(final / "model.ptz")))
    return root
