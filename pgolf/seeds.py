"""`python -m pgolf.seeds`, the documented command: the code is pgolf.submit.seeds's."""

from pgolf.submit.seeds import main

if __name__ == "__main__":
    raise SystemExit(main())
