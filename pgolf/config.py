"""Typed configuration: `params.yaml` sections -> frozen dataclasses.

This module owns the one config path of the project. Every constant of the recipe lives in
`params.yaml`; each section maps one-to-one onto a dataclass below, whose field comments say
where the default comes from (recipe-spec section numbers). The defaults are the record profile's
values (`profiles/record.yaml`; a test keeps them equal), so no third, silent profile hides here.

Loading validates each section once, here: every key known and of the right type, no section or
key missing (a run never starts on a default it did not ask for), then the section's range checks
(`check`: the `check_config(cfg)` of the module that owns the section, `CHECKS`, which raises
`bad(cfg, key, why)`). Errors name the file and the offending `section.key`. The stages and the
library take the loaded dataclasses as valid and do not check them again.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A params.yaml value that is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "fineweb"  # embedded | local | fineweb
    corpus: str = "data/fineweb10B_sp1024"  # file or folder of .jsonl / .jsonl.zst / .txt, or the shard folder
    val_source: str = "data/fineweb10B_sp1024"  # validation documents; "" = first `val_docs` docs of corpus
    val_docs: int = 0  # used only when val_source is "" (challenge: first 50,000 docs)
    max_train_docs: int = 0  # 0 = all
    tokenizer: str = "data/fineweb10B_sp1024/fineweb_1024_bpe.model"  # a .model path, or "train"
    vocab_size: int = 1024  # spec §1.3
    tokenizer_train_docs: int = 0  # docs used to train the tokenizer (0 = all training docs)
    shard_tokens: int = 100_000_000  # spec §1.1 SHARD_SIZE
    fineweb_dir: str = "data/fineweb10B_sp1024"  # local copy of the challenge export (source=fineweb)
    fineweb_repo: str = "willdepueoai/parameter-golf"  # HF dataset repo of the export
    fineweb_train_shards: int = 80  # train shards to download when fineweb_dir is missing
    workers: int = 16  # processes for tokenization


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 1024
    num_layers: int = 11  # spec §3
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0  # MLP hidden = floor(mlp_mult * model_dim + 0.5) (model.mlp_hidden); records: 4.0
    leaky_slope: float = 0.5  # LeakyReLU(0.5)^2
    xsa_last_n: int = 11  # PR #1072: all layers
    bigram_buckets: int = 4096  # PR #1072 code default (§3.5)
    bigram_dim: int = 128
    bigram_proj_gain: float = 1.0  # PR #535 uses 1/sqrt(2*layers)
    ve_dim: int = 128  # value embeddings (§3.7)
    ve_last_n: int = 2  # layers 9,10 of 11
    rope_dims: int = 16  # partial RoPE (§3.4)
    rope_base: float = 10000.0  # PR #1072; PR #535 effectively 22082
    qk_gain_init: float = 1.5
    logit_softcap: float = 30.0  # cap of the positive logits (and of the negative ones when equal)
    logit_softcap_neg: float = 30.0  # cap of the negative logits: c_neg * tanh(z / c_neg) for z < 0
    smear_bos_mask: bool = False  # SmearGate: no previous-token mix at a BOS (records #1851/#1855)
    attn_gate_window: int = 0  # sparse attention output gate on the first N input dims (0 = off; records: 12)
    attn_gate_scale: float = 1.0  # its pre-sigmoid scale (records: #1787 1.0, #1855 0.5)
    parallel_start_layer: int = 0  # two-lane decoder from this layer (0 = off; records: 8)
    parallel_final_lane: str = "mean"  # the decoder output with two lanes: mean | attn | mlp
    num_loops: int = 0  # depth recurrence: extra passes of layers loop_start..loop_end (0 = off; records: 2)
    loop_start: int = 0  # first layer of the looped range
    loop_end: int = 0  # last layer of the looped range (inclusive; records: 3..5)
    tied_embed_init_std: float = 0.005
    residual_dtype: str = "bf16"  # fp32 | bf16: the residual stream / embeddings under autocast (CUDA)
    attn_backend: str = "auto"  # auto (FA3 if importable, else SDPA's choice) | flash | cudnn | efficient


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = True  # torch.compile on CUDA (ignored on CPU)
    compile_scope: str = "model"  # model: one graph | blocks: each block compiled on its own (regional)
    fused_mlp: bool = True  # Triton fused LeakyReLU^2 MLP on CUDA
    fused_qk_norm_rope: bool = True  # Triton fused q/k RMSNorm + partial RoPE + q gain (CUDA, power-of-two head dim)
    nproc_per_node: int = 8  # >1: the stage relaunches itself through torchrun
    batch_tokens: int = 786_432  # global tokens per optimizer step (§4.1)
    seq_len: int = 2048  # the (final) training sequence length; also where the NTK RoPE rule starts
    seq_len_schedule: str = ""  # "LEN@FRAC,...": LEN until training_frac FRAC, then seq_len ("" = off)
    grad_accum_steps: int = 0  # micro-batches per rank and step; 0 = auto (max_micro_batch_seqs)
    max_micro_batch_seqs: int = 48  # auto: fewest micro-batches of at most this many sequences per rank
    iterations: int = 20000
    max_wallclock_seconds: float = 590.0  # 0 = step-based warmdown
    warmdown_iters: int = 3000  # PR #1072
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
    muon_comm_dtype: str = "auto"  # Parallel Muon communication: auto (bf16 on CUDA) | bf16 | fp32
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.99  # PR #1072 (PR #535: 0.95)
    adam_eps: float = 1.0e-8
    grad_clip: float = 0.3
    ema_decay: float = 0.997
    swa_enabled: bool = False
    swa_every: int = 50
    swa_threshold: float = 0.2
    late_qat_threshold: float = 0.15  # PR #535 (QAT on every block matrix)
    qat_clip_quantile: float = 0.9995  # the clip rule shared with quantize (§6.6)
    hessian_every: int = 25  # online Hessians (§6.5)
    hessian_start_scale: float = 0.8
    val_tokens: int = 0  # tokens for val_bpb_float (0 = all val tokens)
    val_batch_seqs: int = 32
    log_every: int = 200
    checkpoint_every: int = 0  # steps between resumable checkpoints (0 = off)
    checkpoint_dir: str = ".checkpoints/train"  # git-ignored, not a DVC output


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 6  # int6 codes in [-31, 31]
    damp: float = 0.01  # fraction of mean diag(H)
    block_size: int = 128
    act_order: bool = True
    clip_quantiles: str = "0.999,0.9995,0.9999,0.99999,1.0"  # GPTQ-lite set (§6.2)
    passthrough_max_numel: int = 65536  # §6.1 rule 1
    embed_mode: str = "int8"  # int8 | fp16 for tok_emb
    int8_clip_quantile: float = 0.9999984
    device: str = "auto"
    lqer_enabled: bool = False  # low-rank correction of the quantization error (pgolf.quantize.lqer)
    lqer_top_k: int = 3  # matrices corrected: the K of largest ||W - Ŵ||_F (PR #1855: 3)
    lqer_rank: int = 4  # PR #1855: 4
    lqer_bits: int = 4  # factor codes, symmetric per row, fp16 scales (PR #1855: 4)


@dataclass(frozen=True)
class CompressConfig:
    codec: str = "auto"  # auto (smallest) | lzma | zstd | brotli
    lzma_preset: int = 9
    lzma_extreme: bool = False
    zstd_level: int = 22
    brotli: bool = False  # also try brotli (auto keeps the smallest; size.json brotli_bytes)
    brotli_quality: int = 11  # 0..11
    brotli_window: int = 24  # log2 of the window, 10..24 (PR #1855: 24)
    layout: str = "flat"  # flat | grouped (pgolf.compress.grouping: codes by role, rows ordered, undone at load)
    cap_bytes: int = 16_000_000  # decimal bytes
    prune: bool = True  # selective ±1 pruning down to target_bytes (pgolf.compress.prune)
    target_bytes: int = 15_950_000  # model (chosen codec) + packed code bytes after pruning (§7)
    prune_slack_bytes: int = 2000  # stop once a fitting probe is within this of target_bytes (0 = exact n)
    lzma_chunk_bytes: int = 131072  # 0: one lzma stream; else independent streams of this many raw bytes (>= 65536)
    zstd_chunk_bytes: int = 131072  # 0: one zstd frame; else independent frames of this many raw bytes (>= 65536)
    threads: int = 0  # workers for the chunked lzma streams / zstd frames (0 = every core); never changes the bytes


@dataclass(frozen=True)
class EvaluateConfig:
    context: int = 2048
    stride: int = 64  # 0 = non-sliding only
    batch_seqs: int = 32
    max_tokens: int = 0  # 0 = whole validation split
    device: str = "auto"
    compile: bool = True
    nproc_per_node: int = 8
    # score-first test-time training (pgolf.evaluate.ttt); facts from the records PR #549 / #1855
    ttt_enabled: bool = False  # off: val_bpb is the plain sliding score
    ttt_mode: str = "lora"  # lora (rank-r adapters) | full (the chosen matrices themselves)
    ttt_targets: str = "attn.c_q,attn.c_k,attn.c_v,attn.proj,mlp.fc,mlp.proj"  # matrix kinds adapted
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


SECTIONS: dict[str, type] = {
    "prepare": PrepareConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "quantize": QuantizeConfig,
    "compress": CompressConfig,
    "evaluate": EvaluateConfig,
}
# section -> the module owning its range checks, `check_config(cfg)` (imported when a section is
# checked: those modules import this one for their dataclasses)
CHECKS: dict[str, str] = {
    "prepare": "pgolf.prepare.prepare",
    "model": "pgolf.shared.model",
    "train": "pgolf.train.train",
    "quantize": "pgolf.quantize.quantize",
    "compress": "pgolf.compress.compress",
    "evaluate": "pgolf.evaluate.evaluate",
}
_SECTION_OF = {cls: name for name, cls in SECTIONS.items()}


def bad(cfg, key: str, why: str) -> ConfigError:
    """The error of one value out of range, `<section>.<key> <why>, got <value>` (`check` adds the file)."""
    return ConfigError(f"{_SECTION_OF[type(cfg)]}.{key} {why}, got {getattr(cfg, key)!r}")


def check(cfg, source: str = "params.yaml"):
    """Run the range checks of `cfg`'s section and return `cfg`; ConfigError naming `source` and the
    key. Loading calls it; call it on a dataclass built or changed by hand (dataclasses.replace)."""
    section = _SECTION_OF[type(cfg)]
    try:
        importlib.import_module(CHECKS[section]).check_config(cfg)
    except ValueError as e:  # ConfigError, or the ValueError of a parser the checks reuse
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _coerce(section: str, key: str, value, typ, source: str = "params.yaml"):
    """Return `value` as `typ`, or raise ConfigError naming `source` and `section.key`."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-8 as a string
        except ValueError:
            pass
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {section}.{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")


def from_dict(section: str, data: dict | None, source: str = "params.yaml"):
    """Build the dataclass of `section` from a (possibly partial) dict, checking keys, types and ranges.

    Keys left out take the dataclass defaults (the record profile's values): for tests and tools
    that override a few values. A params file goes through `from_doc`, which requires every key.
    """
    cls = SECTIONS[section]
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(section + '.' + k for k in unknown)}")
    values = {k: _coerce(section, k, v, hints[k], source) for k, v in data.items()}
    return check(cls(**values), source)


def from_doc(doc: dict, section: str, source: str = "params.yaml"):
    """The dataclass of `section` from a whole params document: the section and every one of its
    keys must be there (no run may start on a default it did not ask for)."""
    if section not in doc:
        raise ConfigError(f"{source}: section '{section}' is missing (every section of profiles/tiny.yaml "
                          f"must be present)")
    data = {} if doc[section] is None else doc[section]
    if isinstance(data, dict):
        fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
        unknown = sorted(set(data) - set(fields))
        missing = [k for k in fields if k not in data]
        problems = [f"{what} key(s) {', '.join(section + '.' + k for k in keys)}"
                    for what, keys in (("unknown", unknown), ("missing", missing)) if keys]
        if problems:
            raise ConfigError(f"{source}: {'; '.join(problems)}")
    return from_dict(section, data, source)


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
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: must be a mapping of sections (prepare, model, train, ...), "
                          f"got {type(doc).__name__}")
    return doc


def load(section: str, path: str | Path = "params.yaml"):
    """Read one section of a params file into its dataclass (every key required, every value checked)."""
    return from_doc(read_doc(path), section, str(path))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
