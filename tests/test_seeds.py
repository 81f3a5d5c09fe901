"""pgolf.submit.seeds: Student's t against known values, the seed summary on fake runs with known answers,
and the bad inputs (fewer than 2 runs, runs with different params, a shared seed)."""

from __future__ import annotations

import json
import math

import pytest

from pgolf.submit import seeds as S

LN2 = math.log(2)


@pytest.mark.parametrize("t, df, want", [
    (1.0, 1, 0.75),                      # Cauchy: 1/2 + atan(t)/pi
    (-1.0, 1, 0.25),
    (0.0, 7, 0.5),
    (63.65674, 1, 0.995),                # two-sided 1 % critical values of the t table
    (6.964557, 2, 0.99),
    (3.746947, 4, 0.99),
    (2.998, 7, 0.99),
    (2.228139, 10, 0.975),
    (1.697261, 30, 0.95),
    (-2.527977, 20, 0.01),
    (1.959964, 1e7, 0.975),              # -> the normal distribution
])
def test_t_cdf_matches_tables(t, df, want):
    assert S.t_cdf(t, df) == pytest.approx(want, abs=2e-5 if t == 2.998 else 2e-7)


@pytest.mark.parametrize("t", [0.3, 1.5, 6.0622, 40.0])
def test_t_cdf_df2_closed_form(t):
    assert S.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_betainc_special_cases():
    assert S.betainc(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert S.betainc(2.5, 1.0, 0.4) == pytest.approx(0.4 ** 2.5, abs=1e-14)
    assert S.betainc(2.0, 3.0, 0.2) + S.betainc(3.0, 2.0, 0.8) == pytest.approx(1.0, abs=1e-14)
    with pytest.raises(ValueError, match="degrees of freedom"):
        S.t_cdf(1.0, 0)


def _runs(gains, baseline=1.2, extra=None):
    """Runs whose improvement in nats/token is exactly `gains` (bytes per token = 1/ln 2)."""
    out = []
    for i, g in enumerate(gains):
        params = {"train.seed": 100 + i, "train.iterations": 150, **((extra or {}).get(i, {}))}
        out.append(S.Run(f"exp-{i}", f"{i:040x}", params, val_loss=(baseline - g), val_bpb=baseline - g,
                         bytes_per_token=1 / LN2))
    return out


def test_summary_meets_the_rule():
    s = S.summarize(_runs([0.010, 0.011, 0.012]), baseline_bpb=1.2)
    assert s["n"] == 3 and s["df"] == 2
    assert s["improvement_nats_mean"] == pytest.approx(0.011) and s["improvement_nats_std"] == pytest.approx(0.001)
    t = 0.006 / (0.001 / math.sqrt(3))
    assert s["t"] == pytest.approx(t)
    assert s["p_value"] == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)))  # 0.00457
    assert s["p_value"] < 0.01 and s["significant"] is True
    assert s["val_bpb_mean"] == pytest.approx(1.2 - 0.011) and s["val_bpb_std"] == pytest.approx(0.001)
    assert "MEETS the rule" in S.render(s)


def test_summary_mean_above_threshold_but_not_significant():
    s = S.summarize(_runs([0.010, 0.012, 0.014]), baseline_bpb=1.2)
    assert s["improvement_nats_mean"] == pytest.approx(0.012)
    assert s["p_value"] == pytest.approx(0.01307, abs=1e-5) and s["significant"] is False
    assert "does NOT meet the rule" in S.render(s)


def test_summary_worse_than_baseline_fails():
    s = S.summarize(_runs([-0.01, -0.02]), baseline_bpb=1.2)
    assert s["t"] == pytest.approx(-4.0)  # (-0.015 - 0.005) / (0.00707 / sqrt 2), df 1: Cauchy
    assert s["p_value"] == pytest.approx(0.5 + math.atan(4.0) / math.pi) and s["significant"] is False


