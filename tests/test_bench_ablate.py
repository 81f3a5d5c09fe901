"""The ablation runner (bench/ablate.py) on CPU, with a stand-in `dvc` that records what it was
given: params.yaml per row (profile + common + row overrides), which stages ran, the metrics and
the trained-weights hash taken per row, failed rows kept without stale metrics, the budget."""

from __future__ import annotations

import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import ablate as A  # noqa: E402
from pgolf import config  # noqa: E402
from pgolf.config import QuantizeConfig  # noqa: E402
from pgolf.params import profiles  # noqa: E402

# A fake `python -m dvc repro`: "trains" when model/train params differ from the last run, writes
# metrics from the params, and fails when quantize.damp is above 0.5 (a value the params accept: a
# stage failing mid-pipeline).
FAKE_DVC = textwrap.dedent('''
    import json, pathlib, sys, yaml
    p = yaml.safe_load(pathlib.Path("params.yaml").read_text())
    state = pathlib.Path("last_train.json")
    key = json.dumps([p["model"], p["train"]], sort_keys=True)
    if not state.exists() or state.read_text() != key:
        print("Running stage 'train':")
        state.write_text(key)
        md5 = __import__("hashlib").md5(key.encode()).hexdigest()
        pathlib.Path("dvc.lock").write_text(yaml.safe_dump(
            {"stages": {"train": {"outs": [{"path": "artifacts/train", "md5": md5}]}}}))
    else:
        print("Stage 'train' is cached - skipping run, checking out outputs")
    print("Running stage 'quantize':")
    if p["quantize"]["damp"] > 0.5:
        print("quantize: error: damp"); sys.exit(1)
    q = pathlib.Path("artifacts/quant"); q.mkdir(parents=True, exist_ok=True)
    (q / "quant.pgt").write_text(json.dumps([p["quantize"]["damp"], p["train"]["seed"]]))
    m = pathlib.Path("metrics"); m.mkdir(exist_ok=True)
    (m / "train.json").write_text(json.dumps({"steps": p["train"]["iterations"], "val_bpb_float": 1.5,
                                              "train_seconds": p["train"]["max_wallclock_seconds"]}))
    bpb = 1.25 + p["quantize"]["damp"] + (p["model"]["model_dim"] - 128) * 1e-4 + (p["train"]["seed"] - 1337) * 1e-6
    ev = p["evaluate"]
    ttt, tilt = 0.1 * ev["ttt_enabled"], 0.01 * ev["ngram_tilt"]  # what TTT and the tilt take off
    out = {"val_bpb": bpb - ttt - tilt, "scored_tokens": 1000, "scored_bytes": 4000, "ignored": 1}
    if ev["ttt_enabled"]:
        out["val_bpb_pre_ttt"] = bpb - tilt
    if ev["ngram_tilt"]:
        out["val_bpb_untilted"] = bpb - ttt
    out.update({k.replace("bpb", "loss"): v * 0.693 * 4.0 for k, v in list(out.items()) if "bpb" in k})
    (m / "eval.json").write_text(json.dumps(out))
''')


@pytest.fixture
def repo(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    (tmp_path / "dvc").mkdir()
    (tmp_path / "dvc" / "__init__.py").write_text("")  # a regular package: shadows the installed dvc
    (tmp_path / "dvc" / "__main__.py").write_text(FAKE_DVC)
    monkeypatch.setattr(A, "REPO", tmp_path)
    return tmp_path


QUICK = ["--quick", "--seeds", "1337"]


def rows_file(path: Path, rows: list[dict], common: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"base": "tiny", "common": common or {"train.iterations": 7}, "rows": rows}))
    return path


