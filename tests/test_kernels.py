"""Tests for pgolf.shared.kernels.fused_mlp: fused Triton MLP vs the eager PyTorch reference.

Without CUDA the kernels run under the Triton CPU interpreter: TRITON_INTERPRET must be set before
triton decorates the kernels (import time), so it is set here before importing pgolf.shared.kernels.
With CUDA the same small-shape tests run on the GPU, plus the @pytest.mark.gpu record-shape tests.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pgolf.shared.kernels import fused_mlp as fm  # noqa: E402

DEVICE = "cpu" if fm.INTERPRETED else "cuda"
on_gpu = pytest.mark.skipif(fm.INTERPRETED or not torch.cuda.is_available(),
                            reason="needs CUDA and TRITON_INTERPRET unset")

SHAPES = [(64, 32, 96), (96, 64, 128), (70, 40, 100)]  # (M, D, H); the last fits no block size
TOL = {torch.float32: 1e-5 if fm.INTERPRETED else 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    """Relative Frobenius error of a against the float64 reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_inputs(M, D, H, dtype, seed, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen)  # (M, D)
    w_up = torch.randn(H, D, generator=gen) / D**0.5  # (H, D)
    w_down = torch.randn(D, H, generator=gen) / H**0.5  # (D, H)
    g = torch.randn(M, D, generator=gen)  # (M, D) upstream gradient
    return [t.to(device=device, dtype=dtype) for t in (x, w_up, w_down, g)]


