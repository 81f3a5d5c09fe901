"""How training's graphs are built before the clock starts: torch.compile of the training forward
and compile priming (recipe-spec §4.5).

This module owns the compiled forward (`compile_forward`: `train.compile_scope`, the inductor
options, AOTAutograd's on-disk cache), what a model turns on for CUDA training
(`use_cuda_training_kernels`), and compile priming (`Primer`): real training steps on every graph
training will run (each sequence length of `train.seq_len_schedule`, looped and not when depth
recurrence starts later), per graph until a step from the second on compiles nothing on any rank
(`compiles_so_far`), at most `train.warmup_steps`; the second step of a graph captures Hessians,
so their eager forward is built too. Then the model and optimizer state are restored; the trainer
re-creates the loader.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from pgolf.config import TrainConfig
from pgolf.shared.dist import DistInfo
from pgolf.shared.model import GPT
from pgolf.train.device import shared_max, sync

# Mix-order reductions off: with them inductor fused each norm's row reduction with the column
# sums of the per-channel scales' gradients into slow kernels (bench/results/inductor_variants_h200.json).
INDUCTOR_OPTIONS = {"triton.mix_order_reduction": False}


def compile_forward(model: GPT, scope: str, backend: str = "inductor", autotune: bool = False) -> Callable:
    """The training forward `(x, y) -> loss` under torch.compile (`train.compile_scope`):

    * `model`: one graph of the whole forward and loss;
    * `blocks` (regional compilation): every Block compiled in place (its `forward`, and its
      `parallel` for two-lane layers), plus the loss head; the embeddings, the U-Net skips and
      the lane mixing between them run eagerly. Blocks with the same flags (XSA, value
      embedding, lanes) share one compiled graph, so a few block graphs are traced and built
      instead of the whole unrolled model. An uncompiled call of `model` (the Hessian capture)
      must run under `torch.compiler.set_stance("force_eager")`.

    `autotune` (`train.compile_autotune`) adds inductor's max-autotune options without CUDA graphs:
    matmul, FlexAttention and pointwise kernel configs timed while compiling.
    """
    opts = {"dynamic": False, "fullgraph": True, "backend": backend}
    allow_custom_function_caching()
    if backend == "inductor":
        opts["options"] = dict(INDUCTOR_OPTIONS)
        if autotune:
            from torch._inductor import list_mode_options

            opts["options"].update(list_mode_options("max-autotune-no-cudagraphs"))
    if scope == "model":
        return torch.compile(model, **opts)
    # one compiled code object serves every block: a cache entry per flag combination, sequence
    # length and grad mode, more than dynamo's default of 8 with a sequence-length schedule
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.blocks:
        block.compile(**opts)
        block.parallel = torch.compile(block.parallel, **opts)
    model.loss_from_hidden = torch.compile(model.loss_from_hidden, **opts)
    return model


def use_cuda_training_kernels(model: GPT, cfg: TrainConfig) -> None:
    """What training turns on for a model on CUDA: TF32 matmuls and convolutions, and the fused
    Triton kernels that `train.fused_mlp` and `train.fused_qk_norm_rope` ask for (the benches
    that build the model as the trainer does call this too)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model.use_fused_mlp = cfg.fused_mlp
    model.use_fused_qk = cfg.fused_qk_norm_rope


def allow_custom_function_caching() -> None:
    """Let AOTAutograd's on-disk cache keep graphs that hold an autograd.Function (the fused MLP).

    By default such a graph bypasses that cache, so a warm rerun traces the joint forward and
    backward again (bench/results/compile_h200_machine6_aot_cache.json). Caching is sound here:
    dynamo traces the Function's forward and backward into the graph that keys the cache, and its
    kernels are opaque custom ops (pgolf::mlp_*), called at run time, not code baked into the
    cached artifact."""
    import torch._functorch.config as functorch_config

    functorch_config.autograd_cache_allow_custom_autograd_functions = True


