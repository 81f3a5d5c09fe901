"""Scoring the submission: rebuild the GPT from the artifact alone, check it against the data,
run sliding and non-sliding val_bpb (pgolf.shared.bpb), write metrics/eval.json.

The model is rebuilt only from `artifacts/final/model.ptz` (`read_artifact` ->
`dequantize_state` -> `GPT.load_export_state_dict`); the float checkpoint is never read. Before
scoring, the artifact's tokenizer (meta["tokenizer"]: sha256, vocab_size) must match the one the
validation shards were made with (`data/tokenizer/tokenizer.json`, and the byte tables' meta),
so a model is never scored on tokens of another vocabulary. Bytes come from the validation byte
sidecar where prepare wrote one (original bytes of CaseOps-transformed data, pgolf.shared.val_bytes),
else from the byte tables; eval.json's `byte_source` says which.

With evaluate.ttt_enabled, score-first test-time training runs last, on the same tokens
(evaluate.ttt_scheme: stream, pgolf.evaluate.ttt, on the same windows; phased, pgolf.evaluate.phased,
per document); its score becomes val_bpb / val_loss (the plain sliding score stays as
val_bpb_pre_ttt) and its time is ttt_seconds.

With evaluate.ngram_tilt, every scoring pass (non-sliding, sliding, TTT) scores the token n-gram
tilted softmax of pgolf.evaluate.ngram_tilt (imported only then); its hints are computed inside the
clock (ngram_tilt_seconds) and ngram_hinted counts the targets that got one. The same pass scores
the rows without the tilt too: val_bpb_untilted / val_loss_untilted is the final score of a run with
the tilt off (TTT adapts on the untilted loss), so one run measures what the tilt gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


from pgolf.shared import bpb, dist, layout, train_files, val_bytes
from pgolf.compress.artifact import MODEL_FILE, ArtifactError, read_artifact
from pgolf.compress.dequant import dequantize_state
from pgolf.config import EvaluateConfig
from pgolf.shared.byte_tables import ByteTables, byte_tables_path, load_byte_tables
from pgolf.shared.tokenizer_meta import read_tokenizer_meta, text_transform, tokenizer_meta_path
from pgolf.shared.io import file_sha256, write_json
from pgolf.shared.model import GPT


class EvaluateError(ValueError):
    """Inputs of the evaluate stage that do not fit together (tokenizer, vocabulary, params)."""


@dataclass(frozen=True)
class Paths:
    artifact: Path = layout.FINAL / MODEL_FILE
    shards: Path = layout.SHARDS
    tokenizer: Path = layout.TOKENIZER
    metrics: Path = layout.EVAL_METRICS


def load_model(path: str | Path, device="cpu") -> tuple[GPT, dict]:
    """GPT rebuilt from an artifact file alone: (model in eval mode on `device`, artifact meta)."""
    tensors, meta = read_artifact(path)
    for key in ("model", "train_seq_len", "quant"):
        if key not in meta:
            raise ArtifactError(f"{path}: artifact meta lacks {key!r}")
    try:
        model = GPT(train_files.model_config(meta, str(path)), train_seq_len=int(meta["train_seq_len"]))
        model.load_export_state_dict(dequantize_state(tensors, meta))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot rebuild the model: {e}") from None
    return model.to(device).eval(), meta


def check_tokenizer(meta: dict, tables: ByteTables, tokenizer_dir: str | Path, artifact: str | Path) -> None:
    """The artifact's tokenizer must be the validation data's (sha256 and vocabulary size)."""
    tok = read_tokenizer_meta(tokenizer_dir)
    tok_path = tokenizer_meta_path(tokenizer_dir)
    want = meta.get("tokenizer")
    if not isinstance(want, dict) or "sha256" not in want or "vocab_size" not in want:
        raise EvaluateError(f"{artifact}: artifact meta lacks tokenizer {{sha256, vocab_size}}")
    if int(want["vocab_size"]) != int(tok["vocab_size"]):
        raise EvaluateError(f"{artifact}: model vocab_size {want['vocab_size']} but the validation data's tokenizer "
                            f"({tok_path}) has vocab_size {tok['vocab_size']}")
    if want["sha256"] != tok["sha256"]:
        raise EvaluateError(f"{artifact}: trained with tokenizer sha256 {want['sha256'][:12]}… but the validation "
                            f"shards were made with {tok['sha256'][:12]}… ({tok_path}); re-run prepare with the "
                            f"model's tokenizer")
    table_sha = tables.meta.get("tokenizer_sha256")
    if table_sha is not None and table_sha != tok["sha256"]:
        raise EvaluateError(f"{byte_tables_path(tokenizer_dir)}: built for tokenizer {table_sha[:12]}…, "
                            f"not {tok['sha256'][:12]}… ({tok_path})")
    if tables.vocab_size < int(meta["model"]["vocab_size"]):
        raise EvaluateError(f"{byte_tables_path(tokenizer_dir)}: {tables.vocab_size} entries for a model "
                            f"vocabulary of {meta['model']['vocab_size']}")


def run(cfg: EvaluateConfig, paths: Paths = Paths(), progress: bool = True) -> dict:
    """Evaluate the artifact on every rank (`cfg` as pgolf.config loads it); rank 0 writes
    metrics/eval.json. Returns the metrics."""
    info = dist.init(cfg.device)
    t0 = time.perf_counter()
    model, meta = load_model(paths.artifact, info.device)
    tables = load_byte_tables(paths.tokenizer)
    check_tokenizer(meta, tables, paths.tokenizer, paths.artifact)
    tokens = bpb.load_val_tokens(paths.shards, cfg.max_tokens)
    try:
        transform = text_transform(read_tokenizer_meta(paths.tokenizer))
        tables = val_bytes.byte_counter(paths.shards, tables, tokens, transform)  # the sidecar's counter, if any
    except val_bytes.SidecarError as e:
        raise EvaluateError(str(e)) from None
    if len(tokens) < cfg.context + 1:
        raise EvaluateError(f"{paths.shards}: {len(tokens) - 1:,} validation targets (evaluate.max_tokens "
                            f"{cfg.max_tokens}) are fewer than one window of evaluate.context {cfg.context}")
    tokens = bpb.truncate(tokens, cfg.context)  # spec §2.2, L = context: whole windows of targets
    common = dict(device=info.device, rank=info.rank, world=info.world_size)
    tilt, tilt_s = _ngram_tilt(tokens, cfg)  # None unless evaluate.ngram_tilt; inside the clock
    compile_ = cfg.compile and info.device.type == "cuda"
    doc_backend = _doc_backend(cfg, info.device)
    compile_s = bpb.warm_up(model, cfg.context, cfg.batch_seqs, info.device, compile_, doc_backend)  # one shape
    t1 = time.perf_counter()
    flat = bpb.eval_nonsliding(model, tokens, tables, cfg.context, cfg.batch_seqs, compile=compile_,
                               progress=progress and info.is_main, tilt=tilt, doc_backend=doc_backend, **common)
    t2 = time.perf_counter()
    if cfg.stride > 0:
        ev = bpb.eval_sliding(model, tokens, tables, cfg.context, cfg.stride, cfg.batch_seqs,
                              progress=progress and info.is_main, compile=compile_, tilt=tilt, **common)
    else:
        ev = {k: flat[k] for k in ("val_loss", "val_bpb", "val_loss_untilted", "val_bpb_untilted")} | {
            "scored_tokens": flat["tokens"], "scored_bytes": flat["bytes"], "windows": flat["tokens"] // cfg.context}
    metrics = {
        "val_loss": ev["val_loss"], "val_bpb": ev["val_bpb"], "stride": cfg.stride, "context": cfg.context,
        "scored_tokens": ev["scored_tokens"], "scored_bytes": ev["scored_bytes"],
        "eval_seconds": round(time.perf_counter() - t0, 3),  # load + compile + both evaluations
        "sliding_seconds": round(time.perf_counter() - t2, 3) if cfg.stride > 0 else 0.0,
        "nonsliding_seconds": round(t2 - t1, 3), "compile_seconds": compile_s,
        "load_seconds": round(t1 - t0 - compile_s - tilt_s, 3),
        "val_bpb_nonsliding": flat["val_bpb"], "val_loss_nonsliding": flat["val_loss"],
        "windows": ev["windows"], "byte_source": val_bytes.byte_source(tables),
        "world_size": info.world_size, "device": str(info.device),
        "artifact_sha256": file_sha256(paths.artifact),
    }
    if tilt is not None:
        metrics.update({"ngram_tilt_seconds": round(tilt_s, 3), "ngram_hinted": tilt.hinted,
                        "val_loss_untilted": ev["val_loss_untilted"], "val_bpb_untilted": ev["val_bpb_untilted"]})
    if cfg.ttt_enabled:
        metrics.update(_ttt_metrics(model, tokens, tables, cfg, info, progress, metrics, tilt))
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 3)
    if info.is_main:
        write_json(paths.metrics, metrics)
    return metrics


def _doc_backend(cfg: EvaluateConfig, device) -> str | None:
    """evaluate.doc_attention's document-attention kernel on `device` (pgolf.shared.docattn), or None."""
    if not cfg.doc_attention:
        return None
    from pgolf.shared import docattn  # only where a doc-packed model is scored

    return docattn.resolve("auto", device)