def test_rows_run_through_dvc_and_a_post_training_row_reuses_the_weights(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [
        {"name": "base"},
        {"name": "damp", "set": {"quantize.damp": 0.25}},
        {"name": "wide", "set": {"model.model_dim": 192}},
    ])
    out = tmp_path / "out.json"
    assert A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"), *QUICK]) == 0
    res = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert res["base"]["ran"] == ["train", "quantize"] and res["damp"]["ran"] == ["quantize"]
    assert res["damp"]["train_md5"] == res["base"]["train_md5"] != res["wide"]["train_md5"]
    assert res["damp"]["eval.val_bpb"] == pytest.approx(1.5) and res["base"]["train.steps"] == 7
    assert "eval.ignored" not in res["base"]
    params = yaml.safe_load((repo / "params.yaml").read_text())  # the last row's params, every key
    want = profiles.resolve("tiny", repo)
    want["model"]["model_dim"], want["train"]["iterations"], want["train"]["seed"] = 192, 7, 1337
    assert params == want
    assert params["quantize"]["damp"] == QuantizeConfig().damp  # tiny.yaml leaves it at the record default
    config.load_all(params)  # what the params stage will read
    assert "Running stage 'quantize'" in (tmp_path / "logs" / "damp_seed1337.log").read_text()


def test_a_failed_row_keeps_its_error_and_no_stale_metrics(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "ok"}, {"name": "bad", "set": {"quantize.damp": 0.75}}])
    out = tmp_path / "out.json"
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"), *QUICK])
    bad = json.loads(out.read_text())["rows"][1]
    assert bad["rc"] == 1 and "quantize: error: damp" in bad["error_tail"]
    assert not any(k.startswith("eval.") for k in bad)


def test_an_override_of_an_unknown_key_stops_before_any_run(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "ok"}, {"name": "typo", "set": {"model.model_dimm": 1}}])
    with pytest.raises(A.RowsError, match=r"typo: 'model.model_dimm' is not a key of profiles/tiny.yaml"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json")])
    assert not (repo / "params.yaml").exists()


def test_a_value_the_params_stage_would_refuse_stops_before_any_run(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "ok"}, {"name": "neg", "set": {"quantize.damp": -1.0}},
                                              {"name": "sched", "set": {"train.seq_len_schedule": "1024@0.3"}}])
    with pytest.raises(A.RowsError, match=r"neg: profiles/tiny.yaml .*quantize.damp must be positive and finite"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json")])
    with pytest.raises(A.RowsError, match=r"sched: .*train.seq_len_schedule must be a list of \[int, float\]"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json"), "--only", "sched"])
    assert not (repo / "params.yaml").exists()


def test_a_row_profile_of_only_differences_is_resolved_before_its_overrides(repo, tmp_path):
    spec = {"base": "tiny", "common": {"train.iterations": 3},
            "rows": [{"name": "f", "profile": "frontier", "set": {"quantize.damp": 0.5}}]}
    params = A.params_for(spec, spec["rows"][0])
    want = profiles.resolve("frontier", repo)
    assert params["model"] == want["model"] and params["model"]["smear_bos_mask"] is True
    assert params["train"] == {**want["train"], "iterations": 3}
    assert params["quantize"] == {**want["quantize"], "damp": 0.5} and params["prepare"] == want["prepare"]
    with pytest.raises(A.RowsError, match=r"f: 'train.nope' is not a key of profiles/frontier.yaml"):
        A.params_for(spec, {**spec["rows"][0], "set": {"train.nope": 1}})
    with pytest.raises(A.RowsError, match=r"profiles/nope.yaml: no such profile"):
        A.params_for(spec, {"name": "x", "profile": "nope"})


def test_rows_need_unique_names(tmp_path):
    with pytest.raises(A.RowsError, match="unique name"):
        A.load_rows(rows_file(tmp_path / "r.yaml", [{"name": "a"}, {"name": "a"}]))


def test_budget_skips_a_row_slower_than_the_time_left():
    done = [{"name": "a", "ran": ["train"], "seconds": 150.0}, {"name": "b", "ran": ["quantize"], "seconds": 60.0}]
    assert A.too_slow(done, trains=True, left=149.0) and not A.too_slow(done, trains=True, left=151.0)
    assert not A.too_slow(done, trains=False, left=61.0) and A.too_slow(done, trains=False, left=59.0)
    assert not A.too_slow([], trains=True, left=1.0)  # nothing to go by: the first row runs


def test_the_committed_rows_files_name_real_keys():
    files = sorted((ROOT / "bench").glob("ablation_*.yaml"))
    assert len(files) >= 5
    for path in files:
        spec = A.load_rows(path)
        for row in spec["rows"]:
            A.params_for(spec, row)


def test_resume_keeps_finished_rows_and_runs_only_the_rest(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [
        {"name": "base"}, {"name": "bad", "set": {"quantize.damp": 0.75}},
        {"name": "damp", "set": {"quantize.damp": 0.25}}])
    out, logs = tmp_path / "out.json", tmp_path / "logs"
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(logs), "--only", "base,bad", *QUICK])
    first = json.loads(out.read_text())["rows"][0]
    (logs / "base_seed1337.log").unlink()
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(logs), "--resume", *QUICK])
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["rows"]] == ["base", "bad", "damp"] and res["rows"][0] == first
    assert not (logs / "base_seed1337.log").exists() and len(res["resumed"]) == 1  # base was not rerun
    assert res["rows"][1]["rc"] == 1 and res["rows"][2]["ran"] == ["quantize"]  # the failed row ran again
    assert res["rows"][2]["train_md5"] == first["train_md5"]


