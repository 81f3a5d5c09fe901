"""pgolf: parameter golf as a DVC pipeline (prepare -> train -> quantize -> compress -> evaluate)."""

__version__ = "0.1.0"
