"""The schema of params.yaml: one frozen dataclass per section, each with its checks beside it.

This module owns what a value of params.yaml may be. Each section (`prepare`, `model`, `train`,
`quantize`, `compress`, `evaluate`) is a dataclass below: one field per key, whose default is the
record profile's value and whose comment says what the key does (recipe-spec section numbers where
the value comes from a record), then `check()`, the section's range checks. `check_across` holds the
rules that read two sections. The names a key may take (codecs, sources, ...) are defined here and
imported from here by the code that uses them. Plain Python: no torch, no other pgolf module.

Loading (`from_dict`, `from_doc`, `load`) checks every key (known, of the right type, lists as YAML
lists) and runs `check()`; errors are ConfigError naming the file and `section.key`. `restore`
rebuilds a dataclass from values checked before (the params gate's files, a packed script's params).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

# ---- the names and bounds a key may take (the code using a key imports them from here)
DEVICES = ("auto", "cpu", "cuda")
PREPARE_SOURCES = ("embedded", "local", "fineweb")
TEXT_TRANSFORMS = ("none", "caseops")  # prepare.text_transform (pgolf.prepare.caseops)
MAX_VOCAB = 65536  # uint16 shards
MAX_SHARD_TOKENS = 2**31 - 1  # the shard header's int32 count
MATRIX_KINDS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")  # a block's matrices
RESIDUAL_DTYPES = ("fp32", "bf16")
PARALLEL_FINAL_LANES = ("mean", "attn", "mlp")
SMEAR_FORMS = ("mix", "add")
ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient", "fa4")
COMPILE_SCOPES = ("model", "blocks")
DOC_ATTN_BACKENDS = ("auto", "reference", "varlen", "flex", "fa4", "fa3")  # pgolf.shared.docattn.BACKENDS + auto
MUON_COMM_DTYPES = ("auto", "bf16", "fp32")
GRAD_CLIP_SCOPES = ("global", "local")  # train.grad_clip_scope
HESSIAN_SOURCES = ("online", "calibration")  # train.hessian_source: what hessians.pgt holds
NS_SCHEDULES = {"quintic": None, "polar_express": 5}  # Newton-Schulz schedule -> most steps it defines
BITS_RANGE = (2, 8)  # integer code widths the quantizer supports
EMBED_MODES = ("int8", "fp16", "gptq")
CLIP_RULES = ("quantile", "sigma")  # quantize.clip_rule
CODECS = ("lzma", "zstd", "brotli")
LAYOUTS = ("flat", "grouped", "pergroup")
ROW_ORDERS = ("pca", "l1")  # compress.row_order (pgolf.compress.grouping)
PERGROUP_CODECS = ("lzma", "zstd", "brotli", "ppmd", "lrzip")  # compress.pergroup_codecs (pgolf.compress.pergroup)
MIN_CHUNK_BYTES = 1 << 16  # compress.*_chunk_bytes: 0 or at least 64 KiB
TTT_MODES = ("lora", "full")
TTT_SCHEMES = ("stream", "phased")
TTT_SITES = ("q", "k", "v", "o", "mlp", "head")  # phased TTT's per-document LoRA sites
TTT_OPTIMIZERS = ("sgd", "adam")
TTT_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A params value that is missing, unknown, of the wrong type or out of range; names file and key."""


class Section:
    """What every section dataclass shares: its params.yaml name and the error of one bad key."""

    name: typing.ClassVar[str]

    def bad(self, key: str, why: str) -> ConfigError:
        """`<section>.<key> <why>, got <value>` (loaders prefix the file)."""
        return ConfigError(f"{self.name}.{key} {why}, got {getattr(self, key)!r}")

    def check(self) -> None:
        raise NotImplementedError


def _each(cfg: Section, keys: tuple[str, ...], ok, why: str) -> None:
    """cfg.bad(key, why) for the first key whose value fails `ok` (NaN fails every comparison)."""
    for key in keys:
        if not ok(getattr(cfg, key)):
            raise cfg.bad(key, why)


def _one_of(cfg: Section, key: str, allowed) -> None:
    if getattr(cfg, key) not in allowed:
        raise cfg.bad(key, f"must be one of {', '.join(allowed)}")


def _at_least(cfg: Section, low, *keys: str) -> None:
    _each(cfg, keys, lambda v: v >= low, f"must be >= {low}")


def _fraction(cfg: Section, *keys: str, closed: bool = True) -> None:
    """Each key in [0, 1] (closed) or [0, 1)."""
    ok = (lambda v: 0.0 <= v <= 1.0) if closed else (lambda v: 0.0 <= v < 1.0)
    _each(cfg, keys, ok, "must be in [0, 1]" if closed else "must be in [0, 1)")


def _positive_finite(cfg: Section, *keys: str) -> None:
    _each(cfg, keys, lambda v: 0 < v < math.inf, "must be positive and finite")


def _distinct_subset(cfg: Section, key: str, allowed, empty_ok: bool = False) -> None:
    values = getattr(cfg, key)
    if (not values and not empty_ok) or any(v not in allowed for v in values) or len(set(values)) < len(values):
        raise cfg.bad(key, f"must list distinct names among {', '.join(allowed)}")


