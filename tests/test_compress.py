"""stages.compress / pgolf.compress.compress: quant.pgt -> model.ptz + train_gpt.py + code_files.json +
metrics/size.json; codec choice, code bytes (the packed script's), the cap check (over the cap:
metrics written, exit 1 with the excess), bad input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from conftest import MICRO_CFG, tiny_model
from pgolf import config
from pgolf.shared import checked, tensorfile
from pgolf.compress import artifact, pack
from pgolf.config import CompressConfig
from pgolf.shared.rowquant import qmax_for, quantize, row_scale
from pgolf.shared.model import GPT
from stages import compress

ROOT = Path(__file__).resolve().parents[1]
MICRO = MICRO_CFG
TOKENIZER = {"sha256": "5" * 64, "vocab_size": 64}
FAST = CompressConfig(lzma_preset=6, zstd_level=19)




def quantized(model: GPT, lossless: bool = False) -> tuple[dict, dict]:
    """quant.pgt-shaped (tensors, meta): int6 block matrices, int8 tok_emb, fp16 passthrough;
    lossless=True keeps every tensor as an fp32 passthrough."""
    sd = model.export_state_dict()
    tensors, quant = {}, {}
    for name, w in sd.items():
        if lossless:
            tensors[name], quant[name] = w.float(), {"type": "passthrough", "bits": 32, "method": "fp32"}
        elif name in model.quantizable_names() or name == "tok_emb.weight":
            bits = 6 if name != "tok_emb.weight" else 8
            s = row_scale(w, 1.0, qmax_for(bits))
            tensors[f"{name}.q"], tensors[f"{name}.scale"] = quantize(w, s, qmax_for(bits)), s.half()
            quant[name] = {"type": f"int{bits}", "bits": bits, "method": "gptq_lite"}
        else:
            tensors[name], quant[name] = w.half(), {"type": "passthrough", "bits": 16, "method": "fp16"}
    meta = {"model": dataclasses.asdict(model.cfg), "train_seq_len": 64, "tokenizer": TOKENIZER, "quant": quant}
    return tensors, meta


def write_quant(path: Path, model: GPT, lossless: bool = False) -> Path:
    tensors, meta = quantized(model, lossless)
    tensorfile.save(path, tensors, kind="quantized", meta=meta)
    return path


def copy_code(dst: Path) -> None:
    """The packed sources, the raw evaluation files + this stage into a scratch repo (code bytes
    are counted from cwd)."""
    for rel in {*pack.PACKED_FILES, *pack.CODE_FILES, "pgolf/compress/pack.py", "stages/compress.py"}:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes((ROOT / rel).read_bytes())


@pytest.fixture
def workdir(tmp_path):
    write_quant(tmp_path / "artifacts/quant/quant.pgt", tiny_model())
    return tmp_path


SCRIPT = b"# a stand-in for the packed train_gpt.py\n" * 10


def build(workdir, cfg=FAST):
    return compress.build(cfg, SCRIPT, workdir / "artifacts/quant/quant.pgt", workdir / "artifacts/final",
                          workdir / "metrics/size.json", pack.code_files(ROOT))


def write_params(workdir: Path, **compress_kv) -> None:
    """The repo's params.yaml with compress.* overridden and the params gate's checked files (the
    packed script bakes every section)."""
    conftest.write_params(workdir, compress=compress_kv)


def test_build_writes_artifact_code_list_and_metrics(workdir):
    m = build(workdir)
    final = workdir / "artifacts/final"
    assert sorted(p.name for p in final.iterdir()) == ["code_files.json", "model.ptz", "train_gpt.py"]
    size = json.loads((workdir / "metrics/size.json").read_text())
    assert size == m
    assert m["model_bytes"] == (final / "model.ptz").stat().st_size == min(m["lzma_bytes"], m["zstd_bytes"])
    assert m["codec"] == ("lzma" if m["lzma_bytes"] <= m["zstd_bytes"] else "zstd")
    code = json.loads((final / "code_files.json").read_text())
    assert (final / "train_gpt.py").read_bytes() == SCRIPT and m["code_bytes"] == len(SCRIPT) == code["bytes"]
    assert m["code_count"] == "packed train_gpt.py" and code["sha256"] == m["code_sha256"]
    raw = code["eval_files_raw"]
    assert [f["path"] for f in raw["files"]] == list(pack.CODE_FILES)
    assert raw["total"] == m["code_bytes_eval_files_raw"] == pack.code_bytes(ROOT)
    assert m["total_bytes"] == m["model_bytes"] + m["code_bytes"] and m["under_cap"] is True
    assert m["cap_bytes"] == 16_000_000
    # the artifact holds exactly the quantized tensors and meta
    tensors, meta = artifact.read_artifact(final / "model.ptz")
    qt, qh = tensorfile.load(workdir / "artifacts/quant/quant.pgt", kind="quantized")
    assert list(tensors) == list(qt) and all(torch.equal(tensors[k], qt[k]) for k in qt)
    assert meta["quant"] == qh["meta"]["quant"] and meta["tokenizer"] == TOKENIZER


@pytest.mark.parametrize("codec", ["lzma", "zstd"])
def test_forced_codec(workdir, codec):
    m = build(workdir, dataclasses.replace(FAST, codec=codec))
    assert m["codec"] == codec and m["model_bytes"] == m[f"{codec}_bytes"]
    assert artifact.decompress((workdir / "artifacts/final/model.ptz").read_bytes())[0] == codec


def test_over_cap_writes_metrics_and_exits_nonzero(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    copy_code(workdir)
    write_params(workdir, codec="auto", lzma_preset=6, zstd_level=19, cap_bytes=50000, target_bytes=50000, prune=False)
    assert compress.main() == 1
    size = json.loads((workdir / "metrics/size.json").read_text())
    over = size["total_bytes"] - 50000
    assert size["under_cap"] is False and size["cap_bytes"] == 50000 and over > 0
    baked = checked.read_all(pack.BAKED_SECTIONS, workdir)
    assert size["code_bytes"] == len(pack.build_script(workdir, baked)) == (workdir / "artifacts/final/train_gpt.py").stat().st_size
    err = capsys.readouterr().err
    assert f"compress: error: artifact is over the cap by {over:,} bytes" in err
    assert f"+ packed code {size['code_bytes']:,}" in err


def test_stage_cli_and_bad_input(workdir):
    """The real entry point: missing / foreign quant.pgt -> exit 1 naming the file; then success."""
    def run():
        return subprocess.run([sys.executable, "-m", "stages.compress"], cwd=workdir, capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    write_params(workdir, codec="zstd")
    copy_code(workdir)
    quant = workdir / "artifacts/quant/quant.pgt"
    good = quant.read_bytes()
    tensorfile.save(quant, {"x": torch.zeros(1)}, kind="float_weights")
    p = run()
    assert p.returncode == 1 and p.stderr.startswith("compress: error: ") and str(Path("artifacts/quant/quant.pgt")) in p.stderr
    assert not (workdir / "artifacts/final").exists()
    quant.write_bytes(good)
    p = run()
    assert p.returncode == 0, p.stderr
    assert "compress: zstd" in p.stdout and json.loads((workdir / "metrics/size.json").read_text())["codec"] == "zstd"


def test_bad_codec_param(workdir):
    with pytest.raises(config.ConfigError, match="compress.codec"):  # checked where params are loaded
        config.check(dataclasses.replace(FAST, codec="gzip"))


def test_quant_meta_missing_key(workdir):
    tensors, meta = quantized(tiny_model())
    del meta["tokenizer"]
    tensorfile.save(workdir / "artifacts/quant/quant.pgt", tensors, kind="quantized", meta=meta)
    with pytest.raises(compress.CompressError, match="quant.pgt: meta lacks 'tokenizer'"):
        build(workdir)


def test_disk_full_is_an_error_naming_the_file_and_outputs_stay(workdir):
    """A write the system refuses (here: the file-size limit, errno 27 EFBIG, the error a full or
    size-limited disk gives) ends the stage with an error naming the file; no traceback, and the
    previous artifact and metrics are untouched."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    write_params(workdir, codec="zstd")
    copy_code(workdir)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "stages.compress"]
    assert subprocess.run(run, cwd=workdir, capture_output=True, env=env).returncode == 0
    before = {p: (workdir / p).read_bytes() for p in ("artifacts/final/model.ptz", "metrics/size.json")}
    p = subprocess.run(run, cwd=workdir, capture_output=True, text=True, env=env, preexec_fn=limited)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("compress: error: artifacts/final/model.ptz: cannot write (File too large"), p.stderr
    assert "Traceback" not in p.stderr
    assert {p: (workdir / p).read_bytes() for p in before} == before
    assert sorted(q.name for q in (workdir / "artifacts").iterdir()) == ["final", "params", "quant"]  # no temp folder left
