"""Chunked lzma and zstd (compress.lzma_chunk_bytes / zstd_chunk_bytes, compress.threads;
pgolf.compress.artifact codec ids 4 and 5): bad values
are refused naming the param, the bytes never depend on the thread count, and the file reads back
through the reader evaluate uses and through the one inside the packed train_gpt.py."""

import dataclasses
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from pgolf.compress import artifact as A
from pgolf import config
from pgolf.compress import compress, pack
from pgolf.compress.dequant import dequantize_state
from pgolf.config import CompressConfig, ConfigError
from test_compress import write_quant  # quant.pgt of a micro model, as the quantize stage writes it

ROOT = Path(__file__).resolve().parents[1]
CHUNKED = CompressConfig(lzma_preset=6, lzma_chunk_bytes=1 << 16, threads=1)


def body() -> bytes:
    """A serialized artifact of ~200 KB of GPTQ-like codes (several 64 KiB chunks)."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(400, 512, generator=g) * 6).round().clamp(-31, 31).to(torch.int8)  # (400, 512)
    tensors = {"w.q": q, "w.scale": torch.rand(400, generator=g).half(), "b": torch.randn(512, generator=g)}
    return A.serialize(tensors, {"model": {}, "quant": {}})


@pytest.mark.parametrize("key, value, message", [
    ("lzma_chunk_bytes", -1, r"compress\.lzma_chunk_bytes must be 0 \(unchunked\) or >= 65536, got -1"),
    ("lzma_chunk_bytes", 4096, r"compress\.lzma_chunk_bytes must be 0 \(unchunked\) or >= 65536, got 4096"),
    ("zstd_chunk_bytes", 1000, r"compress\.zstd_chunk_bytes must be 0 \(unchunked\) or >= 65536, got 1000"),
    ("threads", -2, r"compress\.threads must be >= 0, got -2"),
])
def test_bad_values_are_refused_naming_the_param(key, value, message):
    cfg = dataclasses.replace(CHUNKED, **{key: value})
    with pytest.raises(ConfigError, match=message):
        cfg.check()
    with pytest.raises(ConfigError, match=r"^params\.yaml: " + message):  # as loading reports it
        config.check(cfg)


def test_wrong_type_names_the_param():
    with pytest.raises(ConfigError, match=r"compress\.threads must be int"):
        config.from_dict("compress", {"threads": "all"})


def test_bytes_do_not_depend_on_the_thread_count_and_reruns_are_identical():
    raw = body()
    one = A.compress(raw, "lzma", CHUNKED)
    for threads in (1, 2, 0):
        assert A.compress(raw, "lzma", dataclasses.replace(CHUNKED, threads=threads)) == one
    assert one[len(A.MAGIC) + 1] == A.LZMA_CHUNKED_ID
    (k,) = struct.unpack("<I", one[A.HEADER_BYTES:A.HEADER_BYTES + 4])
    assert k == -(-(len(raw) + 4) // CHUNKED.lzma_chunk_bytes) >= 3  # + 4: the moved header's length field
    assert A.decompress(one, "c.ptz") == ("lzma", raw)


def test_one_stream_is_unchanged_by_default():
    raw = body()
    plain = dataclasses.replace(CHUNKED, lzma_chunk_bytes=0, threads=0)
    blob = A.compress(raw, "lzma", plain)
    assert blob[len(A.MAGIC) + 1] == A.CODEC_IDS["lzma"] and A.decompress(blob)[1] == raw
    assert A.compress(raw, "zstd", dataclasses.replace(CHUNKED, zstd_level=3)) == A.compress(
        raw, "zstd", dataclasses.replace(plain, zstd_level=3))  # the params touch lzma only


def test_chunked_is_bounded_and_checks_its_table(monkeypatch):
    monkeypatch.setattr(A, "MAX_RAW_BYTES", 150_000)
    bomb = A.compress(bytes(150_001), "lzma", dataclasses.replace(CHUNKED, lzma_preset=1))
    with pytest.raises(A.ArtifactError, match=r"^bomb\.ptz: lzma body expands to more than 150,000 bytes"):
        A.decompress(bomb, "bomb.ptz")
    ok = A.compress(bytes(140_000), "lzma", dataclasses.replace(CHUNKED, lzma_preset=1))
    assert A.decompress(ok, "ok.ptz")[1] == bytes(140_000)
    cut = ok[:-1]
    with pytest.raises(A.ArtifactError, match=r"^cut\.ptz: .*do not add up"):
        A.decompress(cut, "cut.ptz")
    lying = ok[:A.HEADER_BYTES] + struct.pack("<I", 10 ** 6) + ok[A.HEADER_BYTES + 4:]
    with pytest.raises(A.ArtifactError, match=r"^lying\.ptz: chunked lzma body: bad table"):
        A.decompress(lying, "lying.ptz")


@pytest.mark.parametrize("codec, cid", [("lzma", A.LZMA_CHUNKED_ID), ("zstd", A.ZSTD_CHUNKED_ID)])
def test_stage_writes_chunked_streams_that_evaluate_and_the_packed_script_read(tmp_path, codec, cid):
    """compress.build with codec lzma chunked -> model.ptz; read back by pgolf.compress.artifact.read_artifact
    (evaluate's reader) here, and by the artifact module unpacked from the packed train_gpt.py in a
    fresh interpreter (the submission's reader)."""
    quant = write_quant(tmp_path / "quant" / "quant.pgt", tiny_model())
    cfg = dataclasses.replace(CHUNKED, codec=codec, prune=False, threads=2, zstd_level=3, zstd_chunk_bytes=1 << 16)
    script = pack.build_script(ROOT, config.load_all(config.read_doc(ROOT / "params.yaml")))
    m = compress.build(cfg, script, quant, tmp_path / "final", tmp_path / "size.json")
    ptz = tmp_path / "final" / "model.ptz"
    blob = ptz.read_bytes()
    assert m["codec"] == codec and m["model_bytes"] == len(blob) and blob[len(A.MAGIC) + 1] == cid
    tensors, meta = A.read_artifact(ptz)
    src = tmp_path / "packed_src"
    for rel, text in pack.unpack(script)["files"].items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]); import pgolf.compress.artifact as A; "
            "from pgolf.compress.dequant import dequantize_state; "
            "assert A.__file__.startswith(sys.argv[1]); t, m = A.read_artifact(sys.argv[2]); "
            "print(sorted(t), len(dequantize_state(t, m)))")
    out = subprocess.run([sys.executable, "-c", code, str(src), str(ptz)], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == f"{sorted(tensors)} {len(dequantize_state(tensors, meta))}"


ZSTD_CHUNKED = dataclasses.replace(CHUNKED, zstd_level=3, zstd_chunk_bytes=1 << 16)


def test_zstd_frames_do_not_depend_on_the_thread_count_and_read_back():
    raw = body()
    one = A.compress(raw, "zstd", ZSTD_CHUNKED)
    for threads in (2, 0):
        assert A.compress(raw, "zstd", dataclasses.replace(ZSTD_CHUNKED, threads=threads)) == one
    assert one[len(A.MAGIC) + 1] == A.ZSTD_CHUNKED_ID
    (k,) = struct.unpack("<I", one[A.HEADER_BYTES:A.HEADER_BYTES + 4])
    assert k == -(-(len(raw) + 4) // ZSTD_CHUNKED.zstd_chunk_bytes) >= 3
    assert A.decompress(one, "z.ptz") == ("zstd", raw)
    frame = A.compress(raw, "zstd", dataclasses.replace(ZSTD_CHUNKED, zstd_chunk_bytes=0))
    assert frame[len(A.MAGIC) + 1] == A.CODEC_IDS["zstd"] and A.decompress(frame)[1] == raw


def test_zstd_frames_are_bounded_and_check_their_table(monkeypatch):
    monkeypatch.setattr(A, "MAX_RAW_BYTES", 150_000)
    bomb = A.compress(bytes(150_001), "zstd", ZSTD_CHUNKED)
    with pytest.raises(A.ArtifactError, match=r"^bomb\.ptz: zstd body expands to more than 150,000 bytes"):
        A.decompress(bomb, "bomb.ptz")
    ok = A.compress(bytes(140_000), "zstd", ZSTD_CHUNKED)
    assert A.decompress(ok, "ok.ptz")[1] == bytes(140_000)
    with pytest.raises(A.ArtifactError, match=r"^cut\.ptz: chunked zstd body: .*do not add up"):
        A.decompress(ok[:-1], "cut.ptz")
    lying = ok[:A.HEADER_BYTES] + struct.pack("<I", 10 ** 6) + ok[A.HEADER_BYTES + 4:]
    with pytest.raises(A.ArtifactError, match=r"^lying\.ptz: chunked zstd body: bad table"):
        A.decompress(lying, "lying.ptz")
