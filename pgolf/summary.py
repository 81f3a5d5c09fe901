"""The short end-of-pipeline summary: val_bpb, artifact bytes vs the cap, codec, train speed.

Printed by the evaluate stage when the pipeline finishes, and on demand with
`python -m pgolf.summary` (reads only metrics/*.json, so it works on any checked-out branch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read(metrics_dir: Path, name: str) -> dict:
    path = metrics_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def render(metrics_dir: str | Path = "metrics") -> str:
    d = Path(metrics_dir)
    ev, size, train, quant = (_read(d, n) for n in ("eval", "size", "train", "quant"))
    lines = ["pgolf summary"]
    if ev:
        how = (f"score-first TTT, {ev['ttt_seconds']:.1f} s; {ev['val_bpb_pre_ttt']:.4f} before" if "ttt_seconds" in ev
               else "sliding")
        lines.append(f"  val_bpb        {ev['val_bpb']:.4f}  ({how}, context {ev['context']}, stride {ev['stride']}, "
                     f"{ev['scored_tokens']:,} tokens)")
    if train.get("val_bpb_float") is not None:
        lines.append(f"  float val_bpb  {train['val_bpb_float']:.4f}  (non-sliding, before quantization)")
    if size:
        verdict = "under" if size["under_cap"] else "OVER"
        how = " (packed train_gpt.py)" if str(size.get("code_count", "")).startswith("packed") else ""
        lines.append(f"  artifact       {size['total_bytes']:,} bytes = model {size['model_bytes']:,} ({size['codec']}) "
                     f"+ code {size['code_bytes']:,}{how}; {verdict} the {size['cap_bytes']:,}-byte cap")
    if quant:
        lines.append(f"  quantized      {quant['int6_tensors']} int6 tensors, {quant['pruned_values']:,} ±1 values pruned")
    if train:
        lines.append(f"  train          {train['steps']} steps, {train['tokens_per_second']:,.0f} tokens/s, "
                     f"{train['train_seconds']:.1f} s on {train['world_size']} process(es)")
    return "\n".join(lines)


def main() -> int:
    print(render(sys.argv[1] if len(sys.argv) > 1 else "metrics"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
