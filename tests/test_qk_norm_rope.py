"""Tests for pgolf.shared.kernels.qk_norm_rope: the fused q/k norm + RoPE + gain vs the model's
eager `norm_rope` in float64 (values, dx, d gain), in bf16 as autocast runs it, and under
torch.compile. Without CUDA the kernels run under the Triton CPU interpreter (tests/conftest.py)."""

import pytest
import torch

from pgolf.shared.kernels import fused_mlp as fm
from pgolf.shared.kernels import qk_norm_rope as qk
from pgolf.shared.model import Rotary, norm_rope
from tests.test_kernels import rel

DEVICE = "cpu" if fm.INTERPRETED else "cuda"

# (B, T, H, hd, rope dims): rows not a multiple of BLOCK_R, partial / full / no RoPE, one head
SHAPES = [(2, 9, 4, 16, 8), (1, 70, 2, 32, 32), (3, 5, 1, 16, 0), (1, 33, 8, 64, 16)]


def tables(T, rd):
    cos, sin = Rotary(rd, 10000.0, T)(T, torch.device("cpu"))  # (T, rd/2) each
    return cos.to(DEVICE), sin.to(DEVICE)


def inputs(B, T, H, hd, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, hd, generator=gen) * 3  # (B, T, H, hd); the norm removes the scale
    g = torch.randn(B, T, H, hd, generator=gen)  # upstream gradient
    gain = 1.5 + torch.rand(H, generator=gen)  # (H,)
    return x.to(DEVICE, dtype), g.to(DEVICE, dtype), gain.to(DEVICE)


def run(fn, x, g, gain, cos, sin, dtype=None):
    """-> out, dx, dgain (None without a gain) of fn(x, cos, sin, gain) against upstream g; x in
    `dtype` (default its own), gain and tables fp32 (fp64 for an fp64 reference)."""
    dtype = dtype or x.dtype
    fdtype = torch.float64 if dtype == torch.float64 else torch.float32  # gain and tables, as the model
    xl = x.detach().to(dtype).requires_grad_()
    gl = None if gain is None else gain.detach().to(fdtype).requires_grad_()
    out = fn(xl, cos.to(fdtype), sin.to(fdtype), gl)
    out.backward(g.to(out.dtype))
    return out.detach(), xl.grad, None if gl is None else gl.grad


@pytest.mark.parametrize("with_gain", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_values_and_grads_match_eager(shape, with_gain):
    B, T, H, hd, rd = shape
    cos, sin = tables(T, rd)
    x, g, gain = inputs(B, T, H, hd, seed=sum(shape))
    gain = gain if with_gain else None
    got = run(qk.fused_qk_norm_rope, x, g, gain, cos, sin)
    want = run(norm_rope, x, g, gain, cos, sin, dtype=torch.float64)
    for name, a, b in zip(("out", "dx", "dgain"), got, want):
        if b is None:
            assert a is None
            continue
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def test_rope_rotates_only_the_first_rope_dims_and_keeps_the_norm():
    B, T, H, hd, rd = 1, 6, 2, 16, 8
    cos, sin = tables(T, rd)
    x, _, _ = inputs(B, T, H, hd, seed=1)
    out = qk.fused_qk_norm_rope(x, cos, sin)
    n = x / x.pow(2).mean(-1, keepdim=True).add(torch.finfo(torch.float32).eps).sqrt()
    torch.testing.assert_close(out[..., rd:], n[..., rd:])  # unrotated dims: the norm alone
    torch.testing.assert_close(out[:, 0], n[:, 0])  # position 0: cos 1, sin 0
    torch.testing.assert_close(out.norm(dim=-1), n.norm(dim=-1))  # a rotation keeps lengths


def test_bf16_matches_what_autocast_computes():
    """bf16 in and out, fp32 inside: as `CausalSelfAttention` runs it under autocast (rms_norm in
    fp32, the attention casting down)."""
    B, T, H, hd, rd = 2, 40, 8, 64, 16
    cos, sin = tables(T, rd)
    x, g, gain = inputs(B, T, H, hd, seed=7, dtype=torch.bfloat16)
    out, dx, dgain = run(qk.fused_qk_norm_rope, x, g, gain, cos, sin)
    want = run(norm_rope, x, g, gain, cos, sin, dtype=torch.float32)
    assert out.dtype == dx.dtype == torch.bfloat16 and dgain.dtype == torch.float32
    torch.testing.assert_close(out, want[0].bfloat16())  # one rounding of the same fp32 value
    assert rel(dx, want[1]) < 1e-2 and rel(dgain, want[2]) < 1e-2


def test_compiled_fullgraph_matches_eager():
    B, T, H, hd, rd = 2, 9, 4, 16, 8
    cos, sin = tables(T, rd)
    x, g, gain = inputs(B, T, H, hd, seed=3)

    def fn(x, cos, sin, gain):
        return qk.fused_qk_norm_rope(x, cos, sin, gain) * 2.0

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(compiled, x, g, gain, cos, sin), run(fn, x, g, gain, cos, sin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(hd=12), "power of two"),
    (dict(rd=24), "exceed head dim"),
    (dict(gain_heads=3), "gain must be fp32"),
])
def test_bad_shapes_are_named(bad, match):
    hd, rd = bad.get("hd", 16), bad.get("rd", 8)
    cos, sin = tables(4, rd)
    x = torch.randn(1, 4, 2, hd, device=DEVICE)
    gain = torch.ones(bad.get("gain_heads", 2), device=DEVICE)
    with pytest.raises(ValueError, match=match):
        qk.fused_qk_norm_rope(x, cos, sin, gain)


def test_tables_on_another_device_are_named():
    """The launcher's check (an op call with a meta tensor would run the fake implementation)."""
    cos, sin = tables(4, 8)
    x = torch.randn(8, 16, device=DEVICE)  # (tokens * heads, hd)
    with pytest.raises(ValueError, match="fused_qk_norm_rope: tensors on different devices"):
        qk.launch_fwd(x, cos.to("meta"), sin.to("meta"), None, 2, torch.empty_like(x))


@pytest.mark.gpu
def test_model_path_matches_eager_on_cuda():
    """The whole model under autocast, train.fused_qk_norm_rope on against off: loss and grads."""
    import dataclasses

    from tests.test_model import TINY, batch, make_tiny

    m = make_tiny(cfg=dataclasses.replace(TINY, model_dim=128, num_heads=4)).cuda()
    x, y = (t.cuda() for t in batch(T=64))
    grads = []
    for fused in (False, True):
        m.use_fused_qk = fused
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (ref, ref_g), (got, got_g) = grads
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    assert len(got_g) == len(ref_g) and all(rel(a, b) < 5e-2 for a, b in zip(got_g, ref_g))
