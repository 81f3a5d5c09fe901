"""pgolf.compress.pack: the packed train_gpt.py is deterministic, holds exactly the recipe's sources and the
baked params, runs its bootstrap, and carries exactly the pgolf modules its run imports: for micro runs
with every optional feature off, each on alone and all on, the packed script runs end to end and the
modules it imported are its `packed_files`."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf import config
from pgolf.compress import pack
from pgolf.shared.shards import read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]
TINY = config.load_all(config.read_doc(ROOT / "params.yaml"))  # the checked sections of the committed params


def test_script_is_deterministic_and_roundtrips_sources_and_params():
    a, b = pack.build_script(ROOT, TINY), pack.build_script(ROOT, dict(TINY))
    assert a == b and a.isascii()
    archive = pack.unpack(a)
    assert sorted(archive["files"]) == sorted(pack.packed_files(TINY))
    for rel, text in archive["files"].items():
        assert text == pack.strip_source((ROOT / rel).read_text(encoding="utf-8"))
    assert archive["params"] == {s: config.to_dict(TINY[s]) for s in pack.BAKED_SECTIONS}
    assert set(archive["params"]) == set(pack.BAKED_SECTIONS)
    raw = sum((ROOT / f).stat().st_size for f in pack.packed_files(TINY))
    assert len(a) < raw / 2  # packed: well under half the raw sources


def test_stripped_sources_parse_to_the_same_tree_without_docstrings():
    for rel in pack.PACKED_FILES:
        text = (ROOT / rel).read_text(encoding="utf-8")
        stripped = pack.strip_source(text)
        assert ast.dump(ast.parse(stripped)) == ast.dump(pack.without_docstrings(ast.parse(text))), rel
        assert "#" not in stripped or all(not line.lstrip().startswith("#") for line in stripped.splitlines())
    total = sum(len(pack.strip_source((ROOT / f).read_text(encoding="utf-8"))) for f in pack.PACKED_FILES)
    assert total < 0.8 * sum((ROOT / f).stat().st_size for f in pack.PACKED_FILES)


def test_strip_source_keeps_strings_and_drops_only_comments_docstrings_and_blank_lines():
    src = (
        '"""Module doc → with a non-ASCII arrow."""\n'
        "import os  # a comment\n"
        "\n"
        "class E(ValueError):\n"
        '    """Only a docstring."""\n'
        "\n"
        "def f(x):  # é\n"
        '    """Doc\n'
        '    on two lines."""\n'
        '    s = """keep   \n'
        "\n"
        '  # not a comment\n"""\n'
        '    return x + "#" + s  # trailing\n'
    )
    out = pack.strip_source(src)
    assert out == ("import os\n"
                   "class E(ValueError):\n"
                   "    pass\n"
                   "def f(x):\n"
                   '    s = """keep   \n'
                   "\n"
                   '  # not a comment\n"""\n'
                   '    return x + "#" + s\n')
    namespace: dict = {}
    exec(compile(out, "<stripped>", "exec"), namespace)
    assert namespace["f"]("a") == 'a#keep   \n\n  # not a comment\n' and namespace["E"].__doc__ is None


def test_params_change_the_script():
    other = pack.build_script(ROOT, {**TINY, "evaluate": dataclasses.replace(TINY["evaluate"], stride=32)})
    assert other != pack.build_script(ROOT, TINY)
    assert pack.unpack(other)["params"]["evaluate"]["stride"] == 32
    same = {**TINY, "prepare": dataclasses.replace(TINY["prepare"], workers=1)}  # not baked: the script prepares itself
    assert pack.build_script(ROOT, same) == pack.build_script(ROOT, TINY)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(pack.PackError, match=r"pgolf/__init__.py: source file of the packed train_gpt.py missing"):
        pack.build_script(tmp_path, TINY)


def _pgolf_files(imported: list[str], root: str) -> set[str]:
    """Repo-relative paths of pgolf module files, each of which must lie under `root`."""
    outside = [f for f in imported if not f.startswith(root + os.sep)]
    assert not outside, f"pgolf modules imported from outside {root}: {outside}"
    return {os.path.relpath(f, root).replace(os.sep, "/") for f in imported}


