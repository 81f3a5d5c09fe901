"""Tests of pgolf.train.optim: NS5 numerics, Muon vs hand-written and torch.optim.Muon references,
banks vs slices, ParallelMuon / Optimizers on 2 gloo processes vs one process on the full batch,
and state_dict round trips (including across world sizes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import spawn_ranks
import torch.nn.functional as F

from pgolf.config import TrainConfig
from pgolf.shared.dist import DistInfo
from pgolf.train.optim import (Muon, ParallelMuon, build_optimizers, ns_coefficients, shape_scale,
                         zeropower_via_newtonschulz5)

CPU1 = DistInfo(0, 0, 1, torch.device("cpu"))


# ------------------------------------------------------------------ hand-written references
def ref_ns5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Unbatched fp32 quintic Newton-Schulz written out from the spec (§4.3)."""
    X = G.double()
    if X.shape[0] > X.shape[1]:
        return ref_ns5(G.T, steps).T
    X = X / (torch.linalg.matrix_norm(X) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X.float()


def ref_muon_run(p0: torch.Tensor, grads: list[torch.Tensor], lrs, moms, wd, nesterov=True):
    """Muon on one matrix or bank, step by step, slice by slice, in float64 where possible."""
    p, buf = p0.clone().double(), torch.zeros_like(p0, dtype=torch.float64)
    for g, lr, mu in zip(grads, lrs, moms):
        buf = mu * buf + g.double()
        u = g.double() + mu * buf if nesterov else buf
        mats = u if u.ndim == 3 else u[None]
        upd = torch.stack([ref_ns5(m.float()).double() for m in mats]).reshape(u.shape)
        scale = math.sqrt(max(1.0, u.shape[-2] / u.shape[-1]))
        p = p * (1 - lr * wd) - lr * scale * upd
    return p.float()


# ------------------------------------------------------------------ NS5
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 40, 24), (2, 24, 40)])
def test_ns5_singular_values_in_quintic_band(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = zeropower_via_newtonschulz5(G)
    assert X.dtype == torch.float32 and X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.2, (s.min().item(), s.max().item())
    # same singular vectors as G: U^T X V is diagonal (X = U f(S) V^T)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    M = U.mT @ X @ Vh.mT
    off = M - torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))
    assert off.abs().max() < 1e-4


