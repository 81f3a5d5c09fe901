"""The code bytes: the packed submission script (pgolf's code + a run's params in one self-extracting
`train_gpt.py`), and the raw evaluation files.

The challenge counts the bytes of one file, `train_gpt.py`, that trains, quantizes, compresses and
evaluates. This module owns that file: `build_script(root, cfgs)` puts the source files the run
uses, `packed_files(cfgs)` (read from `root`, stripped of comments, docstrings and blank lines by
`strip_source`: the same syntax tree otherwise, about 40 % fewer code bytes), and the run's baked
params (the `model`, `train`, `quantize`, `compress` and `evaluate` sections, as the params gate
checked them) into one JSON archive, compresses it with raw LZMA2 (preset 9 extreme), encodes it in
base85 and wraps it in a short bootstrap. Run, the bootstrap unpacks the sources into a temp folder,
puts it first on `sys.path` and calls `main` of ENTRY_MODULE, `pgolf.submit.recipe` (which runs the
whole recipe; see that module).

Which files: ALWAYS_FILES, the modules ENTRY_MODULE imports whatever the params, plus each file of
the one table OPTIONAL (file -> predicate on the checked sections) whose predicate holds: document
packing (train.doc_packing), LQER (quantize.lqer_enabled), TTT (evaluate.ttt_enabled), the n-gram
tilt (evaluate.ngram_tilt), the grouped and per-group artifact layouts (compress.layout) and the Triton kernels
(train.fused_mlp / fused_qk_norm_rope, on a device other than cpu). Each optional module is
imported only where its feature runs, under its param, so a feature that is off costs no code
bytes. Not packed at all: pgolf.prepare.caseops (the script prepares the challenge's pre-tokenized
shards, never CaseOps text). Always packed, though the data decides whether they run:
pgolf.shared.val_bytes (the byte sidecar is found in the data folder at run time; the prepare
section is not baked) and pgolf.compress.prune (pruning runs only over compress.target_bytes).
PACKED_FILES is every file a script may carry (what the DVC deps of compress must cover).
`requirements(cfgs)` names the Python packages the script imports with those params (PACKAGES;
the export's requirements.txt).

The output is a pure function of the sources and the params (sorted keys, no timestamps), so the
compress stage's count (`metrics/size.json` `code_bytes`) and the exported file are the same bytes;
the export regenerates it and compares sha256s. tests/test_pack.py runs packed scripts of micro
runs with every optional feature off, each on alone and all on, and checks that the pgolf modules
each imported are exactly `packed_files` of its params; another test keeps PACKED_FILES among the
DVC deps of compress, the one stage that counts code bytes (and prunes to the target they are part of).

The older, extra count (`code_files`, `metrics/size.json` `code_bytes_eval_files_raw`): the raw
bytes of `CODE_FILES`, the source a user ships to rebuild the model from the artifact and score
it (`python -m stages.evaluate`); a test keeps it equal to the modules that stage imports.
"""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import io
import json
import lzma
import tokenize
from pathlib import Path
from typing import Callable

from pgolf import config
from pgolf.shared import layout

