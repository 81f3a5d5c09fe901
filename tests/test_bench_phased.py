"""bench.bench_phased: the document cut, the work model (by hand) and the CPU smoke run's JSON (its
projection's arithmetic)."""

import json

import numpy as np

from bench import bench_phased
from pgolf.evaluate.phased import documents
from pgolf.shared.shards import BOS_ID


def test_first_docs_cuts_before_the_next_document():
    b = BOS_ID
    stream = np.array([b, 5, 6, b, 7, b, 8, 9, 9, b, 4], dtype=np.uint16)
    two = bench_phased.first_docs(stream, 2)
    assert two.tolist() == [b, 5, 6, b, 7, b]  # doc 2's last target is the BOS of doc 3
    assert len(documents(two, b)) == 2
    assert bench_phased.first_docs(stream, 9) is stream


def test_small_run_writes_its_projection(tmp_path):
    out = tmp_path / "phased.json"
    assert bench_phased.main(["--small", "--docs", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["docs"] == 3 and r["device"] == "cpu" and r["chunks"] > 0
    per_token = r["projection"]["row_tokens_per_token"]
    expect = r["seconds"] / r["row_tokens"] * per_token * bench_phased.PR2135_VAL_TOKENS / bench_phased.PR2135_GPUS
    assert abs(r["projection"]["seconds"] - expect) <= 0.05 + 1e-3 * expect


def test_work_counts_unfinished_documents_times_the_window():
    docs = np.array([[0, 6], [6, 12], [18, 30]])  # 5, 11 and 29 targets: 1, 3 and 6 chunks of 5
    # window min(10, 5 (ci + 1)); rows 3, 2, 2, 1, 1, 1 unfinished at steps 0..5
    assert bench_phased.row_tokens(docs, 3, 5, 10) == 3 * 5 + 2 * 10 + 2 * 10 + 3 * 10
    assert bench_phased.row_tokens(docs, 1, 5, 10) == 5 + (5 + 10 + 10) + (5 + 10 * 5)  # a batch each: no padding
    # many documents of one length: the full set's work per token is that length's, exactly
    assert bench_phased.full_set_work(np.array([11]), 64, 5, 10) == (5 + 10) / 10  # 10 targets, 2 chunks
