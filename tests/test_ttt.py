"""pgolf.evaluate.ttt: score-first test-time training is legal and does what it says.

Legality (openai/parameter-golf #1017) is tested with a micro GPT and a large learning rate, so an
update is plainly visible in the scores: every target scored exactly once; each chunk's scores are
those of the model adapted on the earlier chunks only (a naive one-forward-per-target reference
with a full-vocabulary log-softmax that sums to 1); changing a token never moves the score of an
earlier target, while it does move later chunks' scores (the update is visible, so the test has
power); a train-then-score variant is detected. Also: the window split, one chunk = plain sliding,
LoRA and full modes, SGD and Adam, rank slices and the 2-rank torchrun stage, bad params."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import tiny_model
from pgolf.shared import bpb
from pgolf.evaluate import ttt
from pgolf.config import ConfigError, EvaluateConfig
from pgolf.evaluate.evaluate import load_model, run
from stages import evaluate as stage
from test_bpb import tiny_tables, tiny_tokens
from test_evaluate import PARAMS, gate, make_workdir, paths, run_stage, tables as wd_tables, val_tokens

CFG = EvaluateConfig(context=16, stride=4, batch_seqs=4, device="cpu", compile=False, ttt_enabled=True,
                     ttt_chunk_tokens=24, ttt_lr=0.5, ttt_epochs=2, ttt_rank=4, ttt_batch_seqs=2,
                     ttt_lr_schedule="constant", ttt_momentum=0.0)
T = 120  # targets: 5 chunks of 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def toks():
    return tiny_tokens(T + 1)


def run_ttt(cfg=CFG, tokens=None, seed=1, **kw):
    return ttt.eval_ttt(tiny_model(seed), toks() if tokens is None else tokens, tiny_tables(), cfg, "cpu",
                        record=True, **kw)


# ----------------------------------------------------------------------------- windows, slots


@pytest.mark.parametrize("n,context,stride,chunk", [(120, 16, 4, 24), (121, 16, 4, 7), (50, 16, 16, 16),
                                                    (100, 32, 8, 8), (20, 32, 8, 100), (64, 16, 1, 5)])
def test_chunk_windows_partition_targets_and_keep_each_context(n, context, stride, chunk):
    windows = bpb.sliding_windows(n, context, stride)
    start_of = {t: s for s, ln, f in windows for t in range(s + f, s + ln)}  # target -> its window start
    chunks = ttt.chunk_windows(windows, chunk, n)
    assert len(chunks) == math.ceil(n / chunk)
    np.testing.assert_array_equal(bpb.scored_positions(np.concatenate(chunks)), np.arange(n))
    for c, rows in enumerate(chunks):
        for s, ln, f in rows:
            assert c * chunk <= s + f < s + ln <= min(n, (c + 1) * chunk) and ln <= context
            assert all(start_of[t] == s for t in range(s + f, s + ln))  # same inputs as the plain evaluation


def test_bank_slots_match_the_models_bank_views():
    model = tiny_model(0)
    L = model.cfg.num_layers
    for name, view in model._bank_views().items():
        kind = name.split(".", 2)[2].removesuffix(".weight")
        bank, half = ttt.BANK_SLOTS[kind]
        assert view.data_ptr() == getattr(model, bank)[half * L + int(name.split(".")[1])].data_ptr()


def test_train_sequences_cover_only_the_scored_chunk():
    rows = ttt.train_sequences(24, 48, 16)
    assert rows.tolist() == [[24, 16], [40, 8]]  # targets 24..47; label tokens up to index 48


# ----------------------------------------------------------------------------- legality


def test_one_chunk_is_the_plain_sliding_score():
    r = run_ttt(dataclasses.replace(CFG, ttt_chunk_tokens=T))
    ref = bpb.eval_sliding(tiny_model(1), toks(), tiny_tables(), 16, 4, 4, "cpu", compile=False)
    assert r.chunks == 1 and r.scored_tokens == ref["scored_tokens"] == T
    assert (r.val_bpb, r.scored_bytes) == (ref["val_bpb"], ref["scored_bytes"])


def naive_reference(cfg, tokens, cheat=False):
    """Per-target NLL: chunk by chunk, one unpadded forward of each target's exact context with a
    float64 log-softmax over the whole vocabulary (checked to sum to 1), then the adaptation on
    that chunk. cheat=True adapts BEFORE scoring (the illegal order)."""
    model = tiny_model(1)
    params = ttt.attach(model, cfg)
    opt = ttt.make_optimizer(params, cfg)
    tok = torch.from_numpy(tokens.astype(np.int64))
    chunks = ttt.chunk_windows(bpb.sliding_windows(T, cfg.context, cfg.stride), cfg.ttt_chunk_tokens, T)
    out = torch.full((T,), float("nan"), dtype=torch.float64)
    for c, rows in enumerate(chunks):
        a, b = c * cfg.ttt_chunk_tokens, min(T, (c + 1) * cfg.ttt_chunk_tokens)
        if cheat and c < len(chunks) - 1:
            ttt.adapt(model, tok, a, b, cfg.context, params, opt, cfg, bpb.autocast_ctx(torch.device("cpu")))
        with torch.no_grad():
            for s, ln, f in rows:
                for t in range(s + f, s + ln):
                    logp = F.log_softmax(model.forward_logits(tok[s:t + 1][None])[0, -1].double(), -1)  # (V,)
                    assert abs(float(torch.logsumexp(logp, 0))) < 1e-9  # a normalised distribution
                    assert math.isnan(out[t])  # scored once
                    out[t] = -logp[tok[t + 1]]
        if not cheat and c < len(chunks) - 1:
            ttt.adapt(model, tok, a, b, cfg.context, params, opt, cfg, bpb.autocast_ctx(torch.device("cpu")))
    return out


def test_each_chunk_is_scored_by_weights_adapted_only_on_earlier_chunks():
    r = run_ttt()
    ref = naive_reference(CFG, toks())
    assert not torch.isnan(ref).any() and r.scored_tokens == T
    torch.testing.assert_close(r.per_target, ref, atol=2e-5, rtol=0)
    assert r.val_loss == pytest.approx(float(r.per_target.mean()), rel=1e-6)
    plain = naive_reference(dataclasses.replace(CFG, ttt_chunk_tokens=T), toks())  # never adapted
    torch.testing.assert_close(r.per_target[:24], plain[:24], atol=2e-5, rtol=0)  # chunk 0: artifact weights
    assert (r.per_target[24:] - plain[24:]).abs().max() > 0.1  # the update is visible later
    cheat = naive_reference(CFG, toks(), cheat=True)
    assert (cheat[:96] - r.per_target[:96]).abs().max() > 0.1  # adapting before scoring would be seen


@pytest.mark.parametrize("j", [10, 24, 25, 50, 73, 96])
def test_changing_a_token_never_moves_an_earlier_score(j):
    """tokens[j] is the label of target j-1: targets < j-1 must score the same, bit for bit up to
    float noise, whatever tokens[j] is; later chunks do move (their weights saw tokens[j])."""
    base = run_ttt().per_target
    t2 = toks().copy()
    t2[j] = (int(t2[j]) + 17) % 62 + 2
    other = run_ttt(tokens=t2).per_target
    torch.testing.assert_close(other[:j - 1], base[:j - 1], atol=1e-6, rtol=0)
    nxt = (j - 1) // 24 * 24 + 24  # first target of the next chunk
    if nxt < T:
        assert (other[nxt:] - base[nxt:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- modes, ranks


@pytest.mark.parametrize("mode,opt", [("lora", "sgd"), ("lora", "adam"), ("full", "sgd"), ("full", "adam")])
def test_modes_and_optimizers_adapt_and_count_params(mode, opt):
    cfg = dataclasses.replace(CFG, ttt_mode=mode, ttt_optimizer=opt, ttt_lr=0.01, ttt_targets=("attn.c_q", "mlp.fc"),
                              ttt_first_layer=1)
    r = run_ttt(cfg)
    D, hid = 32, 64  # MICRO_CFG: model_dim 32, mlp_mult 2; one layer (1 of 2) adapted, c_q (D, D) + fc (hid, D)
    want = (4 * D + D * 4) + (4 * D + hid * 4) if mode == "lora" else D * D + hid * D
    assert r.trainable_params == want
    plain = run_ttt(dataclasses.replace(cfg, ttt_chunk_tokens=T)).per_target
    torch.testing.assert_close(r.per_target[:24], plain[:24], atol=1e-6, rtol=0)
    assert (r.per_target[24:] - plain[24:]).abs().max() > 1e-4


def test_ranks_take_contiguous_chunk_slices_from_the_artifact_weights():
    one = run_ttt()
    r0, r1 = run_ttt(rank=0, world=2), run_ttt(rank=1, world=2)
    assert r0.chunks == r1.chunks == 5
    done0, done1 = r0.per_target != 0, r1.per_target != 0
    assert done0[:48].all() and not done0[48:].any() and done1[48:].all() and not done1[:48].any()
    torch.testing.assert_close(r0.per_target[:48], one.per_target[:48], atol=1e-9, rtol=0)
    plain = run_ttt(dataclasses.replace(CFG, ttt_chunk_tokens=T)).per_target
    torch.testing.assert_close(r1.per_target[48:72], plain[48:72], atol=1e-9, rtol=0)  # rank 1 starts fresh


# ----------------------------------------------------------------------------- evaluate stage


def ttt_params(nproc=1, **over):
    doc = yaml.safe_load(PARAMS.format(nproc=nproc))
    doc["evaluate"].update({"ttt_enabled": True, "ttt_chunk_tokens": 48, "ttt_lr": 0.05, "ttt_rank": 2,
                            "ttt_epochs": 1, "ttt_batch_seqs": 2, **over})
    return yaml.safe_dump(doc, sort_keys=False)


def test_run_reports_ttt_score_time_and_the_plain_score(tmp_path):
    root = make_workdir(tmp_path, tiny_model(8), lossless=True)
    cfg = dataclasses.replace(CFG, context=16, stride=4, batch_seqs=4, max_tokens=200, ttt_chunk_tokens=48,
                              ttt_lr=0.05)
    m = run(cfg, paths(root), progress=False)
    plain = bpb.eval_sliding(tiny_model(8), val_tokens(root), wd_tables(), 16, 4, 4, "cpu")
    model, _ = load_model(root / "artifacts/final/model.ptz")
    ref = ttt.eval_ttt(model, val_tokens(root), wd_tables(), cfg, "cpu")
    assert m["val_bpb_pre_ttt"] == pytest.approx(plain["val_bpb"], abs=1e-12)
    assert m["val_bpb"] == pytest.approx(ref.val_bpb, abs=1e-12) and m["val_bpb"] != m["val_bpb_pre_ttt"]
    assert m["ttt_chunks"] == 4 and m["ttt_seconds"] > 0 and m["scored_tokens"] == 192
    assert json.loads((root / "metrics/eval.json").read_text()) == m
    from pgolf.submit.summary import render
    assert f"val_bpb        {m['val_bpb']:.4f}  (score-first TTT, " in render(root / "metrics")


BAD = {
    "chunk shorter than the stride": ({"ttt_chunk_tokens": 3}, "evaluate.ttt_chunk_tokens must be >= evaluate.stride (4)"),
    "rank 0": ({"ttt_rank": 0}, "evaluate.ttt_rank must be >= 1, got 0"),
    "lr 0": ({"ttt_lr": 0.0}, "evaluate.ttt_lr must be positive and finite, got 0.0"),
    "lr negative": ({"ttt_lr": -0.1}, "evaluate.ttt_lr must be positive and finite, got -0.1"),
    "unknown mode": ({"ttt_mode": "qlora"}, "evaluate.ttt_mode must be one of lora, full"),
    "unknown target": ({"ttt_targets": ["attn.c_q", "attn.bogus"]}, "evaluate.ttt_targets must list distinct names among"),
    "comma string": ({"ttt_targets": "attn.c_q,mlp.fc"}, "evaluate.ttt_targets must be a list of str, got str"),
    "unknown optimizer": ({"ttt_optimizer": "lion"}, "evaluate.ttt_optimizer must be one of sgd, adam"),
    "zero epochs": ({"ttt_epochs": 0}, "evaluate.ttt_epochs must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_ttt_params_stop_at_the_gate_naming_the_param(tmp_path, case):
    root = make_workdir(tmp_path, tiny_model(6))
    over, message = BAD[case]
    (root / "params.yaml").write_text(ttt_params(**over))
    with pytest.raises(ConfigError) as e:
        gate(root)
    assert str(e.value).startswith(f"{root / 'params.yaml'}: ") and message in str(e.value)


def test_a_first_layer_past_the_artifacts_model_is_named(tmp_path, monkeypatch, capsys):
    """The gate checks evaluate.ttt_first_layer against model.num_layers; an artifact of another
    model (not this run's) is caught where the adapters are attached."""
    root = make_workdir(tmp_path, tiny_model(6))
    (root / "params.yaml").write_text(ttt_params(ttt_first_layer=2))
    gate(root)
    monkeypatch.chdir(root)
    rc = stage.main()
    err = capsys.readouterr().err
    assert rc == 1 and "evaluate.ttt_first_layer must be < the artifact model's 2 layers" in err, err
    assert not (root / "metrics/eval.json").exists()


def test_stage_under_torchrun_two_ranks_sums_the_rank_slices(tmp_path):
    """2 gloo ranks: each adapts over its own half of the chunks; eval.json's val_bpb is the two
    in-process rank results summed."""
    root = make_workdir(tmp_path, tiny_model(9), nproc=2)
    (root / "params.yaml").write_text(ttt_params(nproc=2))
    gate(root)
    m = run_stage(root)
    from pgolf import config
    cfg = config.load("evaluate", root / "params.yaml")
    nll = nbytes = 0.0
    for rank in (0, 1):
        model, _ = load_model(root / "artifacts/final/model.ptz")
        r = ttt.eval_ttt(model, val_tokens(root), wd_tables(), cfg, "cpu", rank=rank, world=2)
        nll, nbytes = nll + r.val_loss * r.scored_tokens, nbytes + r.scored_bytes
    assert m["world_size"] == 2 and m["ttt_chunks"] == 4
    assert m["val_bpb"] == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)


