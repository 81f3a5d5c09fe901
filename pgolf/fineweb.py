"""`python -m pgolf.fineweb`, the documented command: the code is pgolf.prepare.fineweb's."""

from pgolf.prepare.fineweb import main

if __name__ == "__main__":
    raise SystemExit(main())
