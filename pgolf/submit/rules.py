"""The rules self-check: a finished run against the challenge rules that can be checked from its files.

    pgolf rules            # the run in the current folder; exit 1 if a rule fails

Each rule gives pass/fail and the figure behind it:

* `size`: model bytes + the packed `train_gpt.py`'s bytes <= 16,000,000 (decimal), and the code
  was counted packed (metrics/size.json `code_count`);
* `train_time`: training wallclock (metrics/train.json `train_seconds`; online Hessian capture
  runs inside the timed loop, so it is included) <= 600 s;
* `eval_time`: evaluation wallclock (metrics/eval.json `eval_seconds`) <= 600 s;
* `hessians`: GPTQ Hessians were accumulated from training batches inside the timed loop (at
  least one accumulation, and the trainer's after-the-clock fallback absent from train.log); with
  `train.hessian_source: calibration` they come from `train.calibration_batches` (>= 1) batches of
  training data on the exported weights after the training clock stopped, as PR #2135's GPTQ
  calibration: the figure says so and gives their seconds (metrics/train.json
  `calibration_seconds`, never part of `train_seconds`, which `train_time` also names);
* `eval_once`: every validation target of the evaluated prefix scored exactly once (scored
  tokens = the targets that `evaluate.max_tokens` and whole windows of `evaluate.context` keep,
  from metrics/prepare.json's val_tokens), with stride <= context;
* `causal`: a probe of the scored model itself (rebuilt from the artifact): changing the tokens
  after position j leaves every logit at positions < j unchanged, and each position has one
  finite logit per vocabulary entry (evaluation scores the softmax over them: a normalised
  distribution over the full vocabulary). Without test-time training, scoring happens before
  any update by construction: pgolf.evaluate.evaluate runs the model in eval mode with no optimizer.
  With `evaluate.ttt_enabled` this probe covers the artifact's model before adaptation, and
  `ttt_score_first` the adaptation.
* `ttt_score_first` (only with `evaluate.ttt_enabled`): the run's own test-time training
  (evaluate.ttt_scheme stream: pgolf.evaluate.ttt; phased: pgolf.evaluate.phased) run twice from
  the artifact on the first TTT_PROBE_TOKENS validation tokens (at least two windows of
  evaluate.context), the second time with the tokens after a cut in its scoring order replaced
  (stream: every token from the middle on; phased: the rest of the document holding the middle
  and every document of a later batch; BOS kept, so the documents and their order stay): no
  target scored before the cut moves, i.e. each was scored before any update that saw a later
  token. Phased TTT scores documents by batch, longest first, not in stream order. The n-gram
  tilt stays off here: it only rescores (its own rule is `ngram_causal`), and both schemes adapt
  on the plain loss. tests/test_ttt.py and tests/test_phased.py prove the same on models built to
  expose a leak.
* `ngram_causal` (only with `evaluate.ngram_tilt`): the n-gram tilt's hints, recomputed with the
  run's order and threshold on the first NGRAM_PROBE_TOKENS of the run's validation tokens, do not
  move for any target before position p when every token from p on is replaced (NGRAM_PROBE_CUTS
  random p): each hint comes from the earlier tokens only (pgolf.evaluate.ngram_tilt). The tilted
  score is log_softmax(logits + boost * onehot(hint)), renormalised over the full vocabulary.

Figures are measured on the hardware of the run (the rules' limits are for 8xH100).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.shared import layout, train_files
from pgolf.compress import artifact

CAP_BYTES = 16_000_000  # the challenge's decimal cap
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
HESSIAN_FALLBACK = "hessian: no step captured one"  # pgolf.train.train's line when Hessians came after the clock
CAUSAL_ATOL = 1e-4
NGRAM_PROBE_TOKENS = 262_144  # validation tokens the ngram_causal rule re-derives hints on
NGRAM_PROBE_CUTS = 8
TTT_PROBE_TOKENS = 8192  # validation tokens the ttt_score_first rule adapts on (at least 2 contexts)


@dataclass(frozen=True)
class Rule:
    name: str
    passed: bool
    figure: str

    def line(self) -> str:
        return f"  {'PASS' if self.passed else 'FAIL'}  {self.name:<11} {self.figure}"


class RulesError(ValueError):
    """A run file the check needs is missing or unreadable; names the file."""


def read_json(path: Path):
    """The JSON document at `path`; RulesError naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise RulesError(f"{path}: missing (run `dvc repro` first)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: not valid JSON ({e})") from None


