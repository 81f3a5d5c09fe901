"""Tests for the token data modules: pgolf.shared.shards (challenge shard format), pgolf.train.loader (the training
token loader), pgolf.shared.byte_tables, pgolf.shared.tokenizer_meta."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.shared import byte_tables
from pgolf.shared.byte_tables import ByteTables, load_byte_tables
from pgolf.train.loader import DistributedTokenLoader, TokenStream
from pgolf.shared.shards import ShardError, list_shards, load_tokens, read_shard, write_shard
from pgolf.shared.tokenizer_meta import read_tokenizer_meta

FIXTURE = Path(__file__).parent / "fixtures" / "fineweb_val_prefix20k.bin"  # first 20,000 official val tokens
OFFICIAL_MODEL = Path(__file__).resolve().parents[1] / "data" / "tokenizer_src" / "fineweb_1024_bpe.model"


def _raw_shard(tokens, magic=20240520, version=1, count=None) -> bytes:
    """A shard built by hand from the spec (§1.1), independent of pgolf.shared.shards' writer."""
    header = struct.pack("<3i", magic, version, len(tokens) if count is None else count) + b"\0" * (1024 - 12)
    return header + struct.pack(f"<{len(tokens)}H", *tokens)


# ----------------------------------------------------------------------------- shard format


def test_shard_round_trip(tmp_path):
    toks = np.array([1, 0, 65535, 7, 1024, 1], dtype=np.int64)
    p = tmp_path / "fineweb_train_000000.bin"
    assert write_shard(p, toks) == 6
    assert p.stat().st_size == 1024 + 2 * 6
    out = read_shard(p)
    assert out.dtype == np.uint16 and out.tolist() == toks.tolist()
    assert p.read_bytes() == _raw_shard(toks.tolist())


def test_empty_shard_round_trip(tmp_path):
    p = tmp_path / "fineweb_val_000000.bin"
    write_shard(p, np.array([], dtype=np.uint16))
    assert p.stat().st_size == 1024 and read_shard(p).size == 0


def test_reads_official_challenge_shard():
    blob = FIXTURE.read_bytes()
    header = np.frombuffer(blob[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 20000] and not header[3:].any()
    toks = read_shard(FIXTURE)
    assert toks.size == 20000
    # the official val stream starts with BOS and has 13 documents starting in its first 20k tokens
    assert toks[0] == 1 and int((toks == 1).sum()) == 13
    assert toks[:6].tolist() == [1, 966, 945, 946, 343, 551]
    assert int(toks.max()) < 1024


def test_writer_is_byte_identical_to_challenge_format(tmp_path):
    toks = read_shard(FIXTURE)
    p = tmp_path / "copy.bin"
    write_shard(p, toks.astype(np.int32))
    assert p.read_bytes() == FIXTURE.read_bytes()


def test_write_rejects_ids_over_uint16(tmp_path):
    with pytest.raises(ShardError, match="65536"):
        write_shard(tmp_path / "x.bin", np.array([1, 65536]))
    with pytest.raises(ShardError, match="-1"):
        write_shard(tmp_path / "x.bin", np.array([1, -1]))
    assert not (tmp_path / "x.bin").exists()


def test_wrong_magic(tmp_path):
    p = tmp_path / "bad_magic.bin"
    p.write_bytes(_raw_shard([1, 2, 3], magic=20240521))
    with pytest.raises(ShardError, match=r"bad_magic\.bin: wrong magic 20240521"):
        read_shard(p)


def test_wrong_version(tmp_path):
    p = tmp_path / "bad_version.bin"
    p.write_bytes(_raw_shard([1, 2, 3], version=2))
    with pytest.raises(ShardError, match=r"bad_version\.bin: unsupported shard version 2"):
        read_shard(p)


def test_size_mismatch(tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(_raw_shard([1, 2, 3], count=4))  # header claims 4 tokens, file holds 3
    with pytest.raises(ShardError, match=r"short\.bin: size mismatch: header says 4 tokens \(1032 bytes\) but the file has 1030"):
        read_shard(p)
    p.write_bytes(_raw_shard([1, 2, 3]) + b"\0")  # one stray byte
    with pytest.raises(ShardError, match="size mismatch"):
        read_shard(p)


def test_truncated_header_and_missing(tmp_path):
    p = tmp_path / "tiny.bin"
    p.write_bytes(b"\0" * 100)
    with pytest.raises(ShardError, match=r"tiny\.bin: truncated header"):
        read_shard(p)
    with pytest.raises(ShardError, match="nope.bin: shard not found"):
        read_shard(tmp_path / "nope.bin")


def test_list_shards_and_load_tokens(tmp_path):
    for i, toks in enumerate([[1, 5], [1, 6, 7]]):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", toks)
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 9])
    train = list_shards(tmp_path, "train")
    assert [p.name for p in train] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert load_tokens(train).tolist() == [1, 5, 1, 6, 7]
    with pytest.raises(ShardError, match="no fineweb_val_\\*.bin shards"):
        list_shards(_empty(tmp_path), "val")
    with pytest.raises(ShardError, match="split must be"):
        list_shards(tmp_path, "test")
    with pytest.raises(ShardError, match="shard folder not found"):
        list_shards(tmp_path / "missing", "train")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- loader


