"""The compress stage, owner of the byte budget (artifacts/quant/ -> artifacts/final/): the stage
itself (compress), the artifact's format, codecs and loading (artifact, which evaluation reads),
the grouped serialisation (grouping), ±1 pruning (prune) and the packed train_gpt.py (pack).
Imports pgolf.shared, pgolf.config and pgolf.quantize (quantize's output names, LQER factors)."""
