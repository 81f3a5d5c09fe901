"""bench.bench_pergroup on a trained model's quant.pgt (--quant): every row round-trips, the JSON names
the model it was given, a missing file or provenance is refused before any work, and --probe times
a pruning probe both ways."""

import json

import pytest
import torch

from bench import bench_pergroup
from conftest import tiny_model
from pgolf.compress import compress
from pgolf.shared import tensorfile
from test_compress import write_quant


def test_quant_file_rows_and_provenance(tmp_path):
    quant = write_quant(tmp_path / "quant" / "quant.pgt", tiny_model())
    out = tmp_path / "pergroup.json"
    assert bench_pergroup.main(["--profile", "tiny", "--quant", str(quant), "--model", "tiny test model",
                                "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "tiny test model" and r["quant_build_seconds"] == 0.0
    got = {(row["layout"], row["codec"], row["row_order"], row["transpose_groups"]) for row in r["rows"]}
    assert {("flat", "lzma", None, None), ("flat", "zstd", None, None), ("flat", "brotli", None, None),
            ("pergroup", "pergroup", "l1", False), ("pergroup", "pergroup", "l1", True)} <= got
    assert all(row["bytes"] > 0 for row in r["rows"])


@pytest.mark.parametrize("model", ["", "some run"])
def test_quant_needs_a_file_and_its_provenance(tmp_path, model, capsys):
    quant = write_quant(tmp_path / "quant.pgt", tiny_model()) if model == "" else tmp_path / "missing.pgt"
    with pytest.raises(SystemExit) as e:
        bench_pergroup.main(["--quant", str(quant), "--model", model, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "--quant" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_layouts_keeps_only_those_rows_and_refuses_an_unknown_one(tmp_path, capsys):
    quant = write_quant(tmp_path / "quant" / "quant.pgt", tiny_model())
    out = tmp_path / "pergroup.json"
    args = ["--profile", "tiny", "--quant", str(quant), "--model", "tiny test model", "--out", str(out)]
    assert bench_pergroup.main([*args, "--layouts", "pergroup"]) == 0
    assert {row["layout"] for row in json.loads(out.read_text())["rows"]} == {"pergroup"}
    with pytest.raises(SystemExit) as e:
        bench_pergroup.main([*args, "--layouts", "pergroup,zip"])
    assert e.value.code == 2 and "--layouts" in capsys.readouterr().err
    assert bench_pergroup.main([*args, "--layouts", "pergroup", "--codecs", "lzma,zstd"]) == 0
    r = json.loads(out.read_text())
    assert r["codecs_here"] == ["lzma", "zstd"] and all(row["codecs_tried"] == ["lzma", "zstd"] for row in r["rows"])
    with pytest.raises(SystemExit) as e:
        bench_pergroup.main([*args, "--codecs", "zip"])
    assert e.value.code == 2 and "--codecs zip: compress.pergroup_codecs must be a subset" in capsys.readouterr().err


def test_probe_times_one_pruning_probe_both_ways(tmp_path, monkeypatch):
    """--probe N: the per-group body with N ±1 values pruned, compressed by every codec and by the
    unpruned body's codec per piece; both round-trip (checked inside) and the JSON has both. The
    unpruned body is the pca row's, not compressed again."""
    calls, real = [], bench_pergroup.artifact.compress
    monkeypatch.setattr(bench_pergroup.artifact, "compress",
                        lambda raw, codec, cfg, **kw: calls.append(codec) or real(raw, codec, cfg, **kw))
    quant = write_quant(tmp_path / "quant" / "quant.pgt", tiny_model())
    tensors, header = tensorfile.load(quant, kind="quantized")
    int6 = [n for n, i in header["meta"]["quant"].items() if isinstance(i, dict) and i.get("type") == "int6"]
    tensorfile.save(quant.parent / compress.HDIAG, {n: torch.ones(tensors[f"{n}.q"].shape[1]) for n in int6},
                    kind=compress.HDIAG_KIND)
    out = tmp_path / "pergroup.json"
    assert bench_pergroup.main(["--profile", "tiny", "--quant", str(quant), "--model", "tiny test model",
                                "--layouts", "pergroup", "--probe", "100", "--out", str(out)]) == 0
    p = json.loads(out.read_text())["probe"]
    assert p["pruned_values"] == 100 and p["unpruned_bytes"] > 0
    assert p["every_codec"]["bytes"] > 0 and p["like_unpruned"]["bytes"] >= p["every_codec"]["bytes"]
    assert calls == ["pergroup"] * 5  # the pca, l1 and transposed l1 rows, then the probe's two
