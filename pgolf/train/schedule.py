"""The training schedules, as pure functions of the step, the elapsed time and the `train` params:
the warmdown lr scale and its `min_lr` floor, the training fraction, Muon's momentum warmup and
the growing sequence length (`train.seq_len_schedule`). The loop (pgolf.train.train) and its
triggers (pgolf.train.triggers) read them each step."""

from __future__ import annotations

from pgolf.config import TrainConfig


def seq_len_at(frac: float, cfg: TrainConfig) -> int:
    """The training sequence length at training_frac `frac`: the first [LEN, UNTIL] of
    train.seq_len_schedule with frac < UNTIL, else train.seq_len."""
    return next((n for n, until in cfg.seq_len_schedule if frac < until), cfg.seq_len)


def lr_scale(step: int, elapsed_ms: float, cfg: TrainConfig) -> float:
    """The warmdown multiplier before step `step` (0-based) after `elapsed_ms` of training (§4.5).

    warmdown_frac > 0: min((1 - frac) / warmdown_frac, 1) of the training fraction (PR #2135's
    rule, wallclock- or step-based as `training_frac`). Else wallclock: step_ms = elapsed/step,
    W = warmdown_iters*step_ms, R = max(cap - elapsed, 0), scale = R/W if R <= W else 1.
    Step-based (cap 0): (iterations - step)/warmdown_iters over the last warmdown_iters steps,
    else 1. warmdown_iters 0: always 1.
    """
    if cfg.warmdown_frac > 0:
        return min(max(1.0 - training_frac(step, elapsed_ms, cfg), 0.0) / cfg.warmdown_frac, 1.0)
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cfg.max_wallclock_seconds <= 0:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        if start <= step < cfg.iterations:
            return max((cfg.iterations - step) / cfg.warmdown_iters, 0.0)
        return 1.0
    step_ms = elapsed_ms / max(step, 1)
    warmdown_ms = cfg.warmdown_iters * step_ms
    remaining_ms = max(cfg.max_wallclock_seconds * 1000.0 - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def lr_multiplier(scale: float, cfg: TrainConfig) -> float:
    """The lr multiplier the optimizers get: the warmdown scale floored at `train.min_lr` (the
    records' MIN_LR). Late QAT, SWA and the Hessian window keep reading the unfloored scale."""
    return max(scale, cfg.min_lr)


def training_frac(step: int, elapsed_ms: float, cfg: TrainConfig) -> float:
    """How far training is before step `step`: elapsed / cap with a wallclock cap, else
    step / iterations (the records' rule for switching depth recurrence on). PR #2135 takes
    GPTQ_RESERVE_SECONDS off its cap for this fraction and for stopping alike, so its 600 s less a
    0.5 s reserve is max_wallclock_seconds 599.5 here (tests/test_optim_pr2135.py)."""
    cap_ms = cfg.max_wallclock_seconds * 1000.0
    return elapsed_ms / cap_ms if cap_ms > 0 else step / cfg.iterations


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Linear ramp muon_momentum_warmup_start -> muon_momentum over muon_momentum_warmup_steps."""
    n = cfg.muon_momentum_warmup_steps
    frac = min(step / n, 1.0) if n > 0 else 1.0
    return (1.0 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
