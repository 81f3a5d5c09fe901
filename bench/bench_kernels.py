"""Benchmark the fused LeakyReLU^2 MLP against eager and torch.compile at the record shapes.

GPU:   python bench/bench_kernels.py --out bench_kernels.json      (M=48*2048, D=512, H=1536, bf16)
Subset:  --variants eager fused fused_tma   (each variant compiles its own kernels: ~5-20 s)
CPU:   python bench/bench_kernels.py --dry --out /tmp/dry.json      (Triton interpreter, tiny shapes)
Static: python bench/bench_kernels.py --resources --out res.json   (sm_90a compile report, no GPU)

Times forward and forward+backward of each variant (triton.testing.do_bench medians on GPU),
the two fused kernels alone next to a plain cuBLAS GEMM of the same shape, peak extra memory of a
training step, and relative errors of output and gradients against an fp32 eager reference.
Every variant runs inside its own try block: a failure is recorded in the JSON and the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if "--dry" in sys.argv:  # must precede the first import of triton's jit decorators
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from bench.timing import kernel_ms  # noqa: E402
from pgolf.shared.io import write_json  # noqa: E402
from pgolf.shared.kernels import fused_mlp as fm  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--dry", action="store_true", help="CPU Triton interpreter at tiny shapes")
    ap.add_argument("--resources", action="store_true",
                    help="compile the record-shape kernels for sm_90a (no GPU) and report "
                         "shared memory, registers, spills")
    ap.add_argument("--M", type=int, default=None, help="tokens (default 48*2048; dry 96)")
    ap.add_argument("--D", type=int, default=None, help="model dim (default 512; dry 64)")
    ap.add_argument("--H", type=int, default=None, help="hidden dim (default 1536; dry 128)")
    ap.add_argument("--slope", type=float, default=0.5)
    ap.add_argument("--variants", nargs="*", default=None,
                    help="subset of variants to run (default: all)")
    return ap.parse_args()


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_inputs(M, D, H, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, D, device=device, generator=gen).to(dtype)  # (M, D)
    w_up = (torch.randn(H, D, device=device, generator=gen) / D**0.5).to(dtype)  # (H, D)
    w_down = (torch.randn(D, H, device=device, generator=gen) / H**0.5).to(dtype)  # (D, H)
    g = torch.randn(M, D, device=device, generator=gen).to(dtype)  # (M, D)
    return x, w_up, w_down, g


def fp32_reference(x, w_up, w_down, g, slope):
    leaves = [t.detach().float().requires_grad_() for t in (x, w_up, w_down)]
    out = fm.eager_mlp(*leaves, slope)
    out.backward(g.float())
    return [out.detach()] + [t.grad for t in leaves]


PTR_256 = (fm.LaunchConfig(128, 256, 64, 8, 4, split_epilogue=True),
           fm.LaunchConfig(128, 256, 64, 8, 3, split_epilogue=True))
PTR_128 = (fm.LaunchConfig(128, 128, 64, 8, 4), fm.LaunchConfig(128, 128, 64, 8, 3))
TMA_128 = (fm.LaunchConfig(128, 128, 64, 8, 4, tma=True), fm.LaunchConfig(128, 128, 64, 8, 3, tma=True))
TMA_256 = (fm.LaunchConfig(128, 256, 64, 8, 4, True, tma=True),  # the Hopper table until session 12
           fm.LaunchConfig(128, 256, 64, 8, 3, True, tma=True))
TMA_256_FLAT = (fm.LaunchConfig(128, 256, 64, 8, 4, True, tma=True, flatten=True),
                fm.LaunchConfig(128, 256, 64, 8, 3, True, tma=True, flatten=True))
TMA_256_NOSPLIT = (fm.LaunchConfig(128, 256, 64, 8, 4, tma=True),
                   fm.LaunchConfig(128, 256, 64, 8, 3, tma=True))
TMA_256_STORE = (fm.LaunchConfig(128, 256, 64, 8, 4, True, tma=True, tma_store=True),
                 fm.LaunchConfig(128, 256, 64, 8, 3, True, tma=True, tma_store=True))
TMA_256_FLAT_STORE = (fm.LaunchConfig(128, 256, 64, 8, 4, True, tma=True, flatten=True, tma_store=True),
                      fm.LaunchConfig(128, 256, 64, 8, 3, True, tma=True, flatten=True, tma_store=True))
TMA_256_KMAJOR = (fm.LaunchConfig(128, 256, 64, 8, 4, True, tma=True),  # the backward reads W_down^T
                  fm.LaunchConfig(128, 256, 64, 8, 3, True, tma=True, kmajor_b=True))
TMA_256_FLAT_STORE_KMAJOR = (TMA_256_FLAT_STORE[0], dataclasses.replace(TMA_256_FLAT_STORE[1], kmajor_b=True))


def variants(slope):
    """name -> (build() -> callable(x, w_up, w_down) -> out, (fwd, bwd) config override or None).

    "fused" uses fm.LAUNCH_TABLE (on Hopper: TMA, 128x256x64, split epilogue, flatten, TMA stores,
    the backward K-major)."""
    def fused(save_post=True):
        return lambda x, a, b: fm.fused_leaky_relu_sq_mlp(x, a, b, slope, save_post)

    def eager(x, a, b):
        return fm.eager_mlp(x, a, b, slope)

    return {
        "eager": (lambda: eager, None),
        "eager_compiled": (lambda: torch.compile(eager, fullgraph=True), None),
        "fused": (fused, None),
        "fused_recompute_post": (lambda: fused(save_post=False), None),
        "fused_tma_128x128": (fused, TMA_128),
        "fused_tma_128x256": (fused, TMA_256),
        "fused_tma_128x256_nosplit": (fused, TMA_256_NOSPLIT),
        "fused_tma_flatten": (fused, TMA_256_FLAT),
        "fused_tma_store": (fused, TMA_256_STORE),
        "fused_tma_flatten_store": (fused, TMA_256_FLAT_STORE),
        "fused_tma_bwd_kmajor": (fused, TMA_256_KMAJOR),
        "fused_tma_flatten_store_bwd_kmajor": (fused, TMA_256_FLAT_STORE_KMAJOR),
        "fused_ptr_128x256": (fused, PTR_256),
        "fused_ptr_128x128": (fused, PTR_128),
        "fused_compiled": (lambda: torch.compile(fused(), fullgraph=True), None),
    }


def bench_variant(build, inputs, ref, flops, bench, device):
    x, w_up, w_down, g = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_up, w_down)]
    fn = build()
    t0 = time.perf_counter()
    out = fn(*leaves)  # first call: compile / JIT
    out.backward(g)
    with torch.no_grad():
        fn(*leaves)  # torch.compile specializes on grad mode: compile the no-grad graph too
    first_s = time.perf_counter() - t0
    errs = {k: rel(a, b) for k, a, b in zip(("out", "dx", "dw_up", "dw_down"),
                                          [out.detach()] + [t.grad for t in leaves], ref)}
    with torch.no_grad():
        fwd_ms = bench(lambda: fn(*leaves))

    def step():
        fn(*leaves).backward(g)

    step_ms = bench(step, grad_to_none=leaves)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        for t in leaves:
            t.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": step_ms, "fwd_tflops": flops[0] / fwd_ms * 1e-9,
            "fwd_bwd_tflops": flops[1] / step_ms * 1e-9, "first_call_s": first_s,
            "peak_extra_bytes": peak, "rel_err": errs}


def ceilings(device, dtype, bench):
    """Measured device ceilings: copy bandwidth (read+write bytes/s) and a large cuBLAS GEMM rate."""
    n = (1 << 28) if device == "cuda" else (1 << 16)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    s = 8192 if device == "cuda" else 128
    a, b = (torch.randn(s, s, device=device).to(dtype) for _ in range(2))
    mm_ms = bench(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * 4 * n / copy_ms * 1e3, "gemm_flops_per_s": 2 * s**3 / mm_ms * 1e3}


def bench_kernels(inputs, slope, bench, ceil):
    """The two fused kernels alone vs a cuBLAS GEMM of the same shape (epilogue cost).

    floor_ms = max(flops / measured GEMM rate, least bytes / measured copy bandwidth)."""
    x, w_up, w_down, g = inputs
    (M, D), H, e = x.shape, w_up.shape[0], x.element_size()
    pre, post, dpre = (torch.empty(M, H, device=x.device, dtype=x.dtype) for _ in range(3))
    flops = 2 * M * D * H
    ab = (M * D + D * H) * e  # operand bytes; each (M, H) tensor read or written adds M*H*e
    cases = {  # name -> (fn, bytes moved at least)
        "up_act_kernel": (lambda: fm.launch_up_act(x, w_up, pre, post, slope), ab + 2 * M * H * e),
        "up_act_kernel_ptr": (lambda: fm.launch_up_act(x, w_up, pre, post, slope, PTR_256[0]),
                              ab + 2 * M * H * e),
        "up_gemm_cublas": (lambda: torch.mm(x, w_up.t(), out=pre), ab + M * H * e),
        "act_bwd_kernel": (lambda: fm.launch_act_bwd(g, w_down, pre, dpre, None, slope),
                           ab + 2 * M * H * e),
        "act_bwd_kernel_ptr": (lambda: fm.launch_act_bwd(g, w_down, pre, dpre, None, slope,
                                                         PTR_256[1]), ab + 2 * M * H * e),
        "act_bwd_post_kernel": (lambda: fm.launch_act_bwd(g, w_down, pre, dpre, post, slope),
                                ab + 3 * M * H * e),
        "bwd_gemm_cublas": (lambda: torch.mm(g, w_down, out=dpre), ab + M * H * e),
    }
    res = {}
    for name, (fn, nbytes) in cases.items():
        try:
            ms = bench(fn)
            floor = max(flops / ceil["gemm_flops_per_s"], nbytes / ceil["copy_bytes_per_s"]) * 1e3
            res[name] = {"ms": ms, "tflops": flops / ms * 1e-9, "bytes": nbytes, "floor_ms": floor}
        except Exception as exc:  # noqa: BLE001 - record and go on
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return res


def compile_report(name, cfg, forward, store_post, K=512, N=1536):
    """Compile one bf16 kernel for sm_90a without a GPU; shared memory, registers, spills, ops."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    consts = dict(FORWARD=forward, STORE_POST=store_post, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_PROGS=132, UPCAST=False,
                  SPLIT_EPILOGUE=cfg.split_epilogue, INPUT_PRECISION="tf32")
    sig = {"pre_ptr": "*bf16", "post_ptr": "*bf16", "dpre_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "slope_sq": "fp32"}
    if cfg.tma:
        fn = fm._gemm_act_kernel_tma
        kmajor = forward or cfg.kmajor_b
        b_blk = [cfg.block_n, cfg.block_k] if kmajor else [cfg.block_k, cfg.block_n]
        sig.update(a_desc=f"tensordesc<bf16[{cfg.block_m}, {cfg.block_k}]>",
                   b_desc=f"tensordesc<bf16{b_blk}>")
        consts.update(B_KMAJOR=kmajor, FLATTEN=cfg.flatten, TMA_STORE=cfg.tma_store)
        if cfg.tma_store:
            box = [cfg.block_m, cfg.block_n // 2 if cfg.split_epilogue else cfg.block_n]
            sig.update({k: f"tensordesc<bf16{box}>" for k in ("pre_ptr", "post_ptr", "dpre_ptr")})
    else:  # unit strides are specialized to constexpr 1 at launch, as here
        fn = fm._gemm_act_kernel
        sig.update(a_ptr="*bf16", b_ptr="*bf16", stride_am="i32", stride_bn="i32",
                   stride_bk="i32")
        consts.update(EVEN_M=True, EVEN_N=True, EVEN_K=True, stride_ak=1,
                      **({"stride_bk": 1} if forward else {"stride_bn": 1}))
    sig.update({k: "constexpr" for k in consts})
    names = [p.name for p in fn.params]
    sig = {n: sig[n] for n in names}
    aligned = ["a_ptr", "b_ptr", "pre_ptr", "post_ptr", "dpre_ptr", "M", "N", "K", "stride_am",
               "stride_bn", "stride_bk"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned
             if n in sig and sig[n] != "constexpr"}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    ptx = kernel.asm["ptx"]
    rep = {"shared_bytes": kernel.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
           "tma_loads": ptx.count("cp.async.bulk.tensor"), "cp_async": ptx.count("cp.async.cg"),
           "config": vars(cfg)}
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "k.ptx").write_text(ptx)
        for exe in ("ptxas-blackwell", "ptxas"):  # the newer one reads triton's newest PTX
            run = subprocess.run([str(bindir / exe), "-arch=sm_90a", "-v", f"{tmp}/k.ptx", "-o",
                                  f"{tmp}/k.cubin"], capture_output=True, text=True)
            if run.returncode == 0:
                rep["ptxas"] = " | ".join(x.split("info    : ")[-1] for x in run.stderr.splitlines()
                                          if "registers" in x or "spill" in x)
                break
        else:
            rep["ptxas"] = f"failed: {run.stderr[-300:]}"
    print(f"{name:28s} smem {rep['shared_bytes']:7d}  wgmma {rep['wgmma']}  tma {rep['tma_loads']}"
          f"  cp.async {rep['cp_async']}  {rep['ptxas']}")
    return rep


def resources(out):
    """--resources: compile-only report of the record-shape kernels (no GPU needed)."""
    if fm.INTERPRETED:
        sys.exit("bench_kernels: --resources needs TRITON_INTERPRET unset")
    table = {d: fm.LAUNCH_TABLE[("hopper", torch.bfloat16, d)] for d in ("fwd", "bwd")}
    cases = {"table": (table["fwd"], table["bwd"]), "tma_flatten": TMA_256_FLAT,
             "tma_store": TMA_256_STORE, "tma_flatten_store": TMA_256_FLAT_STORE, "tma_bwd_kmajor": TMA_256_KMAJOR,
             "tma_flatten_store_bwd_kmajor": TMA_256_FLAT_STORE_KMAJOR,
             "tma_128x128": TMA_128,
             "tma_128x256_nosplit": TMA_256_NOSPLIT, "ptr_128x256": PTR_256, "ptr_128x128": PTR_128}
    rep = {"triton": triton.__version__}
    for name, (fwd, bwd) in cases.items():
        for direction, cfg, store_post in (("fwd", fwd, False), ("bwd", bwd, False),
                                           ("bwd_post", bwd, True)):
            key = f"{name}/{direction}"
            try:
                rep[key] = compile_report(key, cfg, direction == "fwd", store_post)
            except Exception as exc:  # noqa: BLE001 - record and go on
                rep[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                print(f"{key:28s} FAILED {rep[key]['error'][:300]}")
    write_json(out, rep)


def main():
    args = parse_args()
    if args.resources:
        return resources(args.out)
    dry = args.dry
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        sys.exit("bench_kernels: no CUDA device (use --dry for the CPU interpreter)")
    M = args.M or (64 if dry else 48 * 2048)
    D = args.D or (32 if dry else 512)
    H = args.H or (96 if dry else 1536)
    dtype = torch.float16 if dry else torch.bfloat16
    inputs = make_inputs(M, D, H, dtype, device)
    ref = fp32_reference(*inputs, args.slope)
    bench = functools.partial(kernel_ms, interpreted=dry)  # median ms: do_bench, or 3 calls on the interpreter
    flops = (4 * M * D * H, 12 * M * D * H)
    info = {"device": torch.cuda.get_device_name() if not dry else "cpu (TRITON_INTERPRET)",
            "capability": list(torch.cuda.get_device_capability()) if not dry else None,
            "torch": torch.__version__, "triton": triton.__version__,
            "shape": {"M": M, "D": D, "H": H, "dtype": str(dtype), "slope": args.slope},
            "launch_table": {f"{k[0]}/{k[1]}/{k[2]}": vars(v) for k, v in fm.LAUNCH_TABLE.items()
                             if k[0] == fm._device_class(torch.device(device))},
            "flops": {"fwd": flops[0], "fwd_bwd": flops[1]}, "variants": {}}
    chosen = variants(args.slope)
    unknown = sorted(set(args.variants or ()) - set(chosen))
    if unknown:
        sys.exit(f"bench_kernels: unknown --variants {unknown}; choose from {sorted(chosen)}")
    t_start = time.perf_counter()
    for name in args.variants or chosen:
        build, override = chosen[name]
        try:
            with fm.launch_config_override(*(override or ())):
                info["variants"][name] = bench_variant(build, inputs, ref, flops, bench,
                                                       device)
            if override:
                info["variants"][name]["override"] = [vars(c) for c in override]
        except Exception as exc:  # noqa: BLE001 - record and go on
            info["variants"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                      "traceback": traceback.format_exc()[-4000:]}
        torch._dynamo.reset()
    try:
        info["ceilings"] = ceilings(device, dtype, bench)
        info["kernels"] = bench_kernels(inputs, args.slope, bench, info["ceilings"])
    except Exception as exc:  # noqa: BLE001 - record and go on
        info["kernels"] = {"all": {"error": f"{type(exc).__name__}: {exc}"[:2000]}}
    info["wall_s"] = time.perf_counter() - t_start
    info["shrunk_configs"] = [[vars(k), vars(v)] for k, v in fm._FALLBACK.items()]
    write_json(args.out, info)
    print_table(info)


def print_table(info):
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['shape']}")
    print(f"{'variant':24s} {'fwd ms':>8s} {'TF/s':>6s} {'f+b ms':>8s} {'TF/s':>6s} "
          f"{'peakMB':>7s} {'err out':>8s} {'err dx':>8s} {'err dWu':>8s} {'err dWd':>8s}")
    for name, r in info["variants"].items():
        if "error" in r:
            print(f"{name:24s} FAILED {r['error'][:200]}")
            continue
        peak = f"{r['peak_extra_bytes'] / 2**20:7.0f}" if r["peak_extra_bytes"] is not None else "      -"
        e = r["rel_err"]
        print(f"{name:24s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.0f} {r['fwd_bwd_ms']:8.3f} "
              f"{r['fwd_bwd_tflops']:6.0f} {peak} {e['out']:8.1e} {e['dx']:8.1e} "
              f"{e['dw_up']:8.1e} {e['dw_down']:8.1e}")
    for name, r in info["kernels"].items():
        print(f"{name:24s} " + (f"{r['ms']:8.3f} ms {r['tflops']:6.0f} TF/s  floor "
                                f"{r['floor_ms']:.3f} ms" if "ms" in r
                                else f"FAILED {r['error'][:200]}"))
    if "ceilings" in info:
        c = info["ceilings"]
        print(f"ceilings: copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
              f"GEMM {c['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"wall {info['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
