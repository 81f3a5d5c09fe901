"""pgolf.compress.artifact: bit-exact round trip of every dtype through both codecs, the packing layout
against the alternatives it was chosen over (measured here on GPTQ-like int6 codes), bad files
(other format version, checksum mismatch, truncation, foreign file), dequantization, CODE_FILES."""

import dataclasses
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from pgolf.compress import artifact as A
from pgolf.compress import compress as C
from pgolf.compress import pack
from pgolf.compress.dequant import dequantize_state
from pgolf.shared import tensorfile
from pgolf import config
from pgolf.config import CompressConfig, ConfigError

ROOT = Path(__file__).resolve().parents[1]
CFG = CompressConfig()
FAST = dataclasses.replace(CFG, lzma_preset=6, zstd_level=19)


def every_dtype():
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.attn.c_q.weight.q": torch.randint(-31, 32, (24, 16), generator=g, dtype=torch.int8),
        "blocks.0.attn.c_q.weight.scale": torch.rand(24, generator=g).half(),
        "blocks.1.attn.c_q.weight.q": torch.randint(-128, 128, (8, 5), generator=g, dtype=torch.int8),
        "blocks.1.attn.c_q.weight.scale": torch.rand(8, generator=g).half(),
        "codes3d": torch.randint(-128, 128, (2, 3, 4), generator=g, dtype=torch.int8),
        "scalar": torch.tensor(3.25),
        "fp32": torch.randn(5, 3, generator=g),
        "fp16": torch.tensor([float("inf"), -0.0, 65504.0, 6e-8, float("nan")]).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "fp64": torch.randn(3, generator=g, dtype=torch.float64),
        "u8": torch.randint(0, 256, (9,), generator=g, dtype=torch.uint8),
        "i16": torch.randint(-30000, 30000, (4,), generator=g, dtype=torch.int16),
        "i32": torch.randint(-2**31, 2**31 - 1, (4,), generator=g, dtype=torch.int32),
        "i64": torch.tensor([-2**63, 2**63 - 1, 0]),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(width), b.view(width))
    return torch.equal(a, b)


@pytest.mark.parametrize("codec", ["lzma", "zstd"])
def test_round_trip_every_dtype_bit_exact(codec, tmp_path):
    t = every_dtype()
    meta = {"model": {"vocab_size": 8}, "quant": {}, "tokenizer": {"sha256": "ab", "vocab_size": 8}}
    path = tmp_path / "model.ptz"
    path.write_bytes(A.compress(A.serialize(t, meta), codec, FAST))
    out, got_meta = A.read_artifact(path)
    assert list(out) == list(t)
    for name in t:
        assert bits_equal(out[name], t[name]), name
    assert got_meta["model"] == meta["model"] and got_meta["tokenizer"] == meta["tokenizer"]
    assert got_meta["artifact_version"] == A.FORMAT_VERSION


def test_zigzag_is_a_bijection_on_int8():
    q = torch.arange(-128, 128, dtype=torch.int8)
    u = A._zigzag(q)
    assert sorted(u.tolist()) == list(range(256))
    assert u[:131].tolist()[128:] == [0, 2, 4]  # 0, 1, 2 -> 0, 2, 4; -1 -> 1
    assert A._zigzag(torch.tensor([-1], dtype=torch.int8)).item() == 1
    assert torch.equal(A._unzigzag(u), q)


def test_header_has_table_config_checksum_and_no_pickle():
    t = every_dtype()
    raw = A.serialize(t, {"model": {"num_layers": 2}, "quant": {}})
    stored, header = tensorfile.loads(raw, kind="artifact")
    assert header["meta"]["model"] == {"num_layers": 2} and len(header["payload_sha256"]) == 64
    assert all({"name", "dtype", "shape", "offset", "nbytes"} <= set(e) for e in header["tensors"])
    assert {e["name"] for e in header["meta"]["layout"]} == set(t)
    assert b"pickle" not in raw and not raw.startswith(b"PK")  # not a torch.save zip
    # codes first (file order), then float byte planes, then the rest
    names = [e["name"] for e in header["tensors"]]
    assert names[:3] == ["blocks.0.attn.c_q.weight.q", "blocks.1.attn.c_q.weight.q", "codes3d"]
    assert names[3].startswith(A.PLANES)


# ----------------------------------------------------------------------------- bad files


def good_file(tmp_path, codec="lzma"):
    path = tmp_path / "model.ptz"
    path.write_bytes(A.compress(A.serialize(every_dtype(), {"quant": {}}), codec, FAST))
    return path