def test_ns5_matches_reference_batched_and_transposed():
    torch.manual_seed(1)
    G = torch.randn(4, 40, 24)
    X = zeropower_via_newtonschulz5(G)
    for i in range(4):
        torch.testing.assert_close(X[i], ref_ns5(G[i]), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(zeropower_via_newtonschulz5(G.mT.contiguous()), X.mT, atol=1e-6, rtol=1e-5)
    # scale invariance (per-matrix Frobenius normalization): scaling one slice changes nothing
    G2 = G.clone()
    G2[1] *= 1000.0
    torch.testing.assert_close(zeropower_via_newtonschulz5(G2), X, atol=1e-5, rtol=1e-4)


def test_ns5_bf16_close_to_fp32_and_zero_safe():
    torch.manual_seed(2)
    G = torch.randn(64, 32)
    Xb = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert Xb.dtype == torch.bfloat16
    assert (Xb.float() - zeropower_via_newtonschulz5(G)).abs().max() < 0.05
    assert zeropower_via_newtonschulz5(torch.zeros(2, 8, 4)).abs().max() == 0  # padding slots stay 0
    with pytest.raises(ValueError, match="matrix"):
        zeropower_via_newtonschulz5(torch.ones(5))


def test_shape_scale():
    assert shape_scale((1536, 512)) == pytest.approx(math.sqrt(3))
    assert shape_scale((11, 512, 128)) == pytest.approx(2.0)
    assert shape_scale((512, 1536)) == 1.0


# Polar Express tuples as printed in the records (PR #1787 / #1855 train_gpt.py), typed in again
PE_HAND = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
           (4.042929935166739, -2.808917465908714, 0.5000178451051316),
           (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
           (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
           (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def ref_polar_express(G: torch.Tensor, steps: int) -> torch.Tensor:
    """Unbatched float64 loop, iteration k with tuple k (wide orientation, Frobenius-normalized)."""
    if G.shape[0] > G.shape[1]:
        return ref_polar_express(G.T, steps).T
    X = G.double() / (torch.linalg.matrix_norm(G.double()) + 1e-7)
    for a, b, c in PE_HAND[:steps]:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.float()


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_polar_express_matches_hand_loop(steps):
    torch.manual_seed(5)
    G = torch.randn(3, 40, 24)
    X = zeropower_via_newtonschulz5(G, steps, coeffs="polar_express")
    for i in range(3):
        torch.testing.assert_close(X[i], ref_polar_express(G[i], steps), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(X, zeropower_via_newtonschulz5(G, steps))  # a different iteration
    torch.testing.assert_close(zeropower_via_newtonschulz5(G, steps, coeffs="quintic"),
                               zeropower_via_newtonschulz5(G, steps))  # the default is the seeds'


def test_polar_express_lands_closer_to_orthogonal_than_quintic():
    torch.manual_seed(6)
    G = torch.randn(64, 32)
    s_pe = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, 5, coeffs="polar_express"))
    s_q = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert (s_pe - 1).abs().max() < (s_q - 1).abs().max()
    assert (s_pe - 1).abs().max() < 0.15, s_pe


def test_ns_coefficient_schedules_and_errors():
    assert ns_coefficients("quintic", 3) == ((3.4445, -4.7750, 2.0315),) * 3
    assert list(ns_coefficients("polar_express", 5)) == PE_HAND
    with pytest.raises(ValueError, match=r"no Newton-Schulz schedule 'polar_express' of 6 steps"):
        ns_coefficients("polar_express", 6)
    with pytest.raises(ValueError, match=r"no Newton-Schulz schedule 'cubic'"):
        ns_coefficients("cubic", 5)
    with pytest.raises(ValueError, match=r"of 7 steps"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_steps=7, ns_coeffs="polar_express")
    from pgolf.config import NS_SCHEDULES  # the names and bounds train.muon_ns_* are checked against

    assert set(NS_SCHEDULES) == {"quintic", "polar_express"} and NS_SCHEDULES["polar_express"] == len(PE_HAND)


def test_muon_with_polar_express_steps_with_its_schedule():
    torch.manual_seed(7)
    p = torch.nn.Parameter(torch.randn(24, 16))
    p0, g = p.detach().clone(), torch.randn(24, 16)
    opt = Muon([p], lr=0.1, momentum=0.0, weight_decay=0.0, ns_steps=5, ns_coeffs="polar_express")
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), p0 - 0.1 * ref_polar_express(g, 5) * math.sqrt(1.5), atol=2e-6, rtol=1e-5)
    pm = torch.nn.Parameter(p0.clone())
    pm.grad = g.clone()
    ParallelMuon([pm], lr=0.1, momentum=0.0, weight_decay=0.0, ns_steps=5, ns_coeffs="polar_express").step()
    torch.testing.assert_close(pm.detach(), p.detach())  # the sharded class reads the same schedule


# ------------------------------------------------------------------ single-process Muon
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_hand_reference(nesterov):
    torch.manual_seed(3)
    shapes = [(48, 16), (16, 40), (3, 24, 16)]
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    p0 = [p.detach().clone() for p in ps]
    opt = Muon(ps, lr=0.03, momentum=0.9, weight_decay=0.1, ns_steps=5, nesterov=nesterov)
    lrs, moms = [0.03, 0.02, 0.01], [0.9, 0.8, 0.95]
    grads = [[torch.randn(*s) for _ in range(3)] for s in shapes]
    for t in range(3):
        for g in opt.param_groups:
            g["lr"], g["momentum"] = lrs[t], moms[t]
        for p, gs in zip(ps, grads):
            p.grad = gs[t].clone()
        opt.step()
    for p, q0, gs in zip(ps, p0, grads):
        ref = ref_muon_run(q0, gs, lrs, moms, 0.1, nesterov)
        torch.testing.assert_close(p.detach(), ref, atol=2e-5, rtol=1e-5)


def test_muon_matches_torch_optim_muon():
    """torch.optim.Muon: EMA momentum (buf.lerp(g, 1-mu)) and Nesterov g.lerp(buf, mu) equal ours
    up to a factor 1/(1-mu), which NS5's normalization removes; its NS5 is always bf16, so the
    comparison is at bf16 accuracy (ours fp32). A wrong Nesterov flag gives ~29% here."""
    torch.manual_seed(4)
    for shape in [(64, 32), (32, 64)]:
        p0 = torch.randn(*shape)
        pt = torch.nn.Parameter(p0.clone())
        po = torch.nn.Parameter(p0.clone())
        ot = torch.optim.Muon([pt], lr=0.02, weight_decay=0.04, momentum=0.95, nesterov=True,
                              adjust_lr_fn="original")
        oo = Muon([po], lr=0.02, weight_decay=0.04, momentum=0.95)
        for _ in range(4):
            g = torch.randn(*shape)
            pt.grad, po.grad = g.clone(), g.clone()
            ot.step()
            oo.step()
        dt, do = pt.detach() - p0, po.detach() - p0
        assert ((dt - do).norm() / dt.norm()) < 0.03


def test_bank_step_equals_per_slice_steps():
    torch.manual_seed(5)
    bank = torch.nn.Parameter(torch.randn(5, 32, 16))
    slices = [torch.nn.Parameter(bank.detach()[i].clone()) for i in range(5)]
    ob = Muon([bank], lr=0.05, momentum=0.9, weight_decay=0.04)
    os_ = Muon(slices, lr=0.05, momentum=0.9, weight_decay=0.04)
    for _ in range(3):
        g = torch.randn(5, 32, 16)
        bank.grad = g.clone()
        for i, p in enumerate(slices):
            p.grad = g[i].clone()
        ob.step()
        os_.step()
    torch.testing.assert_close(bank.detach(), torch.stack([p.detach() for p in slices]), atol=1e-6, rtol=1e-6)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="only 2-D matrices and 3-D banks"):
        Muon([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="only 2-D matrices and 3-D banks"):
        ParallelMuon([torch.nn.Parameter(torch.ones(4))])


def test_parallel_muon_without_process_group_is_plain_muon():
    torch.manual_seed(6)
    shapes = [(3, 24, 16), (32, 8)]
    pa = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa, ob = Muon(pa, lr=0.02, momentum=0.9, weight_decay=0.04), ParallelMuon(pb, lr=0.02, momentum=0.9, weight_decay=0.04)
    assert not ob.distributed
    for _ in range(3):
        for x, y in zip(pa, pb):
            x.grad = torch.randn_like(x)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    sa, sb = oa.state_dict(), ob.state_dict()
    for i in range(2):
        torch.testing.assert_close(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])


