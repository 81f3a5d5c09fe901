"""Export a finished run as a challenge records folder: the packed train_gpt.py and what backs it.

    pgolf export --out records/track_10min_16mb/2026-12-02_MyRun \
        --name "My run" --author "Jane Doe" --github-id jdoe --blurb "what changed" [--seeds seeds/]

Reads only the pipeline's outputs (metrics/*.json, params.yaml, dvc.lock, artifacts/final/, the
train log) and writes: `train_gpt.py` (the packed script whose bytes were counted; it reruns the
whole recipe in the challenge's data layout), `requirements.txt` (the Python packages that script
imports with the run's params, pinned at the installed versions: pgolf.compress.pack.requirements),
`README.md`, `submission.json`,
`model.ptz` (the scored artifact), the train log, the metrics, `params.yaml`, `rules_check.txt`
(pgolf.submit.rules) and, with `--seeds`, the seed summary and every seed's log (pgolf.submit.seeds).

It refuses, before writing anything, a run that is not the one scored: an artifact whose sha256
differs from the one metrics/eval.json scored, a packed script that no longer regenerates from
the current sources and params (code or params changed), params.yaml values that differ from
those dvc.lock recorded for the stages, a run over the cap, a rule that fails, missing or
malformed metrics, a missing train log, or a code list naming files outside the counted set.
The folder is built in a temp folder beside `--out` and renamed into place: an error never
leaves a half-written folder, and nothing is written outside `--out`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import sys
from pathlib import Path

import yaml

from pgolf.shared import checked, layout, train_files
from pgolf.compress import artifact, pack
from pgolf.submit import rules
from pgolf.config import ConfigError
from pgolf.shared.io import atomic_write_text, file_sha256, staged_dir, write_json
from pgolf.submit.seeds import flatten, render as render_seeds
from pgolf.submit.summary import render

NEEDED = {
    "prepare": ("vocab_size", "train_tokens", "val_tokens", "train_docs"),
    "train": ("steps", "train_seconds", "world_size", "val_bpb_float"),
    "quant": ("quantize_seconds",),
    "size": ("codec", "model_bytes", "code_bytes", "total_bytes", "cap_bytes", "under_cap", "code_sha256"),
    "eval": ("val_loss", "val_bpb", "stride", "context", "scored_tokens", "artifact_sha256"),
}


class ExportError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- checks (nothing written)


def _read_json(path: Path):
    try:
        return rules.read_json(path)
    except rules.RulesError as e:
        raise ExportError(str(e)) from None


def load_metrics(root: Path) -> dict:
    out = {}
    for name, keys in NEEDED.items():
        try:
            out[name] = rules.read_metrics(root, name, keys)
        except rules.RulesError as e:
            raise ExportError(str(e)) from None
    return out


def check_artifact(root: Path, m: dict) -> Path:
    """artifacts/final/model.ptz is the file metrics/eval.json scored (sha256) and size.json counted."""
    path = root / layout.FINAL / artifact.MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{path}: artifact missing (run `dvc repro` or `dvc checkout`)")
    sha = file_sha256(path)
    if sha != m["eval"]["artifact_sha256"]:
        raise ExportError(f"{path}: sha256 {sha[:12]}… differs from the artifact metrics/eval.json scored "
                          f"({m['eval']['artifact_sha256'][:12]}…); rerun `dvc repro` before exporting")
    if path.stat().st_size != m["size"]["model_bytes"]:
        raise ExportError(f"{path}: {path.stat().st_size:,} bytes, metrics/size.json counted "
                          f"{m['size']['model_bytes']:,}; rerun `dvc repro`")
    return path


def check_params_locked(root: Path) -> None:
    """Every param value dvc.lock recorded for a stage equals params.yaml's now."""
    lock_path, params_path = root / "dvc.lock", root / "params.yaml"
    for p in (lock_path, params_path):
        if not p.is_file():
            raise ExportError(f"{p}: missing (export needs the run's dvc.lock and params.yaml)")
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
        params = yaml.safe_load(params_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{lock_path} or {params_path}: not valid YAML ({e})") from None
    for stage, entry in (lock.get("stages") or {}).items():
        recorded = (entry.get("params") or {}).get("params.yaml") or {}
        for key, value in flatten(recorded).items():
            now = _lookup(params, key)
            if _norm(now) != _norm(value):
                raise ExportError(f"params.yaml: {key} is {now!r} but the run was made with {value!r} (dvc.lock, "
                                  f"stage {stage}); rerun `dvc repro` or restore params.yaml")


def _norm(value):
    """YAML 1.1 (PyYAML) reads DVC's `1e-08` as a string: compare such values as numbers."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _lookup(doc: dict, dotted: str):
    node = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def check_script(root: Path, m: dict) -> bytes:
    """The packed train_gpt.py that was counted, regenerated now from the sources and params: same bytes."""
    listing_path = root / layout.FINAL / layout.CODE_FILES_FILE
    check_code_list(listing_path)
    counted = root / layout.FINAL / layout.SCRIPT_FILE
    if not counted.is_file():
        raise ExportError(f"{counted}: packed script missing (made by the compress stage; rerun `dvc repro`)")
    script = counted.read_bytes()
    want = m["size"]["code_sha256"]
    if _sha(script) != want or len(script) != m["size"]["code_bytes"]:
        raise ExportError(f"{counted}: not the script metrics/size.json counted; rerun `dvc repro`")
    try:
        now = pack.build_script(root, baked_configs(root))
    except pack.PackError as e:
        raise ExportError(str(e)) from None
    if now != script:
        raise ExportError(f"code or params changed since the run was scored: the packed {layout.SCRIPT_FILE} built "
                          f"from the current sources and params.yaml is {len(now):,} bytes (sha256 "
                          f"{_sha(now)[:12]}…), the counted one {len(script):,} ({want[:12]}…); rerun `dvc repro`")
    return script


def baked_configs(root: Path) -> dict:
    """The run's checked BAKED_SECTIONS (the params gate's artifacts/params/), or ExportError."""
    try:
        return checked.read_all(pack.BAKED_SECTIONS, root)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_code_list(path: Path) -> dict:
    """code_files.json names the packed script and only files of the counted evaluation set."""
    listing = _read_json(path)
    if not isinstance(listing, dict) or listing.get("script") != layout.SCRIPT_FILE:
        raise ExportError(f"{path}: does not name the packed {layout.SCRIPT_FILE} (written by an older compress stage?)")
    files = (listing.get("eval_files_raw") or {}).get("files") or []
    bad = [e.get("path") if isinstance(e, dict) else e for e in files
           if not isinstance(e, dict) or e.get("path") not in pack.CODE_FILES]
    if bad:
        raise ExportError(f"{path}: entry {bad[0]!r} is not one of the counted code files (pgolf.compress.pack.CODE_FILES)")
    return listing


def check_seeds(folder: Path) -> tuple[dict, list[Path]]:
    """seeds.json of `pgolf seeds --out` and every seed's train log beside it."""
    path = folder / "seeds.json"
    summary = _read_json(path)
    runs = summary.get("runs") if isinstance(summary, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "seed" in r for r in runs):
        raise ExportError(f"{path}: not a seed summary of `pgolf seeds --out` (no runs with seeds)")
    logs = [folder / f"train_seed{r['seed']}.log" for r in runs]
    missing = [str(p) for p in logs if not p.is_file()]
    if missing:
        raise ExportError(f"{missing[0]}: train log of a seed missing")
    return summary, logs


