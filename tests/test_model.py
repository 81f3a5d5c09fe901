"""pgolf.shared.model: parameter inventory, config checks, forward math against hand-written references
(naive GQA attention, RoPE, XSA, RMSNorm, LeakyReLU^2), Hessian accumulation, QAT (eager and
under torch.compile without recompiling), export round trip, causality, BigramHash hash."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import ModelConfig
from pgolf.shared.rowquant import fake_quant
from pgolf.config import check as check_config
from pgolf.shared.model import (GPT, AddSmearGate, Rotary, accumulate_gram, SmearGate, bigram_hash, count_params,
                         layer_order, softcap, xsa)
from pgolf.shared.shards import BOS_ID

TINY = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=3,
                   xsa_last_n=2, bigram_buckets=31, bigram_dim=8, ve_dim=8, ve_last_n=1, rope_dims=4,
                   residual_dtype="fp32")


def make_tiny(seed=0, cfg=TINY, **kw):
    """A tiny model with every parameter perturbed (zero-init O/down/gates/tables become live)."""
    torch.manual_seed(seed)
    m = GPT(cfg, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch(seed=1, B=2, T=12, V=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


# ----------------------------------------------------------------------------- inventory / config


@pytest.mark.parametrize("buckets,expected", [(4096, 27_255_900), (2048, 26_993_756), (3072, 27_124_828)])
def test_record_param_counts(buckets, expected):
    assert count_params(dataclasses.replace(ModelConfig(), bigram_buckets=buckets)) == expected


def test_record_inventory_shapes():
    with torch.device("meta"):
        m = GPT(ModelConfig())
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 1536, 512) and shapes["mlp_down_bank"] == (11, 512, 1536)
    assert shapes["skip_weights"] == (5, 512) and shapes["smear.gate"] == (512,)
    assert shapes["bigram.embed.weight"] == (4096, 128) and shapes["bigram.proj.weight"] == (512, 128)
    assert shapes["bigram.scale"] == () and shapes["ve_shared.scale"] == () and shapes["ve_layer_scales"] == (2,)
    assert shapes["ve_shared.embed.weight"] == (1024, 128) and shapes["ve_shared.proj.weight"] == (256, 128)
    per_layer = {k: v for k, v in shapes.items() if k.startswith("blocks.3.")}
    assert per_layer == {"blocks.3.attn_scale": (512,), "blocks.3.mlp_scale": (512,),
                         "blocks.3.resid_mix": (2, 512), "blocks.3.attn.q_gain": (8,)}
    assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("blocks.")) == 22_616
    assert m.hessian_shapes()["blocks.10.mlp.proj.weight"] == 1536
    assert len(m.quantizable_names()) == 66


@pytest.mark.parametrize("change,field", [
    (dict(num_heads=6), "model.num_heads"),
    (dict(num_kv_heads=3), "model.num_kv_heads"),
    (dict(xsa_last_n=12), "model.xsa_last_n"),
    (dict(xsa_last_n=-1), "model.xsa_last_n"),
    (dict(ve_last_n=12), "model.ve_last_n"),
    (dict(rope_dims=15), "model.rope_dims"),
    (dict(rope_dims=66), "model.rope_dims"),
    (dict(vocab_size=70000), "model.vocab_size"),
    (dict(model_dim=0), "model.model_dim"),
    (dict(bigram_buckets=1), "model.bigram_buckets"),
    (dict(residual_dtype="fp16"), "model.residual_dtype"),
    (dict(attn_backend="flex"), "model.attn_backend"),
    (dict(mlp_mult=0.0), "model.mlp_mult"),
    (dict(mlp_mult=float("nan")), "model.mlp_mult"),
    (dict(mlp_mult=0.0009), "model.mlp_mult"),  # 0.46 rounds to width 0
    (dict(logit_softcap_neg=0.0), "model.logit_softcap_neg"),
    (dict(logit_softcap=float("inf")), "model.logit_softcap"),
    (dict(attn_gate_window=513), "model.attn_gate_window"),
    (dict(attn_gate_window=-1), "model.attn_gate_window"),
    (dict(attn_gate_scale=0.0), "model.attn_gate_scale"),
])
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        check_config(dataclasses.replace(ModelConfig(), **change))


# ----------------------------------------------------------------------------- init + forward


def test_init_values_follow_spec():
    torch.manual_seed(0)
    m = GPT(TINY)
    L, eye = TINY.num_layers, torch.eye(32)
    for i in range(L):
        torch.testing.assert_close(m.qo_bank[i] @ m.qo_bank[i].T, eye, atol=1e-5, rtol=0)  # orthogonal Q
        torch.testing.assert_close(m.kv_bank[L + i] @ m.kv_bank[L + i].T, torch.eye(16), atol=1e-5, rtol=0)
    assert m.qo_bank[L:].abs().max() == 0 and m.mlp_down_bank.abs().max() == 0
    assert m.bigram.embed.weight.abs().max() == 0 and m.smear.gate.abs().max() == 0
    assert m.bigram.scale.item() == pytest.approx(0.05) and m.ve_shared.scale.item() == pytest.approx(0.1)
    assert torch.equal(m.blocks[1].resid_mix, torch.stack([torch.ones(32), torch.zeros(32)]))
    assert torch.all(m.blocks[0].attn.q_gain == 1.5) and torch.all(m.skip_weights == 1)
    assert m.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.1)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_forward_shape_and_initial_loss_near_ln_vocab():
    torch.manual_seed(0)
    m = GPT(TINY)
    x, y = batch()
    logits = m.forward_logits(x)
    assert logits.shape == (2, 12, 64)
    loss = m(x, y)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(64)) < 0.02
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1)))


def test_bf16_autocast_forward_keeps_fp32_loss_and_hessians():
    m = make_tiny()
    x, y = batch()
    H32 = m.zero_hessians()
    ref = m(x, y, H32)
    H16 = m.zero_hessians()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x, y, H16)
    assert got.dtype == torch.float32 and all(h.dtype == torch.float32 for h in H16.values())
    assert abs(got.item() - ref.item()) < 0.05
    for k in ("blocks.0.attn.c_q.weight", "blocks.2.mlp.proj.weight"):
        torch.testing.assert_close(H16[k], H32[k], atol=0.1 * H32[k].abs().max().item(), rtol=0.05)


def test_residual_dtype_bf16_carries_the_stream_in_the_autocast_dtype():
    """residual_dtype bf16: the hidden states leave the blocks in bf16 under autocast (fp32 with
    residual_dtype fp32); without autocast both are the same fp32 model, bit for bit."""
    x, y = batch()
    m32 = make_tiny()
    m16 = make_tiny(cfg=dataclasses.replace(TINY, residual_dtype="bf16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h32, h16 = m32.forward_hidden(x), m16.forward_hidden(x)
        loss16 = m16(x, y)
    assert h32.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert loss16.dtype == torch.float32 and abs(loss16.item() - m32(x, y).item()) < 0.05
    torch.testing.assert_close(m16(x, y), m32(x, y), atol=0, rtol=0)


def test_attn_backend_choice_gives_the_same_attention_on_cpu():
    """A named SDPA backend only applies on CUDA; on CPU every choice is the same maths."""
    x, y = batch()
    ref = make_tiny()(x, y)
    for name in ("flash", "cudnn", "efficient", "fa4"):
        got = make_tiny(cfg=dataclasses.replace(TINY, attn_backend=name))(x, y)
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_fa4_without_flash_attention_4_is_refused_by_name(monkeypatch):
    """On a GPU without FlashAttention-4, `model.attn_backend: fa4` stops at the model's build,
    naming the param and the package, instead of running torch's own flash kernels."""
    from pgolf.shared import docattn, model as M

    monkeypatch.setattr(M.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(docattn, "flash_impl_available", lambda name, device: False)
    with pytest.raises(ValueError, match="model.attn_backend fa4: .*flash-attn-4"):
        make_tiny(cfg=dataclasses.replace(TINY, attn_backend="fa4"))


def test_softcap_bounds_logits():
    m = make_tiny()
    with torch.no_grad():
        m.tok_emb.weight.mul_(400.0)  # raw logits far beyond the cap
    x, _ = batch()
    logits = m.forward_logits(x)
    assert logits.abs().max() <= TINY.logit_softcap and logits.abs().max() > 0.9 * TINY.logit_softcap
    raw = m.forward_hidden(x) @ m.tok_emb.weight.T
    torch.testing.assert_close(logits, 30.0 * torch.tanh(raw / 30.0))


def test_causality_future_tokens_do_not_change_past_logits():
    m = make_tiny()
    x, _ = batch()
    x2 = x.clone()
    x2[:, 8] = (x2[:, 8] + 5) % 64
    a, b = m.forward_logits(x), m.forward_logits(x2)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- hand references


def naive_rope(x, rd, base):
    """x (B, T, H, hd): rotate pairs (j, j + rd/2) by angle t * base^(-2j/rd)."""
    T, half = x.size(1), rd // 2
    out = x.clone()
    for j in range(half):
        ang = torch.arange(T, dtype=torch.float32) * base ** (-2 * j / rd)  # (T,)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x1, x2 = x[..., j], x[..., j + half]
        out[..., j] = x1 * c + x2 * s
        out[..., j + half] = -x1 * s + x2 * c
    return out


def naive_rms(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def naive_attention(m, layer, a, ve):
    """Reference attention of block `layer` on its input a (B, T, D): repeat K/V, masked softmax."""
    cfg, L = m.cfg, m.cfg.num_layers
    B, T, _ = a.shape
    H, Hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
    q = (a @ m.qo_bank[layer].T).view(B, T, H, hd)
    k = (a @ m.kv_bank[layer].T).view(B, T, Hkv, hd)
    v = a @ m.kv_bank[L + layer].T
    if ve is not None:
        v = v + ve
    v = v.view(B, T, Hkv, hd)
    q, k = naive_rms(q), naive_rms(k)
    q, k = naive_rope(q, cfg.rope_dims, cfg.rope_base), naive_rope(k, cfg.rope_dims, cfg.rope_base)
    q = q * m.blocks[layer].attn.q_gain[None, None, :, None]
    rep = H // Hkv
    kr, vr = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)  # (B, T, H, hd)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(hd)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)  # (B, T, H, hd)
    if layer >= L - cfg.xsa_last_n:
        vn = vr / vr.norm(dim=-1, keepdim=True)
        y = y - (y * vn).sum(-1, keepdim=True) * vn
    y = y.reshape(B, T, H * hd)
    return y @ m.qo_bank[L + layer].T, y


def capture_block_inputs(m, layer):
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["h"], seen["x0"], seen["ve"] = args[0], args[1], kwargs.get("ve")

    m.blocks[layer].register_forward_hook(hook, with_kwargs=True)
    return seen


@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-6), (torch.float16, 2e-6), (torch.float32, 1e-7)])
def test_accumulated_gram_is_exactly_symmetric_and_accurate_for_heavy_tailed_inputs(dtype, tol):
    """bf16/fp16 inputs: exact products, fp32 sums; fp32 inputs: fp64 products and sums."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 96, generator=g) ** 3 * torch.exp(torch.randn(96, generator=g))  # heavy tails
    x = x.to(dtype)
    H = {"a": torch.zeros(96, 96), "b": torch.ones(96, 96)}
    accumulate_gram(H, ("a", "b"), x.view(2, 2048, 96))
    ref = (lambda t: t.T @ t)(x.double())  # (96, 96)
    assert torch.equal(H["a"], H["a"].T) and H["a"].dtype == torch.float32
    err = (H["a"].double() - ref).abs() / (ref.diagonal()[:, None] * ref.diagonal()[None, :]).sqrt()
    assert float(err.max()) < tol  # relative to the Cauchy-Schwarz bound |H_ij| <= sqrt(H_ii H_jj)
    torch.testing.assert_close(H["b"], H["a"] + 1)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_under_autocast_is_that_of_the_rows_the_layer_multiplies(dtype):
    """Under autocast an fp32 input (rms_norm's, the MLP square's) is multiplied in the autocast
    dtype, so its gram is that of the cast rows; outside autocast the fp32 rows themselves."""
    x = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(1))  # fp32
    H = {"in": torch.zeros(64, 64), "out": torch.zeros(64, 64)}
    with torch.autocast("cpu", dtype=dtype):
        accumulate_gram(H, ("in",), x)
    accumulate_gram(H, ("out",), x)

    def err(got, rows):  # max |got - X^T X| relative to the bound sqrt(H_ii H_jj)
        rows = rows.reshape(-1, 64).double()
        ref = rows.T @ rows
        d = ref.diagonal()
        return float(((got.double() - ref).abs() / (d[:, None] * d[None, :]).sqrt()).max())

    assert err(H["in"], x.to(dtype)) < 2e-6 and err(H["out"], x) < 1e-7
    assert err(H["in"], x) > 1e-5  # the cast is visible: not the fp32 rows' gram


def test_block_matches_hand_reference_and_hessians_are_xtx():
    m = make_tiny()
    L, layer = TINY.num_layers, TINY.num_layers - 1  # last layer: XSA + value embedding
    seen = capture_block_inputs(m, layer)
    x, y = batch()
    H = m.zero_hessians()
    m(x, y, H)
    blk = m.blocks[layer]
    h_in = blk.resid_mix[0] * seen["h"] + blk.resid_mix[1] * seen["x0"]
    s = 1.0 / math.sqrt(layer + 1)
    a = naive_rms(h_in) * s  # attention input
    ve = m.ve_layer_scales[0] * m.ve_shared.scale * (m.ve_shared.embed.weight[x] @ m.ve_shared.proj.weight.T)
    torch.testing.assert_close(seen["ve"], ve)
    attn_out, y_attn = naive_attention(m, layer, a, ve)
    h_mid = h_in + blk.attn_scale * attn_out
    u = (naive_rms(h_mid) * s) @ m.mlp_up_bank[layer].T
    act = torch.where(u >= 0, u, 0.5 * u) ** 2  # LeakyReLU(0.5)^2
    h_out = h_mid + blk.mlp_scale * (act @ m.mlp_down_bank[layer].T)
    torch.testing.assert_close(m.forward_hidden(x), naive_rms(h_out), atol=1e-5, rtol=1e-5)

    def gram(t):
        t = t.reshape(-1, t.size(-1))
        return t.T @ t

    p = f"blocks.{layer}"
    for kind in ("c_q", "c_k", "c_v"):
        torch.testing.assert_close(H[f"{p}.attn.{kind}.weight"], gram(a), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(H[f"{p}.attn.proj.weight"], gram(y_attn), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(H[f"{p}.mlp.fc.weight"], gram(naive_rms(h_mid) * s), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(H[f"{p}.mlp.proj.weight"], gram(act), atol=1e-4, rtol=1e-5)
    assert all(H[n].diagonal().min() > 0 for n in m.quantizable_names())
    before = {k: v.clone() for k, v in H.items()}
    m(x, y, H)  # accumulates: second pass doubles every matrix
    for k in H:
        torch.testing.assert_close(H[k], 2 * before[k])
    with pytest.raises(ValueError, match="blocks.0.attn.c_q.weight"):
        m(x, y, {})


def test_unet_skips_and_first_layer_match_reference():
    """Layer 0 (no XSA here) via the naive attention, and the decoder's skip connection."""
    m = make_tiny()
    x, _ = batch()
    seen0, seen1 = capture_block_inputs(m, 0), capture_block_inputs(m, 1)
    with torch.no_grad():
        m.forward_logits(x)
        e = m.tok_emb.weight[x] + m.bigram.scale * (m.bigram.embed.weight[bigram_hash(x, 31)] @ m.bigram.proj.weight.T)
        en = naive_rms(e)
        g = torch.sigmoid(m.smear.gate)
        x0 = (1 - g) * en + g * F.pad(en[:, :-1], (0, 0, 1, 0))
        torch.testing.assert_close(seen0["x0"], x0)
        torch.testing.assert_close(seen0["h"], x0)
        blk = m.blocks[0]
        h_in = blk.resid_mix[0] * x0 + blk.resid_mix[1] * x0
        attn_out, _ = naive_attention(m, 0, naive_rms(h_in), None)
        h_mid = h_in + blk.attn_scale * attn_out
        u = naive_rms(h_mid) @ m.mlp_up_bank[0].T
        h_out = h_mid + blk.mlp_scale * ((torch.where(u >= 0, u, 0.5 * u) ** 2) @ m.mlp_down_bank[0].T)
        # 3 layers: encoder = block 0, decoder = blocks 1, 2; block 1 gets skip_weights[0] * out(block 0)
        torch.testing.assert_close(seen1["h"], h_out + m.skip_weights[0] * h_out, atol=1e-5, rtol=1e-5)