def reference(x, w_up, w_down, g, slope=0.5):
    """float64 eager forward + autograd: out, dx, dw_up, dw_down."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w_up, w_down)]
    out = fm.eager_mlp(*leaves, slope)
    out.backward(g.double())
    return [out.detach()] + [t.grad for t in leaves]


def fused(x, w_up, w_down, g, slope=0.5, save_post=True):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    out = fm.fused_leaky_relu_sq_mlp(*leaves, slope, save_post=save_post)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


def act(p, slope):
    return torch.where(p > 0, p * p, slope**2 * p * p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_grads_match_eager(shape, dtype):
    inputs = make_inputs(*shape, dtype, seed=sum(shape))
    got, want = fused(*inputs), reference(*inputs)
    for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert rel(a, b) < TOL[dtype], (name, rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_recompute_post_variant_matches(dtype):
    inputs = make_inputs(70, 40, 100, dtype, seed=3)
    saved, recomputed = fused(*inputs, slope=0.3), fused(*inputs, slope=0.3, save_post=False)
    for a, b in zip(saved, recomputed):
        assert torch.equal(a, b)  # same kernels, same rounding: bit-identical
    for a, b in zip(recomputed, reference(*inputs, slope=0.3)):
        assert rel(a, b) < TOL[dtype]


def test_bf16_matches_eager():
    """On the interpreter bf16 operands are upcast inside the kernel; on CUDA this is native bf16."""
    inputs = make_inputs(96, 64, 128, torch.bfloat16, seed=7)
    for a, b in zip(fused(*inputs), reference(*inputs)):
        assert rel(a, b) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(70, 40, 97), (33, 24, 81), (64, 32, 1)])
def test_odd_mlp_widths_match_eager(shape):
    """Every width model.mlp_mult can give (model.mlp_hidden: any integer >= 1), odd ones too; odd
    fp32 rows are not 16-byte aligned, so TMA configs fall back to pointer loads."""
    inputs = make_inputs(*shape, torch.float32, seed=sum(shape))
    for cfg in (None, fm.LaunchConfig(32, 32, 32, 4, 2, split_epilogue=True, max_programs=4, tma=True)):
        with fm.launch_config_override(cfg, cfg):  # None, None: the default table
            got = fused(*inputs)
        for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), got, reference(*inputs)):
            assert a.shape == b.shape and rel(a, b) < TOL[torch.float32], (name, rel(a, b))


CONFIGS = [
    fm.LaunchConfig(32, 32, 32, 4, 1, split_epilogue=False, max_programs=3),
    fm.LaunchConfig(32, 64, 16, 4, 2, split_epilogue=True, max_programs=5),
    fm.LaunchConfig(64, 32, 32, 4, 2, split_epilogue=True, max_programs=0),
    fm.LaunchConfig(32, 32, 32, 4, 2, max_programs=3, tma=True),
    fm.LaunchConfig(32, 64, 16, 4, 2, split_epilogue=True, max_programs=5, tma=True),
    fm.LaunchConfig(32, 32, 32, 4, 2, max_programs=4, tma=True, flatten=True),
    fm.LaunchConfig(32, 32, 32, 4, 2, max_programs=3, tma=True, tma_store=True),
    fm.LaunchConfig(32, 64, 16, 4, 2, split_epilogue=True, max_programs=5, tma=True, tma_store=True),
    fm.LaunchConfig(32, 64, 32, 4, 2, split_epilogue=True, max_programs=4, tma=True, flatten=True, tma_store=True),
    fm.LaunchConfig(32, 64, 16, 4, 2, split_epilogue=True, max_programs=5, tma=True, kmajor_b=True),
    fm.LaunchConfig(32, 32, 32, 4, 2, max_programs=3, kmajor_b=True),
    fm.LaunchConfig(32, 64, 32, 4, 2, split_epilogue=True, max_programs=4, tma=True, flatten=True, tma_store=True,
                    kmajor_b=True),  # the Hopper table's backward, at small tiles
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["32x32x32", "32x64x16-split", "64x32x32-split",
                                              "32x32x32-tma", "32x64x16-split-tma",
                                              "32x32x32-tma-flatten", "32x32x32-tma-store",
                                              "32x64x16-split-tma-store", "32x64x32-split-tma-flatten-store",
                                              "32x64x16-split-tma-kmajor", "32x32x32-kmajor",
                                              "32x64x32-split-tma-flatten-store-kmajor"])
def test_launchers_write_every_element(cfg):
    """Outputs start as NaN; pre = x@w_up^T, post = act(pre) exactly, dpre = (g@w_down)*act'(pre).

    Shapes fit no block size; H=100 fp32 rows are 400 bytes, so TMA descriptors are legal."""
    M, D, H, slope = 70, 40, 100, 0.5
    x, w_up, w_down, g = make_inputs(M, D, H, torch.float32, seed=11)
    pre, post, dpre, post2 = (torch.full((M, H), float("nan"), device=DEVICE) for _ in range(4))
    fm.launch_up_act(x, w_up, pre, post, slope, config=cfg)
    assert rel(pre, x.double() @ w_up.double().T) < TOL[torch.float32]
    assert torch.equal(post, act(pre, slope))
    fm.launch_act_bwd(g, w_down, pre, dpre, post2, slope, config=cfg)
    deriv = torch.where(pre > 0, 2 * pre, 2 * slope**2 * pre).double()
    assert rel(dpre, (g.double() @ w_down.double()) * deriv) < TOL[torch.float32]
    assert torch.equal(post2, post)


def test_tma_store_writes_the_outputs_through_descriptors(monkeypatch):
    """With tma_store the epilogue's three (M, H) tensors get descriptors of one epilogue tile each
    (half of BLOCK_N when split); recompute-post backward (post None) matches eager too."""
    boxes = []
    real = fm.TensorDescriptor.from_tensor
    monkeypatch.setattr(fm.TensorDescriptor, "from_tensor",
                        lambda t, block: boxes.append(list(block)) or real(t, block))
    cfg = fm.LaunchConfig(32, 64, 16, 4, 2, split_epilogue=True, max_programs=5, tma=True, tma_store=True)
    x, w_up, w_down, g = make_inputs(70, 40, 100, torch.float32, seed=5)
    pre, post, dpre = (torch.full((70, 100), float("nan"), device=DEVICE) for _ in range(3))
    fm.launch_up_act(x, w_up, pre, post, 0.5, config=cfg)
    assert boxes == [[32, 16], [64, 16], [32, 32], [32, 32], [32, 32]]  # a, b, then pre, post, dpre
    fm.launch_act_bwd(g, w_down, pre, dpre, None, 0.5, config=cfg)
    deriv = torch.where(pre > 0, 2 * pre, 0.5 * pre).double()
    assert rel(dpre, (g.double() @ w_down.double()) * deriv) < TOL[torch.float32]


def test_kmajor_b_loads_the_backwards_weight_transposed(monkeypatch):
    """kmajor_b: the backward kernel reads W_down^T, an (H, D) copy, in [BN, BK] boxes (the script's
    layout) instead of W_down (D, H) in [BK, BN] boxes; the result is the same dpre."""
    seen = []
    real = fm.TensorDescriptor.from_tensor
    monkeypatch.setattr(fm.TensorDescriptor, "from_tensor",
                        lambda t, block: seen.append((tuple(t.shape), list(block))) or real(t, block))
    x, w_up, w_down, g = make_inputs(70, 40, 96, torch.float32, seed=3)
    pre, post = (torch.empty((70, 96), device=DEVICE) for _ in range(2))
    fm.launch_up_act(x, w_up, pre, post, 0.5)
    dpre = {}
    for kmajor in (False, True):
        seen.clear()
        dpre[kmajor] = torch.full_like(pre, float("nan"))
        cfg = fm.LaunchConfig(32, 32, 16, 4, 2, max_programs=4, tma=True, kmajor_b=kmajor)
        fm.launch_act_bwd(g, w_down, pre, dpre[kmajor], None, 0.5, config=cfg)
        assert seen[1] == (((96, 40), [32, 16]) if kmajor else ((40, 96), [16, 32]))
    assert torch.allclose(dpre[True], dpre[False], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_variant_through_autograd(dtype):
    """TMA operand loads end to end (fp16 H=100 rows are 200 bytes: falls back to pointers)."""
    cfg = fm.LaunchConfig(32, 32, 32, 4, 2, split_epilogue=True, max_programs=4, tma=True)
    for shape in [(96, 64, 128), (70, 40, 100)]:
        inputs = make_inputs(*shape, dtype, seed=17)
        with fm.launch_config_override(cfg, cfg):
            got = fused(*inputs)
        for a, b in zip(got, reference(*inputs)):
            assert rel(a, b) < TOL[dtype]


def test_shared_memory_fallback_shrinks_config(monkeypatch):
    """A config the device cannot hold is shrunk (stages, then BLOCK_N 128) and remembered."""
    tried = []
    real = fm._launch_cfg

    def picky(*args):
        cfg = args[-1]
        tried.append(cfg)
        if cfg.num_stages > 2 or cfg.block_n > 128:
            raise fm.OutOfResources(300_000, 232_448, "shared memory")
        return real(*args)

    monkeypatch.setattr(fm, "_launch_cfg", picky)
    monkeypatch.setattr(fm, "_FALLBACK", {})
    big = fm.LaunchConfig(32, 256, 32, 4, 4, split_epilogue=True, max_programs=2)
    x, w_up, _, _ = make_inputs(40, 32, 160, torch.float32, seed=19)
    pre, post = (torch.full((40, 160), float("nan"), device=DEVICE) for _ in range(2))
    with pytest.warns(UserWarning, match="does not fit"):
        fm.launch_up_act(x, w_up, pre, post, 0.5, config=big)
    final = fm.LaunchConfig(32, 128, 32, 4, 2, split_epilogue=True, max_programs=2)
    assert [(c.block_n, c.num_stages) for c in tried] == [(256, 4), (256, 3), (256, 2), (128, 3),
                                                          (128, 2)]
    assert fm._FALLBACK[big] == final
    assert rel(pre, x.double() @ w_up.double().T) < TOL[torch.float32]
    tried.clear()
    fm.launch_up_act(x, w_up, pre, post, 0.5, config=big)
    assert tried == [final]


def test_leading_dims_and_weight_cast():
    """(B, T, D) input; fp32 master weights are cast to x's dtype and get fp32 grads."""
    x, w_up, w_down, g = make_inputs(96, 32, 64, torch.float32, seed=5)
    x16, g16 = x.half().reshape(2, 48, 32), g.half().reshape(2, 48, 32)
    w_up.requires_grad_(), w_down.requires_grad_()
    out = fm.fused_leaky_relu_sq_mlp(x16, w_up, w_down)
    out.backward(g16)
    assert out.shape == (2, 48, 32) and out.dtype == torch.float16
    assert w_up.grad.dtype == torch.float32 and w_down.grad.dtype == torch.float32
    want = reference(x.half(), w_up.half(), w_down.half(), g.half())
    assert rel(out.reshape(96, 32), want[0]) < TOL[torch.float16]
    assert rel(w_up.grad, want[2]) < TOL[torch.float16]
    assert rel(w_down.grad, want[3]) < TOL[torch.float16]