def test_the_entry_module_imports_only_the_always_files():
    """Importing ENTRY_MODULE (the script's import phase) loads ALWAYS_FILES and no optional module:
    one imported eagerly anywhere fails here, before the runs below."""
    code = ("import json, sys, importlib; importlib.import_module('pgolf.submit.recipe'); "
            "print(json.dumps([m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'pgolf' and getattr(m, '__file__', None)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert _pgolf_files(json.loads(out), str(ROOT)) == set(pack.ALWAYS_FILES)
    assert not set(pack.ALWAYS_FILES) & set(pack.OPTIONAL)
    assert set(pack.PACKED_FILES) == {*pack.ALWAYS_FILES, *pack.OPTIONAL}


MICRO = {  # a packed run of seconds on the CPU: a micro model, 2 steps, a short evaluation
    "model": {"num_layers": 2, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "xsa_last_n": 1,
              "bigram_buckets": 32, "bigram_dim": 8, "ve_dim": 8, "ve_last_n": 1, "rope_dims": 4},
    "train": {"device": "cpu", "batch_tokens": 256, "seq_len": 64, "iterations": 2, "warmdown_iters": 1,
              "warmup_steps": 0, "muon_momentum_warmup_steps": 1, "hessian_every": 1, "val_tokens": 256,
              "log_every": 1, "checkpoint_every": 0, "doc_packing": False},
    "quantize": {"device": "cpu", "passthrough_max_numel": 256, "lqer_enabled": False},
    "compress": {"threads": 1, "layout": "flat"},
    "evaluate": {"device": "cpu", "context": 64, "stride": 32, "max_tokens": 512, "ttt_enabled": False,
                 "ttt_chunk_tokens": 128, "ttt_epochs": 1, "ngram_tilt": False},
}
FEATURES = {  # each optional feature of pack.OPTIONAL that a CPU run can use, on (the kernels: CUDA only)
    "doc_packing": {"train": {"doc_packing": True}},
    "lqer": {"quantize": {"lqer_enabled": True}},
    "ttt": {"evaluate": {"ttt_enabled": True}},
    "phased": {"evaluate": {"ttt_enabled": True, "ttt_scheme": "phased", "ttt_rank": 2, "ttt_doc_batch": 4,
                            "ttt_prefix_docs": 2, "ttt_global_chunk_tokens": 128}},  # after ttt: all_on runs it
    "ngram_tilt": {"evaluate": {"ngram_tilt": True}},
    "grouped": {"compress": {"layout": "grouped"}},
    "pergroup": {"compress": {"layout": "pergroup"}},  # after grouped: all_on runs the per-group layout
}
RUNS = {"all_off": [], **{f"{name}_alone": [name] for name in FEATURES}, "all_on": list(FEATURES)}


def micro_cfgs(features: list[str]) -> dict:
    """TINY at MICRO with `features` on; checked as the params gate checks them."""
    cfgs = {}
    for s in pack.BAKED_SECTIONS:
        kv = dict(MICRO[s])
        for f in features:
            kv.update(FEATURES[f].get(s, {}))
        cfgs[s] = config.check(dataclasses.replace(TINY[s], **kv), "test")
    return cfgs


@pytest.fixture(scope="module")
def challenge_data(tmp_path_factory) -> Path:
    """./data of the challenge layout: train and val shards cut from the real-token fixture, the tokenizer."""
    data = tmp_path_factory.mktemp("challenge") / "data"
    shards = data / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    toks = read_shard(ROOT / "tests" / "fixtures" / "fineweb_val_prefix20k.bin")
    write_shard(shards / "fineweb_train_000000.bin", toks[:12000])
    write_shard(shards / "fineweb_val_000000.bin", toks[12000:13000])
    (data / "tokenizers").mkdir()
    shutil.copy2(ROOT / "data" / "tokenizer_src" / "fineweb_1024_bpe.model", data / "tokenizers" / "fineweb_1024_bpe.model")
    return data


# Runs a packed train_gpt.py and, at exit, writes the files of the pgolf modules it imported and
# the folder it unpacked into (argv[1]: the JSON file to write).
_TRACE = """\
import atexit, json, os, runpy, sys
out = sys.argv[1]
def dump():
    mods = [m for n, m in list(sys.modules.items()) if n.split(".")[0] == "pgolf" and getattr(m, "__file__", None)]
    root = os.path.dirname(os.path.dirname(sys.modules["pgolf"].__file__))
    with open(out, "w") as f:
        json.dump({"root": root, "files": [m.__file__ for m in mods]}, f)
atexit.register(dump)
sys.argv = ["train_gpt.py"]
runpy.run_path("train_gpt.py", run_name="__main__")
"""


@pytest.mark.parametrize("run", list(RUNS))
def test_packed_files_are_what_the_run_imports(run, challenge_data, tmp_path):
    """The packed script of a micro run (train, quantize, compress, evaluate on the CPU) runs end to
    end from its own files alone and imports exactly `packed_files` of its params: a module left out
    fails the run (a pgolf module from anywhere but the unpacked folder fails the check), one packed
    but not imported (an optional module imported eagerly, or a predicate that is wrong) fails the
    comparison. The kernels are CUDA only: these CPU runs (train.device cpu) leave them out."""
    cfgs = micro_cfgs(RUNS[run])
    folder = tmp_path / "challenge"
    folder.mkdir()
    (folder / "data").symlink_to(challenge_data, target_is_directory=True)
    (folder / "train_gpt.py").write_bytes(pack.build_script(ROOT, cfgs))
    trace = tmp_path / "imported.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _TRACE, str(trace)], cwd=folder, capture_output=True, text=True, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "final_int6_sliding_window_exact" in p.stdout and ("legal_ttt_exact" in p.stdout) == cfgs["evaluate"].ttt_enabled
    got = json.loads(trace.read_text())
    imported = _pgolf_files(got["files"], got["root"])
    assert imported == set(pack.packed_files(cfgs)), (sorted(imported - set(pack.packed_files(cfgs))),
                                                      sorted(set(pack.packed_files(cfgs)) - imported))


def test_optional_files_follow_their_params():
    """Each OPTIONAL file is packed exactly when its param is on; the kernels (imported by
    pgolf.shared.model on CUDA only) with train.fused_mlp or fused_qk_norm_rope on a device other than cpu."""
    kernels = {f for f in pack.OPTIONAL if f.startswith("pgolf/shared/kernels/")}
    off = micro_cfgs([])
    assert set(pack.packed_files(off)) == set(pack.ALWAYS_FILES)
    for name in FEATURES:
        added = set(pack.packed_files(micro_cfgs([name]))) - set(pack.ALWAYS_FILES)
        extra = 1 if name in ("pergroup", "phased") else 0  # they also pack grouping.py / docattn.py, which they use
        assert len(added) == 1 + extra and added <= set(pack.OPTIONAL), (name, added)
    every = set(pack.packed_files(micro_cfgs(list(FEATURES)))) | set(pack.packed_files(micro_cfgs(["ttt"])))
    assert every == set(pack.PACKED_FILES) - kernels  # all_on's TTT is phased; the stream one alone
    t = TINY["train"]
    assert t.device != "cpu" and t.fused_mlp and kernels <= set(pack.packed_files(TINY))  # the tiny profile trains with them
    for change in ({"fused_mlp": False, "fused_qk_norm_rope": False}, {"device": "cpu"}):
        assert not kernels & set(pack.packed_files({**TINY, "train": dataclasses.replace(t, **change)}))
    for change in ({"fused_mlp": False}, {"fused_qk_norm_rope": False}):  # the package imports both files
        assert kernels <= set(pack.packed_files({**TINY, "train": dataclasses.replace(t, **change)}))
    assert "pgolf/prepare/caseops.py" not in pack.PACKED_FILES  # the script prepares pre-tokenized shards only


def test_bootstrap_unpacks_and_reports_a_missing_data_layout(tmp_path):
    """The script runs from any folder: it unpacks itself, validates the baked params and names the
    challenge data it did not find (the full run is tests/test_submission.py)."""
    script = tmp_path / "train_gpt.py"
    script.write_bytes(pack.build_script(ROOT, TINY))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1
    assert "data/datasets/fineweb10B_sp1024: challenge shard folder not found" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "pgolf_run").exists()


def test_bootstrap_names_a_bad_baked_param(tmp_path):
    """The baked values were checked by the params gate; the script types them again (no range
    checks) and names one that is not of its field's type."""
    script = tmp_path / "train_gpt.py"
    script.write_bytes(pack.build_script(ROOT, {**TINY, "train": dataclasses.replace(TINY["train"], seed="one")}))
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "baked params: train.seed must be int, got str 'one'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
