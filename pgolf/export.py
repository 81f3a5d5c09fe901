"""`python -m pgolf.export`, the documented command: the code is pgolf.submit.export's."""

from pgolf.submit.export import main

if __name__ == "__main__":
    raise SystemExit(main())
