"""The params a bench runs on: a profile (by name or file), then `section.key=value` overrides (YAML
values), as the benches take them (`bench.ablate --common` and its rows, `bench.profile_train --set`,
`bench.bench_vs_ref --also`, every `--profile`): parsed from the command line, applied to the
profile's complete document, checked by pgolf.config's loader.

A profile file holds only its differences from the record defaults (pgolf.params.profiles), so a
bench resolves it first: `resolve` gives the complete document, every key present, which is what
`apply` writes into and what the error of an unknown key names ("... is not a key of
profiles/tiny.yaml"). `SMALL_MODEL` is the micro model of the benches' `--small` smoke runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pgolf import config
from pgolf.params import profiles

REPO = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"num_layers": 2, "model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "xsa_last_n": 2,
               "bigram_buckets": 64, "bigram_dim": 16, "ve_dim": 16, "ve_last_n": 1, "rope_dims": 8}


parse = profiles.parse_sets  # ["section.key=value", ...] -> {"section.key": value}
apply = profiles.apply_sets  # write them into a complete document, each key checked to exist


def resolve(profile: str | Path, root: Path = REPO) -> tuple[str, dict]:
    """(what to call it, its complete params document) of a profile given by name ("tiny": the file
    under root/profiles/) or by file (a profiles/*.yaml anywhere: record defaults + its differences;
    any other .yaml: a complete params file such as params.yaml, checked when loaded). ConfigError
    for a profile that does not exist or does not check."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        return f"{profiles.PROFILE_DIR}/{profile}.yaml", profiles.resolve(str(profile), root)
    full = path.resolve()
    name = str(full.relative_to(REPO)) if full.is_relative_to(REPO) else str(path)
    if full.parent.name == profiles.PROFILE_DIR.name:
        return name, profiles.resolve(full.stem, full.parent.parent)
    return name, config.read_doc(path)


def add_profile_argument(ap: argparse.ArgumentParser, use: str) -> None:
    """A bench's `--profile` (default: the record's; `resolve` and `load` read it); `use`: what the bench runs of it."""
    ap.add_argument("--profile", default="record",
                    help=f"a profile's name (tiny) or file (profiles/tiny.yaml), or a complete params file: {use}")


def load(profile: str | Path, sets: dict[str, object] | None = None, where: str = "--set",
         root: Path = REPO) -> dict[str, config.Section]:
    """{section: checked dataclass} of a profile (see `resolve`) with `sets` applied (`where` names
    them in errors); ValueError (ConfigError) for an unknown key or a value that does not check."""
    source, doc = resolve(profile, root)
    apply(doc, sets or {}, where, source)
    return config.load_all(doc, f"{source} with {where}" if sets else source)