@pytest.mark.parametrize("save_post", [True, False])
def test_compiles_fullgraph(save_post):
    """Dynamo traces the autograd.Function + custom ops with no graph break (inductor)."""
    inputs = make_inputs(64, 32, 96, torch.float32, seed=13)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, a, b: fm.fused_leaky_relu_sq_mlp(x, a, b, 0.5, save_post),
                       fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
    out = fn(*leaves)
    out.backward(inputs[3])
    got = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(got, fused(*inputs)):
        assert rel(a, b) < 1e-6


def test_bad_inputs_raise():
    x, w_up, w_down, _ = make_inputs(64, 32, 96, torch.float32, seed=1)
    with pytest.raises(ValueError, match="w_down"):
        fm.fused_leaky_relu_sq_mlp(x, w_up, w_down.T)
    with pytest.raises(ValueError, match="unsupported dtype"):
        fm.fused_leaky_relu_sq_mlp(x.double(), w_up, w_down)
    with pytest.raises(ValueError, match="no launch config"):
        fm.launch_config("sideways", torch.float32, torch.device(DEVICE))


# ---------------------------------------------------------------- GPU only: record shapes, bf16


def _poison_cache(nbytes):
    """Fill and free a block so the caching allocator hands NaN-filled memory to the next outputs."""
    torch.full((nbytes // 2,), float("nan"), device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("M", [8192, 8192 + 37])
@pytest.mark.parametrize("save_post", [True, False])
def test_record_shape_bf16_vs_fp32(M, save_post):
    D, H = 512, 1536
    inputs = make_inputs(M, D, H, torch.bfloat16, seed=M)
    _poison_cache(4 * M * H * 2)
    got = fused(*inputs, save_post=save_post)
    want = reference(*[t.float() for t in inputs])
    for name, a, b in zip(("out", "dx", "dw_up", "dw_down"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))


@pytest.mark.gpu
@on_gpu
def test_record_shape_compiled_fullgraph_bf16():
    D, H, M = 512, 1536, 8192
    inputs = make_inputs(M, D, H, torch.bfloat16, seed=2)
    torch._dynamo.reset()
    fn = torch.compile(fm.fused_leaky_relu_sq_mlp, fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:3]]
    out = fn(*leaves)
    out.backward(inputs[3])
    got = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(got, reference(*[t.float() for t in inputs])):
        assert rel(a, b) < 1e-2
