"""After the pipeline, for the challenge: the whole recipe as the packed train_gpt.py runs it
(recipe), the records-folder export (export), the rules self-check (rules), the seed summary and
significance test (seeds) and the end-of-pipeline summary (summary). It may import every stage
folder; none imports it."""
