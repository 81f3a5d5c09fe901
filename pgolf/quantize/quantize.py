"""The quantize stage: which tensor gets which treatment, GPTQ over all matrices, outputs.

This module writes `artifacts/quant/` (quant.pgt, hdiag.pgt, table.json) and `metrics/quant.json`
(paths: pgolf.shared.layout; it owns the names and kinds of quant.pgt and hdiag.pgt). It reads
only `artifacts/train/model.pgt` (float weights + model meta) and `artifacts/train/hessians.pgt`.

Treatment of each tensor of the exported state dict, first rule that applies (recipe-spec §6.1):

    1. not a float tensor                          -> passthrough, kept as is        (method "raw")
    2. numel <= quantize.passthrough_max_numel     -> passthrough fp16               (method "fp16")
    3. a block matrix (GPT.quantizable_names())    -> int{bits} full GPTQ            (method "gptq")
    4. tok_emb.weight                              -> int8 per row, or fp16 when quantize.embed_mode
                                                      is "fp16"                     (method "int8_row" | "fp16"),
                                                      or with embed_mode "gptq" int{embed_bits} full GPTQ
                                                      when hessians.pgt holds its Hessian (the tied
                                                      head's input, train.hessian_head), else
                                                      GPTQ-lite                     (method "gptq" | "gptq_lite")
    5. any other embedding table (bigram, VE)      -> int8 per row                   (method "int8_row")
    6. any other 2-D float matrix                  -> int{bits} full GPTQ when hessians.pgt holds a
                                                      Hessian for it, else GPTQ-lite (method "gptq_lite")
    7. anything else (e.g. a large 1-D tensor)     -> passthrough fp16               (method "fp16")

The type label of rules 3, 4 (gptq) and 6 is "int6" whatever quantize.bits / embed_bits is (the
contract's name for "the low-bit per-row codes"; `bits` says how many). int8 rows use the shared rule of
`pgolf.shared.rowquant` with qmax 127 and clip quantile quantize.int8_clip_quantile; unlike the reference
`quantize_float_tensor`, values beyond the clip are clamped in the code domain (at ±127 s),
which only differs from clipping the weight first when the 1/127 scale floor binds.

Clip candidates for GPTQ and GPTQ-lite: quantize.clip_quantiles plus the training-time QAT
quantile from model.pgt's meta, chosen per row (pgolf.quantize.gptq). With quantize.clip_rule
"sigma" (PR #2135) each row has one clip instead, `*_clip_sigmas` standard deviations of the row
(pgolf.shared.rowquant.sigma_scale), by the matrix's class (`clip_class`: tok_emb embed, names with
".mlp." mlp, with ".attn." attn, any other matrix). Quantize does not prune and counts
no bytes: the compress stage owns the byte budget (serialisation, codecs, the packed code, the
±1 pruning search, the cap). What pruning needs from here is written beside quant.pgt:
`hdiag.pgt`, the input Hessian diagonal (C,) of every GPTQ matrix (GPTQ-lite ones have none).

QAT bits: training's late QAT fake-quantizes at model.pgt meta `qat_bits` bits. A different
quantize.bits still quantizes (GPTQ works at any width) but the weights were not trained for it:
the stage prints a warning line and metrics/quant.json says `qat_bits`, `qat_bits_match`.

LQER (quantize.lqer_enabled, pgolf.quantize.lqer): after quantization the quantize.lqer_top_k int6/int8
matrices of largest ||W - Q(W)||_F get a rank-quantize.lqer_rank correction of that error in
quantize.lqer_bits-bit factors; its tensors are part of quant.pgt and of the artifact, so the
compress stage's size target counts them (pruning later zeroes some ±1 codes of those matrices as
of any other; the correction is of the error before pruning). quantize.lqer_asym stores them in
the asymmetric form instead (int2 A, int4 B in groups of quantize.lqer_group; pgolf.quantize.lqer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from pgolf.shared import layout, tensorfile, train_files
from pgolf.config import ConfigError, ModelConfig, QuantizeConfig
from pgolf.quantize.gptq import GPTQSpec, MatrixResult, gptq_lite_matrices, gptq_matrices
from pgolf.shared.rowquant import dequantize, fp16_round, qmax_for, quantize, row_scale
from pgolf.shared.io import staged_dir, write_json
from pgolf.shared.model import GPT

KIND = "quantized"
QUANT_FILE = "quant.pgt"  # the codes, scales and passthrough tensors (kind KIND); compress reads it
HDIAG = "hdiag.pgt"  # name -> (C,) float32 input Hessian diagonal of each GPTQ matrix; compress reads it
HDIAG_KIND = "hessian_diag"
INT8_QMAX = 127


class QuantizeError(ValueError):
    """Bad quantize input (missing or inconsistent weights; the Hessians' are HessianError); names the file."""


# ----------------------------------------------------------------------------- config


def resolve_device(cfg: QuantizeConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def candidates(cfg: QuantizeConfig, qat_quantile: float) -> tuple[float, ...]:
    """Clip candidates: quantize.clip_quantiles, then the QAT quantile if it is not among them."""
    return tuple(dict.fromkeys(cfg.clip_quantiles + (float(qat_quantile),)))


def clip_class(name: str) -> str:
    """The class whose quantize.*_clip_sigmas clips the low-bit matrix `name`: embed | mlp | attn | matrix."""
    if name == "tok_emb.weight":
        return "embed"
    return "mlp" if ".mlp." in name else "attn" if ".attn." in name else "matrix"


def bits_for(name: str, cfg: QuantizeConfig) -> int:
    """Code width of the low-bit matrix `name`: quantize.embed_bits for tok_emb, else quantize.bits."""
    return cfg.embed_bits if name == "tok_emb.weight" else cfg.bits


def spec_for(name: str, cfg: QuantizeConfig, cands: tuple[float, ...]) -> GPTQSpec:
    """The GPTQ / GPTQ-lite settings of the low-bit matrix `name` (its bits and its clip rule)."""
    sigmas = getattr(cfg, f"{clip_class(name)}_clip_sigmas") if cfg.clip_rule == "sigma" else 0.0
    return GPTQSpec(qmax=qmax_for(bits_for(name, cfg)), quantiles=cands, damp=cfg.damp, block_size=cfg.block_size,
                    act_order=cfg.act_order, sigmas=sigmas)


# ----------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    weights: dict[str, torch.Tensor]
    meta: dict  # model.pgt meta
    hessians: dict[str, torch.Tensor]
    model_cfg: ModelConfig
    block_names: list[str]  # GPT.quantizable_names()
    embed_names: list[str]  # every nn.Embedding weight


def load_inputs(train_dir: str | Path = layout.TRAIN) -> Inputs:
    """Read and check model.pgt + hessians.pgt (pgolf.shared.train_files); QuantizeError, HessianError or
    TensorFileError naming the file."""
    train_dir = Path(train_dir)
    mpath, hpath = train_dir / train_files.MODEL_FILE, train_dir / train_files.HESSIANS_FILE
    for p in (mpath, hpath):
        if not p.is_file():
            raise QuantizeError(f"{p}: not found (run the train stage first)")
    weights, meta = train_files.load_weights(mpath)
    hessians, _ = train_files.load_hessians(hpath)
    mcfg = _model_config(meta, mpath)
    with torch.device("meta"):
        model = GPT(mcfg)
    inp = Inputs(weights, meta, hessians, mcfg, model.quantizable_names(),
                 [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)])
    _check_weights(inp, model, mpath)
    other_2d = {n: w.shape[1] for n, w in weights.items() if w.dim() == 2 and w.is_floating_point()}
    train_files.validate_hessians(hessians, model.hessian_shapes(), str(hpath), optional=other_2d)
    return inp


def _model_config(meta: dict, path: Path) -> ModelConfig:
    for key in ("model", "qat_quantile"):
        if key not in meta:
            raise QuantizeError(f"{path}: meta lacks {key!r} (not written by this pipeline's train stage?)")
    q = meta["qat_quantile"]
    if not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
        raise QuantizeError(f"{path}: meta qat_quantile must be in (0, 1], got {q!r}")
    try:
        return train_files.model_config(meta, str(path))
    except ConfigError as e:
        raise QuantizeError(str(e)) from None


def _check_weights(inp: Inputs, model: GPT, path: Path) -> None:
    expected = {n: tuple(t.shape) for n, t in model.export_state_dict().items()}
    missing = [n for n in expected if n not in inp.weights]
    if missing:
        raise QuantizeError(f"{path}: lacks {len(missing)} tensor(s) of the model in its meta, e.g. {missing[0]}")
    for name, shape in expected.items():
        t = inp.weights[name]
        if tuple(t.shape) != shape:
            raise QuantizeError(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}")
    for name, t in inp.weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise QuantizeError(f"{path}: {name} has non-finite values")


# ----------------------------------------------------------------------------- treatment plan


def plan(inp: Inputs, cfg: QuantizeConfig) -> dict[str, tuple[str, str]]:
    """name -> (treatment, method), in model.pgt order (rules in the module docstring)."""
    blocks, embeds = set(inp.block_names), set(inp.embed_names)
    out = {}
    for name, t in inp.weights.items():
        if not t.is_floating_point():
            out[name] = ("passthrough", "raw")
        elif t.numel() <= cfg.passthrough_max_numel:
            out[name] = ("passthrough", "fp16")
        elif name in blocks:
            out[name] = ("int6", "gptq")
        elif name == "tok_emb.weight" and cfg.embed_mode == "fp16":
            out[name] = ("passthrough", "fp16")
        elif name == "tok_emb.weight" and cfg.embed_mode == "gptq":
            out[name] = ("int6", "gptq" if name in inp.hessians else "gptq_lite")
        elif name in embeds and t.dim() == 2:
            out[name] = ("int8", "int8_row")
        elif t.dim() == 2:
            out[name] = ("int6", "gptq" if name in inp.hessians else "gptq_lite")
        else:
            out[name] = ("passthrough", "fp16")
    return out


# ----------------------------------------------------------------------------- quantization


@dataclass
class Quantized:
    tensors: dict[str, torch.Tensor]  # the quant.pgt tensors, in model.pgt order
    meta: dict  # the quant.pgt meta
    rows: list[dict]  # table rows, one per source tensor
    results: dict[str, MatrixResult]  # int6 tensors
    hdiag: dict[str, torch.Tensor | None]  # int6 tensor -> its Hessian diagonal (None: GPTQ-lite)
    clip_candidates: tuple[float, ...] = ()
    stats: dict = field(default_factory=dict)


def quantize_model(inp: Inputs, cfg: QuantizeConfig, device: torch.device | str = "cpu") -> Quantized:
    """Apply the treatment plan: GPTQ / GPTQ-lite for int6, int8 rows, passthrough."""
    treat = plan(inp, cfg)
    cands = candidates(cfg, inp.meta["qat_quantile"])
    specs = {n: spec_for(n, cfg, cands) for n, (kind, _) in treat.items() if kind == "int6"}
    results = {}
    for spec in dict.fromkeys(specs.values()):  # one pass per distinct spec (one unless bits / clips differ)
        mine = [n for n, sp in specs.items() if sp == spec]
        full = {n: inp.weights[n] for n in mine if treat[n][1] == "gptq"}
        lite = {n: inp.weights[n] for n in mine if treat[n][1] == "gptq_lite"}
        results |= gptq_matrices(full, inp.hessians, spec, device) | gptq_lite_matrices(lite, spec, device)
    tensors, quant, rows = {}, {}, []
    for name, (kind, method) in treat.items():
        t = inp.weights[name]
        if kind == "int6":
            r, bits = results[name], bits_for(name, cfg)
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = r.q, r.scale
            quant[name] = {"type": "int6", "bits": bits, "method": r.method}
            rows.append(_row(name, t, "int6", r.method, bits, r.q, r.scale) | _gptq_row(r, specs[name]))
        elif kind == "int8":
            q, s = int8_rows(t, cfg.int8_clip_quantile)
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = q, s
            quant[name] = {"type": "int8", "bits": 8, "method": method}
            rows.append(_row(name, t, "int8", method, 8, q, s))
        else:
            p = t.half() if method == "fp16" else t
            tensors[name] = p
            bits = p.element_size() * 8
            quant[name] = {"type": "passthrough", "bits": bits, "method": method}
            rows.append(_row(name, t, "passthrough", method, bits, p))
    meta = {"model": inp.meta["model"], "train_seq_len": inp.meta.get("train_seq_len"),
            "tokenizer": inp.meta.get("tokenizer"), "quant": quant}
    hdiag = {n: (torch.diagonal(inp.hessians[n]).float() if results[n].method != "gptq_lite" else None)
             for n in results}
    qz = Quantized(tensors, meta, rows, results, hdiag, cands if cfg.clip_rule == "quantile" else ())
    if cfg.lqer_enabled:
        add_lqer(qz, inp.weights, cfg)
    return qz


def add_lqer(qz: Quantized, weights: dict[str, torch.Tensor], cfg: QuantizeConfig) -> None:
    """Rank-r corrections of the top-K quantization errors (module docstring), in place:
    tensors, quant entries ({"lqer": {"rank", "bits"}}, with quantize.lqer_asym {"lqer": {"rank", "form",
    "group"}} where it fits) and table rows (lqer_rank, error norms)."""
    from pgolf.quantize import lqer  # quantize.lqer_enabled only (the packed script carries it only then)

    errs = {}
    for name, info in qz.meta["quant"].items():
        if info["type"] in ("int6", "int8"):
            errs[name] = weights[name].float() - dequantize(qz.tensors[f"{name}.q"], qz.tensors[f"{name}.scale"])
    norms = {n: float(e.norm()) for n, e in errs.items()}
    chosen = lqer.select(norms, cfg.lqer_top_k)
    rows = {r["name"]: r for r in qz.rows}
    for name in chosen:
        group = cfg.lqer_group if cfg.lqer_asym else 0
        block, entry = lqer.pack_for(name, errs[name], cfg.lqer_rank, cfg.lqer_bits, group)
        qz.tensors.update(block)
        qz.meta["quant"][name]["lqer"] = entry
        rank = entry["rank"]
        left = errs[name] - lqer.correction_for(block, name, tuple(errs[name].shape), entry)
        rows[name].update(lqer_rank=rank, lqer_error=norms[name], lqer_error_after=float(left.norm()),
                          lqer_bytes_raw=sum(t.numel() * t.element_size() for t in block.values()))
        rows[name]["bytes_raw"] += rows[name]["lqer_bytes_raw"]


def int8_rows(w: torch.Tensor, clip_quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) -> int8 codes in [-127, 127] and fp16 per-row scale, with the shared clip rule."""
    s = row_scale(w.float(), clip_quantile, INT8_QMAX)  # (R,)
    return quantize(w.float(), s, INT8_QMAX), s.half()


def _row(name, t, treatment, method, bits, *stored) -> dict:
    return {"name": name, "shape": list(t.shape), "numel": t.numel(), "treatment": treatment,
            "method": method, "bits": bits, "bytes_raw": sum(x.numel() * x.element_size() for x in stored)}


def _gptq_row(r: MatrixResult, spec: GPTQSpec) -> dict:
    """GPTQ diagnostics. rows_at_scale_floor: rows whose scale is the rule's floor 1/qmax (their
    clip is below 1, so every clip candidate gives the same scale and the search cannot help)."""
    ratio = r.err / r.err_rtn if r.err_rtn > 0 else None
    floor = float(fp16_round(torch.tensor(1.0 / spec.qmax)))
    return {"damp": r.damp, "damp_retries": r.damp_retries, "dead_columns": r.dead_columns,
            "rows_at_scale_floor": int((r.scale.float() == floor).sum()),
            "output_error": r.err, "output_error_rtn": r.err_rtn, "error_ratio_vs_rtn": ratio,
            "clip_rows": dict(zip(spec.labels(), r.choice))}


# ----------------------------------------------------------------------------- the stage


def qat_bits(meta: dict, path: Path = layout.TRAIN / train_files.MODEL_FILE) -> int | None:
    """The bits training's late QAT used (model.pgt meta `qat_bits`), None when the meta predates it."""
    bits = meta.get("qat_bits")
    if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8):
        raise QuantizeError(f"{path}: meta qat_bits must be an integer in [2, 8], got {bits!r}")
    return bits