@dataclass(frozen=True)
class PrepareConfig(Section):
    name: typing.ClassVar[str] = "prepare"
    source: str = "fineweb"  # embedded | local | fineweb
    corpus: str = "data/fineweb10B_sp1024"  # file or folder of .jsonl / .jsonl.zst / .txt, or the shard folder
    val_source: str = "data/fineweb10B_sp1024"  # validation documents (fineweb: the val shards' folder); = corpus: its first `val_docs` docs
    val_docs: int = 0  # used only when val_source is corpus (challenge: first 50,000 docs)
    max_train_docs: int = 0  # 0 = all
    tokenizer: str = "data/fineweb10B_sp1024/fineweb_1024_bpe.model"  # a .model path, or "train"
    vocab_size: int = 1024  # spec §1.3
    tokenizer_train_docs: int = 0  # docs used to train the tokenizer (0 = all training docs)
    shard_tokens: int = 100_000_000  # spec §1.1 SHARD_SIZE
    fineweb_dir: str = "data/fineweb10B_sp1024"  # local copy of the challenge export (source=fineweb)
    fineweb_repo: str = "willdepueoai/parameter-golf"  # HF dataset repo of the export
    fineweb_train_shards: int = 80  # train shards to download when fineweb_dir is missing
    workers: int = 16  # processes for tokenization
    text_transform: str = "none"  # none | caseops (PR #2135 lossless caps: needs a CaseOps .model; val_bpb on original bytes)

    @property
    def val_from_corpus(self) -> bool:
        """Validation comes from the corpus: its first val_docs documents (text), or the val shards
        beside the train ones (fineweb)."""
        return os.path.normpath(self.val_source) == os.path.normpath(self.corpus)

    def check(self) -> None:
        _one_of(self, "source", PREPARE_SOURCES)
        _one_of(self, "text_transform", TEXT_TRANSFORMS)
        _each(self, ("vocab_size",), lambda v: 1 <= v <= MAX_VOCAB, f"must be in [1, {MAX_VOCAB}]")
        _each(self, ("shard_tokens",), lambda v: 1 <= v <= MAX_SHARD_TOKENS, f"must be in [1, {MAX_SHARD_TOKENS}]")
        _at_least(self, 0, "val_docs", "max_train_docs", "tokenizer_train_docs")
        _at_least(self, 1, "workers")
        if not self.corpus:
            raise self.bad("corpus", "must name a file or folder")
        if not self.tokenizer:
            raise self.bad("tokenizer", "must be a .model path or 'train'")
        if not self.val_source:  # a DVC dependency of prepare: an empty path stops `dvc repro` unexplained
            raise self.bad("val_source", "must name the validation documents (source fineweb: the folder of the val "
                                         "shards), or be prepare.corpus itself to hold out its first val_docs documents")
        if self.source != "fineweb" and self.val_from_corpus and self.val_docs == 0:
            raise self.bad("val_docs", "must be > 0 when prepare.val_source is prepare.corpus (no validation documents)")
        if self.source == "fineweb" and self.tokenizer == "train":
            raise self.bad("tokenizer", "must be the export's .model file for source 'fineweb' (its shards are "
                                        "pre-tokenized)")