def compiles_so_far() -> int:
    """Graphs torch.compile has built in this process: dynamo's new graphs plus inductor's
    compiled graphs (forward and backward, whether its on-disk cache held them or not)."""
    from torch._dynamo.utils import counters
    built = counters["inductor"]
    return counters["stats"]["unique_graphs"] + sum(
        built[k] for k in ("fxgraph_cache_miss", "fxgraph_cache_hit", "fxgraph_cache_bypass"))


@dataclass
class Priming:
    """What compile priming took: its wall seconds and each priming step's (graphs in priming order)."""

    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    def metrics(self) -> dict:
        return {"warmup_seconds": round(self.seconds, 3), "warmup_steps_run": len(self.step_seconds),
                "warmup_step_seconds": self.step_seconds}


def graphs(model: GPT, lengths: list[int]) -> list[tuple[bool, int]]:
    """(looping, seq_len) of every graph training will run: each sequence length of `lengths`,
    looped too when depth recurrence is configured but not on yet."""
    looping = model.looping
    modes = [False, True] if model.cfg.num_loops > 0 and not looping else [looping]
    return [(mode, n) for mode in modes for n in sorted(set(lengths))]


class Primer:
    """Compile priming of `model`: `run_step(seq_len, hessians)` is one training step without
    the EMA at that sequence length (capturing into `hessians` unless None)."""

    def __init__(self, model: GPT, run_step: Callable[[int, dict | None], object], info: DistInfo,
                 log: Callable[[str], None]):
        self.model, self.run_step, self.info, self.log = model, run_step, info, log

    def prime(self, opt, n: int, lengths: list[int]) -> Priming:
        """At most `n` steps of every graph (`graphs`), then the model's weights and `opt`'s state
        as they were; logs each graph's steps and the total."""
        t0 = time.perf_counter()
        model_state = {k: p.detach().clone() for k, p in self.model.named_parameters()}
        opt_state = opt.state_dict()
        step_seconds = self._prime_graphs(n, lengths)
        with torch.no_grad():
            for k, p in self.model.named_parameters():
                p.copy_(model_state[k])
        opt.load_state_dict(opt_state)
        opt.zero_grad(set_to_none=True)
        del model_state, opt_state
        done = Priming(time.perf_counter() - t0, step_seconds)
        self.log(f"warmup: {len(step_seconds)} compile-priming steps in {done.seconds:.1f} s "
                 f"(per graph: until a step compiles nothing, at most {n}); state restored")
        return done

    def _prime_graphs(self, n: int, lengths: list[int]) -> list[float]:
        scratch = self.model.zero_hessians()
        looping = self.model.looping
        seconds = []
        for mode, seq_len in graphs(self.model, lengths):
            self.model.set_looping(mode)
            seconds += self._prime_graph(n, seq_len, scratch)
        self.model.set_looping(looping)
        return seconds

    def _prime_graph(self, n: int, seq_len: int, scratch: dict[str, Tensor]) -> list[float]:
        """At most `n` steps of the current graph; the second captures Hessians. Stops after the
        first step from the second on that compiled nothing on any rank: the graphs are built,
        and more steps would only run them. Logs each step's seconds and graphs built (where
        compile time goes) -> the seconds, rounded."""
        seconds, built = [], []
        for i in range(n):
            t0, before = time.perf_counter(), compiles_so_far()
            self.run_step(seq_len, scratch if i == 1 else None)
            sync(self.info.device)
            seconds.append(time.perf_counter() - t0)
            built.append(compiles_so_far() - before)
            if i >= 1 and shared_max(float(built[-1]), self.info) == 0:
                break
        self.log(f"warmup: seq_len {seq_len}{' looped' if self.model.looping else ''}: step seconds "
                 f"{', '.join(f'{t:.1f}' for t in seconds)}; graphs built {', '.join(map(str, built))}")
        return [round(t, 2) for t in seconds]
