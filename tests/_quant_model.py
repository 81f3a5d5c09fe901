"""A tiny GPT really trained for a few steps on synthetic Markov-chain tokens, with its Hessians
and a train-stage-shaped artifacts/train/ folder; shared by the quantize / GPTQ / prune tests."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import torch

from conftest import single_thread
from pgolf.shared import train_files
from pgolf.config import ModelConfig
from pgolf.shared.model import GPT

MICRO = ModelConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=3,
                    xsa_last_n=2, bigram_buckets=64, bigram_dim=16, ve_dim=16, ve_last_n=1, rope_dims=8)
SEQ, BATCH, STEPS = 64, 16, 40
QAT_QUANTILE = 0.9995


def markov_tokens(n_seq: int, seed: int, vocab: int = 256, fanout: int = 4) -> torch.Tensor:
    """(n_seq, SEQ + 1) tokens of a fixed sparse random Markov chain (each token has `fanout` successors)."""
    g = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, vocab, (vocab, fanout), generator=g)  # the chain, same for every seed
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n_seq, SEQ + 1, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n_seq,), generator=g)
    pick = torch.randint(0, fanout, (n_seq, SEQ), generator=g)
    for t in range(SEQ):
        x[:, t + 1] = succ[x[:, t], pick[:, t]]
    return x


def collect_hessians(model: GPT, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean-per-token x^T x of every quantizable matrix over `tokens` (n, SEQ + 1)."""
    hs = model.zero_hessians()
    with torch.no_grad():
        model(tokens[:, :-1], tokens[:, 1:], hessians=hs)
    rows = tokens[:, :-1].numel()
    return {n: h / rows for n, h in hs.items()}


@lru_cache(maxsize=1)
def trained() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(export_state_dict, calibration Hessians, held-out Hessians) of a 40-step AdamW run (~2 s).

    One thread: these ops are far too small to gain from two, and a second busy process on the
    same two cores makes OpenMP's spinning threads 50x slower.
    """
    with single_thread():
        return _train()


def _train():
    torch.manual_seed(0)
    model = GPT(MICRO, qat_quantile=QAT_QUANTILE, train_seq_len=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = markov_tokens(BATCH * STEPS, seed=1)
    for step in range(STEPS):
        x = data[step * BATCH:(step + 1) * BATCH]
        loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return (model.export_state_dict(), collect_hessians(model, markov_tokens(64, seed=2)),
            collect_hessians(model, markov_tokens(64, seed=3)))


def model_meta() -> dict:
    return {"model": dataclasses.asdict(MICRO), "train_seq_len": SEQ, "qat_quantile": QAT_QUANTILE, "qat_bits": 6,
            "tokenizer": {"sha256": "0" * 64, "vocab_size": MICRO.vocab_size}}


def write_train_dir(root: Path, weights=None, hessians=None, meta=None) -> Path:
    """root/artifacts/train/{model,hessians}.pgt as the train stage writes them."""
    w, h, _ = trained()
    d = root / "artifacts" / "train"
    d.mkdir(parents=True, exist_ok=True)
    train_files.save_weights(d / train_files.MODEL_FILE, weights if weights is not None else w,
                             meta if meta is not None else model_meta())
    train_files.save_hessians(d / train_files.HESSIANS_FILE, hessians if hessians is not None else h,
                              {"rows": 64 * SEQ, "accumulations": 1, "world_size": 1})
    return d


def eval_loss(sd: dict[str, torch.Tensor], n_seq: int = 64, seed: int = 4) -> float:
    model = GPT(MICRO, qat_quantile=QAT_QUANTILE, train_seq_len=SEQ)
    model.load_export_state_dict(sd)
    model.eval()
    x = markov_tokens(n_seq, seed=seed)
    with torch.no_grad():
        return float(model(x[:, :-1], x[:, 1:]))
