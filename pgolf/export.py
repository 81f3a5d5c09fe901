"""Export a finished run as a challenge records folder (README, submission.json, logs, code).

    python -m pgolf.export --out records/track_10min_16mb/2026-11-22_MyRun \
        --name "My run" --author "Jane Doe" --github-id jdoe --blurb "what changed"

Reads only the pipeline's outputs (metrics/*.json, params.yaml, artifacts/final/, the train log)
and refuses to export a run whose artifact is over the cap or whose metrics are missing.
The folder holds what a challenge pull request needs: README.md with the run's figures,
submission.json, the logs, the artifact and the code files counted toward the cap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

from pgolf.io import write_json, atomic_write_text
from pgolf.summary import render

NEEDED = ("prepare", "train", "quant", "size", "eval")


class ExportError(RuntimeError):
    pass


def load_metrics(root: Path) -> dict:
    out = {}
    for name in NEEDED:
        path = root / "metrics" / f"{name}.json"
        if not path.exists():
            raise ExportError(f"{path}: missing — run `dvc repro` first")
        out[name] = json.loads(path.read_text())
    return out


def submission(m: dict, name: str, author: str, github_id: str, blurb: str, date: str) -> dict:
    ev, size, train = m["eval"], m["size"], m["train"]
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "val_loss": ev["val_loss"], "val_bpb": ev["val_bpb"],
        "bytes_total": size["total_bytes"], "bytes_code": size["code_bytes"], "bytes_model": size["model_bytes"],
        "codec": size["codec"], "pre_quant_val_bpb": train.get("val_bpb_float"),
        "eval_stride": ev["stride"], "eval_context": ev["context"], "scored_tokens": ev["scored_tokens"],
        "steps": train["steps"], "train_seconds": train["train_seconds"], "world_size": train["world_size"],
        "quantize_seconds": m["quant"]["quantize_seconds"],
    }


def readme(sub: dict, m: dict, params_text: str, metrics_dir: Path) -> str:
    p = m["prepare"]
    return "\n".join([
        f"# {sub['name']}", "", sub["blurb"], "",
        f"**val_bpb {sub['val_bpb']:.5f}** (sliding window, context {sub['eval_context']}, stride {sub['eval_stride']}, "
        f"{sub['scored_tokens']:,} validation tokens scored once each)", "",
        "| figure | value |", "|---|---|",
        f"| val_loss (nats/token) | {sub['val_loss']:.5f} |",
        f"| pre-quantization val_bpb (non-sliding) | {sub['pre_quant_val_bpb']} |",
        f"| artifact total | {sub['bytes_total']:,} bytes (model {sub['bytes_model']:,} {sub['codec']} + code {sub['bytes_code']:,}) |",
        f"| training | {sub['steps']} steps in {sub['train_seconds']:.1f} s on {sub['world_size']} GPU(s) |",
        f"| GPTQ + pruning | {sub['quantize_seconds']:.1f} s |",
        f"| data | {p['train_tokens']:,} train tokens ({p['train_docs']:,} docs), {p['val_tokens']:,} val tokens |",
        "", "Produced by the pgolf DVC pipeline (`dvc repro`). Run summary:", "", "```",
        render(metrics_dir), "```", "", "Parameters of the run (`params.yaml`):", "", "```yaml",
        params_text.rstrip(), "```", "",
    ])


def export(root: Path, out: Path, name: str, author: str, github_id: str, blurb: str, force: bool = False) -> Path:
    m = load_metrics(root)
    if not m["size"]["under_cap"]:
        over = m["size"]["total_bytes"] - m["size"]["cap_bytes"]
        raise ExportError(f"metrics/size.json: artifact is over the cap by {over:,} bytes; not exporting")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: exists and is not empty (use --force to overwrite)")
    final = root / "artifacts" / "final"
    code = json.loads((final / "code_files.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    sub = submission(m, name, author, github_id, blurb, dt.date.today().isoformat())
    write_json(out / "submission.json", sub)
    atomic_write_text(out / "README.md", readme(sub, m, (root / "params.yaml").read_text(), root / "metrics"))
    shutil.copy2(final / "model.ptz", out / "model.ptz")
    for entry in code["files"]:
        (out / "code" / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / entry["path"], out / "code" / entry["path"])
    shutil.copy2(root / "params.yaml", out / "params.yaml")
    for log in (root / "artifacts" / "train").glob("*.log"):
        shutil.copy2(log, out / log.name)
    for name_ in NEEDED:
        shutil.copy2(root / "metrics" / f"{name_}.json", out / f"metrics_{name_}.json")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export a finished run as a challenge records folder.")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", default="")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = export(Path("."), a.out, a.name, a.author, a.github_id, a.blurb, a.force)
    except (ExportError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}/ (README.md, submission.json, model.ptz, code/, logs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