ENTRY_MODULE = "pgolf.submit.recipe"  # the bootstrap runs its main(params, script path)
SHARED_FILES: tuple[str, ...] = (  # the pgolf/shared modules that rebuild and score the model: in both counts
    "pgolf/shared/__init__.py",
    "pgolf/shared/bpb.py",
    "pgolf/shared/byte_tables.py",
    "pgolf/shared/dist.py",
    "pgolf/shared/io.py",
    "pgolf/shared/layout.py",
    "pgolf/shared/model.py",
    "pgolf/shared/progress.py",
    "pgolf/shared/rowquant.py",
    "pgolf/shared/shards.py",
    "pgolf/shared/tensorfile.py",
    "pgolf/shared/tokenizer_meta.py",
    "pgolf/shared/train_files.py",
    "pgolf/shared/val_bytes.py",
)
ALWAYS_FILES: tuple[str, ...] = (  # the pgolf files ENTRY_MODULE imports, whatever the params
    "pgolf/__init__.py",
    "pgolf/compress/__init__.py",
    "pgolf/compress/artifact.py",
    "pgolf/compress/codecs.py",
    "pgolf/compress/compress.py",
    "pgolf/compress/dequant.py",
    "pgolf/compress/prune.py",
    "pgolf/config.py",
    "pgolf/evaluate/__init__.py",
    "pgolf/evaluate/evaluate.py",
    "pgolf/prepare/__init__.py",
    "pgolf/prepare/corpus.py",
    "pgolf/prepare/prepare.py",
    "pgolf/prepare/tokenizer.py",
    "pgolf/quantize/__init__.py",
    "pgolf/quantize/gptq.py",
    "pgolf/quantize/quantize.py",
    *SHARED_FILES,
    "pgolf/submit/__init__.py",
    "pgolf/submit/recipe.py",
    "pgolf/train/__init__.py",
    "pgolf/train/averages.py",
    "pgolf/train/checkpoint.py",
    "pgolf/train/device.py",
    "pgolf/train/hessian.py",
    "pgolf/train/inputs.py",
    "pgolf/train/loader.py",
    "pgolf/train/optim.py",
    "pgolf/train/outputs.py",
    "pgolf/train/priming.py",
    "pgolf/train/schedule.py",
    "pgolf/train/timing.py",
    "pgolf/train/train.py",
    "pgolf/train/triggers.py",
)
Sections = dict  # {section: checked dataclass} of the run (BAKED_SECTIONS at least)


def _kernels(c: Sections) -> bool:
    """The Triton kernels: pgolf.shared.model imports them (the package, so all three files) only
    on CUDA, for train.fused_mlp / train.fused_qk_norm_rope."""
    t = c["train"]
    return t.device != "cpu" and (t.fused_mlp or t.fused_qk_norm_rope)


def _pergroup_tries(c: Sections, codec: str) -> bool:
    """compress.layout pergroup with `codec` among compress.pergroup_codecs (pgolf.compress.pergroup)."""
    return c["compress"].layout == "pergroup" and codec in c["compress"].pergroup_codecs


# The one table of optional modules: file -> whether the run's checked sections use it. Each is
# imported only at its use site, under that param, so a run with the feature off never imports it
# (tests/test_pack.py runs the packed script for sets of params and compares).
def _phased(c: Sections) -> bool:
    return c["evaluate"].ttt_enabled and c["evaluate"].ttt_scheme == "phased"


OPTIONAL: dict[str, Callable[[Sections], bool]] = {
    "pgolf/compress/grouping.py": lambda c: c["compress"].layout in ("grouped", "pergroup"),
    "pgolf/compress/pergroup.py": lambda c: c["compress"].layout == "pergroup",
    "pgolf/evaluate/ngram_tilt.py": lambda c: c["evaluate"].ngram_tilt,
    "pgolf/evaluate/phased.py": _phased,
    "pgolf/evaluate/ttt.py": lambda c: c["evaluate"].ttt_enabled and not _phased(c),
    "pgolf/quantize/lqer.py": lambda c: c["quantize"].lqer_enabled,
    # phased: its global pass; fa4: the flash-kernel swap (pgolf.shared.model.use_fa4_kernels)
    "pgolf/shared/docattn.py": lambda c: (c["train"].doc_packing or c["evaluate"].doc_attention or _phased(c)
                                         or c["model"].attn_backend == "fa4"),
    "pgolf/shared/kernels/__init__.py": _kernels,
    "pgolf/shared/kernels/fused_mlp.py": _kernels,
    "pgolf/shared/kernels/qk_norm_rope.py": _kernels,
}
PACKED_FILES: tuple[str, ...] = tuple(sorted({*ALWAYS_FILES, *OPTIONAL}))  # every file a packed script may carry
# The Python distributions the packed script imports -> whether it does with the run's params
# (export's requirements.txt pins them at the installed versions).
PACKAGES: dict[str, Callable[[Sections], bool]] = {
    "torch": lambda c: True,
    "numpy": lambda c: True,
    "sentencepiece": lambda c: True,  # prepare: the tokenizer's byte tables
    "PyYAML": lambda c: True,  # pgolf.config
    "tqdm": lambda c: True,  # progress bars when stderr is a terminal
    "zstandard": lambda c: True,  # compress sizes every body with lzma and zstd, whatever compress.codec
    "brotli": lambda c: c["compress"].brotli or c["compress"].codec == "brotli" or _pergroup_tries(c, "brotli"),
    "pyppmd": lambda c: _pergroup_tries(c, "ppmd"),  # optional (pyproject extra "pergroup"): tried when installed
    "triton": _kernels,
    "flash-attn-4": lambda c: "fa4" in (c["model"].attn_backend, c["train"].doc_packing and c["train"].doc_attn_backend),
}
CODE_FILES: tuple[str, ...] = (  # every pgolf and stages file `python -m stages.evaluate` imports
    "stages/__init__.py",
    "stages/evaluate.py",
    "pgolf/__init__.py",
    "pgolf/compress/__init__.py",
    "pgolf/compress/artifact.py",
    "pgolf/compress/codecs.py",
    "pgolf/compress/dequant.py",
    "pgolf/compress/grouping.py",
    "pgolf/compress/pergroup.py",
    "pgolf/config.py",
    "pgolf/evaluate/__init__.py",
    "pgolf/evaluate/evaluate.py",
    "pgolf/evaluate/ttt.py",
    "pgolf/quantize/__init__.py",
    "pgolf/quantize/lqer.py",
    *SHARED_FILES,
    "pgolf/shared/checked.py",
)
BAKED_SECTIONS: tuple[str, ...] = ("model", "train", "quantize", "compress", "evaluate")
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]