# ----------------------------------------------------------------------------- AsymLogit rescale


def _softcap_model(seed=1):
    from conftest import MICRO_CFG

    # caps of 2 bind on the micro model's logits (at 30 they would change nothing visible)
    return tiny_model(seed, dataclasses.replace(MICRO_CFG, logit_softcap_learned=True, logit_softcap=2.0,
                                                logit_softcap_neg=2.0))


def test_asym_logit_adapts_the_softcaps_score_first_and_only_when_on():
    cfg = dataclasses.replace(CFG, ttt_asym_logit=True)
    m = _softcap_model()
    caps0 = (m.softcap_pos.item(), m.softcap_neg.item())
    r = ttt.eval_ttt(m, toks(), tiny_tables(), cfg, "cpu", record=True)
    assert (m.softcap_pos.item(), m.softcap_neg.item()) != caps0  # adapted
    assert r.trainable_params == run_ttt().trainable_params + 2
    off = _softcap_model()
    r_off = ttt.eval_ttt(off, toks(), tiny_tables(), CFG, "cpu", record=True)
    assert (off.softcap_pos.item(), off.softcap_neg.item()) == caps0  # frozen without the knob
    torch.testing.assert_close(r.per_target[:24], r_off.per_target[:24], atol=1e-6, rtol=0)  # chunk 0: before any update
    assert (r.per_target[24:] - r_off.per_target[24:]).abs().max() > 1e-3  # later chunks see the adapted caps


def test_asym_logit_without_learned_softcaps_is_refused():
    from pgolf.config import ConfigError, ModelConfig, check_across

    with pytest.raises(ConfigError, match="evaluate.ttt_asym_logit needs model.logit_softcap_learned"):
        check_across({"model": ModelConfig(), "evaluate": dataclasses.replace(CFG, ttt_asym_logit=True)})
    with pytest.raises(ConfigError, match="ttt_asym_logit needs an artifact model with learned softcaps"):
        run_ttt(dataclasses.replace(CFG, ttt_asym_logit=True))
