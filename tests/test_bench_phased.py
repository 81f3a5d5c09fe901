"""bench.bench_phased: the work of a batch (by hand), the modelled set's streams and batches, the fit and
the projection's arithmetic, and the CPU smoke run's JSON."""

import json

import numpy as np
import pytest

from bench import bench_phased as bp
from pgolf.evaluate.phased import documents
from pgolf.shared.shards import BOS_ID, read_shard


def test_batch_work_counts_unfinished_documents_times_the_window():
    rows = np.array([[0, 6], [6, 12], [18, 30]])  # 5, 11 and 29 targets: 1, 3 and 6 chunks of 5
    # window min(10, 5 (ci + 1)); rows 3, 2, 2, 1, 1, 1 unfinished at steps 0..5
    assert bp.batch_work(rows, 5, 10) == (6, 3 * 5 + 2 * 10 + 2 * 10 + 3 * 10)
    assert bp.batch_work(rows[:1], 5, 10) == (1, 5)


def test_stream_of_holds_documents_of_exactly_those_lengths():
    lengths = np.array([2, 7, 3, 40])
    s = bp.stream_of(lengths, vocab=8, seed=1)
    assert documents(s, BOS_ID)[:, 1].tolist() == lengths.tolist()
    assert (s == BOS_ID).sum() == len(lengths) + 1 and s.min() >= 0 and s.max() < 8


def test_set_costs_cut_as_eval_phased_and_pick_spans_the_work():
    lengths = np.array([30, 3, 12, 6, 50, 9, 2, 21])
    groups, costs = bp.set_costs(lengths, 3, 5, 10)
    assert [g.tolist() for g in groups] == [[30, 50], [9, 12, 21], [2, 3, 6]]  # cut ascending, longest first
    for g, c in zip(groups, costs):
        assert tuple(c) == bp.batch_work(np.stack([np.zeros_like(g), g], 1), 5, 10)
    chosen = bp.pick(costs, 2)
    assert set(chosen.tolist()) == {int(costs[:, 1].argmin()), int(costs[:, 1].argmax())}
    assert len(bp.pick(costs, 9)) == 3
    w = np.sort(costs[:, 1])
    capped = bp.pick(costs, 3, cap=int(w[1]))  # the heaviest is over the cap: never timed
    assert set(costs[capped, 1].tolist()) == {int(w[0]), int(w[1])}
    assert costs[bp.pick(costs, 3, cap=0), 1].tolist() == [int(w[0])]


def test_warm_lengths_meet_every_step_shape():
    """The compiled run's first pass: full and short batches, a document alone, the first step's
    window equal to the chunk, wider ones, and the window capped at the context."""
    from pgolf.evaluate.phased import batch_chunks, batches, done_rows, step_width

    lengths = bp.warm_lengths(64, 48, 2560)
    docs = np.stack([np.zeros_like(lengths), lengths], 1)
    shapes = set()
    for g in batches(docs, 64):
        rows = docs[g]
        shapes |= {(len(rows) - done_rows(rows, ci, 48), step_width(ci, 48, 2560), len(rows))
                   for ci in range(batch_chunks(rows, 48))}
    assert {n for _, _, n in shapes} >= {64} and min(n for _, _, n in shapes) < 64  # a full batch and a short one
    assert any(r == 1 for r, _, _ in shapes) and any(1 < r for r, _, _ in shapes)
    widths = {w for _, w, _ in shapes}
    assert {48, 2560} <= widths and any(48 < w < 2560 for w in widths)


def test_fit_finds_the_line_and_the_projection_sums_every_batch():
    costs = np.array([[10, 1_000], [40, 9_000], [200, 80_000]])
    seconds = 0.002 * costs[:, 0] + 3e-6 * costs[:, 1]
    a, b = bp.fit(costs, seconds)
    assert a == pytest.approx(0.002) and b == pytest.approx(3e-6)
    want = seconds.sum() * bp.PR2135_VAL_TOKENS / 1_234 / bp.PR2135_GPUS
    assert bp.project(costs, a, b, 1_234) == pytest.approx(want)
    # a negative cost per step (more steps, less time): a is dropped and b refitted alone
    costs = np.array([[10, 10_000], [100, 20_000], [20, 90_000]])
    seconds = 1e-6 * costs[:, 1] - 2e-5 * costs[:, 0]
    rows = costs[:, 1].astype(float)
    assert bp.fit(costs, seconds) == pytest.approx((0.0, rows @ seconds / (rows @ rows)))


def test_small_run_writes_each_batch_and_its_projection(tmp_path):
    out = tmp_path / "phased.json"
    args = ["--small", "--docs", "8", "--batches", "2", "--set", "evaluate.ttt_doc_batch=4", "--out", str(out)]
    assert bp.main(args) == 0
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["set"]["docs"] == 8 and r["set"]["batches"] == 2 and len(r["timed"]) == 2
    lengths = documents(read_shard(bp.FIXTURE), BOS_ID)[:, 1]
    drawn = np.random.default_rng(0).choice(lengths, 8)  # the bench's draw, by hand
    _, costs = bp.set_costs(drawn, 4, r["evaluate"]["ttt_doc_chunk"], r["evaluate"]["context"])
    assert [[t["steps"], t["row_tokens"]] for t in r["timed"]] == costs[[t["batch"] for t in r["timed"]]].tolist()
    p = r["projection"]
    want = bp.project(costs, p["seconds_per_step"], p["seconds_per_row_token"], int((drawn - 1).sum()))
    assert p["seconds"] == pytest.approx(want, abs=0.05)


@pytest.mark.parametrize("args, why", [(["--batches", "1"], "--batches 1"), (["--docs", "0"], "--docs 0"),
                                       ([], "--tokens")])
def test_bad_arguments_are_named(args, why, tmp_path, capsys):
    small = [] if why == "--tokens" else ["--small"]
    with pytest.raises(SystemExit):
        bp.main(small + args + ["--out", str(tmp_path / "x.json")])
    assert why in capsys.readouterr().err
