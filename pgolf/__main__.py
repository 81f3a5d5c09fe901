"""`python -m pgolf SUBCOMMAND`: the `pgolf` command (pgolf.cli)."""

from pgolf.cli import main

raise SystemExit(main())
