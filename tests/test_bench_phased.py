"""bench.bench_phased: the document cut and the CPU smoke run's JSON (its projection's arithmetic)."""

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
    expect = r["seconds"] * bench_phased.PR2135_VAL_TOKENS / r["tokens"] / bench_phased.PR2135_GPUS
    assert abs(r["projection"]["seconds"] - expect) <= 0.05 + 1e-3 * expect