def read_metrics(root: Path, name: str, keys: tuple[str, ...]) -> dict:
    path = root / layout.metrics_file(name)
    m = read_json(path)
    missing = [k for k in keys if not isinstance(m, dict) or k not in m]
    if missing:
        raise RulesError(f"{path}: lacks {', '.join(missing)} (run `dvc repro` first)")
    return m


def check_size(size: dict, script_bytes: int | None) -> Rule:
    code = size["code_bytes"] if script_bytes is None else script_bytes
    total = size["model_bytes"] + code
    packed = str(size.get("code_count", "")).startswith("packed")
    how = "packed train_gpt.py" if packed else "code counted raw, not as the packed train_gpt.py"
    return Rule("size", packed and total <= CAP_BYTES,
                f"{total:,} bytes = model {size['model_bytes']:,} + code {code:,} ({how}); cap {CAP_BYTES:,}")


def check_train_time(train: dict) -> Rule:
    s = train["train_seconds"]
    cal = train.get("calibration_seconds")
    after = "" if cal is None else f"; + {cal:.1f} s of calibration Hessians after the clock, not included"
    return Rule("train_time", s <= TRAIN_LIMIT_S,
                f"{s:.1f} s of training incl. online Hessian capture ({train['steps']} steps, world "
                f"{train['world_size']}, {train.get('device', '?')}){after}; limit {TRAIN_LIMIT_S:.0f} s")


def check_eval_time(ev: dict) -> Rule:
    s = ev["eval_seconds"]
    return Rule("eval_time", s <= EVAL_LIMIT_S, f"{s:.1f} s of evaluation; limit {EVAL_LIMIT_S:.0f} s")


def check_hessians(train: dict, log_text: str) -> Rule:
    if train.get("hessian_source") == "calibration":  # train.calibration_batches, as PR #2135's GPTQ calibration
        n = int(train.get("calibration_batches") or 0)
        return Rule("hessians", n >= 1,
                    f"calibration: {n} batch(es) x {train.get('calibration_seqs')} seqs of training data per rank "
                    f"on the exported weights, after the training clock stopped ({train.get('calibration_seconds')}"
                    f" s, not in train_seconds, as PR #2135); {int(train.get('calibration_rows') or 0):,} rows; "
                    f"never validation data")
    n = int(train.get("hessian_accumulations") or 0)
    fallback = HESSIAN_FALLBACK in log_text
    ok = n >= 1 and not fallback
    where = "after the training clock stopped (fallback)" if fallback else "inside the timed training loop"
    return Rule("hessians", ok, f"{n} accumulation(s) of training micro-batches, {where}; "
                                f"{int(train.get('hessian_rows') or 0):,} rows; never validation data")


def expected_targets(val_tokens: int, max_tokens: int, context: int) -> int:
    """Targets pgolf.evaluate.evaluate scores: the first max_tokens (0 = all) cut to whole context windows."""
    n = min(val_tokens, max_tokens + 1) if max_tokens > 0 else val_tokens
    return (n - 1) // context * context


def check_eval_once(ev: dict, prep: dict, max_tokens: int) -> Rule:
    want = expected_targets(int(prep["val_tokens"]), max_tokens, int(ev["context"]))
    got = int(ev["scored_tokens"])
    ok = got == want and 0 <= ev["stride"] <= ev["context"]
    return Rule("eval_once", ok, f"{got:,} targets scored, {want:,} expected (each once, one pass; stride "
                                 f"{ev['stride']} <= context {ev['context']})")


