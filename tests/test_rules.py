"""pgolf.submit.rules on fake finished runs (tests/_fake_run.py) with known figures: each rule passes on
the run as built and fails when its one figure is moved past the limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _fake_run import finished_run, update_metric
from conftest import tiny_model
from pgolf.submit import rules


@pytest.fixture
def run(tmp_path) -> Path:
    return finished_run(tmp_path / "run")


def _by_name(root: Path) -> dict:
    return {r.name: r for r in rules.check(root)}


def test_every_rule_passes_on_a_good_run_with_its_figure(run):
    r = _by_name(run)
    assert list(r) == ["size", "train_time", "eval_time", "hessians", "eval_once", "causal"]
    assert all(x.passed for x in r.values()), rules.report(list(r.values()))
    script = (run / "artifacts/final/train_gpt.py").stat().st_size
    assert f"+ code {script:,} (packed train_gpt.py); cap 16,000,000" in r["size"].figure
    assert r["train_time"].figure.startswith("1.5 s of training") and "3 accumulation(s)" in r["hessians"].figure
    assert "262,144 targets scored, 262,144 expected" in r["eval_once"].figure
    assert "by at most 0.0e+00" in r["causal"].figure and "softmax over 64 logits (vocabulary 64)" in r["causal"].figure
    assert rules.report(list(r.values())).startswith("rules self-check: all 6 passed")


@pytest.mark.parametrize("name, metric, kv, figure", [
    ("size", "size", {"model_bytes": 16_000_000}, "16,0"),
    ("size", "size", {"code_count": "raw evaluation files"}, "code counted raw"),
    ("train_time", "train", {"train_seconds": 600.5}, "600.5 s of training"),
    ("eval_time", "eval", {"eval_seconds": 601.0}, "601.0 s of evaluation"),
    ("hessians", "train", {"hessian_accumulations": 0}, "0 accumulation(s)"),
    ("eval_once", "eval", {"scored_tokens": 262_080}, "262,080 targets scored, 262,144 expected"),
    ("eval_once", "eval", {"stride": 512}, "stride 512 <= context 256"),
])
def test_each_rule_fails_past_its_limit(run, name, metric, kv, figure):
    update_metric(run, metric, **kv)
    r = _by_name(run)
    assert not r[name].passed and figure in r[name].figure
    assert all(x.passed for n, x in r.items() if n != name)
    assert f"FAILED ({name})" in rules.report(list(r.values()))


def test_limits_are_inclusive(run):
    update_metric(run, "train", train_seconds=600.0)
    update_metric(run, "eval", eval_seconds=600.0)
    assert _by_name(run)["train_time"].passed and _by_name(run)["eval_time"].passed


def test_hessians_collected_after_the_clock_fail(run):
    (run / "artifacts/train/train.log").write_text("hessian: no step captured one; took one extra micro-batch\n")
    r = _by_name(run)["hessians"]
    assert not r.passed and "after the training clock stopped" in r.figure


def test_calibration_hessians_are_reported_after_the_clock(run):
    """train.hessian_source calibration (PR #2135's GPTQ calibration): the rule passes on >= 1 batch and
    says they came after the training clock with their seconds; train_time names those seconds too."""
    update_metric(run, "train", hessian_source="calibration", calibration_batches=32, calibration_seqs=48,
                  calibration_rows=3_145_728, calibration_seconds=6.9)
    r = _by_name(run)
    assert r["hessians"].passed and "32 batch(es) x 48 seqs" in r["hessians"].figure
    assert "after the training clock stopped (6.9 s, not in train_seconds" in r["hessians"].figure
    assert "3,145,728 rows" in r["hessians"].figure
    assert "+ 6.9 s of calibration Hessians after the clock, not included" in r["train_time"].figure
    update_metric(run, "train", calibration_batches=0)
    assert not _by_name(run)["hessians"].passed


def test_missing_artifact_fails_causal(run):
    (run / "artifacts/final/model.ptz").unlink()
    r = _by_name(run)["causal"]
    assert not r.passed and "model.ptz: not found" in r.figure


def test_causal_probe_catches_a_model_that_sees_the_future():
    model = tiny_model()

    def leaky(x):  # (1, T) -> (1, T, V): position t also sees token t+1
        return model.forward_logits(x) + 0.1 * torch.roll(x, -1, dims=1)[..., None].float()

    good = rules.causal_probe(model.forward_logits, 64, 32)
    assert good == {"max_change": 0.0, "width": 64, "finite": True} and rules.judge_causal(good, 64).passed
    bad = rules.causal_probe(leaky, 64, 32)
    assert bad["max_change"] > 0.01 and not rules.judge_causal(bad, 64).passed
    assert not rules.judge_causal({**good, "width": 63}, 64).passed  # not the full vocabulary
    assert not rules.judge_causal({**good, "finite": False}, 64).passed


@pytest.mark.parametrize("val_tokens, max_tokens, context, want", [
    (300_001, 262_144, 256, 262_144), (1000, 0, 256, 768), (1025, 0, 256, 1024), (1024, 0, 256, 768),
    (500, 1000, 128, 384),
])
def test_expected_targets(val_tokens, max_tokens, context, want):
    assert rules.expected_targets(val_tokens, max_tokens, context) == want


def test_missing_inputs_are_named(run, capsys):
    (run / "artifacts/train/train.log").unlink()
    with pytest.raises(rules.RulesError, match="train.log: train log missing"):
        rules.check(run)
    (run / "metrics/eval.json").write_text("{}")
    assert rules.main(["--root", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rules: error: ") and "eval.json: lacks eval_seconds, scored_tokens" in err


# ----------------------------------------------------------------------------- ngram_causal (evaluate.ngram_tilt)


def _tilted(run: Path, shards: bool = True) -> Path:
    """The fake run with evaluate.ngram_tilt on (params.yaml and its checked values) and val shards
    whose text repeats (so the tilt hints)."""
    import yaml

    from pgolf import config
    from pgolf.shared import checked
    from pgolf.shared.shards import write_shard

    doc = yaml.safe_load((run / "params.yaml").read_text())
    doc["evaluate"].update(ngram_tilt=True, ngram_order=4)
    (run / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    checked.write({"evaluate": config.from_doc(doc, "evaluate")}, run)
    if shards:
        rng = np.random.default_rng(0)
        block = rng.integers(0, 64, 500)
        toks = np.concatenate([block, rng.integers(0, 64, 100), block, block])
        write_shard(run / "data/shards/fineweb_val_000000.bin", toks[:800])
        write_shard(run / "data/shards/fineweb_val_000001.bin", toks[800:])
    return run


def test_ngram_causal_rule_only_with_the_tilt(run):
    r = _by_name(_tilted(run))
    assert list(r)[-1] == "ngram_causal" and all(x.passed for x in r.values()), rules.report(list(r.values()))
    fig = r["ngram_causal"].figure
    assert fig.startswith("0 earlier hint(s) moved") and "of the first 1,599 validation targets hinted" in fig
    assert "order 4, threshold 0.8, boost 2.625" in fig and int(fig.split("; ")[1].split(" of")[0]) > 500
    assert rules.report(list(r.values())).startswith("rules self-check: all 7 passed")


def test_ngram_causal_rule_catches_a_leaky_state(run, monkeypatch):
    from pgolf.evaluate import ngram_tilt

    real = ngram_tilt.stream_hints

    def leaky(tokens, order, threshold):  # hint i sees its own target tokens[i + 1]
        return np.where(real(tokens, order, threshold) >= 0, np.asarray(tokens[1:], dtype=np.int32), -1)

    monkeypatch.setattr(ngram_tilt, "stream_hints", leaky)
    r = _by_name(_tilted(run))["ngram_causal"]
    assert not r.passed and not r.figure.startswith("0 ")


def test_ngram_causal_rule_fails_without_validation_tokens(run):
    r = _by_name(_tilted(run, shards=False))["ngram_causal"]
    assert not r.passed and "no validation tokens to probe" in r.figure


# ----------------------------------------------------------------------------- ttt_score_first (evaluate.ttt_enabled)

TTT_OVER = {"context": 16, "stride": 4, "batch_seqs": 4, "ttt_enabled": True, "ttt_rank": 2, "ttt_lr": 0.05,
            "ttt_chunk_tokens": 48, "ttt_epochs": 1, "ttt_batch_seqs": 2, "ttt_doc_batch": 4, "ttt_doc_chunk": 8,
            "ttt_prefix_docs": 0, "ttt_global_chunk_tokens": 64, "ttt_optimizer": "adam", "ttt_alpha": 8.0}


def _ttt_run(run: Path, scheme: str) -> Path:
    """The fake run with evaluate.ttt_enabled (scheme stream or phased, micro settings) and val
    shards of 1,600 random tokens (documents wherever BOS falls)."""
    import yaml

    from pgolf import config
    from pgolf.shared import checked
    from pgolf.shared.shards import write_shard

    doc = yaml.safe_load((run / "params.yaml").read_text())
    doc["evaluate"].update(TTT_OVER, ttt_scheme=scheme)
    (run / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    checked.write({"evaluate": config.from_doc(doc, "evaluate")}, run)
    write_shard(run / "data/shards/fineweb_val_000000.bin", np.random.default_rng(0).integers(0, 64, 1600))
    return run


@pytest.mark.parametrize("scheme", ["stream", "phased"])
def test_ttt_score_first_probes_the_runs_own_adaptation(run, scheme):
    r = _by_name(_ttt_run(run, scheme))["ttt_score_first"]
    assert r.passed, r.figure
    assert r.figure.startswith(f"{scheme} TTT run twice on the first 1,585 validation tokens"), r.figure
    kept = int(r.figure.split(": the ")[1].split(" targets")[0].replace(",", ""))
    assert 100 < kept < 1584, r.figure  # targets before the cut, and some after it


def test_ttt_score_first_catches_a_document_scored_after_training_on_itself(run, monkeypatch):
    from pgolf.evaluate import phased

    real = phased.run_batch

    def cheat(*args, **kw):  # adapt on the whole batch first, then score with those adapters
        real(*args[:9], None, **kw)
        return real(*args, **kw)

    monkeypatch.setattr(phased, "run_batch", cheat)
    r = _by_name(_ttt_run(run, "phased"))["ttt_score_first"]
    assert not r.passed and "targets scored before them moved by at most" in r.figure, r.figure