def test_parallel_muon_load_state_dict_checks_shapes():
    p = torch.nn.Parameter(torch.randn(3, 8, 4))
    opt = ParallelMuon([p])
    bad = {"state": {0: {"momentum_buffer": torch.zeros(2, 8, 4)}}, "param_groups": opt.state_dict()["param_groups"]}
    with pytest.raises(ValueError, match=r"param #0: momentum shape \(2, 8, 4\)"):
        opt.load_state_dict(bad)


# ------------------------------------------------------------------ Optimizers (tiny model)
class Tiny(torch.nn.Module):
    """Per-token toy LM with every kind of parameter the real model routes."""

    def __init__(self, V=24, D=16):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(V, D) * 0.5)  # embed (tied head)
        self.qo = torch.nn.Parameter(torch.randn(3, D, D) / 4)  # bank, 3 matrices
        self.up = torch.nn.Parameter(torch.randn(5, 2 * D, D) / 4)  # tall bank, 5 matrices
        self.proj = torch.nn.Parameter(torch.randn(D, 8) / 3)  # 2-D Muon (tall)
        self.ve = torch.nn.Parameter(torch.randn(8, D) / 3)  # 2-D Muon (wide)
        self.gain = torch.nn.Parameter(torch.ones(D))  # scalar group
        self.bias = torch.nn.Parameter(torch.zeros(V))

    def groups(self):
        return {"matrix": [self.qo, self.up, self.proj, self.ve], "embed": [self.emb],
                "scalar": [self.gain, self.bias]}

    def forward(self, x, y):
        h = self.emb[x]  # (N, D)
        for i in range(3):
            h = h + torch.tanh(h @ self.qo[i].T) * self.gain
        for i in range(5):
            h = h + F.relu(h @ self.up[i].T) @ self.up[i] / 8  # (N, 2D) -> (N, D)
        h = h + (h @ self.proj) @ self.ve
        return F.cross_entropy(h @ self.emb.T + self.bias, y)


