"""Causal GQA attention at the record shapes, forward+backward, per backend: dense rows and
document-packed (varlen) rows.

    python -m bench.bench_attention --out bench/results/attention_varlen_h100.json            # a GPU
    python -m bench.bench_attention --out bench/results/attention_varlen_h100.json \\
        --shard data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin                        # + real documents
    python -m bench.bench_attention --smoke --out /tmp/attention_smoke.json                  # CPU: tiny shapes

Shapes: H 8, Hkv 4, hd 64, bf16, T 2048; forward+backward; median ms of
bench.timing.kernel_ms (triton.testing.do_bench) on a GPU.

* dense: (B, T) = (48 or 12, 2048) per backend: SDPA flash, cuDNN and memory-efficient (each with
  `enable_gqa` and with K/V repeated to H heads), FlexAttention with a causal block mask and, where
  FlashAttention-4 is installed, SDPA's flash backend on FA4's kernels (`sdpa_fa4_gqa`, torch's
  flash registry) and FA4's own `flash_attn_func` (`cute_fa4_gqa`); the max abs difference of
  each output from the flash backend's.
* varlen: one packed row of B*T = 98,304 tokens (train.doc_packing: 786,432 tokens / 8 ranks)
  whose segments come from `pgolf.shared.docattn.build_cu_seqlens` (padded to 64 entries) in
  each layout: `uniform` (48 segments of 2048: the dense 48 x 2048 work, as packed), `docs`
  (document lengths drawn from a seeded lognormal, median ~600 tokens, cut at 2048), and with
  --shard `shard` (the first 98,304 tokens of a real training shard, split at its BOS tokens).
  Backends: every one of docattn.BACKENDS available here (varlen_attn, FlexAttention compiled,
  FlashAttention-4 / -3 through torch's flash registry when installed, and the banded SDPA
  reference). Before timing, each backend's output and q/k/v gradients are checked against the
  reference computed in fp32 (`check`: max abs error of the output, and of each gradient relative
  to the reference gradient's max abs); a backend that fails is reported, not timed.
  TFLOP/s count each segment's causal pairs (docattn.attention_flops).

The JSON names the GPU, torch, CUDA, Triton and flash-attn-4 versions, and per varlen layout the
backends from fastest to slowest (`ranking`): the order for docattn.AUTO_ORDER. --smoke runs the
same code on a CPU at tiny shapes (fp32, host-clock medians) to check the bench itself.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.shared import docattn as D
from pgolf.shared.io import write_json

OUT_TOL = 3e-2  # bf16 output vs the fp32 reference: max abs error
GRAD_TOL = 3e-2  # each gradient: max abs error / max abs of the reference gradient
FA4_DENSE = ("sdpa_fa4_gqa", "cute_fa4_gqa")  # dense variants on FlashAttention-4's kernels, run last


@dataclass(frozen=True)
class Shapes:
    T: int = 2048  # sequence length = max segment length
    H: int = 8
    Hkv: int = 4
    hd: int = 64
    dense_batches: tuple[int, ...] = (48, 12)
    row_tokens: int = 98_304  # one rank's packed row (48 x 2048)
    dtype: torch.dtype = torch.bfloat16


SMOKE = Shapes(T=64, H=4, Hkv=2, hd=16, dense_batches=(4,), row_tokens=512, dtype=torch.float32)


# ----------------------------------------------------------------------------- layouts and plan


def layout_starts(name: str, n: int, seq_len: int, seed: int = 0, shard: str | None = None) -> np.ndarray:
    """Document starts (BOS positions) of a row of n tokens for a varlen layout."""
    if name == "uniform":
        return np.arange(0, n, seq_len)
    if name == "docs":
        rng = np.random.default_rng(seed)
        lengths = np.maximum(1, rng.lognormal(mean=math.log(600 * n / 98_304 + 1), sigma=1.0, size=n)).astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        return starts[starts < n]
    if name == "shard":
        if shard is None:
            raise ValueError("layout 'shard' needs --shard")
        from pgolf.shared.shards import read_shard

        return D.doc_starts(read_shard(shard)[:n])
    raise ValueError(f"unknown layout {name!r}")


def plan(device, layouts: list[str], with_dense: bool = True) -> dict:
    """What a run measures on `device`: dense variants (CUDA: the SDPA backends and flex; CPU:
    SDPA's default) and, per varlen layout, the doc-attention backends available there (the
    reference always; flex only where it trains, i.e. CUDA)."""
    cuda = torch.device(device).type == "cuda"
    backends = D.available(device)
    dense = []
    if with_dense:
        dense = ([f"sdpa_{n}_{g}" for n in ("flash", "cudnn", "efficient") for g in ("gqa", "repeat")] + ["flex_gqa"]
                 + fa4_dense(device, "fa4" in backends) if cuda else ["sdpa_default_gqa"])
    varlen = [b for b in ("varlen", "flex", "fa4", "fa3") if b in backends] + ["reference"]
    if cuda and "flex" in backends:  # its kernels as inductor's autotuning picks them, beside its defaults
        varlen.insert(varlen.index("flex") + 1, "flex_autotune")
    return {"dense": dense, "varlen": {layout: list(varlen) for layout in layouts}}


def fa4_dense(device, registered: bool) -> list[str]:
    """FA4's dense variants that can run on `device`: its own entry wherever FA4 is installed
    (docattn.flash_impl_installed), SDPA on its kernels only where torch's registry has it too."""
    if not D.flash_impl_installed("fa4", device):
        return []
    return list(FA4_DENSE) if registered else ["cute_fa4_gqa"]


