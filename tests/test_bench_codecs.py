"""bench/bench_codecs.py on a small cached body: both parts run and the JSON says whether the
bytes depend on the thread count."""

import json

from bench import bench_codecs
from pgolf.compress import artifact


def test_bench_runs_on_a_small_body_and_writes_its_json(tmp_path):
    raw = tmp_path / "body.bin"
    raw.write_bytes(artifact.move_head_last(bytes(range(256)) * 800))  # 204,800 bytes + the length field
    out = tmp_path / "codecs.json"
    args = ["--out", str(out), "--raw", str(raw), "--zstd-splits", "1:1", "--lzma-chunks", "2",
            "--lzma-chunk-bytes", "65536"]
    assert bench_codecs.main(args) == 0
    r = json.loads(out.read_text())
    assert r["machine"]["cpu_count"] >= 1 and r["python_zstandard"] and r["zstd_library"]
    assert r["body"]["bytes"] == 204_804
    assert [x["threads"] for x in r["zstd"]["runs"]] == [0, 1, 2, 1, 2] and all(x["roundtrip"] for x in r["zstd"]["runs"])
    assert all(r["zstd"]["mt_frames_equal_across_threads"].values())
    assert [x["chunks"] for x in r["lzma"]["runs"]] == [1, 2, 4, 4]
    assert r["lzma"]["files_equal_across_threads"] == {"65536": True}