def test_resume_refuses_rows_that_ran_with_other_params_than_the_rows_file_gives_now(repo, tmp_path):
    """A profile or override changed between the calls: the finished seed and the new one would not
    be the same arm. The hash leaves out train.seed, so every seed of one row shares it."""
    spec = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "damp", "set": {"quantize.damp": 0.25}}])
    out, logs = tmp_path / "out.json", tmp_path / "logs"
    A.main(["--rows", str(spec), "--out", str(out), "--log-dir", str(logs), *QUICK])
    A.main(["--rows", str(spec), "--out", str(out), "--log-dir", str(logs), "--resume", "--quick",
            "--seeds", "1337,42"])
    res = json.loads(out.read_text())
    assert len({r["params_md5"] for r in res["rows"] if r["name"] == "damp"}) == 1 and len(res["rows"]) == 4
    rows_file(spec, [{"name": "base"}, {"name": "damp", "set": {"quantize.damp": 0.3}}])
    before = out.read_text()
    with pytest.raises(A.RowsError, match=r"out.json: row 'damp' seed 1337 ran with other params or score than the rows file"):
        A.main(["--rows", str(spec), "--out", str(out), "--log-dir", str(logs), "--resume", "--quick",
                "--seeds", "1337,42,7"])
    assert out.read_text() == before


def test_resume_refuses_a_file_that_is_not_an_ablation_result(repo, tmp_path):
    out = tmp_path / "out.json"
    out.write_text("{}")
    with pytest.raises(A.RowsError, match=r"out.json: not an ablation result"):
        A.main(["--rows", str(rows_file(tmp_path / "r.yaml", [{"name": "a"}])), "--out", str(out), "--resume"])


def test_common_on_the_command_line_overrides_the_file_for_every_row_and_is_recorded(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "a"}, {"name": "b", "set": {"train.iterations": 9}}])
    out = tmp_path / "out.json"
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"),
            "--common", "train.iterations=5", "train.grad_accum_steps=2", *QUICK])
    res = json.loads(out.read_text())
    assert res["common"] == {"train.iterations": 5, "train.grad_accum_steps": 2}
    assert [r["train.steps"] for r in res["rows"]] == [5, 9]  # a row's own set still wins
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["grad_accum_steps"] == 2
    for bad, msg in (("train.iterations", "want section.key=value"), ("train.nope=1", "'train.nope' is not a key")):
        with pytest.raises(A.RowsError, match=msg):
            A.main(["--rows", str(rows), "--out", str(tmp_path / "o2.json"), "--common", bad])


# ----------------------------------------------------------------------------- the protocol


def test_by_default_every_row_runs_two_seeds_paired_and_is_tested_against_the_baseline(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "narrow", "set": {"model.model_dim": 64}},
                                              {"name": "damp", "set": {"quantize.damp": 0.02}}],
                     common={"train.iterations": 7, "train.max_wallclock_seconds": 180.0})
    out = tmp_path / "out.json"
    assert A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    res = json.loads(out.read_text())
    assert [(r["name"], r["seed"]) for r in res["rows"]] == [
        ("base", 1337), ("narrow", 1337), ("damp", 1337), ("base", 42), ("narrow", 42), ("damp", 42)]
    assert res["claims"] and res["baseline"] == "base"
    narrow, damp = res["comparisons"]["narrow"], res["comparisons"]["damp"]
    # model_dim 64 lowers the fake bpb by 0.0064 on both seeds exactly: sd 0, far above 0.005 nats
    assert narrow["seeds"] == [1337, 42] and narrow["improvement_nats_mean"] == pytest.approx(0.0064 * math.log(2) * 4)
    assert narrow["significant"] and narrow["verdict"] == "better" and narrow["trained_long_enough"]
    assert damp["verdict"] == "not shown better" and damp["improvement_nats_mean"] < 0
    # reverse: the baseline against each row (does the part a row turns off help?)
    assert damp["reverse"]["verdict"] == "better" and damp["reverse"]["seeds"] == [1337, 42]
    assert damp["reverse"]["improvement_nats_mean"] == pytest.approx(-damp["improvement_nats_mean"])
    assert narrow["reverse"]["verdict"] == "not shown better"