@torch.no_grad()
def causal_probe(logits_fn, vocab: int, length: int, seed: int = 0) -> dict:
    """Probe a model: {"max_change": max |logit change| at positions < j when the tokens >= j change
    (j = 1, T/2, T-1), "width": logits per position, "finite": all logits finite}.

    `logits_fn`: (1, T) int64 token ids -> (1, T, V) logits.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (1, length), generator=g)  # (1, T)
    base = logits_fn(x).float()  # (1, T, V)
    worst = 0.0
    for j in (1, length // 2, length - 1):
        y = x.clone()
        y[0, j:] = torch.randint(0, vocab, (length - j,), generator=g)
        worst = max(worst, (logits_fn(y).float()[0, :j] - base[0, :j]).abs().max().item())
    return {"max_change": worst, "width": int(base.shape[-1]), "finite": bool(torch.isfinite(base).all())}


def judge_causal(probe: dict, vocab: int) -> Rule:
    ok = probe["max_change"] <= CAUSAL_ATOL and probe["width"] == vocab and probe["finite"]
    return Rule("causal", ok, f"future tokens change earlier logits by at most {probe['max_change']:.1e} (tolerance "
                              f"{CAUSAL_ATOL:.0e}); scores are a softmax over {probe['width']} logits "
                              f"(vocabulary {vocab}), {'all finite' if probe['finite'] else 'NOT finite'}; no update "
                              f"before scoring (eval mode, no optimizer)")


def check_causal(artifact: Path, context: int) -> Rule:
    if not artifact.is_file():
        return Rule("causal", False, f"{artifact}: not found, the scored model cannot be probed")
    from pgolf.evaluate.evaluate import load_model

    model, meta = load_model(artifact)
    vocab = int(meta["model"]["vocab_size"])
    return judge_causal(causal_probe(model.forward_logits, vocab, min(context, 64)), vocab)


def check_ngram_causal(shards: Path, cfg) -> Rule:
    """`cfg` the run's evaluate section (ngram_tilt on): ngram_tilt.causality_probe on its val tokens."""
    from pgolf.evaluate import ngram_tilt
    from pgolf.shared import bpb

    try:
        limit = min(NGRAM_PROBE_TOKENS, cfg.max_tokens) if cfg.max_tokens > 0 else NGRAM_PROBE_TOKENS
        tokens = bpb.load_val_tokens(shards, limit)
    except (OSError, ValueError) as e:
        return Rule("ngram_causal", False, f"{shards}: no validation tokens to probe the n-gram tilt on ({e})")
    p = ngram_tilt.causality_probe(tokens, cfg.ngram_order, cfg.ngram_threshold, cuts=NGRAM_PROBE_CUTS)
    return Rule("ngram_causal", p["max_changed"] == 0,
                f"{p['max_changed']} earlier hint(s) moved when the tokens after a cut changed ({p['cuts']} cuts; "
                f"{p['hinted']:,} of the first {p['targets']:,} validation targets hinted, order {cfg.ngram_order}, "
                f"threshold {cfg.ngram_threshold}, boost {cfg.ngram_boost}); tilt renormalised over the vocabulary")


def ttt_probe_cut(tokens, cfg, cut: int):
    """(token positions the probe changes, targets allowed to move), in the order the run's TTT
    scores: stream, the tokens from `cut` on; phased, those of the document holding target cut - 1
    and every token of the documents of later batches (never a BOS, so the documents and their
    order stay)."""
    import numpy as np

    from pgolf.shared.shards import BOS_ID

    n = len(tokens)
    if cfg.ttt_scheme != "phased":
        return np.arange(cut, n), np.arange(cut - 1, n - 1)
    from pgolf.evaluate import phased

    docs = phased.documents(tokens, BOS_ID)
    groups = phased.batches(docs, cfg.ttt_doc_batch)
    d = int(np.searchsorted(docs[:, 0], cut - 1, side="right")) - 1  # the document of target cut - 1
    g = next(i for i, grp in enumerate(groups) if d in grp)
    # a document (start s, length n): tokens s .. s+n-2 (s+n-1 is the next one's BOS), targets s .. s+n-2
    spans = [(cut, docs[d].sum() - 1)] + [(docs[e, 0], docs[e].sum() - 1) for grp in groups[g + 1:] for e in grp]
    pos = np.concatenate([np.arange(a, b) for a, b in spans])
    return pos, np.concatenate([np.arange(cut - 1, spans[0][1])] + [np.arange(a, b) for a, b in spans[1:]])


