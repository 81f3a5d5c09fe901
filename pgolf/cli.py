"""The `pgolf` command (`python -m pgolf` too): the tools around the pipeline, one subcommand each.
Each subcommand is the `main(argv)` of the module that owns its code, imported only when it runs
(so `pgolf profiles` never loads torch); `pgolf SUBCOMMAND --help` prints that module's options."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {  # name -> (owner module, what it does)
    "summary": ("pgolf.submit.summary", "print the run's summary from metrics/ (the Quickstart's last command)"),
    "profiles": ("pgolf.params.profiles", "write params.yaml from profiles/NAME.yaml (no NAME: list the profiles)"),
    "export": ("pgolf.submit.export", "export a finished run as a challenge records folder"),
    "rules": ("pgolf.submit.rules", "check a finished run against the challenge rules"),
    "seeds": ("pgolf.submit.seeds", "summarise seed runs (DVC experiments) and test them against a baseline"),
    "fineweb": ("pgolf.prepare.fineweb", "download the challenge's FineWeb export (shards + tokenizer)"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pgolf", description="Parameter golf as a DVC pipeline: the tools around "
                                 "`dvc repro`. `pgolf SUBCOMMAND --help` for each one's options.")
    sub = ap.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for name, (_, what) in SUBCOMMANDS.items():
        sub.add_parser(name, help=what, add_help=False)  # the owner parses the rest, --help included
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        ap.parse_args(argv)  # prints usage (and exits 2 for an unknown subcommand, 0 for --help)
        return 2
    owner = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return owner.main(argv[1:])
