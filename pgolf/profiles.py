"""`python -m pgolf.profiles`, the documented command: the code is pgolf.params.profiles's."""

from pgolf.params.profiles import main

if __name__ == "__main__":
    raise SystemExit(main())
