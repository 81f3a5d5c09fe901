"""The quantize stage on a really trained tiny model: treatments, outputs (quant.pgt, hdiag.pgt for
the compress stage's pruning), determinism, the QAT-bits check, and every bad input (clear error,
previous outputs intact). Pruning itself is the compress stage's (tests/test_compress_prune.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _quant_model import MICRO, eval_loss, trained, write_train_dir
from conftest import single_thread, write_params
from pgolf import config
from pgolf.config import ConfigError
from pgolf.shared import rowquant, tensorfile
from pgolf.compress import artifact, pack
from pgolf.compress.dequant import dequantize_state
from pgolf.quantize import quantize as Q
from stages import quantize as stage

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ["int6_tensors", "passthrough_tensors", "pruned_values", "quantize_seconds", "qat_bits", "qat_bits_match"]


pytestmark = pytest.mark.usefixtures("one_thread")


def qcfg(**kw):
    return config.from_dict("quantize", {"passthrough_max_numel": 512, **kw})


def run_in(root: Path, q=None, out="quant"):
    return Q.run(q or qcfg(), root / "artifacts" / "train", root / "artifacts" / out, root / "metrics" / f"{out}.json")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    write_train_dir(root)
    with single_thread():
        m = run_in(root)
    return root, m


def load_quant(root: Path, out="quant"):
    tensors, header = tensorfile.load(root / "artifacts" / out / "quant.pgt", kind="quantized")
    return tensors, header["meta"]


def test_treatments_and_contract_files(done):
    root, m = done
    tensors, meta = load_quant(root)
    quant = meta["quant"]
    for i in range(MICRO.num_layers):
        for k in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            assert quant[f"blocks.{i}.{k}.weight"] == {"type": "int6", "bits": 6, "method": "gptq"}
    assert quant["tok_emb.weight"]["type"] == "int8"
    assert quant["bigram.embed.weight"]["type"] == "int8"  # 64 x 16 = 1024 > 512
    assert quant["ve_shared.embed.weight"]["type"] == "int8"
    assert quant["bigram.proj.weight"] == {"type": "int6", "bits": 6, "method": "gptq_lite"}  # no Hessian
    assert quant["ve_shared.proj.weight"] == {"type": "passthrough", "bits": 16, "method": "fp16"}  # 512 numel
    assert quant["smear.gate"]["type"] == "passthrough"
    for name, info in quant.items():
        if info["type"] == "passthrough":
            assert tensors[name].dtype == torch.float16
        else:
            q, s = tensors[f"{name}.q"], tensors[f"{name}.scale"]
            qmax = 31 if info["type"] == "int6" else 127
            assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
            assert s.dtype == torch.float16 and s.shape == (q.shape[0],)
    assert set(meta) == {"model", "train_seq_len", "tokenizer", "quant"}
    assert meta["model"]["num_layers"] == MICRO.num_layers
    assert all(k in m for k in CONTRACT)
    assert m["int6_tensors"] == 13 and m["gptq_tensors"] == 12 and m["gptq_lite_tensors"] == 1
    assert m["int8_tensors"] == 3 and m["int6_tensors"] + m["int8_tensors"] + m["passthrough_tensors"] == len(quant)
    assert m["damping_retries"] == 0 and m["qat_bits"] == 6 and m["qat_bits_match"] is True
    assert m["pruned_values"] == 0  # pruning is the compress stage's (size.json)
    hdiag, header = tensorfile.load(root / "artifacts" / "quant" / Q.HDIAG, kind=Q.HDIAG_KIND)
    gptq = [n for n, i in quant.items() if i.get("method") == "gptq"]
    assert sorted(hdiag) == sorted(gptq) and len(gptq) == 12  # GPTQ-lite has no Hessian
    _, h, _ = trained()
    assert all(torch.equal(hdiag[n], torch.diagonal(h[n]).float()) for n in gptq)
    assert 0 < m["prune_candidates"] == sum(int((tensors[f"{n}.q"].abs() == 1).sum())
                                            for n, i in quant.items() if i["type"] == "int6")
    assert 0 < m["gptq_rtn_error_ratio"] < 0.5  # measured 0.31
    assert json.loads((root / "metrics" / "quant.json").read_text()) == m
    table = json.loads((root / "artifacts" / "quant" / "table.json").read_text())
    assert [r["name"] for r in table["tensors"]] == list(trained()[0])  # model.pgt order
    assert sorted(quant) == sorted(trained()[0])
    for r in table["tensors"]:
        assert {"name", "shape", "treatment", "method", "bytes_raw"} <= set(r)
    assert table["clip_candidates"] == [0.999, 0.9995, 0.9999, 0.99999, 1.0]  # QAT 0.9995 already in
    assert table["bytes_raw"] == m["raw_bytes"]


def test_artifact_round_trip_loads_into_the_model_and_stays_close(done):
    """Loss on held-out chain tokens: float 3.7407, quantized (int6 GPTQ + int8 embeddings) 3.7458."""
    root, _ = done
    tensors, meta = load_quant(root)
    back, meta2 = artifact.deserialize(artifact.serialize(tensors, meta))
    sd = dequantize_state(back, meta2)
    w, _, _ = trained()
    assert abs(eval_loss(sd) - eval_loss(w)) < 0.02


def test_clip_candidates_include_the_qat_quantile(tmp_path):
    from _quant_model import model_meta

    meta = model_meta() | {"qat_quantile": 0.99}
    write_train_dir(tmp_path, meta=meta)
    run_in(tmp_path, qcfg())
    table = json.loads((tmp_path / "artifacts" / "quant" / "table.json").read_text())
    assert table["clip_candidates"][-1] == 0.99
    assert all("0.99" in r["clip_rows"] for r in table["tensors"] if r["method"] == "gptq")


def test_same_inputs_give_byte_identical_outputs(done, tmp_path):
    root, _ = done
    shutil.copytree(root / "artifacts" / "train", tmp_path / "artifacts" / "train")
    run_in(tmp_path)
    for f in ("quant.pgt", "hdiag.pgt", "table.json"):
        assert (tmp_path / "artifacts" / "quant" / f).read_bytes() == (root / "artifacts" / "quant" / f).read_bytes()


def test_embed_mode_fp16(done, tmp_path):
    root, _ = done
    shutil.copytree(root / "artifacts" / "train", tmp_path / "artifacts" / "train")
    m = run_in(tmp_path, qcfg(embed_mode="fp16"))
    _, meta = load_quant(tmp_path)
    assert meta["quant"]["tok_emb.weight"] == {"type": "passthrough", "bits": 16, "method": "fp16"}
    assert meta["quant"]["bigram.embed.weight"]["type"] == "int8"
    assert m["int8_tensors"] == 2


def test_damping_retries_are_reported(done, tmp_path):
    root, _ = done
    w, h, _ = trained()
    bad = dict(h)
    name = "blocks.1.attn.proj.weight"
    C = h[name].shape[0]
    bad[name] = torch.kron(torch.eye(C // 2), torch.tensor([[1.0, 2.5], [2.5, 1.0]]))  # indefinite
    write_train_dir(tmp_path, hessians=bad)
    m = run_in(tmp_path, qcfg())
    assert m["damping_retries"] == 1 and m["damping_retried"] == {name: pytest.approx(10.0)}
    table = json.loads((tmp_path / "artifacts" / "quant" / "table.json").read_text())
    row = next(r for r in table["tensors"] if r["name"] == name)
    assert row["damp_retries"] == 3 and row["damp"] == pytest.approx(10.0) and row["method"] == "gptq"


# ----------------------------------------------------------------------------- the stage, bad inputs


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """A cwd like the repo root: params.yaml, artifacts/train, the packed script's sources, and previous
    outputs (sentinels) that a failing run must leave exactly as they were."""
    write_train_dir(tmp_path)
    for rel in pack.PACKED_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    write_params(tmp_path, quantize={"passthrough_max_numel": 512})
    (tmp_path / "artifacts" / "quant").mkdir(parents=True)
    (tmp_path / "artifacts" / "quant" / "quant.pgt").write_bytes(b"previous")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "quant.json").write_text('{"previous": true}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(root: Path, **kw):
    """quantize.* changed in params.yaml and through the params gate (ConfigError for a bad value)."""
    write_params(root, quantize={"passthrough_max_numel": 512, **kw})


def fails_cleanly(root: Path, capsys, match: str):
    assert stage.main() == 1
    err = capsys.readouterr().err
    assert err.startswith("quantize: error: ") and match in err, err
    assert (root / "artifacts" / "quant" / "quant.pgt").read_bytes() == b"previous"
    assert sorted(p.name for p in (root / "artifacts" / "quant").iterdir()) == ["quant.pgt"]
    assert (root / "metrics" / "quant.json").read_text() == '{"previous": true}\n'
    assert sorted(p.name for p in (root / "artifacts").iterdir()) == ["params", "quant", "train"]  # no temp dirs left
    return err


def test_stage_success_replaces_previous_outputs(stage_dir, capsys):
    assert stage.main() == 0
    out = capsys.readouterr().out
    assert out.startswith("quantize: 13 int6 (12 GPTQ, 1 GPTQ-lite), 3 int8") and out.count("\n") == 1
    assert (stage_dir / "artifacts" / "quant" / "quant.pgt").read_bytes()[:8] == tensorfile.MAGIC
    m = json.loads((stage_dir / "metrics" / "quant.json").read_text())
    assert all(k in m for k in CONTRACT)
    assert "warning" not in out and m["qat_bits_match"] is True
    assert sorted(p.name for p in (stage_dir / "artifacts" / "quant").iterdir()) == ["hdiag.pgt", "quant.pgt",
                                                                                      "table.json"]


@pytest.mark.parametrize("missing", ["hessians.pgt", "model.pgt"])
def test_missing_input_file(stage_dir, capsys, missing):
    (stage_dir / "artifacts" / "train" / missing).unlink()
    fails_cleanly(stage_dir, capsys, f"artifacts/train/{missing}: not found")


def test_hessian_missing_for_a_matrix(stage_dir, capsys):
    _, h, _ = trained()
    write_train_dir(stage_dir, hessians={k: v for k, v in h.items() if k != "blocks.1.mlp.fc.weight"})
    fails_cleanly(stage_dir, capsys,
                  "hessians.pgt: missing Hessian for 1 matrix(es), e.g. blocks.1.mlp.fc.weight")


def test_hessian_wrong_shape(stage_dir, capsys):
    _, h, _ = trained()
    write_train_dir(stage_dir, hessians={**h, "blocks.0.mlp.proj.weight": torch.eye(64)})
    fails_cleanly(stage_dir, capsys, "hessians.pgt: blocks.0.mlp.proj.weight is torch.float32 (64, 64), "
                                     "expected float32 (192, 192)")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_hessian_not_finite(stage_dir, capsys, value):
    _, h, _ = trained()
    bad = h["blocks.0.attn.c_k.weight"].clone()
    bad[3, 5] = value
    write_train_dir(stage_dir, hessians={**h, "blocks.0.attn.c_k.weight": bad})
    fails_cleanly(stage_dir, capsys, "hessians.pgt: blocks.0.attn.c_k.weight has non-finite entries")


@pytest.mark.parametrize("key,value,match", [
    ("bits", 9, "quantize.bits must be in the supported range [2, 8], got 9"),
    ("bits", 1, "quantize.bits must be in the supported range [2, 8], got 1"),
    ("embed_mode", "int4", "quantize.embed_mode must be one of int8, fp16, gptq, got 'int4'"),
    ("embed_bits", 9, "quantize.embed_bits must be in the supported range [2, 8], got 9"),
    ("clip_rule", "max", "quantize.clip_rule must be one of quantile, sigma, got 'max'"),
    ("mlp_clip_sigmas", 0.0, "quantize.mlp_clip_sigmas must be positive and finite"),
    ("clip_quantiles", "0.999,1.0", "quantize.clip_quantiles must be a list of float, got str"),
    ("clip_quantiles", [0.999, 1.5], "quantize.clip_quantiles must be a list of distinct numbers in (0, 1]"),
    ("clip_quantiles", [], "quantize.clip_quantiles"),
])
def test_bad_params_stop_at_the_gate_and_the_outputs_stay(stage_dir, key, value, match):
    with pytest.raises(ConfigError) as e:
        set_params(stage_dir, **{key: value})
    assert match in str(e.value)
    assert (stage_dir / "artifacts" / "quant" / "quant.pgt").read_bytes() == b"previous"
    assert (stage_dir / "metrics" / "quant.json").read_text() == '{"previous": true}\n'


def test_other_bits_work_and_the_qat_mismatch_is_reported(stage_dir, capsys):
    """Training's late QAT ran at 6 bits (model.pgt meta qat_bits): int4 still quantizes, with a
    warning line in the stage output and the mismatch in metrics/quant.json."""
    set_params(stage_dir, bits=4)
    assert stage.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("quantize: warning: quantize.bits=4 but training's late QAT fake-quantized at 6 bits "
                      "(artifacts/train/model.pgt meta qat_bits): the weights were not trained for int4; "
                      "expect a larger quantization gap")
    assert out[1].startswith("quantize: 13 int4")
    m = json.loads((stage_dir / "metrics" / "quant.json").read_text())
    assert (m["bits"], m["qat_bits"], m["qat_bits_match"]) == (4, 6, False)
    tensors, meta = load_quant(stage_dir)
    assert meta["quant"]["blocks.0.mlp.fc.weight"]["bits"] == 4
    assert int(tensors["blocks.0.mlp.fc.weight.q"].abs().max()) <= rowquant.qmax_for(4)


def test_python_dash_m_entry_point(stage_dir):
    for pkg in ("pgolf", "stages"):  # `python -m` imports from the cwd first: give it the whole packages
        shutil.copytree(ROOT / pkg, stage_dir / pkg, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "stages.quantize"], cwd=stage_dir, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("quantize: ")


def test_odd_mlp_width_and_attention_gate_quantize_and_load(tmp_path):
    """Any hidden width model.mlp_mult allows (here 97 = 1.515625 * 64) goes through GPTQ (one
    Hessian of 97 x 97 for mlp.proj), and the sparse attention gate (4 x 12) passes through."""
    import dataclasses

    from _quant_model import QAT_QUANTILE, SEQ, collect_hessians, markov_tokens, model_meta
    from pgolf.shared.model import GPT

    cfg = dataclasses.replace(MICRO, mlp_mult=1.515625, attn_gate_window=12, smear_bos_mask=True)
    torch.manual_seed(0)
    model = GPT(cfg, qat_quantile=QAT_QUANTILE, train_seq_len=SEQ)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hessians = collect_hessians(model, markov_tokens(64, seed=2))
    assert hessians["blocks.1.mlp.proj.weight"].shape == (97, 97)
    write_train_dir(tmp_path, model.export_state_dict(), hessians,
                    model_meta() | {"model": dataclasses.asdict(cfg)})
    with single_thread():
        run_in(tmp_path, qcfg())
    tensors, meta = load_quant(tmp_path)
    assert meta["quant"]["blocks.0.mlp.proj.weight"] == {"type": "int6", "bits": 6, "method": "gptq"}
    assert tensors["blocks.0.mlp.proj.weight.q"].shape == (64, 97)
    assert tensors["blocks.1.mlp.fc.weight.q"].shape == (97, 64)
    assert meta["quant"]["blocks.1.attn.gate_w"]["type"] == "passthrough"
    back = GPT(config.ModelConfig(**meta["model"]), train_seq_len=SEQ)  # as the evaluate stage rebuilds it
    back.load_export_state_dict(dequantize_state(tensors, meta))
    x = markov_tokens(16, seed=4)
    with torch.no_grad():
        lq, lf = float(back(x[:, :-1], x[:, 1:])), float(model(x[:, :-1], x[:, 1:]))
    assert abs(lq - lf) < 0.02 * lf, (lq, lf)


def test_pr2135_model_knobs_quantize_pack_and_load(tmp_path):
    """PR #2135's front end and head (no BigramHash, no VE, the add-form SmearGate, skip gates, the
    learned 0-d softcaps, lane lambdas for every layer): every small tensor passes through, the
    artifact round trip keeps the shapes (the scalar caps too), and the model loads back."""
    import dataclasses

    from _quant_model import QAT_QUANTILE, SEQ, collect_hessians, markov_tokens, model_meta
    from pgolf.shared.model import GPT

    cfg = dataclasses.replace(MICRO, bigram_buckets=0, ve_last_n=0, smear_form="add", skip_gates=True,
                              logit_softcap_learned=True, attn_gate_window=12, parallel_start_layer=1,
                              parallel_lambdas_all_layers=True)
    torch.manual_seed(0)
    model = GPT(cfg, qat_quantile=QAT_QUANTILE, train_seq_len=SEQ)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    write_train_dir(tmp_path, model.export_state_dict(), collect_hessians(model, markov_tokens(64, seed=2)),
                    model_meta() | {"model": dataclasses.asdict(cfg)})
    with single_thread():
        run_in(tmp_path, qcfg())
    tensors, meta = load_quant(tmp_path)
    for name in ("softcap_pos", "softcap_neg", "smear.gate", "smear.lam", "skip_gates", "parallel_post"):
        assert meta["quant"][name]["type"] == "passthrough", name
    tensors, meta = artifact.deserialize(artifact.serialize(tensors, meta))
    assert tensors["softcap_pos"].shape == () and tensors["parallel_resid"].shape == (2, 2)
    back = GPT(config.ModelConfig(**meta["model"]), train_seq_len=SEQ)  # as the evaluate stage rebuilds it
    back.load_export_state_dict(dequantize_state(tensors, meta))
    assert float(back.softcap_neg.detach()) == float(model.softcap_neg.detach().half())
    x = markov_tokens(16, seed=4)
    with torch.no_grad():
        lq, lf = float(back(x[:, :-1], x[:, 1:])), float(model(x[:, :-1], x[:, 1:]))
    assert abs(lq - lf) < 0.02 * lf, (lq, lf)


def test_meta_without_qat_bits_is_unknown_and_a_bad_one_is_an_error(tmp_path):
    from _quant_model import model_meta

    meta = {k: v for k, v in model_meta().items() if k != "qat_bits"}
    write_train_dir(tmp_path, meta=meta)
    m = run_in(tmp_path)
    assert (m["qat_bits"], m["qat_bits_match"]) == (None, None) and Q.qat_warning(m) is None
    write_train_dir(tmp_path, meta=model_meta() | {"qat_bits": "six"})
    with pytest.raises(Q.QuantizeError, match="model.pgt: meta qat_bits must be an integer in \\[2, 8\\], got 'six'"):
        run_in(tmp_path)


PR2135 = dict(embed_mode="gptq", embed_bits=7, clip_rule="sigma", mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0,
              lqer_enabled=True, lqer_asym=True, lqer_group=32)  # profiles/pr2135.yaml's quantize section


def _head_hessians() -> dict[str, torch.Tensor]:
    """The calibration Hessians of the trained micro model plus its tied head's (train.hessian_head)."""
    from _quant_model import QAT_QUANTILE, SEQ, collect_hessians, markov_tokens
    from pgolf.shared.model import GPT

    model = GPT(MICRO, qat_quantile=QAT_QUANTILE, train_seq_len=SEQ)
    model.load_export_state_dict(trained()[0])
    model.eval()
    model.head_hessian = True
    return collect_hessians(model, markov_tokens(64, seed=2))