# The bootstrap: stdlib only; {blob} is base85 text (no quotes or backslashes in its alphabet),
# {entry} is ENTRY_MODULE.
_BOOTSTRAP = '''\
"""pgolf parameter-golf submission: the pgolf recipe (prepare, train, quantize, compress, evaluate) with
its params, packed. Run `python train_gpt.py` or `torchrun --standalone --nproc_per_node=8 train_gpt.py`
in a folder holding ./data/datasets/fineweb10B_sp1024/ and ./data/tokenizers/; outputs go to ./pgolf_run/."""
import atexit, base64, json, lzma, os, shutil, sys, tempfile
A = json.loads(lzma.decompress(base64.b85decode("{blob}"), lzma.FORMAT_RAW,
                               filters=[{{"id": lzma.FILTER_LZMA2}}]))
D = tempfile.mkdtemp(prefix="pgolf_src_")
atexit.register(shutil.rmtree, D, True)
for path, text in A["files"].items():
    os.makedirs(os.path.dirname(os.path.join(D, path)), exist_ok=True)
    with open(os.path.join(D, path), "w", encoding="utf-8") as f:
        f.write(text)
sys.path.insert(0, D)
from {entry} import main
if __name__ == "__main__":
    sys.exit(main(A["params"], os.path.abspath(__file__)))
'''


class PackError(ValueError):
    """A source file of the packed script that is missing or not UTF-8 text; names the file."""


def baked_params(cfgs: dict) -> dict:
    """{section: {key: value}} of BAKED_SECTIONS from {section: checked dataclass}."""
    return {s: config.to_dict(cfgs[s]) for s in BAKED_SECTIONS}


def packed_files(cfgs: Sections) -> tuple[str, ...]:
    """The files the packed script of the run `cfgs` carries: ALWAYS_FILES and the OPTIONAL ones its params use."""
    return tuple(f for f in PACKED_FILES if f not in OPTIONAL or OPTIONAL[f](cfgs))


def requirements(cfgs: Sections) -> str:
    """requirements.txt of the run `cfgs`: each PACKAGES distribution its packed script imports,
    `name==version` as installed here (the name alone where it is not installed), one per line."""
    lines = []
    for name, used in PACKAGES.items():
        if used(cfgs):
            try:
                lines.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                lines.append(name)
    return "\n".join(lines) + "\n"


def _docstrings(tree: ast.Module):
    """(owner, docstring statement) of the module, every class and every function that has one."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                yield node, first


def without_docstrings(tree: ast.Module) -> ast.Module:
    """`tree` with every docstring dropped (`pass` where it was the whole body), in place."""
    for node, _ in list(_docstrings(tree)):
        node.body = node.body[1:] or [ast.Pass()]
    return tree


def _char_col(line: str, byte_col: int) -> int:
    """ast's UTF-8 byte column on `line` -> a character column."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8"))