# ----------------------------------------------------------------------------- contents


def submission(m: dict, meta: dict, date: str, seeds: dict | None) -> dict:
    ev, size, train = m["eval"], m["size"], m["train"]
    sub = {
        **meta, "date": date,
        "val_loss": ev["val_loss"], "val_bpb": ev["val_bpb"],
        "bytes_total": size["total_bytes"], "bytes_code": size["code_bytes"], "bytes_model": size["model_bytes"],
        "code_count": f"bytes of the packed {layout.SCRIPT_FILE}", "code_sha256": size["code_sha256"],
        "artifact_sha256": ev["artifact_sha256"], "codec": size["codec"], "pre_quant_val_bpb": train.get("val_bpb_float"),
        "eval_stride": ev["stride"], "eval_context": ev["context"], "scored_tokens": ev["scored_tokens"],
        "steps": train["steps"], "train_seconds": train["train_seconds"], "world_size": train["world_size"],
        "device": train.get("device"), "quantize_seconds": m["quant"]["quantize_seconds"],
    }
    if seeds is not None:
        sub["seeds"] = {k: seeds[k] for k in ("n", "val_bpb_mean", "val_bpb_std", "baseline_val_bpb",
                                               "improvement_nats_mean", "p_value", "significant") if k in seeds}
    return sub


