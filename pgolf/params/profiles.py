"""Profiles: `profiles/<name>.yaml` holds only what a recipe changes from the record defaults (the
field defaults of pgolf.config); `pgolf profiles NAME` writes the whole params.yaml from it.

params.yaml keeps every key of every section, so DVC tracks each value as a param (`dvc params
diff` shows a profile switch key by key) and no run starts on a value hidden in code. Each key is
written with the comment of its field in pgolf/config.py. A profile is checked as a whole before
params.yaml is replaced (the same loader as the params gate), and a profile that repeats a default
is allowed but pointless (tests keep the committed profiles to their differences).

    pgolf profiles record      # params.yaml <- the record defaults
    pgolf profiles tiny        # back to the CPU profile (the committed params.yaml)
    pgolf profiles record --set train.nproc_per_node=1 evaluate.nproc_per_node=1   # on one GPU
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import yaml

from pgolf import config
from pgolf.shared.io import atomic_write_text

PROFILE_DIR = Path("profiles")
_FIELD_LINE = re.compile(r"^    (\w+): [^=]+ = .*?  # (.*)$")
_HEADER = """\
# Written by `pgolf profiles {name}`: profiles/{name}.yaml over the record defaults of pgolf/config.py,
# every key of every section. Each key is a field of pgolf/config.py (its comment says what it does,
# its section's check() what it may be). Edit values here or with `dvc exp run -S section.key=value`.
"""


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yaml"))


def differences(name: str, root: Path = Path(".")) -> dict:
    """{section: {key: value}} that profiles/<name>.yaml sets, as written (`resolve` checks them)."""
    src = root / PROFILE_DIR / f"{name}.yaml"
    if not src.is_file():
        raise config.ConfigError(f"{src}: no such profile (have: {', '.join(available(root))})")
    doc = config.read_doc(src)
    unknown = sorted(set(doc) - set(config.SECTIONS))
    if unknown:
        raise config.ConfigError(f"{src}: unknown section(s) {', '.join(unknown)}")
    flat = [s for s, v in doc.items() if not isinstance(v, (dict, type(None)))]
    if flat:
        raise config.ConfigError(f"{src}: section(s) {', '.join(flat)} must be a mapping of keys to values")
    return {s: dict(v or {}) for s, v in doc.items()}


def resolve(name: str, root: Path = Path(".")) -> dict:
    """The complete params document of a profile: every section, every key (record defaults + its
    differences), checked as the params gate checks params.yaml."""
    diff = differences(name, root)
    doc = {s: {**config.to_dict(cls()), **diff.get(s, {})} for s, cls in config.SECTIONS.items()}
    config.load_all(doc, str(root / PROFILE_DIR / f"{name}.yaml"))
    return doc


def load(name: str, root: Path = Path(".")) -> dict:
    """{section: checked dataclass} of a profile (for tools and benches that run one)."""
    return config.load_all(resolve(name, root), str(root / PROFILE_DIR / f"{name}.yaml"))


def field_comments() -> dict[tuple[str, str], str]:
    """{(section, key): the comment of its field in pgolf/config.py}."""
    out, section = {}, None
    for line in Path(config.__file__).read_text(encoding="utf-8").splitlines():
        if line.startswith("class "):
            section = None
        found = re.match(r'^    name: typing.ClassVar\[str\] = "(\w+)"', line)
        if found:
            section = found.group(1)
        found = _FIELD_LINE.match(line)
        if section and found:
            out[(section, found.group(1))] = found.group(2)
    return out


def render(name: str, doc: dict) -> str:
    """The text of params.yaml for a complete document: a header, then each key with its comment."""
    comments = field_comments()
    lines = [_HEADER.format(name=name).rstrip("\n")]
    for section, values in doc.items():
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=1 << 16).strip()[1:-1]
            note = comments.get((section, key))
            lines.append(f"  {text:<40}  # {note}" if note else f"  {text}")
    text = "\n".join(lines) + "\n"
    if yaml.safe_load(text) != doc:  # what DVC and the gate will read back
        raise config.ConfigError(f"profiles/{name}.yaml: params.yaml would not read back as written")
    return text


def parse_sets(items: list[str], flag: str) -> dict[str, object]:
    """["train.iterations=5", ...] -> {"train.iterations": 5, ...} (values read as YAML); ValueError
    naming `flag` and the item when one is not section.key=value."""
    out: dict[str, object] = {}
    for item in items:
        dotted, eq, value = item.partition("=")
        section, dot, key = dotted.partition(".")
        if not (eq and dot and section and key):
            raise ValueError(f"{flag} {item!r}: want section.key=value")
        out[dotted] = yaml.safe_load(value)
    return out


def apply_sets(doc: dict, sets: dict[str, object], where: str, source: str) -> None:
    """Write {"section.key": value} into the complete params document `doc` in place; ValueError
    naming `where` (the flag or row that set it) when a key is not one of `source`'s."""
    for dotted, value in sets.items():
        section, _, key = dotted.partition(".")
        if key not in (doc.get(section) or {}):
            raise ValueError(f"{where}: {dotted!r} is not a key of {source}")
        doc[section][key] = copy.deepcopy(value)


def changed_keys(old: dict, new: dict) -> list[str]:
    return [f"{s}.{k}: {(old.get(s) or {}).get(k)!r} -> {v!r}"
            for s in config.SECTIONS for k, v in new[s].items() if (old.get(s) or {}).get(k) != v]


def apply(name: str, root: Path = Path("."), sets: list[str] = ()) -> list[str]:
    """Write params.yaml from profiles/<name>.yaml with `sets` ("section.key=value") over it, after
    checking it whole; return the changed keys. ConfigError (params.yaml untouched) otherwise."""
    doc = resolve(name, root)
    if sets:
        source = str(root / PROFILE_DIR / f"{name}.yaml")
        try:
            apply_sets(doc, parse_sets(list(sets), "--set"), "--set", source)
        except ValueError as e:
            raise config.ConfigError(str(e)) from None
        config.load_all(doc, f"{source} with --set")
    params = root / "params.yaml"
    try:
        old = config.read_doc(params)
    except config.ConfigError:
        old = {}  # a broken params.yaml is what a profile replaces
    atomic_write_text(params, render(name, doc))
    return changed_keys(old, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pgolf profiles", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="profile name (a file in profiles/); none: list the profiles")
    ap.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                    help="values over the profile's (YAML), e.g. train.nproc_per_node=1 on one GPU")
    args = ap.parse_args(argv)
    if args.name is None:
        print("\n".join(available()))
        return 0
    try:
        changes = apply(args.name, sets=args.set)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    over = f" with {len(args.set)} --set" if args.set else ""
    print(f"params.yaml <- profiles/{args.name}.yaml{over} ({len(changes)} values changed)")
    for line in changes:
        print("  " + line)
    return 0
