"""Optimizers of training: Muon (plain and sharded) and the AdamW bundle (spec §4.2-§4.4, §4.6).

This module owns the optimizer math and its distribution:

* pure functions — `zeropower_via_newtonschulz5` (quintic Newton-Schulz, batched over leading
  dims; coefficients by name: the seeds' one tuple or the records' per-step Polar Express
  ones, `ns_coefficients`), `nesterov_momentum_`, `muon_update` (momentum -> [row normalisation] ->
  NS5 -> shape scale) and `apply_update_` (decoupled weight decay, then the step). The classes below only manage state
  and communication (the layout of KellerJordan/Muon).
* `Muon` — single-process Muon for 2-D matrices and 3-D banks (a bank is a batch of matrices).
* `ParallelMuon` — Muon sharded over torch.distributed without DDP (PR #1072 design, §4.4):
  banks are padded along dim 0 to a multiple of the world size; each rank reduce-scatters the
  bank gradients into its contiguous share of matrices, runs momentum + batched NS5 on it, and
  all-gathers the update; the all-gather of bank k overlaps the NS5 of bank k+1.
  Deliberate fixes of PR #1072's quirks (§12.5):
    - 2-D Muon params (BigramHash proj, VE proj) are orthogonalized as whole matrices (true
      Muon): each is owned by one rank (round-robin), its gradient is `reduce`d to that owner,
      which runs momentum + NS5 and `broadcast`s the update. (PR #1072 split them by rows and
      orthogonalized each row block separately.)
    - momentum lives in the optimizer state: `state_dict()` gathers the shards into full
      tensors (same format as `Muon.state_dict()`, so checkpoints do not depend on the world
      size) and `load_state_dict()` re-shards them; restoring after warmup resets momentum.
    - momentum is kept in fp32 on every device; only communication uses `comm_dtype`
      (bf16 on CUDA, fp32 on CPU by default).
* `Optimizers` / `build_optimizers` — Muon for "matrix" params plus AdamW for "embed" and
  "scalar" params; one `step(lr_scale, muon_momentum)` does all communication and updates, and
  `clip_grad_norm_` clips by the norm of the *averaged* (global) gradient (PR #1072 and PR #2135
  clipped the local, un-averaged gradients: `train.grad_clip_scope: local` does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

# Newton-Schulz coefficient schedules (`train.muon_ns_coeffs`), (a, b, c) per iteration of
# X <- a X + (b A + c A^2) X, A = X X^T. "quintic": Keller Jordan's one tuple, repeated (§4.3).
# "polar_express": the per-iteration minimax tuples of Polar Express that the records adopted
# (PR #1344 -> #1787, 5 steps); iteration k uses tuple k, so it allows at most 5 steps.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_coefficients(name: str, steps: int) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each of `steps` Newton-Schulz iterations under schedule `name` (the names of
    pgolf.config.NS_SCHEDULES); ValueError for another name or more steps than polar_express defines."""
    if name == "quintic":
        return (NS_COEFFS,) * steps
    if name == "polar_express" and steps <= len(POLAR_EXPRESS_COEFFS):
        return POLAR_EXPRESS_COEFFS[:steps]
    raise ValueError(f"no Newton-Schulz schedule {name!r} of {steps} steps")

# torch 2.13 renamed the tensor collectives; older versions (the GPU boxes) only have the old names
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------

