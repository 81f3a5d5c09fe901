"""Full GPTQ (recipe-spec §6.3) and GPTQ-lite (§6.2) for per-row symmetric integer codes.

This module owns the math of turning one float matrix W (rows, cols) into integer codes in
[-qmax, qmax] and a per-row fp16 scale, given the input Hessian H = E[x x^T] (cols, cols):

1. Dead inputs (diag H == 0): their diagonal becomes 1 and their weight column 0 (§6.3 step 1).
2. Damping: H + damp * mean(diag H) * I. If a Cholesky factorisation fails, the damping of that
   matrix is multiplied by 10 and retried (up to `max_damp_retries` times); the damping used and
   the retry count are returned so the stage can report them. A matrix that still fails falls
   back to GPTQ-lite (method "gptq_lite_fallback"), never silently.
3. Act-order: columns by descending diag H (stable sort, so ties keep their index order).
4. U = upper Cholesky factor of H^-1 (the standard GPTQ formulation); columns are quantized one at
   a time with the error propagated lazily in blocks of `block_size`: inside a block through the
   rows of U, after the block to all later columns by one matmul E_block @ U[block, later].
5. Clip search, per row: every candidate quantile p gives a per-row scale from
   `pgolf.shared.rowquant.row_scale` (the fp16 scale that is stored, and the rule QAT trained against), the
   whole GPTQ pass is run for every candidate at once (the candidates are stacked as extra rows:
   GPTQ rows are independent given U), and each row keeps the candidate with the lowest
   Hessian-weighted output error d H d^T (d = that row's w - q*s), i.e. the mean squared output
   error over the calibration tokens. Ties keep the earlier candidate. With `sigmas` > 0 (the
   sigma rule of PR #2135, `pgolf.shared.rowquant.sigma_scale`) each row has one clip,
   `sigmas` standard deviations of the row, and there is nothing to choose.

Everything is vectorised over rows, candidates and over all matrices of the same shape (a
batch dimension M), runs on whatever device the inputs are on, and is deterministic.
Round-to-nearest (RTN) with the same candidates and the same per-row choice rule is computed
alongside, so callers can report GPTQ's error relative to RTN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pgolf.shared.rowquant import quantize, row_scale, sigma_scale


@dataclass(frozen=True)
class GPTQSpec:
    qmax: int  # codes in [-qmax, qmax]
    quantiles: tuple[float, ...]  # per-row clip candidates (1.0 = row max)
    damp: float = 0.01  # fraction of mean(diag H)
    block_size: int = 128
    act_order: bool = True
    max_damp_retries: int = 6  # damping x10 per retry: 0.01 -> 1e4 at most
    sigmas: float = 0.0  # > 0: the sigma clip rule (one clip per row), `quantiles` unused

    @property
    def k(self) -> int:
        """Clip candidates per row."""
        return 1 if self.sigmas > 0 else len(self.quantiles)

    def labels(self) -> tuple[str, ...]:
        """One name per candidate (table.json's clip_rows keys)."""
        return (f"sigma={self.sigmas!r}",) if self.sigmas > 0 else tuple(repr(p) for p in self.quantiles)


@dataclass
class MatrixResult:
    q: torch.Tensor  # (rows, cols) int8 codes, on CPU
    scale: torch.Tensor  # (rows,) fp16, on CPU
    method: str  # "gptq" | "gptq_lite" | "gptq_lite_fallback"
    err: float  # sum over rows of d H d^T (GPTQ-lite: sum of squared errors)
    err_rtn: float  # the same for round-to-nearest with the same candidates and choice rule
    choice: list[int] = field(default_factory=list)  # rows that picked each candidate
    damp: float | None = None  # damping fraction finally used (None: no Hessian, or failed)
    damp_retries: int = 0
    dead_columns: int = 0


# ----------------------------------------------------------------------------- Hessian prep


def fix_dead(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dead inputs: unit diagonal, zero weight column. W (M, R, C), H (M, C, C) -> copies + dead (M, C)."""
    H = 0.5 * (H.float() + H.float().transpose(-1, -2))  # exact copy for a symmetric H
    W = W.float().clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)  # (M, C) view into H
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    return W, H, dead


def inverse_factor(H: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, list, list]:
    """U = upper Cholesky factor of (H + λ I)^-1, λ = damp * mean(diag H), per matrix of H (M, C, C).

    Computed in float64. A matrix whose factorisation fails is retried with damp x10.
    Returns U (M, C, C) fp32 (zeros where it failed), the damping fraction used per matrix
    (None = failed every retry), and the number of retries per matrix.
    """
    M, C, _ = H.shape
    H64 = H.double()
    mean_diag = torch.diagonal(H64, dim1=-2, dim2=-1).mean(-1)  # (M,)
    eye = torch.eye(C, dtype=torch.float64, device=H.device)
    U = torch.zeros_like(H64)
    used: list = [None] * M
    retries = [0] * M
    todo = list(range(M))
    frac = damp
    for attempt in range(max_retries + 1):
        idx = torch.tensor(todo, device=H.device)
        Hd = H64[idx] + (frac * mean_diag[idx])[:, None, None] * eye  # (m, C, C)
        ok = _factor_into(U, idx, Hd)
        for m, good in zip(todo, ok):
            retries[m] = attempt
            if good:
                used[m] = frac
        todo = [m for m, good in zip(todo, ok) if not good]
        if not todo:
            break
        frac *= 10.0
    return U.float(), used, retries


def _factor_into(U: torch.Tensor, idx: torch.Tensor, Hd: torch.Tensor) -> list[bool]:
    """Write chol_upper(inverse(Hd)) into U[idx] where both factorisations succeed; -> ok per matrix."""
    L, info = torch.linalg.cholesky_ex(Hd)  # (m, C, C) lower
    ok = (info == 0).tolist()
    good = [j for j, g in enumerate(ok) if g]
    if good:
        g = torch.tensor(good, device=Hd.device)
        Hinv = torch.cholesky_inverse(L[g])  # (g, C, C)
        Ug, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
        fine = ((info2 == 0) & torch.isfinite(Ug).flatten(1).all(1)).tolist()
        for k, j in enumerate(good):
            if fine[k]:
                U[idx[j]] = Ug[k]
            else:
                ok[j] = False
    return ok


def act_order_perm(H: torch.Tensor) -> torch.Tensor:
    """(M, C, C) -> (M, C) column order by descending diag H, ties by index."""
    return torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


def permute_cols(W: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """W (M, N, C), perm (M, C) -> W[:, :, perm] per matrix."""
    return W.gather(-1, perm[:, None, :].expand_as(W))


def permute_sym(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H (M, C, C) -> H[perm][:, perm] per matrix."""
    Hc = H.gather(-1, perm[:, None, :].expand_as(H))
    return Hc.gather(-2, perm[:, :, None].expand_as(H))


# ----------------------------------------------------------------------------- the GPTQ pass


def gptq_pass(W: torch.Tensor, S: torch.Tensor, U: torch.Tensor, qmax: int, block: int) -> torch.Tensor:
    """Quantize W (M, N, C) column by column with fixed scales S (M, N) and factor U (M, C, C).

    Standard lazy-batch GPTQ: error e_i = (w_i - q_i s) / U_ii goes to the rest of the block
    through U[i, i:], and to the later columns by one batched matmul per block. -> int8 (M, N, C).
    """
    M, N, C = W.shape
    W = W.clone()
    Q = torch.empty(M, N, C, dtype=torch.int8, device=W.device)
    for c0 in range(0, C, block):
        c1 = min(c0 + block, C)
        W1 = W[:, :, c0:c1].clone()  # (M, N, B)
        E1 = torch.empty_like(W1)  # (M, N, B) scaled errors
        U1 = U[:, c0:c1, c0:c1]  # (M, B, B)
        for i in range(c1 - c0):
            w = W1[:, :, i]  # (M, N)
            q = quantize(w[..., None], S, qmax)[..., 0]  # (M, N) int8, the shared rule
            Q[:, :, c0 + i] = q
            e = (w - q.float() * S) / U1[:, i, i][:, None]  # (M, N)
            W1[:, :, i:] -= e[:, :, None] * U1[:, None, i, i:]  # (M, N, B-i)
            E1[:, :, i] = e
        if c1 < C:
            W[:, :, c1:] -= torch.bmm(E1, U[:, c0:c1, c1:])  # (M, N, B) @ (M, B, C-c1)
    return Q


def row_errors(W: torch.Tensor, Q: torch.Tensor, S: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Per-row d H d^T (or d d^T when H is None), d = W - Q*S. W, Q (M, N, C), S (M, N) -> (M, N)."""
    D = W - Q.float() * S[..., None]  # (M, N, C)
    if H is None:
        return (D * D).sum(-1)
    return (torch.bmm(D, H) * D).sum(-1)


def _candidate_scales(W: torch.Tensor, spec: GPTQSpec) -> torch.Tensor:
    """W (M, R, C) -> (M, K*R) scales, candidate-major (rows of candidate k at k*R..k*R+R-1)."""
    if spec.sigmas > 0:
        return sigma_scale(W, spec.sigmas, spec.qmax)  # (M, R), K = 1
    return torch.cat([row_scale(W, p, spec.qmax) for p in spec.quantiles], dim=1)


def _pick(err: torch.Tensor, Q: torch.Tensor, S: torch.Tensor, K: int) -> tuple:
    """Per row, the candidate with the lowest error. err (M, K*R), Q (M, K*R, C), S (M, K*R)."""
    M, KR, C = Q.shape
    R = KR // K
    e = err.view(M, K, R)
    best = torch.argmin(e, dim=1)  # (M, R), first minimum on ties
    q = Q.view(M, K, R, C).gather(1, best[:, None, :, None].expand(M, 1, R, C))[:, 0]  # (M, R, C)
    s = S.view(M, K, R).gather(1, best[:, None, :])[:, 0]  # (M, R)
    chosen = e.gather(1, best[:, None, :])[:, 0]  # (M, R)
    return q, s, chosen, best


def _counts(best: torch.Tensor, K: int) -> list[list[int]]:
    """best (M, R) -> per matrix, the number of rows that picked each of the K candidates."""
    return torch.stack([(best == k).sum(-1) for k in range(K)], dim=-1).tolist()


def rtn_batch(W: torch.Tensor, H: torch.Tensor | None, spec: GPTQSpec) -> tuple:
    """Round-to-nearest with per-row best candidate: -> q (M, R, C), s (M, R), err (M, R), best (M, R)."""
    K = spec.k
    S = _candidate_scales(W, spec)  # (M, K*R)
    Wk = W.repeat(1, K, 1)  # (M, K*R, C)
    Q = quantize(Wk, S, spec.qmax)  # (M, K*R, C)
    return _pick(row_errors(Wk, Q, S, H), Q, S, K)


def gptq_batch(W: torch.Tensor, H: torch.Tensor, spec: GPTQSpec) -> list[MatrixResult]:
    """Full GPTQ of M same-shape matrices: W (M, R, C), H (M, C, C) on one device."""
    K = spec.k
    W, H, dead = fix_dead(W, H)
    perm = act_order_perm(H) if spec.act_order else None  # (M, C)
    U, used, retries = inverse_factor(H if perm is None else permute_sym(H, perm), spec.damp,
                                      spec.max_damp_retries)
    _, _, err_rtn, _ = rtn_batch(W, H, spec)
    S = _candidate_scales(W, spec)  # (M, K*R), from the unpermuted W
    Wk = W.repeat(1, K, 1)  # (M, K*R, C)
    Q = _gptq_codes(Wk, S, U, perm, spec)  # (M, K*R, C)
    q, s, err, best = _pick(row_errors(Wk, Q, S, H), Q, S, K)
    out = []
    for m in range(W.shape[0]):
        if used[m] is None:  # every damping failed: GPTQ-lite on this matrix, reported as such
            ql, sl, _, bl = rtn_batch(W[m:m + 1], None, spec)
            e_h = row_errors(W[m:m + 1], ql, sl, H[m:m + 1]).sum()
            out.append(_result(ql[0], sl[0], "gptq_lite_fallback", e_h, err_rtn[m].sum(), _counts(bl, K)[0],
                               None, retries[m], dead[m]))
        else:
            out.append(_result(q[m], s[m], "gptq", err[m].sum(), err_rtn[m].sum(),
                               _counts(best[m:m + 1], K)[0], used[m], retries[m], dead[m]))
    return out


def _gptq_codes(Wk: torch.Tensor, S: torch.Tensor, U: torch.Tensor, perm: torch.Tensor | None,
                spec: GPTQSpec) -> torch.Tensor:
    """GPTQ codes of the stacked candidates Wk (M, K*R, C), returned in the original column order.

    With act-order, U is the factor of the permuted Hessian (a permuted Cholesky factor is not
    the factor of the permuted matrix) and the codes are scattered back afterwards.
    """
    if perm is None:
        return gptq_pass(Wk, S, U, spec.qmax, spec.block_size)
    Qp = gptq_pass(permute_cols(Wk, perm), S, U, spec.qmax, spec.block_size)  # (M, K*R, C) permuted
    return torch.empty_like(Qp).scatter_(-1, perm[:, None, :].expand_as(Qp), Qp)


def _result(q, s, method, err, err_rtn, choice, damp, retries, dead) -> MatrixResult:
    return MatrixResult(q=q.to(torch.int8).cpu(), scale=s.half().cpu(), method=method, err=float(err),
                        err_rtn=float(err_rtn), choice=[int(c) for c in choice], damp=damp,
                        damp_retries=int(retries), dead_columns=int(dead.sum()))


def gptq_lite_batch(W: torch.Tensor, spec: GPTQSpec) -> list[MatrixResult]:
    """GPTQ-lite (no Hessian): round-to-nearest, per row the candidate with the lowest squared error."""
    K = spec.k
    W = W.float()
    q, s, err, best = rtn_batch(W, None, spec)
    dead = torch.zeros(W.shape[0], W.shape[-1], dtype=torch.bool)
    return [_result(q[m], s[m], "gptq_lite", err[m].sum(), err[m].sum(), _counts(best[m:m + 1], K)[0],
                    None, 0, dead[m]) for m in range(W.shape[0])]


# ----------------------------------------------------------------------------- many matrices


def _groups(weights: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        groups.setdefault(tuple(w.shape), []).append(name)
    return groups


def gptq_matrices(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], spec: GPTQSpec,
                  device: torch.device | str = "cpu") -> dict[str, MatrixResult]:
    """Full GPTQ of every (rows, cols) matrix in `weights` with hessians[name] (cols, cols).

    Matrices of the same shape are batched into one pass on `device`; results come back on CPU
    in the order of `weights`.
    """
    out: dict[str, MatrixResult] = {}
    for names in _groups(weights).values():
        W = torch.stack([weights[n].float() for n in names]).to(device)  # (M, R, C)
        H = torch.stack([hessians[n].float() for n in names]).to(device)  # (M, C, C)
        out.update(zip(names, gptq_batch(W, H, spec)))
    return {n: out[n] for n in weights}


def gptq_lite_matrices(weights: dict[str, torch.Tensor], spec: GPTQSpec,
                       device: torch.device | str = "cpu") -> dict[str, MatrixResult]:
    out: dict[str, MatrixResult] = {}
    for names in _groups(weights).values():
        W = torch.stack([weights[n].float() for n in names]).to(device)
        out.update(zip(names, gptq_lite_batch(W, spec)))
    return {n: out[n] for n in weights}
