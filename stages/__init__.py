"""Thin entry points of the DVC stages: `python -m stages.<name>` (logic lives in pgolf/)."""
