"""`python -m pgolf.rules`, the documented command: the code is pgolf.submit.rules's."""

from pgolf.submit.rules import main

if __name__ == "__main__":
    raise SystemExit(main())