def _verbatim_rows(tree: ast.Module, docs: set[int]) -> set[int]:
    """1-based rows that end inside a string spanning lines (not a docstring): kept as they are."""
    rows: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and id(node) not in docs and node.end_lineno > node.lineno:
            rows.update(range(node.lineno, node.end_lineno))
    return rows


def strip_source(text: str) -> str:
    """Python source without comments, docstrings and blank lines. Every edit is a deletion (a
    docstring that was a whole body becomes `pass`) at positions from `ast` and `tokenize`, so the
    result parses to the tree of `without_docstrings(ast.parse(text))` on any Python version."""
    tree = ast.parse(text)
    lines = text.split("\n")
    edits = []  # (row0, col0, row1, col1, replacement): 1-based rows, character columns
    docs = list(_docstrings(tree))
    for owner, stmt in docs:
        edits.append((stmt.lineno, _char_col(lines[stmt.lineno - 1], stmt.col_offset), stmt.end_lineno,
                      _char_col(lines[stmt.end_lineno - 1], stmt.end_col_offset), "" if owner.body[1:] else "pass"))
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            edits.append((*tok.start, *tok.end, ""))
    for r0, c0, r1, c1, new in sorted(edits, reverse=True):  # right to left, bottom up
        lines[r0 - 1:r1] = [lines[r0 - 1][:c0] + new + lines[r1 - 1][c1:]] + [""] * (r1 - r0)  # rows keep their numbers
    keep = _verbatim_rows(tree, {id(stmt.value) for _, stmt in docs})
    out = (line if row in keep else line.rstrip() for row, line in enumerate(lines, 1))
    return "\n".join(line for row, line in enumerate(out, 1) if line or row in keep) + "\n"


def read_sources(root: str | Path = ".", files: tuple[str, ...] = PACKED_FILES) -> dict[str, str]:
    """{relative path: text} of `files` under `root`, as they are (see `packed_sources`)."""
    root, out = Path(root), {}
    for rel in files:
        p = root / rel
        if not p.is_file():
            raise PackError(f"{p}: source file of the packed {layout.SCRIPT_FILE} missing")
        try:
            out[rel] = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PackError(f"{p}: not UTF-8 text ({e})") from None
    return out


def packed_sources(root: str | Path = ".", files: tuple[str, ...] = PACKED_FILES) -> dict[str, str]:
    """{relative path: text} of `files` under `root`, stripped (`strip_source`)."""
    return {rel: strip_source(text) for rel, text in read_sources(root, files).items()}


def build_script(root: str | Path, cfgs: dict) -> bytes:
    """The bytes of the packed train_gpt.py (deterministic) for the checked sections `cfgs`."""
    archive = json.dumps({"files": packed_sources(root, packed_files(cfgs)), "params": baked_params(cfgs)}, sort_keys=True,
                         separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob = base64.b85encode(lzma.compress(archive, lzma.FORMAT_RAW, filters=_FILTERS)).decode("ascii")
    return _BOOTSTRAP.format(blob=blob, entry=ENTRY_MODULE).encode("ascii")


def unpack(script: bytes) -> dict:
    """The archive inside a packed script: {"files": {path: text}, "params": {...}} (for checks and tests)."""
    text = script.decode("ascii")
    start = text.index('b85decode("') + len('b85decode("')
    blob = text[start:text.index('"', start)]
    return json.loads(lzma.decompress(base64.b85decode(blob), lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]))


# ----------------------------------------------------------------------------- the raw evaluation files


def code_files(root: str | Path = ".") -> list[dict]:
    """[{"path", "bytes"}] for every file of CODE_FILES (FileNotFoundError if one is missing)."""
    root = Path(root)
    out = []
    for rel in CODE_FILES:
        p = root / rel
        if not p.is_file():
            raise FileNotFoundError(f"{p}: counted code file missing")
        out.append({"path": rel, "bytes": p.stat().st_size})
    return out


def code_bytes(root: str | Path = ".") -> int:
    return sum(e["bytes"] for e in code_files(root))