def tiny_cfg(**kw):
    return TrainConfig(matrix_lr=0.04, scalar_lr=0.03, tied_embed_lr=0.05, muon_momentum=0.9,
                       muon_wd=0.05, adam_wd=0.04, beta1=0.9, beta2=0.99, adam_eps=1e-8,
                       compile=False, **kw)


SCHED = [(1.0, 0.85), (0.7, 0.9), (0.4, 0.95), (0.3, 0.95), (0.2, 0.95)]  # (lr_scale, momentum)


def train_steps(model, opt, data, steps, clip, part=None):
    """`steps` optimizer steps from SCHED[steps[0]:]; part=(rank, world) takes that batch half."""
    norms = []
    for t in steps:
        x, y = data[t]
        if part is not None:
            r, w = part
            x, y = x.chunk(w)[r], y.chunk(w)[r]
        model(x, y).backward()
        norms.append(float(opt.clip_grad_norm_(clip)))
        opt.step(*SCHED[t])
        opt.zero_grad()
    return norms


def make_data(n=64, V=24, steps=5):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, V, (n,), generator=g), torch.randint(0, V, (n,), generator=g)) for _ in range(steps)]


def make_model():
    torch.manual_seed(8)
    return Tiny()


def params_of(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_optimizers_single_process_matches_reference():
    """Optimizers.step == hand-built torch clip + AdamW + Muon in the documented order."""
    data, m1, m2 = make_data(), make_model(), make_model()
    opt = build_optimizers(m1.groups(), tiny_cfg(), CPU1)
    g = m2.groups()
    kw = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.04)
    ref = [torch.optim.AdamW(g["embed"], lr=0.05, **kw), torch.optim.AdamW(g["scalar"], lr=0.03, **kw),
           Muon(g["matrix"], lr=0.04, momentum=0.9, weight_decay=0.05)]
    norms = train_steps(m1, opt, data, range(3), clip=0.5)
    for t in range(3):
        m2(*data[t]).backward()
        n = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        assert float(n) == pytest.approx(norms[t], rel=1e-5)
        for o, base in zip(ref, (0.05, 0.03, 0.04)):
            for pg in o.param_groups:
                pg["lr"] = base * SCHED[t][0]
        ref[2].param_groups[0]["momentum"] = SCHED[t][1]
        for o in ref:
            o.step()
            o.zero_grad()
    assert max(norms) > 0.5  # clipping was active
    assert max_diff(params_of(m1), params_of(m2)) < 1e-6


def test_optimizers_state_dict_round_trip_single_process():
    data, m1 = make_data(), make_model()
    opt = build_optimizers(m1.groups(), tiny_cfg(), CPU1)
    train_steps(m1, opt, data, range(2), clip=0.5)
    sd, snap = opt.state_dict(), params_of(m1)
    train_steps(m1, opt, data, range(2, 5), clip=0.5)  # also checks sd was a copy
    m2 = make_model()
    m2.load_state_dict(snap)
    opt2 = build_optimizers(m2.groups(), tiny_cfg(), CPU1)
    opt2.load_state_dict(sd)
    train_steps(m2, opt2, data, range(2, 5), clip=0.5)
    assert max_diff(params_of(m1), params_of(m2)) == 0.0
    with pytest.raises(ValueError, match="lacks scalar"):
        opt2.load_state_dict({"muon": sd["muon"], "embed": sd["embed"]})


