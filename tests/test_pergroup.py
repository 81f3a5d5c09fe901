"""Per-group compression (compress.layout "pergroup", pgolf.compress.pergroup): the grouped body cut
into groups, each by its smallest codec; round trips byte-identical and deterministic (any thread
count); inflation bounded by the table before decoding; a failing optional codec is left out; the
config refuses a forced codec; the compress stage writes it and it reads back."""

import dataclasses
import struct
import threading

import numpy as np
import pytest
import torch

from pgolf.compress import artifact as A
from pgolf.compress import codecs, grouping, pergroup
from pgolf import config
from pgolf.config import CompressConfig, ConfigError
from pgolf.shared import tensorfile
from test_artifact import bits_equal
from test_compress import build, workdir  # noqa: F401 - fixture
from test_grouping import codes_and_meta

FAST = CompressConfig(lzma_preset=6, zstd_level=19, brotli_quality=9, layout="pergroup",
                      pergroup_codecs=("lzma", "zstd", "brotli", "ppmd"))  # lrzip: its own tests, any machine
L1 = dataclasses.replace(FAST, row_order="l1")


def test_round_trip_is_byte_identical_and_deterministic():
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    blob = A.compress(raw, "pergroup", FAST)
    assert blob[len(A.MAGIC) + 1] == A.CODEC_IDS["pergroup"] == 6
    assert blob == A.compress(raw, "pergroup", dataclasses.replace(FAST, threads=1))  # threads never change bytes
    codec, back_raw = A.decompress(blob, "m.ptz")
    assert codec == "pergroup" and back_raw == raw
    back, _ = A.loads_artifact(blob)
    assert list(back) == list(tensors) and all(bits_equal(back[k], v) for k, v in tensors.items())
    table = pergroup.describe(blob[A.HEADER_BYTES:])
    assert len(table) >= 3 and sum(e["raw_bytes"] for e in table) == len(raw) + 4
    assert {e["codec"] for e in table} <= set(pergroup.available(FAST.pergroup_codecs))


def test_permutations_are_compact_and_the_grouped_layout_keeps_int32():
    tensors, meta = codes_and_meta()
    for layout, dtype in (("grouped", "int32"), ("pergroup", "int16")):
        _, header = tensorfile.loads(A.serialize(tensors, meta, CompressConfig(layout=layout)), kind="artifact")
        perms = [e for e in header["tensors"] if e["name"].startswith(grouping.PERM)]
        assert perms and all(e["dtype"] == dtype for e in perms)