@pytest.mark.parametrize("codec", ["lzma", "zstd"])
def test_truncated_file(tmp_path, codec):
    path = good_file(tmp_path, codec)
    blob = path.read_bytes()
    for n in (len(blob) - 1, len(blob) // 2, 7, 0):
        path.write_bytes(blob[:n])
        with pytest.raises(A.ArtifactError, match=str(path)):
            A.read_artifact(path)


def test_other_format_version(tmp_path):
    path = good_file(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[len(A.MAGIC)] = A.FORMAT_VERSION + 1
    path.write_bytes(bytes(blob))
    with pytest.raises(A.ArtifactError, match=rf"{path}: artifact format version {A.FORMAT_VERSION + 1} unsupported"):
        A.read_artifact(path)


def test_other_inner_artifact_version(tmp_path):
    raw = tensorfile.dumps({"x": torch.zeros(2)}, kind="artifact", meta={"artifact_version": 99, "layout": []})
    path = tmp_path / "model.ptz"
    path.write_bytes(A.compress(raw, "zstd", FAST))
    with pytest.raises(A.ArtifactError, match="artifact version 99 unsupported"):
        A.read_artifact(path)


@pytest.mark.parametrize("where", [-5, 40])  # in the payload, in the JSON header
def test_checksum_mismatch(tmp_path, where):
    """A byte changed and recompressed (the codec sees a valid stream), the CRC of the original kept."""
    good = A.serialize(every_dtype(), {"quant": {}})
    raw = bytearray(good)
    raw[where] ^= 0x01
    path = tmp_path / "model.ptz"
    blob = A.compress(bytes(raw), "lzma", FAST)
    path.write_bytes(A.compress(good, "lzma", FAST)[:A.HEADER_BYTES] + blob[A.HEADER_BYTES:])
    with pytest.raises(A.ArtifactError, match=rf"{path}: checksum mismatch"):
        A.read_artifact(path)


def test_payload_sha256_is_checked_too(tmp_path):
    """Even with a matching outer CRC, the container's payload sha256 catches a changed array."""
    raw = bytearray(A.serialize(every_dtype(), {"quant": {}}))
    raw[-5] ^= 0x01
    with pytest.raises(A.ArtifactError, match="x.ptz: checksum mismatch .payload"):
        A.deserialize(bytes(raw), "x.ptz")


def test_corrupt_compressed_body(tmp_path):
    path = good_file(tmp_path, "zstd")
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(A.ArtifactError, match=str(path)):
        A.read_artifact(path)


@pytest.mark.parametrize("content", [b"PK\x03\x04 a torch.save zip", b"", lzma.compress(b"hello"),
                                     b"PGOLFZ\x01\x09" + b"x" * 20])
def test_foreign_file(tmp_path, content):
    path = tmp_path / "model.ptz"
    path.write_bytes(content)
    with pytest.raises(A.ArtifactError, match=str(path)):
        A.read_artifact(path)


def test_compressed_foreign_tensorfile(tmp_path):
    """A valid pgolf tensor file of another kind inside a valid artifact header."""
    raw = tensorfile.dumps({"x": torch.zeros(2)}, kind="float_weights")
    path = tmp_path / "model.ptz"
    path.write_bytes(A.compress(raw, "lzma", FAST))
    with pytest.raises(tensorfile.TensorFileError, match=rf"{path}: holds 'float_weights'"):
        A.read_artifact(path)


def test_missing_file(tmp_path):
    with pytest.raises(A.ArtifactError, match="not found"):
        A.read_artifact(tmp_path / "nope.ptz")


# ----------------------------------------------------------------------------- codecs


def test_sizes_choose_and_forced_codec():
    raw = A.serialize(every_dtype(), {"quant": {}})
    s = C.sizes(raw, FAST)
    assert set(s) == {"lzma", "zstd"}
    codec, blob = C.choose(raw, FAST)
    assert len(blob) == min(s.values()) and s[codec] == len(blob)
    for forced in ("lzma", "zstd"):
        c, b = C.choose(raw, dataclasses.replace(FAST, codec=forced))
        assert c == forced and len(b) == s[forced]
        assert A.decompress(b) == (forced, raw)
    with pytest.raises(ConfigError, match="compress.codec"):  # checked where params are loaded
        config.check(dataclasses.replace(FAST, codec="gzip"))


def test_lzma_preset_and_extreme_are_used():
    raw = A.serialize(every_dtype(), {"quant": {}}) * 20
    small = A.compress(raw, "lzma", dataclasses.replace(CFG, lzma_chunk_bytes=0, lzma_preset=0))
    best = A.compress(raw, "lzma", dataclasses.replace(CFG, lzma_chunk_bytes=0, lzma_preset=9, lzma_extreme=True))
    assert best[A.HEADER_BYTES:] == lzma.compress(A.move_head_last(raw), format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    assert len(best) <= len(small)
    z = A.compress(raw, "zstd", dataclasses.replace(CFG, zstd_level=3, zstd_chunk_bytes=0))  # one frame
    assert zstandard.ZstdDecompressor().decompress(z[A.HEADER_BYTES:]) == A.move_head_last(raw)
    assert A.decompress(z) == ("zstd", raw)


def test_header_goes_behind_the_payload_inside_the_codec():
    raw = A.serialize(every_dtype(), {"quant": {}})
    n = A._head_len(raw)
    assert 12 < n < len(raw)
    moved = A.move_head_last(raw)
    assert moved.startswith(raw[n:]) and A.move_head_first(moved, "x") == raw
    assert A.move_head_first(A.move_head_last(b"not a tensorfile"), "x") == b"not a tensorfile"


# ----------------------------------------------------------------------------- dequantize


def test_dequantize_state_follows_quant_table():
    q = torch.randint(-31, 32, (4, 6), dtype=torch.int8)
    s = torch.rand(4).half()
    t = {"w.q": q, "w.scale": s, "emb.q": q.clone(), "emb.scale": s.clone(), "g": torch.ones(6).half()}
    meta = {"quant": {"w": {"type": "int6", "bits": 6}, "emb": {"type": "int8", "bits": 8},
                      "g": {"type": "passthrough"}}}
    sd = dequantize_state(t, meta)
    assert torch.equal(sd["w"], q.float() * s.float()[:, None]) and sd["g"].dtype == torch.float32
    with pytest.raises(A.ArtifactError, match="lacks its .q or .scale"):
        dequantize_state({k: v for k, v in t.items() if k != "w.scale"}, meta)
    with pytest.raises(A.ArtifactError, match="without a quant entry"):
        dequantize_state({**t, "stray": torch.zeros(1)}, meta)


# ----------------------------------------------------------------------------- layout measurement


def gptq_like(seed=0, layers=2, d=128, vocab=512):
    """Quantized tensors shaped like a small GPT: Laplacian rows/cols, 0.9995 row clip, int6 codes,
    int8 tied embedding, fp16 scales and near-1 control vectors (the input the layout was chosen on)."""
    rng = np.random.default_rng(seed)

    def codes(r, c, qmax, q):
        w = rng.laplace(size=(r, c)) * np.exp(0.3 * rng.standard_normal(r))[:, None] \
            * np.exp(0.3 * rng.standard_normal(c))[None, :]
        s = (np.quantile(np.abs(w), q, axis=1) / qmax).astype(np.float16)
        qq = np.clip(np.round(w / s.astype(np.float32)[:, None]), -qmax, qmax).astype(np.int8)
        return torch.from_numpy(qq), torch.from_numpy(s)

    shapes = {"attn.c_q": (d, d), "attn.c_k": (d // 2, d), "attn.c_v": (d // 2, d), "attn.proj": (d, d),
              "mlp.fc": (3 * d, d), "mlp.proj": (d, 3 * d)}
    t = {}
    for i in range(layers):
        for k, (r, c) in shapes.items():
            t[f"blocks.{i}.{k}.weight.q"], t[f"blocks.{i}.{k}.weight.scale"] = codes(r, c, 31, 0.9995)
        for k in ("attn_scale", "mlp_scale"):
            t[f"blocks.{i}.{k}"] = torch.from_numpy((1 + 0.05 * rng.standard_normal(d)).astype(np.float16))
    t["tok_emb.weight.q"], t["tok_emb.weight.scale"] = codes(vocab, d, 127, 0.9999984)
    return t


def reference_layout(t):
    """The record scripts' layout: int8 containers, per tensor, scales next to their codes."""
    return b"".join(v.numpy().tobytes() for v in t.values())


def bitpacked_layout(t):
    """6 bits per int6 code (4 codes -> 3 bytes), everything else as in the reference."""
    out = []
    for name, v in t.items():
        if name.endswith(".q") and not name.startswith("tok_emb"):
            u = (v.numpy().astype(np.int16) + 31).astype(np.uint32).ravel()
            u = np.concatenate([u, np.zeros(-len(u) % 4, np.uint32)]).reshape(-1, 4)
            w = u[:, 0] | u[:, 1] << 6 | u[:, 2] << 12 | u[:, 3] << 18
            out.append(np.stack([w & 255, w >> 8 & 255, w >> 16], 1).astype(np.uint8).tobytes())
        else:
            out.append(v.numpy().tobytes())
    return b"".join(out)


def test_layout_beats_reference_and_bitpacking_on_both_codecs():
    """Ours = the whole artifact file (JSON table + codec header included); the alternatives are
    bare payloads without any header. Sample: lzma 238,949 / zstd 240,109 vs reference
    239,543 / 246,094 and bit-packed 261,673 / 268,168 bytes."""
    t = gptq_like()
    ours = C.sizes(A.serialize(t, {"quant": {}}), CFG)
    zc = zstandard.ZstdCompressor(level=CFG.zstd_level)
    lz = lambda b: len(lzma.compress(b, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}]))
    sizes = {name: {"lzma": lz(b), "zstd": len(zc.compress(b))}
             for name, b in [("reference", reference_layout(t)), ("bitpack6", bitpacked_layout(t))]}
    sizes["ours"] = ours
    for codec in ("lzma", "zstd"):
        assert sizes["ours"][codec] < sizes["reference"][codec], (codec, sizes)
        assert sizes["ours"][codec] < 0.97 * sizes["bitpack6"][codec], (codec, sizes)


# ----------------------------------------------------------------------------- code files


def test_code_files_cover_every_pgolf_module_the_evaluate_stage_imports():
    probe = ("import sys, stages.evaluate; "
             "print('\\n'.join(sorted(m.__file__ for n, m in list(sys.modules.items()) "
             "if (n == 'pgolf' or n.startswith(('pgolf.', 'stages'))) and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    imported = {str(Path(f).resolve().relative_to(ROOT)) for f in out.split()}
    assert imported, "probe found no modules"
    missing = imported - set(pack.CODE_FILES)
    assert not missing, f"stages.evaluate imports {sorted(missing)} but CODE_FILES does not count them"
    assert all((ROOT / f).is_file() for f in pack.CODE_FILES)
    files = pack.code_files(ROOT)
    assert pack.code_bytes(ROOT) == sum(f["bytes"] for f in files) == sum((ROOT / f).stat().st_size for f in pack.CODE_FILES)


# ----------------------------------------------------------------------------- crafted files (issue 17 item 10)


def _with_header(raw: bytes, edit) -> bytes:
    """`raw` (a tensorfile) with its JSON header edited; the payload and its sha256 are unchanged."""
    import json
    import struct

    (hlen,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12:12 + hlen])
    edit(header)
    hbytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return raw[:8] + struct.pack("<I", len(hbytes)) + hbytes + raw[12 + hlen:]


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tensors"][0].update(dtype="complex64"), "has unsupported dtype 'complex64'"),
    (lambda h: h["tensors"][0].update(shape=[1 << 20, 1 << 20]), "lies outside the payload"),
    (lambda h: h["tensors"][0].update(shape=[-1]), "has an invalid shape [-1]"),
    (lambda h: h["tensors"][0].update(offset=10 ** 12), "lies outside the payload"),
    (lambda h: h.update(tensors={}), "no tensor table"),
], ids=["dtype", "shape too big", "negative shape", "offset", "no table"])
@pytest.mark.parametrize("codec", ["lzma", "zstd"])
def test_crafted_header_with_a_valid_checksum_is_an_artifact_error(codec, edit, message):
    tensors = {"w": torch.arange(12, dtype=torch.int8).reshape(3, 4), "s": torch.ones(3, dtype=torch.float16)}
    raw = _with_header(A.serialize(tensors, {"model": {}}), edit)
    blob = A.compress(raw, codec, dataclasses.replace(CFG, lzma_preset=1, zstd_level=1))  # valid CRC-32
    with pytest.raises(A.ArtifactError, match=r"^crafted\.ptz: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        A.loads_artifact(blob, "crafted.ptz")


@pytest.mark.parametrize("codec", ["lzma", "zstd"])
def test_decompression_is_bounded(codec, monkeypatch):
    monkeypatch.setattr(A, "MAX_RAW_BYTES", 100_000)
    bomb = A.compress(bytes(100_001), codec, dataclasses.replace(CFG, lzma_preset=1, zstd_level=1))
    assert len(bomb) < 1000  # a small file ...
    with pytest.raises(A.ArtifactError, match=rf"^bomb\.ptz: {codec} body expands to more than 100,000 bytes"):
        A.decompress(bomb, "bomb.ptz")  # ... that would expand past the bound
    ok = A.compress(bytes(99_990), codec, dataclasses.replace(CFG, lzma_preset=1, zstd_level=1))
    assert A.decompress(ok, "ok.ptz")[1] == bytes(99_990)
