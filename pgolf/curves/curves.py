"""Training curves as a PNG (plots/train.png), readable without a browser or network.

`dvc plots show/diff` renders plots/train.tsv as Vega-Lite HTML that loads its charting library
from a CDN, so it is blank offline. This module draws the same three series (train loss, lr
scale, tokens/s against step) into one image, which DVC declares as an image plot and shows as
is. Input errors name the file (a missing file, a missing column, a value that is not a number).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pgolf.shared import layout
from pgolf.shared.io import atomic_write_bytes

SERIES = (("train_loss", "train loss"), ("lr_scale", "lr scale"), ("tokens_per_second", "tokens / s"))


class CurvesError(ValueError):
    """plots/train.tsv that cannot be drawn; names the file."""


def read_tsv(path: str | Path) -> dict[str, list[float]]:
    """{column: values} of the train stage's TSV (step + SERIES); CurvesError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CurvesError(f"{path}: not found (run the train stage first)")
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))
    cols = ("step", *(name for name, _ in SERIES))
    if not rows or any(c not in rows[0] for c in cols):
        raise CurvesError(f"{path}: expected a header with columns {', '.join(cols)} and at least one row")
    try:
        return {c: [float(r[c]) for r in rows] for c in cols}
    except (TypeError, ValueError) as e:
        raise CurvesError(f"{path}: a value is not a number ({e})") from None


def render_png(series: dict[str, list[float]], title: str = "training curves") -> bytes:
    """One PNG, a panel per series against step; no timestamp metadata (same data, same bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(len(SERIES), 1, figsize=(7, 2.2 * len(SERIES)), sharex=True)
    for ax, (name, label) in zip(axes, SERIES):
        ax.plot(series["step"], series[name], linewidth=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def run(tsv: str | Path = layout.TRAIN_TSV, png: str | Path = layout.TRAIN_PNG) -> Path:
    """Draw `tsv` into `png` (atomically); returns the PNG's path."""
    atomic_write_bytes(png, render_png(read_tsv(tsv), f"training curves ({tsv})"))
    return Path(png)