def default_ns_dtype(t: Tensor) -> torch.dtype:
    """bf16 on CUDA (as the records), fp32 on CPU (exact enough to test against)."""
    return torch.bfloat16 if t.is_cuda else torch.float32


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7,
                                dtype: torch.dtype | None = None, coeffs: str = "quintic") -> Tensor:
    """Approximately orthogonalize each matrix of G (..., R, C) with a quintic iteration.

    Returns U S' V^T (where G = U S V^T) with S' roughly in [0.7, 1.2] ("quintic"; the
    "polar_express" schedule lands closer to 1), in `dtype` (default bf16 on CUDA, fp32 on CPU).
    Each matrix is normalized by its own Frobenius norm.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    schedule = ns_coefficients(coeffs, steps)
    X = G.to(dtype or default_ns_dtype(G))  # (..., R, C)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (..., C, R): iterate on the wide side, A is the small Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in schedule:
        A = X @ X.mT  # (..., r, r)
        B = b * A + c * (A @ A)  # (..., r, r)
        X = a * X + B @ X  # (..., r, c)
    return X.mT if tall else X


def shape_scale(shape) -> float:
    """sqrt(max(1, rows/cols)) over the last two dims (MLP up 1536x512 -> sqrt 3)."""
    rows, cols = shape[-2], shape[-1]
    return math.sqrt(max(1.0, rows / cols))


def nesterov_momentum_(grad: Tensor, buf: Tensor, beta: float, nesterov: bool = True) -> Tensor:
    """buf <- beta*buf + g (in place); returns g + beta*buf (Nesterov) or buf."""
    buf.mul_(beta).add_(grad)
    return torch.add(grad, buf, alpha=beta) if nesterov else buf


def row_normalize(u: Tensor, eps: float = 1e-7) -> Tensor:
    """Each row of each matrix of u (..., R, C) divided by its L2 norm (at least `eps`; zero rows stay 0)."""
    return u / u.float().norm(dim=-1, keepdim=True).clamp_min(eps).to(u.dtype)


def muon_update(grad: Tensor, momentum_buf: Tensor, beta: float, nesterov: bool = True,
                ns_steps: int = 5, ns_dtype: torch.dtype | None = None, ns_fn=None,
                ns_coeffs: str = "quintic", row_norm: bool = False) -> Tensor:
    """One Muon direction for a matrix or a bank (..., R, C): momentum, [row normalisation], NS5,
    shape scale. Row normalisation (`train.muon_row_normalize`, PR #2135) only changes what NS5
    starts from: the rows' relative sizes, not the direction's overall scale (NS5 normalizes it).

    Updates `momentum_buf` in place; returns the scaled update in the NS dtype.
    """
    u = nesterov_momentum_(grad, momentum_buf, beta, nesterov)  # (..., R, C) fp32
    if row_norm:
        u = row_normalize(u)
    ns = ns_fn or zeropower_via_newtonschulz5
    return ns(u, ns_steps, 1e-7, ns_dtype or default_ns_dtype(u), ns_coeffs) * shape_scale(u.shape)


@torch.no_grad()
def apply_update_(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay p <- p*(1 - lr*wd), then p <- p - lr*update."""
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


_COMPILED_NS = None


def compiled_newtonschulz5():
    """`zeropower_via_newtonschulz5` under torch.compile (one graph per shape), built once."""
    global _COMPILED_NS
    if _COMPILED_NS is None:
        # One code object serves every bank shape (and its transposes, and the per-rank shares of
        # Parallel Muon): more than dynamo's default of 8 graphs, which under fullgraph=True is a
        # hard error, not a fallback. Allow one graph per shape this model can produce.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _COMPILED_NS = torch.compile(zeropower_via_newtonschulz5, dynamic=False, fullgraph=True)
    return _COMPILED_NS


def _check_muon_params(params: list[Tensor]) -> None:
    for i, p in enumerate(params):
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon param #{i} has shape {tuple(p.shape)}: only 2-D matrices "
                             "and 3-D banks of matrices are supported (route it to AdamW)")


# ----------------------------------------------------------------------------------------------
# single-process Muon
# ----------------------------------------------------------------------------------------------