def qat_warning(m: dict) -> str | None:
    """The warning line when quantize.bits differs from the bits training's QAT used."""
    if m["qat_bits_match"] is not False:
        return None
    return (f"quantize: warning: quantize.bits={m['bits']} but training's late QAT fake-quantized at "
            f"{m['qat_bits']} bits (artifacts/train/model.pgt meta qat_bits): the weights were not trained for "
            f"int{m['bits']}; expect a larger quantization gap")


def run(cfg: QuantizeConfig, train_dir: str | Path = layout.TRAIN, out_dir: str | Path = layout.QUANT,
        metrics_path: str | Path = layout.QUANT_METRICS) -> dict:
    """The whole stage (`cfg` as pgolf.config loads it); outputs are written only after everything
    succeeded. -> the metrics dict."""
    device = resolve_device(cfg)
    t0 = time.perf_counter()
    inp = load_inputs(train_dir)
    qat = qat_bits(inp.meta, Path(train_dir) / train_files.MODEL_FILE)
    qz = quantize_model(inp, cfg, device)
    seconds = time.perf_counter() - t0
    metrics = make_metrics(qz, cfg, seconds, device) | {"qat_bits": qat,
                                                       "qat_bits_match": None if qat is None else qat == cfg.bits}
    hdiag = {n: d.contiguous() for n, d in qz.hdiag.items() if d is not None}
    with staged_dir(out_dir) as tmp:
        tensorfile.save(tmp / QUANT_FILE, qz.tensors, kind=KIND, meta=qz.meta)
        tensorfile.save(tmp / HDIAG, hdiag, kind=HDIAG_KIND, meta={"bits": cfg.bits})
        write_json(tmp / layout.QUANT_TABLE_FILE, make_table(qz, cfg))
    write_json(metrics_path, metrics)
    return metrics


