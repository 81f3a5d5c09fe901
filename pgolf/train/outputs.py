"""What a training run reports and the files the train stage writes.

This module owns the run log (`RunLog`: the lines of train.log, also printed by rank 0, and the
rows of plots/train.tsv), the metrics of metrics/train.json (`train_metrics`, keys in a fixed
order), and `write_outputs` (rank 0): artifacts/train/{model.pgt, hessians.pgt, train.log}
through one staged folder, then metrics/train.json and plots/train.tsv.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pgolf import config
from pgolf.config import ModelConfig, TrainConfig
from pgolf.shared import train_files
from pgolf.shared.io import atomic_write_text, staged_dir, write_json
from pgolf.shared.model import QAT_BITS
from pgolf.train.inputs import Paths

if TYPE_CHECKING:
    from pgolf.shared.dist import DistInfo
    from pgolf.shared.model import GPT
    from pgolf.train.averages import WeightAverages
    from pgolf.train.priming import Priming
    from pgolf.train.triggers import Triggers

TSV_COLUMNS = ("step", "train_loss", "lr_scale", "tokens_per_second")


class RunLog:
    """The lines of train.log (also printed by rank 0) and the rows of plots/train.tsv."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.lines: list[str] = []
        self.rows: list[dict] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)
        if self.is_main:
            print(msg, flush=True)

    def step(self, cfg: TrainConfig, step: int, loss: float, lr: float, elapsed_ms: float) -> None:
        """The log line and TSV row of step `step` (mean loss `loss`, lr multiplier `lr`)."""
        step_avg = elapsed_ms / step
        tps = cfg.batch_tokens * step / max(elapsed_ms / 1000.0, 1e-9)
        eta = (cfg.iterations - step) * step_avg / 1000.0
        if cfg.max_wallclock_seconds > 0:
            eta = min(eta, max(cfg.max_wallclock_seconds - elapsed_ms / 1000.0, 0.0))
        self(f"step:{step}/{cfg.iterations} train_loss:{loss:.4f} lr_scale:{lr:.4f} "
             f"tok/s:{tps:,.0f} step_avg:{step_avg:.1f}ms train_time:{elapsed_ms / 1000:.1f}s eta:{eta:.0f}s")
        self.rows.append({"step": step, "train_loss": loss, "lr_scale": lr, "tokens_per_second": tps})

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def tsv(self) -> str:
        out = ["\t".join(TSV_COLUMNS)]
        for r in self.rows:
            out.append(f"{r['step']}\t{r['train_loss']:.6f}\t{r['lr_scale']:.6f}\t{r['tokens_per_second']:.1f}")
        return "\n".join(out) + "\n"


@dataclass
class TrainResult:
    metrics: dict
    export: dict[str, Tensor]  # the exported fp32 weights (GPT.export_state_dict names), CPU
    hessians: dict[str, Tensor]
    hessian_meta: dict
    log_text: str
    rows: list[dict] = field(default_factory=list)  # the plots/train.tsv rows


@dataclass
class Counters:
    """The loop's own numbers at the end of a run."""

    steps: int
    elapsed_ms: float
    world_size: int
    grad_accum_steps: int
    stopped_by: str
    resumed_from_step: int
    checkpoint: str  # how the run started: "resumed", "no checkpoint" or why one was not resumed


def train_metrics(run: Counters, ev: dict, eval_s: float, hmeta: dict, overhead: dict, triggers: Triggers,
                  avg: WeightAverages, priming: Priming, model: GPT, cfg: TrainConfig, info: DistInfo) -> dict:
    """metrics/train.json: `ev` is the final non-sliding evaluation (`eval_s` seconds), `hmeta` the
    Hessians' meta, `overhead` the Hessian schedule's step-time overhead."""
    secs = run.elapsed_ms / 1000.0
    peak, peak_kind = _peak_memory_mb(info.device)
    return {
        "steps": run.steps,
        "train_seconds": round(secs, 3),
        "tokens_per_second": round(cfg.batch_tokens * run.steps / max(secs, 1e-9), 1),
        "world_size": run.world_size,
        "val_bpb_float": ev["val_bpb"],
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "val_loss_float": ev["val_loss"],
        "val_tokens_scored": ev["tokens"],
        "val_byte_source": ev.get("byte_source", "tables"),  # sidecar: val_bpb_float on original bytes (CaseOps)
        "eval_seconds": round(eval_s, 3),
        **overhead,
        "hessian_accumulations": hmeta["accumulations"],
        "hessian_rows": hmeta["rows"],
        **triggers.metrics(),
        "swa_snapshots": avg.swa_count,
        "swa_start_step": avg.swa_first_step,
        "exported_weights": avg.source,
        "stopped_by": run.stopped_by,
        "step_avg_ms": round(run.elapsed_ms / max(run.steps, 1), 3),
        "grad_accum_steps": run.grad_accum_steps,
        "batch_tokens": cfg.batch_tokens,
        "seq_len": cfg.seq_len,
        "model_params": model.num_params(),
        **priming.metrics(),
        "resumed_from_step": run.resumed_from_step,
        "checkpoint": run.checkpoint,
        "device": _device_name(info.device),
        "versions": _versions(),
        "config": {"model": config.to_dict(model.cfg), "train": config.to_dict(cfg)},
    }


def final_line(m: dict, ev: dict, eval_s: float) -> str:
    """The last line of train.log, from the metrics `m` and the final evaluation `ev`."""
    return (f"final: {m['steps']} steps in {m['train_seconds']:.1f} s ({m['tokens_per_second']:,.0f} tok/s), "
            f"stopped by {m['stopped_by']}; exported {m['exported_weights']} weights; val_loss_float "
            f"{ev['val_loss']:.4f} val_bpb_float {ev['val_bpb']:.4f} over {ev['tokens']:,} tokens "
            f"({eval_s:.1f} s); Hessians: {m['hessian_accumulations']} accumulations, {m['hessian_rows']:,} rows, "
            + (f"overhead {m['hessian_overhead_pct']}% of step time" if m["hessian_overhead_pct"] is not None
               else "overhead not measured (no capture step, or no other step, during training)"))


def _peak_memory_mb(dev: torch.device) -> tuple[float, str]:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")


def _versions() -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001 - optional
        triton_v = None
    return {"torch": torch.__version__, "triton": triton_v, "python": platform.python_version()}


def write_outputs(result: TrainResult, mcfg: ModelConfig, cfg: TrainConfig, paths: Paths,
                  tokenizer_meta: dict) -> None:
    """artifacts/train/ in one staged swap, then metrics/train.json and plots/train.tsv."""
    with staged_dir(paths.out_dir) as tmp:
        train_files.save_weights(tmp / train_files.MODEL_FILE, result.export, train_files.model_meta(
            mcfg, cfg.seq_len, cfg.qat_clip_quantile, QAT_BITS, tokenizer_meta))
        train_files.save_hessians(tmp / train_files.HESSIANS_FILE, result.hessians, result.hessian_meta)
        atomic_write_text(tmp / train_files.LOG_FILE, result.log_text)
    write_json(paths.metrics, result.metrics)
    log = RunLog(False)
    log.rows = result.rows
    atomic_write_text(paths.plots, log.tsv())