def check(out, grads, ref_out, ref_grads, out_tol: float = OUT_TOL, grad_tol: float = GRAD_TOL) -> dict:
    """A backend's output and (dq, dk, dv) against the reference's: max abs error of the output,
    each gradient's max abs error relative to the reference gradient's max abs, and `ok`."""
    row = {"max_abs_err_out": float((out.float() - ref_out.float()).abs().max())}
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        scale = float(r.float().abs().max()) or 1.0
        row[f"rel_err_{name}"] = float((g.float() - r.float()).abs().max()) / scale
    row["ok"] = bool(row["max_abs_err_out"] <= out_tol and all(row[f"rel_err_{n}"] <= grad_tol for n in ("dq", "dk", "dv")))
    return row


def ranking(rows: list[dict]) -> dict:
    """{layout: [backend, ...] fastest first} over the rows that passed and were timed."""
    out: dict[str, list[str]] = {}
    for layout in dict.fromkeys(r["layout"] for r in rows):
        timed = sorted((r for r in rows if r["layout"] == layout and "ms_fwd_bwd" in r), key=lambda r: r["ms_fwd_bwd"])
        out[layout] = [r["backend"] for r in timed]
    return out


# ----------------------------------------------------------------------------- timing


def fwd_bwd_ms(fn, q, k, v, cuda: bool) -> float:
    """Median ms of fn(q, k, v) forward + backward (gradients cleared between calls)."""
    g = torch.randn_like(q)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(g)
    if cuda:
        from bench.timing import kernel_ms
        return kernel_ms(step, warmup_ms=50, rep_ms=300)
    from bench.timing import median_ms
    return median_ms(step, 3, warmup=1)


