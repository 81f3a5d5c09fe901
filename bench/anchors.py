"""The anchor record scripts the side-by-side benches run beside pgolf, and how to read their logs.

Each anchor is an unmodified `train_gpt.py` in ../shared/anchors/<name> (ANCHOR.md there says
where it came from). An `Anchor` names the script, the pgolf profile that reproduces it, the
tokenizer both programs use, the environment of the anchor's logged runs (its README command; the
scripts read every setting from environment variables), and three log lines: its training step
(-> step, loss, training milliseconds), its wallclock cap (-> the last step and its training
milliseconds: the last step is logged only there) and its post-EMA float evaluation (-> val_loss,
val_bpb). PR #535 and PR #2135 import FlashAttention-3, which the lent machines lack: the benches
put a stand-in first on PYTHONPATH (`--stub-dir`, a git-ignored folder), and every result says so.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared/anchors beside the checkout; on a lent machine (which gets the checkout alone) a
# carried copy in the git-ignored .devrun/anchors
ANCHOR_DIR = next((d for d in (REPO.parent / "shared" / "anchors", REPO / ".devrun" / "anchors") if d.is_dir()),
                  REPO.parent / "shared" / "anchors")
SP1024 = REPO / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"
CASEOPS_MODEL = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

_MS_STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+) train_time:(\d+)ms")  # PR #1072, PR #535
_TOKS_STEP = re.compile(r"^(\d+)/\d+ train_loss: ([\d.]+) train_time: [\d.]+m tok/s: (\d+)")  # PR #2135
_STOP = re.compile(r"^stopping_early: wallclock_cap train_time: ?(\d+)ms step: ?(\d+)/")  # all three
_DIAG_535 = re.compile(r"^DIAGNOSTIC post_ema val_loss:([\d.]+) val_bpb:([\d.]+)")
_DIAG_2135 = re.compile(r"^diagnostic pre-quantization post-ema val_loss:([\d.]+) val_bpb:([\d.]+)")

# PR #2135's README command, minus what only its post-training reads (the benches stop the script
# at its post-EMA evaluation line) and minus the data paths (set per run).
PR2135_ENV = {
    "CASEOPS_ENABLED": "1", "VOCAB_SIZE": "8192", "ASYM_LOGIT_RESCALE": "1", "SMEAR_GATE_BOS_FIX": "0",
    "EVAL_SEQ_LEN": "2560", "MATRIX_LR": "0.028", "MIN_LR": "0.1", "WARMDOWN_FRAC": "0.85", "BETA2": "0.99",
    "FUSED_CE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
    "SMEAR_GATE_ENABLED": "1", "GATE_WINDOW": "12", "GPTQ_RESERVE_SECONDS": "0.5", "EMA_DECAY": "0.9965",
}


@dataclass(frozen=True)
class Anchor:
    name: str
    profile: str  # the pgolf profile that reproduces it
    tokenizer: Path  # the .model both programs use
    env: dict = field(default_factory=dict)  # the logged runs' settings
    step_ms: bool = True  # step lines carry train_time in ms (else: cumulative tok/s)
    needs_fa3_stub: bool = False

    @property
    def script(self) -> Path:
        return ANCHOR_DIR / self.name / "train_gpt.py"

    def parse_step(self, line: str, batch_tokens: int) -> tuple[int, float, float] | None:
        """A training-step log line -> (step, loss, training ms at its end); None for other lines.
        PR #2135 logs cumulative tokens/s, so its clock is step * batch / (tokens/s)."""
        if self.step_ms:
            m = _MS_STEP.match(line)
            return (int(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None
        m = _TOKS_STEP.match(line)
        if not m or int(m.group(3)) == 0:
            return None
        step = int(m.group(1))
        return step, float(m.group(2)), step * batch_tokens / int(m.group(3)) * 1000.0

    def parse_stop(self, line: str) -> tuple[int, float] | None:
        """The wallclock-cap line -> (last step, training ms); None for other lines."""
        m = _STOP.match(line)
        return (int(m.group(2)), float(m.group(1))) if m else None

    def parse_post_ema(self, line: str) -> tuple[float, float] | None:
        """The post-EMA float evaluation line -> (val_loss, val_bpb); None for other lines."""
        m = (_DIAG_535 if self.step_ms else _DIAG_2135).match(line)
        return (float(m.group(1)), float(m.group(2))) if m else None


ANCHORS = {
    "pr1072": Anchor("pr1072", "record", SP1024),
    "pr535": Anchor("pr535", "pr535", SP1024, needs_fa3_stub=True),
    "pr2135": Anchor("pr2135", "pr2135", REPO / "data" / "tokenizer_src" / CASEOPS_MODEL, PR2135_ENV, step_ms=False,
                     needs_fa3_stub=True),
}


def with_stub(env: dict, stub_dir: Path | None) -> dict:
    """`env` with `stub_dir` (a folder holding a flash_attn_interface stand-in) first on PYTHONPATH."""
    if stub_dir is None:
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(stub_dir), env.get("PYTHONPATH", "")) if p)}


def get(name: str) -> Anchor:
    if name not in ANCHORS:
        raise ValueError(f"--anchor {name!r}: want one of {', '.join(ANCHORS)}")
    return ANCHORS[name]