def test_xsa_output_is_orthogonal_to_own_value_per_kv_group():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, 6, 8, generator=g)  # 6 query heads
    v = torch.randn(2, 5, 3, 8, generator=g)  # 3 KV heads: query head h -> KV head h // 2
    out = xsa(y, v)
    for h in range(6):
        vn = F.normalize(v[:, :, h // 2], dim=-1)
        assert (out[:, :, h] * vn).sum(-1).abs().max() < 1e-5
        torch.testing.assert_close(out[:, :, h], y[:, :, h] - (y[:, :, h] * vn).sum(-1, keepdim=True) * vn)


def test_rotary_ntk_rule():
    rot = Rotary(rope_dims=16, base=10000.0, train_seq_len=8)
    cos, sin = rot(8, torch.device("cpu"))  # T == train_seq_len: plain base
    j = torch.arange(8, dtype=torch.float32)
    torch.testing.assert_close(cos, torch.cos(torch.arange(8.0)[:, None] * 10000.0 ** (-2 * j / 16)))
    cos, sin = rot(16, torch.device("cpu"))  # T = 2 * train_seq_len: base * 2^(16/14)
    base = 10000.0 * 2.0 ** (16 / 14)
    torch.testing.assert_close(sin, torch.sin(torch.arange(16.0)[:, None] * base ** (-2 * j / 16)))


def test_rotary_stored_tables_equal_fresh_ones_and_stay_out_of_the_state_dict():
    rot = Rotary(rope_dims=16, base=10000.0, train_seq_len=32)
    for T in (1, 7, 32):  # a prefix of the stored tables is the table of a shorter sequence
        got, fresh = rot(T, torch.device("cpu")), rot.tables(T, torch.device("cpu"))
        assert got[0].shape == (T, 8)
        torch.testing.assert_close(got, fresh, rtol=0, atol=0)
    assert rot(33, torch.device("cpu"))[0].shape == (33, 8)  # longer: fresh, NTK-scaled
    assert rot.state_dict() == {}


def test_bigram_hash_hand_example():
    ids = torch.tensor([[5, 7, 1023, 0], [50000, 60000, 3, 3]])
    got = bigram_hash(ids, 4096).tolist()

    def i32(v):  # two's-complement wrap of the reference's int32 arithmetic
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v >= 1 << 31 else v

    # (36313*7) ^ (27191*5) = 254191 ^ 135955 = 127996 -> mod 4095 = 1051
    assert got[0][:2] == [4095, 1051]
    for row, ids_row in zip(got, ids.tolist()):
        for t in range(1, 4):
            assert row[t] == (i32(36313 * ids_row[t]) ^ i32(27191 * ids_row[t - 1])) % 4095
    assert 36313 * 60000 > 2**31 and got[1][0] == 4095


# ----------------------------------------------------------------------------- QAT


def fake_quantized_copy(m):
    ref = make_tiny()
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
            b = getattr(ref, name)
            for i in range(b.size(0)):
                b[i].copy_(fake_quant(b[i], m.qat_quantile, qmax=31))
    return ref


def test_qat_forward_equals_fake_quantized_weights_and_ste_grads():
    """Inside qat_weights() the forward is the fake-quantized model's and the gradients are the
    straight-through ones; afterwards the banks hold w again, bit for bit."""
    m = make_tiny(qat_quantile=0.9)
    x, y = batch()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    off = m(x, y)
    m.set_qat(True)
    with m.qat_weights():
        on = m(x, y)
        on.backward()
    ref = fake_quantized_copy(m)
    r = ref(x, y)
    r.backward()
    assert abs(on.item() - off.item()) > 1e-5
    torch.testing.assert_close(on, r, atol=1e-6, rtol=0)
    for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank", "tok_emb.weight"):
        g1, g2 = m.get_parameter(name).grad, ref.get_parameter(name).grad
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)  # straight-through
    for n, p in m.named_parameters():
        assert torch.equal(p, w0[n]), n  # w restored after the block
    with m.qat_weights():  # QAT still on: the same fake-quantized forward again
        torch.testing.assert_close(m(x, y), on, atol=0, rtol=0)
    m.set_qat(False)
    with m.qat_weights():  # a no-op once QAT is off
        torch.testing.assert_close(m(x, y), off, atol=0, rtol=0)
    with pytest.raises(ValueError, match="qat_clip_quantile"):
        m.set_qat_quantile(1.5)


def test_qat_weights_restores_w_when_the_block_raises():
    m = make_tiny(qat_quantile=0.9)
    w0 = m.qo_bank.detach().clone()
    m.set_qat(True)
    with pytest.raises(RuntimeError, match="boom"):
        with m.qat_weights():
            assert not torch.equal(m.qo_bank, w0)
            raise RuntimeError("boom")
    assert torch.equal(m.qo_bank, w0)


@pytest.mark.slow  # CPU inductor: ~13 s with a warm cache, ~70 s cold on a loaded 2-core box
def test_qat_flip_under_compile_changes_output_without_recompiling():
    """QAT lives outside the graph: switching it on changes the compiled model's output (the banks
    hold Q(w)) without a second graph, and matches the eager fake-quantized forward."""
    from torch._dynamo.utils import counters

    cfg = dataclasses.replace(TINY, num_layers=1, xsa_last_n=1)
    m = make_tiny(cfg=cfg, qat_quantile=0.9)
    x, _ = batch(T=8)
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(m.forward_logits, fullgraph=True, dynamic=False)
    with torch.no_grad():
        off = cm(x)
        m.set_qat(True)
        with m.qat_weights():
            on = cm(x)
            eager_on = m.forward_logits(x)
        graphs = counters["stats"]["unique_graphs"]
        m.set_qat(False)
        off2 = cm(x)
    assert graphs == 1 and counters["stats"]["unique_graphs"] == 1
    assert (on - off).abs().max() > 1e-4
    torch.testing.assert_close(on, eager_on, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off2, off, atol=0, rtol=0)


# ----------------------------------------------------------------------------- export / groups


def test_export_load_round_trip_is_exact_and_strict():
    m = make_tiny(seed=0)
    sd = m.export_state_dict()
    assert "blocks.2.attn.c_v.weight" in sd and "qo_bank" not in sd
    assert sd["blocks.2.attn.c_v.weight"].shape == (16, 32) and sd["blocks.1.mlp.proj.weight"].shape == (32, 96)
    assert torch.equal(sd["blocks.1.attn.proj.weight"], m.qo_bank[TINY.num_layers + 1])
    assert "blocks.0.attn.q_gain" in sd and "ve_shared.scale" in sd and "bigram.proj.weight" in sd
    assert sum(v.numel() for v in sd.values()) == m.num_params()
    other = make_tiny(seed=5)
    other.load_export_state_dict(sd)
    for (n, p), (n2, p2) in zip(m.state_dict().items(), other.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    x, y = batch()
    assert torch.equal(m(x, y), other(x, y))
    bad = dict(sd)
    del bad["blocks.0.mlp.fc.weight"]
    with pytest.raises(ValueError, match="missing.*blocks.0.mlp.fc.weight"):
        other.load_export_state_dict(bad)
    bad = dict(sd, **{"blocks.0.mlp.fc.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight has shape"):
        other.load_export_state_dict(bad)
    with pytest.raises(ValueError, match="unexpected.*extra"):
        other.load_export_state_dict(dict(sd, extra=torch.zeros(1)))


def test_optimizer_groups_partition_parameters():
    m = make_tiny()
    g = m.optimizer_groups()
    ids = [id(p) for grp in g.values() for p in grp]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert [tuple(p.shape) for p in g["matrix"]] == [(6, 32, 32), (6, 16, 32), (3, 96, 32), (3, 32, 96), (32, 8), (16, 8)]
    assert {id(p) for p in g["embed"]} == {id(m.tok_emb.weight), id(m.bigram.embed.weight), id(m.ve_shared.embed.weight)}
    assert all(p.dim() <= 2 and p.numel() <= 3 * 32 for p in g["scalar"])


@pytest.mark.gpu
def test_fused_mlp_path_matches_eager_on_cuda():
    pytest.importorskip("pgolf.shared.kernels.fused_mlp")
    m = make_tiny(cfg=dataclasses.replace(TINY, model_dim=128, num_heads=4)).cuda()
    x, y = batch(T=64)
    x, y = x.cuda(), y.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x, y)
        m.use_fused_mlp = True
        got = m(x, y)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- the records' knobs


def two_docs(seed=0, T=10, D=16, cut=5):
    """ids (1, T) = [BOS, 4 tokens, BOS, 4 tokens] and embeddings e (1, T, D)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (1, T), generator=g)
    ids[0, 0] = ids[0, cut] = BOS_ID
    return ids, torch.randn(1, T, D, generator=g)


def test_smear_bos_mask_keeps_the_second_document_independent_of_the_first():
    torch.manual_seed(0)
    masked, plain = SmearGate(16, bos_id=BOS_ID), SmearGate(16)
    with torch.no_grad():
        masked.gate.normal_()
        plain.gate.copy_(masked.gate)
    ids, e = two_docs()
    ids2, e2 = ids.clone(), e.clone()
    ids2[0, 1:5] = torch.tensor([7, 8, 9, 10])  # another first document, same second one
    e2[0, :5] = torch.randn(5, 16)
    out, out2 = masked(e, ids), masked(e2, ids2)
    assert torch.equal(out[0, 5:], out2[0, 5:])  # the second document never sees the first
    assert not torch.equal(plain(e, ids)[0, 5:], plain(e2, ids2)[0, 5:])  # the seeds' gate leaks at BOS
    g = torch.sigmoid(masked.gate)  # hand reference: BOS keeps its embedding, others mix
    want = (1 - g) * e + g * F.pad(e[:, :-1], (0, 0, 1, 0))
    want[0, [0, 5]] = e[0, [0, 5]]
    torch.testing.assert_close(out, want)


def test_smear_bos_mask_in_the_model_changes_only_bos_positions():
    cfg = dataclasses.replace(TINY, smear_bos_mask=True)
    m, ref = make_tiny(cfg=cfg), make_tiny(cfg=TINY)
    assert count_params(cfg) == count_params(TINY)
    x, y = batch()
    x[x == BOS_ID] = 2  # no BOS: identical to the unmasked model
    assert torch.equal(m(x, y), ref(x, y))
    x[:, 6] = BOS_ID
    with torch.no_grad():
        a, b = m.forward_logits(x), ref.forward_logits(x)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)  # causal: before the BOS unchanged
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_asymmetric_softcap_matches_hand_reference():
    z = torch.linspace(-400, 400, 1001)
    got = softcap(z, 30.0, 10.0)
    want = torch.tensor([30.0 * math.tanh(v / 30.0) if v >= 0 else 10.0 * math.tanh(v / 10.0) for v in z.tolist()])
    torch.testing.assert_close(got, want)
    assert got.min() >= -10.0 and got.max() <= 30.0 and got.min() < -9.99
    assert torch.equal(softcap(z, 30.0, 30.0), 30.0 * torch.tanh(z / 30.0))  # the seeds' formula exactly
    cfg = dataclasses.replace(TINY, logit_softcap=20.0, logit_softcap_neg=5.0)
    m = make_tiny(cfg=cfg)
    with torch.no_grad():
        m.tok_emb.weight.mul_(400.0)
        x, _ = batch()
        raw = m.forward_hidden(x) @ m.tok_emb.weight.T
        torch.testing.assert_close(m.forward_logits(x), softcap(raw, 20.0, 5.0))
    assert count_params(cfg) == count_params(TINY)


def test_sparse_attention_gate_matches_hand_reference():
    cfg = dataclasses.replace(TINY, attn_gate_window=5, attn_gate_scale=0.5)
    m = make_tiny(cfg=cfg)
    attn = m.blocks[1].attn
    assert attn.gate_w.shape == (4, 5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 4, 8, generator=g)
    want = y.clone()
    for b in range(2):
        for t in range(7):
            for h in range(4):
                z = float(attn.gate_w[h].detach() @ x[b, t, :5])
                want[b, t, h] *= 1.0 / (1.0 + math.exp(-0.5 * z))
    torch.testing.assert_close(attn.output_gate(x, y), want)
    # zero gate weights halve every head: the same model as no gate with half the O matrices
    torch.manual_seed(0)
    zero, plain = GPT(cfg), GPT(TINY)
    assert all(b.attn.gate_w.abs().max() == 0 for b in zero.blocks)
    proj = {k: v for k, v in m.export_state_dict().items() if k.endswith("attn.proj.weight")}
    zero.load_export_state_dict(dict(zero.export_state_dict(), **proj))
    rest = {k: v for k, v in zero.export_state_dict().items() if ".gate_w" not in k}
    plain.load_export_state_dict(dict(rest, **{k: 0.5 * v for k, v in proj.items()}))
    xb, yb = batch()
    torch.testing.assert_close(zero(xb, yb), plain(xb, yb))


def test_sparse_attention_gate_params_groups_and_export():
    cfg = dataclasses.replace(ModelConfig(), attn_gate_window=12)
    assert count_params(cfg) - count_params(ModelConfig()) == 11 * 8 * 12  # 1,056 (records: ~1K)
    m = make_tiny(cfg=dataclasses.replace(TINY, attn_gate_window=4))
    scalar_ids = {id(p) for p in m.optimizer_groups()["scalar"]}
    assert all(id(b.attn.gate_w) in scalar_ids for b in m.blocks)  # AdamW scalar group, as the records
    sd = m.export_state_dict()
    assert sd["blocks.2.attn.gate_w"].shape == (4, 4)
    other = GPT(dataclasses.replace(TINY, attn_gate_window=4))
    other.load_export_state_dict(sd)
    x, y = batch()
    assert torch.equal(m(x, y), other(x, y))


@pytest.mark.parametrize("mult,dim,hidden", [(3.0, 512, 1536), (4.0, 512, 2048), (2.999, 128, 384),
                                             (2.515625, 32, 81), (3.03125, 32, 97), (0.5, 2, 1)])
def test_mlp_hidden_rounds_half_up(mult, dim, hidden):
    assert ModelConfig(model_dim=dim, num_heads=1, num_kv_heads=1, mlp_mult=mult).mlp_hidden == hidden


def test_odd_mlp_width_builds_trains_and_exports():
    cfg = dataclasses.replace(TINY, mlp_mult=3.03125)  # hidden 97
    m = make_tiny(cfg=cfg)
    assert m.mlp_up_bank.shape == (3, 97, 32) and m.hessian_shapes()["blocks.0.mlp.proj.weight"] == 97
    assert count_params(cfg) - count_params(TINY) == 2 * TINY.num_layers * 32  # one more row + column
    wide = count_params(dataclasses.replace(ModelConfig(), mlp_mult=4.0))
    assert wide - count_params(ModelConfig()) == 11 * 2 * 512 * 512  # 33,023,068
    x, y = batch()
    hs = m.zero_hessians()
    loss = m(x, y, hessians=hs)
    loss.backward()
    assert m.mlp_down_bank.grad.shape == (3, 32, 97) and hs["blocks.1.mlp.proj.weight"].shape == (97, 97)
    other = GPT(cfg)
    other.load_export_state_dict(m.export_state_dict())
    assert torch.equal(other(x, y), m(x, y))


@torch.no_grad()
@pytest.mark.parametrize("final", ["mean", "attn", "mlp"])
def test_parallel_lanes_match_hand_reference(final):
    """3 layers, lanes from layer 1 (the whole decoder): attention reads lane 0 (+ x0 mix), the MLP
    reads lane 1; lane <- resid * lane + post[attn] * attn + post[mlp] * mlp; output by `final`."""
    cfg = dataclasses.replace(TINY, parallel_start_layer=1, parallel_final_lane=final)
    m = make_tiny(cfg=cfg)
    assert m.parallel_post.shape == (2, 2, 2) and m.parallel_resid.shape == (2, 2)
    seen = {}
    m.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(out0=out, x0=args[1]))
    x, y = batch()
    H = m.zero_hessians()
    got = m.forward_hidden(x, H)
    out0, x0 = seen["out0"], seen["x0"]
    lane0, lane1 = out0 + m.skip_weights[0] * out0, out0  # the skip lands on lane 0 only
    ve = m.ve_layer_scales[0] * m.ve_shared.scale * (m.ve_shared.embed.weight[x] @ m.ve_shared.proj.weight.T)
    for k, layer in enumerate((1, 2)):
        blk, s = m.blocks[layer], 1.0 / math.sqrt(layer + 1)
        attn_out, _ = naive_attention(m, layer, naive_rms(blk.resid_mix[0] * lane0 + blk.resid_mix[1] * x0) * s,
                                      ve if layer == 2 else None)
        a = blk.attn_scale * attn_out
        mlp_in = naive_rms(lane1) * s
        u = mlp_in @ m.mlp_up_bank[layer].T
        b = blk.mlp_scale * ((torch.where(u >= 0, u, 0.5 * u) ** 2) @ m.mlp_down_bank[layer].T)
        P, r = m.parallel_post[k], m.parallel_resid[k]
        lane0, lane1 = r[0] * lane0 + P[0, 0] * a + P[1, 0] * b, r[1] * lane1 + P[0, 1] * a + P[1, 1] * b
    want = {"mean": 0.5 * (lane0 + lane1), "attn": lane0, "mlp": lane1}[final]
    torch.testing.assert_close(got, naive_rms(want), atol=1e-5, rtol=1e-5)
    flat = mlp_in.reshape(-1, 32)  # the last layer's MLP input: its Hessian follows lane 1
    torch.testing.assert_close(H["blocks.2.mlp.fc.weight"], flat.T @ flat, atol=1e-4, rtol=1e-5)


def test_parallel_lanes_params_init_and_export():
    cfg = dataclasses.replace(ModelConfig(), parallel_start_layer=8)
    assert count_params(cfg) - count_params(ModelConfig()) == 3 * (4 + 2)  # layers 8-10: +18
    torch.manual_seed(0)
    m = GPT(dataclasses.replace(TINY, parallel_start_layer=2))
    assert torch.all(m.parallel_post == 1) and torch.all(m.parallel_resid == 1.1)
    assert {id(m.parallel_post), id(m.parallel_resid)} <= {id(p) for p in m.optimizer_groups()["scalar"]}
    other = GPT(dataclasses.replace(TINY, parallel_start_layer=2))
    other.load_export_state_dict(m.export_state_dict())
    x, y = batch()
    assert torch.equal(m(x, y), other(x, y))
    check_config(dataclasses.replace(ModelConfig(), parallel_start_layer=5))  # the first decoder layer
    for bad in (4, 11, -1):  # 4 is in the encoder of 11 layers, 11 is past the last layer
        with pytest.raises(ValueError, match=r"model\.parallel_start_layer"):
            check_config(dataclasses.replace(ModelConfig(), parallel_start_layer=bad))
    with pytest.raises(ValueError, match=r"model\.parallel_final_lane"):
        check_config(dataclasses.replace(TINY, parallel_final_lane="sum"))


def test_layer_order_and_param_count_of_depth_recurrence():
    rec = dataclasses.replace(ModelConfig(), num_loops=2, loop_start=3, loop_end=5)
    assert layer_order(rec) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert layer_order(rec, looping=False) == list(range(11)) == layer_order(ModelConfig())
    # 17 slots: encoder 8, decoder 9 -> 8 skip weights instead of 5
    assert count_params(rec) - count_params(ModelConfig()) == 3 * 512
    for bad in (dict(loop_start=4, loop_end=3), dict(loop_end=11), dict(num_loops=-1)):
        with pytest.raises(ValueError, match=r"model\.(loop_start|num_loops)"):
            check_config(dataclasses.replace(rec, **bad))
    with pytest.raises(ValueError, match=r"model\.loop_end must be below model\.parallel_start_layer \(5\)"):
        check_config(dataclasses.replace(rec, parallel_start_layer=5))
    assert GPT(dataclasses.replace(TINY, num_loops=1)).looping  # as the evaluate stage rebuilds it


@torch.no_grad()
def test_depth_recurrence_matches_block_by_block_reference_and_sums_hessians():
    """3 layers, layer 1 looped once more: order 0 1 1 2, encoder (0, 1), decoder (1, 2)."""
    cfg = dataclasses.replace(TINY, num_loops=1, loop_start=1, loop_end=1)
    m = make_tiny(cfg=cfg)
    assert m.skip_weights.shape == (2, 32)
    calls = []
    m.blocks[1].register_forward_hook(lambda mod, args, out: calls.append(args[0]))
    seen = capture_block_inputs(m, 0)
    x, y = batch()
    H = m.zero_hessians()
    got = m.forward_hidden(x, H)
    assert len(calls) == 2
    passes = calls[:2]  # the model's two passes (the reference below calls the block again)
    x0, L = seen["x0"], TINY.num_layers
    cos, sin = m.rotary(x.size(1), x.device)
    w = [(m.qo_bank[i], m.kv_bank[i], m.kv_bank[L + i], m.qo_bank[L + i], m.mlp_up_bank[i], m.mlp_down_bank[i])
         for i in range(L)]
    ve = m.ve_layer_scales[0] * m.ve_shared(x)
    h1 = m.blocks[0](x0, x0, w[0], cos, sin)
    h2 = m.blocks[1](h1, x0, w[1], cos, sin)
    h3 = m.blocks[1](h2 + m.skip_weights[0] * h2, x0, w[1], cos, sin)  # decoder pos 0 pops h2
    h4 = m.blocks[2](h3 + m.skip_weights[1] * h1, x0, w[2], cos, sin, ve=ve)
    torch.testing.assert_close(got, naive_rms(h4), atol=1e-5, rtol=1e-5)
    blk, s = m.blocks[1], 1.0 / math.sqrt(2)
    a = [(naive_rms(blk.resid_mix[0] * h + blk.resid_mix[1] * x0) * s).reshape(-1, 32) for h in passes]
    torch.testing.assert_close(H["blocks.1.attn.c_q.weight"], a[0].T @ a[0] + a[1].T @ a[1], atol=1e-4, rtol=1e-5)
    m.set_looping(False)  # the unlooped model: the plain U-Net with the first skip weight
    plain = GPT(TINY)
    plain.load_export_state_dict(dict(m.export_state_dict(), skip_weights=m.skip_weights[:1]))
    torch.testing.assert_close(m.forward_hidden(x), plain.forward_hidden(x))


# ----------------------------------------------------------------------------- PR #2135's knobs


def test_add_smear_gate_matches_hand_reference_and_its_bos_mask():
    """smear_form add: out_t = e_t + lam * sigmoid(W . e_t[:w]) * e_{t-1}, out_0 = e_0; with the BOS
    mask nothing is added where the current token is a BOS."""
    torch.manual_seed(0)
    plain, masked = AddSmearGate(5), AddSmearGate(5, bos_id=BOS_ID)
    with torch.no_grad():
        plain.gate.normal_()
        plain.lam.fill_(0.7)
        masked.load_state_dict(plain.state_dict())
    ids, e = two_docs()
    want = e.clone()
    for t in range(1, e.size(1)):
        g = 0.7 / (1.0 + math.exp(-float(plain.gate[0].detach() @ e[0, t, :5])))
        want[0, t] = e[0, t] + g * e[0, t - 1]
    with torch.no_grad():
        torch.testing.assert_close(plain(e, ids), want)
        want[0, 5] = e[0, 5]  # the second document's BOS keeps its embedding
        torch.testing.assert_close(masked(e, ids), want)
    fresh = AddSmearGate(5)  # zero gate and lambda: the identity at init
    assert torch.equal(fresh(e, ids), e)


def test_add_smear_form_in_the_model_runs_before_the_embedding_norm():
    cfg = dataclasses.replace(TINY, smear_form="add", smear_window=6)
    m = make_tiny(cfg=cfg)
    assert m.smear.gate.shape == (1, 6) and m.smear.lam.shape == (1,)
    assert count_params(cfg) - count_params(TINY) == 6 + 1 - 32  # (1, 6) + lam instead of the (D,) gate
    seen = capture_block_inputs(m, 0)
    x, _ = batch()
    with torch.no_grad():
        m.forward_hidden(x)
        e = m.tok_emb(x) + m.bigram(x)
        torch.testing.assert_close(seen["x0"], naive_rms(m.smear(e, x)))
    scalar = {id(p) for p in m.optimizer_groups()["scalar"]}
    assert {id(m.smear.gate), id(m.smear.lam)} <= scalar  # scalar AdamW, as #2135
    for bad in (dict(smear_form="both"), dict(smear_window=0), dict(smear_window=33)):
        with pytest.raises(ValueError, match=r"model\.smear_(form|window)"):
            check_config(dataclasses.replace(TINY, **bad))


@torch.no_grad()
def test_skip_gates_match_hand_reference():
    """skip_gates: h <- lerp(w * skip, h, sigmoid(g)) = sigmoid(g) h + (1 - sigmoid(g)) w skip."""
    cfg = dataclasses.replace(TINY, skip_gates=True)
    assert GPT(cfg).skip_gates.abs().max() == 0  # zero init: sigmoid 1/2
    m = make_tiny(cfg=cfg)
    assert m.skip_gates.shape == m.skip_weights.shape == (1, 32)
    assert count_params(cfg) - count_params(TINY) == 32
    g = torch.Generator().manual_seed(5)
    h, skip = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    sg = torch.sigmoid(m.skip_gates[0])
    torch.testing.assert_close(m._skip(0, h, skip), sg * h + (1 - sg) * m.skip_weights[0] * skip)
    seen, out0 = capture_block_inputs(m, 1), {}  # 3 layers: layer 1 takes layer 0's output as its skip
    m.blocks[0].register_forward_hook(lambda mod, args, out: out0.update(h=out))
    x, _ = batch()
    m.forward_hidden(x)
    h0 = out0["h"]
    torch.testing.assert_close(seen["h"], sg * h0 + (1 - sg) * m.skip_weights[0] * h0)
    scalar = {id(p) for p in m.optimizer_groups()["scalar"]}
    assert id(m.skip_gates) in scalar
    other = GPT(cfg)
    other.load_export_state_dict(m.export_state_dict())
    xb, yb = batch()
    assert torch.equal(m(xb, yb), other(xb, yb))


def test_rotary_without_the_ntk_rule_keeps_its_base_at_every_length():
    rot = Rotary(rope_dims=16, base=10000.0, train_seq_len=8, ntk=False)
    long = Rotary(rope_dims=16, base=10000.0, train_seq_len=64)
    cos, sin = rot(24, torch.device("cpu"))  # 3 * train_seq_len, no base scaling
    want = long(24, torch.device("cpu"))
    torch.testing.assert_close((cos, sin), want, rtol=0, atol=0)
    ntk = Rotary(rope_dims=16, base=10000.0, train_seq_len=8)(24, torch.device("cpu"))
    assert not torch.allclose(ntk[0], cos)
    m = GPT(dataclasses.replace(TINY, rope_ntk=False), train_seq_len=8)
    assert not m.rotary.ntk and GPT(TINY).rotary.ntk


def test_learned_softcaps_cap_the_scoring_head_only_and_no_optimizer_trains_them():
    cfg = dataclasses.replace(TINY, logit_softcap_learned=True, logit_softcap_neg=25.0)
    assert count_params(cfg) - count_params(TINY) == 2
    m = make_tiny(cfg=cfg)
    assert m.softcap_pos.shape == () and GPT(cfg).softcap_pos == 30.0 and GPT(cfg).softcap_neg == 25.0
    with torch.no_grad():
        m.tok_emb.weight.mul_(400.0)
        m.softcap_pos.fill_(12.0)
        m.softcap_neg.fill_(6.0)
    x, y = batch()
    h = m.forward_hidden(x)
    raw = h @ m.tok_emb.weight.T
    with torch.no_grad():
        torch.testing.assert_close(m.forward_logits(x), softcap(raw, 12.0, 6.0))  # eval: the learned caps
        torch.testing.assert_close(m.logits_from_hidden(h), softcap(raw, 12.0, 6.0))
        want = F.cross_entropy(softcap(raw, 30.0, 25.0).reshape(-1, 64), y.reshape(-1))
        torch.testing.assert_close(m(x, y), want)  # training: the fixed caps
    m(x, y).backward()
    assert m.softcap_pos.grad is None and m.softcap_neg.grad is None
    groups = m.optimizer_groups()
    assert [id(p) for p in groups["untrained"]] == [id(m.softcap_pos), id(m.softcap_neg)]
    assert not {id(m.softcap_pos)} & {id(p) for k in ("matrix", "embed", "scalar") for p in groups[k]}
    sd = m.export_state_dict()
    assert sd["softcap_neg"].shape == () and float(sd["softcap_neg"]) == 6.0
    other = GPT(cfg)
    other.load_export_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(other.forward_logits(x), m.forward_logits(x))
    assert GPT(TINY).optimizer_groups()["untrained"] == []


def test_no_bigram_hash():
    cfg = dataclasses.replace(TINY, bigram_buckets=0)
    assert count_params(TINY) - count_params(cfg) == 31 * 8 + 8 * 32 + 1  # table, projection, scale
    m = make_tiny(cfg=cfg)
    assert m.bigram is None
    g = m.optimizer_groups()
    ids = [id(p) for grp in g.values() for p in grp]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert [tuple(p.shape) for p in g["matrix"]] == [(6, 32, 32), (6, 16, 32), (3, 96, 32), (3, 32, 96), (16, 8)]
    seen = capture_block_inputs(m, 0)
    x, y = batch()
    with torch.no_grad():
        m.forward_hidden(x)
        torch.testing.assert_close(seen["x0"], m.smear(naive_rms(m.tok_emb(x)), x))
    check_config(cfg)
    for bad in (1, -1):
        with pytest.raises(ValueError, match=r"model\.bigram_buckets must be 0 \(off\) or >= 2"):
            check_config(dataclasses.replace(TINY, bigram_buckets=bad))


@torch.no_grad()
def test_parallel_lambdas_of_every_layer_read_the_parallel_layers_rows():
    """parallel_lambdas_all_layers: (L, 2, 2) / (L, 2) lambdas; layer i reads row i, so the model
    equals the one with rows only for the parallel layers when those rows agree."""
    cfg = dataclasses.replace(TINY, parallel_start_layer=2)
    full = dataclasses.replace(cfg, parallel_lambdas_all_layers=True)
    assert count_params(full) - count_params(cfg) == 2 * (4 + 2)
    m = make_tiny(cfg=full)
    assert m.parallel_post.shape == (3, 2, 2) and m.parallel_resid.shape == (3, 2)
    assert torch.all(GPT(full).parallel_post == 1) and torch.all(GPT(full).parallel_resid == 1.1)
    short = GPT(cfg)
    sd = m.export_state_dict()
    short.load_export_state_dict({**sd, "parallel_post": sd["parallel_post"][2:],
                                  "parallel_resid": sd["parallel_resid"][2:]})
    x, y = batch()
    assert torch.equal(m(x, y), short(x, y))
    m.parallel_post[:2] += 1.0  # the rows of layers 0 and 1 are never read
    m.parallel_resid[:2] += 1.0
    assert torch.equal(m(x, y), short(x, y))