@dataclass(frozen=True)
class ModelConfig(Section):
    name: typing.ClassVar[str] = "model"
    vocab_size: int = 1024
    num_layers: int = 11  # spec §3
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0  # MLP hidden = floor(mlp_mult * model_dim + 0.5) (mlp_hidden); records: 4.0
    leaky_slope: float = 0.5  # LeakyReLU(0.5)^2
    xsa_last_n: int = 11  # PR #1072: all layers
    bigram_buckets: int = 4096  # PR #1072 code default (§3.5); 0 = no BigramHash (PR #2135)
    bigram_dim: int = 128
    bigram_proj_gain: float = 1.0  # PR #535 uses 1/sqrt(2*layers)
    ve_dim: int = 128  # value embeddings (§3.7)
    ve_proj_gain: float = 1.0  # init gain of the orthogonal VE projection (PR #535: 1/sqrt(2*layers), §3.7)
    ve_last_n: int = 2  # layers 9,10 of 11
    rope_dims: int = 16  # partial RoPE (§3.4)
    rope_base: float = 10000.0  # PR #1072; PR #535 effectively 22082
    rope_ntk: bool = True  # NTK base scaling past train.seq_len (False: one base at every length, PR #2135 ROPE_YARN=0)
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0  # cap of the positive logits (and of the negative ones when equal)
    logit_softcap_neg: float = 30.0  # cap of the negative logits: c_neg * tanh(z / c_neg) for z < 0
    smear_bos_mask: bool = False  # SmearGate: no previous-token mix at a BOS (records #1851/#1855)
    smear_form: str = "mix"  # SmearGate mix: #1072's (1-g) e_t + g e_{t-1}, post-norm | add: #2135's e_t + g_t e_{t-1}, pre-norm
    smear_window: int = 12  # smear_form add: the leading embedding dims its gate reads (PR #2135: 12)
    skip_gates: bool = False  # U-Net skips h <- lerp(w*skip, h, sigmoid(g)), g per dim from 0, not h + w*skip (#2135)
    logit_softcap_learned: bool = False  # eval logits capped by learned softcap_pos/neg (from the caps); train loss: fixed (#2135)
    attn_gate_window: int = 0  # sparse attention output gate on the first N input dims (0 = off; records: 12)
    attn_gate_scale: float = 1.0  # its pre-sigmoid scale (records: #1787 1.0, #1855 0.5)
    parallel_start_layer: int = 0  # two-lane decoder from this layer (0 = off; records: 8)
    parallel_final_lane: str = "mean"  # the decoder output with two lanes: mean | attn | mlp
    parallel_lambdas_all_layers: bool = False  # lane lambdas: a row per layer (#2135; rows below the start unused)
    num_loops: int = 0  # depth recurrence: extra passes of layers loop_start..loop_end (0 = off; records: 2)
    loop_start: int = 0  # first layer of the looped range
    loop_end: int = 0  # last layer of the looped range (inclusive; records: 3..5)
    tied_embed_init_std: float = 0.005
    residual_dtype: str = "bf16"  # fp32 | bf16: the residual stream / embeddings under autocast (CUDA)
    attn_backend: str = "auto"  # auto (FA3 if importable, else SDPA's choice) | flash | cudnn | efficient | fa4
    # (fa4: SDPA's flash backend on FlashAttention-4's kernels, package flash-attn-4, on CUDA)

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width: mlp_mult * model_dim rounded half up (4.0 * 512 -> 2048, 2.999 * 128 -> 384)."""
        return int(math.floor(self.mlp_mult * self.model_dim + 0.5))

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def check(self) -> None:
        _each(self, ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "bigram_dim",
                     "ve_dim"), lambda v: v > 0, "must be positive")
        if not math.isfinite(self.mlp_mult) or self.mlp_hidden < 1:
            raise self.bad("mlp_mult", "times model.model_dim must round to a width >= 1")
        _each(self, ("vocab_size",), lambda v: v <= MAX_VOCAB, f"must be <= {MAX_VOCAB} (uint16 shards)")
        if self.bigram_buckets != 0 and self.bigram_buckets < 2:
            raise self.bad("bigram_buckets", "must be 0 (off) or >= 2")
        if self.model_dim % self.num_heads:
            raise self.bad("num_heads", f"must divide model.model_dim ({self.model_dim})")
        if self.num_heads % self.num_kv_heads:
            raise self.bad("num_kv_heads", f"must divide model.num_heads ({self.num_heads})")
        _each(self, ("xsa_last_n", "ve_last_n"), lambda n: 0 <= n <= self.num_layers,
              f"must be in [0, model.num_layers={self.num_layers}]")
        if self.rope_dims % 2 or not 0 <= self.rope_dims <= self.head_dim or self.rope_dims == 2:
            raise self.bad("rope_dims", f"must be even, not 2 (the NTK exponent rope_dims/(rope_dims-2)), and in "
                                        f"[0, head_dim={self.head_dim}]")
        _positive_finite(self, "rope_base", "logit_softcap", "logit_softcap_neg", "attn_gate_scale", "bigram_proj_gain",
                         "ve_proj_gain")
        _each(self, ("attn_gate_window",), lambda n: 0 <= n <= self.model_dim,
              f"must be in [0, model.model_dim={self.model_dim}]")
        _at_least(self, 0, "leaky_slope")
        if self.parallel_start_layer and not self.num_layers // 2 <= self.parallel_start_layer < self.num_layers:
            raise self.bad("parallel_start_layer", f"must be 0 (off) or a decoder layer in "
                                                   f"[{self.num_layers // 2}, {self.num_layers})")
        _one_of(self, "parallel_final_lane", PARALLEL_FINAL_LANES)
        _one_of(self, "smear_form", SMEAR_FORMS)
        _each(self, ("smear_window",), lambda n: 1 <= n <= self.model_dim,
              f"must be in [1, model.model_dim={self.model_dim}]")
        self._check_loops()
        _one_of(self, "residual_dtype", RESIDUAL_DTYPES)
        _one_of(self, "attn_backend", ATTN_BACKENDS)

    def _check_loops(self) -> None:
        _at_least(self, 0, "num_loops")
        if self.num_loops == 0:
            return
        if not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise self.bad("loop_end", f"and model.loop_start ({self.loop_start}) must be layers in "
                                       f"[0, {self.num_layers}), start <= end")
        if self.parallel_start_layer and self.loop_end >= self.parallel_start_layer:
            raise self.bad("loop_end", f"must be below model.parallel_start_layer ({self.parallel_start_layer}): "
                                       f"the looped layers run on one lane")


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's train.batch_tokens split over ranks and micro-batches."""

    accum: int  # micro-batches per rank and step
    micro_tokens: int  # tokens of one micro-batch on one rank


