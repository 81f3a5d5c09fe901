"""`python -m pgolf.summary`, the documented command: the code is pgolf.submit.summary's."""

from pgolf.submit.summary import main

if __name__ == "__main__":
    raise SystemExit(main())