def make_table(qz: Quantized, cfg: QuantizeConfig) -> dict:
    """table.json: one row per source tensor, plus the settings (no timings, so the file is a pure
    function of the inputs)."""
    sigma = {"clip_rule": "sigma", "clip_sigmas": {c: getattr(cfg, f"{c}_clip_sigmas")
                                                   for c in ("matrix", "attn", "mlp", "embed")}}
    return {"bits": cfg.bits, "clip_candidates": list(qz.clip_candidates),
            "columns": ["name", "shape", "treatment", "method", "bits", "bytes_raw"],
            "tensors": qz.rows, "bytes_raw": sum(r["bytes_raw"] for r in qz.rows)} | (
        sigma if cfg.clip_rule == "sigma" else {})


def make_metrics(qz: Quantized, cfg: QuantizeConfig, seconds: float, device: torch.device) -> dict:
    rows = qz.rows
    count = lambda key, val: sum(1 for r in rows if r[key] == val)  # noqa: E731
    gptq = [r for r in qz.results.values() if r.method == "gptq"]
    err, err_rtn = sum(r.err for r in gptq), sum(r.err_rtn for r in gptq)
    retried = {n: r.damp for n, r in qz.results.items() if r.damp_retries > 0}
    lq = [r for r in rows if "lqer_rank" in r]
    extra = {"lqer_tensors": len(lq), "lqer_bytes_raw": sum(r["lqer_bytes_raw"] for r in lq),
             "lqer_error_before": sum(r["lqer_error"] for r in lq),
             "lqer_error_after": sum(r["lqer_error_after"] for r in lq)} if cfg.lqer_enabled else {}
    if cfg.embed_mode == "gptq":  # "gptq_lite": hessians.pgt had no head-input Hessian (train.hessian_head off)
        extra["embed_method"] = next((r["method"] for r in rows if r["name"] == "tok_emb.weight"), None)
    return extra | {
        "int6_tensors": count("treatment", "int6"),
        "passthrough_tensors": count("treatment", "passthrough"),
        "pruned_values": 0,  # contract key (architecture.md); this stage prunes none: compress's count is size.json's
        "quantize_seconds": round(seconds, 3),
        "int8_tensors": count("treatment", "int8"),
        "gptq_tensors": len(gptq),
        "gptq_lite_tensors": count("method", "gptq_lite"),
        "gptq_fallback_tensors": count("method", "gptq_lite_fallback"),
        "damping_retries": len(retried),
        "damping_retried": retried,
        "gptq_rtn_error_ratio": (err / err_rtn) if err_rtn > 0 else None,
        "int6_rows_at_scale_floor": _floor_fraction(rows),
        "bits": cfg.bits,
        "raw_bytes": sum(r["bytes_raw"] for r in rows),
        "prune_candidates": sum(int((qz.tensors[f"{n}.q"].abs() == 1).sum()) for n in qz.results),
        "device": device.type,
    }


def _floor_fraction(rows: list[dict]) -> float | None:
    """Fraction of int6 rows whose scale sits on the 1/qmax floor (see _gptq_row)."""
    at = sum(r.get("rows_at_scale_floor", 0) for r in rows if r["treatment"] == "int6")
    total = sum(r["shape"][0] for r in rows if r["treatment"] == "int6")
    return round(at / total, 4) if total else None


def summary_line(m: dict) -> str:
    ratio = f", GPTQ/RTN output error {m['gptq_rtn_error_ratio']:.3f}" if m["gptq_rtn_error_ratio"] else ""
    retries = f", {m['damping_retries']} needed more damping" if m["damping_retries"] else ""
    return (f"quantize: {m['int6_tensors']} int{m['bits']} ({m['gptq_tensors']} GPTQ, {m['gptq_lite_tensors']} "
            f"GPTQ-lite{retries}), {m['int8_tensors']} int8, {m['passthrough_tensors']} passthrough{ratio}; "
            f"{m['prune_candidates']:,} ±1 codes (pruning candidates of the compress stage); "
            f"{m['quantize_seconds']:.1f} s on {m['device']}")