def test_nats_use_each_runs_bytes_per_token():
    r = S.Run("a", "r", {"train.seed": 1}, 2.0, 1.0, bytes_per_token=3.0)
    r2 = S.Run("b", "r2", {"train.seed": 2}, 2.0, 1.0, bytes_per_token=3.0)
    s = S.summarize([r, r2], baseline_bpb=1.01)
    assert s["improvement_nats_mean"] == pytest.approx(0.01 * LN2 * 3.0)


def test_fewer_than_two_runs_is_an_error():
    with pytest.raises(S.SeedsError, match="1 run.*at least 2"):
        S.summarize(_runs([0.01]), 1.2)
    with pytest.raises(S.SeedsError, match="0 run"):
        S.summarize([], 1.2)


def test_runs_with_different_params_are_an_error():
    runs = _runs([0.01, 0.02, 0.03], extra={2: {"train.iterations": 200}})
    with pytest.raises(S.SeedsError, match=r"exp-0 and exp-2 differ .*train.iterations = 150 vs 200"):
        S.summarize(runs, 1.2)


def test_runs_sharing_a_seed_are_an_error():
    runs = _runs([0.01, 0.02])
    runs[1] = S.Run("dup", "x", {**runs[1].params, "train.seed": 100}, 1.0, 1.0, 1.0)
    with pytest.raises(S.SeedsError, match="share a seed"):
        S.summarize(runs, 1.2)


def _exp(name, seed, bpb, ev=True):
    data = {"params": {"params.yaml": {"data": {"train": {"seed": seed, "iterations": 10}}}},
            "metrics": {"metrics/eval.json": {"data": {"val_bpb": bpb, "val_loss": bpb * 2, "scored_tokens": 100,
                                                       "scored_bytes": 250}}} if ev else {}}
    return {"rev": f"{seed:040x}", "name": name, "data": data}


def test_runs_from_exp_show_reads_experiments_not_baselines():
    doc = [{"rev": "workspace", "name": None, "data": _exp("ws", 1, 1.0)["data"], "experiments": None},
           {"rev": "a" * 40, "name": "main", "data": _exp("main", 1, 1.0)["data"],
            "experiments": [{"revs": [_exp("s1", 1, 1.1)]}, {"revs": [_exp("s2", 2, 1.2)]},
                            {"revs": [_exp("queued", 3, 0, ev=False)]}]}]
    runs = S.runs_from_exp_show(json.loads(json.dumps(doc)))
    assert [(r.name, r.seed, r.val_bpb, r.bytes_per_token) for r in runs] == [("s1", 1, 1.1, 2.5), ("s2", 2, 1.2, 2.5)]
    assert [r.name for r in S.runs_from_exp_show(doc, ["s2"])] == ["s2"]
    with pytest.raises(S.SeedsError, match="nope: not found"):
        S.runs_from_exp_show(doc, ["s1", "nope"])


def test_missing_train_log_of_an_experiment_is_named(monkeypatch, tmp_path):
    import dvc.api

    def gone(path, repo=None, rev=None):
        raise FileNotFoundError(f"{path} at {rev}")

    monkeypatch.setattr(dvc.api, "read", gone)
    run = _runs([0.01])[0]
    with pytest.raises(S.SeedsError, match="experiment exp-0: train log artifacts/train/train.log not readable"):
        S.read_log(tmp_path, run)


def test_out_folder_is_written_whole(tmp_path):
    s = S.summarize(_runs([0.010, 0.011]), 1.2)
    S.write_out(tmp_path / "seeds", s, {"train_seed100.log": "a\n", "train_seed101.log": "b\n"})
    assert sorted(p.name for p in (tmp_path / "seeds").iterdir()) == ["seeds.json", "train_seed100.log",
                                                                      "train_seed101.log"]
    assert json.loads((tmp_path / "seeds" / "seeds.json").read_text())["n"] == 2