@dataclass(frozen=True)
class TrainConfig(Section):
    name: typing.ClassVar[str] = "train"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = True  # torch.compile on CUDA (ignored on CPU)
    compile_scope: str = "model"  # model: one graph | blocks: each block compiled on its own (regional)
    compile_autotune: bool = False  # inductor max-autotune without CUDA graphs: kernel configs timed while compiling (slower compile)
    fused_mlp: bool = True  # Triton fused LeakyReLU^2 MLP on CUDA
    fused_qk_norm_rope: bool = True  # Triton fused q/k RMSNorm + partial RoPE + q gain (CUDA, power-of-two head dim)
    doc_packing: bool = False  # micro-batch = 1 row; attention within documents, cut every seq_len (PR #2135)
    doc_attn_backend: str = "auto"  # its kernel: auto (docattn.resolve) | reference | varlen | flex | fa4 | fa3
    nproc_per_node: int = 8  # >1: the stage relaunches itself through torchrun
    batch_tokens: int = 786_432  # global tokens per optimizer step (§4.1)
    seq_len: int = 2048  # the (final) training sequence length; also where the NTK RoPE rule starts
    seq_len_schedule: tuple[tuple[int, float], ...] = ()  # [[LEN, FRAC], ...]: LEN until training_frac FRAC, then seq_len
    grad_accum_steps: int = 0  # micro-batches per rank and step; 0 = auto (max_micro_batch_seqs)
    max_micro_batch_seqs: int = 48  # auto: fewest micro-batches of at most this many sequences per rank
    iterations: int = 20000
    max_wallclock_seconds: float = 590.0  # 0 = step-based warmdown
    warmdown_iters: int = 3000  # PR #1072
    warmdown_frac: float = 0.0  # > 0: warm down over this last fraction of training_frac instead (PR #2135: 0.85)
    warmup_steps: int = 20  # most compile-priming steps per graph (fewer once one compiles nothing), then state restored (§4.5)
    min_lr: float = 0.0  # floor of the lr multiplier during warmdown (records #1787: 0.10)
    loop_enable_frac: float = 0.0  # training_frac before model.num_loops starts (records: 0.35)
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_ns_steps: int = 5
    muon_ns_coeffs: str = "quintic"  # quintic (one tuple) | polar_express (a tuple per step, <= 5 steps)
    muon_wd: float = 0.04
    muon_row_normalize: bool = False  # Muon: rows of the update to unit L2 norm before Newton-Schulz (PR #2135: true)
    muon_comm_dtype: str = "auto"  # Parallel Muon communication: auto (bf16 on CUDA) | bf16 | fp32
    adam_wd: float = 0.04  # AdamW weight decay of the "scalar" group
    embed_wd: float = 0.04  # AdamW weight decay of the "embed" group (record: = adam_wd; PR #2135 EMBED_WD: 0.085)
    beta1: float = 0.9
    beta2: float = 0.99  # PR #1072 (PR #535: 0.95)
    adam_eps: float = 1.0e-8
    grad_clip: float = 0.3
    grad_clip_scope: str = "global"  # global: by the rank-averaged gradient's norm | local: per rank (PR #2135)
    ema_decay: float = 0.997
    swa_enabled: bool = False
    swa_every: int = 50
    swa_threshold: float = 0.2
    late_qat_threshold: float = 0.15  # PR #535 (QAT on every block matrix)
    qat_clip_quantile: float = 0.9995  # the clip rule shared with quantize (§6.6)
    hessian_every: int = 25  # online Hessians (§6.5)
    hessian_start_scale: float = 0.8
    hessian_head: bool = False  # also the tied head's input Gram, as hessians.pgt "tok_emb.weight" (PR #2135)
    calibration_batches: int = 0  # Hessians after training on the exported weights, batches (0 = off; PR #2135: 32)
    calibration_seqs: int = 48  # sequences of seq_len per rank in one calibration batch (PR #2135: 48)
    hessian_source: str = "online"  # online | calibration (needs calibration_batches > 0; no online capture): written to hessians.pgt
    val_tokens: int = 0  # tokens for val_bpb_float (0 = all val tokens)
    val_batch_seqs: int = 32
    val_live: bool = False  # also score the live (not averaged) weights: val_bpb_live (early in a run EMA still holds the init)
    log_every: int = 200
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = off)
    checkpoint_dir: str = ".checkpoints/train"  # git-ignored, not a DVC output

    def check(self) -> None:
        _one_of(self, "device", DEVICES)
        _one_of(self, "compile_scope", COMPILE_SCOPES)
        _one_of(self, "doc_attn_backend", DOC_ATTN_BACKENDS)
        _one_of(self, "muon_comm_dtype", MUON_COMM_DTYPES)
        _one_of(self, "grad_clip_scope", GRAD_CLIP_SCOPES)
        _one_of(self, "hessian_source", HESSIAN_SOURCES)
        _at_least(self, 1, "nproc_per_node", "batch_tokens", "seq_len", "iterations", "muon_ns_steps", "swa_every",
                  "val_batch_seqs", "max_micro_batch_seqs", "calibration_seqs")
        _at_least(self, 0, "grad_accum_steps", "warmdown_iters", "warmup_steps", "muon_momentum_warmup_steps",
                  "hessian_every", "val_tokens", "log_every", "checkpoint_every", "max_wallclock_seconds",
                  "matrix_lr", "scalar_lr", "tied_embed_lr", "muon_wd", "adam_wd", "embed_wd", "grad_clip",
                  "hessian_start_scale", "calibration_batches")
        _fraction(self, "muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2", "ema_decay", closed=False)
        _fraction(self, "swa_threshold", "late_qat_threshold", "min_lr", "loop_enable_frac", "warmdown_frac")
        _one_of(self, "muon_ns_coeffs", NS_SCHEDULES)
        most = NS_SCHEDULES[self.muon_ns_coeffs]
        if most is not None and self.muon_ns_steps > most:
            raise self.bad("muon_ns_steps", f"must be <= {most} with train.muon_ns_coeffs {self.muon_ns_coeffs}")
        _each(self, ("qat_clip_quantile",), lambda q: 0.0 < q <= 1.0, "must be in (0, 1]")
        _each(self, ("adam_eps",), lambda v: v > 0, "must be > 0")
        if self.hessian_source == "calibration" and self.calibration_batches == 0:
            raise self.bad("hessian_source", "calibration needs train.calibration_batches > 0")
        if self.checkpoint_every > 0 and not self.checkpoint_dir:
            raise self.bad("checkpoint_dir", "must name a folder when train.checkpoint_every > 0")
        if self.seq_len > self.batch_tokens:
            raise self.bad("seq_len", f"must be <= train.batch_tokens ({self.batch_tokens})")
        if 0 < self.val_tokens < self.seq_len:
            raise self.bad("val_tokens", f"must be 0 (all) or >= train.seq_len ({self.seq_len}), one sequence")
        self._check_seq_len_schedule()
        self.batch_split(self.nproc_per_node)

    def _check_seq_len_schedule(self) -> None:
        fracs = [f for _, f in self.seq_len_schedule]
        if not all(0 < f <= 1 for f in fracs) or fracs != sorted(set(fracs)):
            raise self.bad("seq_len_schedule", "fractions must increase within (0, 1]")
        if not all(1 <= n <= self.seq_len for n, _ in self.seq_len_schedule):
            raise self.bad("seq_len_schedule", f"lengths must be in [1, train.seq_len={self.seq_len}]")

    def seq_lens(self) -> list[int]:
        """Every training sequence length: the schedule's, then seq_len."""
        return [n for n, _ in self.seq_len_schedule] + [self.seq_len]

    def batch_split(self, world_size: int) -> BatchSplit:
        """The step's split over `world_size` ranks: train.grad_accum_steps micro-batches, or when it
        is 0 the fewest that cut a rank's sequences evenly into at most train.max_micro_batch_seqs
        each (786,432 tokens of 2048 on 8 ranks: the records' 1; 196,608 on one GPU: 2 of 48).
        ConfigError unless every training sequence length divides a micro-batch evenly."""
        accum = self.grad_accum_steps or self._auto_accum(world_size)
        for n in self.seq_lens():
            denom = world_size * accum * n
            if self.batch_tokens % denom:
                raise self.bad("batch_tokens", f"must be divisible by world_size * micro-batches * sequence length "
                                               f"= {world_size} * {accum} * {n} = {denom}")
        return BatchSplit(accum, self.batch_tokens // (world_size * accum))

    def _auto_accum(self, world_size: int) -> int:
        seqs, rest = divmod(self.batch_tokens, world_size * self.seq_len)  # sequences per rank and step
        if rest or seqs == 0:
            return 1  # batch_split names the mismatch
        return next(d for d in range(1, seqs + 1) if seqs % d == 0 and seqs // d <= self.max_micro_batch_seqs)


@dataclass(frozen=True)
class QuantizeConfig(Section):
    name: typing.ClassVar[str] = "quantize"
    bits: int = 6  # int6 codes in [-31, 31]
    damp: float = 0.01  # fraction of mean diag(H)
    block_size: int = 128
    act_order: bool = True
    clip_quantiles: tuple[float, ...] = (0.999, 0.9995, 0.9999, 0.99999, 1.0)  # GPTQ-lite set (§6.2)
    passthrough_max_numel: int = 65536  # §6.1 rule 1
    embed_mode: str = "int8"  # int8 | fp16 | gptq (at embed_bits; Hessian: train.hessian_head) for tok_emb
    embed_bits: int = 8  # tok_emb code width under embed_mode gptq (PR #2135: 7)
    clip_rule: str = "quantile"  # quantile (clip_quantiles, per row the best) | sigma (the *_clip_sigmas, PR #2135)
    matrix_clip_sigmas: float = 12.85  # clip_rule sigma: clip of any other matrix, in row standard deviations
    attn_clip_sigmas: float = 13.0  # clip_rule sigma: clip of the attention matrices (c_q, c_k, c_v, proj)
    mlp_clip_sigmas: float = 10.0  # clip_rule sigma: clip of the MLP matrices (PR #2135: 11.5)
    embed_clip_sigmas: float = 20.0  # clip_rule sigma: clip of tok_emb under embed_mode gptq (PR #2135: 14.0)
    int8_clip_quantile: float = 0.9999984
    device: str = "auto"
    lqer_enabled: bool = False  # low-rank correction of the quantization error (pgolf.quantize.lqer)
    lqer_top_k: int = 3  # matrices corrected: the K of largest ||W - Ŵ||_F (PR #1855: 3)
    lqer_rank: int = 4  # PR #1855: 4
    lqer_bits: int = 4  # factor codes, symmetric per row, fp16 scales (PR #1855: 4)
    lqer_asym: bool = False  # A = U S int2 (one scale), B = V^T int4 in groups of lqer_group (PR #2135: true)
    lqer_group: int = 64  # lqer_asym: values of B per fp16 scale (PR #2135: 32)

    def check(self) -> None:
        low, high = BITS_RANGE
        _each(self, ("bits", "lqer_bits", "embed_bits"), lambda b: low <= b <= high,
              f"must be in the supported range [{low}, {high}]")
        _one_of(self, "embed_mode", EMBED_MODES)
        _one_of(self, "clip_rule", CLIP_RULES)
        _positive_finite(self, "matrix_clip_sigmas", "attn_clip_sigmas", "mlp_clip_sigmas", "embed_clip_sigmas")
        qs = self.clip_quantiles
        if not qs or not all(0.0 < q <= 1.0 for q in qs) or len(set(qs)) < len(qs):
            raise self.bad("clip_quantiles", "must be a list of distinct numbers in (0, 1]")
        _positive_finite(self, "damp")
        _at_least(self, 1, "block_size", "lqer_top_k", "lqer_rank", "lqer_group")
        _at_least(self, 0, "passthrough_max_numel")
        _each(self, ("int8_clip_quantile",), lambda q: 0.0 < q <= 1.0, "must be in (0, 1]")
        _one_of(self, "device", DEVICES)


@dataclass(frozen=True)
class CompressConfig(Section):
    name: typing.ClassVar[str] = "compress"
    codec: str = "auto"  # auto (smallest) | lzma | zstd | brotli
    lzma_preset: int = 9
    lzma_extreme: bool = False
    zstd_level: int = 22
    brotli: bool = False  # also try brotli (auto keeps the smallest; size.json brotli_bytes)
    brotli_quality: int = 11  # 0..11
    brotli_window: int = 24  # log2 of the window, 10..24 (PR #1855: 24)
    layout: str = "flat"  # flat | grouped (pgolf.compress.grouping: codes by role, rows ordered, undone at load) | pergroup
    # pergroup: the grouped body cut into groups, each compressed by its best codec (pgolf.compress.pergroup)
    pergroup_codecs: tuple[str, ...] = PERGROUP_CODECS  # tried per piece when present on this machine
    row_order: str = "pca"  # grouped / pergroup rows: pca (one projection) | l1 (greedy nearest neighbour per tensor)
    transpose_groups: bool = False  # grouped / pergroup: each block stored column by column after its row order (PR #2135)
    lrzip_level: int = 9  # pergroup's lrzip codec: ZPAQ at `lrzip -z -L` this (PR #2135: 9), 1..9
    cap_bytes: int = 16_000_000  # decimal bytes
    prune: bool = True  # selective ±1 pruning down to target_bytes (pgolf.compress.prune)
    target_bytes: int = 15_950_000  # model (chosen codec) + packed code bytes after pruning (§7)
    prune_slack_bytes: int = 2000  # stop once a fitting probe is within this of target_bytes (0 = exact n)
    lzma_chunk_bytes: int = 131072  # 0: one lzma stream; else independent streams of this many raw bytes (>= 65536)
    zstd_chunk_bytes: int = 131072  # 0: one zstd frame; else independent frames of this many raw bytes (>= 65536)
    threads: int = 0  # workers for the chunked lzma streams / zstd frames (0 = every core); never changes the bytes

    def check(self) -> None:
        _one_of(self, "codec", ("auto", *CODECS))
        for key, lo, hi in (("lzma_preset", 0, 9), ("zstd_level", 1, 22), ("brotli_quality", 0, 11),
                            ("brotli_window", 10, 24), ("lrzip_level", 1, 9)):
            _each(self, (key,), lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")
        _one_of(self, "layout", LAYOUTS)
        _one_of(self, "row_order", ROW_ORDERS)
        if not self.pergroup_codecs or any(c not in PERGROUP_CODECS for c in self.pergroup_codecs) \
                or not {"lzma", "zstd"} & set(self.pergroup_codecs):
            raise self.bad("pergroup_codecs", f"must be a subset of {PERGROUP_CODECS} with lzma or zstd")
        if self.layout == "pergroup" and self.codec != "auto":
            raise self.bad("codec", "must be auto with compress.layout pergroup (each group picks its codec)")
        _at_least(self, 1, "cap_bytes", "target_bytes")
        if self.target_bytes > self.cap_bytes:
            raise self.bad("target_bytes", f"must be <= compress.cap_bytes ({self.cap_bytes})")
        _at_least(self, 0, "prune_slack_bytes", "threads")
        _each(self, ("lzma_chunk_bytes", "zstd_chunk_bytes"), lambda n: n == 0 or n >= MIN_CHUNK_BYTES,
              f"must be 0 (unchunked) or >= {MIN_CHUNK_BYTES}")


@dataclass(frozen=True)
class EvaluateConfig(Section):
    name: typing.ClassVar[str] = "evaluate"
    context: int = 2048
    stride: int = 64  # 0 = non-sliding only
    doc_attention: bool = False  # non-sliding windows scored with attention within documents (PR #2135's eval_val); needs stride 0
    batch_seqs: int = 32
    max_tokens: int = 0  # 0 = whole validation split
    device: str = "auto"
    compile: bool = True
    nproc_per_node: int = 8
    # score-first test-time training (pgolf.evaluate.ttt); facts from the records PR #549 / #1855
    ttt_enabled: bool = False  # off: val_bpb is the plain sliding score
    ttt_mode: str = "lora"  # lora (rank-r adapters) | full (the chosen matrices themselves)
    ttt_targets: tuple[str, ...] = MATRIX_KINDS  # matrix kinds adapted
    ttt_first_layer: int = 0  # adapt layers >= this (PR #549: 0, all blocks)
    ttt_rank: int = 8  # LoRA rank (ttt_mode lora)
    ttt_optimizer: str = "sgd"  # sgd (momentum) | adam (AdamW)
    ttt_lr: float = 0.002  # PR #549
    ttt_momentum: float = 0.9  # SGD momentum / Adam beta1
    ttt_beta2: float = 0.999  # Adam beta2
    ttt_weight_decay: float = 0.0
    ttt_epochs: int = 3  # passes over each scored chunk
    ttt_chunk_tokens: int = 32768  # targets per chunk (PR #549: 32K)
    ttt_batch_seqs: int = 32  # sequences of evaluate.context per adaptation step
    ttt_grad_clip: float = 1.0  # 0 = off
    ttt_lr_schedule: str = "cosine"  # cosine (over a rank's chunks) | constant
    ttt_seed: int = 1337  # LoRA init
    ttt_asym_logit: bool = False  # AsymLogit rescale: TTT also adapts softcap_pos / softcap_neg (model.logit_softcap_learned)
    # which TTT: stream (the chunks above, over the token stream) | phased (pgolf.evaluate.phased, PR #2135:
    # per document, batched LoRA; ttt_rank, ttt_lr, ttt_optimizer, ttt_momentum, ttt_beta2, ttt_weight_decay,
    # ttt_seed apply; then the ttt_global_* pass over the prefix documents once they are scored)
    ttt_scheme: str = "stream"
    ttt_sites: tuple[str, ...] = ("q", "v", "o", "mlp", "head")  # phased: LoRA sites (TTT_SITES; PR #2135 K off)
    ttt_alpha: float = 144.0  # phased: adapter output scaled by alpha / ttt_rank (PR #2135)
    ttt_doc_batch: int = 64  # phased: documents adapted side by side, each with its own adapters
    ttt_doc_chunk: int = 48  # phased: targets scored, then trained on, per step within a document
    ttt_keep_a: bool = True  # phased: each adapter's A carries over to the next document (only B resets)
    ttt_compile: bool = False  # phased: the chunk steps' forward under torch.compile(dynamic=True) on CUDA (PR #2135)
    ttt_prefix_docs: int = 2500  # phased: documents scored before the global pass(es) (0 = none)
    ttt_phases: int = 1  # phased: global passes, at equal steps through the prefix
    ttt_global_lr: float = 0.001  # phased global pass: SGD on every weight, cosine over its chunks
    ttt_global_momentum: float = 0.9
    ttt_global_epochs: int = 1
    ttt_global_chunk_tokens: int = 32768
    ttt_global_batch_seqs: int = 32  # sequences of evaluate.context per step
    ttt_global_grad_clip: float = 1.0  # 0 = off
    # token-only causal n-gram tilt of the scored softmax (pgolf.evaluate.ngram_tilt; PR #2135)
    ngram_tilt: bool = False  # on: log_softmax(logits + boost * onehot(hint)) where the hint is confident
    ngram_order: int = 16  # context of order - 1 tokens (1..33)
    ngram_threshold: float = 0.8  # tilt where the hint's count / context count >= this
    ngram_boost: float = 2.625  # logit added to the hinted token before renormalising

    def check(self) -> None:
        _at_least(self, 1, "context", "batch_seqs", "nproc_per_node")
        _each(self, ("stride",), lambda s: 0 <= s <= self.context, f"must be in [0, evaluate.context={self.context}]")
        if self.doc_attention and self.stride:
            raise self.bad("stride", "must be 0 with evaluate.doc_attention (a sliding window's seam would feed "
                                     "the front end the wrong previous token)")
        _each(self, ("max_tokens",), lambda n: n == 0 or n >= self.context,
              f"must be 0 (all) or >= evaluate.context ({self.context}), one window")
        _one_of(self, "device", DEVICES)
        self._check_ttt()
        _each(self, ("ngram_order",), lambda n: 1 <= n <= 33, "must be in [1, 33] (contexts of at most 32 tokens)")
        _fraction(self, "ngram_threshold")
        _positive_finite(self, "ngram_boost")

    def _check_ttt(self) -> None:
        """The ttt_* keys, checked even while TTT is off."""
        _one_of(self, "ttt_mode", TTT_MODES)
        _one_of(self, "ttt_optimizer", TTT_OPTIMIZERS)
        _one_of(self, "ttt_lr_schedule", TTT_SCHEDULES)
        _one_of(self, "ttt_scheme", TTT_SCHEMES)
        _distinct_subset(self, "ttt_targets", MATRIX_KINDS)
        _distinct_subset(self, "ttt_sites", TTT_SITES)
        _at_least(self, 0, "ttt_prefix_docs", "ttt_global_epochs", "ttt_global_grad_clip")
        _at_least(self, 1, "ttt_doc_batch", "ttt_doc_chunk", "ttt_phases", "ttt_global_batch_seqs")
        _positive_finite(self, "ttt_alpha", "ttt_global_lr")
        _fraction(self, "ttt_global_momentum", closed=False)
        if self.ttt_global_chunk_tokens < self.context:
            raise self.bad("ttt_global_chunk_tokens", f"must be >= evaluate.context ({self.context}): a chunk "
                                                      f"holds whole sequences of it")
        _at_least(self, 0, "ttt_first_layer", "ttt_weight_decay", "ttt_grad_clip")
        _at_least(self, 1, "ttt_rank", "ttt_epochs", "ttt_batch_seqs")
        _fraction(self, "ttt_momentum", "ttt_beta2", closed=False)
        _positive_finite(self, "ttt_lr")
        if self.ttt_chunk_tokens < max(self.stride, 1):
            raise self.bad("ttt_chunk_tokens", f"must be >= evaluate.stride ({self.stride}) and >= 1 (a chunk shorter "
                                               f"than the stride would split one window's scored targets)")


SECTIONS: dict[str, type[Section]] = {cls.name: cls for cls in (
    PrepareConfig, ModelConfig, TrainConfig, QuantizeConfig, CompressConfig, EvaluateConfig)}


def check_across(cfgs: dict[str, Section]) -> None:
    """The rules that read two sections (`cfgs`: every section, checked alone); ConfigError."""
    model, ev = cfgs["model"], cfgs["evaluate"]
    if ev.ttt_enabled and ev.ttt_first_layer >= model.num_layers:
        raise ev.bad("ttt_first_layer", f"must be < model.num_layers ({model.num_layers})")
    if ev.ttt_enabled and ev.ttt_asym_logit and not model.logit_softcap_learned:
        raise ev.bad("ttt_asym_logit", "needs model.logit_softcap_learned (the softcap scalars it adapts)")
    tr = cfgs["train"]
    if model.attn_backend == "fa4" and tr.doc_packing and tr.doc_attn_backend == "fa3":
        raise tr.bad("doc_attn_backend", "fa3 cannot run beside model.attn_backend fa4 (each swaps aten's "
                                         "flash kernels for the whole process)")


# ----------------------------------------------------------------------------- loading


def check(cfg: Section, source: str = "params.yaml") -> Section:
    """Run cfg's range checks and return it; ConfigError naming `source` and the key. Loading calls
    it; call it on a dataclass built or changed by hand (dataclasses.replace)."""
    try:
        cfg.check()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _type_name(typ) -> str:
    args = typing.get_args(typ)
    if typing.get_origin(typ) is not tuple:
        return typ.__name__
    if args[-1] is Ellipsis:
        return f"a list of {_type_name(args[0])}"
    return "[" + ", ".join(_type_name(a) for a in args) + "]"


def _coerce(value, typ):
    """`value` as `typ` (YAML lists become tuples); ValueError when it is not one."""
    if typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError
        types = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(_coerce(v, t) for v, t in zip(value, types))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        return float(value)  # YAML 1.1 reads 1e-8 as a string
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ValueError


def _typed(section: str, data, source: str, complete: bool) -> dict:
    """{key: value as the field's type} of a section's mapping; ConfigError for an unknown key, a
    value of the wrong type, or (complete) a missing key."""
    cls = SECTIONS[section]
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(fields))
    missing = [k for k in fields if k not in data] if complete else []
    problems = [f"{what} key(s) {', '.join(section + '.' + k for k in keys)}"
                for what, keys in (("unknown", unknown), ("missing", missing)) if keys]
    if problems:
        raise ConfigError(f"{source}: {'; '.join(problems)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError:
            raise ConfigError(f"{source}: {section}.{key} must be {_type_name(hints[key])}, got "
                              f"{type(value).__name__} {value!r}") from None
    return out


def from_dict(section: str, data: dict | None, source: str = "params.yaml") -> Section:
    """The checked dataclass of `section` from a (possibly partial) mapping: keys left out take the
    record defaults (for tests and tools that set a few values; a params file goes through `from_doc`)."""
    return check(SECTIONS[section](**_typed(section, data, source, complete=False)), source)


def from_doc(doc: dict, section: str, source: str = "params.yaml") -> Section:
    """The checked dataclass of `section` from a whole params document, in which the section and
    every one of its keys must be present (no run starts on a default it did not ask for)."""
    if section not in doc:
        raise ConfigError(f"{source}: section '{section}' is missing (write params.yaml with `pgolf profiles NAME`)")
    return check(SECTIONS[section](**_typed(section, doc[section], source, complete=True)), source)


def restore(section: str, data: dict, source: str) -> Section:
    """The dataclass of values checked before (typed again, every key required, no range checks)."""
    return SECTIONS[section](**_typed(section, data, source, complete=True))


def read_doc(path: str | Path = "params.yaml") -> dict:
    """The parsed params file; ConfigError naming it when it is missing, not YAML or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the params file ({e})") from None
    return parse_doc(text, str(path))


def parse_doc(text: str, source: str) -> dict:
    """YAML text of a params file -> its top-level mapping; ConfigError naming `source` otherwise."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{at}: {why}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: must be a mapping of sections (prepare, model, train, ...), "
                          f"got {type(doc).__name__}")
    return doc


def load(section: str, path: str | Path = "params.yaml") -> Section:
    """One section of a complete params file (every key required, every value checked)."""
    return from_doc(read_doc(path), section, str(path))


def load_all(doc: dict, source: str = "params.yaml") -> dict[str, Section]:
    """{section: checked dataclass} of a complete params document, the rules across sections included."""
    cfgs = {s: from_doc(doc, s, source) for s in SECTIONS}
    try:
        check_across(cfgs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfgs


def _plain(value):
    """Tuples as lists, all the way down (for YAML and JSON)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def to_dict(cfg: Section) -> dict:
    """{key: value} of a section, lists as lists."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