def _ngram_tilt(tokens, cfg: EvaluateConfig):
    """(pgolf.evaluate.ngram_tilt.Tilt of `tokens`, seconds) with evaluate.ngram_tilt, else (None, 0.0)."""
    if not cfg.ngram_tilt:
        return None, 0.0
    from pgolf.evaluate import ngram_tilt  # evaluate.ngram_tilt only

    t0 = time.perf_counter()
    tilt = ngram_tilt.Tilt.for_tokens(tokens, cfg.ngram_order, cfg.ngram_threshold, cfg.ngram_boost)
    return tilt, time.perf_counter() - t0


def run_ttt(model, tokens, tables, cfg: EvaluateConfig, device, rank: int = 0, world: int = 1, **kw):
    """The TTT scheme of evaluate.ttt_scheme on `tokens` (adapts `model`): pgolf.evaluate.phased's
    eval_phased or pgolf.evaluate.ttt's eval_ttt, each imported only then (the packed script carries
    only the one its params use); `kw`: progress, record, tilt."""
    if cfg.ttt_scheme == "phased":
        from pgolf.evaluate import phased

        return phased.eval_phased(model, tokens, tables, cfg, device, rank, world, **kw)
    from pgolf.evaluate import ttt

    return ttt.eval_ttt(model, tokens, tables, cfg, device, rank, world, **kw)


