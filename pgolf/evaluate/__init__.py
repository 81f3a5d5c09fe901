"""The evaluate stage (artifacts/final/ -> metrics/eval.json): scoring the artifact alone
(evaluate) and score-first test-time training (ttt). Imports pgolf.shared, pgolf.config and, to
read the artifact, pgolf.compress and pgolf.quantize."""