def test_build_optimizers_routes_groups():
    m = make_model()
    opt = build_optimizers(m.groups(), tiny_cfg(), CPU1)
    assert isinstance(opt.muon, Muon)
    assert opt.adams["embed"].param_groups[0]["lr"] == 0.05
    assert opt.adams["scalar"].defaults["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="'scalar' is missing or empty"):
        build_optimizers({"matrix": [m.qo], "embed": [m.emb], "scalar": []}, tiny_cfg(), CPU1)


# ------------------------------------------------------------------ 2 processes (gloo)
MUON_SHAPES = [(3, 24, 16), (5, 16, 32), (4, 8, 8), (32, 8), (16, 8), (12, 20)]


def _muon_scenario(rank, world, comm_dtype=None):
    """ParallelMuon on per-rank grads == Muon on their average, params and gathered momentum."""
    torch.manual_seed(10)
    p0 = [torch.randn(*s) for s in MUON_SHAPES]
    pd = [torch.nn.Parameter(p.clone()) for p in p0]
    pr = [torch.nn.Parameter(p.clone()) for p in p0]
    od = ParallelMuon(pd, lr=0.03, momentum=0.9, weight_decay=0.05, comm_dtype=comm_dtype)
    orf = Muon(pr, lr=0.03, momentum=0.9, weight_decay=0.05)
    for t in range(3):
        grads = [[torch.randn(*s, generator=torch.Generator().manual_seed(100 * t + 10 * r + i))
                  for i, s in enumerate(MUON_SHAPES)] for r in range(world)]
        for o in (od, orf):
            o.param_groups[0]["momentum"] = SCHED[t][1]
            o.param_groups[0]["lr"] = 0.03 * SCHED[t][0]
        if t == 1:  # a skipped step: garbage grads reduced, then dropped by zero_grad
            for a in pd:
                a.grad = torch.full_like(a, 1e3)
            od.launch_reduce_scatters()
            od.averaged_grads()
            od.zero_grad()
        for i, (a, b) in enumerate(zip(pd, pr)):
            a.grad = grads[rank][i].clone()
            b.grad = sum(g[i] for g in grads) / world
        if t != 1:  # at t == 1 step() must launch the reductions itself
            od.launch_reduce_scatters()
        od.step()
        orf.step()
    sd, sr = od.state_dict(), orf.state_dict()
    mom = max((sd["state"][i]["momentum_buffer"] - sr["state"][i]["momentum_buffer"]).abs().max().item()
              for i in range(len(pd)))
    par = max((a - b).abs().max().item() for a, b in zip(pd, pr))
    rel = max(((a - b).norm() / (b - q).norm()).item() for a, b, q in zip(pd, pr, p0))
    return {"muon_param_diff": par, "muon_momentum_diff": mom, "muon_rel_step_diff": rel}


def _optimizers_scenario(rank, world):
    data = make_data()
    mdist, mref = make_model(), make_model()
    od = build_optimizers(mdist.groups(), tiny_cfg(), DistInfo(rank, rank, world, torch.device("cpu")))
    orf = build_optimizers(mref.groups(), tiny_cfg(), CPU1)
    assert isinstance(od.muon, ParallelMuon) and od.muon.distributed
    nd = train_steps(mdist, od, data, range(3), clip=0.5, part=(rank, world))
    nr = train_steps(mref, orf, data, range(3), clip=0.5)
    out = {"opt_param_diff": max_diff(params_of(mdist), params_of(mref)),
           "opt_norm_rel_diff": max(abs(a - b) / b for a, b in zip(nd, nr)), "max_norm": max(nr)}
    # resume: the 2-process state after 3 steps, continued in 1 process and in 2 fresh processes
    sd, snap = od.state_dict(), params_of(mdist)
    train_steps(mdist, od, data, range(3, 5), clip=0.5, part=(rank, world))
    m1 = make_model()
    m1.load_state_dict(snap)
    o1 = build_optimizers(m1.groups(), tiny_cfg(), CPU1)
    o1.load_state_dict(sd)
    train_steps(m1, o1, data, range(3, 5), clip=0.5)
    m2 = make_model()
    m2.load_state_dict(snap)
    o2 = build_optimizers(m2.groups(), tiny_cfg(), DistInfo(rank, rank, world, torch.device("cpu")))
    o2.load_state_dict(sd)
    train_steps(m2, o2, data, range(3, 5), clip=0.5, part=(rank, world))
    out["resume_1proc_diff"] = max_diff(params_of(m1), params_of(mdist))
    out["resume_2proc_diff"] = max_diff(params_of(m2), params_of(mdist))
    return out


def _dist_scenarios(rank, world):
    bf16 = {k + "_bf16comm": v for k, v in _muon_scenario(rank, world, torch.bfloat16).items()}
    return {**_muon_scenario(rank, world), **bf16, **_optimizers_scenario(rank, world)}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return spawn_ranks(tmp_path_factory, _dist_scenarios)


def test_parallel_muon_two_procs_equals_muon_on_averaged_grads(dist_results):
    for r in dist_results:
        assert r["muon_param_diff"] < 1e-5, r
        assert r["muon_momentum_diff"] < 1e-5, r


def test_parallel_muon_bf16_communication_stays_close(dist_results):
    """bf16 reduce-scatter/all-gather (the CUDA default) vs fp32 Muon: bf16-rounding close."""
    for r in dist_results:
        assert r["muon_rel_step_diff_bf16comm"] < 0.03, r
        assert r["muon_rel_step_diff"] < 1e-5, r


def test_optimizers_two_procs_half_batches_equal_one_proc_full_batch(dist_results):
    for r in dist_results:
        assert r["max_norm"] > 0.5  # the global clip was active
        assert r["opt_norm_rel_diff"] < 1e-5, r
        assert r["opt_param_diff"] < 1e-5, r


def test_state_dict_resumes_across_world_sizes(dist_results):
    for r in dist_results:
        assert r["resume_2proc_diff"] < 1e-6, r
        assert r["resume_1proc_diff"] < 1e-5, r


# ------------------------------------------------------------------ GPU (skipped without CUDA)
@pytest.mark.gpu
def test_gpu_ns5_bf16_band_and_compiled_matches_eager():
    from pgolf.train.optim import compiled_newtonschulz5
    torch.manual_seed(11)
    G = torch.randn(3, 256, 512, device="cuda")
    X = zeropower_via_newtonschulz5(G)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.55 and s.max() < 1.3
    Xc = compiled_newtonschulz5()(G, 5, 1e-7, torch.bfloat16)
    assert (Xc.float() - X.float()).abs().max() < 0.03


@pytest.mark.gpu
def test_gpu_parallel_muon_local_equals_muon():
    torch.manual_seed(12)
    shapes = [(11, 1536, 512), (22, 256, 512), (512, 128)]
    pa = [torch.nn.Parameter(torch.randn(*s, device="cuda") * 0.02) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    oa = Muon(pa, lr=0.025, momentum=0.95, weight_decay=0.04)
    ob = ParallelMuon(pb, lr=0.025, momentum=0.95, weight_decay=0.04)
    for _ in range(3):
        for x, y in zip(pa, pb):
            x.grad = torch.randn_like(x) * 1e-3
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_build_optimizers_comm_dtype_option():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Cfg(TrainConfig):
        muon_comm_dtype: str = "fp16"

    with pytest.raises(ValueError, match="train.muon_comm_dtype"):
        build_optimizers(make_model().groups(), Cfg(), DistInfo(0, 0, 2, torch.device("cpu")))

