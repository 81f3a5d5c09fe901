"""The shared int6 clip rule (QAT and export use the same functions)."""

import pytest
import torch

from pgolf.shared import rowquant


@pytest.mark.parametrize("n", [7, 64, 512, 1536])
@pytest.mark.parametrize("q", [0.5, 0.999, 0.9995, 0.9999, 0.99999, 1.0])
def test_row_quantile_matches_torch_quantile(n, q):
    w = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    ref = torch.quantile(w.abs().double(), q, dim=-1).float()
    assert torch.allclose(rowquant.row_quantile_abs(w, q), ref, rtol=1e-5)


def test_quantize_codes_in_range_and_error_bounded():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    qmax = rowquant.qmax_for(6)
    s = rowquant.row_scale(w, 0.9995, qmax)
    q = rowquant.quantize(w, s, qmax)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 31
    err = (rowquant.dequantize(q, s) - w).abs()
    clip = rowquant.row_quantile_abs(w, 0.9995)[:, None]
    inside = w.abs() <= clip  # unclipped entries are within half a step
    assert bool((err[inside] <= s[:, None].expand_as(w)[inside] / 2 + 1e-6).all())
    assert torch.equal(s, s.half().float())  # scales are fp16-representable


def test_fake_quant_forward_is_quantized_and_gradient_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    out = rowquant.fake_quant(w, 0.9995, 31)
    s = rowquant.row_scale(w.detach(), 0.9995, 31)
    assert torch.allclose(out, rowquant.dequantize(rowquant.quantize(w.detach(), s, 31), s))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qmax_of_each_width_the_config_allows():
    from pgolf.config import BITS_RANGE

    assert [rowquant.qmax_for(b) for b in range(BITS_RANGE[0], BITS_RANGE[1] + 1)] == [1, 3, 7, 15, 31, 63, 127]


def test_fp16_round_matches_half_cast_also_under_compile():
    x = torch.rand(50000, generator=torch.Generator().manual_seed(3)) * 100 + 1 / 31
    ref = x.half().float()
    assert torch.equal(rowquant.fp16_round(x), ref)
    compiled = torch.compile(rowquant.fp16_round, dynamic=False)
    assert torch.equal(compiled(x), ref)  # inductor would drop a plain .half().float()


def test_sigma_scale_is_sigmas_stds_over_qmax_in_fp16_without_the_floor():
    """quantize.clip_rule sigma: s = fp16(k * std(row) / qmax), the unbiased std, no 1/qmax floor."""
    w = torch.randn(6, 512, generator=torch.Generator().manual_seed(4)) * 0.02
    w[0] = 0.0  # an all-zero row keeps a finite positive scale
    s = rowquant.sigma_scale(w, 12.85, 31)
    hand = torch.tensor([float(torch.tensor(12.85 * float(r.double().std()) / 31).half()) for r in w[1:]])
    assert torch.allclose(s[1:], hand, rtol=1e-3)  # fp32 vs fp64 std: at most one fp16 step apart
    assert torch.equal(s, s.half().float())  # fp16-representable, the stored dtype
    assert float(s[1:].max()) < 1 / 31  # small weights: the quantile rule's floor would bind here
    assert float(s[0]) == rowquant.FP16_SUBNORMAL
    q = rowquant.quantize(w, s, 31)
    assert int(q.abs().max()) <= 31 and int(q[0].abs().max()) == 0