def _make_shards(folder: Path, sizes, seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(sizes):
        p = folder / f"fineweb_train_{i:06d}.bin"
        write_shard(p, rng.integers(0, 1024, n))
        paths.append(p)
    return paths


def test_token_stream_wraps_and_resumes(tmp_path):
    paths = _make_shards(tmp_path, [50, 30, 20])
    full = load_tokens(paths)  # 100 tokens
    s = TokenStream(list(reversed(paths)))  # sorted internally
    got = np.concatenate([s.take(37), s.take(37), s.take(37)])
    assert got.tolist() == np.concatenate([full, full])[:111].tolist()
    state = s.state_dict()
    nxt = s.take(60)
    s2 = TokenStream(paths)
    s2.load_state_dict(state)
    assert s2.take(60).tolist() == nxt.tolist() == np.concatenate([full, full])[111:171].tolist()


def test_token_stream_state_for_other_shards_rejected(tmp_path):
    paths = _make_shards(tmp_path, [10, 10])
    s = TokenStream(paths[:1])
    with pytest.raises(ShardError, match="saved for shards"):
        s.load_state_dict(TokenStream(paths).state_dict())


def test_distributed_loader_two_ranks_cover_single_stream(tmp_path):
    paths = _make_shards(tmp_path, [700, 300, 250])
    full = load_tokens(paths)
    stream = np.concatenate([full] * 4)
    seq_len, global_tokens, accum, world = 16, 128, 2, 2
    local = global_tokens // (world * accum)  # 32 tokens per rank per micro-batch
    ranks = [DistributedTokenLoader(paths, r, world, "cpu") for r in range(world)]
    pos = 0
    for _ in range(40):  # 40 * 66 = 2640 tokens > 1250: wraps around twice
        parts = []
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch(local, seq_len)
            assert x.shape == (local // seq_len, seq_len) and x.dtype == torch.int64
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
            parts.append(torch.cat([x.flatten(), y.flatten()[-1:]]).numpy())
        both = np.concatenate(parts)  # rank 0 slice then rank 1 slice = the next world*(local+1) tokens
        assert both.tolist() == stream[pos:pos + world * (local + 1)].tolist()
        pos += world * (local + 1)


def test_distributed_loader_state_round_trip(tmp_path):
    paths = _make_shards(tmp_path, [400, 123])
    a = DistributedTokenLoader(paths, 1, 2, "cpu")
    for _ in range(7):
        a.next_batch(32, 8)
    state = a.state_dict()
    expect = [a.next_batch(32, 8) for _ in range(5)]
    b = DistributedTokenLoader(paths, 1, 2, "cpu")
    b.load_state_dict(state)
    for x, y in expect:
        bx, by = b.next_batch(32, 8)
        assert torch.equal(bx, x) and torch.equal(by, y)
    with pytest.raises(ValueError, match="world_size 2, now 4"):
        DistributedTokenLoader(paths, 0, 4, "cpu").load_state_dict(state)


# ----------------------------------------------------------------------------- byte tables


@pytest.fixture(scope="module")
def official_tables():
    from pgolf.prepare.tokenizer import build_byte_tables, load_tokenizer

    sp = load_tokenizer(OFFICIAL_MODEL, 1024)
    return sp, build_byte_tables(sp, 1024)


def test_byte_counts_hand_computed(official_tables):
    sp, t = official_tables
    # pieces of the official sp1024 model used below
    assert [sp.id_to_piece(i) for i in (0, 1, 3, 199, 262, 267)] == ["<pad>", "<s>", "<unk>", "<0xC3>", "in", "\u2581the"]
    lone_space = sp.piece_to_id("\u2581")
    assert sp.id_to_piece(lone_space) == "\u2581"
    prev = torch.tensor([1, 262, 262, 262, 262, 1, 262, 267, 3, 0])
    tgt = torch.tensor([267, 267, 262, 199, 1, lone_space, lone_space, 3, 267, 267])
    # "▁the" after BOS: 3 ("the", the space is not counted after a boundary); after "in": 4;
    # "in": 2; byte piece: 1; BOS as target: 0; lone "▁": 0 after BOS, 1 otherwise; UNK: 0;
    # "▁the" after UNK or PAD (boundaries): 3
    assert t.count(prev, tgt).tolist() == [3, 4, 2, 1, 0, 0, 1, 0, 3, 3]
    assert t.count(prev, tgt).dtype == torch.int64
    assert t.is_boundary[:4].all() and not t.is_boundary[4:].any()
    assert (t.base_bytes[4:260] == 1).all() and not t.has_leading_space[4:260].any()


def test_byte_tables_save_load(tmp_path, official_tables):
    _, t = official_tables
    t = ByteTables(t.base_bytes, t.has_leading_space, t.is_boundary, {"tokenizer_sha256": "ab", "vocab_size": 1024})
    t.save(tmp_path / byte_tables.BYTE_TABLES_FILE)
    u = load_byte_tables(tmp_path)
    assert torch.equal(u.base_bytes, t.base_bytes) and u.base_bytes.dtype == torch.int16
    assert torch.equal(u.has_leading_space, t.has_leading_space) and torch.equal(u.is_boundary, t.is_boundary)
    assert u.meta == {"tokenizer_sha256": "ab", "vocab_size": 1024}
    with pytest.raises(FileNotFoundError, match="byte_tables.pgt: byte tables not found"):
        load_byte_tables(tmp_path / "nowhere")


def test_read_tokenizer_meta(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model_file": "tokenizer.model", "vocab_size": 1024, "sha256": "x"}')
    assert read_tokenizer_meta(tmp_path)["vocab_size"] == 1024
    (tmp_path / "tokenizer.json").write_text('{"model_file": "tokenizer.model"}')
    with pytest.raises(ValueError, match="missing key 'vocab_size'"):
        read_tokenizer_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        read_tokenizer_meta(tmp_path / "none")


def test_stream_bytes_matches_count(official_tables):
    _, t = official_tables
    toks = read_shard(FIXTURE)
    x = torch.from_numpy(toks.astype(np.int64))
    assert t.stream_bytes(toks) == int(t.count(x[:-1], x[1:]).sum()) > 40000
    assert t.stream_bytes(toks[:1]) == 0
