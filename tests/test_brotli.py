"""brotli beside lzma and zstd (pgolf.compress.artifact / pgolf.compress.compress): off by default, round trip,
byte-identical reruns, quality and window really used, chosen by size, lazy import with a clear
error when an artifact needs it, bad names and ranges named."""

import dataclasses
import json
import sys

import brotli
import pytest

from pgolf.compress import artifact as A
from pgolf.compress import compress as C
from pgolf import config
from pgolf.config import CompressConfig, ConfigError
from test_artifact import bits_equal, every_dtype
from test_compress import build, workdir  # noqa: F401 - fixture

FAST = CompressConfig(lzma_preset=6, zstd_level=19, brotli=True, brotli_quality=5, brotli_window=20)


def test_off_by_default_and_on_by_param():
    assert not CompressConfig().brotli and CompressConfig().brotli_quality == 11
    assert C.codec_names(CompressConfig()) == ("lzma", "zstd")
    assert C.codec_names(FAST) == ("lzma", "zstd", "brotli")
    assert C.codec_names(CompressConfig(codec="brotli")) == ("lzma", "zstd", "brotli")


def test_round_trip_and_byte_identical_reruns():
    raw = A.serialize(every_dtype(), {"quant": {}})
    blob = A.compress(raw, "brotli", FAST)
    assert blob == A.compress(raw, "brotli", FAST)  # deterministic
    assert blob[len(A.MAGIC) + 1] == A.CODEC_IDS["brotli"] == 3
    assert A.decompress(blob) == ("brotli", raw)
    tensors, _ = A.loads_artifact(blob)
    assert all(bits_equal(tensors[k], v) for k, v in every_dtype().items())  # bit-exact, NaN included


def test_quality_and_window_are_used():
    raw = A.serialize(every_dtype(), {"quant": {}}) * 30
    cfg = dataclasses.replace(FAST, brotli_quality=11, brotli_window=24)
    blob = A.compress(raw, "brotli", cfg)
    assert blob[A.HEADER_BYTES:] == brotli.compress(A.move_head_last(raw), quality=11, lgwin=24)
    assert len(blob) < len(A.compress(raw, "brotli", dataclasses.replace(cfg, brotli_quality=1)))


def test_auto_chooses_the_smallest_of_three():
    raw = A.serialize(every_dtype(), {"quant": {}})
    s = C.sizes(raw, FAST)
    assert set(s) == {"lzma", "zstd", "brotli"}
    codec, blob = C.choose(raw, FAST)
    assert len(blob) == min(s.values()) == s[codec]
    c, b = C.choose(raw, dataclasses.replace(FAST, brotli=False, codec="brotli"))
    assert c == "brotli" and len(b) == s["brotli"]


def test_compress_stage_reports_brotli_bytes_only_when_on(workdir):  # noqa: F811
    off = build(workdir)
    assert "brotli_bytes" not in off and off["codec"] in ("lzma", "zstd")
    on = build(workdir, FAST)
    assert on["model_bytes"] == min(on["lzma_bytes"], on["zstd_bytes"], on["brotli_bytes"])
    forced = build(workdir, dataclasses.replace(FAST, codec="brotli"))
    first = (workdir / "artifacts/final/model.ptz").read_bytes()
    assert forced["codec"] == "brotli" and len(first) == forced["model_bytes"] == on["brotli_bytes"]
    again = build(workdir, dataclasses.replace(FAST, codec="brotli"))  # a rerun: the same bytes
    assert (workdir / "artifacts/final/model.ptz").read_bytes() == first
    assert again["model_sha256"] == forced["model_sha256"]
    assert json.loads((workdir / "metrics/size.json").read_text())["codec"] == "brotli"


def test_missing_brotli_module_is_a_clear_error_only_for_brotli_artifacts(monkeypatch):
    raw = A.serialize(every_dtype(), {"quant": {}})
    blob, plain = A.compress(raw, "brotli", FAST), A.compress(raw, "zstd", FAST)
    monkeypatch.setitem(sys.modules, "brotli", None)  # `import brotli` now raises ImportError
    assert A.decompress(plain) == ("zstd", raw)  # other artifacts never import it
    with pytest.raises(A.ArtifactError, match=r"model\.ptz: compressed with brotli, but the Python module 'brotli' "
                                              r"is not installed \(pip install brotli\)"):
        A.decompress(blob, "model.ptz")
    with pytest.raises(ConfigError, match=r"compress\.brotli / compress\.codec brotli need the Python module 'brotli'"):
        A.compress(raw, "brotli", FAST)


def test_corrupt_brotli_body_names_the_file():
    blob = A.compress(A.serialize(every_dtype(), {"quant": {}}), "brotli", FAST)
    with pytest.raises(A.ArtifactError, match=r"x\.ptz: brotli body is truncated or corrupt"):
        A.decompress(blob[:-20], "x.ptz")


@pytest.mark.parametrize("over,message", [
    ({"codec": "gzip"}, "compress.codec must be one of auto, lzma, zstd, brotli, got 'gzip'"),
    ({"brotli_quality": 12}, "compress.brotli_quality must be in [0, 11], got 12"),
    ({"brotli_window": 25}, "compress.brotli_window must be in [10, 24], got 25"),
    ({"brotli_window": 9}, "compress.brotli_window must be in [10, 24], got 9"),
])
def test_bad_codec_params_are_named(over, message):
    """Checked once, where the compress section is loaded (config.check)."""
    with pytest.raises(ConfigError, match="params.yaml: " + message.replace("[", r"\[").replace("]", r"\]")):
        config.check(dataclasses.replace(FAST, **over))


def test_unknown_codec_name_in_the_compress_stage(workdir):  # noqa: F811
    with pytest.raises(ConfigError, match="compress.codec must be one of auto, lzma, zstd, brotli, got 'lz4'"):
        config.from_dict("compress", {"codec": "lz4"})


def test_brotli_decompression_is_bounded(monkeypatch):
    monkeypatch.setattr(A, "MAX_RAW_BYTES", 100_000)
    bomb = A.compress(bytes(100_001), "brotli", FAST)
    assert len(bomb) < 1000  # a small file that would expand past the bound
    with pytest.raises(A.ArtifactError, match=r"^bomb\.ptz: brotli body expands to more than 100,000 bytes"):
        A.decompress(bomb, "bomb.ptz")
    assert A.decompress(A.compress(bytes(99_990), "brotli", FAST), "ok.ptz")[1] == bytes(99_990)