def test_a_run_resumed_on_another_gpu_model_makes_no_claim(repo, tmp_path, monkeypatch):
    """Seed 1337 on one GPU model, seed 42 resumed on another: the test still runs, the verdict is
    "no claim" and both models are named; rows from before `gpu` was recorded count as the first
    environment's."""
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "narrow", "set": {"model.model_dim": 64}}],
                     common={"train.iterations": 7, "train.max_wallclock_seconds": 180.0})
    out, args = tmp_path / "out.json", ["--rows", str(rows), "--log-dir", str(tmp_path / "logs")]
    gpu = {"gpu": "H100"}
    monkeypatch.setattr(A, "versions", lambda: {"torch": "t", **gpu})
    A.main([*args, "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["comparisons"]["narrow"]["verdict"] == "better" and res["comparisons"]["narrow"]["gpus"] == ["H100"]
    res["rows"] = [{k: v for k, v in r.items() if k != "gpu"} for r in res["rows"] if r["seed"] == 1337]
    out.write_text(json.dumps(res))
    gpu["gpu"] = "H200"
    A.main([*args, "--out", str(out), "--resume"])
    narrow = json.loads(out.read_text())["comparisons"]["narrow"]
    assert narrow["significant"] and narrow["gpus"] == ["H100", "H200"] and narrow["verdict"] == "no claim"


def test_a_plan_below_the_protocol_is_refused_unless_quick_and_quick_makes_no_claims(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "narrow", "set": {"model.model_dim": 64}}],
                     common={"train.iterations": 7, "train.max_wallclock_seconds": 30.0})
    out = tmp_path / "out.json"
    with pytest.raises(A.RowsError, match=r"base: train.max_wallclock_seconds 30.0 is below the protocol's 180.0 s"):
        A.main(["--rows", str(rows), "--out", str(out)])
    with pytest.raises(A.RowsError, match=r"at least 2 distinct seeds"):
        A.main(["--rows", str(rows), "--out", str(out), "--seeds", "1337", "--min-train-seconds", "10"])
    assert not out.exists() and not (repo / "params.yaml").exists()
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--quick"])
    res = json.loads(out.read_text())
    assert not res["claims"] and res["comparisons"]["narrow"]["verdict"] == "no claim"


def test_step_based_rows_are_judged_on_their_measured_training_time(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "narrow", "set": {"model.model_dim": 64}}])
    out = tmp_path / "out.json"  # tiny: step-based (max_wallclock_seconds 0), the fake reports 0 s of training
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs")])
    narrow = json.loads(out.read_text())["comparisons"]["narrow"]
    assert narrow["significant"] and not narrow["trained_long_enough"] and narrow["verdict"] == "no claim"


