"""bench/bench_quant_loop.py at a micro size (synthetic model and validation stream): it runs
quantize -> compress (unpruned, then a forced pruning search) -> evaluate and writes its JSON."""

import json

import pytest

from bench import bench_quant_loop

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_runs_at_a_micro_size_and_writes_its_json(tmp_path):
    out = tmp_path / "loop.json"
    assert bench_quant_loop.main(["--small", "--out", str(out), "--work", str(tmp_path / "w"), "--device", "cpu",
                                  "--context", "64", "--max-tokens", "512", "--batch-seqs", "4",
                                  "--prune-at-least", "300"]) == 0
    r = json.loads(out.read_text())
    assert r["machine"]["cpu_count"] >= 1 and r["torch"] and r["model"]["source"] == "synthetic"
    assert set(r["seconds"]) >= {"quantize", "compress_unpruned", "compress_pruned", "prune_search", "evaluate"}
    assert r["pruned_values"] >= 300 and r["prune_compressions"] >= 1
    assert r["bytes"]["total"] <= r["bytes"]["target"] < r["bytes"]["unpruned_total"]
    assert r["real_compressions"] == 2 + r["prune_compressions"]
    assert r["evaluate"]["stride"] == 64 and 0 < r["evaluate"]["val_bpb"] < 20