def test_large_permutation_round_trips_through_uint16_bits():
    codes = {"blocks.0.w.q": torch.randint(0, 64, (40000, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    stored, entries = grouping.group(codes, FAST)
    assert stored[".perm.0"].dtype == torch.int16 and int(stored[".perm.0"].min()) < 0  # rows past 32767
    assert torch.equal(grouping.ungroup(stored, entries["blocks.0.w.q"], [40000, 3]), codes["blocks.0.w.q"])


@pytest.mark.parametrize("codec", ["lzma", "zstd", "brotli", "ppmd", "lrzip"])
def test_each_codec_round_trips_a_piece(codec):
    if codec not in pergroup.available(tuple(pergroup.IDS)):
        pytest.skip(f"{codec} not installed")
    piece = bytes(range(256)) * 50 + b"\x01\x02" * 999
    s = pergroup._encode_one(piece, codec, FAST)
    assert pergroup._decode_one(s, codec, len(piece)) == piece
    with pytest.raises(codecs.CodecError):
        pergroup._decode_one(s, codec, len(piece) + 1)  # the stream ends before its recorded length


def test_failing_optional_codec_is_left_out(monkeypatch):
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    real = pergroup._encode_one

    def broken(data, codec, cfg):
        if codec not in ("lzma", "zstd"):
            raise OSError("codec program missing")
        return real(data, codec, cfg)

    monkeypatch.setattr(pergroup, "_encode_one", broken)
    blob = A.compress(raw, "pergroup", FAST)
    assert {e["codec"] for e in pergroup.describe(blob[A.HEADER_BYTES:])} <= {"lzma", "zstd"}
    assert A.decompress(blob)[1] == raw
    monkeypatch.setattr(pergroup.shutil, "which", lambda name: None)
    assert "lrzip" not in pergroup.available(tuple(pergroup.IDS))


def test_codecs_of_one_piece_run_side_by_side_and_the_smallest_stream_is_kept(monkeypatch):
    """Every (piece, codec) pair is a task, largest piece first: with 2 workers the largest piece's
    lzma and zstd meet at a barrier (one after the other they would time out); each piece keeps the
    stream of the codec that is smallest for it alone."""
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    body = A.move_head_last(raw)
    pieces = pergroup.split(body, raw)
    largest, real = max(len(p) for p in pieces), pergroup._encode_one
    barrier = threading.Barrier(2, timeout=20)

    def meeting(data, codec, cfg):
        if len(data) == largest and codec in ("lzma", "zstd"):
            barrier.wait()
        return real(data, codec, cfg)

    monkeypatch.setattr(pergroup, "_encode_one", meeting)
    cfg = dataclasses.replace(FAST, threads=2, pergroup_codecs=("lzma", "zstd"))
    table = pergroup.describe(pergroup.encode(body, raw, cfg))
    sizes = [{c: len(real(p, c, cfg)) for c in ("lzma", "zstd")} for p in pieces]
    assert [e["codec"] for e in table] == [min(s, key=s.get) for s in sizes]
    assert [e["bytes"] for e in table] == [min(s.values()) for s in sizes]


def _calls(monkeypatch) -> list[tuple[int, str]]:
    """(piece length, codec) of every per-group encode from now on."""
    calls, real = [], pergroup._encode_one

    def counted(data, codec, cfg):
        calls.append((len(data), codec))
        return real(data, codec, cfg)

    monkeypatch.setattr(pergroup, "_encode_one", counted)
    return calls


def test_a_probe_like_the_unpruned_body_runs_each_piece_by_its_chosen_codec_alone(monkeypatch):
    """Pruning's probes (`like` = the unpruned file): one encode per piece, by the codec the unpruned
    body chose for it; the pruned body still reads back exactly."""
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    first = A.compress(raw, "pergroup", FAST)
    chosen = [(e["raw_bytes"], e["codec"]) for e in pergroup.describe(first[A.HEADER_BYTES:])]
    assert len({c for _, c in chosen}) >= 2  # the pieces do not all pick one codec, so reuse is per piece
    pruned = dict(tensors)
    q = "blocks.0.mlp.fc.weight.q"
    pruned[q] = torch.where(tensors[q].abs() == 1, torch.zeros_like(tensors[q]), tensors[q])  # ±1 codes pruned
    raw2 = A.serialize(pruned, meta, FAST)
    calls = _calls(monkeypatch)
    probe = A.compress(raw2, "pergroup", FAST, like=first)
    assert sorted(calls) == sorted(chosen)
    assert [(e["raw_bytes"], e["codec"]) for e in pergroup.describe(probe[A.HEADER_BYTES:])] == chosen
    assert A.decompress(probe)[1] == raw2 and probe != first


def test_a_probe_falls_back_to_every_codec_where_the_earlier_choice_fails_or_the_layout_differs(monkeypatch):
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    first = A.compress(raw, "pergroup", FAST)
    names = pergroup.available(FAST.pergroup_codecs)
    table = pergroup.describe(first[A.HEADER_BYTES:])
    failing, piece = table[0]["codec"], pergroup.split(A.move_head_last(raw), raw)[0]
    real, on_piece = pergroup._encode_one, []

    def broken(data, codec, cfg):
        if data == piece:
            on_piece.append(codec)
            if codec == failing:
                raise OSError("codec program missing")
        return real(data, codec, cfg)

    monkeypatch.setattr(pergroup, "_encode_one", broken)
    again = pergroup.describe(A.compress(raw, "pergroup", FAST, like=first)[A.HEADER_BYTES:])
    assert again[0]["codec"] != failing and [e["codec"] for e in again[1:]] == [e["codec"] for e in table[1:]]
    assert sorted(on_piece) == sorted(names)  # the failed codec once, then each other codec once
    monkeypatch.setattr(pergroup, "_encode_one", real)
    calls = _calls(monkeypatch)
    other = dict(tensors)
    other["blocks.0.mlp.fc.weight.q"] = torch.cat([tensors["blocks.0.mlp.fc.weight.q"]] * 2)  # pieces change length
    small = A.compress(A.serialize(tensors, meta), "zstd", FAST)
    for like in (A.compress(A.serialize(other, meta, FAST), "pergroup", FAST), small):
        calls.clear()
        A.compress(raw, "pergroup", FAST, like=like)
        assert len(calls) == len(table) * len(names)  # no reuse: every piece by every codec


def test_a_piece_no_codec_encodes_is_named(monkeypatch):
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, FAST)
    piece = pergroup.split(A.move_head_last(raw), raw)[1]
    real = pergroup._encode_one

    def broken(data, codec, cfg):
        if data == piece:
            raise OSError("disk full")
        return real(data, codec, cfg)

    monkeypatch.setattr(pergroup, "_encode_one", broken)
    with pytest.raises(codecs.CodecError, match=f"piece 1 \\({len(piece)} bytes\\): no codec"):
        A.compress(raw, "pergroup", FAST)


def test_inflation_is_bounded_and_corruption_is_named():
    tensors, meta = codes_and_meta()
    blob = A.compress(A.serialize(tensors, meta, FAST), "pergroup", FAST)
    head, body = blob[:A.HEADER_BYTES], blob[A.HEADER_BYTES:]
    with pytest.raises(codecs.CodecError, match="more than 100"):
        pergroup.inflate(body, 100)  # refused from the table, before any decoding
    c, n, m = pergroup.ENTRY.unpack_from(body, 4)
    forged = body[:4] + pergroup.ENTRY.pack(c, A.MAX_RAW_BYTES + 1, m) + body[4 + pergroup.ENTRY.size:]
    with pytest.raises(A.ArtifactError, match="m.ptz: per-group body expands"):
        A.decompress(head + forged, "m.ptz")
    with pytest.raises(A.ArtifactError, match="m.ptz"):
        A.decompress(blob[:-5], "m.ptz")
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(A.ArtifactError, match="m.ptz"):
        A.decompress(bytes(bad), "m.ptz")
    with pytest.raises(A.ArtifactError, match="bad table"):
        A.decompress(head + struct.pack("<I", 0), "m.ptz")


def test_config_checks():
    with pytest.raises(ConfigError, match="compress.codec must be auto with compress.layout pergroup"):
        config.from_dict("compress", {"layout": "pergroup", "codec": "lzma"})
    with pytest.raises(ConfigError, match="compress.pergroup_codecs must be a subset"):
        config.from_dict("compress", {"pergroup_codecs": ["bzip2"]})
    with pytest.raises(ConfigError, match="compress.pergroup_codecs must be a subset"):
        config.from_dict("compress", {"pergroup_codecs": ["ppmd"]})
    assert config.from_dict("compress", {"layout": "pergroup"}).pergroup_codecs == config.PERGROUP_CODECS


def test_compress_stage_writes_the_pergroup_layout(workdir):  # noqa: F811
    flat = build(workdir)
    flat_tensors, _ = A.read_artifact(workdir / "artifacts/final/model.ptz")
    m = build(workdir, dataclasses.replace(FAST, prune=False))
    assert m["codec"] == "pergroup" and m["pergroup_bytes"] == m["model_bytes"] and "lzma_bytes" not in m
    tensors, _ = A.read_artifact(workdir / "artifacts/final/model.ptz")
    assert list(tensors) == list(flat_tensors) and all(torch.equal(tensors[k], flat_tensors[k]) for k in tensors)


def test_l1_order_is_a_greedy_nearest_neighbour_walk(monkeypatch):
    rows = np.array([[0, 0], [9, 9], [1, 1], [8, 9], [0, 1]], dtype=np.uint8)
    assert grouping.l1_order(rows).tolist() == [0, 4, 2, 3, 1]  # 0 -> (0,1) -> (1,1) -> (8,9) -> (9,9)
    monkeypatch.setattr(grouping, "L1_MAX_ROWS", 4)
    assert grouping.l1_order(rows).tolist() == grouping.row_order(rows).tolist()  # too many rows: the projection


def test_l1_row_order_round_trips_per_member():
    tensors, meta = codes_and_meta()
    raw = A.serialize(tensors, meta, L1)
    assert raw != A.serialize(tensors, meta, FAST) and raw == A.serialize(tensors, meta, L1)
    back, _ = A.loads_artifact(A.compress(raw, "pergroup", FAST))
    assert all(bits_equal(back[k], v) for k, v in tensors.items())
    stored, entries = grouping.group({"blocks.0.w.q": torch.zeros(3, 2, dtype=torch.uint8),
                                      "blocks.1.w.q": torch.ones(4, 2, dtype=torch.uint8)}, L1)
    assert sorted(stored[".perm.0"][:3].tolist()) == [0, 1, 2]  # each member's rows stay its own
    with pytest.raises(ConfigError, match="compress.row_order must be one of pca, l1"):
        config.from_dict("compress", {"row_order": "nn"})


@pytest.mark.parametrize("order", ["pca", "l1"])
def test_transposed_groups_round_trip_column_by_column(order):
    tensors, meta = codes_and_meta()
    for layout in ("grouped", "pergroup"):
        plain = dataclasses.replace(FAST, layout=layout, row_order=order)
        cfg = dataclasses.replace(plain, transpose_groups=True)
        raw = A.serialize(tensors, meta, cfg)
        assert raw != A.serialize(tensors, meta, plain) and raw == A.serialize(tensors, meta, cfg)
        stored, header = tensorfile.loads(raw, kind="artifact")
        rows, _ = tensorfile.loads(A.serialize(tensors, meta, plain), kind="artifact")
        groups = [k for k in stored if k.startswith(grouping.GROUP)]
        assert groups and all(torch.equal(stored[k], rows[k].T) for k in groups)  # (C, R): the same sorted rows
        assert all(e.get("transposed") for e in header["meta"]["layout"] if e["enc"] == "group")
        back, _ = A.loads_artifact(A.compress(raw, "pergroup" if layout == "pergroup" else "lzma", cfg))
        assert list(back) == list(tensors) and all(bits_equal(back[k], v) for k, v in tensors.items())


FAKE_LRZIP = '''#!{python}
"""A stand-in for the lrzip program: its header (LRZI, 0.6, decoded size) over a zlib stream."""
import struct, sys, zlib
args = sys.argv[1:]
open({log!r}, "a").write(" ".join(a for a in args if not a.startswith("/")) + "\\n")
if {fail!r}:
    sys.stderr.write("Warning, low memory\\nfake lrzip: bad stream\\n")
    sys.exit(2)
dst, src = args[args.index("-o") + 1], args[-1]
data = open(src, "rb").read()
if "-d" in args:
    out = zlib.decompress(data[14:])
else:
    out = b"LRZI" + bytes([0, 6]) + struct.pack("<q", len(data)) + zlib.compress(data, 9)
open(dst, "wb").write(out)
'''


def fake_lrzip(tmp_path, monkeypatch, fail: bool = False):
    """Put a stand-in `lrzip` first on PATH; returns the file where it logs its arguments."""
    import sys

    log, program = tmp_path / "lrzip.log", tmp_path / "bin" / "lrzip"
    program.parent.mkdir(exist_ok=True)
    program.write_text(FAKE_LRZIP.format(python=sys.executable, log=str(log), fail=fail))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{__import__('os').environ['PATH']}")
    return log


def test_lrzip_runs_at_its_level_and_refuses_a_stream_of_another_size(tmp_path, monkeypatch):
    """pgolf's side of the lrzip codec on any machine (a stand-in program): `-z -L level`, the decode,
    a header that states another size refused before the program runs, a failing program named."""
    log = fake_lrzip(tmp_path, monkeypatch)
    assert "lrzip" in pergroup.available(("lzma", "lrzip"))
    piece = bytes(range(256)) * 50
    s = pergroup._encode_one(piece, "lrzip", dataclasses.replace(FAST, lrzip_level=7))
    assert s[:4] == b"LRZI" and pergroup._decode_one(s, "lrzip", len(piece)) == piece
    assert log.read_text().splitlines() == ["-z -L 7 -q -f -o", "-d -q -f -o"]
    with pytest.raises(codecs.CodecError, match=f"lrzip piece states {len(piece):,} bytes, its table says"):
        pergroup._decode_one(s, "lrzip", len(piece) - 1)
    with pytest.raises(codecs.CodecError, match="no lrzip 0.6 header"):
        pergroup._decode_one(b"LRZI\x00\x07" + s[6:], "lrzip", len(piece))
    assert len(log.read_text().splitlines()) == 2  # neither ran the program
    fake_lrzip(tmp_path, monkeypatch, fail=True)
    with pytest.raises(codecs.CodecError, match="lrzip -d failed: fake lrzip: bad stream"):
        pergroup._decode_one(s, "lrzip", len(piece))
    assert pergroup._try(piece, "lrzip", FAST) is None  # left out of the artifact, as any failing optional codec
    with pytest.raises(ConfigError, match=r"compress.lrzip_level must be in \[1, 9\], got 0"):
        config.from_dict("compress", {"lrzip_level": 0})


def test_a_pergroup_artifact_with_lrzip_pieces_round_trips(tmp_path, monkeypatch):
    fake_lrzip(tmp_path, monkeypatch)
    tensors, meta = codes_and_meta()
    cfg = dataclasses.replace(FAST, pergroup_codecs=("zstd", "lrzip"), zstd_level=1)
    monkeypatch.setattr(pergroup, "_join_groups", lambda body, raw, pieces, chosen, cfg: (pieces, chosen))
    raw = A.serialize(tensors, meta, cfg)
    blob = A.compress(raw, "pergroup", cfg)
    assert "lrzip" in {e["codec"] for e in pergroup.describe(blob[A.HEADER_BYTES:])}  # zlib-9 beats zstd-1 somewhere
    assert A.decompress(blob)[1] == raw
    monkeypatch.setattr(pergroup.shutil, "which", lambda name: None)
    with pytest.raises(A.ArtifactError, match="m.ptz: a per-group piece is lrzip-compressed, but the program 'lrzip' is not"):
        A.decompress(blob, "m.ptz")


def test_the_code_groups_become_one_lrzip_piece_where_that_is_smaller(tmp_path, monkeypatch):
    """Two roles with the same codes: one zlib stream (the stand-in lrzip) over both groups is smaller
    than zstd-1 on each, so the groups become one piece; it round-trips, and a probe `like` it cuts
    its body the same way and runs only lrzip on that piece."""
    fake_lrzip(tmp_path, monkeypatch)
    codes = torch.randint(-31, 32, (64, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    tensors = {"blocks.0.attn.c_q.weight.q": codes, "blocks.0.attn.proj.weight.q": codes.clone(),
               "blocks.0.attn.c_q.weight.scale": torch.ones(64, dtype=torch.float16)}
    cfg = dataclasses.replace(FAST, pergroup_codecs=("zstd", "lrzip"), zstd_level=1)
    raw = A.serialize(tensors, {"quant": {}}, cfg)
    body = A.move_head_last(raw)
    blob = A.compress(raw, "pergroup", cfg)
    table = pergroup.describe(blob[A.HEADER_BYTES:])
    groups = [p for p in pergroup.split(body, raw) if len(p) == codes.numel()]
    assert len(groups) == 2 and len(table) == len(pergroup.split(body, raw)) - 1
    assert {"codec": "lrzip", "raw_bytes": 2 * codes.numel()} in [{k: e[k] for k in ("codec", "raw_bytes")} for e in table]
    assert A.decompress(blob)[1] == raw
    calls = _calls(monkeypatch)
    probe = A.compress(raw, "pergroup", cfg, like=blob)
    assert probe == blob and sorted(calls) == sorted((e["raw_bytes"], e["codec"]) for e in table)
    other = dataclasses.replace(cfg, pergroup_codecs=("zstd",))  # no lrzip: every group its own piece
    assert len(pergroup.describe(A.compress(raw, "pergroup", other)[A.HEADER_BYTES:])) == len(table) + 1