def run_with_grads(fn, q, k, v, g):
    """(out, (dq, dk, dv)) of fn at leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    return out.detach(), (dq, dk, dv)


# ----------------------------------------------------------------------------- dense


def sdpa_fn(backend, gqa: bool):
    from torch.nn.attention import sdpa_kernel

    def f(q, k, v):  # (B, H, T, hd), (B, Hkv, T, hd)
        if not gqa:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return f


def flex_causal_fn(T: int, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def f(q, k, v):
        return compiled(q, k, v, block_mask=mask, enable_gqa=True)
    return f


def fa4_cute_fn():
    from flash_attn.cute import flash_attn_func

    def f(q, k, v):  # (B, H, T, hd), (B, Hkv, T, hd) -> (B, H, T, hd); FA4 takes (B, T, H, hd)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    return f


def dense_variant(name: str, T: int, device):
    """fn(q, k, v) of a dense variant; `sdpa_fa4_gqa` swaps aten's flash kernels for FA4's,
    process-wide, until bench_dense restores torch's own."""
    from torch.nn.attention import SDPBackend

    if name == "flex_gqa":
        return flex_causal_fn(T, device)
    if name == "cute_fa4_gqa":
        return fa4_cute_fn()
    if name == "sdpa_fa4_gqa":
        D.use_flash_impl("fa4")
        return sdpa_fn(SDPBackend.FLASH_ATTENTION, True)
    _, kind, g = name.split("_")
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "default": None}[kind]
    return sdpa_fn(backend, g == "gqa")