class Muon(torch.optim.Optimizer):
    """Muon for 2-D matrices and 3-D banks on one process; momentum in `state[p]["momentum_buffer"]`.

    NS5 runs in bf16 on CUDA and fp32 on CPU unless `ns_dtype` says otherwise; `compile=True`
    uses the torch.compile'd NS5 (CUDA only).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, nesterov: bool = True, ns_dtype: torch.dtype | None = None,
                 compile: bool = False, ns_coeffs: str = "quintic", row_normalize: bool = False):
        ns_coefficients(ns_coeffs, ns_steps)  # fail here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                        nesterov=nesterov, ns_coeffs=ns_coeffs, row_normalize=row_normalize)
        super().__init__(params, defaults)
        _check_muon_params([p for g in self.param_groups for p in g["params"]])
        self.ns_dtype = ns_dtype
        self.compile = compile

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                ns_fn = compiled_newtonschulz5() if self.compile and p.is_cuda else None
                upd = muon_update(p.grad, state["momentum_buffer"], group["momentum"],
                                  group["nesterov"], group["ns_steps"], self.ns_dtype, ns_fn,
                                  group.get("ns_coeffs", "quintic"), group.get("row_normalize", False))
                apply_update_(p, upd, group["lr"], group["weight_decay"])
        return loss


# ----------------------------------------------------------------------------------------------
# sharded Muon
# ----------------------------------------------------------------------------------------------

@dataclass
class _Slot:
    """One Muon parameter as seen by this rank: its communication buffers and momentum share."""

    param: Tensor
    group: dict
    is_bank: bool
    n: int  # matrices in the param (1 for a 2-D param)
    per_rank: int  # bank matrices owned by each rank (0 for a 2-D param)
    owner: int  # the rank that owns a 2-D param (-1 for banks)
    momentum: Tensor | None  # (per_rank, R, C) or (R, C) fp32; None where this rank owns nothing
    grad_buf: Tensor | None = None  # (n_pad, R, C) or (R, C) comm dtype
    shard: Tensor | None = None  # (per_rank, R, C) averaged grad share (or the owner's (R, C))
    upd_shard: Tensor | None = None  # (per_rank, R, C) comm dtype, input of the all-gather
    update: Tensor | None = None  # (n_pad, R, C) or (R, C) comm dtype, the full update
    handle: object = field(default=None, repr=False)


class ParallelMuon(torch.optim.Optimizer):
    """Muon sharded over a process group (no DDP); see the module docstring for the design.

    Use per step: backward -> `launch_reduce_scatters()` -> (all-reduce + step the replicated
    params) -> `step()`. `step()` launches the reductions itself if they were not launched.
    Without a process group (or with world size 1) it does the plain Muon math locally.
    A parameter whose `.grad` is None counts as a zero gradient (every rank must communicate).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, nesterov: bool = True, comm_dtype: torch.dtype | None = None,
                 ns_dtype: torch.dtype | None = None, compile: bool = False, group=None,
                 ns_coeffs: str = "quintic", row_normalize: bool = False):
        ns_coefficients(ns_coeffs, ns_steps)  # fail here, not at the first step
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                        nesterov=nesterov, ns_coeffs=ns_coeffs, row_normalize=row_normalize)
        super().__init__(params, defaults)
        all_params = [p for g in self.param_groups for p in g["params"]]
        _check_muon_params(all_params)
        self.pg = group
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
        self.world = dist.get_world_size(group) if self.distributed else 1
        self.rank = dist.get_rank(group) if self.distributed else 0
        dev = all_params[0].device if all_params else torch.device("cpu")
        self.comm_dtype = comm_dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        self.ns_dtype = ns_dtype
        self.compile = compile
        self._avg_op = dist.ReduceOp.AVG if self.distributed and dist.get_backend(group) == "nccl" else None
        self._slots = self._build()
        self._slot_of = {id(s.param): s for s in self._slots}
        self._launched = False
        self._reduced = False

    # -- layout ---------------------------------------------------------------------------------
    def _build(self) -> list[_Slot]:
        slots, n_matrices = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim == 3:
                    slots.append(self._bank_slot(p, group))
                else:
                    slots.append(self._matrix_slot(p, group, owner=n_matrices % self.world))
                    n_matrices += 1
        return sorted(slots, key=lambda s: -s.param.numel())  # biggest first (§4.4)

    def _bank_slot(self, p: Tensor, group: dict) -> _Slot:
        n, R, C = p.shape
        k = -(-n // self.world)  # matrices per rank after padding n to a multiple of world
        s = _Slot(p, group, True, n, k, -1, torch.zeros(k, R, C, device=p.device, dtype=torch.float32))
        if self.distributed:
            mk = dict(device=p.device, dtype=self.comm_dtype)
            s.grad_buf = torch.zeros(k * self.world, R, C, **mk)  # pad rows stay zero
            s.shard = torch.zeros(k, R, C, **mk)
            s.upd_shard = torch.zeros(k, R, C, **mk)
            s.update = torch.zeros(k * self.world, R, C, **mk)
        return s

    def _matrix_slot(self, p: Tensor, group: dict, owner: int) -> _Slot:
        mine = owner == self.rank
        mom = torch.zeros_like(p, dtype=torch.float32) if mine else None
        s = _Slot(p, group, False, 1, 0, owner, mom)
        if self.distributed:
            s.grad_buf = torch.zeros_like(p, dtype=self.comm_dtype)
            s.update = torch.zeros_like(p, dtype=self.comm_dtype)
        return s

    def _global(self, r: int) -> int:
        return r if self.pg is None else dist.get_global_rank(self.pg, r)

    # -- phase 1: gradient reductions -----------------------------------------------------------
    @torch.no_grad()
    def launch_reduce_scatters(self) -> None:
        """Start the async reductions of every Muon gradient (banks: reduce-scatter; 2-D: reduce)."""
        op = self._avg_op or dist.ReduceOp.SUM
        for s in self._slots:
            g = s.param.grad
            if not self.distributed:
                s.shard = g if g is not None else torch.zeros_like(s.param)
                continue
            dst = s.grad_buf[: s.n] if s.is_bank else s.grad_buf
            if g is None:
                dst.zero_()
            else:
                dst.copy_(g)
            if s.is_bank:
                s.handle = _reduce_scatter(s.shard, s.grad_buf, op=op, group=self.pg, async_op=True)
            else:
                s.handle = dist.reduce(s.grad_buf, dst=self._global(s.owner), op=op, group=self.pg,
                                       async_op=True)
        self._launched, self._reduced = True, False

    def _wait_reduction(self, s: _Slot) -> None:
        if s.handle is not None:
            s.handle.wait()
            s.handle = None
            if not s.is_bank:
                s.shard = s.grad_buf if s.owner == self.rank else None
            if s.shard is not None and self._avg_op is None:
                s.shard.div_(self.world)

    def averaged_grads(self) -> list[Tensor]:
        """Wait for all reductions; return this rank's shares of the averaged Muon gradients.

        The shares of all ranks partition the full gradients (padding rows are zero), so the
        sum of their squared norms over ranks is the squared norm of the averaged gradient.
        Scaling them in place (gradient clipping) scales what `step()` uses.
        """
        if not self._launched:
            self.launch_reduce_scatters()
        if not self._reduced:
            for s in self._slots:
                self._wait_reduction(s)
            self._reduced = True
        return [s.shard for s in self._slots if s.shard is not None]

    # -- phase 3: momentum, NS5, all-gather, apply ----------------------------------------------
    def _direction(self, s: _Slot) -> Tensor:
        g = s.group
        ns_fn = compiled_newtonschulz5() if self.compile and s.param.is_cuda else None
        return muon_update(s.shard, s.momentum, g["momentum"], g["nesterov"], g["ns_steps"],
                           self.ns_dtype, ns_fn, g.get("ns_coeffs", "quintic"), g.get("row_normalize", False))

    def _launch_gather(self, s: _Slot) -> None:
        if not self.distributed:
            s.update = self._direction(s)  # (n, R, C) or (R, C)
        elif s.is_bank:
            s.upd_shard.copy_(self._direction(s))
            s.handle = _all_gather(s.update, s.upd_shard, group=self.pg, async_op=True)
        else:
            if s.owner == self.rank:
                s.update.copy_(self._direction(s))
            s.handle = dist.broadcast(s.update, src=self._global(s.owner), group=self.pg, async_op=True)

    def _finish(self, s: _Slot) -> None:
        if s.handle is not None:
            s.handle.wait()
            s.handle = None
        upd = s.update[: s.n] if (s.is_bank and self.distributed) else s.update
        apply_update_(s.param, upd, s.group["lr"], s.group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """Momentum + NS5 on this rank's share, all-gather, apply; bank k's gather overlaps k+1's NS."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._launched:
            self.launch_reduce_scatters()
        pending = None
        for s in self._slots:
            self._wait_reduction(s)
            self._launch_gather(s)
            if pending is not None:
                self._finish(pending)
            pending = s
        if pending is not None:
            self._finish(pending)
        self._launched = self._reduced = False
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also drops reductions launched but never stepped (a skipped step), after they finish."""
        for s in self._slots:
            if s.handle is not None:
                s.handle.wait()
                s.handle = None
        self._launched = self._reduced = False
        super().zero_grad(set_to_none=set_to_none)

    # -- state ----------------------------------------------------------------------------------
    def _full_momentum(self, s: _Slot) -> Tensor:
        """The whole momentum of one param, identical on every rank (a collective call)."""
        if not self.distributed:
            return s.momentum.clone()
        if s.is_bank:
            full = torch.empty(s.per_rank * self.world, *s.param.shape[1:], device=s.param.device,
                               dtype=torch.float32)
            _all_gather(full, s.momentum, group=self.pg)
            return full[: s.n].clone()
        buf = s.momentum.clone() if s.owner == self.rank else torch.empty_like(s.param, dtype=torch.float32)
        dist.broadcast(buf, src=self._global(s.owner), group=self.pg)
        return buf

    def state_dict(self) -> dict:
        """Full (un-sharded) momentum in `torch.optim.Optimizer` format; call on every rank."""
        state, groups, idx = {}, [], 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                state[idx] = {"momentum_buffer": self._full_momentum(self._slot_of[id(p)])}
                ids.append(idx)
                idx += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of `ParallelMuon` or `Muon` (any world size); re-shards momentum."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"Muon state_dict has {len(saved)} param groups, optimizer has {len(self.param_groups)}")
        idx = 0
        for group, sg in zip(self.param_groups, saved):
            if len(sg["params"]) != len(group["params"]):
                raise ValueError(f"Muon state_dict group has {len(sg['params'])} params, optimizer has {len(group['params'])}")
            for p, key in zip(group["params"], sg["params"]):
                entry = state_dict["state"].get(key) or state_dict["state"].get(str(key))
                self._load_momentum(self._slot_of[id(p)], None if entry is None else entry["momentum_buffer"], idx)
                idx += 1
            group.update({k: v for k, v in sg.items() if k != "params"})

    @torch.no_grad()
    def _load_momentum(self, s: _Slot, full: Tensor | None, idx: int) -> None:
        if full is not None and tuple(full.shape) != tuple(s.param.shape):
            raise ValueError(f"Muon state_dict param #{idx}: momentum shape {tuple(full.shape)} "
                             f"!= param shape {tuple(s.param.shape)}")
        if s.momentum is None:
            return
        s.momentum.zero_()
        if full is None:
            return
        full = full.to(device=s.momentum.device, dtype=torch.float32)
        if not s.is_bank:
            s.momentum.copy_(full)
            return
        lo = self.rank * s.per_rank
        hi = min(lo + s.per_rank, s.n)
        if hi > lo:
            s.momentum[: hi - lo].copy_(full[lo:hi])


# ----------------------------------------------------------------------------------------------
# the optimizer bundle of training
# ----------------------------------------------------------------------------------------------

def _flat_all_reduce_avg(tensors: list[Tensor], world: int) -> None:
    """Average tensors over ranks in place with one fp32 all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])  # (N,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def _clone_tree(obj):
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    return obj


class Optimizers:
    """Muon ("matrix") + AdamW ("embed", "scalar"); the trainer calls only backward before `step`.

    Order inside a step when distributed: launch Muon reductions; all-reduce the replicated
    (AdamW) gradients; optional clip by the global norm; AdamW steps; Muon step. With
    `clip_scope="local"` (`train.grad_clip_scope`, PR #2135's order) the clip comes first instead:
    each rank scales its own gradients by its own norm, then they are averaged.
    """

    def __init__(self, muon: Muon | ParallelMuon, adams: dict[str, torch.optim.AdamW], world_size: int = 1,
                 clip_scope: str = "global"):
        if clip_scope not in ("global", "local"):
            raise ValueError(f"clip_scope must be global or local, got {clip_scope!r}")
        self.muon = muon
        self.adams = adams
        self.world = world_size
        self.clip_scope = clip_scope
        self.named = {"muon": muon, **adams}
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.named.items()}
        self._communicated = False

    def _replicated_params(self) -> list[Tensor]:
        return [p for opt in self.adams.values() for g in opt.param_groups for p in g["params"]]

    def _communicate(self) -> None:
        """Average all gradients over ranks (once per step); a no-op on one process."""
        if self.world == 1 or self._communicated:
            return
        self.muon.launch_reduce_scatters()
        params = self._replicated_params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _flat_all_reduce_avg([p.grad for p in params], self.world)
        self._communicated = True

    def _muon_grads(self) -> list[Tensor]:
        if isinstance(self.muon, ParallelMuon):
            return self.muon.averaged_grads()
        return [p.grad for g in self.muon.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip all gradients by the norm of the averaged (global) gradient; returns that norm.

        Distributed: averages first (reduce-scatter / all-reduce), sums the squared norms of the
        Muon shares with one all-reduce, adds the replicated grads' (identical on all ranks)
        squared norm, then scales every gradient by min(1, max_norm / (norm + 1e-6)).
        `clip_scope="local"` with world > 1: the same rule on each rank's own gradients before
        any averaging; returns this rank's norm. (On one process both scopes are the same.)
        """
        if self.clip_scope == "local" and self.world > 1:
            return self._clip_local_(max_norm)
        self._communicate()
        muon_g = self._muon_grads()
        rep_g = [p.grad for p in self._replicated_params() if p.grad is not None]
        dev = self._replicated_params()[0].device
        sq_muon = sum((g.float().square().sum() for g in muon_g), torch.zeros((), device=dev))
        if self.world > 1:
            dist.all_reduce(sq_muon, op=dist.ReduceOp.SUM)
        sq_rep = sum((g.float().square().sum() for g in rep_g), torch.zeros((), device=dev))
        norm = (sq_muon + sq_rep).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in muon_g + rep_g:
            g.mul_(coef.to(g.dtype))
        return norm

    def _clip_local_(self, max_norm: float) -> Tensor:
        """Clip this rank's un-averaged gradients by their own norm (no communication)."""
        if self._communicated:
            raise RuntimeError("train.grad_clip_scope local clips before the gradients are averaged, "
                               "not after")
        grads = [p.grad for opt in self.named.values() for g in opt.param_groups for p in g["params"]
                 if p.grad is not None]
        dev = self._replicated_params()[0].device
        norm = sum((g.float().square().sum() for g in grads), torch.zeros((), device=dev)).sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    def step(self, lr_scale: float = 1.0, muon_momentum: float | None = None) -> None:
        """Set lr = base*lr_scale for every group (and Muon's momentum); communicate; update."""
        for name, opt in self.named.items():
            for g, base in zip(opt.param_groups, self.base_lrs[name]):
                g["lr"] = base * lr_scale
        if muon_momentum is not None:
            for g in self.muon.param_groups:
                g["momentum"] = muon_momentum
        self._communicate()
        for opt in self.adams.values():
            opt.step()
        self.muon.step()
        self._communicated = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear all gradients; a step skipped after `clip_grad_norm_` leaves nothing behind."""
        self._communicated = False
        for opt in self.named.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """{"muon", "embed", "scalar"} optimizer states: full tensors (world-size independent),
        copied, so later steps do not change a saved state (e.g. the pre-warmup snapshot).
        A collective when distributed (Muon momentum is gathered): call it on every rank."""
        return {name: _clone_tree(opt.state_dict()) for name, opt in self.named.items()}

    def load_state_dict(self, d: dict) -> None:
        missing = sorted(set(self.named) - set(d))
        if missing:
            raise ValueError(f"optimizer state_dict lacks {', '.join(missing)}")
        for name, opt in self.named.items():
            opt.load_state_dict(_clone_tree(d[name]))  # torch's loaders alias the given tensors


_COMM_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def _comm_dtype(cfg) -> torch.dtype | None:
    """`train.muon_comm_dtype` (auto | bf16 | fp32); auto = bf16 on CUDA, fp32 on CPU."""
    name = cfg.muon_comm_dtype
    if name not in _COMM_DTYPES:
        raise ValueError(f"train.muon_comm_dtype must be one of {sorted(_COMM_DTYPES)}, got {name!r}")
    return _COMM_DTYPES[name]


def build_optimizers(groups: dict[str, list[Tensor]], cfg, dist_info) -> Optimizers:
    """Muon (sharded when world > 1) for groups["matrix"], AdamW for "embed" and "scalar" (§4.2).

    `cfg` is a TrainConfig: matrix_lr, muon_wd, muon_ns_steps, muon_ns_coeffs, muon_momentum,
    muon_row_normalize, tied_embed_lr, embed_wd (the embed group's AdamW decay), scalar_lr, adam_wd
    (the scalar group's), beta1, beta2, adam_eps, grad_clip_scope, compile (NS5 compiled on CUDA), and
    optionally muon_comm_dtype. `dist_info` (pgolf.shared.dist.DistInfo or None) gives the world size and device.
    """
    for key in ("matrix", "embed", "scalar"):
        if not groups.get(key):
            raise ValueError(f"optimizer group '{key}' is missing or empty (groups: {sorted(groups)})")
    world = dist_info.world_size if dist_info is not None else 1
    cuda = dist_info is not None and dist_info.device.type == "cuda"
    compile_ns = cfg.compile and cuda
    mk = dict(lr=cfg.matrix_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_wd,
              ns_steps=cfg.muon_ns_steps, nesterov=True, compile=compile_ns,
              ns_coeffs=cfg.muon_ns_coeffs, row_normalize=cfg.muon_row_normalize)
    if world > 1:
        muon = ParallelMuon(groups["matrix"], comm_dtype=_comm_dtype(cfg), **mk)
    else:
        muon = Muon(groups["matrix"], **mk)
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    if cuda:
        adam_kw["fused"] = True
    adams = {name: torch.optim.AdamW(groups[name], lr=lr, weight_decay=wd, **adam_kw)
             for name, lr, wd in (("embed", cfg.tied_embed_lr, cfg.embed_wd),
                                  ("scalar", cfg.scalar_lr, cfg.adam_wd))}
    return Optimizers(muon, adams, world, cfg.grad_clip_scope)