def test_a_baseline_that_is_not_a_row_is_refused(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}])
    with pytest.raises(A.RowsError, match=r"--baseline 'nope' is not one of the rows run \(base\)"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json"), "--baseline", "nope"])


def test_the_result_records_each_trained_shard_folder_it_can_describe(repo, tmp_path):
    for name, docs in (("shards_a", 5), ("shards_b", 9)):
        (repo / name).mkdir()
        (repo / name / "proxy_shards.json").write_text(json.dumps({"docs": docs}))
    rows = rows_file(tmp_path / "rows.yaml", [
        {"name": "a", "set": {"prepare.corpus": "shards_a"}},
        {"name": "b", "set": {"prepare.corpus": "shards_b"}},
        {"name": "c", "set": {"prepare.corpus": "shards_none"}},
    ])
    out = tmp_path / "out.json"
    assert A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"), *QUICK]) == 0
    assert json.loads(out.read_text())["data"] == {"shards_a": {"docs": 5}, "shards_b": {"docs": 9}}


def test_merge_joins_seeds_run_in_separate_calls_and_tests_them_paired(repo, tmp_path, monkeypatch):
    """Each seed in a call of its own (--quick: one seed, no claims); merged, the rows hold 2 seeds and
    the paired test gives its verdict. A row without `gpu` takes its own call's GPU model, so seeds
    from two GPU models make no claim; a row and seed in two files, or another rows file, is refused."""
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "narrow", "set": {"model.model_dim": 64}}],
                     common={"train.iterations": 7, "train.max_wallclock_seconds": 180.0})
    gpu = {"gpu": "H100"}
    monkeypatch.setattr(A, "versions", lambda: {"torch": "t", **gpu})
    calls = {}
    for seed in (1337, 42):
        calls[seed] = tmp_path / f"s{seed}.json"
        A.main(["--rows", str(rows), "--log-dir", str(tmp_path / "logs"), "--out", str(calls[seed]), "--quick",
                "--seeds", str(seed)])
        assert json.loads(calls[seed].read_text())["comparisons"]["narrow"]["verdict"] == "no test"
    out = tmp_path / "merged.json"
    assert A.main(["--merge", str(calls[1337]), str(calls[42]), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["claims"] and res["seeds"] == [42, 1337] and res["merged_from"] == ["s1337.json", "s42.json"]
    assert res["comparisons"]["narrow"]["seeds"] == [1337, 42] and res["comparisons"]["narrow"]["verdict"] == "better"
    old = json.loads(calls[1337].read_text())  # from before rows recorded their GPU, on another model
    old["rows"] = [{k: v for k, v in r.items() if k != "gpu"} for r in old["rows"]]
    old["environment"]["gpu"] = "H200"
    calls[1337].write_text(json.dumps(old))
    A.main(["--merge", str(calls[1337]), str(calls[42]), "--out", str(out)])
    narrow = json.loads(out.read_text())["comparisons"]["narrow"]
    assert narrow["gpus"] == ["H100", "H200"] and narrow["verdict"] == "no claim"
    changed = json.loads(calls[42].read_text())  # seed 42's narrow row ran with other params
    changed["rows"][1]["params_md5"] = "0" * 32
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(A.RowsError, match=r"row 'narrow' ran with different params in the files"):
        A.main(["--merge", str(calls[1337]), str(tmp_path / "changed.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(A.RowsError, match=r"row 'base' seed 42 finished in two files"):
        A.main(["--merge", str(calls[42]), str(calls[42]), "--out", str(tmp_path / "x.json")])
    other = json.loads(calls[42].read_text()) | {"rows_file": "elsewhere.yaml"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(A.RowsError, match=r"differ in 'rows_file'"):
        A.main(["--merge", str(calls[1337]), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(A.RowsError, match=r"--baseline 'wide' is not one of the merged rows \(base, narrow\)"):
        A.main(["--merge", str(calls[1337]), str(calls[42]), "--out", str(tmp_path / "x.json"), "--baseline", "wide"])
    assert not (tmp_path / "x.json").exists()
    A.main(["--merge", str(calls[42]), str(calls[1337]), "--out", str(out), "--baseline", "narrow"])
    assert json.loads(out.read_text())["comparisons"]["base"]["verdict"] == "no claim"  # two GPU models


# ----------------------------------------------------------------------------- a row's score


def test_a_row_may_compare_the_same_evaluation_before_ttt_or_without_the_tilt(repo, tmp_path):
    """Rows with `score: pre_ttt` / `untilted` and no overrides rerun nothing: their runs are the base's,
    scored before TTT or without the tilt, so the reverse test says what TTT and the tilt give."""
    on = {"train.iterations": 7, "train.max_wallclock_seconds": 180.0, "evaluate.ttt_enabled": True,
          "evaluate.ngram_tilt": True}
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "no_ttt", "score": "pre_ttt"},
                                              {"name": "no_tilt", "score": "untilted"}], common=on)
    out = tmp_path / "out.json"
    assert A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    res = json.loads(out.read_text())
    runs = {(r["name"], r["seed"]): r for r in res["rows"]}
    assert runs["no_tilt", 42]["ran"] == ["quantize"] and runs["no_tilt", 42]["score"] == "untilted"
    assert runs["no_tilt", 42]["params_md5"] == runs["base", 42]["params_md5"]
    nats = math.log(2) * 4  # per bpb, at 4 bytes a token
    for name, gain in (("no_ttt", 0.1), ("no_tilt", 0.01)):
        rev = res["comparisons"][name]["reverse"]
        assert rev["verdict"] == "better" and rev["improvement_nats_mean"] == pytest.approx(gain * nats), name
    with pytest.raises(A.RowsError, match=r"row 'no_tilt' seed 1337 ran with other params or score"):
        changed = rows_file(tmp_path / "changed.yaml", [{"name": "base"}, {"name": "no_tilt"}], common=on)
        A.main(["--rows", str(changed), "--out", str(out), "--resume", "--seeds", "1337,42"])


def test_a_score_the_evaluation_would_not_report_or_an_unknown_one_is_refused(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "no_tilt", "score": "untilted"}])
    with pytest.raises(A.RowsError, match=r"no_tilt: score 'untilted' needs evaluate.ngram_tilt: true"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json"), *QUICK])
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base", "score": "sliding"}])
    with pytest.raises(A.RowsError, match=r"row 'base' has score 'sliding'; one of final, pre_ttt, untilted"):
        A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json"), *QUICK])
    assert not (tmp_path / "o.json").exists()


def test_merge_refuses_a_row_whose_score_differs_between_files(repo, tmp_path):
    on = {"train.iterations": 7, "evaluate.ngram_tilt": True}
    calls = []
    for seed, score in ((1337, "final"), (42, "untilted")):
        rows = rows_file(tmp_path / f"rows{seed}.yaml", [{"name": "base"}, {"name": "b", "score": score}], common=on)
        calls.append(tmp_path / f"s{seed}.json")
        A.main(["--rows", str(rows), "--out", str(calls[-1]), "--log-dir", str(tmp_path / "logs"), "--quick",
                "--seeds", str(seed)])
        doc = json.loads(calls[-1].read_text()) | {"rows_file": "rows.yaml"}
        calls[-1].write_text(json.dumps(doc))
    with pytest.raises(A.RowsError, match=r"row 'b' compares different scores in the files"):
        A.main(["--merge", *map(str, calls), "--out", str(tmp_path / "x.json")])


def test_a_row_a_finished_run_already_had_is_never_skipped_for_time(repo, tmp_path):
    """After the base run, a score row has the base's params and seed (DVC's cache holds it all), so the
    budget runs it even with no time left; a row that needs a run of its own is skipped."""
    rows = rows_file(tmp_path / "rows.yaml", [
        {"name": "base"}, {"name": "damp", "set": {"quantize.damp": 0.25}},
        {"name": "no_tilt", "score": "untilted"}, {"name": "damp2", "set": {"quantize.damp": 0.3}}],
        common={"train.iterations": 7, "evaluate.ngram_tilt": True})
    out = tmp_path / "out.json"
    A.main(["--rows", str(rows), "--out", str(out), "--log-dir", str(tmp_path / "logs"), "--budget", "1e-6", *QUICK])
    res = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert res["no_tilt"]["rc"] == 0 and res["damp2"]["skipped"].startswith("budget")


def test_keep_quant_copies_the_baseline_rows_quantized_model_of_each_seed(repo, tmp_path):
    rows = rows_file(tmp_path / "rows.yaml", [{"name": "base"}, {"name": "damp", "set": {"quantize.damp": 0.25}}])
    keep = tmp_path / "keep"
    A.main(["--rows", str(rows), "--out", str(tmp_path / "o.json"), "--log-dir", str(tmp_path / "logs"), "--quick",
            "--seeds", "1337,42", "--keep-quant", str(keep)])
    damp = QuantizeConfig().damp
    assert sorted(p.name for p in keep.iterdir()) == ["base_seed1337.quant.pgt", "base_seed42.quant.pgt"]
    assert json.loads((keep / "base_seed42.quant.pgt").read_text()) == [damp, 42]  # the base's, not damp's