def bench_dense(names: list[str], s: Shapes, device) -> list[dict]:
    cuda = torch.device(device).type == "cuda"
    rows = []
    for B in s.dense_batches:
        torch.manual_seed(0)
        q = torch.randn(B, s.H, s.T, s.hd, device=device, dtype=s.dtype, requires_grad=True)
        k = torch.randn(B, s.Hkv, s.T, s.hd, device=device, dtype=s.dtype, requires_grad=True)
        v = torch.randn(B, s.Hkv, s.T, s.hd, device=device, dtype=s.dtype, requires_grad=True)
        base = dense_variant(names[0], s.T, device)(q, k, v).detach()
        flops = 4 * B * s.H * s.T * s.T * s.hd / 2 * 3.5  # causal fwd (2 GEMMs) + bwd (5 GEMMs)
        for name in names:
            try:
                fn = dense_variant(name, s.T, device)
                err = (fn(q, k, v).detach() - base).abs().max().item()
                ms = fwd_bwd_ms(fn, q, k, v, cuda)
                row = {"batch": B, "variant": name, "ms_fwd_bwd": round(ms, 3),
                       "tflops": round(flops / ms / 1e9, 1), f"max_abs_diff_vs_{names[0]}": err}
            except Exception as e:  # noqa: BLE001 - a backend that cannot run these shapes
                row = {"batch": B, "variant": name, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            finally:
                D.use_flash_impl(None)  # torch's own flash kernels for the next variant
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- varlen


def varlen_fn(backend: str, docs: D.DocSegments):
    """(q, k, v) (n, h, hd) -> (n, H, hd) for one backend; flex compiled (as in training), and
    flex_autotune compiled with max-autotune (inductor times its flex kernel configs)."""
    if backend in ("flex", "flex_autotune"):
        mode = "max-autotune-no-cudagraphs" if backend == "flex_autotune" else None
        compiled = torch.compile(D.flex_attention_docs, dynamic=False, mode=mode)
        return lambda q, k, v: compiled(q, k, v, docs)
    impl = D._ATTEND[backend]
    return lambda q, k, v: impl(q, k, v, docs)


def varlen_case(layout: str, s: Shapes, device, shard: str | None = None) -> dict:
    """One layout's row: its cu_seqlens, random q/k/v (n, h, hd) and output gradient, and the
    fp32 reference's output and q/k/v gradients."""
    n = s.row_tokens
    cu = D.build_cu_seqlens(layout_starts(layout, n, s.T, shard=shard), n, s.T)
    lengths = D.segment_lengths(cu)
    info = {"layout": layout, "tokens": n, "segments": int(lengths.size), "cu_entries": int(cu.size),
            "mean_segment": round(float(lengths.mean()), 1), "max_segment": int(lengths.max())}
    torch.manual_seed(0)
    q = torch.randn(n, s.H, s.hd, device=device, dtype=s.dtype, requires_grad=True)
    k = torch.randn(n, s.Hkv, s.hd, device=device, dtype=s.dtype, requires_grad=True)
    v = torch.randn(n, s.Hkv, s.hd, device=device, dtype=s.dtype, requires_grad=True)
    g = torch.randn_like(q)
    cu_t = torch.from_numpy(cu).to(device)
    ref_docs = D.segments(cu_t, n, s.T, "reference")
    ref = run_with_grads(lambda a, b, c: D.reference_attention(a, b, c, ref_docs), *(t.float() for t in (q, k, v)),
                         g.float())
    return {"info": info, "cu": cu, "cu_t": cu_t, "qkvg": (q, k, v, g), "ref": ref}


def bench_varlen(layouts: dict[str, list[str]], s: Shapes, device, shard: str | None = None) -> list[dict]:
    """Every (backend, layout) of the plan, backend by backend: the flash implementations that
    swap aten's kernels process-wide (fa3, fa4) come last, so that no other row runs on them."""
    cuda = torch.device(device).type == "cuda"
    cases = {layout: varlen_case(layout, s, device, shard) for layout in layouts}
    order = [b for b in ("varlen", "flex", "flex_autotune", "reference", "fa3", "fa4")
             if any(b in bs for bs in layouts.values())]
    rows = []
    for backend in order:
        for layout, backends in layouts.items():
            if backend not in backends:
                continue
            c = cases[layout]
            q, k, v, g = c["qkvg"]
            row = {**c["info"], "backend": backend}
            try:
                D.use_flash_impl(backend if backend in ("fa4", "fa3") else None)
                if backend in ("varlen", "fa4", "fa3"):
                    row["flash_impl"] = D.current_flash_impl()
                docs = D.segments(c["cu_t"], s.row_tokens, s.T, "flex" if backend == "flex_autotune" else backend)
                fn = varlen_fn(backend, docs)
                row.update(check(*run_with_grads(fn, q, k, v, g), *c["ref"]))
                if row["ok"]:
                    ms = fwd_bwd_ms(fn, q, k, v, cuda)
                    flops = D.attention_flops(c["cu"], s.hd, s.H)
                    row.update({"ms_fwd_bwd": round(ms, 3), "tflops": round(flops / ms / 1e9, 1)})
            except Exception as e:  # noqa: BLE001 - a backend that cannot run these shapes
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    D.use_flash_impl(None)
    return rows


# ----------------------------------------------------------------------------- main


def versions(cuda: bool) -> dict:
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda}
    from importlib import metadata

    for mod, dist, key in (("triton", "triton", "triton"), ("flash_attn.cute", "flash-attn-4", "flash_attn_4"),
                           ("flash_attn_interface", "flash_attn_3", "flash_attn_3")):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - not installed (or not importable here)
            out[key] = None
            continue
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "installed"
    if cuda:
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="dense batches (default 48 12)")
    ap.add_argument("--layouts", nargs="+", default=["uniform", "docs"], help="varlen layouts: uniform docs shard")
    ap.add_argument("--shard", default=None, help="a training shard: adds the layout 'shard' (its BOS tokens)")
    ap.add_argument("--no-dense", action="store_true", help="varlen rows only")
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on the CPU (checks the bench)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.smoke:
        raise SystemExit("bench_attention needs CUDA (or --smoke for the CPU check of the bench)")
    s = SMOKE if args.smoke else Shapes()
    if args.batches:
        s = Shapes(**{**s.__dict__, "dense_batches": tuple(args.batches)})
    layouts = list(dict.fromkeys(args.layouts + (["shard"] if args.shard else [])))
    p = plan(device, layouts, with_dense=not args.no_dense)
    dense = bench_dense(p["dense"], s, device) if p["dense"] else []
    varlen = bench_varlen(p["varlen"], s, device, shard=args.shard)
    result = {"what": f"causal GQA attention fwd+bwd: dense (B, {s.T}) and one packed row of {s.row_tokens} tokens "
                      f"with document segments of <= {s.T} (H {s.H}, Hkv {s.Hkv}, hd {s.hd}, {str(s.dtype)[6:]})",
              **versions(cuda), "smoke": bool(args.smoke), "check_tolerances": {"out_abs": OUT_TOL, "grad_rel": GRAD_TOL},
              "dense": dense, "varlen": varlen, "ranking": ranking(varlen)}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
