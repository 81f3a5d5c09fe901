"""The short end-of-pipeline summary: val_bpb, artifact bytes vs the cap, codec, train speed.

Printed by `pgolf summary` (the Quickstart's last command; it reads only
metrics/*.json, so it works on any checked-out branch). A metrics file that is not valid JSON or
lacks a key the summary shows is an error naming the file, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf.shared import layout
from pgolf.shared.io import MetricsError, read_json


def _read(metrics_dir: Path, name: str) -> dict:
    path = metrics_dir / layout.metrics_file(name).name
    return read_json(path) if path.exists() else {}


def _bytes(source: str | None) -> str:
    """The byte count's note: a val_bpb over a byte sidecar is over the ORIGINAL text (CaseOps data)."""
    return "; original bytes, byte sidecar" if source == "sidecar" else ""


def _eval(ev: dict) -> list[str]:
    how = (f"score-first TTT, {ev['ttt_seconds']:.1f} s; {ev['val_bpb_pre_ttt']:.4f} before" if "ttt_seconds" in ev
           else "sliding")
    if "val_bpb_untilted" in ev:
        how += f"; n-gram tilt, {ev['val_bpb_untilted']:.4f} without it"
    return [f"  val_bpb        {ev['val_bpb']:.4f}  ({how}, context {ev['context']}, stride {ev['stride']}, "
            f"{ev['scored_tokens']:,} tokens{_bytes(ev.get('byte_source'))})"]


def _float(train: dict) -> list[str]:
    if train.get("val_bpb_float") is None:
        return []
    return [f"  float val_bpb  {train['val_bpb_float']:.4f}  (non-sliding, before quantization"
            f"{_bytes(train.get('val_byte_source'))})"]


def _size(size: dict) -> list[str]:
    verdict = "under" if size["under_cap"] else "OVER"
    how = " (packed train_gpt.py)" if str(size.get("code_count", "")).startswith("packed") else ""
    return [f"  artifact       {size['total_bytes']:,} bytes = model {size['model_bytes']:,} ({size['codec']}) "
            f"+ code {size['code_bytes']:,}{how}; {verdict} the {size['cap_bytes']:,}-byte cap"]


def _quant(quant: dict) -> list[str]:
    """quant.json's tensors with size.json's pruned count (pruning is the compress stage's)."""
    pruned = f", {quant['pruned_values']:,} ±1 values pruned" if "pruned_values" in quant else ""
    return [f"  quantized      {quant['int6_tensors']} int{quant.get('bits', 6)} tensors{pruned}"]


def _train(train: dict) -> list[str]:
    return [f"  train          {train['steps']} steps, {train['tokens_per_second']:,.0f} tokens/s, "
            f"{train['train_seconds']:.1f} s on {train['world_size']} process(es)"]


LINES = (("eval", _eval), ("train", _float), ("size", _size), ("quant", _quant), ("train", _train))


def render(metrics_dir: str | Path = layout.METRICS) -> str:
    """The summary text; MetricsError naming the file that is not JSON or lacks a key it shows."""
    d = Path(metrics_dir)
    files = {name: _read(d, name) for name, _ in LINES}
    if files["quant"] and "pruned_values" in files["size"]:
        files["quant"] = {**files["quant"], "pruned_values": files["size"]["pruned_values"]}
    lines = ["pgolf summary"]
    for name, fmt in LINES:
        if not files[name]:
            continue
        try:
            lines += fmt(files[name])
        except (KeyError, TypeError, ValueError) as e:
            raise MetricsError(f"{d / layout.metrics_file(name).name}: cannot summarise it ({type(e).__name__}: {e})") from None
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf summary", description="Print the summary of a run's metrics files.")
    ap.add_argument("metrics", nargs="?", default=str(layout.METRICS), help="the metrics folder (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        print(render(args.metrics))
    except MetricsError as e:
        print(f"summary: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
