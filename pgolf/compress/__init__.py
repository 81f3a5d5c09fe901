"""The compress stage, owner of the byte budget (artifacts/quant/ -> artifacts/final/): the stage
itself and its codec choice (compress), the artifact's format and reading (artifact), its codecs
(codecs) and dequantization (dequant), which evaluation reads with, the grouped serialisation
(grouping), ±1 pruning (prune) and the code bytes: the packed train_gpt.py and the raw evaluation
files (pack). Imports pgolf.shared, pgolf.config and pgolf.quantize (quantize's output names, LQER
factors)."""