def test_pr2135_quantize_knobs_round_trip_through_the_artifact(tmp_path):
    """int7 GPTQ of tok_emb with the head-input Hessian, the sigma clip per class, asymmetric LQER:
    the scales are the sigma rule's of each class, the codes in range, and quantize -> artifact ->
    dequantize is byte-identical and loads into a model about as good as the float one
    (measured: held-out loss float 3.7407, these knobs 3.7449, the default settings 3.7458)."""
    hessians = _head_hessians()
    write_train_dir(tmp_path, hessians=hessians)
    with single_thread():
        m = run_in(tmp_path, qcfg(**PR2135))
    tensors, meta = load_quant(tmp_path)
    quant, w = meta["quant"], trained()[0]
    emb = quant["tok_emb.weight"]
    assert {k: emb[k] for k in ("type", "bits", "method")} == {"type": "int6", "bits": 7, "method": "gptq"}
    assert int(tensors["tok_emb.weight.q"].abs().max()) <= 63 and m["embed_method"] == "gptq"
    classes = {"tok_emb.weight": (14.0, 63), "blocks.0.attn.c_q.weight": (13.0, 31),
               "blocks.1.attn.proj.weight": (13.0, 31), "blocks.0.mlp.fc.weight": (11.5, 31),
               "bigram.proj.weight": (12.85, 31)}  # name -> (its class's sigmas, qmax)
    for name, (sigmas, qmax) in classes.items():
        assert torch.equal(tensors[f"{name}.scale"].float(), rowquant.sigma_scale(w[name], sigmas, qmax)), name
    assert quant["bigram.proj.weight"]["method"] == "gptq_lite" and quant["bigram.embed.weight"]["type"] == "int8"
    table = json.loads((tmp_path / "artifacts" / "quant" / "table.json").read_text())
    assert table["clip_rule"] == "sigma" and table["clip_candidates"] == []
    assert {r["name"]: r for r in table["tensors"]}["tok_emb.weight"]["clip_rows"] == {"sigma=14.0": MICRO.vocab_size}
    hdiag, _ = tensorfile.load(tmp_path / "artifacts" / "quant" / "hdiag.pgt", kind="hessian_diag")
    assert torch.equal(hdiag["tok_emb.weight"], torch.diagonal(hessians["tok_emb.weight"]))
    lq = [n for n, i in quant.items() if "lqer" in i]
    assert len(lq) == 3 and all(quant[n]["lqer"] == {"rank": 4, "form": "asym", "group": 32} for n in lq)
    raw = artifact.serialize(tensors, meta)
    back, meta2 = artifact.loads_artifact(artifact.compress(raw, "lzma", config.CompressConfig(lzma_preset=1)))
    assert artifact.serialize(back, meta2) == raw
    sd = dequantize_state(back, meta2)
    assert all(torch.equal(sd[n], t) for n, t in dequantize_state(tensors, meta).items())
    assert abs(eval_loss(sd) - eval_loss(w)) < 0.02


def test_embed_gptq_without_a_head_hessian_is_gptq_lite_and_says_so(done, tmp_path):
    root, _ = done
    shutil.copytree(root / "artifacts" / "train", tmp_path / "artifacts" / "train")
    with single_thread():
        m = run_in(tmp_path, qcfg(embed_mode="gptq", embed_bits=7))
    tensors, meta = load_quant(tmp_path)
    assert meta["quant"]["tok_emb.weight"] == {"type": "int6", "bits": 7, "method": "gptq_lite"}
    assert m["embed_method"] == "gptq_lite" and int(tensors["tok_emb.weight.q"].abs().max()) <= 63
    assert meta["quant"]["blocks.0.mlp.fc.weight"]["bits"] == 6