def _ttt_metrics(model, tokens, tables, cfg: EvaluateConfig, info, progress: bool, plain: dict, tilt=None) -> dict:
    """Score-first TTT (adapts `model`): its score as val_loss / val_bpb, the plain one kept beside."""
    t0 = time.perf_counter()
    r = run_ttt(model, tokens, tables, cfg, info.device, info.rank, info.world_size,
                progress=progress and info.is_main, tilt=tilt)
    extra = {"ttt_docs": r.docs, "ttt_global_steps": r.global_steps} if cfg.ttt_scheme == "phased" else {}
    if tilt is not None:
        extra.update(val_loss_untilted=r.val_loss_untilted, val_bpb_untilted=r.val_bpb_untilted)
    if (r.scored_tokens, r.scored_bytes) != (plain["scored_tokens"], plain["scored_bytes"]):
        raise EvaluateError(f"TTT scored {r.scored_tokens} targets / {r.scored_bytes} bytes, the plain evaluation "
                            f"{plain['scored_tokens']} / {plain['scored_bytes']}")
    return {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "val_loss_pre_ttt": plain["val_loss"],
            "val_bpb_pre_ttt": plain["val_bpb"], "ttt_seconds": round(time.perf_counter() - t0, 3),
            "ttt_chunks": r.chunks, "ttt_scheme": cfg.ttt_scheme, "ttt_mode": cfg.ttt_mode,
            "ttt_trainable_params": r.trainable_params, **extra}
