"""Profiles: complete params files for the tiny CPU run, the record recipe and the (unmeasured)
frontier recipe (the record plus the later records' knobs).

`profiles/<name>.yaml` sets every key of every section, so switching profile is copying one file
onto `params.yaml`: every value stays visible to DVC as a param (`dvc params diff` shows the
switch key by key), and nothing hides in environment variables.

    python -m pgolf.profiles record      # params.yaml <- profiles/record.yaml
    python -m pgolf.profiles tiny        # back to the CPU profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgolf import config
from pgolf.shared.io import atomic_write_text

PROFILE_DIR = Path("profiles")


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yaml"))


def validate(text: str, source: str) -> dict:
    """The profile's document, every section and key present and typed; errors name `source`."""
    doc = config.parse_doc(text, source)
    for section in config.SECTIONS:
        config.from_doc(doc, section, source)
    return doc


def changed_keys(old: dict, new: dict) -> list[str]:
    return [f"{s}.{k}: {(old.get(s) or {}).get(k)!r} -> {v!r}"
            for s in config.SECTIONS for k, v in new[s].items() if (old.get(s) or {}).get(k) != v]


def apply(name: str, root: Path = Path(".")) -> list[str]:
    """Copy profiles/<name>.yaml onto params.yaml after validating it; return the changed keys."""
    src = root / PROFILE_DIR / f"{name}.yaml"
    if not src.exists():
        raise config.ConfigError(f"{src}: no such profile (have: {', '.join(available(root))})")
    text = src.read_text()
    new = validate(text, str(src))
    params = root / "params.yaml"
    try:
        old = config.read_doc(params)
    except config.ConfigError:
        old = {}  # a broken params.yaml is what a profile replaces
    atomic_write_text(params, text)
    return changed_keys(old, new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="profile name (a file in profiles/)")
    args = ap.parse_args(argv)
    try:
        changes = apply(args.name)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"params.yaml <- profiles/{args.name}.yaml ({len(changes)} values changed)")
    for line in changes:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
