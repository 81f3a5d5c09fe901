"""Full GPTQ (pgolf.quantize.gptq): against a plain reference implementation, against round-to-nearest
(RTN) at the same bits and scale rule, per-row clip choice, act-order, dead columns, damping."""

import pytest
import torch

from _quant_model import MICRO, eval_loss, trained
from conftest import assert_codes_close
from pgolf.shared import rowquant
from pgolf.quantize.gptq import GPTQSpec, gptq_batch, gptq_lite_batch, gptq_matrices, row_errors

QS = (0.999, 0.9995, 0.9999, 0.99999, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated(rows: int, cols: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (rows, cols) with row clips > 1 (so the clip candidates differ) and X (tokens, cols) with a
    strongly non-identity covariance: mixed columns, log-spread column scales, a shared offset."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.6
    X = activations(cols, tokens, seed=seed)
    return W, X


def activations(cols: int, tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000)  # the same distribution for every seed
    A = torch.randn(cols, cols, generator=g) / cols ** 0.5
    col_scale = torch.logspace(-1, 0.5, cols)[torch.randperm(cols, generator=g)]
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, cols, generator=g)
    return (Z @ A) * col_scale + 0.7 * torch.randn(tokens, 1, generator=g)


def gram(X: torch.Tensor) -> torch.Tensor:
    return X.T @ X / X.shape[0]


def out_err(W, q, s, X) -> float:
    """||(W - q s) X^T||^2."""
    return float(((W - rowquant.dequantize(q, s.float())) @ X.T).pow(2).sum())


def rtn(W, quantile, qmax=31):
    s = rowquant.row_scale(W, quantile, qmax)
    return rowquant.quantize(W, s, qmax), s


def reference_gptq(W, H, s, qmax, damp):
    """Textbook GPTQ, one column at a time in float64, no act-order, no lazy blocks."""
    W, H = W.double().clone(), H.double().clone()
    n = H.shape[0]
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    s = s.double()
    for i in range(n):
        q = torch.clamp(torch.round(W[:, i] / s), -qmax, qmax)
        Q[:, i] = q
        e = (W[:, i] - q * s) / U[i, i]
        W[:, i:] -= e[:, None] * U[i, i:][None]
    return Q.to(torch.int8)


def one(W, H, **kw):
    spec = GPTQSpec(qmax=kw.pop("qmax", 31), quantiles=kw.pop("quantiles", QS), **kw)
    return gptq_batch(W[None], H[None], spec)[0]


def test_lazy_blocks_match_the_plain_reference():
    W, X = correlated(48, 80, 2000, seed=0)
    H = gram(X)
    r = one(W, H, quantiles=(1.0,), act_order=False, block_size=16)
    ref = reference_gptq(W, H, rowquant.row_scale(W, 1.0, 31), 31, 0.01)
    assert (r.q == ref).float().mean() >= 0.999  # measured: 1.0 (every code equal)
    r2 = one(W, H, quantiles=(1.0,), act_order=False, block_size=128)
    assert (r2.q == r.q).float().mean() >= 0.999
    assert r2.err == pytest.approx(r.err, rel=1e-3)


def test_beats_round_to_nearest_on_correlated_inputs():
    """Held-out output error ||(W - Ŵ) X||^2 on fresh tokens of the same distribution.

    Measured (64 x 128, 4000 calibration tokens, no row on the scale floor): fixed quantile 0.9995,
    GPTQ/RTN = 0.249 held out (0.241 on the calibration tokens); per-row clip search on both
    sides = 0.278 held out (0.270 calibration; rows chose the 5 candidates 22/16/15/9/2 times).
    Asserted: < 0.5.
    """
    W, X = correlated(64, 128, 4000, seed=1)
    X2 = activations(128, 4000, seed=2)
    H = gram(X)
    r = one(W, H, quantiles=(0.9995,))
    q0, s0 = rtn(W, 0.9995)
    assert torch.equal(r.scale.float(), s0)  # same scale rule: GPTQ's scale is the stored fp16 RTN scale
    ratio_fixed = out_err(W, r.q, r.scale, X2) / out_err(W, q0, s0, X2)
    assert ratio_fixed < 0.5
    rs = one(W, H)
    assert rs.err / rs.err_rtn < 0.5  # calibration-set ratio, as the stage reports it
    assert rs.err <= r.err * (1 + 1e-6)  # the search includes 0.9995


def test_beats_round_to_nearest_on_a_trained_model():
    """A 2-layer GPT trained 40 AdamW steps (tests/_quant_model.py), its 12 block matrices with the
    Hessians of its own activations. Every row's clip lands on the 1/31 scale floor here, so all
    candidates share one scale. Measured: output error on held-out tokens GPTQ/RTN = 0.32
    (calibration 0.31); loss float 3.7407, GPTQ 3.7447, RTN 3.7531. Asserted: ratio < 0.5, and
    GPTQ's loss is closer to the float loss than RTN's."""
    w, h_cal, h_val = trained()
    names = list(h_cal)
    spec = GPTQSpec(qmax=31, quantiles=QS)
    res = gptq_matrices({n: w[n] for n in names}, h_cal, spec)
    held_gptq = held_rtn = 0.0
    for n in names:
        r, H = res[n], h_val[n]
        held_gptq += float(row_errors(w[n][None], r.q[None], r.scale.float()[None], H[None]).sum())
        q0, s0 = rtn(w[n], 0.9995)
        held_rtn += float(row_errors(w[n][None], q0[None], s0[None], H[None]).sum())
    assert held_gptq / held_rtn < 0.5
    sd_g, sd_r = dict(w), dict(w)
    for n in names:
        sd_g[n] = rowquant.dequantize(res[n].q, res[n].scale.float())
        q0, s0 = rtn(w[n], 0.9995)
        sd_r[n] = rowquant.dequantize(q0, s0)
    base = eval_loss(w)
    assert abs(eval_loss(sd_g) - base) < abs(eval_loss(sd_r) - base)
    assert len(names) == 6 * MICRO.num_layers


def test_per_row_choice_is_the_best_candidate_of_each_row():
    W, X = correlated(40, 64, 1500, seed=3)
    W[::3, 5] *= 8.0  # outliers: clipping helps these rows, the row max suits the others
    H = gram(X)
    multi = one(W, H)
    singles = [one(W, H, quantiles=(p,)) for p in QS]
    row_err = torch.stack([row_errors(W[None], s.q[None], s.scale.float()[None], H[None])[0] for s in singles])
    best = torch.argmin(row_err, dim=0)  # (rows,)
    for i in range(W.shape[0]):  # rows are independent: each row equals its best single run's row
        k = int(best[i])
        assert_codes_close(multi.q[i], singles[k].q[i])
        assert multi.scale[i] == rowquant.row_scale(W[i:i + 1], QS[k], 31).half()[0]
    assert multi.err == pytest.approx(float(row_err.min(0).values.sum()), rel=1e-5)
    assert sum(multi.choice) == W.shape[0] and sum(1 for c in multi.choice if c) >= 2  # rows differ
    assert multi.q.dtype == torch.int8 and int(multi.q.abs().max()) <= 31
    assert multi.scale.dtype == torch.float16


def test_act_order_is_permutation_equivariant():
    """Act-order sorts columns by diag H, so permuting the inputs permutes the codes exactly."""
    W, X = correlated(24, 48, 1000, seed=4)
    H = gram(X)
    p = torch.randperm(48, generator=torch.Generator().manual_seed(5))
    a = one(W, H, block_size=16)
    b = one(W[:, p], H[p][:, p], block_size=16)
    assert torch.equal(b.q, a.q[:, p]) and torch.equal(a.scale, b.scale)
    no = one(W, H, act_order=False, block_size=16)
    assert not torch.equal(no.q, a.q)


def test_dead_columns_get_zero_codes():
    W, X = correlated(16, 32, 500, seed=6)
    X[:, [3, 17]] = 0.0  # inputs that were always zero
    r = one(W, gram(X))
    assert r.dead_columns == 2 and r.method == "gptq"
    assert not r.q[:, [3, 17]].any()
    assert torch.isfinite(torch.tensor(r.err))


def test_failed_cholesky_retries_with_more_damping_then_falls_back():
    """An indefinite 'Hessian' (eigenvalues 3.5 and -1.5 per 2x2 block, mean diagonal 1): damping
    0.01, 0.1 and 1.0 fail, 10.0 works -> 3 retries, reported."""
    C = 16
    H = torch.kron(torch.eye(C // 2), torch.tensor([[1.0, 2.5], [2.5, 1.0]]))
    W = torch.randn(8, C, generator=torch.Generator().manual_seed(7))
    r = one(W, H)
    assert r.method == "gptq" and r.damp_retries == 3 and r.damp == pytest.approx(10.0)
    f = one(W, H, max_damp_retries=1)
    assert f.method == "gptq_lite_fallback" and f.damp is None
    assert int(f.q.abs().max()) <= 31


def test_batched_equals_one_by_one_and_is_deterministic():
    mats = [correlated(16, 32, 400, seed=s) for s in (8, 9, 10)]
    W = torch.stack([m[0] for m in mats])
    H = torch.stack([gram(m[1]) for m in mats])
    spec = GPTQSpec(qmax=31, quantiles=QS)
    batch = gptq_batch(W, H, spec)
    again = gptq_batch(W, H, spec)
    for k in range(3):
        single = gptq_batch(W[k:k + 1], H[k:k + 1], spec)[0]
        assert_codes_close(batch[k].q, single.q)  # other batch shape: other float summation order
        assert torch.equal(batch[k].scale, single.scale)
        assert torch.equal(batch[k].q, again[k].q)  # the very same computation: bit-identical


def test_bits_set_the_code_range():
    W, X = correlated(16, 32, 400, seed=11)
    for bits in (2, 4, 8):
        qmax = rowquant.qmax_for(bits)
        r = one(W, gram(X), qmax=qmax)
        assert int(r.q.abs().max()) <= qmax
        assert torch.equal(r.scale.float(), rowquant.fp16_round(r.scale.float()))


def test_gptq_lite_picks_per_row_mse_best():
    W, _ = correlated(20, 64, 10, seed=12)
    W[::2, 0] *= 10
    r = gptq_lite_batch(W[None], GPTQSpec(qmax=31, quantiles=QS))[0]
    for i in range(20):
        errs = [float((W[i] - rowquant.dequantize(*rtn(W[i:i + 1], p))[0]).pow(2).sum()) for p in QS]
        got = float((W[i] - rowquant.dequantize(r.q[i:i + 1], r.scale[i:i + 1].float())[0]).pow(2).sum())
        assert got == pytest.approx(min(errs), rel=1e-6)
    assert r.method == "gptq_lite"


@pytest.mark.gpu
def test_cuda_matches_cpu():
    W, X = correlated(64, 128, 2000, seed=13)
    H = gram(X)
    spec = GPTQSpec(qmax=31, quantiles=QS)
    cpu = gptq_batch(W[None], H[None], spec)[0]
    gpu = gptq_batch(W[None].cuda(), H[None].cuda(), spec)[0]
    assert (cpu.q == gpu.q).float().mean() > 0.99
    assert gpu.err == pytest.approx(cpu.err, rel=0.02)


def test_sigma_rule_has_one_clip_per_row_from_the_row_std():
    W, X = correlated(16, 64, 400, seed=14)
    r = one(W, gram(X), quantiles=(), sigmas=3.0)
    assert torch.equal(r.scale.float(), rowquant.sigma_scale(W, 3.0, 31))
    assert r.choice == [16] and GPTQSpec(qmax=31, quantiles=QS, sigmas=3.0).labels() == ("sigma=3.0",)
    assert int(r.q.abs().max()) == 31  # 3 sigmas clips the tails
    assert r.err < r.err_rtn


def test_int7_codes_stay_in_range_and_beat_int6_on_the_same_matrix():
    """embed_bits 7 (PR #2135's tok_emb): codes in [-63, 63], a smaller output error than int6 under
    both clip rules (measured, d H d^T summed: sigma 14 int6 11.89 vs int7 2.68; quantile 0.421 vs 0.101)."""
    W, X = correlated(32, 128, 2000, seed=15)
    H = gram(X)
    for kw in ({"quantiles": (), "sigmas": 14.0}, {}):
        r6, r7 = one(W, H, qmax=31, **kw), one(W, H, qmax=63, **kw)
        assert int(r7.q.abs().max()) <= 63 and int(r6.q.abs().max()) <= 31
        assert r7.err < 0.5 * r6.err, (kw, r6.err, r7.err)


@pytest.mark.parametrize("qmax,sigmas", [(31, 12.85), (31, 4.0), (63, 14.0)])
def test_sigma_rule_matches_the_pr2135_anchor(qmax, sigmas):
    """The same matrix and Hessian through the script's gptq_quantize_weight (the logged run's
    matrix / tight / embedding settings): the same fp16 scales, the same codes."""
    from _anchors import load_script

    script = load_script("pr2135", {"VOCAB_SIZE": "8192"})
    W, X = correlated(48, 256, 3000, seed=16)
    W = W * 0.03  # trained-weight magnitudes: the sigma scale sits far below the quantile rule's floor
    H = gram(X)
    q_ref, s_ref = script.gptq_quantize_weight(W.clone(), H.clone(), clip_sigmas=sigmas, clip_range=qmax)
    r = one(W, H, qmax=qmax, quantiles=(), sigmas=sigmas)
    assert torch.equal(r.scale, s_ref)
    assert_codes_close(r.q, q_ref)  # measured: all 12,288 equal (fp64 vs fp32 factor: a tie could differ)