def readme(sub: dict, m: dict, params_text: str, metrics_dir: Path, checks: str, seeds_text: str | None) -> str:
    p = m["prepare"]
    device = sub["device"] or "?"
    lines = [
        f"# {sub['name']}", "", sub["blurb"], "",
        f"**val_bpb {sub['val_bpb']:.5f}** (sliding window, context {sub['eval_context']}, stride {sub['eval_stride']}, "
        f"{sub['scored_tokens']:,} validation tokens scored once each)", "",
        "| figure | value |", "|---|---|",
        f"| val_loss (nats/token) | {sub['val_loss']:.5f} |",
        f"| pre-quantization val_bpb (non-sliding) | {sub['pre_quant_val_bpb']} |",
        f"| artifact total | {sub['bytes_total']:,} bytes (model {sub['bytes_model']:,} {sub['codec']} + code "
        f"{sub['bytes_code']:,} = the bytes of `train_gpt.py`) |",
        f"| training | {sub['steps']} steps in {sub['train_seconds']:.1f} s on {sub['world_size']} process(es), {device} |",
        f"| GPTQ (quantize stage; ±1 pruning is in compress) | {sub['quantize_seconds']:.1f} s |",
        f"| data | {p['train_tokens']:,} train tokens ({p['train_docs']:,} docs), {p['val_tokens']:,} val tokens |",
        "", "## Run it", "",
        "`train_gpt.py` holds the pgolf code (compressed, base85) and this run's params. It unpacks the code into a",
        "temp folder and runs prepare (links the shards, builds the tokenizer's byte tables), train (online Hessians),",
        "GPTQ quantization, compression with ±1 pruning to the size target and the sliding-window evaluation, "
        "writing into `./pgolf_run/`:", "",
        "```bash", "pip install -r requirements.txt",
        "# ./data/datasets/fineweb10B_sp1024/ (fineweb_train_*.bin, fineweb_val_*.bin) and ./data/tokenizers/fineweb_1024_bpe.model",
        "torchrun --standalone --nproc_per_node=8 train_gpt.py     # or: python train_gpt.py (one process)", "```", "",
        "Code bytes are the bytes of this `train_gpt.py`; `model.ptz` is the scored artifact "
        f"(sha256 `{sub['artifact_sha256'][:16]}…`).", "",
        "## Rules self-check", "", "```", checks, "```", "",
    ]
    if seeds_text:
        lines += ["## Seeds", "", "```", seeds_text, "```", ""]
    lines += ["## Pipeline summary", "", "Produced by the pgolf DVC pipeline (`dvc repro`).", "", "```",
              render(metrics_dir), "```", "", "Parameters of the run (`params.yaml`):", "", "```yaml",
              params_text.rstrip(), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the export


def export(root: Path, out: Path, name: str, author: str, github_id: str, blurb: str, force: bool = False,
           seeds: Path | None = None) -> Path:
    root, out = Path(root), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{out}: exists and is not empty (use --force to replace it)")
    m = load_metrics(root)
    if not m["size"]["under_cap"]:
        over = m["size"]["total_bytes"] - m["size"]["cap_bytes"]
        raise ExportError(f"{layout.SIZE_METRICS}: artifact is over the cap by {over:,} bytes (model + packed "
                          f"{layout.SCRIPT_FILE}); not exporting")
    model = check_artifact(root, m)
    check_params_locked(root)
    script = check_script(root, m)
    reqs = pack.requirements(baked_configs(root))
    log = root / layout.TRAIN / train_files.LOG_FILE
    if not log.is_file():
        raise ExportError(f"{log}: train log missing (run `dvc repro` or `dvc checkout`)")
    try:
        checked = rules.check(root)
    except (rules.RulesError, ConfigError, artifact.ArtifactError) as e:
        raise ExportError(str(e)) from None
    if not all(r.passed for r in checked):
        raise ExportError("rules self-check failed, not exporting:\n" + rules.report(checked))
    seed_summary, seed_logs = check_seeds(seeds) if seeds is not None else (None, [])
    meta = {"author": author, "github_id": github_id, "name": name, "blurb": blurb}
    sub = submission(m, meta, dt.date.today().isoformat(), seed_summary)
    params_text = (root / "params.yaml").read_text()
    text = readme(sub, m, params_text, root / layout.METRICS, rules.report(checked),
                  render_seeds(seed_summary) if seed_summary else None)
    _write(out, force, lambda tmp: _fill(tmp, root, sub, text, script, reqs, model, log, m, checked, seed_summary,
                                         seed_logs))
    return out


def _fill(tmp: Path, root: Path, sub: dict, text: str, script: bytes, reqs: str, model: Path, log: Path, m: dict,
          checked: list, seed_summary: dict | None, seed_logs: list[Path]) -> None:
    (tmp / layout.SCRIPT_FILE).write_bytes(script)
    atomic_write_text(tmp / "requirements.txt", reqs)
    write_json(tmp / "submission.json", sub)
    atomic_write_text(tmp / "README.md", text)
    shutil.copy2(model, tmp / artifact.MODEL_FILE)
    shutil.copy2(log, tmp / train_files.LOG_FILE)
    shutil.copy2(root / "params.yaml", tmp / "params.yaml")
    for name in NEEDED:
        shutil.copy2(root / layout.metrics_file(name), tmp / f"metrics_{name}.json")
    atomic_write_text(tmp / "rules_check.txt", rules.report(checked) + "\n")
    write_json(tmp / "rules_check.json", rules.as_json(checked))
    if seed_summary is not None:
        write_json(tmp / "seeds.json", seed_summary)
        for p in seed_logs:
            shutil.copy2(p, tmp / p.name)


def _write(out: Path, force: bool, fill) -> None:
    """Build the folder in a temp folder beside `out`, then rename it into place; on any error the
    temp folder and any parent folders this call created are removed."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        with staged_dir(out) as tmp:
            fill(tmp)
    except BaseException:
        for p in created:  # innermost first
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf export", description="Export a finished run as a challenge records folder.")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", required=True)
    ap.add_argument("--blurb", default="")
    ap.add_argument("--seeds", type=Path, help="folder written by `pgolf seeds --out`")
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    a = ap.parse_args(argv)
    try:
        out = export(Path("."), a.out, a.name, a.author, a.github_id, a.blurb, a.force, a.seeds)
    except (ExportError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}/ (train_gpt.py, requirements.txt, README.md, submission.json, model.ptz, logs, rules_check.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
