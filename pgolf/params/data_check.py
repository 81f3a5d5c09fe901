"""The second gate, after prepare: the checked values against the prepared data.

Some values are only wrong for the data at hand: a `model.vocab_size` that is not the tokenizer's,
a batch larger than the training tokens, a validation split shorter than one training sequence or
one evaluation window. `run` reads the data's metadata files (data/tokenizer/tokenizer.json and
metrics/prepare.json, both written by prepare) and the checked sections, raises ConfigError
naming params.yaml's key and the data file, and otherwise writes the facts it checked against to
`artifacts/params/data_check.json`. train and evaluate depend on that file, so under `dvc repro`
such a value stops here with their outputs intact.
"""

from __future__ import annotations

from pathlib import Path

from pgolf import config
from pgolf.shared import checked, layout
from pgolf.shared.io import MetricsError, read_json, write_json
from pgolf.shared.tokenizer_meta import read_tokenizer_meta, tokenizer_meta_path


def data_facts(root: Path = Path(".")) -> dict:
    """What the checks read of the prepared data: the tokenizer's vocabulary and sha256, the token counts."""
    try:
        tok = read_tokenizer_meta(root / layout.TOKENIZER)
        prep = read_json(root / layout.PREPARE_METRICS)
        return {"vocab_size": int(tok["vocab_size"]), "tokenizer_sha256": tok["sha256"],
                "train_tokens": int(prep["train_tokens"]), "val_tokens": int(prep["val_tokens"])}
    except (FileNotFoundError, MetricsError, ValueError, KeyError) as e:
        raise config.ConfigError(f"the prepared data's metadata is missing or unreadable ({e}); run the "
                                 f"prepare stage first") from None


def check(cfgs: dict, facts: dict, root: Path = Path(".")) -> None:
    """ConfigError (naming params.yaml's key and the data file) for a value the data cannot serve."""
    model, train, ev = cfgs["model"], cfgs["train"], cfgs["evaluate"]
    tok, prep = tokenizer_meta_path(root / layout.TOKENIZER), root / layout.PREPARE_METRICS
    if model.vocab_size != facts["vocab_size"]:
        raise config.ConfigError(f"params.yaml: model.vocab_size is {model.vocab_size} but {tok} says the tokenizer "
                                 f"has {facts['vocab_size']} tokens; set model.vocab_size to {facts['vocab_size']}")
    if facts["train_tokens"] <= train.batch_tokens:
        raise config.ConfigError(f"params.yaml: train.batch_tokens ({train.batch_tokens}) must be below the "
                                 f"{facts['train_tokens']:,} training tokens of {prep}")
    val = facts["val_tokens"]
    used = min(train.val_tokens + 1, val) if train.val_tokens else val
    if used < train.seq_len + 1:
        raise config.ConfigError(f"params.yaml: train.seq_len ({train.seq_len}) needs {train.seq_len + 1} validation "
                                 f"tokens for val_bpb_float; {prep} has {val:,} (train.val_tokens {train.val_tokens})")
    targets = min(ev.max_tokens, val - 1) if ev.max_tokens else val - 1
    if targets < ev.context:
        raise config.ConfigError(f"params.yaml: evaluate.context ({ev.context}) is longer than the {targets:,} "
                                 f"validation targets of {prep} (evaluate.max_tokens {ev.max_tokens})")


def run(root: str | Path = ".") -> dict:
    """Check the gate's sections against the prepared data under `root`; write and return the facts."""
    root = Path(root)
    cfgs = checked.read_all(("model", "train", "evaluate"), root)
    facts = data_facts(root)
    check(cfgs, facts, root)
    write_json(root / layout.DATA_CHECK, facts)
    return facts