def check_ttt_score_first(root: Path, cfg, seed: int = 0) -> Rule:
    """`cfg` the run's evaluate section (ttt_enabled): its TTT twice from the artifact, the second
    time with the tokens after a cut in its scoring order changed (bytes play no part)."""
    import numpy as np

    from pgolf.evaluate.evaluate import load_model, run_ttt
    from pgolf.shared import bpb, dist
    from pgolf.shared.byte_tables import ByteTables
    from pgolf.shared.shards import BOS_ID

    art = root / layout.FINAL / artifact.MODEL_FILE
    try:
        tokens = bpb.load_val_tokens(root / layout.SHARDS, max(TTT_PROBE_TOKENS, 2 * cfg.context + 1))
    except (OSError, ValueError) as e:
        return Rule("ttt_score_first", False, f"no validation tokens to probe TTT on ({e})")
    if not art.is_file() or len(tokens) < 2 * cfg.context + 1:
        return Rule("ttt_score_first", False, f"{art}: no artifact, or fewer than two windows of validation tokens")
    tokens = bpb.truncate(tokens, cfg.context)
    device = dist.pick_device(cfg.device)
    first = load_model(art, device)[0]  # each run adapts a fresh model of the artifact
    V = first.cfg.vocab_size
    tables = ByteTables(torch.ones(V, dtype=torch.int64), torch.zeros(V, dtype=torch.bool),
                        torch.zeros(V, dtype=torch.bool))
    cut = len(tokens) // 2 + 7  # inside a chunk, not on its edge
    pos, may_move = ttt_probe_cut(tokens, cfg, cut)
    pos = pos[tokens[pos] != BOS_ID]
    new = (tokens[pos].astype(np.int64) + np.random.default_rng(seed).integers(1, V, len(pos))) % V
    other = tokens.copy()
    other[pos] = np.where(new == BOS_ID, (new + 1) % V, new)
    # without the n-gram tilt: it only rescores, and both schemes adapt on the plain loss
    a, b = (run_ttt(m, t, tables, cfg, device, record=True).per_target
            for m, t in ((first, tokens), (load_model(art, device)[0], other)))
    keep = torch.ones(len(a), dtype=torch.bool)
    keep[torch.from_numpy(may_move)] = False
    moved = float((a[keep] - b[keep]).abs().max()) if keep.any() else 0.0
    return Rule("ttt_score_first", moved <= CAUSAL_ATOL,
                f"{cfg.ttt_scheme} TTT run twice on the first {len(tokens):,} validation tokens, {len(pos):,} tokens "
                f"after a cut in its scoring order changed the second time: the {int(keep.sum()):,} targets scored "
                f"before them moved by at most {moved:.1e} (tolerance {CAUSAL_ATOL:.0e})")


def check(root: str | Path = ".", max_tokens: int | None = None) -> list[Rule]:
    """Every rule on the finished run under `root` (metrics/, artifacts/, params.yaml)."""
    root = Path(root)
    size = read_metrics(root, "size", ("model_bytes", "code_bytes"))
    train = read_metrics(root, "train", ("train_seconds", "steps", "world_size"))
    ev = read_metrics(root, "eval", ("eval_seconds", "scored_tokens", "stride", "context"))
    prep = read_metrics(root, "prepare", ("val_tokens",))
    log = root / layout.TRAIN / train_files.LOG_FILE
    if not log.is_file():
        raise RulesError(f"{log}: train log missing (run `dvc repro` first)")
    from pgolf.shared import checked

    ev_cfg = checked.read("evaluate", root)
    if max_tokens is None:
        max_tokens = ev_cfg.max_tokens
    script = root / layout.FINAL / layout.SCRIPT_FILE
    ngram = [check_ngram_causal(root / layout.SHARDS, ev_cfg)] if getattr(ev_cfg, "ngram_tilt", False) else []
    ngram += [check_ttt_score_first(root, ev_cfg)] if ev_cfg.ttt_enabled else []
    return [check_size(size, script.stat().st_size if script.is_file() else None), check_train_time(train),
            check_eval_time(ev), check_hessians(train, log.read_text(errors="replace")),
            check_eval_once(ev, prep, max_tokens),
            check_causal(root / layout.FINAL / artifact.MODEL_FILE, ev["context"]), *ngram]


def report(rules: list[Rule]) -> str:
    failed = [r.name for r in rules if not r.passed]
    head = "rules self-check: " + (f"FAILED ({', '.join(failed)})" if failed else f"all {len(rules)} passed")
    return "\n".join([head, *(r.line() for r in rules)])


def as_json(rules: list[Rule]) -> dict:
    return {"passed": all(r.passed for r in rules), "rules": [r.__dict__ for r in rules]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf rules", description="Check a finished run against the challenge rules.")
    ap.add_argument("--root", type=Path, default=Path("."), help="the run's repo folder (default: .)")
    a = ap.parse_args(argv)
    from pgolf.config import ConfigError

    from pgolf.shared.tensorfile import TensorFileError

    try:
        rules = check(a.root)
    except (RulesError, ConfigError, TensorFileError) as e:
        print(f"rules: error: {e}", file=sys.stderr)
        return 1
    print(report(rules))
    return 0 if all(r.passed for r in rules) else 1


if __name__ == "__main__":
    sys.exit(main())
